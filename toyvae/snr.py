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

Finite k, in closed form to first order in 1/k. Write r = w/p(x) = Π_d r_d (everything
factorises over the D coordinates) and g for one draw's gradient coordinate, g − η = α (z − π)
with π the posterior mean, η = E_post g and α = −Λ = −2 (inference, ∇_b) or 1 (generative, ∇_μ).
IWAE_k's gradient is the ratio T = Ȳ/R̄ of the means of k i.i.d. (Y, R) = (r g, r), so with
U = Y − ηR, T − η = Ū/R̄ and expanding 1/R̄ = 1/(1 + ρ̄), ρ = R − 1:

    E T   = η − c_UR/k + (c_URR − 3 c_UR c_RR)/k² + O(k⁻³)
    Var T = c_UU/k + (3 c_UU c_RR + 5 c_UR² − 2 c_UUR)/k² + O(k⁻³)

(c_UR = E[Uρ], c_URR = E[Uρ²], …). Every c is a Gaussian integral: p_d^a q_d^(1−a) is
E_q[r_d^a] times a Gaussian density ("tilted" by a), so E[r^a (z_d − π_d)^j] is E[r^a] times a
Gaussian moment (:func:`iwae_gradient_expansion`). This predicts the SNR curve and its finite-k
slope (:func:`predicted_snr`), and the sampling variance of the measured SNRs
(:func:`snr_log_variance`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Independent, Normal

from toyvae._checks import check_count
from toyvae.estimators import chi_square_divergence, iwae_estimate
from toyvae.model import LinearGaussian

__all__ = [
    "GradientExpansion",
    "RainforthProblem",
    "SNRLogVariance",
    "SNRTable",
    "asymptotic_inference_gradient",
    "gradient_snr",
    "iwae_gradient_draws",
    "iwae_gradient_expansion",
    "log_log_slope",
    "log_log_slope_weights",
    "plot_snr",
    "predicted_snr",
    "rainforth_problem",
    "snr_log_variance",
]

Q_VARIANCE = 2 / 3


class RainforthProblem(NamedTuple):
    """One data point x and the parameters (μ, A, b) at which gradients are taken."""

    x: torch.Tensor
    mu: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def rainforth_problem(
    dim=20, perturbation=0.01, *, generator=None, dtype=torch.float64, device=None
):
    """x from the model with μ₀ ~ N(0, I); (μ, A, b) = the optimum (μ₀, I/2, μ₀/2) + N(0, δ²).

    The optimum of the ELBO and IWAE in (A, b) is A = I/2, b = μ/2 (q's mean = the posterior
    mean); ``perturbation`` δ moves the point slightly off it, as in the paper.
    """
    options = {"generator": generator, "dtype": dtype, "device": device}
    mu0 = torch.randn(dim, **options)
    x = mu0 + torch.randn(dim, **options) + torch.randn(dim, **options)
    eye = torch.eye(dim, dtype=dtype, device=mu0.device)
    return RainforthProblem(
        x,
        mu0 + perturbation * torch.randn(dim, **options),
        eye / 2 + perturbation * torch.randn(dim, dim, **options),
        mu0 / 2 + perturbation * torch.randn(dim, **options),
    )


def _model(problem: RainforthProblem) -> LinearGaussian:
    dim = problem.x.shape[-1]
    return LinearGaussian(torch.eye(dim, dtype=problem.x.dtype, device=problem.x.device), None, 1.0)


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
    deviation; ``inference_mc`` uses the Monte Carlo mean (noisy when SNR·√n is small);
    ``inference_sd`` is the standard deviation of the inference gradient, averaged over
    coordinates.
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


def log_log_slope_weights(k_values) -> tuple[float, ...]:
    r"""The fixed weights c_j of the least-squares log-log slope: slope = Σ_j c_j log v_j.

    .. math::
        c_j = \frac{\log k_j - \overline{\log k}}{\sum_i (\log k_i - \overline{\log k})^2},
        \qquad \sum_j c_j = 0

    so a slope's variance is Σ_j c_j² Var(log v_j) when the v_j are estimated independently.
    """
    x = [math.log(k) for k in k_values]
    if len(x) < 2 or min(x) == max(x):
        raise ValueError(f"k_values must hold at least two distinct values, got {k_values!r}")
    mean = sum(x) / len(x)
    spread = sum((xi - mean) ** 2 for xi in x)
    return tuple((xi - mean) / spread for xi in x)


def log_log_slope(k_values, values) -> float:
    """Least-squares slope of log(values) against log(k)."""
    weights = log_log_slope_weights(k_values)
    return math.fsum(c * math.log(v) for c, v in zip(weights, values, strict=True))


# -- the expansion in 1/k ---------------------------------------------------------------------


class _Tilted(NamedTuple):
    """Per power a = 1…4 (rows) and coordinate d: p_d^a q_d^(1−a) = E_q[r_d^a] · N(π_d + t, v)."""

    log_moment: torch.Tensor  # log E_q[r_d^a], (4, D)
    offset: torch.Tensor  # t: the tilted mean minus the posterior mean π, (4, D)
    variance: torch.Tensor  # v, (4, D)
    posterior_mean: torch.Tensor  # π, (D,)
    posterior_precision: torch.Tensor  # Λ_d, (D,)

    def moment(self, a: int) -> torch.Tensor:
        """E_q[r^a] = Π_d E_q[r_d^a] (r = w/p(x) factorises over coordinates)."""
        return self.log_moment[a - 1].sum().exp()

    def central(self, a: int, j: int) -> torch.Tensor:
        """E[(z_d − π_d)^j] under the a-tilted Gaussian N(π_d + t, v), j = 1…4, shape (D,)."""
        t, v = self.offset[a - 1], self.variance[a - 1]
        return (t, t**2 + v, t**3 + 3 * t * v, t**4 + 6 * t**2 * v + 3 * v**2)[j - 1]


def _tilted(problem: RainforthProblem) -> _Tilted:
    r"""Closed forms of the tilted Gaussians, per coordinate.

    With q_d = N(m, σ²), p_d = N(π, s²) (the posterior) and precisions P = a/s², Q = (1−a)/σ²,
    λ = P + Q = a/s² − (a−1)/σ² (> 0 for every a here since σ² > s²):

    .. math::
        \log \mathbb E_q r_d^a = \log\int p_d^a q_d^{1-a}
            = -\tfrac12\big(a\log s^2 + (1-a)\log\sigma^2 + \log\lambda\big)
              - \tfrac12 \frac{PQ}{\lambda}(\pi - m)^2,

    tilted mean (Pπ + Qm)/λ = π + Q(m − π)/λ and variance 1/λ.
    """
    x = problem.x - problem.mu
    posterior = _model(problem).posterior(x)
    pi = posterior.loc
    s2 = posterior.covariance_matrix.diagonal()
    m = problem.x @ problem.a.mT + problem.b - problem.mu
    a = torch.arange(1, 5, dtype=pi.dtype, device=pi.device).unsqueeze(-1)
    p_prec = a / s2
    q_prec = (1 - a) / Q_VARIANCE
    lam = p_prec + q_prec
    log_moment = (
        -0.5 * (a * s2.log() + (1 - a) * math.log(Q_VARIANCE) + lam.log())
        - 0.5 * p_prec * q_prec / lam * (pi - m).square()
    )
    return _Tilted(log_moment, q_prec * (m - pi) / lam, 1 / lam, pi, 1 / s2)


def _gradient_parts(tilted: _Tilted, parameter: str):
    """(α, η) with g − η = α (z − π) for one draw of ∇_b (inference) or ∇_μ (generative).

    ∇_b log w = ∇_z log p(x, z) = −Λ (z − π), whose posterior mean is 0; ∇_μ log w = z − μ
    (z' in toyvae's coordinates), whose posterior mean is π.
    """
    if parameter == "inference":
        return -tilted.posterior_precision, torch.zeros_like(tilted.posterior_mean)
    if parameter == "generative":
        return torch.ones_like(tilted.posterior_mean), tilted.posterior_mean
    raise ValueError(f"parameter must be 'inference' or 'generative', got {parameter!r}")


class GradientExpansion(NamedTuple):
    """E and Var of one draw of ∇ IWAE_k per coordinate, each (D,), with their leading terms."""

    mean: torch.Tensor  # to O(1/k²)
    variance: torch.Tensor  # to O(1/k²)
    leading_mean: torch.Tensor  # η − c_UR/k
    leading_variance: torch.Tensor  # c_UU/k


def iwae_gradient_expansion(problem: RainforthProblem, k, parameter: str) -> GradientExpansion:
    r"""Mean and variance of ∇_b (``"inference"``) or ∇_μ (``"generative"``) IWAE_k, in 1/k.

    .. math::
        \mathbb E T = \eta - \frac{c_{UR}}{k} + \frac{c_{URR} - 3c_{UR}c_{RR}}{k^2},\qquad
        \operatorname{Var} T = \frac{c_{UU}}{k}
            + \frac{3c_{UU}c_{RR} + 5c_{UR}^2 - 2c_{UUR}}{k^2},

    both up to O(k⁻³), where U = α r (z − π), ρ = r − 1 and, from the tilted moments,
    c_RR = E r² − 1, c_UR = α E[r²] t₂, c_URR = α (E[r³] t₃ − 2 E[r²] t₂),
    c_UU = α² E[r²]·(t₂² + v₂), c_UUR = α² (E[r³]·(t₃² + v₃) − E[r²]·(t₂² + v₂)).
    The leading mean term −c_UR/k of the inference gradient is −∇_b χ²/(2k)
    (:func:`asymptotic_inference_gradient`).

    The expansion is of T − η = Ū/(1 + ρ̄) in the means Ū, ρ̄ of k i.i.d. copies:
    E[Ūρ̄] = c_UR/k, E[Ūρ̄²] = c_URR/k², E[Ūρ̄³] = 3c_UR c_RR/k², E[Ū²] = c_UU/k,
    E[Ū²ρ̄] = c_UUR/k², E[Ū²ρ̄²] = (c_UU c_RR + 2c_UR²)/k², each + O(k⁻³).
    """
    k = check_count(k, "k")
    tilted = _tilted(problem)
    alpha, eta = _gradient_parts(tilted, parameter)
    r2, r3 = tilted.moment(2), tilted.moment(3)
    c_rr = r2 - 1
    c_ur = alpha * r2 * tilted.central(2, 1)
    c_urr = alpha * (r3 * tilted.central(3, 1) - 2 * r2 * tilted.central(2, 1))
    c_uu = alpha**2 * r2 * tilted.central(2, 2)
    c_uur = alpha**2 * (r3 * tilted.central(3, 2) - r2 * tilted.central(2, 2))
    leading_mean = eta - c_ur / k
    leading_variance = c_uu / k
    return GradientExpansion(
        leading_mean + (c_urr - 3 * c_ur * c_rr) / k**2,
        leading_variance + (3 * c_uu * c_rr + 5 * c_ur**2 - 2 * c_uur) / k**2,
        leading_mean,
        leading_variance,
    )


def predicted_snr(problem: RainforthProblem, k_values, *, leading=False) -> SNRTable:
    """The SNRTable that :func:`gradient_snr` estimates, to first order in 1/k.

    Each entry is the table's formula with the expansion's mean and standard deviation in place
    of the Monte Carlo ones (to O(1/k²) in both, so the SNRs are right to relative O(1/k²);
    with ``leading=True``, only the leading terms, right to relative O(1/k)):
    ``inference`` keeps the table's leading mean −∇χ²/(2k); ``inference_mc`` is the true
    |E ĝ|/sd, which the table's noisy Monte Carlo column estimates.
    """
    columns = ([], [], [], [])
    for k in k_values:
        b = iwae_gradient_expansion(problem, k, "inference")
        mu = iwae_gradient_expansion(problem, k, "generative")
        sd_b = (b.leading_variance if leading else b.variance).sqrt()
        sd_mu = (mu.leading_variance if leading else mu.variance).sqrt()
        mean_mu = mu.leading_mean if leading else mu.mean
        columns[0].append((b.leading_mean.abs() / sd_b).mean().item())
        columns[1].append(((b.leading_mean if leading else b.mean).abs() / sd_b).mean().item())
        columns[2].append((mean_mu.abs() / sd_mu).mean().item())
        columns[3].append(sd_b.mean().item())
    return SNRTable(tuple(k_values), *(tuple(c) for c in columns))


class SNRLogVariance(NamedTuple):
    """Sampling variance of log of :class:`SNRTable` entries at one k (n replicates)."""

    inference: float
    generative: float
    inference_sd: float


def _u_moments(tilted: _Tilted, parameter: str):
    """E[U_d U_e], E[U_d U_e²], E[U_d² U_e²] for U = α r (z − π): (D, D) each.

    Under the a-tilted density the coordinates are independent, so for d ≠ e the moment is
    E[r^a] times a product of one-coordinate Gaussian moments.
    """
    alpha, _ = _gradient_parts(tilted, parameter)
    diagonal = torch.eye(alpha.shape[-1], dtype=torch.bool, device=alpha.device)

    def joint(a, j_d, j_e):
        cross = torch.outer(tilted.central(a, j_d), tilted.central(a, j_e))
        same = torch.diag(tilted.central(a, j_d + j_e))
        scale = torch.outer(alpha**j_d, alpha**j_e)
        return tilted.moment(a) * scale * torch.where(diagonal, same, cross)

    return joint(2, 1, 1), joint(3, 1, 2), joint(4, 2, 2)


def snr_log_variance(problem: RainforthProblem, k, num_replicates) -> SNRLogVariance:
    r"""Delta-method variance of log SNR (and log sd) as :func:`gradient_snr` estimates them.

    To leading order in 1/k a draw T is η + Ū, the mean of k i.i.d. U = α r (z − π)
    (:func:`iwae_gradient_expansion`), so with C = E[UUᵀ], M₃ = E[U_d U_e²], M₄ = E[U_d² U_e²]:

    .. math::
        \Sigma = C/k,\quad \mathbb E[X_d X_e^2] = M_3/k^2,\quad
        \mathbb E[X_d^2X_e^2] = \frac{C_{dd}C_{ee} + 2C_{de}^2}{k^2}
            + \frac{M_4 - C_{dd}C_{ee} - 2C_{de}^2}{k^3}

    (X = T − E T; the k⁻³ term is the fourth cumulant of Ū). From n replicates,
    Cov(m̂_d, m̂_e) = Σ_de/n, Cov(m̂_d, ŝ_e²) = E[X_d X_e²]/n,
    Cov(ŝ_d², ŝ_e²) = (E[X_d² X_e²] − Σ_dd Σ_ee)/n, and

    .. math::
        \delta\log\overline{\mathrm{SNR}} = \sum_d \omega_d\Big(\frac{\delta\hat m_d}{m_d}
            - \frac{\delta\hat s_d^2}{2\Sigma_{dd}}\Big),\qquad
        \omega_d = \frac{\mathrm{SNR}_d}{\sum_e \mathrm{SNR}_e}

    (no δm̂ term for ``inference``, whose mean is the exact −∇χ²/(2k); for ``inference_sd``
    ω_d ∝ s_d). Relative errors: O(1/k) from the expansion (the self-normalisation terms of the
    fourth moment at order k⁻³ are left out; on the default problem at k = 64…1024 the
    result exceeds the measured spread of the slopes by 10–35%) and O(1/n).
    """
    k = check_count(k, "k")
    n = check_count(num_replicates, "num_replicates")
    tilted = _tilted(problem)

    def covariances(parameter):
        c, m3, m4 = _u_moments(tilted, parameter)
        cd = c.diagonal()
        outer = torch.outer(cd, cd)
        fourth = (outer + 2 * c**2) / k**2 + (m4 - outer - 2 * c**2) / k**3
        cov_ss = (fourth - outer / k**2) / n  # Cov(ŝ_d², ŝ_e²)
        return c / k / n, m3 / k**2 / n, cov_ss, cd / k  # …, Cov(m̂, ŝ²), …, Σ_dd

    def variance(parameter, on_mean, on_sd):
        cov_mm, cov_ms, cov_ss, _ = covariances(parameter)
        quadratic = on_mean @ cov_mm @ on_mean + 2 * on_mean @ cov_ms @ on_sd
        return (quadratic + on_sd @ cov_ss @ on_sd).item()

    def snr_weights(parameter):
        sigma = covariances(parameter)[3]
        mean = iwae_gradient_expansion(problem, k, parameter).leading_mean
        snr = mean.abs() / sigma.sqrt()
        return snr / snr.sum(), mean, sigma

    weight, _, sigma = snr_weights("inference")
    inference = variance("inference", torch.zeros_like(sigma), -weight / (2 * sigma))
    sd = sigma.sqrt()
    inference_sd = variance("inference", torch.zeros_like(sigma), sd / sd.sum() / (2 * sigma))
    weight, mean, sigma = snr_weights("generative")
    generative = variance("generative", weight / mean, -weight / (2 * sigma))
    return SNRLogVariance(inference, generative, inference_sd)


def plot_snr(table: SNRTable, path) -> None:
    """Log-log plot of both SNRs against k with k^(±1/2) guides (needs matplotlib).

    Drawn on a standalone ``Figure`` (no pyplot): matplotlib's global backend and figure
    registry are left as they were.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
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
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: reruns identical


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
