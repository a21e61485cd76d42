r"""scikit-learn's fitted ``FactorAnalysis`` and ``PCA`` as :class:`toyvae.LinearGaussian` models.

Both are the linear-Gaussian model p(z) = N(0, I_K), p(x|z) = N(Wz + b, Ψ):

- ``FactorAnalysis``: W = ``components_``ᵀ, b = ``mean_``, Ψ = diag(``noise_variance_``). Its
  ``score_samples`` is log p(x) and its ``transform`` the posterior mean E[z|x].
- ``PCA`` as probabilistic PCA (Tipping & Bishop, 1999): with U = ``components_``ᵀ, the
  eigenvalues λ = ``explained_variance_`` and σ² = ``noise_variance_`` (the mean of the
  discarded eigenvalues), W = U diag(√(λ − σ²)), b = ``mean_``, Ψ = σ² I. That is the model of
  ``get_covariance`` and ``score_samples``.

scikit-learn's PCA computes λ and σ² from the covariance with divisor N − 1; the
maximum-likelihood PPCA solution uses N. ``variance="unbiased"`` keeps scikit-learn's numbers
(the model its ``score_samples`` evaluates), ``variance="ml"`` rescales both by (N − 1)/N (the
maximum of the likelihood). Without a choice, ``"unbiased"`` is used with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np

from toyvae.model import LinearGaussian

__all__ = ["from_sklearn"]

_VARIANCES = ("unbiased", "ml")


def from_sklearn(estimator, *, variance: str | None = None) -> LinearGaussian:
    """A fitted ``sklearn.decomposition.FactorAnalysis`` or ``PCA`` as a ``LinearGaussian``.

    Parameters
    ----------
    estimator : FactorAnalysis or PCA
        Fitted (it has ``components_``). Parameters become float64 tensors.
    variance : {"unbiased", "ml"}, optional
        PCA only: scikit-learn's N − 1 convention (what its ``score_samples`` evaluates) or the
        maximum-likelihood N. ``None``: ``"unbiased"``, with a ``UserWarning`` saying so.

    Raises
    ------
    TypeError
        ``estimator`` is not a FactorAnalysis or PCA (or a subclass).
    ValueError
        It is not fitted; or a PCA keeps every component (σ² = 0: no noise, so no density); or
        ``variance`` is given for a FactorAnalysis, or is not one of the two choices.

    Warns
    -----
    UserWarning
        PCA with ``whiten=True`` (its ``score_samples`` is not the PPCA likelihood, the model
        returned here is); PCA with a component whose eigenvalue does not exceed σ² (a zero
        column of W); and PCA without a ``variance`` choice.
    """
    from sklearn.decomposition import PCA, FactorAnalysis

    if not isinstance(estimator, FactorAnalysis | PCA):
        raise TypeError(
            "estimator must be a fitted sklearn.decomposition.FactorAnalysis or PCA, got "
            f"{type(estimator).__name__}"
        )
    name = type(estimator).__name__
    if not hasattr(estimator, "components_"):
        raise ValueError(f"estimator must be fitted: this {name} has no components_ (call fit)")
    if isinstance(estimator, FactorAnalysis):
        if variance is not None:
            raise ValueError(
                f"variance applies to PCA only, got variance={variance!r} for a FactorAnalysis"
            )
        return _factor_analysis(estimator)
    if variance is not None and variance not in _VARIANCES:
        raise ValueError(f"variance must be one of {_VARIANCES} or None, got {variance!r}")
    return _pca(estimator, variance)


def _float64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _factor_analysis(estimator) -> LinearGaussian:
    weight = _float64(estimator.components_).T
    return LinearGaussian(weight, _float64(estimator.mean_), _float64(estimator.noise_variance_))


def _pca(estimator, variance: str | None) -> LinearGaussian:
    eigenvalues = _float64(estimator.explained_variance_)
    sigma2 = float(estimator.noise_variance_)
    k, d = estimator.components_.shape
    if not sigma2 > 0:
        raise ValueError(
            f"estimator is a PCA with noise_variance_ = {sigma2:g} ({k} components of "
            f"{d} features from {estimator.n_samples_} samples keep all the variance): "
            "probabilistic PCA needs σ² > 0; fit with fewer components"
        )
    if variance is None:
        warnings.warn(
            "from_sklearn(PCA): using scikit-learn's variances (covariance divisor N − 1), the "
            "model its score_samples evaluates; pass variance='ml' for the maximum-likelihood "
            "PPCA (divisor N) or variance='unbiased' to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    elif variance == "ml":
        n = estimator.n_samples_
        eigenvalues, sigma2 = eigenvalues * (n - 1) / n, sigma2 * (n - 1) / n
    if estimator.whiten:
        warnings.warn(
            "from_sklearn(PCA): this PCA has whiten=True; the returned model is the PPCA fit "
            "(W = U diag(√(λ − σ²)), whitening only changes transform), but scikit-learn's "
            "score_samples and get_covariance for whiten=True are not its likelihood",
            UserWarning,
            stacklevel=3,
        )
    excess = eigenvalues - sigma2
    flat = np.flatnonzero(excess <= 0)
    if flat.size:
        warnings.warn(
            f"from_sklearn(PCA): component{'s' if flat.size > 1 else ''} "
            f"{', '.join(map(str, flat))} ha{'ve' if flat.size > 1 else 's'} eigenvalue "
            f"≤ σ² = {sigma2:.3g} (no gap): W's column is zero there, so the model has fewer "
            "effective factors than n_components",
            UserWarning,
            stacklevel=3,
        )
    weight = _float64(estimator.components_).T * np.sqrt(np.maximum(excess, 0.0))
    return LinearGaussian(weight, _float64(estimator.mean_), sigma2)
