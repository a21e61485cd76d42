"""toyvae: check variational inference against exact answers on linear-Gaussian models.

log p_θ(x) = ELBO(q) + KL(q ‖ p_θ(z|x)), computed exactly for every Gaussian q.

The names below are imported on first use, not at ``import toyvae``: the ``toyvae`` command's
``--help`` and ``--version`` then answer without importing torch, and the subpackages
(``toyvae.testing``, ``toyvae.report``, ``toyvae.interop``, …) are reachable as attributes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Each public name and the module it lives in (one concept per module).
_EXPORTS = {
    "ConjugateModel": "toyvae.interface",
    "ESTIMATORS": "toyvae.gradients",
    "Exact": "toyvae.interface",
    "Gaussian": "toyvae.gaussians",
    "GradientMoments": "toyvae.gradients",
    "HierarchicalLinearGaussian": "toyvae.hierarchical",
    "LayerwiseELBO": "toyvae.hierarchical",
    "LinearGaussian": "toyvae.model",
    "LinearGaussianEncoder": "toyvae.encoder",
    "LinearGaussianSSM": "toyvae.state_space",
    "LogWeightMoments": "toyvae.estimators",
    "MarkovGaussian": "toyvae.state_space",
    "MeanEstimate": "toyvae.stats",
    "Smoothed": "toyvae.state_space",
    "StructuredGaussian": "toyvae.interface",
    "TopDownGaussian": "toyvae.hierarchical",
    "as_gaussian": "toyvae.gaussians",
    "chi_square_divergence": "toyvae.estimators",
    "elbo": "toyvae.bounds",
    "elbo_surrogate": "toyvae.gradients",
    "elbo_surrogate_at": "toyvae.gradients",
    "entropy": "toyvae.gaussians",
    "expected_log_likelihood": "toyvae.bounds",
    "gauss_hermite_noise": "toyvae.stats",
    "gaussian_kl": "toyvae.gaussians",
    "gradient_draws": "toyvae.gradients",
    "gradient_estimator_moments": "toyvae.gradients",
    "iwae_estimate": "toyvae.estimators",
    "iwae_estimates": "toyvae.estimators",
    "iwae_first_order_bias": "toyvae.estimators",
    "kl_to_posterior": "toyvae.bounds",
    "kl_to_prior": "toyvae.bounds",
    "layerwise_elbo": "toyvae.hierarchical",
    "load": "toyvae.io",
    "log_weight_moments": "toyvae.estimators",
    "log_weights": "toyvae.estimators",
    "log_weights_at": "toyvae.estimators",
    "markov_elbo": "toyvae.state_space",
    "markov_kl_to_posterior": "toyvae.state_space",
    "median_of_means": "toyvae.stats",
    "median_of_means_plan": "toyvae.stats",
}

# Subpackages and modules reachable as attributes of ``toyvae`` without an explicit import.
_SUBMODULES = (
    "aggregate",
    "interop",
    "io",
    "learning",
    "reference",
    "report",
    "snr",
    "strategies",
    "testing",
    "tolerances",
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"toyvae.{name}")
    raise AttributeError(f"module 'toyvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
