r"""The linear-Gaussian model p(z) = N(0, I), p(x|z) = N(Wz + b, Ψ): exact evidence and posterior.

Everything is computed in *whitened* coordinates: with Ψ = L_Ψ L_Ψᵀ, write
Ã = L_Ψ⁻¹ W and r̃ = L_Ψ⁻¹ (x − b). Then the posterior precision is Λ = I_K + ÃᵀÃ (a K×K
matrix that does not depend on x), the posterior mean is μ = Λ⁻¹ Ãᵀ r̃, and by completing the
square

    log p(x) = −½ [D log 2π + log det Ψ + log det Λ + ‖r̃ − Ã μ‖² + ‖μ‖²].

For isotropic or diagonal Ψ, L_Ψ is a vector of square roots, so no D×D matrix is ever formed:
the cost is O(N·D·K + D·K² + K³).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from toyvae._checks import (
    as_tensor,
    check_affine_map,
    check_finite,
    check_last_dim,
    check_positive,
    check_symmetric,
    cholesky,
    describe,
)
from toyvae.gaussians import LOG_2PI, Gaussian

__all__ = ["LinearGaussian"]

# log_evidence processes the rows of x in blocks of about this many entries (1 MiB in float64):
# small enough for cache and for the allocator to recycle, large enough that per-block overhead
# (and, with intra-op threads, per-block synchronisation) stays small. See benchmarks/README.md.
_BLOCK_ELEMENTS = 2**17


class _Factors(NamedTuple):
    """The x-independent quantities every exact computation needs, computed once per call."""

    noise_tril: torch.Tensor  # L_Ψ; for isotropic or diagonal Ψ, the standard deviations
    whitened_weight: torch.Tensor  # Ã = L_Ψ⁻¹ W, (D, K)
    gram: torch.Tensor  # G = ÃᵀÃ, (K, K); the posterior precision is I + G
    posterior_scale_tril: torch.Tensor  # lower S with S Sᵀ = (I + G)⁻¹
    noise_log_det: torch.Tensor  # log det Ψ

    def log_det_precision(self) -> torch.Tensor:
        """log det Λ = −log det Σ_post = −2 Σ log S_ii."""
        return -2 * self.posterior_scale_tril.diagonal().log().sum()


class LinearGaussian:
    r"""Linear-Gaussian latent variable model (probabilistic PCA, factor analysis).

    .. math::
        p(z) = \mathcal N(0, I_K), \qquad p_\theta(x\mid z) = \mathcal N(Wz + b, \Psi)

    Parameters
    ----------
    weight : (D, K) tensor or array
        Loading matrix W. Its dtype and device are the model's (NumPy becomes float64).
    bias : (D,) tensor or array, optional
        Offset b; zeros when ``None``.
    noise_variance : float, 0-d, (D,) or (D, D) tensor or array
        Noise **variance** Ψ: a scalar σ² (isotropic, probabilistic PCA), a vector of
        variances (diagonal, factor analysis) or a full symmetric positive-definite covariance.

    Parameters may require grad; every method is differentiable in them. Nothing is cached,
    so in-place parameter updates are always seen.
    """

    def __init__(self, weight, bias=None, noise_variance=1.0):
        weight, bias = check_affine_map(weight, bias, "D", "K")
        d = weight.shape[0]

        noise = as_tensor(noise_variance, "noise_variance", like=weight)
        check_finite(noise, "noise_variance")
        if noise.ndim == 0:
            kind = "isotropic"
        elif noise.shape == (d,):
            kind = "diagonal"
        elif noise.shape == (d, d):
            kind = "full"
        else:
            raise ValueError(
                f"noise_variance must be a scalar, a ({d},) vector of variances or a ({d}, {d}) "
                f"covariance matrix, got {describe(noise)}"
            )
        if kind == "full":
            check_symmetric(noise, "noise_variance")
            cholesky(noise, "noise_variance")
        else:
            check_positive(noise, "noise_variance")

        self.weight = weight
        self.bias = bias
        self.noise_variance = noise
        self.noise_kind = kind

    def __repr__(self) -> str:
        return (
            f"LinearGaussian(data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
            f"noise={self.noise_kind}, dtype={self.weight.dtype})"
        )

    @property
    def data_dim(self) -> int:
        """D, the dimension of x."""
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        """K, the dimension of z."""
        return self.weight.shape[1]

    # -- noise in whitened form ---------------------------------------------------------------

    def _noise_tril(self) -> torch.Tensor:
        """L_Ψ for full Ψ; for isotropic or diagonal Ψ, the vector of standard deviations."""
        if self.noise_kind == "full":
            return torch.linalg.cholesky(self.noise_variance)
        return self.noise_variance.sqrt()

    def _noise_log_det(self, noise_tril: torch.Tensor) -> torch.Tensor:
        """log det Ψ = 2 Σ log diag L_Ψ."""
        diagonal = noise_tril.diagonal() if self.noise_kind == "full" else noise_tril
        return 2 * diagonal.log().expand(self.data_dim).sum()

    def _whiten(self, v: torch.Tensor, noise_tril: torch.Tensor) -> torch.Tensor:
        """L_Ψ⁻¹ v, applied to the last axis of v (..., D)."""
        if self.noise_kind != "full":
            return v / noise_tril
        rows = v.reshape(-1, v.shape[-1])
        solved = torch.linalg.solve_triangular(noise_tril, rows.mT, upper=False)
        return solved.mT.reshape(v.shape)

    def _factors(self) -> _Factors:
        noise_tril = self._noise_tril()
        if self.noise_kind == "full":
            whitened = self._whiten(self.weight.mT, noise_tril).mT
        else:
            whitened = self.weight / noise_tril.unsqueeze(-1)
        gram = whitened.mT @ whitened
        precision = gram + torch.eye(self.latent_dim, dtype=gram.dtype, device=gram.device)
        return _Factors(
            noise_tril,
            whitened,
            gram,
            _inverse_cholesky(precision),
            self._noise_log_det(noise_tril),
        )

    def _whitened_residual(self, x: torch.Tensor, factors: _Factors) -> torch.Tensor:
        """r̃ = L_Ψ⁻¹ (x − b)."""
        return self._whiten(x - self.bias, factors.noise_tril)

    # -- input checks -------------------------------------------------------------------------

    def _check_x(self, x, name: str = "x") -> torch.Tensor:
        x = as_tensor(x, name, like=self.weight)
        check_last_dim(x, name, self.data_dim, "the model's data dimension D")
        check_finite(x, name)
        return x

    def _check_z(self, z, name: str = "z") -> torch.Tensor:
        z = as_tensor(z, name, like=self.weight)
        check_last_dim(z, name, self.latent_dim, "the model's latent dimension K")
        check_finite(z, name)
        return z

    # -- distributions ------------------------------------------------------------------------

    def prior(self) -> MultivariateNormal:
        """p(z) = N(0, I_K)."""
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        return MultivariateNormal(torch.zeros_like(eye[0]), scale_tril=eye)

    def likelihood(self, z) -> Independent | MultivariateNormal:
        """p(x|z) = N(Wz + b, Ψ), batch shape ``z.shape[:-1]``."""
        z = self._check_z(z)
        loc = z @ self.weight.mT + self.bias
        if self.noise_kind == "full":
            return MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(self.noise_variance))
        scale = self.noise_variance.sqrt().expand(self.data_dim)
        return Independent(Normal(loc, scale.expand_as(loc)), 1)

    def marginal(self) -> LowRankMultivariateNormal | MultivariateNormal:
        """p(x) = N(b, WWᵀ + Ψ): low-rank plus diagonal, or dense for full Ψ."""
        if self.noise_kind == "full":
            return MultivariateNormal(
                self.bias, covariance_matrix=self.weight @ self.weight.mT + self.noise_variance
            )
        diag = self.noise_variance.expand(self.data_dim)
        return LowRankMultivariateNormal(self.bias, cov_factor=self.weight, cov_diag=diag)

    # -- exact quantities ---------------------------------------------------------------------

    def _posterior(self, residual: torch.Tensor, factors: _Factors) -> Gaussian:
        """N(μ, S Sᵀ) with μ = S Sᵀ Ãᵀ r̃, from the whitened residual r̃."""
        s = factors.posterior_scale_tril
        mean = ((residual @ factors.whitened_weight) @ s) @ s.mT
        return Gaussian(mean, s.expand(*mean.shape, self.latent_dim))

    def posterior(self, x) -> MultivariateNormal:
        r"""The exact posterior p(z|x) = N(μ(x), Σ), batch shape ``x.shape[:-1]``.

        .. math::
            \Sigma = (I_K + W^\top\Psi^{-1}W)^{-1}, \qquad
            \mu(x) = \Sigma W^\top \Psi^{-1}(x - b)

        Σ does not depend on x; it is factored once per call.
        """
        x = self._check_x(x)
        factors = self._factors()
        post = self._posterior(self._whitened_residual(x, factors), factors)
        return MultivariateNormal(post.loc, scale_tril=post.scale_tril)

    def log_evidence(self, x) -> torch.Tensor:
        r"""log p_θ(x) = log N(x; b, WWᵀ + Ψ), shape ``x.shape[:-1]``.

        .. math::
            \log p(x) = -\tfrac12\big[D\log 2\pi + \log\det\Psi + \log\det\Lambda
                + \lVert\tilde r - \tilde W\mu\rVert^2 + \lVert\mu\rVert^2\big]

        with Λ = I + W̃ᵀW̃, W̃ = L_Ψ⁻¹W, r̃ = L_Ψ⁻¹(x − b), μ the posterior mean. The two squared
        norms are the quadratic form (x−b)ᵀ(WWᵀ+Ψ)⁻¹(x−b) written as a sum of non-negative
        terms (completing the square), so no cancellation occurs.
        """
        x = self._check_x(x)
        factors = self._factors()
        rows = x.reshape(-1, self.data_dim)
        # Blocks of about _BLOCK_ELEMENTS entries: each block's (B, D) temporaries stay in cache
        # and are recycled by the allocator. Whole (N, D) temporaries cost more in fresh pages
        # than in arithmetic (benchmarks/README.md).
        block = max(1, _BLOCK_ELEMENTS // self.data_dim)
        quadratic = torch.cat([self._quadratic(part, factors) for part in rows.split(block)])
        constant = self.data_dim * LOG_2PI + factors.noise_log_det + factors.log_det_precision()
        return -0.5 * (constant + quadratic.reshape(x.shape[:-1]))

    def _quadratic(self, x: torch.Tensor, factors: _Factors) -> torch.Tensor:
        """(x−b)ᵀ(WWᵀ+Ψ)⁻¹(x−b) = ‖r̃ − W̃μ‖² + ‖μ‖² for rows x (B, D), by completing the square."""
        residual = self._whitened_residual(x, factors)
        mean = self._posterior(residual, factors).loc
        # r̃ − μ W̃ᵀ in one fused product-and-add.
        misfit = torch.addmm(residual, mean, factors.whitened_weight.mT, alpha=-1)
        return misfit.square().sum(-1) + mean.square().sum(-1)

    def log_joint(self, x, z) -> torch.Tensor:
        """log p_θ(x, z) = log p_θ(x|z) + log p(z), broadcasting x (..., D) with z (..., K)."""
        x = self._check_x(x)
        z = self._check_z(z)
        return self._log_likelihood(x, z) + self._log_prior(z)

    def _log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        noise_tril = self._noise_tril()
        residual = self._whiten(x - self.bias - z @ self.weight.mT, noise_tril)
        constant = self.data_dim * LOG_2PI + self._noise_log_det(noise_tril)
        return -0.5 * (constant + residual.square().sum(-1))

    def _log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.latent_dim * LOG_2PI + z.square().sum(-1))

    def sample(self, sample_shape=(), generator: torch.Generator | None = None):
        """Draw ``(x, z)`` from the joint: z ~ N(0, I), x = Wz + b + L_Ψ ε with ε ~ N(0, I).

        ``x`` has shape ``(*sample_shape, D)`` and ``z`` shape ``(*sample_shape, K)``.
        """
        shape = torch.Size(sample_shape)
        options = {"dtype": self.weight.dtype, "device": self.weight.device, "generator": generator}
        z = torch.randn(*shape, self.latent_dim, **options)
        eps = torch.randn(*shape, self.data_dim, **options)
        noise_tril = self._noise_tril()
        noise = eps @ noise_tril.mT if self.noise_kind == "full" else eps * noise_tril
        return z @ self.weight.mT + self.bias + noise, z


def _inverse_cholesky(precision: torch.Tensor) -> torch.Tensor:
    """Lower S with S Sᵀ = precision⁻¹, without forming the inverse.

    Factor the index-reversed matrix, J Λ J = L Lᵀ, so Λ = U Uᵀ with U = J L J upper
    triangular; then Λ⁻¹ = U⁻ᵀ U⁻¹ and S = U⁻ᵀ is lower triangular.
    """
    flipped = torch.linalg.cholesky(precision.flip(-2, -1))
    upper = flipped.flip(-2, -1)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(upper.mT, eye, upper=False)
