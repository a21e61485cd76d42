r"""Is maximising the ELBO the same as maximising log p(x)? Exact answers for linear models.

The ELBO is log p_θ(x) − KL(q ‖ p_θ(z|x)). Ascending it in θ with q held at the exact posterior
follows ∇_θ log p_θ(x) exactly (Fisher's identity). With a restricted family for q it does not:
the KL term rewards models whose posteriors the family fits, at the expense of log p_θ(x).

This module gathers the names of that topic (docs/elbo-vs-likelihood.md); each lives in the
module of its concept, and is importable from here too:

- :mod:`toyvae.gaps`: :func:`~toyvae.gaps.best_mean_field`, the best diagonal-covariance q per
  data point in closed form, and :func:`~toyvae.gaps.inference_gaps`, the approximation and
  amortisation gaps of Cremer et al. (2018);
- :mod:`toyvae.counterexample`: the two-latent model x = w(z₁ + z₂) + ε on which mean-field
  ELBO ascent lowers log p(x), its objectives and optima;
- :mod:`toyvae.ppca`: :func:`~toyvae.ppca.ppca_maximum_likelihood`, the closed-form ML
  solution of Tipping & Bishop (1999), and data with a given spectrum;
- :mod:`toyvae.training`: :func:`~toyvae.training.fit_linear_vae`, ELBO ascent of a linear VAE
  with the exact ELBO or the single-sample estimator, and its history of exact ELBO and
  log p(x).
"""

from toyvae.counterexample import (
    CounterexampleObjectives,
    CounterexampleOptima,
    counterexample_model,
    counterexample_objectives,
    counterexample_optima,
)
from toyvae.gaps import Gaps, best_mean_field, inference_gaps
from toyvae.ppca import data_with_spectrum, ppca_maximum_likelihood
from toyvae.training import Fit, History, fit_linear_vae

__all__ = [
    "CounterexampleObjectives",
    "CounterexampleOptima",
    "Fit",
    "Gaps",
    "History",
    "best_mean_field",
    "counterexample_model",
    "counterexample_objectives",
    "counterexample_optima",
    "data_with_spectrum",
    "fit_linear_vae",
    "inference_gaps",
    "ppca_maximum_likelihood",
]
