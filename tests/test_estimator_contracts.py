"""Contracts of the Monte Carlo estimators and their exact statistics that a user relies on.

- Argument errors: a bad count or generator raises the documented error type with a message
  that names the offending argument and shows the offending value.
- Seeds: a supplied ``torch.Generator`` fixes every draw, whatever the global RNG state, and
  ``iwae_estimate`` is ``iwae_estimates`` with ``num_estimates=1``.
- ``method="plain"`` evaluates the model's own ``log_joint`` (so it exposes a model whose
  ``log_joint`` disagrees with its ``exact()``; that is how the report checks user models),
  while ``"structured"`` uses ``exact()`` only.
- χ²(p(z|x) ‖ q) and the first-order IWAE bias χ²/(2k), per batch element, against a 60-digit
  mpmath evaluation of the textbook Gaussian integral ∫ p(z|x)²/q(z) dz, over a (2, 3) batch
  that mixes every regime of the computation (‖G‖_F² tiny, between 0.05 and 1, large, and
  infinite χ²).
- dtypes: float32 inputs give float32 results even when torch's default dtype is float64.

Every check is deterministic (fixed noise, fixed seeds, exact references); none is stochastic.
"""

from __future__ import annotations

import math

import mp_oracle as mp
import numpy as np
import pytest
import seeds
import torch
from scipy.stats import multivariate_normal
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference
from toyvae.estimators import (
    chi_square_divergence,
    iwae_estimate,
    iwae_estimates,
    iwae_first_order_bias,
    log_weight_cumulants,
    log_weight_moments,
    log_weights,
    log_weights_at,
)
from toyvae.gradients import closed_form_gradient_moments, elbo_surrogate

DT = torch.float64
U64 = torch.finfo(DT).eps / 2  # float64 unit roundoff, 1.1e-16
D, K = 3, 2


def _parameters(seed: int = 11):
    g = seeds.generator(seed)
    weight = torch.randn(D, K, generator=g, dtype=DT)
    bias = torch.randn(D, generator=g, dtype=DT)
    noise = 0.4 + torch.rand(D, generator=g, dtype=DT)
    x = torch.randn(D, generator=g, dtype=DT)
    return weight, bias, noise, x


def _model_and_q(seed: int = 11):
    weight, bias, noise, x = _parameters(seed)
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    shift = torch.tensor([0.3, -0.2], dtype=DT)
    factor = torch.tensor([[1.2, 0.0], [0.3, 0.8]], dtype=DT)
    q = MultivariateNormal(post.loc + shift, scale_tril=post.scale_tril @ factor)
    return model, x, q


# -- argument errors ------------------------------------------------------------------------


def _count_calls():
    model, x, q = _model_and_q()
    return {
        "log_weights num_samples": (lambda n: log_weights(model, x, q, n), "num_samples"),
        "iwae_estimate k": (lambda n: iwae_estimate(model, x, q, n), "k"),
        "iwae_estimates num_estimates": (
            lambda n: iwae_estimates(model, x, q, 3, n),
            "num_estimates",
        ),
        "iwae_first_order_bias k": (lambda n: iwae_first_order_bias(model, x, q, n), "k"),
        "elbo_surrogate num_samples": (lambda n: elbo_surrogate(model, x, q, n), "num_samples"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "log_weights num_samples",
        "iwae_estimate k",
        "iwae_estimates num_estimates",
        "iwae_first_order_bias k",
        "elbo_surrogate num_samples",
    ],
)
def test_a_bad_count_names_the_argument(case):
    call, name = _count_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got 0$"):
        call(0)
    with pytest.raises(TypeError, match=rf"^{name} must be a positive integer, got 2\.5 "):
        call(2.5)


def _generator_calls():
    model, x, q = _model_and_q()
    return {
        "log_weights": lambda gen: log_weights(model, x, q, 4, generator=gen),
        "iwae_estimate": lambda gen: iwae_estimate(model, x, q, 4, generator=gen),
        "iwae_estimates": lambda gen: iwae_estimates(model, x, q, 4, 2, generator=gen),
        "elbo_surrogate": lambda gen: elbo_surrogate(model, x, q, 4, generator=gen),
    }


@pytest.mark.parametrize(
    "case", ["log_weights", "iwae_estimate", "iwae_estimates", "elbo_surrogate"]
)
def test_a_generator_that_is_not_a_torch_generator_is_refused_by_name(case):
    call = _generator_calls()[case]
    with pytest.raises(
        TypeError, match=r"^generator must be a torch\.Generator or None, got 42 of type int$"
    ):
        call(42)


# -- seeds ----------------------------------------------------------------------------------


def _twice_under_different_global_seeds(call):
    """call(generator) twice, each with a fresh generator of seed 5, the global RNG reseeded
    differently before each: equal results mean the draws came from the generator."""
    results = []
    with torch.random.fork_rng():
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            results.append(call(seeds.generator(5)))
    return results


@pytest.mark.parametrize("name", ["iwae_estimate", "iwae_estimates", "elbo_surrogate"])
def test_a_supplied_generator_fixes_every_draw(name):
    model, x, q = _model_and_q()
    call = {
        "iwae_estimate": lambda gen: iwae_estimate(model, x, q, 5, generator=gen),
        "iwae_estimates": lambda gen: iwae_estimates(model, x, q, 5, 3, generator=gen),
        "elbo_surrogate": lambda gen: elbo_surrogate(
            model, x, q, 6, estimator="path_derivative", generator=gen
        ),
    }[name]
    first, second = _twice_under_different_global_seeds(call)
    assert torch.equal(first, second)


@pytest.mark.parametrize("k", [1, 5, 8])
def test_iwae_estimate_is_iwae_estimates_with_one_estimate(k):
    """The same seed gives the same draw through either function ("num_estimates independent
    draws of iwae_estimate"). k = 5 with K = 2 draws 10 normals for one estimate and 20 for
    two, which torch's CPU sampler generates by different routines (below and above 16
    values): drawing more than one estimate and keeping the first would change the value."""
    model, x, q = _model_and_q()
    one = iwae_estimate(model, x, q, k, generator=seeds.generator(9))
    many = iwae_estimates(model, x, q, k, 1, generator=seeds.generator(9))
    assert many.shape == (1,)
    assert one.shape == ()
    assert torch.equal(one, many[0])


# -- method="plain" evaluates the model's own log_joint ---------------------------------------

OFFSET = 0.5


class _InconsistentModel(toyvae.LinearGaussian):
    """A user's model whose log_joint is off by a constant from the density its exact()
    answers describe: what the "plain" path exists to expose."""

    def log_joint(self, x, z):
        return super().log_joint(x, z) + OFFSET


def _inconsistent():
    weight, bias, noise, x = _parameters()
    model = _InconsistentModel(weight, bias, noise)
    _, _, q = _model_and_q()
    return model, x, q, (weight, bias, noise)


# Tolerance for comparing a log weight with a NumPy/SciPy evaluation of the same quantity:
# both are sums of O(10) terms, each at most ~30 in size here, so both roundings together stay
# below 1e3 · U64 · 30 ≈ 3e-12; the offset being tested is 0.5.
LOG_WEIGHT_ATOL = 1e-10


def test_plain_log_weights_at_are_the_models_log_joint_minus_log_q():
    model, x, q, (weight, bias, noise) = _inconsistent()
    noise_draws = torch.randn(7, K, generator=seeds.generator(3), dtype=DT)
    z = (q.loc + noise_draws @ q.scale_tril.mT).numpy()
    want = (
        reference.log_joint(weight.numpy(), bias.numpy(), noise.numpy(), x.numpy(), z)
        + OFFSET
        - multivariate_normal(q.loc.numpy(), q.covariance_matrix.numpy()).logpdf(z)
    )
    plain = log_weights_at(model, x, q, noise_draws, method="plain")
    np.testing.assert_allclose(plain.numpy(), want, rtol=0, atol=LOG_WEIGHT_ATOL)
    # The structured path uses exact() only, so it does not see the offset.
    structured = log_weights_at(model, x, q, noise_draws, method="structured")
    np.testing.assert_allclose(structured.numpy(), want - OFFSET, rtol=0, atol=LOG_WEIGHT_ATOL)


@pytest.mark.parametrize("name", ["log_weights", "iwae_estimate", "iwae_estimates"])
def test_method_plain_reaches_the_models_log_joint(name):
    """Same seed, both methods: "plain" is shifted by the model's offset, "structured" is
    not. For the IWAE estimates log((1/k) Σ e^{ℓᵢ + a}) = a + log((1/k) Σ e^{ℓᵢ}) exactly, so
    the shift carries through; both paths agree to ~1e-12 otherwise (the tolerance above)."""
    model, x, q, _ = _inconsistent()
    call = {
        "log_weights": lambda method: log_weights(
            model, x, q, 6, generator=seeds.generator(4), method=method
        ),
        "iwae_estimate": lambda method: iwae_estimate(
            model, x, q, 6, generator=seeds.generator(4), method=method
        ),
        "iwae_estimates": lambda method: iwae_estimates(
            model, x, q, 6, 3, generator=seeds.generator(4), method=method
        ),
    }[name]
    difference = call("plain") - call("structured")
    np.testing.assert_allclose(difference.numpy(), OFFSET, rtol=0, atol=LOG_WEIGHT_ATOL)


# -- χ² and the first-order IWAE bias against a 60-digit oracle ------------------------------

BATCH = (2, 3)
# q = N(μ + S c, (S F)(S F)ᵀ) per batch element, S the posterior's Cholesky factor: then
# B = S⁻¹L = F and c is the whitened offset, which sets the regime of the computation
# (G = L_M⁻¹(BᵀB − I), M = 2BᵀB − I; the code switches from a series to a Cholesky factor at
# ‖G‖_F² = 0.05).
_CASES = [
    # ‖G‖_F² ≈ 5e-11: the series regime, χ² ≈ 3e-11, where relative accuracy is the point.
    ([[1 + 3e-6, 0.0], [0.0, 1 - 2e-6]], [0.0, 0.0]),
    ([[1 + 3e-6, 0.0], [1e-6, 1 - 2e-6]], [2e-6, -1e-6]),
    # B = √2 I: G = I/√3, ‖G‖_F² = 2/3, between 0.05 and 1 (a 12-term series would be off
    # by ~(1/3)¹³/13 ≈ 5e-8 per eigenvalue there).
    ([[math.sqrt(2), 0.0], [0.0, math.sqrt(2)]], [0.0, 0.0]),
    ([[1.3, 0.0], [0.4, 0.9]], [0.3, -0.2]),
    ([[2.5, 0.0], [-0.7, 1.8]], [1.0, 0.5]),
    # 2·0.6² − 1 < 0: M is indefinite, ∫ p²/q diverges, χ² = inf.
    ([[0.6, 0.0], [0.0, 1.0]], [0.1, 0.0]),
]


def _batched_q():
    weight, bias, noise, _ = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    xs = torch.randn(*BATCH, D, generator=seeds.generator(12), dtype=DT)
    post = model.posterior(xs)
    factors = torch.tensor([f for f, _ in _CASES], dtype=DT).reshape(*BATCH, K, K)
    offsets = torch.tensor([c for _, c in _CASES], dtype=DT).reshape(*BATCH, K)
    scale = post.scale_tril.expand(*BATCH, K, K)
    loc = post.loc + (scale @ offsets.unsqueeze(-1)).squeeze(-1)
    q = MultivariateNormal(loc, scale_tril=scale @ factors)
    return model, xs, q, (weight, bias, noise)


def _oracle_chi_square(oracle, x, loc, tril) -> float:
    """χ² = ∫ p(z|x)²/q(z) dz − 1 at 60 digits, by completing the square (textbook):
    with P = 2Σp⁻¹ − Σq⁻¹ and h = 2Σp⁻¹μ − Σq⁻¹m,
    log ∫ p²/q = −log det Σp + ½ log det Σq − ½ log det P + ½ hᵀP⁻¹h − μᵀΣp⁻¹μ + ½ mᵀΣq⁻¹m,
    finite iff P ≻ 0."""
    ctx = mp.MP
    mean_p, cov_p = oracle.posterior(x)
    mean_q, cov_q = mp.to_mp(loc), mp.covariance_from_tril(tril)
    p_inv, q_inv = ctx.inverse(cov_p), ctx.inverse(cov_q)
    precision = 2 * p_inv - q_inv
    if min(ctx.eigsy(precision)[0]) <= 0:
        return math.inf
    h = 2 * p_inv * mean_p - q_inv * mean_q

    def quad(u, a, v):
        return (u.T * a * v)[0, 0]

    log_second = (
        -ctx.log(ctx.det(cov_p))
        + ctx.log(ctx.det(cov_q)) / 2
        - ctx.log(ctx.det(precision)) / 2
        + quad(h, ctx.inverse(precision), h) / 2
        - quad(mean_p, p_inv, mean_p)
        + quad(mean_q, q_inv, mean_q) / 2
    )
    return float(ctx.expm1(log_second))


def _oracle_batch(oracle_model, xs, q) -> np.ndarray:
    out = np.empty(BATCH)
    for i in range(BATCH[0]):
        for j in range(BATCH[1]):
            out[i, j] = _oracle_chi_square(
                oracle_model, xs[i, j].numpy(), q.loc[i, j].numpy(), q.scale_tril[i, j].numpy()
            )
    return out


# toyvae's error, for these well-conditioned float64 inputs (posterior factor S with condition
# number < 10): q is built from toyvae's own S, and the exact S differs from it by ≲ 10·U64
# relative, so B − I and c carry absolute errors δ ≲ 1e-15. χ² is O(1)-conditioned in them
# where ‖B − I‖ is O(1), and quadratic where it is small (χ² ∝ ‖B − I‖² + ‖c‖²): relative error
# ≈ 2δ / 2e-6 = 1e-9 for the first two elements. Hence a relative tolerance of 1e-8, 10× above
# that bound; it is far below the loss (≈ U64 / χ² ≈ 4e-6 relative) of a χ² of 3e-11 computed
# from an O(1) log-determinant by a Cholesky factor, and below that of a 12-term series at
# ‖G‖_F² ≈ 2/3 (≈ 1.5e-7).
CHI_SQUARE_RTOL = 1e-8


def test_chi_square_divergence_per_batch_element_against_the_60_digit_oracle():
    model, xs, q, (weight, bias, noise) = _batched_q()
    got = chi_square_divergence(model, xs, q)
    assert got.shape == BATCH
    assert got.dtype == DT
    want = _oracle_batch(mp.Model(weight.numpy(), bias.numpy(), noise.numpy()), xs, q)
    finite = np.isfinite(want)
    assert finite.sum() == 5
    assert (got[~torch.from_numpy(finite)] == math.inf).all()
    np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=CHI_SQUARE_RTOL, atol=0)
    assert want[0, 0] < 1e-10  # the first element is in the tiny regime it is meant to test


@pytest.mark.parametrize("k", [1, 4, 37])
def test_iwae_first_order_bias_is_chi_square_over_2k(k):
    model, xs, q, (weight, bias, noise) = _batched_q()
    want = _oracle_batch(mp.Model(weight.numpy(), bias.numpy(), noise.numpy()), xs, q) / (2 * k)
    got = iwae_first_order_bias(model, xs, q, k)
    finite = np.isfinite(want)
    assert (got[~torch.from_numpy(finite)] == math.inf).all()
    np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=CHI_SQUARE_RTOL, atol=0)


# -- dtypes -----------------------------------------------------------------------------------


def _dtype_results(model, x, q, noise):
    """Every exact statistic and log weight of one (model, x, q), flattened into a dict."""
    out = {
        "chi_square": chi_square_divergence(model, x, q),
        "log_weights_at": log_weights_at(model, x, q, noise),
        "log_weight_moments": log_weight_moments(model, x, q),
        "log_weight_cumulants": log_weight_cumulants(model, x, q),
    }
    for estimator in ("reparameterization", "path_derivative"):
        moments = closed_form_gradient_moments(model, x, q, estimator=estimator)
        out[f"closed form {estimator}"] = moments.mean + moments.variance
    flat = {}
    for name, value in out.items():
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            flat[f"{name}[{i}]"] = v
    return flat


def test_float32_inputs_give_float32_results_under_a_float64_default_dtype():
    """A user who sets torch's default dtype to float64 still gets the model's dtype back.

    The values are compared with float64 on the same (float32-representable) numbers: float32's
    unit roundoff is 6e-8, and these K = 2 computations (a few dozen operations, condition
    number < 20, on entries and log weights of size ≲ 30) stay within ~1e-5 relative or
    absolute; 1e-4 leaves a margin.
    """
    _, _, q = _model_and_q()
    weight, bias, noise, x = (t.float() for t in _parameters())
    q32 = MultivariateNormal(q.loc.float(), scale_tril=q.scale_tril.float())
    eps = torch.tensor([[0.5, -1.25], [2.0, 0.375]], dtype=torch.float32)
    model32 = toyvae.LinearGaussian(weight, bias, noise)
    model64 = toyvae.LinearGaussian(weight.double(), bias.double(), noise.double())
    q64 = MultivariateNormal(q32.loc.double(), scale_tril=q32.scale_tril.double())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _dtype_results(model32, x, q32, eps)
    finally:
        torch.set_default_dtype(previous)
    want = _dtype_results(model64, x.double(), q64, eps.double())
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), want[name], rtol=1e-4, atol=1e-4, msg=name)


# -- batch shapes -------------------------------------------------------------------------------


def test_a_batch_of_q_with_one_x_sets_the_batch_shape():
    """x of shape (D,) and q of batch (3,), each q its own scale: every result has the batch
    (3,), and each element's exact statistics are those of its own q alone (to rounding:
    the same operations on the same numbers, 1e-12 relative)."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    scales = torch.tensor([0.8, 1.0, 1.6], dtype=DT).reshape(3, 1, 1)
    loc = post.loc + torch.tensor([[0.3, -0.2], [0.0, 0.0], [-0.4, 0.5]], dtype=DT)
    tril = scales * post.scale_tril
    q = MultivariateNormal(loc, scale_tril=tril)
    assert log_weights(model, x, q, 5, generator=seeds.generator(2)).shape == (5, 3)
    assert iwae_estimates(model, x, q, 4, 2, generator=seeds.generator(2)).shape == (2, 3)
    assert iwae_estimate(model, x, q, 4, generator=seeds.generator(2)).shape == (3,)
    batched = (*log_weight_cumulants(model, x, q), *log_weight_moments(model, x, q))
    batched = (*batched, chi_square_divergence(model, x, q))
    for value in batched:
        assert value.shape == (3,)
    for b in range(3):
        one = MultivariateNormal(loc[b], scale_tril=tril[b])
        alone = (*log_weight_cumulants(model, x, one), *log_weight_moments(model, x, one))
        alone = (*alone, chi_square_divergence(model, x, one))
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[b], want, rtol=1e-12, atol=0)


def test_a_batch_of_x_with_one_q_sets_the_batch_shape():
    """x of batch (3,) and one q: every result has the batch (3,), and each element's exact
    statistics are those of its own x alone (same operations, 1e-12 relative); κ₂ and κ₄
    are broadcast to the batch even though, for one q, only the offset c varies with x."""
    weight, bias, noise, _ = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    xs = torch.randn(3, D, generator=seeds.generator(13), dtype=DT)
    post = model.posterior(xs)
    q = MultivariateNormal(post.loc.mean(0), scale_tril=1.3 * post.scale_tril[0])
    assert q.batch_shape == ()
    assert log_weights(model, xs, q, 5, generator=seeds.generator(2)).shape == (5, 3)
    assert iwae_estimates(model, xs, q, 4, 2, generator=seeds.generator(2)).shape == (2, 3)
    batched = (*log_weight_cumulants(model, xs, q), *log_weight_moments(model, xs, q))
    batched = (*batched, chi_square_divergence(model, xs, q))
    for value in batched:
        assert value.shape == (3,)
    for b in range(3):
        alone = (*log_weight_cumulants(model, xs[b], q), *log_weight_moments(model, xs[b], q))
        alone = (*alone, chi_square_divergence(model, xs[b], q))
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[b], want, rtol=1e-12, atol=0)
