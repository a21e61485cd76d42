"""toyvae: check variational inference against exact answers on linear-Gaussian models.

log p_θ(x) = ELBO(q) + KL(q ‖ p_θ(z|x)), computed exactly for every Gaussian q.
"""

from toyvae.bounds import elbo, expected_log_likelihood, kl_to_posterior, kl_to_prior
from toyvae.encoder import LinearGaussianEncoder
from toyvae.estimators import (
    LogWeightMoments,
    chi_square_divergence,
    iwae_estimate,
    iwae_estimates,
    iwae_first_order_bias,
    log_weight_moments,
    log_weights,
    log_weights_at,
)
from toyvae.gaussians import Gaussian, as_gaussian, entropy, gaussian_kl
from toyvae.gradients import (
    ESTIMATORS,
    GradientMoments,
    elbo_surrogate,
    elbo_surrogate_at,
    gradient_draws,
    gradient_estimator_moments,
)
from toyvae.hierarchical import (
    HierarchicalLinearGaussian,
    LayerwiseELBO,
    TopDownGaussian,
    layerwise_elbo,
)
from toyvae.interface import ConjugateModel, Exact, StructuredGaussian
from toyvae.model import LinearGaussian
from toyvae.state_space import (
    LinearGaussianSSM,
    MarkovGaussian,
    Smoothed,
    markov_elbo,
    markov_kl_to_posterior,
)
from toyvae.stats import MeanEstimate, gauss_hermite_noise, median_of_means, median_of_means_plan

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "ConjugateModel",
    "Exact",
    "Gaussian",
    "GradientMoments",
    "HierarchicalLinearGaussian",
    "LayerwiseELBO",
    "LinearGaussian",
    "LinearGaussianEncoder",
    "LinearGaussianSSM",
    "LogWeightMoments",
    "MarkovGaussian",
    "MeanEstimate",
    "Smoothed",
    "StructuredGaussian",
    "TopDownGaussian",
    "as_gaussian",
    "chi_square_divergence",
    "elbo",
    "elbo_surrogate",
    "elbo_surrogate_at",
    "entropy",
    "expected_log_likelihood",
    "gauss_hermite_noise",
    "gaussian_kl",
    "gradient_draws",
    "gradient_estimator_moments",
    "iwae_estimate",
    "iwae_estimates",
    "iwae_first_order_bias",
    "kl_to_posterior",
    "kl_to_prior",
    "layerwise_elbo",
    "log_weight_moments",
    "log_weights",
    "log_weights_at",
    "markov_elbo",
    "markov_kl_to_posterior",
    "median_of_means",
    "median_of_means_plan",
]
