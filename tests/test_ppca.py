"""Probabilistic PCA maximum likelihood against scikit-learn and Tipping & Bishop's stationary
points."""

import math

import numpy as np
import pytest
import seeds
import torch
from ppca_stationary import ml_and_nearest_saddle
from sklearn.decomposition import PCA

from toyvae.ppca import data_with_spectrum, ppca_maximum_likelihood
from toyvae.tolerances import EPS

F64 = torch.float64


def test_ppca_maximum_likelihood_matches_scikit_learn():
    """σ² and WWᵀ + σ²I agree with sklearn's PCA (which divides by N − 1 instead of N)."""
    x = data_with_spectrum([9.0, 4.0, 1.0, 0.6, 0.4], n=60, seed=seeds.seed(1))
    n = x.shape[0]
    model = ppca_maximum_likelihood(x, 2)
    pca = PCA(n_components=2).fit(x.numpy())
    covariance = model.weight @ model.weight.mT + model.noise_variance * torch.eye(5, dtype=F64)
    # sklearn's covariance is the ML one scaled by N/(N − 1); both come from eigen-solvers with
    # backward error D·eps·λ_max (λ_max = 9).
    tol = 64 * 5 * EPS * 9
    assert abs(model.noise_variance.item() * n / (n - 1) - pca.noise_variance_) <= tol
    assert np.abs(covariance.numpy() * n / (n - 1) - pca.get_covariance()).max() <= tol
    assert torch.allclose(model.bias, x.mean(0), rtol=0, atol=16 * EPS * x.abs().max().item())


def test_ppca_maximum_likelihood_is_the_best_stationary_point():
    """log p(x) at the ML solution is Tipping & Bishop's, above every other stationary point's."""
    eigenvalues = [9.0, 4.0, 1.0, 0.6, 0.4]
    x = data_with_spectrum(eigenvalues, n=60, seed=seeds.seed(1))
    model = ppca_maximum_likelihood(x, 2)
    value = model.log_evidence(x).mean().item()
    expected, saddle = ml_and_nearest_saddle(eigenvalues, 2)
    # Sums of D logs and a quadratic of size D: (D + K)·eps·(their size ≈ 20), κ ≤ 9/0.67.
    assert abs(value - expected) <= 64 * 7 * EPS * 20 * 14
    assert saddle < expected - 0.1


def test_posterior_collapse_for_eigenvalues_below_a_fixed_noise_variance():
    """With σ² fixed above λ_2, W's second column is zero and q(z₂|x) is the prior for every x."""
    eigenvalues = [9.0, 1.0, 0.8, 0.5]
    x = data_with_spectrum(eigenvalues, n=50, seed=seeds.seed(3))
    model = ppca_maximum_likelihood(x, 2, noise_variance=1.5)
    norms = model.weight.norm(dim=0)
    assert norms[1].item() == 0.0  # clamp(λ₂ − σ², 0) is exactly zero
    assert abs(norms[0].item() - math.sqrt(9.0 - 1.5)) <= 64 * EPS * 9
    posterior = model.posterior(x)
    # z₂ decouples: its posterior mean is exactly 0 and its variance exactly 1.
    assert posterior.mean[:, 1].abs().max().item() == 0.0
    assert posterior.covariance_matrix[:, 1, 1].sub(1).abs().max().item() <= 4 * EPS


def test_bad_arguments_are_named():
    """A latent_dim out of range or a 1-D data set raises ValueError naming the argument."""
    x = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"latent_dim must be in \[1, D − 1\] = \[1, 2\], got 3"):
        ppca_maximum_likelihood(x, 3)
    with pytest.raises(ValueError, match=r"x must be an \(N, D\) data set"):
        ppca_maximum_likelihood(x[0], 1)
