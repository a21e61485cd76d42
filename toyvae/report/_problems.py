"""The classic questions, on fixed problems: the same in every run, whatever the models.

The mean-field counterexample x = w(z₁ + z₂) + ε with E[x²] = 3, and PPCA fitted to 200 points
(D = 10, K = 3). Each problem has the signature ``problem(*, budget) -> Row`` and no randomness.
"""

from __future__ import annotations

import math

import torch

from toyvae.aggregate import LinearGaussianEncoder
from toyvae.bounds import elbo
from toyvae.learning import (
    counterexample_objectives,
    counterexample_optima,
    ppca_maximum_likelihood,
)
from toyvae.model import LinearGaussian
from toyvae.report.rows import Row, rounding_unit, worst
from toyvae.tolerances import identity_tolerance

_SECOND_MOMENT = 3.0  # E[x²] of the counterexample's data


def _counterexample_curvature(u: float, s: float, elbo_side: bool) -> float:
    """|f''(w)| at a maximiser u = w² of f = −½ g(w²): f'' = −2u·g''(u) where g'(u) = 0.

    g(u) = log(1 + 2u) + s/(1 + 2u) for E log p, and 2 log(1 + u) + s/(1 + 2u) for the ELBO.
    """
    first = -2 / (1 + u) ** 2 if elbo_side else -4 / (1 + 2 * u) ** 2
    return abs(2 * u * (first + 8 * s / (1 + 2 * u) ** 3))


def problem_counterexample_optima(*, budget=None) -> Row:
    """x = w(z₁ + z₂) + ε, E[x²] = 3: the numeric maximisers of E log p_w(x) and of the best
    mean-field ELBO are the closed forms w = 1 and w = √((√33 − 1)/8) ≈ 0.770.

    A maximiser of f is located only to within √(2δ/|f''|), δ = 16·eps·3 the rounding of f (a
    handful of terms of size ≤ 3), plus Brent's own xatol = 1e-12; f'' in closed form.
    """
    s = _SECOND_MOMENT
    found = counterexample_optima(s)
    eps = torch.finfo(torch.float64).eps
    errors, tols = [], []
    for value, u, elbo_side in [
        (found.maximum_likelihood, (s - 1) / 2, False),
        (found.maximum_elbo, (s - 4 + math.sqrt(s * s + 8 * s)) / 8, True),
    ]:
        errors.append(abs(value - math.sqrt(u)))
        curvature = _counterexample_curvature(u, s, elbo_side)
        tols.append(math.sqrt(2 * 16 * eps * s / curvature) + 1e-12)
    reason = "√(2δ/|f''|) + xatol: f is flat to second order at its maximum, δ = 16·eps·3"
    return worst("counterexample: optima = closed forms", errors, tols, reason)


def problem_counterexample_ascent(*, budget=None) -> Row:
    """From w_ML = 1 to w_ELBO, where ELBO ascent ends, the ELBO rises and log p(x) falls.

    Both objectives at both optima against their closed forms (V2) and (V4); then the rise of
    the ELBO and the fall of E log p, each as a violation max(0, −change).
    """
    s = _SECOND_MOMENT
    eps = torch.finfo(torch.float64).eps
    # Sums of a handful of terms of size ≤ s, through 2×2 factorisations: 64·eps·s each.
    tol = 64 * eps * s
    errors, values = [], []
    for u in ((s - 1) / 2, (s - 4 + math.sqrt(s * s + 8 * s)) / 8):
        objectives = counterexample_objectives(math.sqrt(u), s)
        log_p = -0.5 * (math.log(2 * math.pi) + math.log(1 + 2 * u) + s / (1 + 2 * u))
        bound = -0.5 * (math.log(2 * math.pi) + 2 * math.log(1 + u) + s / (1 + 2 * u))
        errors += [
            abs(objectives.log_likelihood.item() - log_p),
            abs(objectives.elbo.item() - bound),
        ]
        values.append(objectives)
    at_ml, at_elbo = values
    rise = (at_elbo.elbo - at_ml.elbo).item()
    fall = (at_ml.log_likelihood - at_elbo.log_likelihood).item()
    errors += [max(0.0, -rise), max(0.0, -fall)]
    reason = "64·eps·3: a few terms ≤ 3 via 2×2 factors; direction: error = max(0, −change)"
    return worst("counterexample: ELBO ascent lowers log p", errors, [tol] * len(errors), reason)


def _ppca_problem() -> tuple[torch.Tensor, int]:
    """200 points from a PPCA model, D = 10, K = 3 (W's columns of scale 3, 2, 1, σ² = 0.5)."""
    generator = torch.Generator().manual_seed(20240601)
    d, k, n = 10, 3, 200
    weight = torch.randn(d, k, dtype=torch.float64, generator=generator)
    weight = weight * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    model = LinearGaussian(weight, torch.randn(d, dtype=torch.float64, generator=generator), 0.5)
    return model.sample((n,), generator=generator)[0], k


def _sample_covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    return centred.mT @ centred / x.shape[0]


def problem_ppca_stationary(*, budget=None) -> Row:
    """Tipping & Bishop's closed-form PPCA solution is a stationary point of the mean log p(x).

    The gradient in W, b and σ² (autograd) is the difference of ∇½ log det C and
    ∇½ mean (x − b)ᵀC⁻¹(x − b); each entry is held to κ(C)·4(D+K)·eps times the sum of the two
    terms' absolute values, computed densely.
    """
    x, k = _ppca_problem()
    fitted = ppca_maximum_likelihood(x, k)
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (fitted.weight, fitted.bias, fitted.noise_variance)
    ]
    gradients = torch.autograd.grad(LinearGaussian(*leaves).log_evidence(x).mean(), leaves)
    weight, bias, noise = (t.detach() for t in leaves)
    d = x.shape[-1]
    cov = weight @ weight.mT + noise * torch.eye(d, dtype=x.dtype)
    inverse = torch.linalg.inv(cov)
    residual = (x - bias).mT  # (D, N)
    solved = inverse @ residual  # y_n = C⁻¹(x_n − b)
    n = x.shape[0]
    # Term sizes: ∇_W: C⁻¹W and mean y_n y_nᵀW; ∇_b: mean y_n; ∇_σ²: ½ tr C⁻¹ and ½ mean ‖y_n‖².
    sizes = [
        inverse.abs() @ weight.abs() + solved.abs() @ (solved.abs().mT @ weight.abs()) / n,
        (inverse.abs() @ residual.abs()).mean(1),
        0.5 * (inverse.diagonal().abs().sum() + solved.square().sum(0).mean()),
    ]
    eigenvalues = torch.linalg.eigvalsh(cov)
    scale = float(eigenvalues.max() / eigenvalues.min()) * rounding_unit(fitted)
    errors = torch.cat([g.abs().reshape(-1) for g in gradients])
    tols = torch.cat([(scale * size).reshape(-1) for size in sizes])
    reason = "κ(C)·4(D+K)·eps·Σ|terms| of ∇½log det C and ∇½(x−b)ᵀC⁻¹(x−b), entrywise"
    return worst("PPCA: ML is stationary (∇ log p = 0)", errors, tols, reason)


def problem_ppca_elbo(*, budget=None) -> Row:
    """At the PPCA ML solution, the ELBO of the exact-posterior encoder and log p(x) both equal
    the closed form −½[D log 2π + Σ_{i≤K} log λ_i + (D − K) log σ² + D] (mean over the data).
    """
    x, k = _ppca_problem()
    fitted = ppca_maximum_likelihood(x, k)
    d = x.shape[-1]
    eigenvalues = torch.linalg.eigvalsh(_sample_covariance(x)).flip(0)
    sigma2 = eigenvalues[k:].mean()
    closed = -0.5 * (
        d * math.log(2 * math.pi) + eigenvalues[:k].log().sum() + (d - k) * sigma2.log() + d
    )
    q = LinearGaussianEncoder.exact_posterior(fitted)(x)
    values = [elbo(fitted, x, q).mean(), fitted.log_evidence(x).mean()]
    errors = torch.stack([(v - closed).abs() for v in values])
    # tr(C⁻¹S) = D holds through the eigenvectors: rounding amplified by κ(C) = λ₁/σ².
    kappa = float(eigenvalues[0] / sigma2)
    tol = kappa * identity_tolerance(fitted, x, q).mean()
    reason = "κ(C)·4(D+K)·eps·M: M = Σ|terms| (mean over the data), κ(C) = λ₁/σ² for tr(C⁻¹S) = D"
    return worst("PPCA: exact ELBO attains log p at ML", errors, tol, reason)
