r"""toyvae.reference, the dense oracle: checked by independent routes, then compared with toyvae.

Error model for every comparison below. Each route is a chain of backward-stable steps
(a factorisation or inverse of a D×D or K×K matrix, sums and inner products); to first order
their relative errors γ_n ≈ n·eps add up to at most m·eps, with m the summed lengths of those
sums: m = 6D + 7K + K² + 6 for the model quantities and m = K² + 5K + 5 for a KL between given
Gaussians (counted in test_high_precision.py; the reference's dense routes count no more).
Conditioning amplifies that by κ, and the error is measured against the *scale*: the sum of
the magnitudes of the terms the quantity is built from. The reference inverts Ψ and
Λ = I + WᵀΨ⁻¹W explicitly and applies Ψ⁻¹ on both sides of W; with κ(C), κ(Λ) ≤
κ(Ψ)(1 + ‖Ã‖²) (Ã = L_Ψ⁻¹W, C = WWᵀ + Ψ) its amplification is at most

    κ_ref = κ(Ψ)² (1 + ‖Ã‖²),

which also bounds toyvae's κ(Ψ)κ(Λ). Two routes with independent errors then differ by at most

    2 · m · κ_ref · eps · scale.

The models are deliberately well conditioned (κ_ref ≤ 1.6e3), so the bound stays meaningful;
accuracy on ill-conditioned models is measured against mpmath in test_high_precision.py.
"""

from __future__ import annotations

import ast
import inspect
import math
from typing import NamedTuple

import numpy as np
import pytest
import seeds
import torch
from scipy.linalg import solve_triangular
from scipy.stats import multivariate_normal

# The error-growth factors m and their derivation live with the high-precision tests.
from test_high_precision import EPS, LOG_2PI, kl_growth, model_growth
from torch.distributions import Independent, MultivariateNormal, Normal

import toyvae
from toyvae import LinearGaussian
from toyvae import reference as ref

NUM_POINTS = 4


# -- fixed models ---------------------------------------------------------------------------


class Case(NamedTuple):
    """A fixed model with data points, latent points and Gaussians q and p per point."""

    name: str
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (D,)
    noise: float | np.ndarray  # σ², (D,) variances or a (D, D) covariance
    x: np.ndarray  # (N, D)
    z: np.ndarray  # (N, K)
    q_loc: np.ndarray  # (N, K)
    q_tril: np.ndarray  # (N, K, K), lower triangular, positive diagonal
    p_loc: np.ndarray  # (N, K)
    p_tril: np.ndarray  # (N, K, K)

    @property
    def dims(self) -> tuple[int, int]:
        return self.weight.shape

    def dense_noise(self) -> np.ndarray:
        d = self.dims[0]
        noise = np.asarray(self.noise)
        return (
            noise * np.eye(d) if noise.ndim == 0 else np.diag(noise) if noise.ndim == 1 else noise
        )


def _trils(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    tril = np.tril(0.3 * rng.standard_normal((n, k, k)), -1)
    return tril + rng.uniform(0.3, 1.5, (n, k))[:, :, None] * np.eye(k)


def _case(seed: int, kind: str, d: int, k: int) -> Case:
    rng = seeds.rng(seed)
    weight = rng.standard_normal((d, k))
    if kind == "isotropic":
        noise = float(rng.uniform(0.3, 2.0))
    elif kind == "diagonal":
        noise = rng.uniform(0.2, 2.0, d)
    else:
        factor = rng.standard_normal((d, d))
        noise = factor @ factor.T / d + 0.3 * np.eye(d)
        noise = (noise + noise.T) / 2  # exactly symmetric: IEEE addition commutes
    case = Case(
        name=f"{kind}-D{d}-K{k}",
        weight=weight,
        bias=rng.standard_normal(d),
        noise=noise,
        x=np.empty((NUM_POINTS, d)),
        z=rng.standard_normal((NUM_POINTS, k)),
        q_loc=rng.standard_normal((NUM_POINTS, k)),
        q_tril=_trils(rng, NUM_POINTS, k),
        p_loc=rng.standard_normal((NUM_POINTS, k)),
        p_tril=_trils(rng, NUM_POINTS, k),
    )
    latent = rng.standard_normal((NUM_POINTS, k))
    noise_draw = rng.standard_normal((NUM_POINTS, d)) @ np.linalg.cholesky(case.dense_noise()).T
    return case._replace(x=latent @ weight.T + case.bias + noise_draw)  # draws from the model


CASES = [
    _case(seed, kind, d, k)
    for seed, (kind, d, k) in enumerate(
        [(kind, d, k) for kind in ("isotropic", "diagonal", "full") for d, k in ((5, 2), (7, 3))]
    )
]
IDS = [case.name for case in CASES]


def _q_kinds(case: Case):
    """Both kinds of q, as (torch distribution, reference covariance (N, K, K))."""
    loc, tril = torch.from_numpy(case.q_loc), torch.from_numpy(case.q_tril)
    scale = tril.diagonal(dim1=-2, dim2=-1)
    mvn_cov = case.q_tril @ np.swapaxes(case.q_tril, -1, -2)
    diag_cov = np.apply_along_axis(np.diag, -1, scale.numpy() ** 2)
    return {
        "MultivariateNormal": (MultivariateNormal(loc, scale_tril=tril), mvn_cov),
        "Independent(Normal)": (Independent(Normal(loc, scale), 1), diag_cov),
    }


# -- error scales ---------------------------------------------------------------------------


class Geometry(NamedTuple):
    """Float64 magnitudes of a model, for scales and condition numbers (orders only matter)."""

    noise_tril: np.ndarray
    bias: np.ndarray
    norm_a2: float  # ‖Ã‖²
    log_det_psi: float
    log_det_precision: float
    kappa_ref: float  # κ(Ψ)² (1 + ‖Ã‖²)
    m: int  # model_growth(D, K)

    def residual2(self, x: np.ndarray) -> float:
        """‖r̃‖² = (x − b)ᵀ Ψ⁻¹ (x − b)."""
        white = solve_triangular(self.noise_tril, x - self.bias, lower=True)
        return float(white @ white)


def _cond(matrix: np.ndarray) -> float:
    eigenvalues = np.linalg.eigvalsh(matrix)
    return float(eigenvalues.max() / eigenvalues.min())


def _log_det(matrix: np.ndarray) -> float:
    return float(np.linalg.slogdet(matrix)[1])


def _geometry(case: Case) -> Geometry:
    d, k = case.dims
    psi = case.dense_noise()
    noise_tril = np.linalg.cholesky(psi)
    whitened = solve_triangular(noise_tril, case.weight, lower=True)
    norm_a2 = float(np.linalg.norm(whitened, 2) ** 2)
    return Geometry(
        noise_tril=noise_tril,
        bias=case.bias,
        norm_a2=norm_a2,
        log_det_psi=_log_det(psi),
        log_det_precision=_log_det(np.eye(k) + whitened.T @ whitened),
        kappa_ref=_cond(psi) ** 2 * (1 + norm_a2),
        m=model_growth(d, k),
    )


def _model_scale(case: Case, g: Geometry, i: int, mean=None, cov=None) -> float:
    """Magnitude of every term of the model's log-densities and KLs at point i, for q = N(m, S).

    Covers log p(x), log p(x, z) (m = z, S = 0), E_q log p(x|z), KL(q ‖ p(z)) and
    KL(q ‖ p(z|x)): constants (D + K)(1 + log 2π), the log-determinants, and the quadratic
    forms bounded through ‖Ã‖ and ‖Λ‖ = 1 + ‖Ã‖² by ‖r̃‖², ‖m‖², tr S and ‖μ − m‖²; the
    cross term 2‖μ − m‖‖Ã‖‖r̃‖ is the sensitivity of KL(q ‖ p(z|x)) to the posterior mean μ.
    """
    d, k = case.dims
    mean = np.zeros(k) if mean is None else mean
    residual2 = g.residual2(case.x[i])
    post_mean = ref.posterior(case.weight, case.bias, case.noise, case.x[i])[0]
    gap = float(np.linalg.norm(post_mean - mean))
    quadratic = residual2 + mean @ mean + gap**2 + 2 * gap * math.sqrt(g.norm_a2 * residual2)
    if cov is not None:
        quadratic += np.trace(cov)
    log_det_cov = 0.0 if cov is None else abs(_log_det(cov))
    return float(
        (d + k) * (1 + LOG_2PI)
        + abs(g.log_det_psi)
        + abs(g.log_det_precision)
        + 2 * (1 + g.norm_a2) * quadratic
        + log_det_cov
        + 2 * (d + k)
    )


def _kl_scale(mean_q, cov_q, mean_p, cov_p) -> float:
    """Magnitude of the terms of KL(q ‖ p): ‖Σp⁻¹‖ (tr Σq + ‖μp − μq‖²), K, the log-dets."""
    k = len(mean_q)
    gap2 = float((mean_p - mean_q) @ (mean_p - mean_q))
    p_inv_norm = 1 / np.linalg.eigvalsh(cov_p).min()
    return float(
        p_inv_norm * (np.trace(cov_q) + gap2) + abs(_log_det(cov_p)) + abs(_log_det(cov_q)) + 2 * k
    )


def _cubature(mean: np.ndarray, tril: np.ndarray) -> np.ndarray:
    """The 2K points μ ± √K L eᵢ, weights 1/(2K): exact for polynomials of degree ≤ 3 under
    N(μ, L Lᵀ), since they reproduce the mean and the covariance and are symmetric."""
    k = len(mean)
    offsets = math.sqrt(k) * tril.T  # row i is √K (L eᵢ)ᵀ
    return np.concatenate([mean + offsets, mean - offsets])


def _gaussian_terms(point: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Magnitude of the terms of log N(point; mean, cov), plus ‖point‖‖∇‖ (the error from
    rounding the point itself: moving it by eps‖point‖ moves the log-density by ‖∇‖ times that)."""
    k = len(mean)
    gradient = np.linalg.solve(cov, point - mean)
    mahalanobis = float((point - mean) @ gradient)
    return (
        k * (1 + LOG_2PI)
        + abs(_log_det(cov))
        + mahalanobis
        + float(np.linalg.norm(point) * np.linalg.norm(gradient))
    )


# -- the reference, checked by independent routes -------------------------------------------


def test_reference_module_does_not_import_torch():
    """toyvae/reference.py imports only NumPy, SciPy and math: it shares no torch code."""
    tree = ast.parse(inspect.getsource(ref))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"__future__", "math", "numpy", "scipy"}, imported


def test_noise_covariance_forms_the_dense_matrix():
    """A scalar gives σ²I, a vector gives diag(v) and a matrix is returned as it is."""
    v = np.array([0.5, 2.0, 1.5])
    full = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 3.0]])
    # Exact: building these matrices involves no rounding (σ²·1 and σ²·0 are exact).
    np.testing.assert_array_equal(ref.noise_covariance(0.75, 3), 0.75 * np.eye(3))
    np.testing.assert_array_equal(ref.noise_covariance(v, 3), np.diag(v))
    np.testing.assert_array_equal(ref.noise_covariance(full, 3), full)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_evidence_matches_hand_written_density(case):
    """scipy's logpdf equals −½[D log 2π + log det C + rᵀC⁻¹r] computed by slogdet and solve."""
    d, k = case.dims
    cov = ref.marginal_covariance(case.weight, case.noise)
    residual = case.x - case.bias
    quadratic = np.einsum("nd,nd->n", residual, np.linalg.solve(cov, residual.T).T)
    by_hand = -0.5 * (d * LOG_2PI + _log_det(cov) + quadratic)
    actual = ref.log_evidence(case.weight, case.bias, case.noise, case.x)
    # Both routes factor C (eigh, LU): 2·m·κ(C)·eps·scale with the scale the terms
    # D(1 + log 2π), |log det C| and the quadratic form (error ∝ κ(C) for backward-stable solves).
    scale = d * (1 + LOG_2PI) + abs(_log_det(cov)) + quadratic
    np.testing.assert_array_less(
        np.abs(actual - by_hand), 2 * model_growth(d, k) * _cond(cov) * EPS * scale
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_posterior_equals_gaussian_conditioning_of_the_joint(case):
    """Σ = (I + WᵀΨ⁻¹W)⁻¹ = I − WᵀC⁻¹W and μ = ΣWᵀΨ⁻¹(x − b) = WᵀC⁻¹(x − b)."""
    g = _geometry(case)
    _, k = case.dims
    means, cov = ref.posterior(case.weight, case.bias, case.noise, case.x)
    marginal = ref.marginal_covariance(case.weight, case.noise)
    gain = np.linalg.solve(marginal, case.weight).T  # WᵀC⁻¹, (K, D)
    # Σ = I − WᵀC⁻¹W subtracts from I a matrix of norm < 1: the terms are of size 1.
    tolerance = 2 * g.m * g.kappa_ref * EPS * 1.0
    np.testing.assert_array_less(np.abs(cov - (np.eye(k) - gain @ case.weight)), tolerance)
    for i in range(NUM_POINTS):
        conditioned = gain @ (case.x[i] - case.bias)
        # μ's terms are of size ‖Ã‖‖r̃‖ (‖WᵀC⁻¹r‖ ≤ ‖Ã‖‖r̃‖ and ‖ΣÃᵀr̃‖ ≤ ‖Ã‖‖r̃‖).
        scale = math.sqrt(g.norm_a2 * g.residual2(case.x[i]))
        tolerance = 2 * g.m * g.kappa_ref * EPS * scale
        np.testing.assert_array_less(np.abs(means[i] - conditioned), tolerance)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_joint_is_evidence_times_posterior(case):
    """Bayes' rule: log p(x, z) = log p(x) + log N(z; μ(x), Σ), with scipy's posterior density."""
    g = _geometry(case)
    means, cov = ref.posterior(case.weight, case.bias, case.noise, case.x)
    joint = ref.log_joint(case.weight, case.bias, case.noise, case.x, case.z)
    evidence = ref.log_evidence(case.weight, case.bias, case.noise, case.x)
    for i in range(NUM_POINTS):
        posterior_density = multivariate_normal(means[i], cov).logpdf(case.z[i])
        # Scale: every term of log p(x, z), log p(x) and log p(z|x) (m = z in _model_scale).
        tolerance = 2 * g.m * g.kappa_ref * EPS * _model_scale(case, g, i, case.z[i])
        assert abs(joint[i] - (evidence[i] + posterior_density)) <= tolerance


@pytest.mark.parametrize(
    ("mean_q", "var_q", "mean_p", "var_p"),
    [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 3.0, 1.5, 0.25), (-0.7, 0.01, 0.4, 9.0)],
)
def test_gaussian_kl_one_dimensional_closed_form(mean_q, var_q, mean_p, var_p):
    """In one dimension KL = ½ log(σp²/σq²) + (σq² + (μq − μp)²)/(2σp²) − ½."""
    closed = 0.5 * math.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / (2 * var_p) - 0.5
    actual = ref.gaussian_kl([mean_q], [[var_q]], [mean_p], [[var_p]])
    # K = 1: m = kl_growth(1) per route, κ = 1; scale the magnitudes of the terms.
    scale = (
        abs(math.log(var_p)) + abs(math.log(var_q)) + (var_q + (mean_q - mean_p) ** 2) / var_p + 1
    )
    assert abs(actual - closed) <= 2 * kl_growth(1) * EPS * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gaussian_kl_is_expected_log_ratio_by_exact_cubature(case):
    """KL(q‖p) = E_q[log q − log p], the expectation of a quadratic taken exactly by cubature."""
    _, k = case.dims
    for i in range(NUM_POINTS):
        mean_q, tril_q = case.q_loc[i], case.q_tril[i]
        cov_q = tril_q @ tril_q.T
        mean_p, cov_p = case.p_loc[i], case.p_tril[i] @ case.p_tril[i].T
        points = _cubature(mean_q, tril_q)
        log_ratio = multivariate_normal(mean_q, cov_q).logpdf(points) - multivariate_normal(
            mean_p, cov_p
        ).logpdf(points)
        actual = ref.gaussian_kl(mean_q, cov_q, mean_p, cov_p)
        # Each cubature term is a pair of scipy log-densities, with error ≤ m κ eps (terms);
        # the average of the 2K terms is bounded by the largest (m = kl_growth(K), κ the larger of
        # κ(Σq), κ(Σp)), and the closed form by _kl_scale.
        terms = max(
            _gaussian_terms(z, mean_q, cov_q) + _gaussian_terms(z, mean_p, cov_p) for z in points
        )
        scale = terms + _kl_scale(mean_q, cov_q, mean_p, cov_p)
        kappa = max(_cond(cov_q), _cond(cov_p))
        assert abs(actual - log_ratio.mean()) <= 2 * kl_growth(k) * kappa * EPS * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expected_log_likelihood_by_exact_cubature(case):
    """E_q log N(x; Wz + b, Ψ) equals its exact cubature over q (the integrand is quadratic)."""
    g = _geometry(case)
    psi = case.dense_noise()
    for i in range(NUM_POINTS):
        mean_q, tril_q = case.q_loc[i], case.q_tril[i]
        points = _cubature(mean_q, tril_q)
        x = case.x[i]
        values = [multivariate_normal(case.weight @ z + case.bias, psi).logpdf(x) for z in points]
        actual = ref.expected_log_likelihood(
            case.weight, case.bias, case.noise, x, mean_q, tril_q @ tril_q.T
        )
        # Each term log N(x; Wz + b, Ψ) has the terms of log N(x − Wz − b; 0, Ψ); the rounding of
        # z moves Wz by eps‖W‖‖z‖, which is included as ‖W‖‖z‖‖Ψ⁻¹(x − Wz − b)‖.
        norm_w = np.linalg.norm(case.weight, 2)
        terms = max(
            _gaussian_terms(x - case.weight @ z - case.bias, np.zeros_like(x), psi)
            + norm_w
            * np.linalg.norm(z)
            * np.linalg.norm(np.linalg.solve(psi, x - case.weight @ z - case.bias))
            for z in points
        )
        scale = terms + _model_scale(case, g, i, mean_q, tril_q @ tril_q.T)
        assert abs(actual - np.mean(values)) <= 2 * g.m * g.kappa_ref * EPS * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_entropy_matches_scipy(case):
    """entropy(Σ) = ½K(1 + log 2π) + ½ log det Σ agrees with scipy's multivariate_normal entropy."""
    _, k = case.dims
    for tril in case.q_tril:
        cov = tril @ tril.T
        expected = multivariate_normal(np.zeros(k), cov).entropy()
        # Two log-determinants of the same matrix (slogdet, eigh): m = kl_growth(K), κ(Σ).
        scale = k * (1 + LOG_2PI) + abs(_log_det(cov)) + k
        assert abs(ref.entropy(cov) - expected) <= 2 * kl_growth(k) * _cond(cov) * EPS * scale


def test_entropy_one_dimensional_closed_form():
    """In one dimension H = ½ log(2πe σ²)."""
    for variance in (0.01, 1.0, 7.5):
        expected = 0.5 * math.log(2 * math.pi * math.e * variance)
        # A few rounded operations on terms of size ≤ 1 + log 2π + |log σ²|: m = kl_growth(1).
        scale = 1 + LOG_2PI + abs(math.log(variance))
        assert abs(ref.entropy([[variance]]) - expected) <= 2 * kl_growth(1) * EPS * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_evidence_is_elbo_plus_kl(case):
    """In the reference, log p(x) = ELBO(q) + KL(q ‖ p(z|x)), and = ELBO at the posterior."""
    g = _geometry(case)
    args = (case.weight, case.bias, case.noise, case.x)
    evidence = ref.log_evidence(*args)
    post_means, post_cov = ref.posterior(*args)
    cov_q = case.q_tril @ np.swapaxes(case.q_tril, -1, -2)
    elbo = ref.elbo(*args, case.q_loc, cov_q)
    kl = ref.gaussian_kl(case.q_loc, cov_q, post_means, post_cov)
    at_posterior = ref.elbo(*args, post_means, post_cov)
    for i in range(NUM_POINTS):
        # Three routes (log p, ELBO, KL), each within m κ_ref eps of the terms: factor 3.
        scale = _model_scale(case, g, i, case.q_loc[i], cov_q[i])
        assert abs(evidence[i] - (elbo[i] + kl[i])) <= 3 * g.m * g.kappa_ref * EPS * scale
        scale = _model_scale(case, g, i, post_means[i], post_cov)
        assert abs(evidence[i] - at_posterior[i]) <= 2 * g.m * g.kappa_ref * EPS * scale


def test_shapes_single_point_and_batches():
    """A single point gives a float; a batch of one keeps its axis (scipy would squeeze it)."""
    case = CASES[0]
    args = (case.weight, case.bias, case.noise)
    assert isinstance(ref.log_evidence(*args, case.x[0]), float)
    assert ref.log_evidence(*args, case.x[:1]).shape == (1,)
    assert ref.log_evidence(*args, case.x).shape == (NUM_POINTS,)
    assert ref.log_joint(*args, case.x, case.z[0]).shape == (NUM_POINTS,)
    means, cov = ref.posterior(*args, case.x[0])
    assert means.shape == (2,) and cov.shape == (2, 2)
    cov_q = case.q_tril @ np.swapaxes(case.q_tril, -1, -2)
    assert ref.gaussian_kl(case.q_loc, cov_q, case.p_loc[0], cov_q[0]).shape == (NUM_POINTS,)
    assert isinstance(ref.kl_to_prior(case.q_loc[0], cov_q[0]), float)
    assert ref.elbo(*args, case.x, case.q_loc[0], cov_q[0]).shape == (NUM_POINTS,)
    assert ref.entropy(cov_q).shape == (NUM_POINTS,)


def test_batched_kl_equals_one_at_a_time():
    """Batching gaussian_kl over a leading axis gives exactly the per-row values."""
    case = CASES[1]
    cov_q = case.q_tril @ np.swapaxes(case.q_tril, -1, -2)
    cov_p = case.p_tril @ np.swapaxes(case.p_tril, -1, -2)
    batched = ref.gaussian_kl(case.q_loc, cov_q, case.p_loc, cov_p)
    single = [ref.gaussian_kl(case.q_loc[i], cov_q[i], case.p_loc[i], cov_p[i]) for i in range(4)]
    # Exact: the batched path runs the very same per-row arithmetic.
    np.testing.assert_array_equal(batched, single)


_W = np.ones((3, 2))
_BAD_INPUTS = [
    (lambda: ref.noise_covariance(np.ones(4), 3), ValueError, "noise_variance"),
    (lambda: ref.marginal_covariance(np.ones(3), 1.0), ValueError, "weight"),
    (lambda: ref.log_evidence("W", None, 1.0, np.ones(3)), TypeError, "weight"),
    (lambda: ref.log_evidence(_W, np.ones(2), 1.0, np.ones(3)), ValueError, "bias"),
    (lambda: ref.log_evidence(_W, None, 1.0, np.ones(4)), ValueError, "x"),
    (lambda: ref.posterior(_W, None, 1.0, [np.nan, 0.0, 0.0]), ValueError, "x"),
    (lambda: ref.log_joint(_W, None, 1.0, np.ones(3), np.ones(3)), ValueError, "z"),
    (lambda: ref.gaussian_kl(0.0, 1.0, 0.0, 1.0), ValueError, "mean_q"),
    (lambda: ref.gaussian_kl(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2)), ValueError, "cov_p"),
    (lambda: ref.kl_to_prior(np.zeros(2), np.eye(3)), ValueError, "cov_q"),
    (lambda: ref.entropy(np.ones(2)), ValueError, "cov"),
]


@pytest.mark.parametrize(("call", "error", "name"), _BAD_INPUTS)
def test_bad_input_names_the_argument(call, error, name):
    """Bad input raises ValueError or TypeError whose message starts with the argument's name."""
    with pytest.raises(error, match=f"^{name} must"):
        call()


# -- toyvae against the reference -----------------------------------------------------------


def _model(case: Case) -> LinearGaussian:
    return LinearGaussian(case.weight, case.bias, case.noise)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_evidence_matches_reference(case):
    """LinearGaussian.log_evidence equals scipy's log N(x; b, WWᵀ + Ψ) on a batch."""
    g = _geometry(case)
    actual = _model(case).log_evidence(torch.from_numpy(case.x)).numpy()
    expected = ref.log_evidence(case.weight, case.bias, case.noise, case.x)
    for i in range(NUM_POINTS):
        # 2 m κ_ref eps scale (module docstring), scale from _model_scale.
        assert abs(actual[i] - expected[i]) <= 2 * g.m * g.kappa_ref * EPS * _model_scale(
            case, g, i
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_posterior_matches_reference(case):
    """LinearGaussian.posterior has the reference's mean and covariance at every batch point."""
    g = _geometry(case)
    posterior = _model(case).posterior(torch.from_numpy(case.x))
    means, cov = ref.posterior(case.weight, case.bias, case.noise, case.x)
    # ‖Σ‖ ≤ 1 since Λ ⪰ I: the covariance's terms are of size 1.
    tolerance = 2 * g.m * g.kappa_ref * EPS
    np.testing.assert_array_less(np.abs(posterior.covariance_matrix.numpy() - cov), tolerance)
    for i in range(NUM_POINTS):
        # The mean's terms are of size ‖Ã‖‖r̃‖ (‖Λ⁻¹‖ ≤ 1).
        scale = math.sqrt(g.norm_a2 * g.residual2(case.x[i]))
        tolerance = 2 * g.m * g.kappa_ref * EPS * scale
        np.testing.assert_array_less(np.abs(posterior.loc[i].numpy() - means[i]), tolerance)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_joint_matches_reference(case):
    """LinearGaussian.log_joint equals the sum of scipy's log N(x; Wz + b, Ψ) and log N(z; 0, I)."""
    g = _geometry(case)
    actual = _model(case).log_joint(torch.from_numpy(case.x), torch.from_numpy(case.z)).numpy()
    expected = ref.log_joint(case.weight, case.bias, case.noise, case.x, case.z)
    for i in range(NUM_POINTS):
        tolerance = 2 * g.m * g.kappa_ref * EPS * _model_scale(case, g, i, case.z[i])
        assert abs(actual[i] - expected[i]) <= tolerance


_FUNCTIONS = {
    "elbo": (toyvae.elbo, ref.elbo),
    "expected_log_likelihood": (toyvae.expected_log_likelihood, ref.expected_log_likelihood),
}


@pytest.mark.parametrize("function", list(_FUNCTIONS))
@pytest.mark.parametrize("q_kind", ["MultivariateNormal", "Independent(Normal)"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_elbo_terms_match_reference(case, q_kind, function):
    """toyvae's elbo and expected_log_likelihood equal the reference's for both kinds of q."""
    g = _geometry(case)
    q, cov_q = _q_kinds(case)[q_kind]
    ours, theirs = _FUNCTIONS[function]
    actual = ours(_model(case), torch.from_numpy(case.x), q).numpy()
    expected = theirs(case.weight, case.bias, case.noise, case.x, case.q_loc, cov_q)
    for i in range(NUM_POINTS):
        scale = _model_scale(case, g, i, case.q_loc[i], cov_q[i])
        assert abs(actual[i] - expected[i]) <= 2 * g.m * g.kappa_ref * EPS * scale


@pytest.mark.parametrize("q_kind", ["MultivariateNormal", "Independent(Normal)"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kl_to_prior_and_entropy_match_reference(case, q_kind):
    """toyvae's kl_to_prior and entropy equal the reference's for both kinds of q."""
    _, k = case.dims
    q, cov_q = _q_kinds(case)[q_kind]
    kl = toyvae.kl_to_prior(q).numpy()
    entropy = toyvae.entropy(q).numpy()
    for i in range(NUM_POINTS):
        # KL to N(0, I): κ(Σp) = 1 for the reference's explicit inverse of I; κ(Σq) for its
        # slogdet of Σq; m = kl_growth(K).
        kappa = _cond(cov_q[i])
        scale = _kl_scale(case.q_loc[i], cov_q[i], np.zeros(k), np.eye(k))
        expected = ref.kl_to_prior(case.q_loc[i], cov_q[i])
        assert abs(kl[i] - expected) <= 2 * kl_growth(k) * kappa * EPS * scale
        scale = k * (1 + LOG_2PI) + abs(_log_det(cov_q[i])) + k
        expected = ref.entropy(cov_q[i])
        assert abs(entropy[i] - expected) <= 2 * kl_growth(k) * kappa * EPS * scale


@pytest.mark.parametrize("q_kind", ["MultivariateNormal", "Independent(Normal)"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kl_to_posterior_matches_reference(case, q_kind):
    """toyvae.kl_to_posterior equals the reference KL from q to the reference posterior."""
    g = _geometry(case)
    q, cov_q = _q_kinds(case)[q_kind]
    actual = toyvae.kl_to_posterior(_model(case), torch.from_numpy(case.x), q).numpy()
    means, cov = ref.posterior(case.weight, case.bias, case.noise, case.x)
    expected = ref.gaussian_kl(case.q_loc, cov_q, means, cov)
    for i in range(NUM_POINTS):
        scale = _model_scale(case, g, i, case.q_loc[i], cov_q[i])
        assert abs(actual[i] - expected[i]) <= 2 * g.m * g.kappa_ref * EPS * scale


@pytest.mark.parametrize("q_kind", ["MultivariateNormal", "Independent(Normal)"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gaussian_kl_matches_reference(case, q_kind):
    """toyvae.gaussian_kl(q, p) equals the textbook formula for a batch of q and p."""
    _, k = case.dims
    q, cov_q = _q_kinds(case)[q_kind]
    p = MultivariateNormal(torch.from_numpy(case.p_loc), scale_tril=torch.from_numpy(case.p_tril))
    cov_p = case.p_tril @ np.swapaxes(case.p_tril, -1, -2)
    actual = toyvae.gaussian_kl(q, p).numpy()
    expected = ref.gaussian_kl(case.q_loc, cov_q, case.p_loc, cov_p)
    for i in range(NUM_POINTS):
        # m = kl_growth(K); κ(Σp) for the solves with L_p and the explicit inverse of Σp,
        # κ(Σq) for the reference's slogdet of Σq.
        kappa = max(_cond(cov_p[i]), _cond(cov_q[i]))
        scale = _kl_scale(case.q_loc[i], cov_q[i], case.p_loc[i], cov_p[i])
        assert abs(actual[i] - expected[i]) <= 2 * kl_growth(k) * kappa * EPS * scale
