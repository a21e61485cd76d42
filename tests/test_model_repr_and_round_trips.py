"""LinearGaussian's repr, its save method (read back by toyvae.io) and its from_sklearn
classmethod (checked against the maximum-likelihood PPCA closed form of Tipping & Bishop)."""

import numpy as np
import torch
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA

import toyvae
import toyvae.io

F64 = torch.float64

W = np.array([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.1]])
B = np.array([0.4, -0.2, 1.0])


def test_repr_says_whether_the_prior_is_standard():
    """The repr lists the sizes, the kind of noise and the dtype, and mentions the prior only
    when it is not the standard N(0, I)."""
    standard = toyvae.LinearGaussian(W, B, 0.5)
    assert repr(standard) == (
        "LinearGaussian(data_dim=3, latent_dim=2, noise=isotropic, dtype=torch.float64)"
    )
    prior = torch.distributions.MultivariateNormal(
        torch.tensor([0.7, -1.5], dtype=F64),
        scale_tril=torch.tensor([[1.2, 0.0], [0.6, 0.5]], dtype=F64),
    )
    with_prior = toyvae.LinearGaussian(W, B, [0.5, 0.8, 1.3], prior=prior)
    assert repr(with_prior) == (
        "LinearGaussian(data_dim=3, latent_dim=2, noise=diagonal, prior=Gaussian, "
        "dtype=torch.float64)"
    )


def test_save_method_round_trips_model_and_data(tmp_path):
    """model.save(path, x=x) writes the --model file; toyvae.io.read gives back the same
    parameters and data, exactly (float64 in, float64 .npz out)."""
    model = toyvae.LinearGaussian(W, B, [0.5, 0.8, 1.3])
    x = np.array([[0.3, -0.9, 2.0], [1.5, 0.25, -0.75]])
    path = tmp_path / "model.npz"
    assert model.save(path, x=x) is None
    loaded = toyvae.io.read(path)
    assert torch.equal(loaded.model.weight, model.weight)
    assert torch.equal(loaded.model.bias, model.bias)
    assert torch.equal(loaded.model.noise_variance, model.noise_variance)
    assert loaded.x is not None
    assert torch.equal(loaded.x, torch.tensor(x, dtype=F64))


def test_from_sklearn_classmethod_gives_maximum_likelihood_ppca():
    """LinearGaussian.from_sklearn(PCA, variance="ml") is Tipping & Bishop's maximum-likelihood
    PPCA: mean = sample mean, σ² = mean of the discarded eigenvalues of the covariance with
    divisor N, and marginal covariance U_K Λ_K U_Kᵀ + σ²(I − U_K U_Kᵀ)."""
    x = load_iris().data  # 150 × 4, bundled with scikit-learn: no download
    k = 2
    model = toyvae.LinearGaussian.from_sklearn(PCA(n_components=k).fit(x), variance="ml")
    assert isinstance(model, toyvae.LinearGaussian)
    covariance = np.cov(x.T, bias=True)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    sigma2 = eigenvalues[k:].mean()
    u = vectors[:, :k]
    expected = u @ np.diag(eigenvalues[:k]) @ u.T + sigma2 * (np.eye(4) - u @ u.T)
    # Iris's covariance has entries ≤ 3.2 and eigenvalues 4.2, 0.24, 0.078, 0.024: the K = 2
    # subspace is separated by a gap of 0.16, so the two float64 decompositions (NumPy's eigh,
    # scikit-learn's SVD) agree to ~eps·4.2/0.16 ≈ 6e-15 relative; 1e-12 is a wide margin, and
    # the unbiased variances (divisor N − 1) would differ by 1/149 ≈ 7e-3 relative.
    np.testing.assert_allclose(model.noise_variance.item(), sigma2, rtol=1e-12)
    np.testing.assert_allclose(model.marginal().covariance_matrix.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(model.bias.numpy(), x.mean(0), rtol=0, atol=1e-14)
