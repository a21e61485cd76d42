"""Hypothesis strategies for linear-Gaussian models, Gaussian variational distributions and data.

All strategies are built from bounded floats with ``map``/``flatmap`` (no ``filter``), so they
shrink towards small, simple examples: zero weights, unit variances, standard-normal q.
Bounds are keyword-only; the defaults keep every exact computation well conditioned:
the posterior precision I + WᵀΨ⁻¹W has condition number at most
1 + D·max_weight²/min_noise_variance.

Requires the ``hypothesis`` package (a test dependency of toyvae).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae.model import LinearGaussian

__all__ = ["gaussians", "linear_gaussian_models", "observations"]

NOISE_KINDS = ("isotropic", "diagonal", "full")


def _bounded(shape, bound: float) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays with entries in [-bound, bound], shrinking towards zero."""
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=64)
    return arrays(np.float64, shape, elements=elements)


def _log_uniform(shape, low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    """Positive float64 arrays, log-uniform on [low, high]; shrinks towards sqrt(low·high)."""
    centre = 0.5 * (math.log(low) + math.log(high))
    half = 0.5 * (math.log(high) - math.log(low))
    return _bounded(shape, half).map(lambda u: np.exp(centre + u))


@st.composite
def _noise(draw, kind: str, data_dim: int, low: float, high: float) -> np.ndarray:
    if kind == "isotropic":
        return draw(_log_uniform((), low, high))
    variances = draw(_log_uniform((data_dim,), low, high))
    if kind == "diagonal":
        return variances
    # Full Ψ = Q diag(v) Qᵀ with Q orthogonal (from a QR of a bounded matrix): its eigenvalues
    # stay in [low, high] whatever the rotation, so the bounds mean the same for every kind.
    basis = draw(_bounded((data_dim, data_dim), 1.0)) + np.eye(data_dim)
    q, _ = np.linalg.qr(basis)
    psi = (q * variances) @ q.T
    return 0.5 * (psi + psi.T)


def linear_gaussian_models(
    *,
    min_data_dim: int = 1,
    max_data_dim: int = 6,
    min_latent_dim: int = 1,
    max_latent_dim: int = 3,
    max_weight: float = 3.0,
    max_bias: float = 3.0,
    min_noise_variance: float = 0.05,
    max_noise_variance: float = 20.0,
    noise_kinds: tuple[str, ...] = NOISE_KINDS,
) -> st.SearchStrategy[LinearGaussian]:
    """Float64 ``LinearGaussian`` models.

    Weights and biases are uniform in ``[-max_weight, max_weight]`` and
    ``[-max_bias, max_bias]``; noise variances (eigenvalues of Ψ, for full noise) are
    log-uniform in ``[min_noise_variance, max_noise_variance]``; ``noise_kinds`` is a subset
    of ``("isotropic", "diagonal", "full")``.
    """
    unknown = set(noise_kinds) - set(NOISE_KINDS)
    if unknown or not noise_kinds:
        raise ValueError(
            f"noise_kinds must be a non-empty subset of {NOISE_KINDS}, got {noise_kinds}"
        )

    @st.composite
    def models(draw) -> LinearGaussian:
        d = draw(st.integers(min_data_dim, max_data_dim))
        k = draw(st.integers(min_latent_dim, max_latent_dim))
        kind = draw(st.sampled_from(noise_kinds))
        weight = draw(_bounded((d, k), max_weight))
        bias = draw(_bounded((d,), max_bias))
        noise = draw(_noise(kind, d, min_noise_variance, max_noise_variance))
        return LinearGaussian(weight, bias, noise)

    return models()


def gaussians(
    dim: int,
    *,
    batch_shape: tuple[int, ...] = (),
    kinds: tuple[str, ...] = ("full", "diagonal"),
    max_mean: float = 3.0,
    min_scale: float = 0.1,
    max_scale: float = 3.0,
    max_correlation: float = 1.0,
) -> st.SearchStrategy[MultivariateNormal | Independent]:
    """Float64 Gaussians with event shape ``(dim,)``: what VAE encoders produce.

    ``"full"`` gives a ``MultivariateNormal`` with a lower-triangular scale whose diagonal is
    log-uniform in ``[min_scale, max_scale]`` and whose off-diagonal entries are at most
    ``max_correlation`` times the diagonal entry of their row; ``"diagonal"`` gives an
    ``Independent(Normal, 1)``. Means are uniform in ``[-max_mean, max_mean]``.
    """
    shape = (*batch_shape, dim)

    @st.composite
    def draw_gaussian(draw):
        kind = draw(st.sampled_from(kinds))
        loc = torch.as_tensor(draw(_bounded(shape, max_mean)))
        scales = torch.as_tensor(draw(_log_uniform(shape, min_scale, max_scale)))
        if kind == "diagonal":
            return Independent(Normal(loc, scales), 1)
        off = torch.as_tensor(draw(_bounded((*shape, dim), max_correlation)))
        tril = torch.tril(off, diagonal=-1) * scales.unsqueeze(-1) + torch.diag_embed(scales)
        return MultivariateNormal(loc, scale_tril=tril)

    return draw_gaussian()


def observations(
    model: LinearGaussian, *, batch_shape: tuple[int, ...] = (), max_abs: float = 10.0
) -> st.SearchStrategy[torch.Tensor]:
    """Data x of shape ``(*batch_shape, D)`` for ``model``, uniform in ``[-max_abs, max_abs]``.

    Not drawn from the model: the identities hold for every x, and arbitrary x reach the tails
    that sampling from p(x) rarely visits.
    """
    shape = (*batch_shape, model.data_dim)
    return _bounded(shape, max_abs).map(
        lambda a: torch.as_tensor(a, dtype=model.weight.dtype, device=model.weight.device)
    )
