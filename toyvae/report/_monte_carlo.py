"""The Monte Carlo rows: log-weight paths, the ELBO estimator, Var log w, IWAE in k and p(x).

Written against :class:`toyvae.ConjugateModel` only. The statistical rows use median-of-means
radii from the EXACT variance (:func:`toyvae.stats.median_of_means`): distribution-free, with a
false-alarm probability of at most 1e-6 per row, split evenly (Bonferroni) over its assertions.
"""

from __future__ import annotations

import math

import torch

from toyvae.bounds import elbo
from toyvae.estimators import (
    chi_square_divergence,
    iwae_estimates,
    log_weight_cumulants,
    log_weight_moments,
    log_weights,
    log_weights_at,
)
from toyvae.gaussians import as_gaussian
from toyvae.interface import batch_shape
from toyvae.report._variational import random_gaussians, wide_gaussian
from toyvae.report.rows import (
    FALSE_ALARM,
    IDENTITY,
    Budget,
    Row,
    apply,
    options,
    rounding_unit,
    solve_tolerance,
    stream,
    worst,
)
from toyvae.stats import median_of_means
from toyvae.tolerances import magnitude, posterior_condition


def log_weight_rounding(model, x, q, eps: torch.Tensor) -> torch.Tensor:
    """κ(S)·4(D+K)·eps·M for log w at z = m + Lε: M with the terms of log p(x, z), log p(z|x)
    (:func:`toyvae.tolerances.magnitude` at z) and those of log q(z), ‖ε‖², |log det Σ_q| and
    K log 2π."""
    g = as_gaussian(q)
    z = g.loc + apply(g.scale_tril, eps)
    k = model.latent_dim
    extra = eps.square().sum(-1) + g.log_det_cov().abs() + k * math.log(2 * math.pi)
    unit = rounding_unit(model)
    return posterior_condition(model) * unit * (magnitude(model, x, q, z=z) + extra)


def plain_path_rounding(q, eps: torch.Tensor) -> torch.Tensor:
    """The plain path's own error from q's conditioning, at z = m + Lε.

    The plain path forms z = m + Lε and then solves L y = z − m for log q(z) (torch's
    ``log_prob``): z − m carries an absolute error of up to (K + 2)·eps·(|m| + |L||ε|)
    entrywise (K products and two additions), and the triangular solve adds a backward error
    K·eps·|L| acting on y = ε, so ‖Δy‖ ≤ a = ‖L⁻¹‖₂·(K + 2)·eps·‖|m| + 2|L||ε|‖₂ and
    ½‖y‖² errs by ≤ ‖ε‖·a + ½a². ‖L⁻¹‖₂ is κ(L)/‖L‖₂: q's conditioning, not the model's, so
    a badly conditioned q (κ(L) = 3e9 for the far q on scikit-learn's digits) makes the plain
    path, not toyvae's O(K²) one, the inaccurate side.
    """
    g = as_gaussian(q)
    k = g.dim
    unit = (k + 2) * torch.finfo(g.loc.dtype).eps
    inverse_norm = 1 / torch.linalg.svdvals(g.scale_tril).amin(-1)
    size = g.loc.abs() + 2 * apply(g.scale_tril.abs(), eps.abs())
    a = inverse_norm * unit * size.norm(dim=-1)
    return eps.norm(dim=-1) * a + 0.5 * a.square()


# Draws are made in chunks of at most about this many noise entries (ε of shape (n, k, *batch, K)):
# 16 MiB in float64 per array, so a row's memory does not grow with the number of draws or of data
# rows (the docs' "bounded cost").
CHUNK_ELEMENTS = 2**21


def chunked(draw, total: int, per_draw: int) -> torch.Tensor:
    """``draw(n)`` for chunks n summing to ``total``, concatenated along the first axis.

    ``per_draw`` is the number of standard-normal entries one draw uses. Every chunk but the last
    is a multiple of 16 draws: torch's CPU normal generator fills blocks of 16 entries, so
    consecutive chunks from one generator give exactly the numbers of one call for ``total``
    (tests/test_report.py::test_chunked_draws_equal_one_call), and the row's random stream, and
    therefore its numbers, do not depend on the chunk size.
    """
    size = max(16, CHUNK_ELEMENTS // max(per_draw, 1) // 16 * 16)
    counts = [size] * (total // size)
    remainder = total - size * len(counts)
    if remainder:
        # A tail under 16 entries would take the generator's scalar path: fold it into the
        # previous chunk instead.
        if counts and remainder * per_draw < 16:
            counts[-1] += remainder
        else:
            counts.append(remainder)
    return torch.cat([draw(n) for n in counts])


def iwae_draw_count(draws: int, k: int) -> int:
    """⌈draws/k⌉: IWAE_k estimates with the resolution of ``draws`` single-weight estimates.

    Var exp(IWAE_k − log p(x)) = χ²/k exactly, so a median-of-means radius, ∝ √(χ²/(k·n)),
    is the same for n = draws/k estimates of IWAE_k as for ``draws`` estimates of IWAE_1 (at
    the same false-alarm probability), for the same number k·n of log weights.
    """
    return -(-draws // k)


def _points(model, x) -> int:
    """The number of data points in x: the product of its batch shape."""
    return math.prod(batch_shape(model, x))


@stream("check_log_weight_paths")
def check_log_weight_paths(model, x, generator, *, budget=None) -> Row:
    """The O(K²)-per-sample log weights equal log p(x|z) + log p(z) − log q(z), term by term."""
    errors, tols = [], []
    batch = batch_shape(model, x)
    for q in random_gaussians(model, x, generator):
        eps = torch.randn(16, *batch, model.latent_dim, generator=generator, **options(model))
        structured = log_weights_at(model, x, q, eps)
        plain = log_weights_at(model, x, q, eps, method="plain")
        errors.append((structured - plain).abs().reshape(-1))
        tolerance = log_weight_rounding(model, x, q, eps) + plain_path_rounding(q, eps)
        tols.append(tolerance.reshape(-1))
    reason = IDENTITY + ", with the terms of log q(z) at each z, plus the plain path's ‖L⁻¹‖ term"
    return worst("log weights: O(K²) path = plain", torch.cat(errors), torch.cat(tols), reason)


@stream("check_elbo_estimator")
def check_elbo_estimator(model, x, generator, *, budget=None) -> Row:
    """The single-sample estimator log w is unbiased for the ELBO: E log w = ELBO(q)."""
    budget = budget or Budget()
    qs = random_gaussians(model, x, generator)
    alarm = FALSE_ALARM / (len(qs) * _points(model, x))
    errors, tols = [], []
    for q in qs:
        draws = chunked(
            lambda n, q=q: iwae_estimates(model, x, q, 1, n, generator=generator),
            budget.draws,
            _points(model, x) * model.latent_dim,
        )
        variance = log_weight_moments(model, x, q).variance
        estimate = median_of_means(draws, variance, false_alarm=alarm)
        errors.append((estimate.value - elbo(model, x, q)).abs().reshape(-1))
        tols.append((estimate.radius + solve_tolerance(model, x, q)).reshape(-1))
    reason = f"median-of-means radius from exact Var log w, P(false alarm) ≤ {FALSE_ALARM:g}"
    return worst("ELBO estimator unbiased", torch.cat(errors), torch.cat(tols), reason)


@stream("check_log_weight_variance")
def check_log_weight_variance(model, x, generator, *, budget=None) -> Row:
    """The sample variance of log w matches the exact Var log w of log_weight_moments.

    E(log w − ELBO)² = κ₂ with Var (log w − ELBO)² = κ₄ + 2κ₂², the exact cumulants of the
    quadratic form log w (:func:`toyvae.estimators.log_weight_cumulants`); the median of means
    of the squared deviations is held to its radius.
    """
    budget = budget or Budget()
    qs = random_gaussians(model, x, generator)
    alarm = FALSE_ALARM / (len(qs) * _points(model, x))
    errors, tols = [], []
    for q in qs:
        moments = log_weight_moments(model, x, q)
        kappa2, kappa4 = log_weight_cumulants(model, x, q)
        draws = chunked(
            lambda n, q=q: log_weights(model, x, q, n, generator=generator),
            budget.draws,
            _points(model, x) * model.latent_dim,
        )
        squares = (draws - moments.mean).square()
        estimate = median_of_means(squares, kappa4 + 2 * kappa2.square(), false_alarm=alarm)
        errors.append((estimate.value - moments.variance).abs().reshape(-1))
        # Rounding: each log w errs by ≲ the identity tolerance; (ℓ − m)² by 2|ℓ − m|·that.
        rounding = 2 * solve_tolerance(model, x, q) * (10 * kappa2.sqrt() + 1)
        tols.append((estimate.radius + rounding).reshape(-1))
    reason = f"median-of-means radius from exact κ₄ + 2κ₂², P(false alarm) ≤ {FALSE_ALARM:g}"
    return worst("exact variance of log w", torch.cat(errors), torch.cat(tols), reason)


def _seeded(generator: torch.Generator) -> torch.Generator:
    """A fresh generator whose seed is the next draw of ``generator``: replayable noise."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=generator.device).manual_seed(seed)


@stream("check_iwae_monotone")
def check_iwae_monotone(model, x, generator, *, budget=None) -> Row:
    """IWAE_2k ≥ mean of the two IWAE_k on its halves, draw by draw, so L_k increases with k.

    iwae_estimates(k, 2n) and iwae_estimates(2k, n) from the same seed use the same noise, so
    IWAE_2k is the log of the mean of exp of the two IWAE_k: Jensen's inequality, pointwise.
    Its expectation gives L_2k ≥ L_k; with k = 1 on the right, L_k ≥ ELBO.
    """
    budget = budget or Budget()
    # A pointwise property needs few draws; few points keep the (n, 2k, N, D) rounding terms small.
    x = x[:4]
    batch = batch_shape(model, x)
    q = random_gaussians(model, x, generator)[0]
    n = 8
    errors, tols = [], []
    for k in budget.iwae_ks:
        seeded = _seeded(generator)
        state = seeded.get_state()
        halves = iwae_estimates(model, x, q, k, 2 * n, generator=seeded).reshape(n, 2, -1)
        seeded.set_state(state)
        doubled = iwae_estimates(model, x, q, 2 * k, n, generator=seeded).reshape(n, -1)
        seeded.set_state(state)
        eps = torch.randn(n, 2 * k, *batch, model.latent_dim, generator=seeded, **options(model))
        errors.append((halves.mean(1) - doubled).clamp_min(0).reshape(-1))
        # Both sides come from the same log weights, each rounded by at most their tolerance;
        # log-mean-exp is 1-Lipschitz in the sup norm, so twice the largest one bounds it.
        rounding = log_weight_rounding(model, x, q, eps).amax(1).reshape(-1)
        tols.append(2 * rounding)
    reason = "2·(log-weight rounding): log-mean-exp is 1-Lipschitz; error = max(0, violation)"
    return worst("IWAE monotone in k", torch.cat(errors), torch.cat(tols), reason)


@stream("check_iwae_evidence")
def check_iwae_evidence(model, x, generator, *, budget=None) -> Row:
    """exp(IWAE_k) is unbiased for p(x) with variance χ²(p(z|x) ‖ q)/k, so L_k ≤ log p(x).

    R = exp(IWAE_k − log p(x)) = (1/k)Σ w_i/p(x) has E R = 1 and Var R = χ²/k exactly; by
    Jensen L_k = E log R + log p(x) ≤ log p(x). q is wider than the posterior, so χ² is finite.

    Each k gets :func:`iwae_draw_count` = ⌈iwae_draws/k⌉ estimates: their exact variance χ²/k
    makes the median-of-means radius, at the same false-alarm probability, that of k = 1 with
    iwae_draws estimates, so every k is held to the same resolution for the same k·n weights,
    instead of a cost growing with k.
    """
    budget = budget or Budget()
    q = wide_gaussian(model, x, generator)
    chi2 = chi_square_divergence(model, x, q)
    alarm = FALSE_ALARM / (len(budget.iwae_ks) * _points(model, x))
    log_evidence = model.exact(x).log_evidence
    errors, tols = [], []
    for k in budget.iwae_ks:
        draws = chunked(
            lambda n, k=k: iwae_estimates(model, x, q, k, n, generator=generator),
            iwae_draw_count(budget.iwae_draws, k),
            k * _points(model, x) * model.latent_dim,
        )
        ratio = (draws - log_evidence).exp()
        estimate = median_of_means(ratio, chi2 / k, false_alarm=alarm)
        errors.append((estimate.value - 1).abs().reshape(-1))
        # Rounding: log R errs by ≲ the identity tolerance, so R by R times it.
        rounding = 2 * solve_tolerance(model, x, q) * ratio.amax(0)
        tols.append((estimate.radius + rounding).reshape(-1))
    reason = f"median-of-means radius from exact Var = χ²/k, P(false alarm) ≤ {FALSE_ALARM:g}"
    return worst("IWAE: E exp(IWAE_k) = p(x)", torch.cat(errors), torch.cat(tols), reason)
