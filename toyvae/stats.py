r"""Tools for exact and stochastic checks: median-of-means intervals and Gauss–Hermite nodes.

- :func:`median_of_means` decides whether Monte Carlo draws are consistent with an exact mean,
  given the exact variance, with a distribution-free false-alarm bound (Chebyshev per group,
  a binomial tail over groups): no normal approximation.
- :func:`gauss_hermite_noise` gives nodes and weights that integrate polynomials in
  ε ~ N(0, I) exactly, which turns the moments of single-sample estimators into finite sums.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, stats

from toyvae._checks import check_count, describe

__all__ = ["MeanEstimate", "gauss_hermite_noise", "median_of_means", "median_of_means_plan"]


# -- checking Monte Carlo means against exact ones --------------------------------------------


class MeanEstimate(NamedTuple):
    """A robust mean estimate; |value − true mean| ≤ radius except with the stated probability."""

    value: torch.Tensor
    radius: float
    groups: int


@functools.lru_cache(maxsize=64)
def median_of_means_plan(n: int, false_alarm: float) -> tuple[int, float]:
    """The odd group count g and radius factor 1/√(m p) (radius = factor · σ) for n draws.

    The per-group Chebyshev level p and g are chosen to minimise the radius.

    With m = n // g samples a group mean misses by more than σ/√(m p) with probability ≤ p
    (Chebyshev); the median misses only if ≥ (g+1)/2 groups do: P ≤ P(Bin(g, p) ≥ (g+1)/2).
    For each g the largest p with that tail ≤ false_alarm is found. Use it directly when the
    group means are formed elsewhere (e.g. gradients of group-mean surrogates).
    """
    best = (1, false_alarm, 1 / math.sqrt(n * false_alarm))
    # The optimum sits near g ≈ 2 log(1/false_alarm) (g = 25 at 1e-6); 301 bounds the search.
    for g in range(3, min(n, 302), 2):
        need = (g + 1) // 2

        def tail_excess(p, g=g, need=need):
            return stats.binom.sf(need - 1, g, p) - false_alarm

        if tail_excess(0.5) <= 0:
            p = 0.5
        else:
            p = optimize.brentq(tail_excess, 1e-300, 0.5, xtol=1e-15, rtol=1e-12)
        factor = 1 / math.sqrt((n // g) * p)
        if factor < best[2]:
            best = (g, p, factor)
    return best[0], best[2]


def median_of_means(values, variance, *, false_alarm=1e-6, dim=0) -> MeanEstimate:
    r"""Median-of-means estimate of E[values] with a distribution-free error radius.

    For n i.i.d. draws with variance σ² split into g groups of m = ⌊n/g⌋, each group mean errs
    by more than r = σ/√(m p) with probability ≤ p (Chebyshev), and the median of the g group
    means errs by more than r only if at least (g+1)/2 groups do:

    .. math::
        P(|\hat\mu_{\mathrm{MoM}} - \mu| > r) \le P(\mathrm{Bin}(g, p) \ge (g+1)/2)
            \le \text{false\_alarm}

    g and p are chosen from n and the false-alarm probability only (never from the data), to
    minimise r; for false_alarm = 1e-6 and large n, r ≈ 15 σ/√n. Requires only the exact
    variance, no normal approximation. ``variance`` may be a tensor broadcasting with the
    remaining axes; ``radius`` is then returned as a tensor.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch tensor, got {describe(values)}")
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must lie in (0, 1), got {false_alarm!r}")
    values = values.movedim(dim, 0)
    n = values.shape[0]
    groups, factor = median_of_means_plan(n, false_alarm)
    m = n // groups
    means = values[: groups * m].reshape(groups, m, *values.shape[1:]).mean(1)
    std = torch.as_tensor(variance, dtype=values.dtype, device=values.device).sqrt()
    return MeanEstimate(means.median(0).values, std * factor, groups)


# -- exact expectations of polynomials in ε ---------------------------------------------------


def gauss_hermite_noise(dim, order, *, dtype=torch.float64, device=None):
    r"""Tensor-product Gauss–Hermite nodes and weights for ε ~ N(0, I_dim).

    .. math::
        \mathbb E f(\varepsilon) = \sum_j \omega_j f(\varepsilon_j)

    exactly (to rounding) when f is a polynomial of degree ≤ 2·order − 1 in each coordinate.
    Every single-sample ELBO gradient estimator here is a polynomial of degree ≤ 4 in ε, so
    ``order = 5`` gives its exact mean and variance. Returns ``(nodes, weights)`` of shapes
    (order**dim, dim) and (order**dim,).
    """
    dim = check_count(dim, "dim")
    order = check_count(order, "order")
    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / w.sum()  # weight function exp(−x²/2) normalised to the N(0, 1) density
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], -1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), -1), -1).ravel()
    options = {"dtype": dtype, "device": device}
    return torch.as_tensor(nodes, **options), torch.as_tensor(weights, **options)
