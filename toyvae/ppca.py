r"""Probabilistic PCA by maximum likelihood, in closed form (Tipping & Bishop 1999).

:func:`ppca_maximum_likelihood` is the global optimum that ELBO ascent of a linear VAE
(:func:`toyvae.training.fit_linear_vae`) should reach; :func:`data_with_spectrum` makes data
whose sample covariance has a chosen spectrum, so that optimum is known exactly.
"""

from __future__ import annotations

import torch

from toyvae._checks import as_tensor, check_finite, check_ndim, check_positive, describe
from toyvae.model import LinearGaussian

__all__ = ["data_with_spectrum", "ppca_maximum_likelihood"]


def _check_data_set(x) -> torch.Tensor:
    """x as a finite (N, D) tensor with N ≥ 2, or ``ValueError``/``TypeError``."""
    x = as_tensor(x, "x")
    check_ndim(x, "x", (2,), "an (N, D) data set")
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 data points, got {describe(x)}")
    check_finite(x, "x")
    return x


def _check_latent_dim(latent_dim, data_dim: int) -> int:
    """latent_dim as an int in [1, D − 1], or ``TypeError``/``ValueError``."""
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int):
        raise TypeError(f"latent_dim must be an int, got {describe(latent_dim)}")
    if not 1 <= latent_dim < data_dim:
        raise ValueError(
            f"latent_dim must be in [1, D − 1] = [1, {data_dim - 1}], got {latent_dim}"
        )
    return latent_dim


def data_with_spectrum(eigenvalues, n: int = 100, seed: int = 0) -> torch.Tensor:
    """n float64 points whose sample covariance has exactly the given eigenvalues.

    Standard-normal draws are whitened exactly (by the Cholesky factor of their sample
    covariance), scaled by √λ, rotated by a random orthogonal matrix and shifted by a random
    mean, so that the PPCA maximum-likelihood solution is known in closed form.
    """
    gen = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    raw = torch.randn(n, d, dtype=torch.float64, generator=gen)
    raw = raw - raw.mean(0)
    cov = raw.mT @ raw / n
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), raw.mT, upper=False).mT
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    scales = torch.tensor(eigenvalues, dtype=torch.float64).sqrt()
    return (white * scales) @ rotation.mT + torch.randn(d, dtype=torch.float64, generator=gen)


def ppca_maximum_likelihood(x, latent_dim: int, *, noise_variance=None) -> LinearGaussian:
    r"""The maximum-likelihood probabilistic PCA model of the data x (N, D) (Tipping & Bishop 1999).

    With λ₁ ≥ … ≥ λ_D the eigenvalues of the sample covariance (1/N) Σ (x_n − x̄)(x_n − x̄)ᵀ
    and U_K the eigenvectors of the first K,

    .. math::
        b = \bar x, \qquad \sigma^2 = \frac{1}{D - K}\sum_{j > K}\lambda_j, \qquad
        W = U_K\,\operatorname{diag}\big(\max(\lambda_i - \sigma^2, 0)\big)^{1/2}

    up to a rotation W R, which leaves log p(x) unchanged. The columns of W are orthogonal, so
    the posterior covariance (I + WᵀW/σ²)⁻¹ is diagonal. If ``noise_variance`` is given, σ² is
    held at that value (Lucas et al. 2019): columns with λ_i ≤ σ² are then zero, and those
    latent directions collapse to the prior.
    """
    x = _check_data_set(x)
    n, d = x.shape
    k = _check_latent_dim(latent_dim, d)
    bias = x.mean(0)
    centred = x - bias
    # eigh returns ascending eigenvalues; flip to λ₁ ≥ … ≥ λ_D.
    eigenvalues, vectors = torch.linalg.eigh(centred.mT @ centred / n)
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    if noise_variance is None:
        noise = eigenvalues[k:].mean()
    else:
        noise = _check_scalar_variance(noise_variance, like=x)
    weight = vectors[:, :k] * (eigenvalues[:k] - noise).clamp(min=0).sqrt()
    return LinearGaussian(weight, bias, noise)


def _check_scalar_variance(noise_variance, *, like: torch.Tensor) -> torch.Tensor:
    """A fixed σ² as a finite, positive 0-d tensor in ``like``'s dtype, or ``ValueError``."""
    noise = as_tensor(noise_variance, "noise_variance", like=like)
    check_ndim(noise, "noise_variance", (0,), "a scalar variance")
    check_finite(noise, "noise_variance")  # inf would pass check_positive
    check_positive(noise, "noise_variance")
    return noise
