"""toyvae.interop.sklearn: scikit-learn's FactorAnalysis and PCA as LinearGaussian models."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA, FactorAnalysis

from toyvae.interop.sklearn import from_sklearn

X = load_iris().data  # 150 × 4, bundled: no download

# log p(x) ≈ −5 per row with terms of size ≲ 50 (D log 2π, log det, whitened residuals ≲ 40):
# both sides round sums of ≈ D + K = 8 terms, and scikit-learn inverts C (κ(C) ≲ 1e3 here), so
# 4(D+K)·eps·50·κ(C) ≈ 4e-10 bounds their difference.
TOL = 4 * 8 * np.finfo(float).eps * 50 * 1e3


def test_factor_analysis_log_evidence_and_posterior_mean_match_sklearn():
    """log_evidence = FactorAnalysis.score_samples and E[z|x] = FactorAnalysis.transform."""
    fa = FactorAnalysis(n_components=2, random_state=0).fit(X)
    model = from_sklearn(fa)
    assert np.linalg.cond(fa.get_covariance()) < 1e3
    np.testing.assert_allclose(model.log_evidence(X).numpy(), fa.score_samples(X), rtol=0, atol=TOL)
    weight, offset = model.posterior_mean_map()
    mean = X @ weight.numpy().T + offset.numpy()
    np.testing.assert_allclose(mean, fa.transform(X), rtol=0, atol=TOL)


@pytest.mark.parametrize("variance", ["unbiased", "ml"])
def test_pca_is_probabilistic_pca(variance):
    """PCA as PPCA: "unbiased" matches score_samples; "ml" is Tipping & Bishop's maximum
    (its log-likelihood is higher, and equals the closed form for divisor N)."""
    pca = PCA(n_components=2).fit(X)
    model = from_sklearn(pca, variance=variance)
    mean = model.log_evidence(X).mean().item()
    if variance == "unbiased":
        np.testing.assert_allclose(model.log_evidence(X).numpy(), pca.score_samples(X), atol=TOL)
    else:
        n, d, k = X.shape[0], X.shape[1], 2
        eigenvalues = np.linalg.eigvalsh(np.cov(X.T, bias=True))[::-1]
        sigma2 = eigenvalues[k:].mean()
        closed = -0.5 * (
            d * np.log(2 * np.pi) + np.log(eigenvalues[:k]).sum() + (d - k) * np.log(sigma2) + d
        )
        assert mean == pytest.approx(closed, abs=TOL)
        assert mean > pca.score(X)
        assert n == pca.n_samples_


def test_pca_warnings_and_errors():
    """No variance choice, whiten=True and a zero eigenvalue gap warn; σ² = 0 is an error."""
    with pytest.warns(UserWarning, match="N − 1"):
        from_sklearn(PCA(n_components=2).fit(X))
    with pytest.warns(UserWarning, match="whiten=True"):
        from_sklearn(PCA(n_components=2, whiten=True).fit(X), variance="unbiased")
    flat = np.c_[X[:, :2], np.zeros((150, 2))]  # two zero eigenvalues: σ² = 0 at K = 2
    with pytest.raises(ValueError, match="noise_variance_ = 0"):
        from_sklearn(PCA(n_components=2).fit(flat), variance="ml")
    with pytest.raises(ValueError, match="noise_variance_ = 0"):
        from_sklearn(PCA(n_components=4).fit(X), variance="ml")


def test_bad_estimators_are_refused_by_name():
    """Another estimator is a TypeError, an unfitted one or a stray option a ValueError."""
    with pytest.raises(TypeError, match="estimator must be a fitted"):
        from_sklearn(object())
    with pytest.raises(ValueError, match="must be fitted"):
        from_sklearn(FactorAnalysis())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = FactorAnalysis(n_components=1, random_state=0).fit(X)
    with pytest.raises(ValueError, match="variance applies to PCA only"):
        from_sklearn(fa, variance="ml")
    with pytest.raises(ValueError, match="variance must be one of"):
        from_sklearn(PCA(1).fit(X), variance="n-1")
    assert from_sklearn(fa).weight.dtype == torch.float64
