r"""Gaussian noise covariances Ψ as small objects: isotropic, diagonal or full.

A linear-Gaussian model needs a handful of operations on its noise covariance Ψ = L_Ψ L_Ψᵀ:
whitening v ↦ L_Ψ⁻¹ v, colouring ε ↦ L_Ψ ε, log det Ψ, the density N(loc, Ψ), and (for the
derived tolerances) Ψ's eigenvalues and the textbook quadratic form vᵀΨ⁻¹v. Each kind of Ψ
implements them once, so no caller switches on the kind. A scalar or diagonal Ψ never forms a
D×D matrix: its L_Ψ is a vector of standard deviations.

:func:`noise_covariance` reads a user's ``noise_variance`` (a variance, never a standard
deviation) into the right kind.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae._checks import check_finite, check_positive, check_symmetric, cholesky, describe
from toyvae._linalg import solve_rows
from toyvae.gaussians import LOG_2PI

__all__ = ["DiagonalNoise", "FullNoise", "IsotropicNoise", "noise_covariance"]


class IsotropicNoise:
    """Ψ = σ² I_D, from a 0-d tensor of the variance σ²."""

    kind = "isotropic"

    def __init__(self, variance: torch.Tensor, dim: int):
        self.variance = variance
        self.dim = dim

    def _std(self) -> torch.Tensor:
        return self.variance.sqrt()

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        """L_Ψ⁻¹ v along the last axis."""
        return v / self._std()

    def whiten_columns(self, m: torch.Tensor) -> torch.Tensor:
        """L_Ψ⁻¹ M for a (D, K) matrix M."""
        return m / self._std()

    def color(self, eps: torch.Tensor) -> torch.Tensor:
        """L_Ψ ε along the last axis: standard-normal ε becomes N(0, Ψ)."""
        return eps * self._std()

    def log_det(self) -> torch.Tensor:
        """log det Ψ = D log σ²."""
        return self.dim * self.variance.log()

    def log_density(self, residual: torch.Tensor) -> torch.Tensor:
        """log N(residual; 0, Ψ) along the last axis: −½ [D log 2π + log det Ψ + ‖L_Ψ⁻¹ r‖²]."""
        whitened = self.whiten(residual)
        return -0.5 * (self.dim * LOG_2PI + self.log_det() + whitened.square().sum(-1))

    def distribution(self, loc: torch.Tensor) -> Independent | MultivariateNormal:
        """N(loc, Ψ) with batch shape ``loc.shape[:-1]``."""
        return Independent(Normal(loc, self._std().expand_as(loc)), 1)

    def eigenvalues(self) -> torch.Tensor:
        """Ψ's eigenvalues (D,), for tolerances; detached."""
        return self.variance.detach().expand(self.dim)

    def dense(self) -> torch.Tensor:
        """Ψ as a (D, D) matrix: for dense oracles and small D only."""
        eye = torch.eye(self.dim, dtype=self.variance.dtype, device=self.variance.device)
        return self.variance * eye

    def tril(self) -> torch.Tensor:
        """L_Ψ as a (D, D) lower-triangular matrix: for small D only."""
        return torch.diag_embed(self._std().expand(self.dim))


class DiagonalNoise(IsotropicNoise):
    """Ψ = diag(v), from a (D,) tensor of variances."""

    kind = "diagonal"

    def whiten_columns(self, m: torch.Tensor) -> torch.Tensor:
        return m / self._std().unsqueeze(-1)

    def log_det(self) -> torch.Tensor:
        return self.variance.log().sum()

    def eigenvalues(self) -> torch.Tensor:
        return self.variance.detach()

    def dense(self) -> torch.Tensor:
        return torch.diag(self.variance)


class FullNoise:
    """A full symmetric positive-definite Ψ (D, D), through its lower Cholesky factor L_Ψ."""

    kind = "full"

    def __init__(self, covariance: torch.Tensor, dim: int):
        self.variance = covariance
        self.dim = dim

    def _tril(self) -> torch.Tensor:
        # Factored per call (not cached): a cached factor would share one autograd graph
        # between independent backward passes.
        return torch.linalg.cholesky(self.variance)

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        return solve_rows(self._tril(), v)

    def whiten_columns(self, m: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self._tril(), m, upper=False)

    def color(self, eps: torch.Tensor) -> torch.Tensor:
        return eps @ self._tril().mT

    def log_det(self) -> torch.Tensor:
        return 2 * self._tril().diagonal().log().sum()

    def log_density(self, residual: torch.Tensor) -> torch.Tensor:
        """log N(residual; 0, Ψ) along the last axis: −½ [D log 2π + log det Ψ + ‖L_Ψ⁻¹ r‖²]."""
        whitened = self.whiten(residual)
        return -0.5 * (self.dim * LOG_2PI + self.log_det() + whitened.square().sum(-1))

    def distribution(self, loc: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(loc, scale_tril=self._tril())

    def eigenvalues(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.variance.detach())

    def dense(self) -> torch.Tensor:
        return self.variance

    def tril(self) -> torch.Tensor:
        return self._tril()


def noise_covariance(variance: torch.Tensor, dim: int, name: str = "noise_variance"):
    """The noise object for a variance tensor: 0-d isotropic, (dim,) diagonal, (dim, dim) full.

    ``variance`` must already be a tensor in the model's dtype. Raises ``ValueError`` naming
    ``name`` for a wrong shape, a non-finite or non-positive variance, an asymmetric or
    non-positive-definite matrix.
    """
    check_finite(variance, name)
    if variance.shape == (dim, dim) and dim >= 1 and variance.ndim == 2:
        check_symmetric(variance, name)
        cholesky(variance, name)
        return FullNoise(variance, dim)
    if variance.ndim == 0:
        check_positive(variance, name)
        return IsotropicNoise(variance, dim)
    if variance.shape == (dim,):
        check_positive(variance, name)
        return DiagonalNoise(variance, dim)
    raise ValueError(
        f"{name} must be a scalar, a ({dim},) vector of variances or a ({dim}, {dim}) "
        f"covariance matrix, got {describe(variance)}"
    )
