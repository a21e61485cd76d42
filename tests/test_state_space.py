"""LinearGaussianSSM: exact inference by cyclic reduction, checked against dense oracles.

Oracles: the same model written as a stacked ``toyvae.LinearGaussian`` over the flat T·K
latents (weight I_T ⊗ C, a Markov prior), the dense NumPy/SciPy formulas of
``toyvae.reference.ssm_exact``, and statsmodels' Cython Kalman filter. Tolerances are in units
of eps·M, M the model's ``magnitude`` (the sum of the absolute values of the terms), as in
``toyvae.tolerances``.
"""

from __future__ import annotations

import numpy as np
import pytest
import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import _block_tridiagonal as btd
from toyvae import reference as ref
from toyvae.gaussians import Gaussian
from toyvae.interface import ConjugateModel
from toyvae.state_space import (
    LinearGaussianSSM,
    MarkovGaussian,
    _kl_through_precision,
    _markov_elbo_by_terms,
    markov_elbo,
    markov_kl_to_posterior,
)
from toyvae.strategies import sequences, state_space_models
from toyvae.tolerances import EPS, identity_tolerance, posterior_condition

F64 = torch.float64


def make_model(k=2, d=3, num_steps=5, seed=0, noise="diagonal"):
    """A float64 model with every parameter non-trivial (full Q and P₀, a bias, a mean)."""
    gen = seeds.generator(seed)
    a = torch.randn(k, k, generator=gen, dtype=F64)
    a = 0.9 * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(k, k, generator=gen, dtype=F64)
    q = b @ b.T / k + 0.3 * torch.eye(k, dtype=F64)
    c = torch.randn(d, k, generator=gen, dtype=F64)
    r = {
        "isotropic": 0.6,
        "diagonal": torch.rand(d, generator=gen, dtype=F64) + 0.2,
        "full": 0.4 * torch.ones(d, d, dtype=F64) + torch.eye(d, dtype=F64),
    }[noise]
    return LinearGaussianSSM(
        a,
        q,
        c,
        r,
        emission_bias=torch.randn(d, generator=gen, dtype=F64),
        initial_mean=torch.randn(k, generator=gen, dtype=F64),
        initial_covariance=2.0 * torch.eye(k, dtype=F64) + 0.5,
        num_steps=num_steps,
    )


def data(model, batch=(3,), seed=1):
    return model.sample(batch, generator=seeds.generator(seed))[0]


def dense_noise(model):
    r = model.emission_noise
    d = model.data_dim
    return r * torch.eye(d, dtype=F64) if r.ndim == 0 else torch.diag(r) if r.ndim == 1 else r


def stacked(model) -> toyvae.LinearGaussian:
    """The same joint as a LinearGaussian over the flat latents: W = I_T ⊗ C, Ψ = I_T ⊗ R."""
    eye = torch.eye(model.num_steps, dtype=F64)
    return toyvae.LinearGaussian(
        torch.kron(eye, model.emission),
        model.emission_bias.repeat(model.num_steps),
        torch.kron(eye, dense_noise(model)),
        prior=model.prior(),
    )


def oracle(model, x):
    def numpy(t):
        return t.detach().numpy()

    return ref.ssm_exact(
        numpy(model.transition),
        numpy(model.transition_noise),
        numpy(model.emission),
        numpy(model.emission_noise),
        numpy(model.emission_bias),
        numpy(model.initial_mean),
        numpy(model.initial_covariance),
        numpy(x),
    )


def marginal_condition(model) -> float:
    """κ(C_x), the condition number of the dense marginal covariance the oracle inverts."""
    parameters = (
        model.transition,
        model.transition_noise,
        model.emission,
        model.emission_noise,
        model.emission_bias,
        model.initial_mean,
        model.initial_covariance,
    )
    cov_x = ref.ssm_moments(*(p.detach().numpy() for p in parameters), model.num_steps)[3]
    return float(np.linalg.cond(cov_x))


def perturbed_markov(q: MarkovGaussian, scale=0.3) -> MarkovGaussian:
    """A Markov q near q, every parameter moved (a different chain, still valid)."""
    return MarkovGaussian(
        q.initial_loc + scale,
        q.initial_scale_tril * (1 + scale),
        q.transition * (1 - scale),
        q.offset - scale,
        q.scale_tril * (1 - scale / 2),
    )


# -- exactness against three oracles ----------------------------------------------------------


@pytest.mark.parametrize("noise", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 6])
def test_agrees_with_the_stacked_linear_gaussian(noise, num_steps):
    """log p(x), the posterior, ELBO and KL equal those of the stacked LinearGaussian."""
    model = make_model(num_steps=num_steps, noise=noise)
    dense = stacked(model)
    x = data(model)
    flat = x.flatten(-2)
    post = dense.posterior(flat)
    q = MultivariateNormal(post.loc + 0.2, scale_tril=1.3 * post.scale_tril)
    # Both are sums of the terms counted in M, with κ(S) for quantities solved against the
    # posterior factor (the posterior mean, the KL): identity_tolerance × posterior_condition.
    tolerance = identity_tolerance(model, x, q) * posterior_condition(model)
    assert torch.all((model.log_evidence(x) - dense.log_evidence(flat)).abs() <= tolerance)
    assert torch.all((toyvae.elbo(model, x, q) - toyvae.elbo(dense, flat, q)).abs() <= tolerance)
    kl = toyvae.kl_to_posterior(model, x, q) - toyvae.kl_to_posterior(dense, flat, q)
    assert torch.all(kl.abs() <= tolerance)
    mine = model.posterior(x)
    # Means and covariances: a solve with Λ, error ≲ n κ(Λ) eps relative (Higham §7.2), and the
    # covariance is then a product of factors, n eps more; each route errs by that much, so
    # their difference by twice it (one route alone was exceeded: 3.8 eps at n = 2, κ = 1.24).
    kappa = posterior_condition(model) ** 2
    bound = 2 * model.latent_dim * (kappa + 1) * EPS
    assert (mine.loc - post.loc).abs().max() <= bound * post.loc.abs().max()
    cov = post.covariance_matrix
    assert (mine.covariance_matrix - cov).abs().max() <= bound * cov.abs().max()


@pytest.mark.parametrize("num_steps", [1, 4, 9])
def test_agrees_with_the_numpy_oracle(num_steps):
    """log p(x), the posterior mean and covariance equal the dense SciPy conditioning formulas."""
    model = make_model(k=3, d=2, num_steps=num_steps, noise="full", seed=3)
    x = data(model)
    log_evidence, means, covariance = oracle(model, x)
    # The oracle inverts the (TD, TD) marginal covariance C_x: its error is up to
    # TD·κ(C_x)·eps relative to the quadratic form, which dominates toyvae's n·eps·M.
    kappa_x = marginal_condition(model)
    magnitude = model.magnitude(x).numpy()
    tolerance = 4 * model.term_count * EPS * magnitude * kappa_x
    assert np.all(np.abs(model.log_evidence(x).numpy() - log_evidence) <= tolerance)
    post = model.posterior(x)
    scale = np.abs(means).max()
    assert np.abs(post.loc.numpy() - means).max() <= model.latent_dim * kappa_x * EPS * scale * 10
    # ×10: the oracle's gain Σ_zx C_x⁻¹ goes through two products after the inverse.
    cov_error = np.abs(post.covariance_matrix[0].numpy() - covariance).max()
    assert cov_error <= 10 * model.latent_dim * kappa_x * EPS * np.abs(covariance).max()


def statsmodels_loglike(model, x: torch.Tensor) -> float:
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    k, d = model.state_dim, model.data_dim
    kf = KalmanFilter(k_endog=d, k_states=k, k_posdef=k)
    kf.bind(x.numpy().copy())
    kf["design"] = model.emission.numpy()
    kf["obs_intercept"] = model.emission_bias.numpy()[:, None]
    kf["obs_cov"] = dense_noise(model).numpy()
    kf["transition"] = model.transition.numpy()
    kf["selection"] = np.eye(k)
    kf["state_cov"] = model.transition_noise.numpy()
    kf.initialize_known(model.initial_mean.numpy(), model.initial_covariance.numpy())
    return kf.loglike()


@pytest.mark.parametrize(
    ("k", "d", "num_steps", "noise", "seed"),
    [(1, 1, 1, "isotropic", 0), (2, 3, 257, "diagonal", 1), (4, 10, 3000, "full", 2)],
)
def test_agrees_with_statsmodels_kalman_filter(k, d, num_steps, noise, seed):
    """log p(x) equals statsmodels' Kalman-filter log-likelihood to 1e-10 relative."""
    model = make_model(k=k, d=d, num_steps=num_steps, noise=noise, seed=seed)
    x = data(model, batch=(), seed=seed)
    expected = statsmodels_loglike(model, x)
    # The acceptance criterion, 1e-10 relative. Both are O(T) sums of O(D + K) terms:
    # their rounding (n·eps·M/|log p| ≈ 3000·14·2e-16·3 ≈ 3e-11 at worst) stays below it.
    assert abs(model.log_evidence(x).item() - expected) <= 1e-10 * abs(expected)


# -- the identity and its tightness -----------------------------------------------------------


def test_identity_for_dense_and_markov_q():
    """log p(x) = ELBO(q) + KL(q ‖ p(z|x)) for a dense q and for a Markov q, to rounding."""
    model = make_model(num_steps=6)
    x = data(model)
    q_markov = perturbed_markov(model.markov_posterior(x))
    q_dense = q_markov.to_multivariate_normal()
    tolerance = identity_tolerance(model, x, q_dense) * posterior_condition(model)
    log_evidence = model.log_evidence(x)
    dense_sum = toyvae.elbo(model, x, q_dense) + toyvae.kl_to_posterior(model, x, q_dense)
    markov_sum = markov_elbo(model, x, q_markov) + markov_kl_to_posterior(model, x, q_markov)
    assert torch.all((dense_sum - log_evidence).abs() <= tolerance)
    assert torch.all((markov_sum - log_evidence).abs() <= tolerance)
    # The Markov functions are the dense ones computed in O(T K³): same values, same bound.
    assert torch.all(
        (markov_elbo(model, x, q_markov) - toyvae.elbo(model, x, q_dense)).abs() <= tolerance
    )
    kl_dense = toyvae.kl_to_posterior(model, x, q_dense)
    assert torch.all((markov_kl_to_posterior(model, x, q_markov) - kl_dense).abs() <= tolerance)
    assert torch.all(kl_dense > 0.1)  # a real gap: q is not the posterior
    # Both ELBOs share the posterior's factor with the KL; the textbook sums share nothing.
    by_steps = _markov_elbo_by_terms(model, x, q_markov, model._factors())
    by_terms = toyvae.expected_log_likelihood(model, x, q_dense) - toyvae.kl_to_prior(
        q_dense, model
    )
    for elbo in (by_steps, by_terms):
        assert torch.all((elbo + kl_dense - log_evidence).abs() <= tolerance)


def test_posterior_as_markov_chain_is_tight():
    """At q = p(z|x), written as a Markov chain or dense, ELBO = log p(x) and KL = 0."""
    model = make_model(k=3, d=2, num_steps=7, noise="full")
    x = data(model)
    posterior = model.markov_posterior(x)
    dense = posterior.to_multivariate_normal()
    exact = model.posterior(x)
    tolerance = identity_tolerance(model, x, dense) * posterior_condition(model)
    log_evidence = model.log_evidence(x)
    assert torch.all((markov_elbo(model, x, posterior) - log_evidence).abs() <= tolerance)
    assert torch.all(markov_kl_to_posterior(model, x, posterior).abs() <= tolerance)
    assert torch.all((toyvae.elbo(model, x, exact) - log_evidence).abs() <= tolerance)
    # The chain's dense form is the posterior: a Schur complement of the smoothed covariances,
    # error ≲ n κ(Λ) eps relative.
    bound = model.latent_dim * posterior_condition(model) ** 2 * EPS
    cov = exact.covariance_matrix
    assert (dense.covariance_matrix - cov).abs().max() <= bound * cov.abs().max()
    assert (dense.loc - exact.loc).abs().max() <= bound * exact.loc.abs().max()


@given(st.data())
def test_identity_property(data_strategy):
    """For Hypothesis models, data and Markov q: ELBO + KL = log p(x), dense and Markov agree;
    the Markov KL is a sum of non-negative terms, so never negative, even at the posterior."""
    model = data_strategy.draw(state_space_models())
    x = data_strategy.draw(sequences(model, batch_shape=(2,)))
    base = model.markov_posterior(x)
    shift = data_strategy.draw(st.floats(-0.5, 0.5))
    q = perturbed_markov(base, shift)
    q_dense = q.to_multivariate_normal()
    tolerance = identity_tolerance(model, x, q_dense) * posterior_condition(model)
    log_evidence = model.log_evidence(x)
    total = markov_elbo(model, x, q) + markov_kl_to_posterior(model, x, q)
    assert torch.all((total - log_evidence).abs() <= tolerance)
    assert torch.all(markov_kl_to_posterior(model, x, q) >= 0)
    assert torch.all(markov_kl_to_posterior(model, x, base) >= 0)
    dense_total = toyvae.elbo(model, x, q_dense) + toyvae.kl_to_posterior(model, x, q_dense)
    assert torch.all((dense_total - log_evidence).abs() <= tolerance)


# -- smoothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 5, 8, 11])
def test_smoothed_moments_are_the_dense_posterior_blocks(num_steps):
    """Smoothed means, marginal and lag-one covariances are blocks of the dense posterior."""
    model = make_model(k=2, d=2, num_steps=num_steps, seed=num_steps)
    x = data(model)
    _, means, covariance = oracle(model, x)
    smoothed = model.smoothed(x)
    k = model.state_dim
    blocks = torch.as_tensor(covariance).reshape(num_steps, k, num_steps, k)
    steps = torch.arange(num_steps)
    marginal = blocks[steps, :, steps]  # (T, K, K)
    lag = blocks[steps[1:], :, steps[:-1]]  # Cov(z_{t+1}, z_t)
    # The dense oracle's errors are TK·κ(C_x)·eps relative, ×10 for its products after the
    # inverse (see test_agrees_with_the_numpy_oracle); toyvae's are smaller (n κ(Λ) eps).
    bound = 10 * model.latent_dim * marginal_condition(model) * EPS
    scale = np.abs(covariance).max()
    assert smoothed.mean.shape == (3, num_steps, k)
    assert smoothed.covariance.shape == (3, num_steps, k, k)
    assert smoothed.cross_covariance.shape == (3, num_steps - 1, k, k)
    assert (smoothed.mean - torch.as_tensor(means).unflatten(-1, (num_steps, k))).abs().max() <= (
        bound * np.abs(means).max()
    )
    assert (smoothed.covariance[0] - marginal).abs().max() <= bound * scale
    assert torch.all((smoothed.cross_covariance[0] - lag).abs() <= bound * scale)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 33])
def test_cyclic_reduction_matches_dense_linear_algebra(size):
    """Solve, log det and selected inverse of a repeated-block tridiagonal Λ equal dense ones."""
    gen = seeds.generator(size)
    k = 3

    def spd():
        a = torch.randn(k, k, generator=gen, dtype=F64)
        return a @ a.T + 3 * torch.eye(k, dtype=F64)

    while True:
        lower = 0.5 * torch.randn(k, k, generator=gen, dtype=F64)
        matrix = btd.UniformBlockTridiagonal(size, spd(), spd(), spd(), lower)
        dense = matrix.dense()
        # Λ is a precision: positive definite. Blocks ≥ 3I with ‖lower‖ up to 2.3 need not be
        # (a fresh seed gave an indefinite Λ at size 13, which factor() rightly refused), so
        # such a draw is drawn again; the seeds as written need no second draw.
        if torch.linalg.eigvalsh(dense).min() > 0:
            break
    levels = btd.factor(matrix)
    rhs = torch.randn(2, size, k, generator=gen, dtype=F64)
    expected = torch.linalg.solve(dense, rhs.reshape(2, -1).mT).mT.reshape(2, size, k)
    inverse = torch.linalg.inv(dense).reshape(size, k, size, k)
    cov, cross = btd.selected_inverse(levels)
    steps = torch.arange(size)
    # Backward-stable eliminations: errors ≲ n κ eps relative, n = size·K (Higham §7.2, §9).
    bound = size * k * torch.linalg.cond(dense) * EPS
    assert (btd.solve(levels, rhs) - expected).abs().max() <= bound * expected.abs().max()
    assert abs(btd.log_det(levels) - torch.logdet(dense)) <= bound * torch.logdet(dense).abs()
    assert (cov - inverse[steps, :, steps]).abs().max() <= bound * inverse.abs().max()
    lag = inverse[steps[1:], :, steps[:-1]]
    assert torch.all((cross - lag).abs() <= bound * inverse.abs().max())


# -- the interface, the Markov q, gradients ---------------------------------------------------


def test_interface_needs_a_bound_length():
    """A bound model is a ConjugateModel with latent_dim T·K; an unbound one says how to bind."""
    model = make_model(k=2, d=3, num_steps=4)
    assert isinstance(model, ConjugateModel)
    assert model.latent_dim == 8 and model.data_event_shape == (4, 3) and model.state_dim == 2
    free = LinearGaussianSSM(model.transition, model.transition_noise, model.emission, 1.0)
    with pytest.raises(ValueError, match="with_num_steps"):
        _ = free.latent_dim
    x = data(model)
    # An unbound model reads T from x; binding changes nothing else.
    bound = free.with_num_steps(4)
    assert torch.equal(free.log_evidence(x), bound.log_evidence(x))
    with pytest.raises(ValueError, match="4 steps"):
        bound.check_data(x[..., :3, :])
    assert model.prior().loc.shape == (8,)
    z = model.sample(5, generator=seeds.generator(0))[1]
    assert z.shape == (5, 4, 2)
    # log_joint takes the flat latents of the interface: Bayes' rule at z.
    flat = z.flatten(-2)
    x5 = data(model, batch=(5,))
    post = model.posterior(x5)
    bayes = model.log_joint(x5, flat) - model.log_evidence(x5)
    assert torch.all((bayes - post.log_prob(flat)).abs() <= identity_tolerance(model, x5, z=flat))


def test_markov_gaussian_dense_form_and_marginals_agree():
    """MarkovGaussian's forward-recursion moments are the blocks of its dense form."""
    model = make_model(k=2, d=2, num_steps=5)
    q = perturbed_markov(model.markov_posterior(data(model)))
    mean, cov, cross = q.marginals()
    dense = q.to_multivariate_normal()
    blocks = dense.covariance_matrix.reshape(3, 5, 2, 5, 2)
    steps = torch.arange(5)
    # Same products in a different order: a few ulps of the largest entry.
    tol = 64 * EPS * blocks.abs().max()
    assert (blocks[:, steps, :, steps].movedim(0, 1) - cov).abs().max() <= tol
    assert (blocks[:, steps[1:], :, steps[:-1]].movedim(0, 1) - cross).abs().max() <= tol
    assert torch.equal(dense.loc, mean.flatten(-2))
    assert torch.allclose(q.log_det_cov(), torch.logdet(dense.covariance_matrix), atol=1e-12)


def test_log_evidence_gradients_pass_gradcheck():
    """log p(x) is differentiable in every parameter (finite differences agree)."""
    model = make_model(k=2, d=2, num_steps=5, noise="full")
    x = data(model, batch=(2,))
    params = [
        p.detach().clone().requires_grad_(True)
        for p in (
            model.transition,
            model.transition_noise,
            model.emission,
            model.emission_noise,
            model.emission_bias,
            model.initial_mean,
        )
    ]

    def log_evidence(a, q, c, r, d, m):
        q, r = 0.5 * (q + q.mT), 0.5 * (r + r.mT)
        return LinearGaussianSSM(a, q, c, r, emission_bias=d, initial_mean=m).log_evidence(x)

    assert torch.autograd.gradcheck(log_evidence, params)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_markov_kl_and_markov_posterior_gradients_pass_gradcheck(num_steps):
    """markov_kl_to_posterior (in the model's parameters, in q's, and in both), markov_posterior
    (in the model's) and the regrouped ELBOs, Markov and dense, are differentiable: their values
    come from the square-root factor, their derivatives from Λ's blocks, the smoothing moments
    and the ELBO's textbook sums, and finite
    differences of the values agree with those derivatives. The derivative's carrier is the
    same function: its value is the KL's, to the identity's rounding bound."""
    model = make_model(k=2, d=2, num_steps=num_steps, noise="full")
    x = data(model, batch=(2,))
    q = perturbed_markov(model.markov_posterior(x))
    model_params = [
        p.detach().clone().requires_grad_(True)
        for p in (model.transition, model.transition_noise, model.emission, model.emission_noise)
    ]
    q_params = [
        getattr(q, name).detach().clone().requires_grad_(True)
        for name in ("initial_loc", "initial_scale_tril", "transition", "offset", "scale_tril")
    ]

    def build(a, q_noise, c, r):
        q_noise, r = 0.5 * (q_noise + q_noise.mT), 0.5 * (r + r.mT)
        return LinearGaussianSSM(a, q_noise, c, r, emission_bias=model.emission_bias)

    def kl(*params):
        return markov_kl_to_posterior(build(*params[:4]), x, MarkovGaussian(*params[4:]))

    def kl_in_q(*params):
        return markov_kl_to_posterior(model, x, MarkovGaussian(*params))

    def kl_in_model(*params):
        return markov_kl_to_posterior(build(*params), x, q)

    def chain(*params):
        post = build(*params).markov_posterior(x)
        return post.initial_scale_tril, post.transition, post.offset, post.scale_tril

    def markov(*params):
        return markov_elbo(build(*params[:4]), x, MarkovGaussian(*params[4:]))

    def dense(*params):
        bound = build(*params[:4]).with_num_steps(num_steps)
        return toyvae.elbo(bound, x, MarkovGaussian(*params[4:]).to_multivariate_normal())

    assert torch.autograd.gradcheck(kl, model_params + q_params)
    assert torch.autograd.gradcheck(kl_in_q, q_params)
    assert torch.autograd.gradcheck(kl_in_model, model_params)
    assert torch.autograd.gradcheck(chain, model_params)
    for elbo in (markov, dense):  # one at a time: gradcheck passes a tuple with a constant
        assert torch.autograd.gradcheck(elbo, model_params + q_params)

    f = model._factors()
    carrier = _kl_through_precision(model, f, model._solve(x, f), q)
    tolerance = identity_tolerance(model, x, q.to_multivariate_normal()) * posterior_condition(
        model
    )
    assert torch.all((carrier - markov_kl_to_posterior(model, x, q)).abs() <= tolerance)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"transition": torch.ones(2, 3)}, ValueError, ["transition", "(K, K)", "(2, 3)"]),
        ({"transition": "A"}, TypeError, ["transition", "str"]),
        ({"emission": torch.ones(3, 3)}, ValueError, ["emission", "K = 2", "(3, 3)"]),
        ({"transition_noise": -1.0}, ValueError, ["transition_noise", "positive", "-1.0"]),
        ({"transition_noise": torch.ones(3)}, ValueError, ["transition_noise", "(2,)", "(3,)"]),
        ({"emission_noise": torch.ones(3, 3)}, ValueError, ["emission_noise", "positive definite"]),
        ({"emission_noise": float("nan")}, ValueError, ["emission_noise", "NaN"]),
        ({"emission_bias": torch.ones(2)}, ValueError, ["emission_bias", "(3,)", "(2,)"]),
        ({"initial_mean": torch.ones(3)}, ValueError, ["initial_mean", "(2,)", "(3,)"]),
        (
            {"initial_covariance": torch.tensor([[1.0, 0.5], [0.0, 1.0]])},
            ValueError,
            ["initial_covariance", "symmetric"],
        ),
        ({"num_steps": 0}, ValueError, ["num_steps", "positive", "0"]),
        ({"num_steps": 2.0}, TypeError, ["num_steps", "float"]),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, words):
    """Bad arguments raise an error naming the argument, what it got and what was expected."""
    args = {
        "transition": 0.5 * torch.eye(2, dtype=F64),
        "transition_noise": 1.0,
        "emission": torch.ones(3, 2, dtype=F64),
        "emission_noise": 1.0,
    } | kwargs
    with pytest.raises(error) as info:
        LinearGaussianSSM(
            args.pop("transition"),
            args.pop("transition_noise"),
            args.pop("emission"),
            args.pop("emission_noise"),
            **args,
        )
    for word in words:
        assert word in str(info.value)


def test_invalid_data_and_q_are_named():
    """Wrong x or q shapes raise errors naming them and the expected shapes."""
    model = make_model(k=2, d=3, num_steps=4)
    with pytest.raises(ValueError, match=r"x must be a sequence of shape \(\.\.\., 4, 3\)"):
        model.log_evidence(torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="finite"):
        model.log_evidence(torch.full((4, 3), float("nan"), dtype=F64))
    x = data(model)
    q = model.markov_posterior(x)
    with pytest.raises(ValueError, match="T = 3"):
        markov_elbo(model.with_num_steps(3), x[..., :3, :], q)
    with pytest.raises(TypeError, match="MarkovGaussian"):
        markov_kl_to_posterior(model, x, q.to_multivariate_normal())
    with pytest.raises(ValueError, match="scale_tril's diagonal"):
        MarkovGaussian(q.initial_loc, q.initial_scale_tril, q.transition, q.offset, -q.scale_tril)
    with pytest.raises(ValueError, match="z must be flat latents"):
        model.log_joint(x, torch.zeros(3, 4, 2, dtype=F64))


def test_posterior_gaussian_in_exact_is_canonical():
    """exact(x) gives a canonical Gaussian whose factor is lower triangular, positive diagonal."""
    model = make_model(num_steps=3)
    x = data(model)
    post = model.exact(model.check_data(x)).posterior
    assert isinstance(post, Gaussian)
    assert torch.equal(post.scale_tril, post.scale_tril.tril())
    assert bool((post.scale_tril.diagonal(dim1=-2, dim2=-1) > 0).all())


def test_unbound_model_works_with_the_generic_functions():
    """An unbound model reads T from x in toyvae.elbo, kl_to_posterior and log_weights_at."""
    model = make_model(k=2, d=3, num_steps=4)
    free = LinearGaussianSSM(
        model.transition,
        model.transition_noise,
        model.emission,
        model.emission_noise,
        emission_bias=model.emission_bias,
        initial_mean=model.initial_mean,
        initial_covariance=model.initial_covariance,
    )
    x = data(model, batch=(3,))
    q = model.posterior(x)
    q = MultivariateNormal(q.loc + 0.1, scale_tril=1.2 * q.scale_tril)
    noise = torch.randn(2, 3, 8, generator=seeds.generator(1), dtype=F64)
    # The same parameters, bound by the hook or by hand: the same computation, bit for bit.
    for f in (toyvae.elbo, toyvae.kl_to_posterior):
        assert torch.equal(f(free, x, q), f(model, x, q))
    assert torch.equal(
        toyvae.log_weights_at(free, x, q, noise), toyvae.log_weights_at(model, x, q, noise)
    )


def test_model_is_immutable_and_refuses_in_place_edits():
    """Attributes cannot be set; an in-place edit of a parameter makes later calls raise."""
    transition = 0.5 * torch.eye(2, dtype=F64)
    model = LinearGaussianSSM(transition, 0.3, torch.ones(3, 2, dtype=F64), 0.2)
    x = torch.zeros(4, 3, dtype=F64)
    model.log_evidence(x)
    with pytest.raises(AttributeError, match="immutable"):
        model.transition = transition
    bound = model.with_num_steps(4)
    transition[0, 1] = 0.1
    for m in (model, bound):
        with pytest.raises(RuntimeError, match="transition was modified in place"):
            m.log_evidence(x)


def test_generic_functions_take_a_markov_q():
    """toyvae.elbo and kl_to_posterior use the Markov route; the estimators its dense form."""
    model = make_model(num_steps=5)
    x = data(model, batch=(2,))
    q = perturbed_markov(model.markov_posterior(x))
    assert isinstance(q, toyvae.StructuredGaussian)
    assert torch.equal(toyvae.elbo(model, x, q), markov_elbo(model, x, q))
    assert torch.equal(toyvae.kl_to_posterior(model, x, q), markov_kl_to_posterior(model, x, q))
    noise = torch.randn(3, 2, 10, generator=seeds.generator(2), dtype=F64)
    dense = q.to_multivariate_normal()
    # The estimators read the structured q through its dense form: identical draws.
    assert torch.equal(
        toyvae.log_weights_at(model, x, q, noise), toyvae.log_weights_at(model, x, dense, noise)
    )
