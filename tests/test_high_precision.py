r"""toyvae's float64 exact quantities against the 60-digit mpmath oracle: the achieved accuracy.

Error model. Each quantity is computed by backward-stable steps (Cholesky factorisations,
triangular solves, sums and inner products), each adding a relative error of at most
γ_n ≈ n·eps for a sum of length n (Higham, *Accuracy and Stability of Numerical Algorithms*,
§3.1). To first order the errors of all the steps that feed a result add up; counting the
lengths of those sums in toyvae's code gives at most m·eps with

    m = 6D + 7K + K² + 6          (model quantities: whitening, Ã, ÃᵀÃ, the K×K Cholesky
                                   factor and its inverse, the posterior mean, the misfit, the
                                   norms, log-determinants and traces, the final sum),
    m = K² + 5K + 5               (a KL between given Gaussians: two solves with L_p, the K²
                                   entries of L_p⁻¹L_q, two log-determinants, the final sum).

Conditioning amplifies it by κ, the condition number of the matrices that are factored, and it
is measured against the *scale* of the quantity, the sum of the magnitudes of the terms it is
built from (stated per quantity in :func:`_measure`). So every comparison asserts

    |toyvae − exact| ≤ m · κ · eps · scale,      eps = 2⁻⁵² (float64).

This is a first-order worst-case bound; what toyvae achieves is far smaller and is reported,
for the docs, by :func:`achieved_errors` (``python tests/test_high_precision.py`` prints it).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mp_oracle as oracle
import numpy as np
import pytest
import seeds
import torch
from scipy.linalg import solve_triangular
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae import LinearGaussian, elbo, gaussian_kl, kl_to_posterior

EPS = float(np.finfo(np.float64).eps)


def model_growth(d: int, k: int) -> int:
    """m for the model quantities: the summed lengths of the sums that feed them (docstring)."""
    return 6 * d + 7 * k + k * k + 6


def kl_growth(k: int) -> int:
    """m for a KL between two given Gaussians (module docstring)."""
    return k * k + 5 * k + 5


LOG_2PI = math.log(2 * math.pi)
NUM_POINTS = 3  # data points x per model


class Case(NamedTuple):
    """A fixed model, data points, and two Gaussians q (per point) and p (for gaussian_kl)."""

    name: str
    group: str  # "well-conditioned" or "ill-conditioned"
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (D,)
    noise: float | np.ndarray  # σ², (D,) variances or a (D, D) covariance
    x: np.ndarray  # (N, D)
    q_loc: np.ndarray  # (N, K)
    q_tril: np.ndarray  # (N, K, K), lower triangular with positive diagonal
    p_loc: np.ndarray  # (N, K)
    p_tril: np.ndarray  # (N, K, K)


def _spd(rng: np.random.Generator, d: int, log10_cond: float) -> np.ndarray:
    """A random exactly symmetric (D, D) matrix with eigenvalues 10^[-c/2, c/2] (κ = 10^c)."""
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    matrix = (basis * np.logspace(-log10_cond / 2, log10_cond / 2, d)) @ basis.T
    return (matrix + matrix.T) / 2  # IEEE addition commutes, so this is exactly symmetric


def _trils(rng: np.random.Generator, n: int, k: int, log10_spread: float) -> np.ndarray:
    """n random lower-triangular factors, diagonals spread over 10^[-spread, 0]."""
    tril = np.tril(0.3 * rng.standard_normal((n, k, k)), -1)
    diagonal = 10 ** rng.uniform(-log10_spread, 0, (n, k))
    return tril + diagonal[:, :, None] * np.eye(k)


def _case(
    seed: int,
    kind: str,
    d: int,
    k: int,
    *,
    noise_log10_cond: float = 1.0,
    weight_singular_values: tuple[float, ...] | None = None,
) -> Case:
    rng = seeds.rng(seed)
    if weight_singular_values is None:
        weight = rng.standard_normal((d, k))
    else:
        left, _ = np.linalg.qr(rng.standard_normal((d, k)))
        right, _ = np.linalg.qr(rng.standard_normal((k, k)))
        weight = (left * np.array(weight_singular_values)) @ right.T
    bias = rng.standard_normal(d)
    if kind == "isotropic":
        noise = float(rng.uniform(0.3, 2.0))
    elif kind == "diagonal":
        noise = rng.permutation(np.logspace(-noise_log10_cond, 0, d))
    else:
        noise = _spd(rng, d, noise_log10_cond)
    dense_noise = oracle.to_float(oracle.noise_matrix(noise, d))
    z = rng.standard_normal((NUM_POINTS, k))
    white_noise = rng.standard_normal((NUM_POINTS, d))
    x = z @ weight.T + bias + white_noise @ np.linalg.cholesky(dense_noise).T  # model draws
    spread = 0.5 if weight_singular_values is None else 1.0
    return Case(
        name=f"{kind} D={d} K={k} seed={seed}",
        group="well-conditioned" if weight_singular_values is None else "ill-conditioned",
        weight=weight,
        bias=bias,
        noise=noise,
        x=x,
        q_loc=rng.standard_normal((NUM_POINTS, k)),
        q_tril=_trils(rng, NUM_POINTS, k, 0.5),
        p_loc=rng.standard_normal((NUM_POINTS, k)),
        p_tril=_trils(rng, NUM_POINTS, k, spread),
    )


def cases() -> list[Case]:
    """Small models of every noise kind, plus two moderately ill-conditioned ones."""
    shapes = [(3, 1), (5, 2), (6, 3)]
    kinds = ["isotropic", "diagonal", "full"]
    out = [
        _case(seed, kind, d, k)
        for seed in range(3)
        for kind, (d, k) in zip(kinds, np.roll(shapes, seed, axis=0).tolist(), strict=True)
    ]
    # κ(Ψ) = 1e3 and W's singular values spread over two decades: κ(Ψ)·κ(Λ) = 3e5 and 3e6.
    out.append(_case(10, "full", 6, 3, noise_log10_cond=3, weight_singular_values=(10, 1, 0.1)))
    out.append(_case(11, "diagonal", 5, 2, noise_log10_cond=3, weight_singular_values=(5, 0.05)))
    return out


class Measurement(NamedTuple):
    """One comparison of a toyvae float64 value with the exact one."""

    quantity: str
    case: str
    group: str  # the case's group: "well-conditioned" or "ill-conditioned"
    error: float  # |toyvae − exact|, the largest entry's for vectors and matrices
    magnitude: float  # |exact|, the largest entry's for vectors and matrices
    scale: float  # the magnitude of the terms the quantity is built from
    kappa: float  # the condition number that amplifies rounding errors
    m: int  # the rounding-error growth constant of the error model

    @property
    def bound(self) -> float:
        return self.m * self.kappa * EPS * self.scale


def _cond(matrix: np.ndarray) -> float:
    eigenvalues = np.linalg.eigvalsh(matrix)
    return float(eigenvalues.max() / eigenvalues.min())


def _log_det(matrix: np.ndarray) -> float:
    return float(np.linalg.slogdet(matrix)[1])


def _compare(quantity, case, value, exact, scale, kappa, m) -> Measurement:
    """|value − exact| computed in mpmath (value converted exactly), the largest entry's."""
    difference = oracle.to_mp(np.asarray(value, dtype=np.float64)) - exact
    return Measurement(
        quantity=quantity,
        case=case.name,
        group=case.group,
        error=float(np.max(np.abs(oracle.to_float(difference)))),
        magnitude=float(np.max(np.abs(oracle.to_float(exact)))),
        scale=float(scale),
        kappa=float(kappa),
        m=m,
    )


class Geometry(NamedTuple):
    """Float64 magnitudes of a case's model, for scales and condition numbers.

    Only their order of magnitude matters, so float64 (and its rounding) is good enough.
    """

    noise_tril: np.ndarray  # L_Ψ
    bias: np.ndarray
    precision: np.ndarray  # Λ = I + ÃᵀÃ, the posterior precision
    norm_a2: float  # ‖Ã‖², Ã = L_Ψ⁻¹ W
    norm_precision: float  # ‖Λ‖ = 1 + ‖Ã‖²
    log_det_psi: float
    log_det_precision: float
    kappa_psi: float
    kappa_precision: float

    def residual2(self, x: np.ndarray) -> float:
        """‖r̃‖² = (x − b)ᵀ Ψ⁻¹ (x − b): the data term's size before the posterior explains it."""
        white = solve_triangular(self.noise_tril, x - self.bias, lower=True)
        return float(white @ white)


def _geometry(case: Case) -> Geometry:
    d, k = case.weight.shape
    psi = oracle.to_float(oracle.noise_matrix(case.noise, d))
    noise_tril = np.linalg.cholesky(psi)
    whitened = solve_triangular(noise_tril, case.weight, lower=True)
    precision = np.eye(k) + whitened.T @ whitened
    return Geometry(
        noise_tril=noise_tril,
        bias=case.bias,
        precision=precision,
        norm_a2=float(np.linalg.norm(whitened, 2) ** 2),
        norm_precision=float(np.linalg.norm(precision, 2)),
        log_det_psi=_log_det(psi),
        log_det_precision=_log_det(precision),
        kappa_psi=_cond(psi),
        kappa_precision=_cond(precision),
    )


def _measure(case: Case) -> list[Measurement]:
    """Compare every quantity on ``case`` with the oracle; the scales are stated inline."""
    d, k = case.weight.shape
    model = LinearGaussian(case.weight, case.bias, case.noise)
    x = torch.from_numpy(case.x)
    q_loc = torch.from_numpy(case.q_loc)
    q_tril = torch.from_numpy(case.q_tril)
    q_scale = q_tril.diagonal(dim1=-2, dim2=-1)
    qs = {  # each q with the Cholesky factor of its covariance
        "MultivariateNormal": (MultivariateNormal(q_loc, scale_tril=q_tril), q_tril),
        "Independent(Normal)": (Independent(Normal(q_loc, q_scale), 1), torch.diag_embed(q_scale)),
    }
    p = MultivariateNormal(torch.from_numpy(case.p_loc), scale_tril=torch.from_numpy(case.p_tril))

    posterior = model.posterior(x)
    toy = {
        "log_evidence": model.log_evidence(x).numpy(),
        "posterior_mean": posterior.loc.numpy(),
        "posterior_cov": posterior.covariance_matrix.numpy(),
    }
    for name, (q, _) in qs.items():
        toy["elbo", name] = elbo(model, x, q).numpy()
        toy["kl_to_posterior", name] = kl_to_posterior(model, x, q).numpy()
        toy["gaussian_kl", name] = gaussian_kl(q, p).numpy()

    g = _geometry(case)
    norm_a2, norm_precision = g.norm_a2, g.norm_precision
    log_det_psi, log_det_precision = g.log_det_psi, g.log_det_precision
    kappa_psi = g.kappa_psi
    kappa = g.kappa_psi * g.kappa_precision  # Ψ and Λ are the matrices toyvae factors
    m = model_growth(d, k)

    out = []
    exact_model = oracle.Model(case.weight, case.bias, case.noise)
    for i in range(NUM_POINTS):
        x_i = case.x[i]
        residual2 = g.residual2(x_i)

        # log p = −½[D log 2π + log det Ψ + log det Λ + ‖r̃ − Ãμ‖² + ‖μ‖²]: the two norms sum
        # to the Mahalanobis distance, at most ‖r̃‖²; a relative perturbation δ of Ψ or Λ moves
        # their log-determinants by at most (D + K)·δ.
        scale = d * LOG_2PI + abs(log_det_psi) + abs(log_det_precision) + residual2 + d + k
        exact = exact_model.log_evidence(x_i)
        out.append(_compare("log_evidence", case, toy["log_evidence"][i], exact, scale, kappa, m))

        # μ = Λ⁻¹ Ãᵀ r̃ with ‖Λ⁻¹‖ ≤ 1: its terms are at most ‖Ã‖‖r̃‖ in size.
        mean_scale = math.sqrt(norm_a2 * residual2)
        post_mean, post_cov = exact_model.posterior(x_i)
        value = toy["posterior_mean"][i]
        out.append(_compare("posterior_mean", case, value, post_mean, mean_scale, kappa, m))
        if i == 0:  # Σ = Λ⁻¹ does not depend on x; its size is ‖Σ‖ = 1 / λ_min(Λ)
            cov_scale = 1 / np.linalg.eigvalsh(g.precision).min()
            value = toy["posterior_cov"][0]
            out.append(_compare("posterior_cov", case, value, post_cov, cov_scale, kappa, m))

        mean_p = case.p_loc[i]
        cov_p = oracle.covariance_from_tril(case.p_tril[i])
        cov_p_float = oracle.to_float(cov_p)
        for name, (_, tril) in qs.items():
            mean_q = case.q_loc[i]
            cov_q = oracle.covariance_from_tril(tril[i].numpy())
            cov_q_float = oracle.to_float(cov_q)
            trace_q, log_det_q = float(np.trace(cov_q_float)), abs(_log_det(cov_q_float))

            # E_q log p(x|z) − KL(q‖p(z)) = −½[D log 2π + log det Ψ + ‖r̃ − Ãm‖² + tr(ÃᵀÃ S)]
            # − ½[tr S + ‖m‖² − K − log det S]; the misfit's terms are ‖r̃‖ and ‖Ã‖‖m‖. Only Ψ
            # is factored, so κ = κ(Ψ).
            scale = (
                d * LOG_2PI
                + abs(log_det_psi)
                + residual2
                + (1 + norm_a2) * (mean_q @ mean_q + trace_q)
                + log_det_q
                + 2 * k
                + d
            )
            exact = exact_model.elbo(x_i, mean_q, cov_q)
            value = toy["elbo", name][i]
            out.append(_compare("elbo", case, value, exact, scale, kappa_psi, m))

            # KL(q‖post) = ½[tr(ΛS) + (μ−m)ᵀΛ(μ−m) − K − log det Λ − log det S]; the error of
            # μ (relative to mean_scale) enters the Mahalanobis term times 2‖Λ‖‖μ − m‖.
            gap = float(np.linalg.norm(oracle.to_float(post_mean).ravel() - mean_q))
            scale = (
                norm_precision * (trace_q + gap**2 + 2 * gap * mean_scale)
                + abs(log_det_precision)
                + log_det_q
                + 2 * k
            )
            exact = oracle.gaussian_kl(mean_q, cov_q, post_mean, post_cov)
            value = toy["kl_to_posterior", name][i]
            out.append(_compare("kl_to_posterior", case, value, exact, scale, kappa, m))

            # KL(q‖p) = ½[tr(Σp⁻¹S) + (μp−m)ᵀΣp⁻¹(μp−m) − K + log det Σp − log det S]. Only
            # triangular solves with L_p and sums: κ = κ(Σp), m = kl_growth(K).
            p_inv_norm = 1 / np.linalg.eigvalsh(cov_p_float).min()
            gap2 = float((mean_p - mean_q) @ (mean_p - mean_q))
            scale = p_inv_norm * (trace_q + gap2) + abs(_log_det(cov_p_float)) + log_det_q + 2 * k
            exact = oracle.gaussian_kl(mean_q, cov_q, mean_p, cov_p)
            value = toy["gaussian_kl", name][i]
            out.append(
                _compare("gaussian_kl", case, value, exact, scale, _cond(cov_p_float), kl_growth(k))
            )
    return out


QUANTITIES = (
    "log_evidence",
    "posterior_mean",
    "posterior_cov",
    "elbo",
    "kl_to_posterior",
    "gaussian_kl",
)


@functools.cache
def measurements() -> tuple[Measurement, ...]:
    """Every comparison on every case (computed once per process: mpmath is slow)."""
    return tuple(found for case in cases() for found in _measure(case))


GROUPS = ("well-conditioned", "ill-conditioned")


class ErrorRow(NamedTuple):
    """The worst achieved error of one quantity over a group of cases.

    For vectors and matrices, errors and magnitudes are those of the largest entry.
    """

    quantity: str
    group: str  # "well-conditioned" or "ill-conditioned" (κ(Ψ) = 1e3, W's singular values spread)
    comparisons: int
    max_kappa: float  # the largest condition number κ in the group
    max_relative: float  # max |error| / |exact|
    max_ulps: float  # max |error| / ulp(|exact|)
    max_scaled: float  # max |error| / (eps · scale): the error in ulps of the terms' magnitude
    max_of_bound: float  # max |error| / (m · κ · eps · scale): how much of the bound is used


def achieved_errors() -> list[ErrorRow]:
    """The table of achieved float64 errors that the docs quote: one row per quantity and group."""
    rows = []
    for quantity in QUANTITIES:
        for group in GROUPS:
            found = [f for f in measurements() if f.quantity == quantity and f.group == group]
            rows.append(
                ErrorRow(
                    quantity=quantity,
                    group=group,
                    comparisons=len(found),
                    max_kappa=max(f.kappa for f in found),
                    max_relative=max(f.error / f.magnitude for f in found),
                    max_ulps=max(f.error / np.spacing(f.magnitude) for f in found),
                    max_scaled=max(f.error / (EPS * f.scale) for f in found),
                    max_of_bound=max(f.error / f.bound for f in found),
                )
            )
    return rows


def error_table() -> str:
    """:func:`achieved_errors` as a plain-text table."""
    lines = [
        f"{'quantity':<16} {'cases':<17} {'n':>3} {'max κ':>8} {'max rel. err':>12} "
        f"{'max ulps':>9} {'err/(eps·scale)':>15} {'err/bound':>9}"
    ]
    for row in achieved_errors():
        lines.append(
            f"{row.quantity:<16} {row.group:<17} {row.comparisons:>3} {row.max_kappa:>8.1e} "
            f"{row.max_relative:>12.1e} {row.max_ulps:>9.1f} {row.max_scaled:>15.2f} "
            f"{row.max_of_bound:>9.1e}"
        )
    return "\n".join(lines)


def _oracle_identity_errors(case: Case) -> list[tuple[float, float]]:
    """(error, bound) of the oracle's own identities at the first point of ``case``.

    At q = posterior, ELBO(q) = log p(x) (the bound is tight exactly there), and for the
    case's q, ELBO(q) + KL(q ‖ posterior) = log p(x): three routes of the oracle that share
    no formula. The oracle inverts Ψ, C and Λ explicitly, and κ(C), κ(Λ) ≤ κ(Ψ)(1 + ‖Ã‖²),
    so its error is at most m·κ_ref·u·scale with κ_ref = κ(Ψ)²(1 + ‖Ã‖²) and u = 2^-prec.
    """
    d, k = case.weight.shape
    g = _geometry(case)
    exact_model = oracle.Model(case.weight, case.bias, case.noise)
    x, mean_q = case.x[0], case.q_loc[0]
    cov_q = oracle.covariance_from_tril(case.q_tril[0])
    cov_q_float = oracle.to_float(cov_q)
    post_mean, post_cov = exact_model.posterior(x)
    log_evidence = exact_model.log_evidence(x)
    # The magnitudes of every term on both sides (as in _measure, summed over quantities).
    gap2 = float(np.sum((oracle.to_float(post_mean).ravel() - mean_q) ** 2))
    scale = (
        d * LOG_2PI
        + abs(g.log_det_psi)
        + abs(g.log_det_precision)
        + (1 + g.norm_a2) * (g.residual2(x) + mean_q @ mean_q + np.trace(cov_q_float) + gap2)
        + abs(_log_det(cov_q_float))
        + 2 * (d + k)
    )
    bound = model_growth(d, k) * g.kappa_psi**2 * g.norm_precision * float(oracle.MP.eps) * scale
    at_posterior = exact_model.elbo(x, post_mean, post_cov) - log_evidence
    split = (
        exact_model.elbo(x, mean_q, cov_q)
        + exact_model.kl_to_posterior(x, mean_q, cov_q)
        - log_evidence
    )
    return [(abs(float(at_posterior)), bound), (abs(float(split)), bound)]


# -- tests ----------------------------------------------------------------------------------


def _assert_within_bound(quantity: str) -> None:
    found = [f for f in measurements() if f.quantity == quantity]
    assert len(found) > 0
    for f in found:
        # The bound m·κ·eps·scale is derived in the module docstring; each scale is stated in
        # _measure beside its quantity.
        assert f.error <= f.bound, f


def test_log_evidence_within_derived_bound():
    """log p(x) agrees with the 60-digit value to m·κ(Ψ)κ(Λ)·eps·scale on every case."""
    _assert_within_bound("log_evidence")


def test_posterior_mean_within_derived_bound():
    """The posterior mean agrees with the 60-digit value to m·κ(Ψ)κ(Λ)·eps·‖Ã‖‖r̃‖."""
    _assert_within_bound("posterior_mean")


def test_posterior_covariance_within_derived_bound():
    """The posterior covariance agrees with the 60-digit value to m·κ(Ψ)κ(Λ)·eps·‖Σ‖."""
    _assert_within_bound("posterior_cov")


def test_elbo_within_derived_bound():
    """The ELBO of both kinds of q agrees with the 60-digit value to m·κ(Ψ)·eps·scale."""
    _assert_within_bound("elbo")


def test_kl_to_posterior_within_derived_bound():
    """KL(q ‖ posterior) for both kinds of q agrees with the 60-digit value to m·κ·eps·scale."""
    _assert_within_bound("kl_to_posterior")


def test_gaussian_kl_within_derived_bound():
    """gaussian_kl(q, p) agrees with the 60-digit value to m·κ(Σp)·eps·scale."""
    _assert_within_bound("gaussian_kl")


def test_cases_include_ill_conditioned_models():
    """The cases reach κ(Ψ)κ(Λ) ≥ 1e5, so the bound's κ factor is exercised, not idle."""
    kappas = [f.kappa for f in measurements() if f.quantity == "log_evidence"]
    assert max(kappas) >= 1e5


def test_achieved_errors_table_covers_every_quantity():
    """achieved_errors(), which the docs print, has a finite row within the bound per quantity
    and group."""
    rows = achieved_errors()
    assert [(row.quantity, row.group) for row in rows] == [
        (quantity, group) for quantity in QUANTITIES for group in GROUPS
    ]
    for row in rows:
        assert row.comparisons > 0
        assert all(math.isfinite(v) for v in row[3:])
        # Every measured error is within its bound, so the worst fraction of it is at most 1.
        assert row.max_of_bound <= 1


@pytest.mark.parametrize("case", cases(), ids=lambda case: case.name.replace(" ", "-"))
def test_oracle_identities_hold_to_60_digits(case):
    """The oracle's ELBO, KL and log evidence satisfy log p = ELBO + KL to its own precision."""
    for error, bound in _oracle_identity_errors(case):
        # Bound derived in _oracle_identity_errors: m·κ(Ψ)²(1 + ‖Ã‖²)·2^-prec·scale.
        assert error <= bound


def test_oracle_matches_closed_form_in_one_dimension():
    """For D = K = 1 the oracle gives the closed forms N(x; b, w² + σ²) and its posterior."""
    w, bias, variance, x = 0.5, 0.125, 0.25, 1.0  # dyadic: every closed form below is exact
    model = oracle.Model(np.array([[w]]), np.array([bias]), variance)
    mp = oracle.MP
    total = mp.mpf(w) ** 2 + mp.mpf(variance)
    residual = mp.mpf(x) - mp.mpf(bias)
    expected_log_evidence = -(mp.log(2 * mp.pi * total) + residual**2 / total) / 2
    post_mean, post_cov = model.posterior(np.array([x]))
    # Fewer than 16 rounded 60-digit operations per route, on terms of size at most 4
    # (|log(2π·0.5)| ≈ 1.14, 0.875²/0.5 ≈ 1.53; the posterior's 0.875 and 0.5): ≤ 16·u·4 each.
    tolerance = 16 * mp.eps * 4
    assert abs(model.log_evidence(np.array([x])) - expected_log_evidence) <= tolerance
    assert abs(post_mean[0] - mp.mpf(w) * residual / total) <= tolerance
    assert abs(post_cov[0, 0] - mp.mpf(variance) / total) <= tolerance


if __name__ == "__main__":
    print(error_table())
