"""The report's plots (PNG): only drawn when ``--out`` is given.

Importing this module leaves matplotlib's backend alone; the ``toyvae`` command, which owns
the process, chooses the non-interactive Agg backend before it draws.

- ``interpolation.png``: ELBO(q_t) against log p(x) along a path from a q to the posterior.
- ``iwae.png``: Monte Carlo IWAE bound L_k against k, between the ELBO and log p(x), with the
  first-order bias log p(x) − χ²/(2k).
- ``variances.png``: exact variances of the ELBO estimator and of the three gradient
  estimators along the same path, for the models with K ≤ 3 (the path-derivative one
  vanishes at the posterior).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.distributions import MultivariateNormal

from toyvae.estimators import (
    chi_square_divergence,
    iwae_estimates,
    log_weight_moments,
)
from toyvae.gaussians import as_gaussian
from toyvae.gradients import ESTIMATORS, gradient_estimator_moments
from toyvae.report._monte_carlo import chunked, iwae_draw_count
from toyvae.report._series import interpolation
from toyvae.report._variational import random_gaussians, wide_gaussian
from toyvae.report.rows import Budget

__all__ = ["write_plots"]


def _grid(count: int):
    columns = min(count, 3)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, axes.flat


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _interpolation(items, path: Path) -> Path:
    figure, axes = _grid(len(items))
    for ax, (case, x, generator) in zip(axes, items, strict=False):
        q = random_gaussians(case.model, x[:1], generator)[2]
        t, values = interpolation(case.model, x, q)
        ax.plot(t, values, label="ELBO(q_t)")
        log_p = float(case.model.exact(x[:1]).log_evidence[0])
        ax.axhline(log_p, color="k", ls="--", label="log p(x)")
        ax.set(title=case.name, xlabel="t (0: q, 1: posterior)")
        ax.legend(fontsize=8)
    return _save(figure, path)


def _iwae_draws(model, point, q, k: int, draws: int, generator) -> torch.Tensor:
    """⌈draws/k⌉ IWAE_k estimates (sd(IWAE_k) ∝ 1/√k for large k, so the error bars are
    comparable across k), in chunks of bounded size: the memory does not grow with k."""
    return chunked(
        lambda n: iwae_estimates(model, point, q, k, n, generator=generator),
        iwae_draw_count(draws, k),
        k * model.latent_dim,
    )


def _iwae(items, budget: Budget, path: Path) -> Path:
    figure, axes = _grid(len(items))
    ks = np.array(budget.iwae_ks)
    for ax, (case, x, generator) in zip(axes, items, strict=False):
        model, point = case.model, x[:1]
        q = wide_gaussian(model, point, generator)
        log_p = float(model.exact(point).log_evidence[0])
        exact_elbo = float(log_weight_moments(model, point, q).mean[0])
        chi2 = float(chi_square_divergence(model, point, q)[0])
        means, errors = [], []
        for k in ks:
            draws = _iwae_draws(model, point, q, int(k), budget.iwae_draws, generator)
            means.append(float(draws.mean()))
            errors.append(float(2 * draws.std() / np.sqrt(len(draws))))
        ax.errorbar(ks, means, yerr=errors, fmt="o-", ms=3, label="IWAE_k, mean ± 2 s.e.")
        ax.plot(ks, log_p - chi2 / (2 * ks), ":", label="log p(x) − χ²/(2k)")
        ax.axhline(log_p, color="k", ls="--", label="log p(x)")
        ax.axhline(exact_elbo, color="grey", ls="-.", label="ELBO")
        ax.set(title=case.name, xlabel="k", xscale="log")
        ax.set_xticks(ks, [str(k) for k in ks], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=7)
    return _save(figure, path)


def _variances(items, budget: Budget, path: Path) -> Path:
    # Quadrature with 5^K nodes per point on the path: K ≤ 3 keeps the figure to seconds.
    small = [item for item in items if item[0].model.latent_dim <= 3]
    figure, axes = _grid(max(1, len(small)))
    for ax, (case, x, generator) in zip(axes, small, strict=False):
        model, point = case.model, x[:1]
        g = as_gaussian(random_gaussians(model, point, generator)[2])
        post = model.exact(point).posterior
        # Up to t = 0.95: at t = 1 the path-derivative variance is 0 up to rounding (~1e-30),
        # which would flatten every other curve on the log axis.
        ts = np.linspace(0, 0.95, 10).tolist()
        curves = {"Var log w (ELBO estimator)": []} | {name: [] for name in ESTIMATORS}
        for t in ts:
            loc = ((1 - t) * g.loc + t * post.loc).detach().requires_grad_(True)
            tril = ((1 - t) * g.scale_tril + t * post.scale_tril).detach().requires_grad_(True)
            q = MultivariateNormal(loc, scale_tril=tril)
            curves["Var log w (ELBO estimator)"].append(
                float(log_weight_moments(model, point, q).variance[0].detach())
            )
            for name in ESTIMATORS:
                moments = gradient_estimator_moments(model, point, q, (loc, tril), estimator=name)
                curves[name].append(float(sum(v.sum() for v in moments.variance).detach()))
        for label, values in curves.items():
            name = label if label.startswith("Var") else f"∇: {label}"
            ax.plot(ts, values, label=name)
        ax.set(title=case.name, xlabel="t (0: q, 1: posterior)", yscale="log")
        ax.legend(fontsize=7)
    return _save(figure, path)


def write_plots(items, budget: Budget, out: Path) -> list[Path]:
    """Draw the three figures into ``out``; ``items`` are (case, x, torch.Generator) triples."""
    with torch.no_grad():
        paths = [_interpolation(items, out / "interpolation.png")]
        paths.append(_iwae(items, budget, out / "iwae.png"))
    paths.append(_variances(items, budget, out / "variances.png"))
    return paths
