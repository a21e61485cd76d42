r"""Check a sampler's draws of z for data x against the exact posterior p_θ(z|x).

For any model of the interface (:class:`toyvae.ConjugateModel`: a linear-Gaussian, hierarchical
or state-space model) the posterior is N(μ, Σ), Σ = S Sᵀ, known exactly. A sampler's draws,
possibly autocorrelated chains, are reduced to per-draw statistics whose exact means and
variances under N(μ, Σ) are known, and each mean is compared with its exact value by a z-score
whose standard error is the *exact* standard deviation over √ESS:

- means: zᵢ − μᵢ, variance Σᵢᵢ;
- covariances: (zᵢ − μᵢ)(zⱼ − μⱼ) − Σᵢⱼ for i ≤ j, variance ΣᵢᵢΣⱼⱼ + Σᵢⱼ² (Isserlis), third
  cumulant 2Σᵢⱼ(Σᵢⱼ² + 3ΣᵢᵢΣⱼⱼ);
- the whitened test: u = S⁻¹(z − μ) must be N(0, I). For every coordinate uᵢ and for ‖u‖²,
  the fraction of draws below the exact 10 %, 50 % and 90 % quantiles (of N(0, 1) and χ²_K)
  is compared with 0.1, 0.5 and 0.9: indicator variables of variance p(1 − p). These see the
  shape of the distribution, not only its first two moments.

The effective sample size of each statistic's chain is Pyro's
(``pyro.ops.stats.effective_sample_size``: Geyer's initial monotone sequence over the
autocorrelations, with several chains combined as in Stan), or one you pass. Exact draws
(independent) give ESS ≈ the number of draws.

**False-alarm probability.** With m statistics in all, each is tested at level α/m
(Bonferroni), so a correct sampler fails with probability at most α (``false_alarm``) *to the
accuracy of the normal approximation* that the Markov chain central limit theorem gives the
mean of each statistic. The approximation's first error term, the skewness γ of the
statistic's mean (γ₁/√ESS, γ₁ the exact per-draw skewness), is corrected by a Cornish–Fisher
shift of the z-score, (z²_crit − 1) γ / 6. Below ``min_ess`` effective draws (default 100)
for any statistic the check does not trust the approximation and fails, saying so: run the
sampler longer. A stuck chain has no effective draws and fails that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from scipy import stats

from toyvae._checks import describe
from toyvae.interface import batch_shape, check_model, for_data

__all__ = ["QUANTILE_LEVELS", "SamplerCheck", "assert_sampler", "check_sampler", "pyro_ess"]

QUANTILE_LEVELS = (0.1, 0.5, 0.9)


class SamplerCheck(NamedTuple):
    """The verdict of :func:`check_sampler`; ``str(check)`` is the report.

    Attributes
    ----------
    passed : bool
        Every |adjusted z| ≤ ``threshold``, every ESS ≥ the minimum, every draw finite.
    names : list of str
        One name per statistic, e.g. ``"mean z[1]"``, ``"cov z[0],z[1]"``,
        ``"P(u[2] <= q0.9)"``, ``"P(|u|^2 <= q0.5)"``, with ``" at x[i]"`` for a batch of x.
    z : tensor
        (m,): each statistic's z-score after the Cornish–Fisher shift.
    ess : tensor
        (m,): each statistic's effective sample size.
    threshold : float
        Φ⁻¹(1 − α/(2m)): the Bonferroni critical value.
    min_ess : float
        The least ESS the check accepts.
    false_alarm : float
        α, the probability that a correct sampler fails (to the normal approximation).
    message : str
        The report: verdict, the worst statistics, the ESS range.
    """

    passed: bool
    names: list
    z: torch.Tensor
    ess: torch.Tensor
    threshold: float
    min_ess: float
    false_alarm: float
    message: str

    def __str__(self) -> str:
        return self.message


def pyro_ess(values: torch.Tensor) -> torch.Tensor:
    """Pyro's effective sample size of each statistic: ``values`` (chains, draws, m) → (m,).

    ``pyro.ops.stats.effective_sample_size``; needs the ``pyro`` extra
    (``pip install toyvae[pyro]``). A constant chain has none: 0, not NaN.
    """
    try:
        from pyro.ops.stats import effective_sample_size
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "check_sampler's default effective sample size is Pyro's: pip install 'toyvae[pyro]' "
            "or pass ess=your_function"
        ) from error
    return torch.nan_to_num(effective_sample_size(values, chain_dim=0, sample_dim=1), nan=0.0)


class _Statistics(NamedTuple):
    values: torch.Tensor  # (C, N, m): per-draw statistic minus its exact mean
    variance: torch.Tensor  # (m,) exact
    skewness: torch.Tensor  # (m,) exact, per draw
    names: list


def _check_draws(draws, model, x) -> torch.Tensor:
    batch = tuple(batch_shape(model, x))
    expected = f"(chains, draws, *batch, K) with (*batch, K) = {(*batch, model.latent_dim)}"
    if not isinstance(draws, torch.Tensor) or not draws.is_floating_point():
        raise TypeError(
            f"draws must be a floating-point torch tensor {expected}, got {describe(draws)}"
        )
    if draws.ndim != 3 + len(batch) or tuple(draws.shape[2:]) != (*batch, model.latent_dim):
        raise ValueError(
            f"draws must have shape {expected} (one chain: draws[None]; a state-space model's "
            f"latents flattened in time order, z.flatten(-2)), got {describe(draws)}"
        )
    if draws.shape[1] < 4:
        raise ValueError(f"draws must hold at least 4 draws per chain, got {describe(draws)}")
    return draws.to(dtype=model.dtype, device=model.device)


def _statistics(draws: torch.Tensor, loc: torch.Tensor, tril: torch.Tensor) -> _Statistics:
    """Per-draw statistics at one data point: draws (C, N, K), posterior N(loc, tril trilᵀ)."""
    k = loc.shape[-1]
    cov = tril @ tril.mT
    centred = draws - loc
    values, variance, skewness, names = [centred], [cov.diagonal()], [torch.zeros(k)], []
    names += [f"mean z[{i}]" for i in range(k)]

    rows, cols = torch.triu_indices(k, k)
    a, b, c = cov[rows, rows], cov[cols, cols], cov[rows, cols]
    values.append(centred[..., rows] * centred[..., cols] - c)
    product_variance = a * b + c * c
    variance.append(product_variance)
    skewness.append(2 * c * (c * c + 3 * a * b) / product_variance**1.5)
    names += [f"cov z[{i}],z[{j}]" for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]

    whitened = torch.linalg.solve_triangular(tril, centred.unsqueeze(-1), upper=False)
    whitened = whitened.squeeze(-1)
    levels = torch.tensor(QUANTILE_LEVELS, dtype=draws.dtype, device=draws.device)
    normal = torch.tensor(stats.norm.ppf(QUANTILE_LEVELS), dtype=draws.dtype, device=draws.device)
    chi2 = torch.tensor(stats.chi2.ppf(QUANTILE_LEVELS, k), dtype=draws.dtype, device=draws.device)
    below = (whitened.unsqueeze(-1) <= normal).flatten(-2)  # (C, N, K·3), coordinate-major
    radius = whitened.square().sum(-1, keepdim=True)
    below = torch.cat([below, radius <= chi2], -1).to(draws.dtype)
    p = levels.repeat(k + 1)
    values.append(below - p)
    variance.append(p * (1 - p))
    skewness.append((1 - 2 * p) / (p * (1 - p)).sqrt())
    targets = [f"u[{i}]" for i in range(k)] + ["|u|^2"]
    names += [f"P({t} <= q{level})" for t in targets for level in QUANTILE_LEVELS]
    return _Statistics(
        torch.cat(values, -1),
        torch.cat([v.to(draws.dtype) for v in variance]),
        torch.cat([s.to(draws.dtype) for s in skewness]),
        names,
    )


def check_sampler(
    model,
    x,
    draws,
    *,
    false_alarm: float = 1e-6,
    min_ess: float = 100.0,
    ess: Callable | None = None,
) -> SamplerCheck:
    r"""Decide whether ``draws`` come from the exact posterior p_θ(z|x), at a stated false alarm.

    Parameters
    ----------
    model : ConjugateModel
        Any family of the interface (an unbound state-space model is bound to x's length).
    x : tensor
        Data, (*batch, *data_event_shape).
    draws : tensor
        (chains, draws, *batch, K): the sampler's output for every row of x, chain by chain,
        in the order drawn (autocorrelation is allowed: it lowers the ESS). K is the flat latent
        size (a state-space model's (T, K) latents flattened in time order).
    false_alarm : float
        α: the probability that draws from the exact posterior fail, to the accuracy of the
        normal approximation with a skewness correction (module docstring).
    min_ess : float
        Fail when any statistic has fewer effective draws than this.
    ess : callable, optional
        (chains, draws, m) → (m,) effective sample sizes; :func:`pyro_ess` when ``None``.

    Returns
    -------
    SamplerCheck
    """
    if not (isinstance(false_alarm, float) and 0 < false_alarm < 1):
        raise ValueError(f"false_alarm must be a float in (0, 1), got {describe(false_alarm)}")
    if not (isinstance(min_ess, int | float) and min_ess >= 1):
        raise ValueError(f"min_ess must be a number ≥ 1, got {describe(min_ess)}")
    if ess is not None and not callable(ess):
        raise TypeError(f"ess must be a callable or None, got {describe(ess)}")
    model = check_model(for_data(model, x))
    x = model.check_data(x)
    draws = _check_draws(draws, model, x)
    with torch.no_grad():
        posterior = model.exact(x).posterior
        batch = tuple(batch_shape(model, x))
        loc = posterior.loc.expand(*batch, model.latent_dim).reshape(-1, model.latent_dim)
        tril = posterior.scale_tril.expand(*batch, model.latent_dim, model.latent_dim)
        tril = tril.reshape(-1, model.latent_dim, model.latent_dim)
        flat = draws.reshape(*draws.shape[:2], -1, model.latent_dim)
        parts = [_statistics(flat[:, :, b], loc[b], tril[b]) for b in range(loc.shape[0])]
    names = [
        name if not batch else f"{name} at x{list(_unravel(b, batch))}"
        for b, part in enumerate(parts)
        for name in part.names
    ]
    values = torch.cat([part.values for part in parts], -1)
    variance = torch.cat([part.variance for part in parts])
    skewness = torch.cat([part.skewness for part in parts])

    finite = bool(torch.isfinite(draws).all())
    effective = (pyro_ess if ess is None else ess)(values.detach().cpu())
    effective = torch.as_tensor(effective, dtype=values.dtype, device=values.device)
    effective = effective.clamp(min=0.0)
    m = values.shape[-1]
    threshold = float(stats.norm.isf(false_alarm / (2 * m)))
    root = effective.clamp(min=1.0).sqrt()
    raw = values.mean((0, 1)) / (variance / root.square()).sqrt()
    z = raw - (threshold**2 - 1) * skewness / (6 * root)
    z = torch.where(torch.isfinite(z), z, torch.full_like(z, math.inf))
    too_few = effective < min_ess
    passed = finite and not bool(too_few.any()) and bool((z.abs() <= threshold).all())
    message = _report(
        passed, finite, names, z, effective, threshold, min_ess, false_alarm, draws.shape[:2]
    )
    return SamplerCheck(
        passed, names, z, effective, threshold, float(min_ess), false_alarm, message
    )


def _unravel(index: int, shape: tuple) -> tuple:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def _report(passed, finite, names, z, ess, threshold, min_ess, false_alarm, shape) -> str:
    chains, num_draws = shape
    head = (
        f"sampler check {'PASSED' if passed else 'FAILED'}: {len(names)} statistics from "
        f"{chains} chain(s) × {num_draws} draws; |z| ≤ {threshold:.2f} each (Bonferroni, "
        f"false alarm {false_alarm:.0e}); ESS {float(ess.min()):.0f}–{float(ess.max()):.0f}"
    )
    lines = [head]
    if not finite:
        lines.append("  draws contain NaN or inf")
    low = (ess < min_ess).nonzero().flatten().tolist()
    if low:
        worst = min(low, key=lambda i: float(ess[i]))
        lines.append(
            f"  {len(low)} statistic(s) with ESS < {min_ess:g} (lowest: {names[worst]}, "
            f"ESS {float(ess[worst]):.1f}): too few effective draws to decide; run longer"
        )
    order = torch.argsort(z.abs(), descending=True).tolist()
    failing = [i for i in order if abs(float(z[i])) > threshold]
    for i in (failing or order)[:5]:
        direction = "too high" if float(z[i]) > 0 else "too low"
        flag = "FAIL" if i in failing else "ok"
        lines.append(
            f"  {flag:4} {names[i]}: z = {float(z[i]):+.2f} ({direction}), ESS {float(ess[i]):.0f}"
        )
    if len(failing) > 5:
        lines.append(f"  … and {len(failing) - 5} more beyond the threshold")
    return "\n".join(lines)


def assert_sampler(model, x, draws, **options) -> SamplerCheck:
    """:func:`check_sampler`, raising ``AssertionError`` with the report when it fails."""
    check = check_sampler(model, x, draws, **options)
    if not check.passed:
        raise AssertionError(check.message)
    return check
