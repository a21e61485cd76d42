r"""Gradient signal-to-noise ratios of IWAE on the Gaussian toy model of Rainforth et al. (2018).

Model ("Tighter variational bounds are not necessarily better", §4): z ~ N(μ, I_D),
x | z ~ N(z, I_D), D = 20, and q(z|x) = N(Ax + b, (2/3) I). The 2/3 is a **variance**: the
paper writes N(mean, covariance), as in its prior N(μ, I). The exact posterior is
N((x + μ)/2, ½ I); a fixed variance 2/3 ≠ ½ keeps q from ever equalling the posterior (else at
the optimum every weight is p(x) and every gradient draw is zero), and q wider than the
posterior keeps the weights bounded, so χ² and all moments of w are finite (2Λ − Σ_q⁻¹ = 4 − 3/2
> 0).

In toyvae's form, z' = z − μ ~ N(0, I) and x | z' ~ N(z' + μ, I): a LinearGaussian with W = I,
b = 0, Ψ = I, applied to x − μ, with q(z') = N(Ax + b − μ, (2/3) I). The function of (μ, A, b, ε)
is unchanged, so are its gradients. Per-replicate gradients come from giving each replicate
its own copy of b and μ (one backward pass for all).

For IWAE_k, Rainforth et al. show SNR(∇_φ) = O(k^(−1/2)) for the inference network and
SNR(∇_θ) = O(k^(1/2)) for the generative one: E ∇_φ L̂_k = ∇_φ L_k ≈ −∇_φ χ²/(2k) shrinks like
1/k while the noise shrinks like k^(−1/2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Independent, Normal

from toyvae.estimators import chi_square_divergence, iwae_estimate
from toyvae.model import LinearGaussian

__all__ = [
    "RainforthProblem",
    "SNRTable",
    "asymptotic_inference_gradient",
    "gradient_snr",
    "iwae_gradient_draws",
    "log_log_slope",
    "plot_snr",
    "rainforth_problem",
]

Q_VARIANCE = 2 / 3


class RainforthProblem(NamedTuple):
    """One data point x and the parameters (μ, A, b) at which gradients are taken."""

    x: torch.Tensor
    mu: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def rainforth_problem(dim=20, perturbation=0.01, *, generator=None, dtype=torch.float64):
    """x from the model with μ₀ ~ N(0, I); (μ, A, b) = the optimum (μ₀, I/2, μ₀/2) + N(0, δ²).

    The optimum of the ELBO and IWAE in (A, b) is A = I/2, b = μ/2 (q's mean = the posterior
    mean); ``perturbation`` δ moves the point slightly off it, as in the paper.
    """
    options = {"generator": generator, "dtype": dtype}
    mu0 = torch.randn(dim, **options)
    x = mu0 + torch.randn(dim, **options) + torch.randn(dim, **options)
    eye = torch.eye(dim, dtype=dtype)
    return RainforthProblem(
        x,
        mu0 + perturbation * torch.randn(dim, **options),
        eye / 2 + perturbation * torch.randn(dim, dim, **options),
        mu0 / 2 + perturbation * torch.randn(dim, **options),
    )


def _model(problem: RainforthProblem) -> LinearGaussian:
    dim = problem.x.shape[-1]
    return LinearGaussian(torch.eye(dim, dtype=problem.x.dtype), None, 1.0)


def _q(problem: RainforthProblem, b, mu) -> Independent:
    loc = problem.x @ problem.a.mT + b - mu
    return Independent(Normal(loc, torch.full_like(loc, math.sqrt(Q_VARIANCE))), 1)


def iwae_gradient_draws(problem: RainforthProblem, k: int, num_replicates: int, *, generator=None):
    """``num_replicates`` independent draws of ∇_b IWAE_k and ∇_μ IWAE_k, each (n, D)."""
    dim = problem.x.shape[-1]
    b = problem.b.expand(num_replicates, dim).clone().requires_grad_()
    mu = problem.mu.expand(num_replicates, dim).clone().requires_grad_()
    estimates = iwae_estimate(
        _model(problem), problem.x - mu, _q(problem, b, mu), k, generator=generator
    )
    return torch.autograd.grad(estimates.sum(), (b, mu))


def asymptotic_inference_gradient(problem: RainforthProblem, k: int) -> torch.Tensor:
    """−∇_b χ²/(2k): the exact leading term of ∇_b L_k = E ∇_b IWAE_k as k → ∞."""
    b = problem.b.clone().requires_grad_()
    mu = problem.mu
    chi2 = chi_square_divergence(_model(problem), problem.x - mu, _q(problem, b, mu))
    (grad,) = torch.autograd.grad(chi2, b)
    return -grad / (2 * k)


class SNRTable(NamedTuple):
    """Per k: SNR of the inference (b) and generative (μ) gradients, averaged over coordinates.

    ``inference`` uses the leading asymptotic mean −∇χ²/(2k) (exact as k → ∞) over the MC standard
    deviation; ``inference_mc`` uses the Monte Carlo mean (noisy when SNR·√n is small).
    """

    k: tuple[int, ...]
    inference: tuple[float, ...]
    inference_mc: tuple[float, ...]
    generative: tuple[float, ...]
    inference_sd: tuple[float, ...]


def gradient_snr(problem, k_values, num_replicates, *, generator=None) -> SNRTable:
    """SNR = |E ĝ| / sd(ĝ) per coordinate, averaged over the D coordinates, for each k."""
    inference, inference_mc, generative, sds = [], [], [], []
    for k in k_values:
        grad_b, grad_mu = iwae_gradient_draws(problem, k, num_replicates, generator=generator)
        sd_b = grad_b.std(0)
        exact_mean = asymptotic_inference_gradient(problem, k)
        inference.append((exact_mean.abs() / sd_b).mean().item())
        inference_mc.append((grad_b.mean(0).abs() / sd_b).mean().item())
        generative.append((grad_mu.mean(0).abs() / grad_mu.std(0)).mean().item())
        sds.append(sd_b.mean().item())
    return SNRTable(
        tuple(k_values), tuple(inference), tuple(inference_mc), tuple(generative), tuple(sds)
    )


def log_log_slope(k_values, values) -> float:
    """Least-squares slope of log(values) against log(k)."""
    x = torch.tensor([math.log(k) for k in k_values], dtype=torch.float64)
    y = torch.tensor([math.log(v) for v in values], dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / x.square().sum())


def plot_snr(table: SNRTable, path) -> None:
    """Log-log plot of both SNRs against k with k^(±1/2) guides (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = list(table.k)
    ax.loglog(ks, table.generative, "o-", label="generative (∇μ)")
    ax.loglog(ks, table.inference, "s-", label="inference (∇b), mean −∇χ²/(2k)")
    ax.loglog(ks, table.inference_mc, "x:", label="inference (∇b), MC mean")
    for values, power in [(table.generative, 0.5), (table.inference, -0.5)]:
        guide = [values[0] * (k / ks[0]) ** power for k in ks]
        ax.loglog(ks, guide, "k--", lw=0.7)
    ax.set(xlabel="k", ylabel="SNR", title="IWAE gradient SNR (Rainforth et al. 2018)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    g = torch.Generator().manual_seed(0)
    table = gradient_snr(
        rainforth_problem(generator=g), (1, 4, 16, 64, 256, 1024), 2000, generator=g
    )
    for row in zip(*table, strict=True):
        print(row)
    print(
        "slopes",
        log_log_slope(table.k[2:], table.inference[2:]),
        log_log_slope(table.k[2:], table.generative[2:]),
    )
    if len(sys.argv) > 1:
        plot_snr(table, sys.argv[1])
