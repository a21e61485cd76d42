r"""Annealed importance sampling and bidirectional Monte Carlo, with their exact limits.

The geometric path from the prior to the posterior,

    π_β(z) ∝ p(z) p_θ(x|z)^β,    0 = β_0 < β_1 < … < β_T = 1,    Z_β = ∫ p(z) p_θ(x|z)^β dz,

has Z_0 = 1 and Z_1 = p_θ(x). With ℓ(z) = log p_θ(x|z) = log p_θ(x, z) − log p(z):

- **forward AIS** (Neal, 2001) draws z_0 ~ p(z), moves z_{t−1} → z_t by a transition that
  leaves π_{β_t} invariant (here :mod:`toyvae.hmc`), and weighs log w = Σ_t (β_t − β_{t−1})
  ℓ(z_{t−1}). E w = p_θ(x), so E log w ≤ log p_θ(x): a stochastic lower bound;
- **reverse AIS** starts from an exact posterior draw (on data simulated from the model, the
  latent that generated it) and runs the path backwards; its log weight
  log r = −Σ_t (β_t − β_{t−1}) ℓ(z_{t−1}) has E r = 1/p_θ(x), so E[−log r] ≥ log p_θ(x):
  a stochastic upper bound. Together they are bidirectional Monte Carlo (Grosse,
  Ghahramani and Adams, 2015), a sandwich around log p_θ(x).

For a conjugate model every π_β is Gaussian (ℓ is a quadratic in z), known exactly from the
interface: its precision is (1 − β)P₀⁻¹ + βΛ, P₀ the prior's and Λ the posterior's covariance
inverse (:func:`tempered`). With *perfect* transitions (exact draws from each π_β) the
expected log weights are Riemann sums of the thermodynamic integral
log p_θ(x) = ∫₀¹ E_{π_β} ℓ dβ, whose integrand increases in β (its derivative is Var_{π_β} ℓ):

    Σ_t Δβ_t E_{π_{β_{t−1}}} ℓ  ≤  log p_θ(x)  ≤  Σ_t Δβ_t E_{π_{β_t}} ℓ,

the left and right sums (:func:`thermodynamic_bounds`). For T equal steps the width is exactly
(E_{π_1} ℓ − E_{π_0} ℓ)/T. Real transitions mix imperfectly, and the sandwich is wider.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from toyvae._checks import check_count, describe
from toyvae.gaussians import Gaussian
from toyvae.hmc import HMCKernel, hmc_step, init_state
from toyvae.interface import batch_shape, check_model, for_data

__all__ = [
    "AISRun",
    "Bounds",
    "forward_ais",
    "linear_schedule",
    "reverse_ais",
    "tempered",
    "thermodynamic_bounds",
]


class AISRun(NamedTuple):
    """Independent AIS chains, forward or reverse.

    Attributes
    ----------
    bounds : tensor
        (chains, *batch): one stochastic bound on log p_θ(x) per chain: log w for forward AIS
        (a lower bound in expectation), −log r for reverse AIS (an upper bound).
    log_evidence : tensor
        (*batch,): the estimate from all chains together: log mean w (forward; E of its
        exponential is p_θ(x)) or −log mean r (reverse).
    acceptance_rate : tensor
        (*batch,): the HMC transitions' mean acceptance rate.
    evaluations : int
        Evaluations of log p_θ(x, z) per chain, with or without its gradient: T for the weights
        and (num_steps + 1) for each of the T − 1 transitions.
    """

    bounds: torch.Tensor
    log_evidence: torch.Tensor
    acceptance_rate: torch.Tensor
    evaluations: int


class Bounds(NamedTuple):
    """Exact expected AIS log weights with perfect transitions.

    Attributes
    ----------
    lower : tensor
        Σ_t Δβ_t E_{π_{β_{t−1}}} ℓ: the expected forward log weight, ≤ log p_θ(x).
    upper : tensor
        Σ_t Δβ_t E_{π_{β_t}} ℓ: the expected reverse bound, ≥ log p_θ(x).
    lower_variance, upper_variance : tensor
        The exact variances of one chain's log weight (independent draws per temperature).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    lower_variance: torch.Tensor
    upper_variance: torch.Tensor


def linear_schedule(num_steps: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """β_t = t/T for t = 0, …, T: T + 1 inverse temperatures from 0 to 1."""
    num_steps = check_count(num_steps, "num_steps", why=" (the number of annealing steps T)")
    return torch.linspace(0, 1, num_steps + 1, dtype=dtype, device=device)


def _check_betas(betas, model) -> torch.Tensor:
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-d tensor of ≥ 2 values, got {describe(betas)}")
    betas = betas.to(dtype=model.dtype, device=model.device)
    if betas[0] != 0 or betas[-1] != 1 or not bool((betas.diff() > 0).all()):
        raise ValueError(f"betas must increase strictly from 0 to 1, got {betas.tolist()}")
    return betas


def _setup(model, x, betas):
    model = check_model(for_data(model, x))
    x = model.check_data(x)
    return model, x, _check_betas(betas, model)


def _densities(model, x):
    prior = model.prior()

    def log_likelihood(z):
        return model.log_joint(x, z) - prior.log_prob(z)

    def tempered_density(beta):
        return lambda z: prior.log_prob(z) + beta * log_likelihood(z)

    return prior, log_likelihood, tempered_density


def _check_kernel(kernel) -> None:
    if not isinstance(kernel, HMCKernel):
        raise TypeError(f"kernel must be a toyvae.hmc.HMCKernel, got {describe(kernel)}")


def forward_ais(model, x, num_chains, betas, kernel, *, generator=None) -> AISRun:
    r"""Forward AIS from the prior to p_θ(z|x): one stochastic lower bound per chain.

    .. math::
        \log w = \sum_{t=1}^T (\beta_t - \beta_{t-1})\, \log p_\theta(x \mid z_{t-1}),\qquad
        z_0 \sim p(z),\; z_t \sim T_t(z_{t-1}, \cdot)

    with T_t ``kernel``'s HMC transition on π_{β_t}. E w = p_θ(x) and E log w ≤ log p_θ(x).
    """
    model, x, betas = _setup(model, x, betas)
    num_chains = check_count(num_chains, "num_chains")
    _check_kernel(kernel)
    prior, log_likelihood, tempered_density = _densities(model, x)
    shape = (num_chains, *batch_shape(model, x))
    noise = torch.randn(
        (*shape, model.latent_dim), generator=generator, dtype=model.dtype, device=model.device
    )
    z = prior.loc + (prior.scale_tril @ noise.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        log_w = torch.zeros(shape, dtype=model.dtype, device=model.device)
    accepted = torch.zeros(shape, dtype=model.dtype, device=model.device)
    steps = len(betas) - 1
    for t in range(1, steps + 1):
        with torch.no_grad():
            log_w = log_w + (betas[t] - betas[t - 1]) * log_likelihood(z)
        if t < steps:
            target = tempered_density(betas[t])
            state = init_state(target, z, generator=generator)
            state, step_accepted = hmc_step(kernel, target, state, generator=generator)
            z, accepted = state.position, accepted + step_accepted.to(accepted.dtype)
    estimate = log_w.logsumexp(0) - math.log(num_chains)
    rate = accepted.mean(0) / max(steps - 1, 1)
    return AISRun(log_w, estimate, rate, steps + (steps - 1) * (kernel.num_steps + 1))


def reverse_ais(model, x, initial, betas, kernel, *, generator=None) -> AISRun:
    r"""Reverse AIS from exact posterior draws ``initial`` (chains, *batch, K): upper bounds.

    .. math::
        -\log r = \sum_{t=1}^T (\beta_t - \beta_{t-1})\, \log p_\theta(x \mid z_{t-1}),\qquad
        z_{T-1} \sim p_\theta(z \mid x),\; z_{t-1} \sim T_t(z_t, \cdot)

    E r = 1/p_θ(x), so E[−log r] ≥ log p_θ(x). On data simulated from the model, the latent
    that generated each x is an exact posterior draw (Grosse et al., 2015).
    """
    model, x, betas = _setup(model, x, betas)
    _check_kernel(kernel)
    shape = (*batch_shape(model, x), model.latent_dim)
    if not isinstance(initial, torch.Tensor) or initial.ndim != len(shape) + 1:
        raise ValueError(
            f"initial must be exact posterior draws of shape (chains, *batch, K) with "
            f"(*batch, K) = {shape}, got {describe(initial)}"
        )
    if tuple(initial.shape[1:]) != shape:
        raise ValueError(
            f"initial must have shape (chains, *batch, K) with (*batch, K) = {shape}, got "
            f"{describe(initial)}"
        )
    _, log_likelihood, tempered_density = _densities(model, x)
    z = initial.to(dtype=model.dtype, device=model.device)
    steps = len(betas) - 1
    with torch.no_grad():
        bound = (betas[steps] - betas[steps - 1]) * log_likelihood(z)
    accepted = torch.zeros(initial.shape[:-1], dtype=model.dtype, device=model.device)
    for t in range(steps - 1, 0, -1):
        target = tempered_density(betas[t])
        state = init_state(target, z, generator=generator)
        state, step_accepted = hmc_step(kernel, target, state, generator=generator)
        z, accepted = state.position, accepted + step_accepted.to(accepted.dtype)
        with torch.no_grad():
            bound = bound + (betas[t] - betas[t - 1]) * log_likelihood(z)
    chains = initial.shape[0]
    estimate = -((-bound).logsumexp(0) - math.log(chains))
    rate = accepted.mean(0) / max(steps - 1, 1)
    return AISRun(bound, estimate, rate, steps + (steps - 1) * (kernel.num_steps + 1))


# -- exact answers: the tempered posteriors and the perfect-transition sandwich ----------------


class _Quadratic(NamedTuple):
    """ℓ(z) = log p(x|z) as −½ zᵀAz + bᵀz + c, and the prior's precision and shift."""

    curvature: torch.Tensor  # A = Λ − P₀⁻¹, (*batch, K, K)
    shift: torch.Tensor  # b = Λμ − P₀⁻¹m₀, (*batch, K)
    prior_precision: torch.Tensor  # P₀⁻¹
    prior_shift: torch.Tensor  # P₀⁻¹ m₀
    log_evidence: torch.Tensor
    posterior: Gaussian
    prior: Gaussian


def _precision(tril: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
    inverse = torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)
    return inverse.mT @ inverse


def _quadratic(model, x) -> _Quadratic:
    exact = model.exact(x)
    prior = model.prior()
    prior_g = Gaussian(prior.loc, prior.scale_tril)
    posterior_precision = _precision(exact.posterior.scale_tril)
    prior_precision = _precision(prior_g.scale_tril)
    shift = (posterior_precision @ exact.posterior.loc.unsqueeze(-1)).squeeze(-1)
    prior_shift = (prior_precision @ prior_g.loc.unsqueeze(-1)).squeeze(-1)
    return _Quadratic(
        posterior_precision - prior_precision,
        shift - prior_shift,
        prior_precision,
        prior_shift,
        exact.log_evidence,
        exact.posterior,
        prior_g,
    )


def _tempered(q: _Quadratic, beta) -> Gaussian:
    precision = q.prior_precision + beta * q.curvature
    tril = torch.linalg.cholesky(precision)  # precision = R Rᵀ, covariance = R⁻ᵀ R⁻¹
    eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
    inverse = torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)
    covariance_tril = torch.linalg.cholesky(inverse.mT @ inverse)
    shift = q.prior_shift + beta * q.shift
    loc = torch.cholesky_solve(shift.unsqueeze(-1), tril).squeeze(-1)
    return Gaussian(loc, covariance_tril)


def tempered(model, x, beta) -> Gaussian:
    r"""π_β(z) ∝ p(z) p_θ(x|z)^β exactly, as a canonical :class:`~toyvae.gaussians.Gaussian`.

    .. math::
        \pi_\beta = \mathcal N\big(m_\beta, \Lambda_\beta^{-1}\big),\qquad
        \Lambda_\beta = (1-\beta) P_0^{-1} + \beta\Lambda,\quad
        \Lambda_\beta m_\beta = (1-\beta) P_0^{-1} m_0 + \beta \Lambda \mu

    from the prior N(m₀, P₀) and the exact posterior N(μ, Λ⁻¹): the prior at β = 0, the
    posterior at β = 1.
    """
    model = check_model(for_data(model, x))
    x = model.check_data(x)
    if not (isinstance(beta, int | float) and 0 <= beta <= 1):
        raise ValueError(f"beta must be a number in [0, 1], got {describe(beta)}")
    return _tempered(_quadratic(model, x), beta)


def _moments_of_log_likelihood(q: _Quadratic, g: Gaussian):
    """E and Var of ℓ(z) − log p(x) + … under g: ℓ up to its constant, which cancels."""
    cov = g.scale_tril @ g.scale_tril.mT
    m = g.loc.unsqueeze(-1)
    a = q.curvature
    linear = q.shift.unsqueeze(-1) - a @ m  # gradient of ℓ at the mean
    mean = (-0.5 * (m.mT @ a @ m) + q.shift.unsqueeze(-1).mT @ m).squeeze((-2, -1))
    mean = mean - 0.5 * (a * cov).sum((-2, -1))
    ac = a @ cov
    variance = (linear.mT @ cov @ linear).squeeze((-2, -1)) + 0.5 * (ac * ac.mT).sum((-2, -1))
    return mean, variance


def thermodynamic_bounds(model, x, betas) -> Bounds:
    r"""The AIS sandwich with perfect transitions: left and right Riemann sums, exactly.

    .. math::
        \sum_{t=1}^T \Delta\beta_t\, \mathbb E_{\pi_{\beta_{t-1}}}\ell
        \;\le\; \log p_\theta(x) = \int_0^1 \mathbb E_{\pi_\beta}\ell\, d\beta
        \;\le\; \sum_{t=1}^T \Delta\beta_t\, \mathbb E_{\pi_{\beta_t}}\ell

    ℓ(z) = log p_θ(x|z) = log p_θ(x) + log p_θ(z|x) − log p(z) is a quadratic in z, so each
    expectation and variance under the Gaussian π_β is closed-form (the variance of a quadratic
    form: bᵀΣb + ½ tr((AΣ)²)). The variances are those of one chain's log weight when each
    temperature gets an independent exact draw.
    """
    model, x, betas = _setup(model, x, betas)
    q = _quadratic(model, x)
    # ℓ's constant: ℓ(μ) = log p(x) + log N(μ; μ, Σ) − log N(μ; m₀, P₀) at the posterior mean.
    post, prior = q.posterior, q.prior
    k = post.loc.shape[-1]
    log_post_at_mean = -0.5 * (k * math.log(2 * math.pi)) - 0.5 * post.log_det_cov()
    residual = torch.linalg.solve_triangular(
        prior.scale_tril, (post.loc - prior.loc).unsqueeze(-1), upper=False
    ).squeeze(-1)
    log_prior_at_mean = (
        -0.5 * (k * math.log(2 * math.pi))
        - 0.5 * prior.log_det_cov()
        - 0.5 * residual.square().sum(-1)
    )
    mu = post.loc.unsqueeze(-1)
    quadratic_at_mean = (-0.5 * (mu.mT @ q.curvature @ mu) + q.shift.unsqueeze(-1).mT @ mu).squeeze(
        (-2, -1)
    )
    constant = q.log_evidence + log_post_at_mean - log_prior_at_mean - quadratic_at_mean
    means, variances = [], []
    for beta in betas.tolist():
        mean, variance = _moments_of_log_likelihood(q, _tempered(q, beta))
        means.append(mean + constant)
        variances.append(variance)
    means, variances = torch.stack(means), torch.stack(variances)
    steps = betas.diff().reshape(-1, *([1] * (means.ndim - 1)))
    return Bounds(
        (steps * means[:-1]).sum(0),
        (steps * means[1:]).sum(0),
        (steps.square() * variances[:-1]).sum(0),
        (steps.square() * variances[1:]).sum(0),
    )
