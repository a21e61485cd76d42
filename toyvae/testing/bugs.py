r"""Planted bugs: ELBO and IWAE estimators as people write them, each next to a correct twin.

Every function has the signature of :func:`toyvae.testing.check_elbo_estimator`'s
``estimator``: ``(x, encoder, decoder, generator) -> estimate``, and works with any encoder
that has ``encode(x) -> (mean, logvar)`` and returns a diagonal Gaussian, and any decoder with
``decode(z) -> (mean, logvar)`` and a Gaussian likelihood (the modules of
:mod:`toyvae.testing.vae`). :data:`CATALOG` pairs each bug with its correct twin and with the
options (k, loss, reduction) under which both are to be checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal

from toyvae.gaussians import LOG_2PI

__all__ = ["CATALOG", "PlantedBug"]


def _noise(like: torch.Tensor, generator, *shape: int) -> torch.Tensor:
    """Standard normal noise of shape (*shape, *like.shape), from ``generator``."""
    return torch.randn(
        *shape, *like.shape, generator=generator, dtype=like.dtype, device=like.device
    )


def _prior(z: torch.Tensor) -> Independent:
    return Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1)


def _log_normal(x, mean, logvar):
    """Elementwise log N(x; mean, exp(logvar)), written out."""
    return -0.5 * (LOG_2PI + logvar + (x - mean).square() / logvar.exp())


# -- 1. Everything by torch.distributions log_prob ------------------------------------------------


def elbo_log_prob(x, encoder, decoder, generator):
    """Single-sample ELBO: log p(x|z) + log p(z) − log q(z|x) at z = μ + σ ε, summed over x."""
    q = encoder(x)
    z = q.mean + q.stddev * _noise(q.mean, generator)
    return (decoder(z).log_prob(x) + _prior(z).log_prob(z) - q.log_prob(z)).sum()


def no_reparameterisation(x, encoder, decoder, generator):
    """BUG: z = q.sample() is cut off from the encoder: the right value, no encoder gradient."""
    q = encoder(x)
    z = q.sample()
    return (decoder(z).log_prob(x) + _prior(z).log_prob(z) - q.log_prob(z)).sum()


# -- 2. Monte Carlo reconstruction, closed-form KL of a diagonal Gaussian -----------------------


def elbo_analytic_kl(x, encoder, decoder, generator):
    """E_q log p(x|z) by one sample, minus KL(q ‖ N(0, I)) = ½ Σ (σ² + μ² − 1 − log σ²)."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return (reconstruction - kl).sum()


def kl_wrong_sign(x, encoder, decoder, generator):
    """BUG: reconstruction + KL instead of reconstruction − KL."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return (reconstruction + kl).sum()


def kl_missing_log_det(x, encoder, decoder, generator):
    """BUG: the diagonal Gaussian's KL without its log-determinant term −log σ²."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1).sum(-1)
    return (reconstruction - kl).sum()


def kl_averaged_over_latents(x, encoder, decoder, generator):
    """BUG: reconstruction summed over the D data dimensions, KL averaged over the K latents."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).mean(-1)
    return (reconstruction - kl).sum()


def reconstruction_averaged_over_data(x, encoder, decoder, generator):
    """BUG: reconstruction averaged over the D data dimensions (as MSE does), KL summed."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).mean(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return (reconstruction - kl).sum()


# -- 3. The same as a loss, averaged over the batch ---------------------------------------------


def loss_batch_mean(x, encoder, decoder, generator):
    """The loss −ELBO, averaged over the batch in both terms."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return -reconstruction.mean() + kl.mean()


def loss_batch_mean_and_sum(x, encoder, decoder, generator):
    """BUG: the reconstruction term averaged over the batch, the KL summed over it."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return -reconstruction.mean() + kl.sum()


# -- 4. Gaussian log-densities written out by hand ----------------------------------------------


def elbo_by_hand(x, encoder, decoder, generator):
    """log N written out: −½ (log 2π + log σ² + (x − μ)²/σ²), for p(x|z), p(z) and q(z|x)."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    log_px = _log_normal(x, x_mean, x_logvar).sum(-1)
    log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    log_qz = -0.5 * (LOG_2PI + logvar + (z - mean).square() / logvar.exp()).sum(-1)
    return (log_px + log_pz - log_qz).sum()


def log_variance_as_variance(x, encoder, decoder, generator):
    """BUG: in log q(z|x) the log-variance stands where the variance should: (z − μ)²/log σ²."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    log_px = _log_normal(x, x_mean, x_logvar).sum(-1)
    log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    log_qz = -0.5 * (LOG_2PI + logvar + (z - mean).square() / logvar).sum(-1)
    return (log_px + log_pz - log_qz).sum()


def missing_half(x, encoder, decoder, generator):
    """BUG: log N(x; μ, σ²) = −½ (log 2π + log σ²) − (x − μ)²/σ²: the ½ missing on the square."""

    def log_normal(value, mean, logvar):
        return -0.5 * (LOG_2PI + logvar) - (value - mean).square() / logvar.exp()

    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    log_px = log_normal(x, x_mean, x_logvar).sum(-1)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    log_qz = log_normal(z, mean, logvar).sum(-1)
    return (log_px + log_pz - log_qz).sum()


def dropped_log_2pi(x, encoder, decoder, generator):
    """BUG: log N without −½ log 2π. Fine for training (same gradient), not next to log p(x)."""

    def log_normal(value, mean, logvar):
        return -0.5 * (logvar + (value - mean).square() / logvar.exp())

    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    log_px = log_normal(x, x_mean, x_logvar).sum(-1)
    log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
    log_qz = log_normal(z, mean, logvar).sum(-1)
    return (log_px + log_pz - log_qz).sum()


# -- 5. The three most common causes, and variances used as standard deviations ----------------


def _reconstruction_and_kl(x, encoder, decoder, generator):
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum()
    return x_mean, x_logvar, kl


def loss_gaussian_nll_full(x, encoder, decoder, generator):
    """The loss −ELBO with torch's gaussian_nll_loss(full=True, reduction="sum") + KL."""
    x_mean, x_logvar, kl = _reconstruction_and_kl(x, encoder, decoder, generator)
    return F.gaussian_nll_loss(x_mean, x, x_logvar.exp(), full=True, reduction="sum") + kl


def loss_gaussian_nll_default(x, encoder, decoder, generator):
    """BUG: gaussian_nll_loss's default full=False drops ½ log 2π per element: N·D·½ log 2π."""
    x_mean, x_logvar, kl = _reconstruction_and_kl(x, encoder, decoder, generator)
    return F.gaussian_nll_loss(x_mean, x, x_logvar.exp(), reduction="sum") + kl


def loss_sum(x, encoder, decoder, generator):
    """The loss −ELBO, summed over the batch (sampled reconstruction, closed-form KL)."""
    return -elbo_analytic_kl(x, encoder, decoder, generator)


def elbo_batch_mean(x, encoder, decoder, generator):
    """BUG when checked as a sum: the ELBO averaged over the batch is 1/N times the sum."""
    return elbo_analytic_kl(x, encoder, decoder, generator) / x.shape[0]


def likelihood_variance_as_scale(x, encoder, decoder, generator):
    """BUG: Normal(mean, variance) for p(x|z): torch's Normal takes a standard deviation."""
    mean, logvar = encoder.encode(x)
    z = mean + (0.5 * logvar).exp() * _noise(mean, generator)
    x_mean, x_logvar = decoder.decode(z)
    reconstruction = Normal(x_mean, x_logvar.exp()).log_prob(x).sum(-1)
    kl = 0.5 * (logvar.exp() + mean.square() - 1 - logvar).sum(-1)
    return (reconstruction - kl).sum()


def q_variance_as_scale(x, encoder, decoder, generator):
    """BUG: q = Normal(mean, variance), sampled and scored: q's standard deviation becomes σ²."""
    mean, logvar = encoder.encode(x)
    q = Independent(Normal(mean, logvar.exp()), 1)
    z = q.mean + q.stddev * _noise(mean, generator)
    return (decoder(z).log_prob(x) + _prior(z).log_prob(z) - q.log_prob(z)).sum()


# -- 6. IWAE_k ------------------------------------------------------------------------------------

IWAE_K = 5


def _log_weights(x, encoder, decoder, generator, k):
    """log w_i = log p(x, z_i) − log q(z_i|x) for k reparameterised z_i: shape (k, N)."""
    q = encoder(x)
    z = q.mean + q.stddev * _noise(q.mean, generator, k)
    return decoder(z).log_prob(x) + _prior(z).log_prob(z) - q.log_prob(z)


def iwae(x, encoder, decoder, generator, k=IWAE_K):
    """IWAE_k: log (1/k) Σ_i w_i = logsumexp_i log w_i − log k, summed over x."""
    log_w = _log_weights(x, encoder, decoder, generator, k)
    return (torch.logsumexp(log_w, 0) - math.log(k)).sum()


def iwae_mean_of_log_weights(x, encoder, decoder, generator, k=IWAE_K):
    """BUG: (1/k) Σ_i log w_i, the mean of the log weights (a k-sample ELBO), not log-mean-w."""
    log_w = _log_weights(x, encoder, decoder, generator, k)
    return log_w.mean(0).sum()


def iwae_missing_log_k(x, encoder, decoder, generator, k=IWAE_K):
    """BUG: logsumexp_i log w_i without the − log k: log of the sum, not of the mean."""
    log_w = _log_weights(x, encoder, decoder, generator, k)
    return torch.logsumexp(log_w, 0).sum()


# -- The catalog ----------------------------------------------------------------------------------


class PlantedBug(NamedTuple):
    """A buggy estimator, its correct twin, and the checker options both are meant for.

    Attributes
    ----------
    name : str
        The bug's name.
    buggy, correct : callable
        Estimators ``(x, encoder, decoder, generator) -> estimate``.
    options : dict
        Keyword arguments of :func:`~toyvae.testing.check_elbo_estimator` (k, loss, reduction).
    diagnosis : str
        The name of the explanation the checker should give (:mod:`toyvae.testing.diagnose`).
    """

    name: str
    buggy: Callable
    correct: Callable
    options: dict
    diagnosis: str = ""


CATALOG: tuple[PlantedBug, ...] = (
    PlantedBug("kl_wrong_sign", kl_wrong_sign, elbo_analytic_kl, {}, "kl_sign"),
    PlantedBug(
        "log_variance_as_variance",
        log_variance_as_variance,
        elbo_by_hand,
        {},
        "log_variance_as_variance",
    ),
    PlantedBug("missing_half", missing_half, elbo_by_hand, {}, "missing_half"),
    PlantedBug("dropped_log_2pi", dropped_log_2pi, elbo_by_hand, {}, "dropped_log_2pi"),
    PlantedBug(
        "kl_averaged_over_latents",
        kl_averaged_over_latents,
        elbo_analytic_kl,
        {},
        "kl_averaged_over_latents",
    ),
    PlantedBug(
        "reconstruction_averaged_over_data",
        reconstruction_averaged_over_data,
        elbo_analytic_kl,
        {},
        "reconstruction_averaged_over_data",
    ),
    PlantedBug(
        "loss_batch_mean_and_sum",
        loss_batch_mean_and_sum,
        loss_batch_mean,
        {"loss": True, "reduction": "mean"},
        "mixed_reduction",
    ),
    PlantedBug(
        "iwae_mean_of_log_weights",
        iwae_mean_of_log_weights,
        iwae,
        {"k": IWAE_K},
        "iwae_mean_of_log_weights",
    ),
    PlantedBug("iwae_missing_log_k", iwae_missing_log_k, iwae, {"k": IWAE_K}, "iwae_missing_log_k"),
    PlantedBug(
        "no_reparameterisation", no_reparameterisation, elbo_log_prob, {}, "detached_sample"
    ),
    PlantedBug(
        "kl_missing_log_det", kl_missing_log_det, elbo_analytic_kl, {}, "kl_missing_log_det"
    ),
    PlantedBug(
        "gaussian_nll_loss_default",
        loss_gaussian_nll_default,
        loss_gaussian_nll_full,
        {"loss": True},
        "dropped_log_2pi",
    ),
    PlantedBug("batch_mean_checked_as_sum", elbo_batch_mean, elbo_analytic_kl, {}, "reduction"),
    PlantedBug("loss_sign_forgotten", elbo_analytic_kl, loss_sum, {"loss": True}, "sign"),
    PlantedBug(
        "likelihood_variance_as_scale",
        likelihood_variance_as_scale,
        elbo_analytic_kl,
        {},
        "variance_as_scale",
    ),
    PlantedBug("q_variance_as_scale", q_variance_as_scale, elbo_log_prob, {}, "variance_as_scale"),
)
