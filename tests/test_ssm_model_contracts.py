"""LinearGaussianSSM's contracts, each against a dense textbook computation over the flat T·K
latents: sampling, log p(x, z) and its z argument, magnitude, derivatives, argument errors.

The dense oracle builds the prior covariance of z_{1:T} from its recursion (Cov(z_t, z_s) =
A^{t−s} Σ_s, Σ_t = A Σ_{t−1} Aᵀ + Q), inverts it, and adds I_T ⊗ HᵀR⁻¹H: no cyclic reduction
and no Markov structure is used.
"""

from __future__ import annotations

import math
import re

import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.gaussians import Gaussian
from toyvae.state_space import LinearGaussianSSM

F64 = torch.float64
EPS = torch.finfo(F64).eps
LOG_2PI = math.log(2 * math.pi)
K, D, T = 2, 3, 4


def parameters(seed=0):
    """Float64 parameters with every part non-trivial: full Q and P₀, diagonal R, a bias, a mean."""
    gen = seeds.generator(seed)
    a = torch.randn(K, K, generator=gen, dtype=F64)
    b = torch.randn(K, K, generator=gen, dtype=F64)
    return {
        "transition": 0.9 * a / torch.linalg.matrix_norm(a, 2),
        "transition_noise": b @ b.T / K + 0.3 * torch.eye(K, dtype=F64),
        "emission": torch.randn(D, K, generator=gen, dtype=F64),
        "emission_noise": torch.rand(D, generator=gen, dtype=F64) + 0.2,
        "emission_bias": torch.randn(D, generator=gen, dtype=F64),
        "initial_mean": torch.randn(K, generator=gen, dtype=F64),
        "initial_covariance": 2.0 * torch.eye(K, dtype=F64) + 0.5,
    }


def build(p, num_steps=None):
    return LinearGaussianSSM(
        p["transition"],
        p["transition_noise"],
        p["emission"],
        p["emission_noise"],
        emission_bias=p["emission_bias"],
        initial_mean=p["initial_mean"],
        initial_covariance=p["initial_covariance"],
        num_steps=num_steps,
    )


def dense_prior(p, num_steps=T):
    """The prior mean (T·K,) and covariance (T·K, T·K) of z_{1:T}, from the recursion."""
    a, q = p["transition"], p["transition_noise"]
    means, marginals = [p["initial_mean"]], [p["initial_covariance"]]
    for _ in range(1, num_steps):
        means.append(a @ means[-1])
        marginals.append(a @ marginals[-1] @ a.T + q)
    rows = []
    for t in range(num_steps):
        row = []
        for s in range(num_steps):
            if s <= t:
                row.append(torch.linalg.matrix_power(a, t - s) @ marginals[s])
            else:
                row.append((torch.linalg.matrix_power(a, s - t) @ marginals[t]).T)
        rows.append(torch.cat(row, 1))
    return torch.cat(means), torch.cat(rows, 0)


def dense_posterior(p, x):
    """(Λ, μ) of p(z|x) over the flat latents: Λ = Σ⁻¹ + I ⊗ HᵀR⁻¹H, Λμ = Σ⁻¹m + Hᵀ R⁻¹(x − d)."""
    num_steps = x.shape[-2]
    mean, cov = dense_prior(p, num_steps)
    prior_precision = torch.linalg.inv(cov)
    h, r_inv = p["emission"], torch.diag(1 / p["emission_noise"])
    eye = torch.eye(num_steps, dtype=F64)
    precision = prior_precision + torch.kron(eye, h.T @ r_inv @ h)
    rhs = prior_precision @ mean + ((x - p["emission_bias"]) @ r_inv @ h).flatten(-2)
    return precision, torch.linalg.solve(precision, rhs.unsqueeze(-1)).squeeze(-1)


def sequence(p, batch=(3,), seed=1):
    return build(p, T).sample(batch, generator=seeds.generator(seed))[0]


# -- sampling ---------------------------------------------------------------------------------


def test_sample_draws_the_stacked_linear_gaussians_joint():
    """sample() with a generator draws the (x, z) that the same joint written as a flat
    toyvae.LinearGaussian (weight I_T ⊗ H, noise I_T ⊗ R, the Markov prior's Cholesky factor)
    draws from the same seed: state noise first, then observation noise, time-major."""
    p = parameters()
    model = build(p)
    mean, cov = dense_prior(p)
    eye = torch.eye(T, dtype=F64)
    flat = toyvae.LinearGaussian(
        torch.kron(eye, p["emission"]),
        p["emission_bias"].repeat(T),
        p["emission_noise"].repeat(T),
        prior=MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov)),
    )
    x, z = model.sample(2, num_steps=T, generator=seeds.generator(3))
    x_flat, z_flat = flat.sample((2,), generator=seeds.generator(3))
    assert x.shape == (2, T, D) and z.shape == (2, T, K)
    # The same standard normals through two float64 routes (a recursion, a dense factor) of
    # O(1) entries and condition ≲ 10: agreement to 1e3·eps leaves room for both roundings.
    torch.testing.assert_close(z.flatten(-2), z_flat, rtol=0, atol=1e3 * EPS)
    torch.testing.assert_close(x.flatten(-2), x_flat, rtol=0, atol=1e3 * EPS)


def test_sample_arguments():
    """sample() works without a generator; it, with_num_steps and the constructor reject a bad
    generator or length with an error naming it and saying what it should be."""
    model = build(parameters())
    x, z = model.sample(3, num_steps=2)
    assert x.shape == (3, 2, D) and z.shape == (3, 2, K)
    with pytest.raises(TypeError, match=r"^generator must be a torch\.Generator or None, got 5 of"):
        model.sample(2, num_steps=2, generator=5)
    with pytest.raises(ValueError, match=re.escape("sample()'s num_steps of a LinearGaussianSSM")):
        model.sample(2)
    message = "num_steps must be a positive integer (the sequence length T), got 0"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.sample(2, num_steps=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.with_num_steps(0)
    with pytest.raises(ValueError, match=re.escape(message)):
        build(parameters(), 0)
    message = "num_steps must be a positive integer (the sequence length T), got 2.5 of type float"
    with pytest.raises(TypeError, match=re.escape(message)):
        model.with_num_steps(2.5)
    with pytest.raises(TypeError, match=re.escape(message)):
        model.sample(num_steps=2.5)


def test_repr_states_the_bound_length():
    """repr names the sizes and the bound length, "any" for an unbound model."""
    model = build(parameters())
    assert "state_dim=2, data_dim=3, num_steps=any, dtype=torch.float64" in repr(model)
    assert "num_steps=4," in repr(model.with_num_steps(4))


def test_unbound_model_says_how_to_bind_it():
    """prior() of an unbound model raises ValueError naming prior() and both ways to bind it."""
    with pytest.raises(ValueError) as info:
        build(parameters()).prior()
    message = str(info.value)
    for phrase in [
        "prior() of a LinearGaussianSSM depends on the sequence length T, and this model accepts "
        "any length; the ConjugateModel interface (toyvae.elbo, kl_to_posterior, log_weights, …) "
        "needs one",
        "bind it with LinearGaussianSSM(..., num_steps=T) or model.with_num_steps(T)",
        "(log_evidence, posterior, smoothed and exact read T from x and need no binding)",
    ]:
        assert phrase in message


@pytest.mark.parametrize(
    "num_steps, x, error, pattern",
    [
        (None, torch.zeros(4, 2), ValueError, r"^x must be a sequence of shape \(\.\.\., T, 3\)"),
        (None, torch.zeros(4, 2), ValueError, r"got an array of shape \(4, 2\) \(torch.float64\)"),
        (4, torch.zeros(3, 3), ValueError, r"^x must have 4 steps \(shape \(\.\.\., 4, 3\)\)"),
        (4, torch.zeros(3, 3), ValueError, r"got an array of shape \(3, 3\) \(torch.float64\)"),
        (None, torch.full((4, 3), float("nan")), ValueError, r"^x must be finite"),
        (None, "x", TypeError, r"^x must be a torch tensor"),
    ],
)
def test_bad_data_is_named(num_steps, x, error, pattern):
    """An x of the wrong shape or type raises an error naming x, the expected and the given."""
    with pytest.raises(error, match=pattern):
        build(parameters(), num_steps).log_evidence(x)


def test_data_is_converted_to_the_model_dtype():
    """check_data returns a float32 x in the model's float64, and log p(x) of a float32 x (of
    float64-exact values) is the float64 model's answer for its values."""
    p = parameters()
    model = build(p)
    x = sequence(p).float()
    assert model.check_data(x).dtype == F64
    torch.testing.assert_close(
        model.log_evidence(x), model.log_evidence(x.double()), rtol=0, atol=0
    )


PARAMETER_NAMES = (
    "transition_noise",
    "emission",
    "emission_noise",
    "emission_bias",
    "initial_mean",
    "initial_covariance",
)


def test_parameters_take_the_transitions_dtype():
    """Every parameter given in float16 or float32 (float16-exact values) becomes float64 like
    A: the model reports float64 parameters and computes log p(x) as from float64 ones."""
    p = {name: value.half().double() for name, value in parameters().items()}
    x = sequence(p)
    want = build(p).log_evidence(x)
    for dtype in (torch.float16, torch.float32):
        mixed = build(p | {name: p[name].to(dtype) for name in PARAMETER_NAMES})
        for name in PARAMETER_NAMES:
            assert getattr(mixed, name).dtype == F64, name
        assert torch.equal(mixed.log_evidence(x), want)


def test_vector_parameters_of_the_wrong_length_are_named():
    """A bias or initial mean of the wrong length names it, its shape and its symbol."""
    p = parameters()
    with pytest.raises(ValueError, match=re.escape("emission_bias must have shape (3,) (D)")):
        build(p | {"emission_bias": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match=re.escape("initial_mean must have shape (2,) (K)")):
        build(p | {"initial_mean": torch.zeros(3, dtype=F64)})


@pytest.mark.parametrize("name", ["transition", *PARAMETER_NAMES])
def test_a_non_numeric_parameter_is_named(name):
    """A parameter that is not an array or a number raises TypeError naming that parameter."""
    with pytest.raises(TypeError, match=f"^{name} must be a torch tensor"):
        build(parameters() | {name: "abc"})


NAN = float("nan")


@pytest.mark.parametrize(
    "name, value, pattern",
    [
        ("transition", torch.ones(2, dtype=F64), r"^transition must be a \(K, K\) matrix"),
        ("transition", torch.full((2, 2), NAN, dtype=F64), r"^transition must be finite"),
        ("emission", torch.ones(3, dtype=F64), r"^emission must be a \(D, K\) matrix with K = 2"),
        (
            "emission",
            torch.ones(0, 2, dtype=F64),
            r"^emission must be a \(D, K\) matrix with D ≥ 1",
        ),
        ("emission", torch.full((3, 2), NAN, dtype=F64), r"^emission must be finite"),
        ("emission_bias", torch.full((3,), NAN, dtype=F64), r"^emission_bias must be finite"),
        ("initial_mean", torch.full((2,), NAN, dtype=F64), r"^initial_mean must be finite"),
    ],
    ids=["A-1d", "A-nan", "H-1d", "H-no-rows", "H-nan", "d-nan", "m0-nan"],
)
def test_a_bad_parameter_value_is_named(name, value, pattern):
    """A parameter of the wrong shape or with a NaN raises ValueError naming it and the rule."""
    with pytest.raises(ValueError, match=pattern):
        build(parameters() | {name: value})


@pytest.mark.parametrize("name", ["transition", *PARAMETER_NAMES])
def test_an_in_place_edit_of_any_parameter_is_named(name):
    """Editing any parameter tensor in place after construction makes the next call raise a
    RuntimeError that names that parameter."""
    p = {key: value.clone() for key, value in parameters().items()}
    model = build(p)
    x = sequence(parameters())
    p[name].add_(0.0)
    with pytest.raises(RuntimeError, match=f"^{name} was modified in place"):
        model.log_evidence(x)


# -- log p(x, z) and its z argument -------------------------------------------------------------


def dense_log_joint(p, x, z):
    mean, cov = dense_prior(p, x.shape[-2])
    prior = MultivariateNormal(mean, covariance_matrix=cov).log_prob(z)
    decoded = z.unflatten(-1, (x.shape[-2], K)) @ p["emission"].T + p["emission_bias"]
    noise = MultivariateNormal(decoded, covariance_matrix=torch.diag(p["emission_noise"]))
    return prior + noise.log_prob(x).sum(-1)


def test_log_joint_takes_flat_z_of_any_batch_and_dtype():
    """log p(x, z) equals the dense prior and likelihood densities for an unbatched z, a batched
    z and a float32 z (converted to the model's dtype)."""
    p = parameters()
    model = build(p)
    x = sequence(p)
    z = torch.randn(T * K, generator=seeds.generator(4), dtype=F64)
    z32 = z.float()
    # Terms of size ≤ 1e2 with condition ≲ 1e2: 1e4·eps·max(1, |value|) covers both routes.
    for got_z, want_z in ((z, z), (z.expand(3, -1), z), (z32, z32.double())):
        want = dense_log_joint(p, x, want_z)
        torch.testing.assert_close(model.log_joint(x, got_z), want, rtol=1e4 * EPS, atol=0)
    want = dense_log_joint(p, x[0], z)
    torch.testing.assert_close(model.log_joint(x[0], z), want, rtol=1e4 * EPS, atol=0)


@pytest.mark.parametrize(
    "z, error, pattern",
    [
        (torch.tensor(1.0, dtype=F64), ValueError, r"^z must be flat latents .* got 1\.0"),
        (torch.zeros(7, dtype=F64), ValueError, r"got an array of shape \(7,\) \(torch.float64\)"),
        (torch.full((T * K,), float("nan"), dtype=F64), ValueError, r"^z must be finite"),
        ("z", TypeError, r"^z must be a torch tensor"),
    ],
    ids=["scalar", "wrong-size", "nan", "str"],
)
def test_log_joint_rejects_bad_z_by_name(z, error, pattern):
    """A z that is not flat finite latents raises an error naming z and what it got."""
    p = parameters()
    with pytest.raises(error, match=pattern):
        build(p).log_joint(sequence(p), z)


# -- magnitude ------------------------------------------------------------------------------


def dense_magnitude(p, x, q=None, z=None):
    """M by the documented sum, densely: T·D·log 2π, Σ|log eig R| (T times), Σ|log eig P₀|,
    Σ|log eig Q| (T − 1 times), |log det Λ|, twice the whitened distance of x from the prior
    mean path, T·K; with q its quadratics, |terms| of tr(ΛΣ_q) and |log det Σ_q|; with z the
    squared residuals of log p(x, z) and the bound 2(zᵀΛz + that distance) of log p(z|x)."""
    num_steps = x.shape[-2]
    mean, cov = dense_prior(p, num_steps)
    prior_precision = torch.linalg.inv(cov)
    h, r = p["emission"], p["emission_noise"]
    eye = torch.eye(num_steps, dtype=F64)
    big_g = torch.kron(eye, h.T @ torch.diag(1 / r) @ h)
    precision = prior_precision + big_g

    def quadratic(v):
        return (v.square() / r).sum((-2, -1))

    def abs_log_eig(m):
        return torch.linalg.eigvalsh(m).log().abs().sum()

    distance = quadratic(x - p["emission_bias"] - mean.unflatten(-1, (num_steps, K)) @ h.T)
    total = (
        num_steps * D * LOG_2PI
        + num_steps * r.log().abs().sum()
        + abs_log_eig(p["initial_covariance"])
        + (num_steps - 1) * abs_log_eig(p["transition_noise"])
        + torch.linalg.slogdet(precision)[1].abs()
        + 2 * distance
        + num_steps * K
    )
    if q is not None:
        sigma = q.scale_tril @ q.scale_tril.mT
        centred = q.loc - mean
        total = (
            total
            + 2 * quadratic(q.loc.unflatten(-1, (num_steps, K)) @ h.T)
            + torch.einsum("...i,ij,...j->...", centred, prior_precision, centred)
            + (prior_precision.abs() * sigma.abs()).sum((-2, -1))
            + (big_g.abs() * sigma.abs()).sum((-2, -1))
            + torch.logdet(sigma).abs()
        )
    if z is not None:
        centred = z - mean
        misfit = x - p["emission_bias"] - z.unflatten(-1, (num_steps, K)) @ h.T
        total = (
            total
            + torch.einsum("...i,ij,...j->...", centred, prior_precision, centred)
            + quadratic(misfit)
            + 2 * (torch.einsum("...i,ij,...j->...", z, precision, z) + distance)
            + 2 * num_steps * K * LOG_2PI
        )
    return total


def some_q(batch):
    gen = seeds.generator(5)
    n = T * K
    loc = torch.randn(*batch, n, generator=gen, dtype=F64)
    tril = 0.3 * torch.randn(*batch, n, n, generator=gen, dtype=F64).tril(-1)
    diagonal = torch.rand(*batch, n, generator=gen, dtype=F64) + 0.5
    return Gaussian(loc, tril + torch.diag_embed(diagonal))


@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batch"])
@pytest.mark.parametrize("given", ["x", "q", "z"])
def test_magnitude_is_the_documented_sum_of_term_sizes(given, batch):
    """magnitude(x), magnitude(x, q) and magnitude(x, z=z) equal the documented sums of the
    terms' absolute values, computed densely, for one sequence and for a batch."""
    p = parameters()
    model = build(p)
    x = sequence(p, batch=batch)
    q = some_q(batch) if given == "q" else None
    z = some_q(batch).loc if given == "z" else None
    got = model.magnitude(x, q, z=z)
    want = dense_magnitude(p, x, q, z)
    assert got.shape == batch
    # A sum of non-negative terms, each computed in float64 by stable routes with condition
    # ≲ 1e2 (inverses of the O(1) prior and Λ): relative agreement to 1e4·eps.
    torch.testing.assert_close(got, want, rtol=1e4 * EPS, atol=0)


def test_a_float32_model_computes_alike_whatever_the_default_dtype():
    """A float32 model gives the same float32 answers (log p(x), the smoothed moments, the flat
    posterior, magnitude with q and with z) when torch's default dtype is float64."""
    p = {name: value.float() for name, value in parameters().items()}
    model = build(p)
    x = model.sample(num_steps=T, generator=seeds.generator(6))[0]
    q = Gaussian(*(t.float() for t in some_q(())))

    def answers():
        smoothed = model.smoothed(x)
        posterior = model.exact(x).posterior
        return [
            model.log_evidence(x),
            smoothed.mean,
            smoothed.covariance,
            posterior.loc,
            posterior.scale_tril,
            model.magnitude(x, q),
            model.magnitude(x, z=q.loc),
        ]

    before = answers()
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        after = answers()
    finally:
        torch.set_default_dtype(default)
    for got, want in zip(after, before, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


# -- values and derivatives when differentiating ------------------------------------------------


def hard_model_and_data():
    """K = 6 states seen through D = 3 channels with R ~ 1e-12: forming Λ rounds away the
    prior's O(1) part, so the normal-equation route (which supplies derivatives) is off by up
    to 2e-5 relative in log p(x) (tests/test_hard_state_space.py) while the square-root route
    (which supplies values) is not. Fixed numbers: the generator only spares writing them."""
    rng = seeds.rng(0)
    k, d, num_steps = 6, 3, 4
    transition = 0.9 * torch.linalg.qr(torch.from_numpy(rng.standard_normal((k, k))))[0]
    emission = torch.from_numpy(rng.standard_normal((d, k)))
    noise = 1e-12 * torch.from_numpy(rng.uniform(0.5, 2.0, d))
    model = LinearGaussianSSM(transition, 0.5, emission, noise)
    x = model.sample(num_steps=num_steps, generator=seeds.generator(7))[0]
    return model, x


def test_values_do_not_depend_on_whether_a_derivative_is_wanted():
    """With x requiring grad, log p(x), the smoothed moments and the flat posterior keep the
    square-root route's values (the normal-equation route only supplies derivatives), even
    where the two routes disagree in the fifth digit."""
    model, x = hard_model_and_data()
    with torch.no_grad():
        evidence = model.log_evidence(x)
        smoothed = model.smoothed(x)
        posterior = model.posterior(x)
    watched = x.clone().requires_grad_(True)
    got_evidence = model.log_evidence(watched)
    got_smoothed = model.smoothed(watched)
    got_posterior = model.posterior(watched)
    assert got_evidence.requires_grad
    # v' = n + (v − n) with n within a factor 2 of v: v − n is exact (Sterbenz), so v' = v up
    # to one rounding of the sum; 4·eps·|v| allows it.
    for got, want in [
        (got_evidence, evidence),
        (got_smoothed.mean, smoothed.mean),
        (got_smoothed.covariance, smoothed.covariance),
        (got_smoothed.cross_covariance, smoothed.cross_covariance),
        (got_posterior.scale_tril, posterior.scale_tril),
    ]:
        torch.testing.assert_close(
            got.detach(), want, rtol=4 * EPS, atol=4 * EPS * want.abs().max()
        )


def test_values_without_derivatives_never_form_the_precision():
    """With autograd on but nothing requiring grad, log p(x), the smoothed moments and the flat
    posterior come from the square-root route alone: they work for a model whose explicit Λ is
    numerically indefinite (K = 4 states, one channel, R = 1e-20: HᵀR⁻¹H ≈ 1e20 rounds the
    prior's O(1) part to noise of ±1e4, so Λ's Cholesky factorisation fails), with the values
    computed under torch.no_grad."""
    rng = seeds.rng(0)
    transition = 0.9 * torch.linalg.qr(torch.from_numpy(rng.standard_normal((4, 4))))[0]
    model = LinearGaussianSSM(transition, 0.5, torch.from_numpy(rng.standard_normal((1, 4))), 1e-20)
    x = model.sample(num_steps=4, generator=seeds.generator(7))[0]
    with torch.no_grad():
        want = [model.log_evidence(x), *model.smoothed(x), model.posterior(x).scale_tril]
    got = [model.log_evidence(x), *model.smoothed(x), model.posterior(x).scale_tril]
    for g, w in zip(got, want, strict=True):
        assert bool(torch.isfinite(w).all())
        assert torch.equal(g, w)


def test_smoothed_derivatives_match_the_dense_posterior():
    """d E[z|x] / d m₀ and d Cov(z_t|x) / d H from smoothed() equal those of the dense posterior
    (μ = Λ⁻¹(Σ⁻¹m + HᵀR⁻¹(x − d)), Λ⁻¹'s diagonal and lag-one blocks)."""
    p = parameters()
    x = sequence(p, batch=())

    def with_(name, value):
        return build(p | {name: value})

    def mean_by_model(m0):
        return with_("initial_mean", m0).smoothed(x).mean.flatten()

    def mean_by_dense(m0):
        return dense_posterior(p | {"initial_mean": m0}, x)[1]

    def covariances(smoothed):
        return torch.cat([smoothed.covariance.flatten(), smoothed.cross_covariance.flatten()])

    def cov_by_model(h):
        return covariances(with_("emission", h).smoothed(x))

    def cov_by_dense(h):
        inverse = torch.linalg.inv(dense_posterior(p | {"emission": h}, x)[0])
        blocks = inverse.reshape(T, K, T, K)
        marginal = torch.stack([blocks[t, :, t] for t in range(T)])
        lag_one = torch.stack([blocks[t + 1, :, t] for t in range(T - 1)])
        return torch.cat([marginal.flatten(), lag_one.flatten()])

    jacobian = torch.autograd.functional.jacobian
    # Derivatives of O(1) entries of a float64 solve with condition ≲ 1e2, by two routes.
    for by_model, by_dense, at in [
        (mean_by_model, mean_by_dense, p["initial_mean"]),
        (cov_by_model, cov_by_dense, p["emission"]),
    ]:
        torch.testing.assert_close(
            jacobian(by_model, at), jacobian(by_dense, at), rtol=0, atol=1e-12
        )
