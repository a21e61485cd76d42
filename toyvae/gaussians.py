"""Gaussians in canonical form (mean, lower Cholesky factor of the covariance), and their KL.

Every Gaussian that enters toyvae, whether a ``MultivariateNormal`` or an
``Independent(Normal, 1)``, is read once into a :class:`Gaussian` ``(loc, scale_tril)`` with
covariance ``scale_tril @ scale_tril.mT``. All derived quantities (log-determinants,
Mahalanobis distances, traces) come from that one triangular factor; no inverse is formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae._checks import broadcast_batch, check_finite, check_positive, describe

__all__ = ["Gaussian", "as_gaussian", "entropy", "gaussian_kl", "standard_normal"]

LOG_2PI = math.log(2 * math.pi)


class Gaussian(NamedTuple):
    """N(loc, scale_tril @ scale_tril.mT), with batch shape ``loc.shape[:-1]``."""

    loc: torch.Tensor
    scale_tril: torch.Tensor

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    def log_det_cov(self) -> torch.Tensor:
        """log det Σ = 2 Σ_i log L_ii."""
        return 2 * self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def covariance(self) -> torch.Tensor:
        return self.scale_tril @ self.scale_tril.mT


def standard_normal(dim: int, dtype: torch.dtype, device=None) -> Gaussian:
    """N(0, I_dim) in canonical form."""
    eye = torch.eye(dim, dtype=dtype, device=device)
    return Gaussian(torch.zeros_like(eye[0]), eye)


def as_gaussian(q, name: str = "q", *, dim: int | None = None) -> Gaussian:
    """Read a torch Gaussian into canonical form, validating it.

    Accepts a ``MultivariateNormal`` or an ``Independent(Normal, 1)``; ``dim`` is the expected
    event size. Raises ``TypeError`` for other objects and ``ValueError`` for a wrong event
    shape, a non-finite mean or a non-positive scale.
    """
    if isinstance(q, MultivariateNormal):
        loc, scale_tril = q.loc, q.scale_tril
        diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
    elif (
        isinstance(q, Independent)
        and isinstance(q.base_dist, Normal)
        and q.reinterpreted_batch_ndims == 1
    ):
        loc, diagonal = torch.broadcast_tensors(q.base_dist.loc, q.base_dist.scale)
        scale_tril = torch.diag_embed(diagonal)
    else:
        raise TypeError(
            f"{name} must be a torch.distributions.MultivariateNormal or an "
            f"Independent(Normal, 1), got {describe(q)}"
        )
    if loc.ndim == 0:
        raise ValueError(f"{name} must have an event shape (K,), got a scalar distribution")
    if dim is not None and loc.shape[-1] != dim:
        raise ValueError(
            f"{name} must have event shape ({dim},) to match the model's latent dimension, "
            f"got event shape {tuple(loc.shape[-1:])}"
        )
    check_finite(loc, f"{name}'s mean")
    check_finite(scale_tril, f"{name}'s scale")
    check_positive(diagonal, f"{name}'s scale (diagonal of its Cholesky factor)")
    loc, scale_tril = _broadcast(loc, scale_tril)
    return Gaussian(loc, scale_tril)


def _broadcast(loc: torch.Tensor, scale_tril: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = broadcast_batch(loc=loc.shape[:-1], scale=scale_tril.shape[:-2])
    k = loc.shape[-1]
    return loc.expand(*batch, k), scale_tril.expand(*batch, k, k)


def _kl(q: Gaussian, p: Gaussian) -> torch.Tensor:
    r"""KL(q ‖ p) for canonical Gaussians, broadcasting their batch shapes.

    .. math::
        \mathrm{KL} = \tfrac12\big[\lVert L_p^{-1} L_q\rVert_F^2
            + \lVert L_p^{-1}(\mu_p-\mu_q)\rVert^2 - K
            + \log\det\Sigma_p - \log\det\Sigma_q\big]
    """
    batch = broadcast_batch(q=q.loc.shape[:-1], p=p.loc.shape[:-1])
    k = q.dim
    lp = p.scale_tril.expand(*batch, k, k)
    trace = torch.linalg.solve_triangular(lp, q.scale_tril.expand(*batch, k, k), upper=False)
    diff = (p.loc - q.loc).expand(*batch, k).unsqueeze(-1)
    mahalanobis = torch.linalg.solve_triangular(lp, diff, upper=False).squeeze(-1)
    return 0.5 * (
        trace.square().sum((-2, -1))
        + mahalanobis.square().sum(-1)
        - k
        + p.log_det_cov()
        - q.log_det_cov()
    )


def _entropy(q: Gaussian) -> torch.Tensor:
    """H[q] = ½ K (1 + log 2π) + ½ log det Σ."""
    return 0.5 * q.dim * (1 + LOG_2PI) + 0.5 * q.log_det_cov()


def gaussian_kl(q, p) -> torch.Tensor:
    r"""Closed-form KL(q ‖ p) between two Gaussians with event shape (K,).

    .. math::
        \mathrm{KL}(q\,\|\,p) = \tfrac12\Big[\operatorname{tr}(\Sigma_p^{-1}\Sigma_q)
            + (\mu_p-\mu_q)^\top\Sigma_p^{-1}(\mu_p-\mu_q) - K
            + \log\frac{\det\Sigma_p}{\det\Sigma_q}\Big]

    Computed from the Cholesky factors (no inverse). ``q`` and ``p`` are
    ``MultivariateNormal`` or ``Independent(Normal, 1)``; batch shapes broadcast.
    """
    gq = as_gaussian(q, "q")
    gp = as_gaussian(p, "p", dim=gq.dim)
    broadcast_batch(q=gq.loc.shape[:-1], p=gp.loc.shape[:-1])
    return _kl(gq, gp)


def entropy(q) -> torch.Tensor:
    """Differential entropy of a Gaussian, ½ K (1 + log 2π) + ½ log det Σ."""
    return _entropy(as_gaussian(q, "q"))
