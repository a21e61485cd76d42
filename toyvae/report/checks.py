r"""The verification battery: the rows ``toyvae report`` runs, in order, on each model.

Every check has the signature ``check(model, x, generator, *, budget) -> Row``: a model that
implements :class:`toyvae.ConjugateModel`, data x of shape (*batch, *data_event_shape), a
``torch.Generator`` for everything random, and a :class:`Budget` (sample sizes). It carries its
random-stream key in a ``stream`` attribute: the command seeds its generator from (``--seed``,
model, key), never from the function's name. A row holds the worst error found, the tolerance
it was held to, why that tolerance, and whether the property held.

The checks live with their concern: the exact identities, the Monte Carlo estimators, the
gradient estimators (written against the model interface only, so they run on every family),
and the classic questions (linear-Gaussian rows, skipped for other families); the fixed
problems have no model. This module lists them and re-exports their names.

Two kinds of tolerance:

- Exact identities are held to ``κ(S)·4(D+K)·eps·M``, M the sum of the absolute values of the
  terms (:func:`toyvae.tolerances.identity_tolerance`) and κ(S) the condition number of the
  posterior's Cholesky factor, against which KL(q ‖ p(z|x)), log p(z|x) and the log weights
  solve (:func:`toyvae.tolerances.posterior_condition`). Comparisons with the dense reference
  use instead the condition number its explicit inverses amplify errors by.
- Monte Carlo checks use median-of-means radii from the EXACT variance
  (:func:`toyvae.stats.median_of_means`): distribution-free, with a false-alarm
  probability of at most 1e-6 per row, split evenly (Bonferroni) over the row's assertions.
"""

from __future__ import annotations

from toyvae.report._classic import (
    check_aggregate_prior,
    check_elbo_surgery,
    check_fisher,
    check_joint_kl,
)
from toyvae.report._gradients import check_gradients
from toyvae.report._identities import (
    check_bayes_rule,
    check_identity,
    check_kl_nonnegative,
    check_reference,
    check_tightness,
)
from toyvae.report._monte_carlo import (
    check_elbo_estimator,
    check_iwae_evidence,
    check_iwae_monotone,
    check_log_weight_paths,
    check_log_weight_variance,
)
from toyvae.report._problems import (
    problem_counterexample_ascent,
    problem_counterexample_optima,
    problem_ppca_elbo,
    problem_ppca_stationary,
)
from toyvae.report._series import interpolation
from toyvae.report._variational import random_gaussians
from toyvae.report.rows import FALSE_ALARM, QUICK, Budget, Row, stream  # noqa: F401  (read here by the command)

__all__ = [
    "CHECKS",
    "PROBLEMS",
    "Budget",
    "Row",
    "check_aggregate_prior",
    "check_bayes_rule",
    "check_elbo_estimator",
    "check_elbo_surgery",
    "check_fisher",
    "check_gradients",
    "check_identity",
    "check_iwae_evidence",
    "check_iwae_monotone",
    "check_joint_kl",
    "check_kl_nonnegative",
    "check_log_weight_paths",
    "check_log_weight_variance",
    "check_reference",
    "check_tightness",
    "interpolation",
    "problem_counterexample_ascent",
    "problem_counterexample_optima",
    "problem_ppca_elbo",
    "problem_ppca_stationary",
    "random_gaussians",
    "stream",
]

CHECKS = (
    check_identity,
    check_tightness,
    check_kl_nonnegative,
    check_bayes_rule,
    check_reference,
    check_log_weight_paths,
    check_elbo_estimator,
    check_log_weight_variance,
    check_iwae_monotone,
    check_iwae_evidence,
    check_gradients,
    check_aggregate_prior,
    check_elbo_surgery,
    check_joint_kl,
    check_fisher,
)
"""The rows run on each model, in the table's order; each function carries its ``stream``."""

PROBLEMS = (
    problem_counterexample_optima,
    problem_counterexample_ascent,
    problem_ppca_stationary,
    problem_ppca_elbo,
)
"""The classic questions on fixed problems, ``problem(*, budget) -> Row``, shown after every
model."""
