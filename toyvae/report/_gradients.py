"""The gradient row: reparameterisation, path-derivative and score-function gradients are
unbiased for ∇ELBO, held to median-of-means radii from their exact variances (closed form for
the first two at any K; Gauss–Hermite quadrature with 5^K nodes for the score function).

Written against :class:`toyvae.ConjugateModel` only.
"""

from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from toyvae.bounds import elbo
from toyvae.gradients import (
    CLOSED_FORM_ESTIMATORS,
    ESTIMATORS,
    closed_form_gradient_moments,
    elbo_surrogate,
    gradient_draws,
    gradient_estimator_moments,
)
from toyvae.report._variational import random_gaussians
from toyvae.report.rows import (
    FALSE_ALARM,
    Budget,
    Row,
    rounding_unit,
    solve_tolerance,
    stream,
    worst,
)
from toyvae.stats import median_of_means_plan


@stream("check_gradients")
def check_gradients(model, x, generator, *, budget=None) -> Row:
    """Reparameterisation, path-derivative and score-function gradients are unbiased for ∇ELBO.

    For q's mean and the lower triangle of its scale: the median of group means of the draws
    against the exact gradient of the closed-form ELBO by autograd, with the radius from the
    exact per-coordinate variance. The reparameterisation and path-derivative draws are of
    degree ≤ 2 in ε and their variance has a closed form at any K
    (:func:`toyvae.gradients.closed_form_gradient_moments`); the score-function draws have
    degree 4 and their variance comes from Gauss–Hermite quadrature of order 5 with 5^K nodes,
    so that estimator is left out (the reason says so) for K > ``budget.max_quadrature_dim``.
    A group mean's gradient is the gradient of the group's mean surrogate, so one backward
    pass per group, not per draw.
    """
    budget = budget or Budget()
    k = model.latent_dim
    estimators = [
        name
        for name in ESTIMATORS
        if name in CLOSED_FORM_ESTIMATORS or k <= budget.max_quadrature_dim
    ]
    points = x[: budget.gradient_points]
    base = random_gaussians(model, points, generator)[0]
    loc = base.loc.detach().clone().requires_grad_(True)
    raw = base.scale_tril.detach().clone().requires_grad_(True)
    # Only the lower triangle is a parameter: its upper entries get zero gradient everywhere.
    q = MultivariateNormal(loc, scale_tril=torch.tril(raw))
    exact = torch.autograd.grad(elbo(model, points, q).sum(), (loc, raw))
    coordinates = len(estimators) * loc.shape[:-1].numel() * (k + k * (k + 1) // 2)
    groups, factor = median_of_means_plan(budget.gradient_draws, FALSE_ALARM / coordinates)
    size = budget.gradient_draws // groups
    unit = rounding_unit(model)
    scale = solve_tolerance(model, points, q).detach()
    errors, tols = [], []
    for estimator in estimators:
        if estimator in CLOSED_FORM_ESTIMATORS:
            moments = closed_form_gradient_moments(model, points, q, estimator=estimator)
        else:
            moments = gradient_estimator_moments(model, points, q, (loc, raw), estimator=estimator)
        surrogate = elbo_surrogate(
            model, points, q, groups * size, estimator=estimator, generator=generator
        )
        group_means = surrogate.reshape(groups, size, *surrogate.shape[1:]).mean(1)
        draws = gradient_draws(group_means, (loc, raw))
        for d, e, var in zip(draws, exact, moments.variance, strict=True):
            error = (d.median(0).values - e).abs()
            # Rounding: eps·M of the ELBO per unit gradient, plus that of the draws' size.
            rounding = scale.reshape(*scale.shape, *([1] * (e.ndim - scale.ndim)))
            rounding = rounding + unit * (e.abs() + var.sqrt())
            errors.append(error.reshape(-1))
            tols.append((factor * var.sqrt() + rounding).reshape(-1))
    reason = (
        "median-of-means radius from the exact variance (closed form; score function: "
        f"5^K-node quadrature), P ≤ {FALSE_ALARM:g}"
    )
    if len(estimators) < len(ESTIMATORS):
        reason += (
            f"; score function left out at K={k}: 5^K = {float(5**k):.3g} quadrature nodes "
            f"(run for K ≤ {budget.max_quadrature_dim})"
        )
    return worst("gradient estimators unbiased", torch.cat(errors), torch.cat(tols), reason)
