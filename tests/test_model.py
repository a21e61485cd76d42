"""LinearGaussian: construction, validation, shapes, dtypes, and its torch distributions."""

import math

import mp_oracle as oracle
import numpy as np
import pytest
import scipy.stats
import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st

import toyvae
from toyvae.strategies import linear_gaussian_models, observations
from toyvae.tolerances import EPS, identity_tolerance

F64 = torch.float64


def small_model(kind="diagonal", d=4, k=2, seed=0):
    gen = seeds.generator(seed)
    w = torch.randn(d, k, generator=gen, dtype=F64)
    b = torch.randn(d, generator=gen, dtype=F64)
    noise = {
        "isotropic": 0.7,
        "diagonal": torch.rand(d, generator=gen, dtype=F64) + 0.2,
        "full": torch.eye(d, dtype=F64) + 0.3 * torch.ones(d, d, dtype=F64),
    }[kind]
    return toyvae.LinearGaussian(w, b, noise)


# -- construction and validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"weight": "W"}, TypeError, ["weight", "str"]),
        ({"weight": torch.ones(3)}, ValueError, ["weight", "(D, K)", "(3,)"]),
        ({"weight": torch.ones(0, 2)}, ValueError, ["weight", "(0, 2)"]),
        ({"weight": torch.tensor([[1.0, float("nan")]])}, ValueError, ["weight", "NaN"]),
        ({"weight": torch.ones(3, 2, dtype=torch.complex64)}, TypeError, ["weight", "complex"]),
        ({"bias": torch.ones(4)}, ValueError, ["bias", "(3,)", "(4,)"]),
        ({"bias": [0.0, float("inf"), 0.0]}, ValueError, ["bias", "infinite"]),
        ({"noise_variance": 0.0}, ValueError, ["noise_variance", "positive", "0.0"]),
        ({"noise_variance": [1.0, -1.0, 1.0]}, ValueError, ["noise_variance", "positive", "-1.0"]),
        ({"noise_variance": torch.ones(2)}, ValueError, ["noise_variance", "(3,)", "(2,)"]),
        ({"noise_variance": float("nan")}, ValueError, ["noise_variance", "NaN"]),
        (
            {"noise_variance": torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])},
            ValueError,
            ["noise_variance", "symmetric"],
        ),
        (
            {"noise_variance": torch.tensor([[1.0, 2, 0], [2, 1, 0], [0, 0, 1]])},
            ValueError,
            ["noise_variance", "positive definite", "-1"],
        ),
        ({"noise_variance": "big"}, TypeError, ["noise_variance", "str"]),
        ({"noise_variance": True}, TypeError, ["noise_variance", "bool"]),
        ({"bias": torch.ones(3, dtype=torch.bool)}, TypeError, ["bias", "bool"]),
        (
            # a relative asymmetry of 1e-8 is far above the 64·eps that rounding can cause
            {"noise_variance": torch.tensor([[1.0, 1e-8, 0], [0, 1, 0], [0, 0, 1]], dtype=F64)},
            ValueError,
            ["noise_variance", "symmetric"],
        ),
    ],
)
def test_bad_parameters_raise_errors_that_name_them(kwargs, error, words):
    """Every malformed parameter raises ValueError/TypeError naming the argument and what it got."""
    arguments = {"weight": torch.ones(3, 2, dtype=F64), **kwargs}
    with pytest.raises(error) as info:
        toyvae.LinearGaussian(**arguments)
    for word in words:
        assert word in str(info.value)


def test_rounding_level_asymmetry_is_accepted():
    """A full Ψ that is symmetric only to a few ulps (as after arithmetic) is accepted."""
    psi = torch.tensor([[2.0, 0.5, 0], [0.5, 2, 0], [0, 0, 2]], dtype=F64)
    psi[0, 1] += 4 * torch.finfo(F64).eps * 2  # 4 ulps of the largest entry
    assert (
        toyvae.LinearGaussian(torch.ones(3, 2, dtype=F64), noise_variance=psi).noise_kind == "full"
    )


def test_numpy_inputs_become_float64_and_keep_values():
    """NumPy parameters become float64 tensors holding the same numbers."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    model = toyvae.LinearGaussian(w, np.ones(3), np.full(3, 2.0))
    assert model.weight.dtype == F64
    assert model.bias.dtype == F64 and model.noise_variance.dtype == F64
    assert torch.equal(model.weight, torch.as_tensor(w, dtype=F64))
    assert (model.data_dim, model.latent_dim, model.noise_kind) == (3, 2, "diagonal")


def test_float32_model_computes_in_float32():
    """A float32 weight makes a float32 model whose results are float32."""
    model = toyvae.LinearGaussian(torch.ones(3, 2), noise_variance=0.5)
    assert model.log_evidence(torch.zeros(3)).dtype == torch.float32
    assert model.posterior(torch.zeros(2, 3)).loc.dtype == torch.float32


@pytest.mark.parametrize(
    ("method", "argument", "words"),
    [
        ("log_evidence", torch.ones(5), ["x", "last dimension 4", "(5,)"]),
        ("log_evidence", torch.tensor(1.0), ["x", "last dimension 4"]),
        ("posterior", torch.full((2, 4), float("nan")), ["x", "NaN", "(2, 4)"]),
        ("likelihood", torch.ones(3), ["z", "last dimension 2", "(3,)"]),
    ],
)
def test_bad_data_raise_errors_that_name_them(method, argument, words):
    """Data with the wrong last dimension or non-finite entries raise ValueError naming x or z."""
    with pytest.raises(ValueError) as info:
        getattr(small_model(), method)(argument)
    for word in words:
        assert word in str(info.value)


def test_log_joint_checks_both_arguments():
    """log_joint names z when z is wrong and x when x is wrong."""
    model = small_model()
    with pytest.raises(ValueError, match="z"):
        model.log_joint(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="x"):
        model.log_joint(torch.zeros(3), torch.zeros(2))


# -- shapes, distributions, agreement with SciPy ---------------------------------------------


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_shapes_follow_the_batch(kind):
    """Methods return the batch shape of x (and of z, broadcast), as documented."""
    model = small_model(kind)
    x = torch.zeros(5, 3, 4, dtype=F64)
    assert model.log_evidence(x).shape == (5, 3)
    post = model.posterior(x)
    assert post.batch_shape == (5, 3) and post.event_shape == (2,)
    assert model.log_joint(x, torch.zeros(3, 2, dtype=F64)).shape == (5, 3)
    assert model.log_evidence(torch.zeros(4, dtype=F64)).shape == ()
    xs, zs = model.sample((7, 2))
    assert xs.shape == (7, 2, 4) and zs.shape == (7, 2, 2)


@given(st.data(), linear_gaussian_models())
def test_log_evidence_matches_scipy(data, model):
    """log p(x) equals scipy.stats.multivariate_normal.logpdf with the dense covariance WWᵀ + Ψ."""
    x = data.draw(observations(model, batch_shape=(3,)))
    psi = model.noise_variance.numpy()
    psi = psi if model.noise_kind == "full" else np.diag(np.broadcast_to(psi, (model.data_dim,)))
    w = model.weight.numpy()
    expected = scipy.stats.multivariate_normal(model.bias.numpy(), w @ w.T + psi).logpdf(x.numpy())
    # SciPy goes through an eigendecomposition of C = WWᵀ + Ψ; its error is eps·M amplified by
    # at most κ(C) ≤ 1 + ‖W‖²/λmin(Ψ), which the strategy bounds.
    kappa = np.linalg.cond(w @ w.T + psi)
    tol = identity_tolerance(model, x).numpy() * kappa
    assert np.all(np.abs(model.log_evidence(x).numpy() - expected) <= tol)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_distributions_agree_with_exact_methods(kind):
    """prior · likelihood gives log_joint, and the marginal gives log_evidence."""
    model = small_model(kind)
    gen = seeds.generator(1)
    x, z = model.sample((6,), generator=gen)
    tol = identity_tolerance(model, x) * 10  # ‖z‖² terms are O(1) here: a tenfold margin
    joint = model.prior().log_prob(z) + model.likelihood(z).log_prob(x)
    assert ((joint - model.log_joint(x, z)).abs() <= tol).all()
    assert ((model.marginal().log_prob(x) - model.log_evidence(x)).abs() <= tol).all()


@pytest.mark.false_alarm(1e-6)  # 4 coordinate means × 5.5 s.e. (3.8e-8 each), ≤ 1e-6 as stated
def test_sample_is_reproducible_with_a_generator():
    """The same generator seed gives the same draws; the draws have the model's moments."""
    model = small_model("full")
    a = model.sample((3,), generator=seeds.generator(5))
    b = model.sample((3,), generator=seeds.generator(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n = 200_000
    x, _ = model.sample((n,), generator=seeds.generator(6))
    cov = model.weight @ model.weight.T + model.noise_variance
    # Each coordinate mean has standard error sqrt(C_ii / n); 5.5 standard errors bound a
    # Gaussian deviation with probability 1 − 4e-8 per coordinate (≤ 1e-6 over the 4).
    se = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - model.bias).abs() <= 5.5 * se).all()


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.false_alarm(1e-6)  # 16 entries × 5.5 s.e. (3.8e-8 each), ≤ 1e-6 as stated
def test_sample_covariance_is_the_marginal_covariance(kind):
    """Draws of x have covariance WWᵀ + Ψ (so the noise uses L_Ψ, not L_Ψᵀ or Ψ itself)."""
    model = small_model(kind)
    if kind == "full":  # strongly correlated noise, so that L_Ψ L_Ψᵀ and L_Ψᵀ L_Ψ differ
        a = torch.randn(4, 4, generator=seeds.generator(7), dtype=F64)
        model = toyvae.LinearGaussian(model.weight, model.bias, a @ a.T + 0.1 * torch.eye(4))
    n = 200_000
    x, _ = model.sample((n,), generator=seeds.generator(8))
    psi = model.noise_variance
    psi = psi if kind == "full" else torch.diag(psi.expand(4))
    cov = model.weight @ model.weight.T + psi
    centred = x - model.bias  # the exact mean, so the estimate below is unbiased
    sample = centred.T @ centred / n
    # For Gaussian x, Var(x_i x_j) = C_ii C_jj + C_ij²; by the CLT the n-sample mean errs by
    # more than 5.5 of its standard errors with probability 3.8e-8 per entry, ≤ 1e-6 over 16.
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    assert ((sample - cov).abs() <= 5.5 * se).all()


def test_parameters_are_differentiable():
    """Gradients flow to weight, bias and noise variance through log_evidence."""
    w = torch.randn(4, 2, dtype=F64, requires_grad=True)
    b = torch.zeros(4, dtype=F64, requires_grad=True)
    s = torch.tensor(0.5, dtype=F64, requires_grad=True)
    model = toyvae.LinearGaussian(w, b, s)
    model.log_evidence(torch.ones(3, 4, dtype=F64)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (w, b, s))
    # Nothing is cached: a second call builds a fresh graph.
    model.log_evidence(torch.ones(4, dtype=F64)).backward()


@given(st.data(), linear_gaussian_models())
def test_posterior_scale_is_the_cholesky_factor_of_the_inverse_precision(data, model):
    """posterior().scale_tril is lower triangular with positive diagonal and = chol(Λ⁻¹)."""
    x = data.draw(observations(model))
    tril = model.posterior(x).scale_tril
    psi = model.noise_variance
    psi = psi if model.noise_kind == "full" else torch.diag(psi.expand(model.data_dim))
    precision = torch.eye(model.latent_dim, dtype=F64) + model.weight.T @ torch.linalg.solve(
        psi, model.weight
    )
    textbook = torch.linalg.cholesky(torch.linalg.inv(precision))
    assert torch.equal(tril, torch.tril(tril)) and (tril.diagonal() > 0).all()
    # The two routes form Λ differently (whitening by L_Ψ against solving with Ψ), so their Λ
    # differ by up to D·κ(Ψ)·eps·‖G‖ ≤ D·κ(Ψ)·eps·‖Λ‖; a Cholesky factor of Λ⁻¹ moves by
    # κ(Λ) times Λ's relative perturbation (Higham, Thm 10.8), on top of each route's own
    # K·κ(Λ)·eps backward error. Relative to ‖Λ⁻¹‖^{1/2}, with a factor 8 for the constants:
    kappa = torch.linalg.cond(precision)
    kappa_psi = torch.linalg.cond(psi)
    scale = torch.linalg.inv(precision).norm(2).sqrt()
    k, d = model.latent_dim, model.data_dim
    tol = 8 * kappa * (k + d * kappa_psi) * EPS * scale
    assert ((tril - textbook).abs() <= tol).all()


# -- a Gaussian prior ---------------------------------------------------------------------


def _prior(k=2, seed=5):
    gen = seeds.generator(seed)
    loc = torch.randn(k, generator=gen, dtype=F64)
    tril = torch.tril(0.4 * torch.randn(k, k, generator=gen, dtype=F64), -1)
    tril = tril + torch.diag(torch.rand(k, generator=gen, dtype=F64) + 0.5)
    return torch.distributions.MultivariateNormal(loc, scale_tril=tril)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
def test_prior_gives_the_textbook_marginal_and_posterior(kind):
    """With p(z) = N(m₀, P₀): p(x) = N(b + Wm₀, WP₀Wᵀ + Ψ) and p(z|x) by Gaussian conditioning."""
    base = small_model(kind)
    prior = _prior()
    model = toyvae.LinearGaussian(base.weight, base.bias, base.noise_variance, prior=prior)
    x = torch.randn(5, 4, generator=seeds.generator(1), dtype=F64)
    w, b, psi = base.weight.numpy(), base.bias.numpy(), base.noise.dense().numpy()
    m0, p0 = prior.loc.numpy(), prior.covariance_matrix.numpy()
    cov = w @ p0 @ w.T + psi
    expected = scipy.stats.multivariate_normal(b + w @ m0, cov).logpdf(x.numpy())
    # Gaussian conditioning of the joint (z, x): Σ = P₀ − P₀WᵀC⁻¹WP₀, μ = m₀ + P₀WᵀC⁻¹(x − b − Wm₀).
    gain = np.linalg.solve(cov, w @ p0).T
    post_cov = p0 - gain @ w @ p0
    post_mean = m0 + (x.numpy() - b - w @ m0) @ gain.T
    post = model.posterior(x)
    # Tolerances: the dense route forms C and solves with it; κ(C) ≤ 1e2 here, so 1e3·eps·scale
    # covers both routes' rounding (a wrong prior changes these by O(1)).
    scale = np.abs(expected).max()
    assert np.abs(model.log_evidence(x).numpy() - expected).max() <= 1e3 * EPS * scale
    assert np.abs(post.loc.numpy() - post_mean).max() <= 1e3 * EPS * np.abs(post_mean).max()
    assert np.abs(post.covariance_matrix.numpy() - post_cov).max() <= 1e3 * EPS
    assert torch.equal(model.prior().loc, prior.loc)


def test_prior_keeps_the_identity_and_the_elbo_uses_it():
    """log p(x) = ELBO + KL with a non-standard prior; the ELBO's KL term is KL(q ‖ the prior)."""
    base = small_model("full")
    model = toyvae.LinearGaussian(base.weight, base.bias, base.noise_variance, prior=_prior())
    x, _ = model.sample(6, generator=seeds.generator(2))
    q = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(6, 2, dtype=F64), torch.ones(6, 2, dtype=F64)), 1
    )
    tolerance = identity_tolerance(model, x, q)
    kl = toyvae.kl_to_posterior(model, x, q)
    assert ((model.log_evidence(x) - toyvae.elbo(model, x, q) - kl).abs() <= tolerance).all()
    # The independent route: reconstruction minus KL(q ‖ N(m₀, P₀)), not KL(q ‖ N(0, I)).
    terms = toyvae.expected_log_likelihood(model, x, q) - toyvae.kl_to_prior(q, model)
    assert ((model.log_evidence(x) - terms - kl).abs() <= tolerance).all()
    standard = toyvae.elbo(base, x, q)
    assert (standard - toyvae.elbo(model, x, q)).abs().min() > 1e-3


def test_log_joint_with_a_prior_is_the_sum_of_torch_densities():
    """log p(x, z) = log N(x; Wz + b, Ψ) + log N(z; m₀, P₀), by torch.distributions."""
    base = small_model("diagonal")
    prior = _prior()
    model = toyvae.LinearGaussian(base.weight, base.bias, base.noise_variance, prior=prior)
    x, z = model.sample(7, generator=seeds.generator(3))
    expected = model.likelihood(z).log_prob(x) + prior.log_prob(z)
    # Both are sums of D + K terms each rounded once: 4(D + K)·eps·M.
    assert (model.log_joint(x, z) - expected).abs().max() <= identity_tolerance(model, x, z=z).min()


def test_bad_priors_raise_errors_that_name_them():
    """A prior must be one MultivariateNormal over K latents, without a batch shape."""
    w = torch.ones(3, 2, dtype=F64)
    with pytest.raises(TypeError, match=r"prior must be a torch\.distributions\.Multivariate"):
        toyvae.LinearGaussian(w, prior=torch.distributions.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=r"prior must have event shape \(2,\).*\(3,\)"):
        toyvae.LinearGaussian(
            w,
            prior=torch.distributions.MultivariateNormal(
                torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)
            ),
        )
    batched = torch.distributions.MultivariateNormal(torch.zeros(4, 2, dtype=F64), torch.eye(2))
    with pytest.raises(ValueError, match=r"no batch shape.*batch shape \(4,\)"):
        toyvae.LinearGaussian(w, prior=batched)


# -- immutability -------------------------------------------------------------------------


def test_attributes_cannot_be_reassigned():
    """Setting or deleting an attribute raises: the model is immutable after construction."""
    model = small_model("isotropic")
    with pytest.raises(AttributeError, match="immutable"):
        model.noise_variance = torch.eye(4, dtype=F64)
    with pytest.raises(AttributeError, match="immutable"):
        model.weight = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(AttributeError, match="immutable"):
        del model.bias


def test_in_place_edit_of_full_noise_upper_triangle_is_refused():
    """Editing Ψ's upper triangle in place (which Cholesky never reads) raises, naming Ψ."""
    psi = torch.eye(4, dtype=F64) + 0.3 * torch.ones(4, 4, dtype=F64)
    model = toyvae.LinearGaussian(torch.ones(4, 2, dtype=F64), noise_variance=psi)
    x = torch.zeros(4, dtype=F64)
    model.log_evidence(x)
    psi[0, 3] = 5.0
    with pytest.raises(RuntimeError, match="noise_variance was modified in place"):
        model.log_evidence(x)


def test_optimizer_step_on_a_converted_parameter_is_refused():
    """A float32 noise next to a float64 weight: after an optimizer step the model refuses to run.

    The model holds a float64 copy; gradients reach the float32 leaf, but its updates never
    would reach the copy, so training would silently run on the initial value.
    """
    noise = torch.tensor(2.0, requires_grad=True)
    model = toyvae.LinearGaussian(torch.ones(3, 2, dtype=F64), noise_variance=noise)
    x = torch.ones(3, dtype=F64)
    loss = -model.log_evidence(x)
    loss.backward()
    assert noise.grad is not None and noise.grad.dtype == torch.float32
    torch.optim.SGD([noise], lr=0.1).step()
    with pytest.raises(RuntimeError, match=r"[Bb]uild a new LinearGaussian"):
        model.log_evidence(x)
    # The documented way: a new model per step sees the update.
    fresh = toyvae.LinearGaussian(torch.ones(3, 2, dtype=F64), noise_variance=noise)
    assert fresh.noise_variance.item() == pytest.approx(noise.item())


def test_numpy_parameters_are_copied():
    """Editing the caller's NumPy array after construction does not change the model."""
    w = np.ones((3, 2))
    model = toyvae.LinearGaussian(w)
    w[0, 0] = 7.0
    assert model.weight[0, 0].item() == 1.0


def test_sample_accepts_an_int_shape():
    """sample(5) works as in torch: x (5, D), z (5, K)."""
    x, z = small_model().sample(5, generator=seeds.generator(0))
    assert x.shape == (5, 4) and z.shape == (5, 2)


# -- inputs at the edges of float64 -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_are_refused_with_a_type_error(dtype):
    """float16/bfloat16 weights raise a TypeError naming weight, not a LAPACK error."""
    with pytest.raises(TypeError, match=r"weight must be float32 or float64.*float16|bfloat16"):
        toyvae.LinearGaussian(torch.ones(3, 2, dtype=dtype))


def test_log_joint_with_batches_that_do_not_broadcast_names_them():
    """log_joint(x (4, D), z (5, K)) raises a ValueError quoting both batch shapes."""
    model = small_model()
    with pytest.raises(ValueError, match=r"x \(4,\) and z \(5,\)"):
        model.log_joint(torch.zeros(4, 4, dtype=F64), torch.zeros(5, 2, dtype=F64))


def test_log_evidence_of_an_overflowing_x_is_minus_infinity():
    """x near float64's largest number: log p(x) = −inf (its correct rounding), never NaN.

    The quadratic form is at least ‖μ‖² and ‖r̃‖²-sized, far above 1.8e308, so the exact
    log-density is below −1e300 and rounds to −inf; a row of zeros in the same batch is
    unaffected, and the posterior refuses the row with a ValueError rather than a NaN mean.
    """
    model = small_model("isotropic")
    x = torch.tensor([[1.7e308] * 4, [0.0] * 4], dtype=F64)
    values = model.log_evidence(x)
    assert values[0].item() == -math.inf
    # The same log p(x) of the zero row, batched with another row or alone: equal to rounding
    # (BLAS may sum in another order for another batch shape or memory alignment).
    alone = model.log_evidence(x[1:])
    assert torch.all((values[1:] - alone).abs() <= identity_tolerance(model, x[1:]))
    with pytest.raises(ValueError, match="posterior mean overflows"):
        model.posterior(x)


def test_tiny_noise_and_huge_weights_match_a_700_digit_oracle():
    """Ψ = 1e-300 and W·1e200: log p(x) within the problem's own floor of the exact value
    (mpmath, 700 digits).

    Where torch's dense MultivariateNormal cannot even factor WWᵀ + Ψ (its entries differ by
    600 orders of magnitude), the QR of [Ã; I] keeps every quantity representable; 700 digits
    make the oracle exact for these inputs (60 would lose Ψ next to WWᵀ). Tolerance, as in
    tests/test_hard_regimes.py: 30 times the floor (the largest change of the exact value over
    4 sign patterns that move every input by one rounding), plus 4 ulps for the final sum of a
    few terms. The floor matters: with Ψ = 1e-300 it can be 17 ulps of log p(x) (seed offset 75,
    where toyvae was 5 ulps off and a bare 4-ulp bound failed).
    """
    gen = seeds.generator(3)
    w = torch.randn(4, 2, generator=gen, dtype=F64)
    x = torch.randn(4, generator=gen, dtype=F64)
    signs = np.random.default_rng(0)  # the floor's sign patterns: fixed, not a random draw
    digits = oracle.MP.dps
    oracle.MP.dps = 700
    try:
        for weight, noise in [(w, 1e-300), (w * 1e200, 1.0)]:
            model = toyvae.LinearGaussian(weight, noise_variance=noise)
            value = model.log_evidence(x).item()
            exact = oracle.Model(weight.numpy(), np.zeros(4), noise).log_evidence(x.numpy())
            floor = 0.0
            for _ in range(4):
                moved_weight = oracle.to_mp(weight.numpy() * 1.0)
                moved_x = oracle.to_mp(x.numpy())
                for i in range(4):
                    moved_x[i] *= 1 + EPS * signs.choice([-1.0, 1.0])
                    for j in range(2):
                        moved_weight[i, j] *= 1 + EPS * signs.choice([-1.0, 1.0])
                moved_noise = oracle.MP.mpf(noise) * (1 + EPS * signs.choice([-1.0, 1.0]))
                moved = oracle.Model(moved_weight, oracle.to_mp(np.zeros(4)), moved_noise)
                floor = max(floor, abs(float(moved.log_evidence(moved_x) - exact)))
            exact = float(exact)
            assert abs(value - exact) <= 30 * floor + 4 * EPS * abs(exact), (value, exact, floor)
            assert torch.isfinite(model.posterior(x).loc).all()
    finally:
        oracle.MP.dps = digits


def test_elbo_gradients_are_finite_and_right_for_a_rank_deficient_weight():
    """A square W with a zero row (a constant feature) has finite ELBO gradients equal to the
    gradients of the textbook form E_q log N(x; Wz + b, Ψ) − KL(q ‖ N(0, I)), evaluated densely.

    Both are sums of a few dozen well-scaled terms, so they agree to 1e-12 relative.
    """
    gen = seeds.generator(0)
    w = torch.randn(4, 4, generator=gen, dtype=F64)
    w[1] = 0.0
    w.requires_grad_(True)
    psi = (torch.rand(4, generator=gen, dtype=F64) + 0.5).requires_grad_(True)
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    q = torch.distributions.MultivariateNormal(
        torch.randn(4, generator=gen, dtype=F64), scale_tril=torch.eye(4, dtype=F64) * 0.7
    )
    ours = torch.autograd.grad(
        toyvae.elbo(toyvae.LinearGaussian(w, None, psi), x, q).sum(), [w, psi]
    )
    cov = q.covariance_matrix
    residual = x - q.loc @ w.T
    textbook = -0.5 * (
        4 * math.log(2 * math.pi)
        + psi.log().sum()
        + (residual.square() / psi).sum(-1)
        + ((w.T / psi) @ w * cov).sum()
    ) - 0.5 * (cov.trace() + q.loc.square().sum() - 4 - torch.logdet(cov))
    expected = torch.autograd.grad(textbook.sum(), [w, psi])
    for a, b in zip(ours, expected, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_a_posterior_mean_that_overflows_is_refused_with_the_size_of_x():
    """x finite but so large that the whitened residual (x − b)/σ overflows float64: the error
    names x and its largest entry, instead of returning an infinite posterior mean."""
    model = toyvae.LinearGaussian(torch.ones(2, 1, dtype=F64), noise_variance=1e-20)
    x = torch.full((2,), 1e300, dtype=F64)  # (x − b)/σ = 1e310 > float64's largest, 1.8e308
    message = r"^x is so far from the model's mean that its posterior mean overflows float64: "
    with pytest.raises(ValueError, match=message + r"the largest \|x\| entry is 1e\+300$"):
        model.posterior(x)


def test_reconstruction_gradient_of_a_batch_is_the_sum_of_its_members():
    """∂/∂W of Σ_i E_{q_i} log p(x|z) for a batch of q equals the sum of the members' gradients
    (the value comes from a QR, the derivative from the Gram form: each member's own)."""
    gen = seeds.generator(31)
    weight = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(4, generator=gen, dtype=F64)
    tril = torch.tril(torch.randn(3, 3, 3, generator=gen, dtype=F64), -1) + torch.eye(3)
    q = torch.distributions.MultivariateNormal(
        torch.randn(3, 3, generator=gen, dtype=F64), scale_tril=tril
    )

    def gradient(member):
        model = toyvae.LinearGaussian(weight, noise_variance=0.5)
        return torch.autograd.grad(toyvae.expected_log_likelihood(model, x, member).sum(), weight)[
            0
        ]

    members = [
        torch.distributions.MultivariateNormal(q.loc[i], scale_tril=tril[i]) for i in range(3)
    ]
    total = sum(gradient(m) for m in members)
    # The same sums in another order: rounding of a few eps of the gradient's size.
    assert torch.allclose(gradient(q), total, rtol=0, atol=1e3 * EPS * total.abs().max())
