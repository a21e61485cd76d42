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

    def distribution(self) -> MultivariateNormal:
        """This Gaussian as a torch ``MultivariateNormal`` (an empty batch included: torch's
        argument validation cannot check an empty batch, and the factor is valid by
        construction)."""
        validate = None if self.loc.numel() else False
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=validate)


def standard_normal(dim: int, dtype: torch.dtype, device=None) -> Gaussian:
    """N(0, I_dim) in canonical form."""
    eye = torch.eye(dim, dtype=dtype, device=device)
    return Gaussian(torch.zeros_like(eye[0]), eye)


def as_gaussian(
    q, name: str = "q", *, dim: int | None = None, against: str = "the model's latent dimension"
) -> Gaussian:
    """Read a torch Gaussian into canonical form, validating it.

    Accepts a ``MultivariateNormal``, an ``Independent(Normal, 1)``, or a structured q with a
    ``to_multivariate_normal()`` method (:class:`toyvae.StructuredGaussian`); ``dim`` is the
    expected event size, and ``against`` names what it comes from in the error message. Raises
    ``TypeError`` for other objects and ``ValueError`` for a wrong event shape, a non-finite mean
    or a non-positive scale.
    """
    if not isinstance(q, torch.distributions.Distribution) and hasattr(q, "to_multivariate_normal"):
        q = q.to_multivariate_normal()  # a structured q (toyvae.StructuredGaussian): dense form
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
            f"{name} must have event shape ({dim},) to match {against}, "
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


class Relative(NamedTuple):
    """q in p's standard coordinates: z = μ_p + L_p (c + (I + E) ε) for z ~ q, ε ~ N(0, I).

    Attributes
    ----------
    excess : tensor
        E = L_p⁻¹(L_q − L_p) = L_p⁻¹L_q − I, (*batch, K, K), lower triangular. Computed from
        the difference of the factors, so it is accurate relative to its own (small) size.
    offset : tensor
        c = L_p⁻¹(μ_q − μ_p), (*batch, K).
    """

    excess: torch.Tensor
    offset: torch.Tensor


def relative(q: Gaussian, p: Gaussian) -> Relative:
    """q in p's standard coordinates (:class:`Relative`), broadcasting batch shapes."""
    batch = broadcast_batch(q=q.loc.shape[:-1], p=p.loc.shape[:-1])
    k = q.dim
    lp = p.scale_tril.expand(*batch, k, k)
    excess = torch.linalg.solve_triangular(lp, q.scale_tril - p.scale_tril, upper=False)
    diff = (q.loc - p.loc).expand(*batch, k).unsqueeze(-1)
    offset = torch.linalg.solve_triangular(lp, diff, upper=False).squeeze(-1)
    return Relative(excess, offset)


def _exp_minus_one_minus(t: torch.Tensor) -> torch.Tensor:
    """eᵗ − 1 − t without cancellation: its Taylor series for |t| < ½, else expm1(t) − t.

    For |t| < ½ the terms tⁿ/n! fall below 1e-17 of the leading t²/2 by n = 17.
    """
    small = t.abs() < 0.5
    ts = torch.where(small, t, torch.zeros_like(t))
    series = torch.zeros_like(t)
    for n in range(17, 1, -1):  # Horner: t²(1/2! + t(1/3! + t(1/4! + …)))
        series = series * ts + 1.0 / math.factorial(n)
    series = series * ts * ts
    return torch.where(small, series, torch.expm1(t) - t)


def kl_from_relative(r: Relative) -> torch.Tensor:
    r"""KL(q ‖ p) from q in p's coordinates, as a sum of non-negative terms.

    With B = I + E and bᵢ = 1 + Eᵢᵢ = e^{ℓᵢ},

    .. math::
        2\,\mathrm{KL} = \lVert B\rVert_F^2 - K - 2\log\det B + \lVert c\rVert^2
            = \sum_{i \ne j} E_{ij}^2 + \sum_i \big(e^{2\ell_i} - 1 - 2\ell_i\big)
            + \lVert c\rVert^2

    Every term is non-negative and computed without cancellation (ℓᵢ = log1p(Eᵢᵢ), and
    eᵗ − 1 − t by its series near 0), so the KL keeps its relative accuracy as q → p and is
    never negative.
    """
    excess, offset = r
    diagonal = excess.diagonal(dim1=-2, dim2=-1)  # bᵢ − 1
    off_diagonal = excess.tril(-1).square().sum((-2, -1))
    scale_terms = _exp_minus_one_minus(2 * torch.log1p(diagonal)).sum(-1)
    return 0.5 * (off_diagonal + scale_terms + offset.square().sum(-1))


def _kl(q: Gaussian, p: Gaussian) -> torch.Tensor:
    r"""KL(q ‖ p) for canonical Gaussians, broadcasting their batch shapes.

    .. math::
        \mathrm{KL} = \tfrac12\big[\lVert L_p^{-1} L_q\rVert_F^2
            + \lVert L_p^{-1}(\mu_p-\mu_q)\rVert^2 - K
            + \log\det\Sigma_p - \log\det\Sigma_q\big]

    evaluated as a sum of non-negative terms (:func:`kl_from_relative`).
    """
    return kl_from_relative(relative(q, p))


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
    gp = as_gaussian(p, "p", dim=gq.dim, against="q's event shape")
    broadcast_batch(q=gq.loc.shape[:-1], p=gp.loc.shape[:-1])
    return _kl(gq, gp)


def entropy(q) -> torch.Tensor:
    """Differential entropy of a Gaussian, ½ K (1 + log 2π) + ½ log det Σ."""
    return _entropy(as_gaussian(q, "q"))
