r"""ELBO ascent of a linear VAE, with the exact ELBO or its single-sample estimator.

:func:`fit_linear_vae` trains the linear VAE of Lucas et al. (2019), decoder
p_θ(x|z) = N(Wz + b, σ²I) and encoder q_φ(z|x) = N(Vx + c, L_S L_Sᵀ), and records the exact
average ELBO and log p(x) at every step, so that training can be compared with the
maximum-likelihood solution it should reach (:func:`toyvae.ppca.ppca_maximum_likelihood`).
Models and encoders are immutable: each step builds both afresh from the current parameters.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from toyvae._checks import describe
from toyvae.bounds import elbo
from toyvae.encoder import LinearGaussianEncoder
from toyvae.estimators import log_weights
from toyvae.model import LinearGaussian
from toyvae.ppca import _check_data_set, _check_latent_dim, _check_scalar_variance

__all__ = ["Fit", "History", "fit_linear_vae"]


class History(NamedTuple):
    """Per-step averages over the data of exact quantities, whatever the training objective.

    Attributes
    ----------
    elbo : ndarray
        (1/N) Σ ELBO(x_n, q_φ(z|x_n)), one value before each step and one after the last.
    log_likelihood : ndarray
        (1/N) Σ log p_θ(x_n), at the same points.
    """

    elbo: np.ndarray
    log_likelihood: np.ndarray


class Fit(NamedTuple):
    """The result of :func:`fit_linear_vae`.

    Attributes
    ----------
    model : LinearGaussian
        The trained decoder p_θ, detached.
    encoder : LinearGaussianEncoder
        The trained encoder q_φ(z|x), detached.
    history : History
        The exact average ELBO and log p(x) during training.
    """

    model: LinearGaussian
    encoder: LinearGaussianEncoder
    history: History


class _LinearVAE(torch.nn.Module):
    """Decoder (W, b, log σ²) and encoder (V, c, L_S) as parameters; L_S diagonal or full.

    :meth:`model` and :meth:`encoder` build the immutable :class:`toyvae.LinearGaussian` and
    :class:`toyvae.encoder.LinearGaussianEncoder` from the current parameter values, sharing
    them (differentiably); call them again after every optimizer step.
    """

    def __init__(self, x, latent_dim, encoder, noise_variance, generator):
        super().__init__()
        d = x.shape[-1]
        options = {"dtype": x.dtype, "device": x.device}
        # Small random W breaks the rotation symmetry of W = 0, which is a saddle point.
        self.weight = torch.nn.Parameter(
            0.1 * torch.randn(d, latent_dim, generator=generator, **options)
        )
        self.bias = torch.nn.Parameter(x.mean(0).clone())
        log_noise = x.var(0).mean().log() if noise_variance is None else noise_variance.log()
        self.log_noise = torch.nn.Parameter(log_noise.clone(), requires_grad=noise_variance is None)
        self.encoder_weight = torch.nn.Parameter(torch.zeros(latent_dim, d, **options))
        self.encoder_bias = torch.nn.Parameter(torch.zeros(latent_dim, **options))
        self.log_scale = torch.nn.Parameter(torch.zeros(latent_dim, **options))
        self.full = encoder == "full"
        self.lower = torch.nn.Parameter(
            torch.zeros(latent_dim, latent_dim, **options), requires_grad=self.full
        )

    def model(self) -> LinearGaussian:
        return LinearGaussian(self.weight, self.bias, self.log_noise.exp())

    def scale_tril(self) -> torch.Tensor:
        strictly_lower = self.lower.tril(-1) if self.full else torch.zeros_like(self.lower)
        return strictly_lower + torch.diag(self.log_scale.exp())

    def encoder(self) -> LinearGaussianEncoder:
        return LinearGaussianEncoder(self.encoder_weight, self.encoder_bias, self.scale_tril())

    def detached(self) -> tuple[LinearGaussian, LinearGaussianEncoder]:
        """The model and encoder at the current values, as copies that no update can touch."""
        with torch.no_grad():
            model = LinearGaussian(
                self.weight.clone(), self.bias.clone(), self.log_noise.exp().clone()
            )
            encoder = LinearGaussianEncoder(
                self.encoder_weight.clone(), self.encoder_bias.clone(), self.scale_tril().clone()
            )
        return model, encoder


def _check_options(encoder, objective, steps, learning_rate) -> None:
    if encoder not in ("full", "diagonal"):
        raise ValueError(f"encoder must be 'full' or 'diagonal', got {encoder!r}")
    if objective not in ("exact", "single_sample"):
        raise ValueError(f"objective must be 'exact' or 'single_sample', got {objective!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {describe(steps)}")
    if not isinstance(learning_rate, int | float) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number, got {describe(learning_rate)}")


def fit_linear_vae(
    x,
    latent_dim: int,
    *,
    encoder: str = "full",
    objective: str = "exact",
    noise_variance=None,
    steps: int = 2000,
    learning_rate: float = 0.02,
    seed: int = 0,
    progress: bool | None = None,
) -> Fit:
    r"""Train a linear VAE on x (N, D) by full-batch ascent of the average ELBO.

    Decoder p_θ(x|z) = N(Wz + b, σ²I), encoder q_φ(z|x) = N(Vx + c, L_S L_Sᵀ) with L_S
    lower-triangular (``encoder="full"``) or diagonal (``"diagonal"``): the linear VAE of
    Lucas et al. (2019). Its global optimum is the probabilistic PCA ML solution
    (:func:`toyvae.ppca.ppca_maximum_likelihood`) with the exact posterior as encoder, up to
    a rotation for the full encoder; the diagonal encoder fixes the rotation in which the
    posterior is diagonal.

    Parameters
    ----------
    x : (N, D) tensor or array
    latent_dim : int
    encoder : {"full", "diagonal"}
    objective : {"exact", "single_sample"}
        The closed-form ELBO, maximised by L-BFGS (strong-Wolfe line search, one iteration per
        step), or its single-sample reparameterised estimator log p(x_n, z_n) − log q(z_n),
        z_n ~ q(z|x_n) (:func:`toyvae.log_weights` with one sample), one fresh draw per data
        point and step, maximised by Adam with the Robbins–Monro decay lr / √(1 + t/100) so
        that the gradient noise averages out.
    noise_variance : float, optional
        Hold σ² fixed at this value; learned (as log σ²) when ``None``.
    steps, learning_rate, seed :
        Number of steps, Adam's initial learning rate (single-sample objective only), and the
        seed of the initial W and of the draws.
    progress : bool, optional
        Show a tqdm progress bar; by default only when standard error is a terminal.

    Returns
    -------
    Fit
        The trained ``model`` and ``encoder`` (detached), and the ``history`` of the exact
        average ELBO and log p(x) before each step and after the last (``steps + 1`` values).

    Notes
    -----
    No global state is touched: torch's thread counts and random generator stay as they were
    (the draws come from a generator seeded with ``seed``).
    """
    x = _check_data_set(x)
    k = _check_latent_dim(latent_dim, x.shape[-1])
    _check_options(encoder, objective, steps, learning_rate)
    if noise_variance is not None:
        noise_variance = _check_scalar_variance(noise_variance, like=x)
    if progress is None:
        progress = sys.stderr.isatty()

    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    vae = _LinearVAE(x, k, encoder, noise_variance, generator)
    parameters = [p for p in vae.parameters() if p.requires_grad]
    if objective == "exact":
        # Deterministic gradients: L-BFGS with a strong-Wolfe line search, one iteration per
        # step (its curvature memory persists across calls), converges to rounding level.
        optimizer = torch.optim.LBFGS(
            parameters,
            lr=1.0,
            max_iter=1,
            max_eval=25,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
    else:
        # Noisy gradients: Adam with a Robbins–Monro decay lr / √(1 + t/100).
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (1 + t / 100) ** -0.5)

    def exact_loss() -> torch.Tensor:
        # The line search changes the parameters between calls: build model and q each time.
        optimizer.zero_grad()
        loss = -elbo(vae.model(), x, vae.encoder()(x)).mean()
        loss.backward()
        return loss

    elbos, log_likelihoods = [], []
    for step in tqdm(range(steps + 1), desc=f"linear VAE ({objective})", disable=not progress):
        with torch.no_grad():
            model, q = vae.model(), vae.encoder()(x)
            elbos.append(elbo(model, x, q).mean().item())
            log_likelihoods.append(model.log_evidence(x).mean().item())
        if step == steps:
            break
        if objective == "exact":
            optimizer.step(exact_loss)
        else:
            optimizer.zero_grad()
            model, q = vae.model(), vae.encoder()(x)
            draw = log_weights(model, x, q, 1, generator=generator, method="plain")[0]
            (-draw.mean()).backward()
            optimizer.step()
            schedule.step()

    return Fit(*vae.detached(), History(np.array(elbos), np.array(log_likelihoods)))
