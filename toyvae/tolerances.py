r"""Derived tolerances for comparing exact computations: errors in units of eps·M.

Every exact quantity in toyvae (log p(x), the ELBO, a KL, log p(x, z)) is a sum of a few groups
of terms: D·log 2π, log det Ψ, log det Λ, squared norms of whitened residuals, traces and
log-determinants of q's covariance. A floating-point sum of n terms whose absolute values add
up to M is correct to within n·eps·M (Higham, *Accuracy and Stability of Numerical Algorithms*,
§4.2), and each term is itself a length-D or length-K sum. So the natural unit of error is
``eps · M``, with M the sum of the absolute values of all the terms, computed here with plain
textbook linear algebra (dense for a full Ψ, elementwise for a scalar or diagonal Ψ), not with
the whitened Cholesky route of :mod:`toyvae.model` that it is used to check.

Used by the test suite and by ``toyvae report``.
"""

from __future__ import annotations

import math

import torch

from toyvae.gaussians import as_gaussian
from toyvae.model import LinearGaussian

__all__ = ["EPS", "identity_tolerance", "magnitude", "posterior_condition"]

EPS = torch.finfo(torch.float64).eps


class _Dense:
    """Ψ's eigenvalues, v ↦ vᵀΨ⁻¹v and G = WᵀΨ⁻¹W, by the textbook formulas."""

    def __init__(self, model: LinearGaussian):
        psi = model.noise_variance.detach()
        weight = model.weight.detach()
        self.full = model.noise_kind == "full"
        if self.full:
            self.eigenvalues = torch.linalg.eigvalsh(psi)
            self.inverse = torch.linalg.inv(psi)
            self.gram = weight.mT @ self.inverse @ weight
        else:
            # A scalar or diagonal Ψ is never expanded to D×D: D may be in the thousands.
            self.eigenvalues = psi.expand(model.data_dim)
            self.inverse = 1 / self.eigenvalues
            self.gram = (weight * self.inverse.unsqueeze(-1)).mT @ weight

    def quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """vᵀΨ⁻¹v along the last axis."""
        if self.full:
            return ((v @ self.inverse) * v).sum(-1)
        return (v.square() * self.inverse).sum(-1)


def magnitude(model: LinearGaussian, x: torch.Tensor, q=None, *, z=None) -> torch.Tensor:
    """M: the sum of the absolute values of every term of log p(x), and of the other quantities.

    With ``q`` (a Gaussian), the terms of ELBO(q) and KL(q ‖ p(z|x)) are added; with ``z``
    (..., K), those of log p(x, z) and log p(z|x) (Bayes' rule at z). Shape: the broadcast batch
    shape of x, q and z.
    """
    dense = _Dense(model)
    k = model.latent_dim
    eye = torch.eye(k, dtype=dense.gram.dtype, device=dense.gram.device)
    residual = x.detach() - model.bias.detach()
    whitened_norm = dense.quadratic(residual)
    total = (
        model.data_dim * math.log(2 * math.pi)
        + dense.eigenvalues.log().abs().sum()
        + torch.logdet(eye + dense.gram)
        + 2 * whitened_norm
        + k
    )
    if q is not None:
        g = as_gaussian(q)
        mean, cov = g.loc.detach(), g.covariance().detach()
        total = (
            total
            + 2 * dense.quadratic(mean @ model.weight.detach().mT)
            + mean.square().sum(-1)
            + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            # tr(G S) = Σᵢⱼ Gᵢⱼ Sᵢⱼ: its terms, not its value, which can cancel to far less.
            + (dense.gram.abs() * cov.abs()).sum((-2, -1))
            + g.log_det_cov().detach().abs()
        )
    if z is not None:
        z = z.detach()
        squared = z.square().sum(-1)
        decoded = z @ model.weight.detach().mT
        # log p(x, z): ‖z‖² and the whitened misfit (x−b−Wz)ᵀΨ⁻¹(x−b−Wz). log p(z|x):
        # (z−μ)ᵀΛ(z−μ) ≤ 2(zᵀΛz + μᵀΛμ) = 2(‖z‖² + zᵀGz + μᵀΛμ), and μᵀΛμ ≤ (x−b)ᵀΨ⁻¹(x−b)
        # because μᵀΛμ = r̃ᵀÃΛ⁻¹Ãᵀr̃ and ÃΛ⁻¹Ãᵀ = Ã(I + ÃᵀÃ)⁻¹Ãᵀ ⪯ I. Plus K·log 2π twice.
        total = (
            total
            + squared
            + dense.quadratic(residual - decoded)
            + 2 * (squared + dense.quadratic(decoded) + whitened_norm)
            + 2 * k * math.log(2 * math.pi)
        )
    return total


def identity_tolerance(model: LinearGaussian, x: torch.Tensor, q=None, *, z=None) -> torch.Tensor:
    """Allowed |error| when comparing exact quantities that are sums of the terms in M.

    4 · (D + K) · eps · M: n = D + K terms per quantity (Higham's n·eps·M), and up to four
    such quantities meet in one comparison (log p(x), ELBO, KL, and their combination).
    ``eps`` is the machine epsilon of the model's dtype. Over 400 Hypothesis examples of
    ``linear_gaussian_models()`` the largest error seen was 1.04 · eps · M, so the bound is
    not tight but is far below any real defect (a defect changes a term by O(1) of itself).
    """
    d, k = model.weight.shape
    eps = torch.finfo(model.weight.dtype).eps
    return 4 * (d + k) * eps * magnitude(model, x, q, z=z)


def posterior_condition(model: LinearGaussian) -> float:
    """κ(S) = √κ(Λ): the condition number of the posterior's Cholesky factor S, Λ = I + WᵀΨ⁻¹W.

    Quantities computed by triangular solves against S (KL to the posterior, log p(z|x), log
    weights in the posterior's coordinates) have a normwise forward error up to κ(S) times the
    backward error (Higham, §8.2); multiply :func:`identity_tolerance` by this for them.
    """
    dense = _Dense(model)
    eye = torch.eye(model.latent_dim, dtype=dense.gram.dtype, device=dense.gram.device)
    eigenvalues = torch.linalg.eigvalsh(eye + dense.gram)
    return float((eigenvalues.max() / eigenvalues.min()).sqrt())
