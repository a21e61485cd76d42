"""toyvae: check variational inference against exact answers on linear-Gaussian models.

log p_θ(x) = ELBO(q) + KL(q ‖ p_θ(z|x)), computed exactly for every Gaussian q.
"""

from toyvae.bounds import elbo, expected_log_likelihood, kl_to_posterior, kl_to_prior
from toyvae.gaussians import Gaussian, as_gaussian, entropy, gaussian_kl
from toyvae.model import LinearGaussian

__version__ = "0.1.0"

__all__ = [
    "Gaussian",
    "LinearGaussian",
    "as_gaussian",
    "elbo",
    "entropy",
    "expected_log_likelihood",
    "gaussian_kl",
    "kl_to_posterior",
    "kl_to_prior",
]
