"""Write the figures of the classic-question pages (one-sample, prior-vs-aggregate,
elbo-vs-likelihood) to docs/figures/.

Usage: python scripts/make_figures.py [OUTPUT_DIR]   (default: docs/figures)
Every number plotted is computed by toyvae; nothing is drawn by hand. Each PNG records its
smallest text size for scripts/check_site.mjs (scripts/figure_text.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import figure_text
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.aggregate import (
    LinearGaussianEncoder,
    aggregate_posterior,
    empirical_aggregate_log_density,
)
from toyvae.learning import (
    best_mean_field,
    counterexample_objectives,
    counterexample_optima,
    data_with_spectrum,
    fit_linear_vae,
    ppca_maximum_likelihood,
)

F64 = torch.float64


def counterexample(out: Path) -> None:
    weights = np.linspace(0.05, 2.0, 200)
    values = [counterexample_objectives(float(w), 3.0) for w in weights]
    log_p = np.array([v.log_likelihood.item() for v in values])
    bound = np.array([v.elbo.item() for v in values])
    optima = counterexample_optima(3.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(weights, log_p, label=r"$\mathbb{E}\,\log p_w(x)$")
    ax.plot(weights, bound, label=r"best mean-field ELBO")
    ax.axvline(optima.maximum_likelihood, color="C0", ls=":", label=f"ML: w = {optima[0]:.3f}")
    ax.axvline(optima.maximum_elbo, color="C1", ls=":", label=f"max ELBO: w = {optima[1]:.3f}")
    ax.set_xlabel("w")
    ax.set_ylabel("nats per data point")
    ax.set_title(r"$x = w(z_1 + z_2) + \varepsilon$, $\mathbb{E}[x^2] = 3$")
    ax.set_ylim(-2.6, -1.85)
    ax.legend(loc="lower right")
    fig.tight_layout()
    figure_text.save(fig, out / "counterexample.png", dpi=120)
    plt.close(fig)


def training(out: Path) -> None:
    eigenvalues = [9.0, 4.0, 1.0, 0.6]
    x = data_with_spectrum(eigenvalues, n=50, seed=4)
    best = ppca_maximum_likelihood(x, 2).log_evidence(x).mean().item()
    runs = {
        "exact ELBO, full encoder (L-BFGS)": fit_linear_vae(x, 2, encoder="full", steps=120),
        "exact ELBO, diagonal encoder (L-BFGS)": fit_linear_vae(
            x, 2, encoder="diagonal", steps=120
        ),
        "single-sample ELBO, full encoder (Adam)": fit_linear_vae(
            x, 2, objective="single_sample", steps=600, learning_rate=0.05
        ),
    }
    # One panel per row, at most 7.5 inches wide: on the site's text column (about 700 px) the
    # smallest text stays above 9 px.
    fig, axes = plt.subplots(3, 1, figsize=(7, 8.4), sharey=True)
    for ax, (title, fit) in zip(axes, runs.items(), strict=True):
        steps = np.arange(len(fit.history.elbo))
        ax.plot(steps, fit.history.log_likelihood, label=r"$\log p_\theta(x)$")
        ax.plot(steps, fit.history.elbo, label="ELBO (exact)")
        ax.axhline(best, color="k", ls=":", label="PPCA maximum likelihood")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(best - 1.5, best + 0.2)
        ax.set_ylabel("nats per data point")
    axes[-1].set_xlabel("step")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    figure_text.save(fig, out / "training.png", dpi=120)
    plt.close(fig)


def aggregate(out: Path) -> None:
    model = toyvae.LinearGaussian(
        torch.tensor([[2.0, 0.0], [0.5, 1.0], [0.0, 0.5]], dtype=F64), noise_variance=0.5
    )
    encoder = LinearGaussianEncoder.exact_posterior(model)
    marginal = model.marginal()
    matched = MultivariateNormal(marginal.loc, marginal.covariance_matrix)
    wrong = MultivariateNormal(
        torch.tensor([1.0, 0.0, 0.0], dtype=F64), 0.3 * marginal.covariance_matrix
    )
    points, _ = model.sample((20,), generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-3.5, 3.5, 201, dtype=F64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1)
    prior = model.prior().log_prob(zz).exp()
    panels = [
        ("data from the model", aggregate_posterior(encoder, matched).log_prob(zz).exp()),
        ("misspecified Gaussian data", aggregate_posterior(encoder, wrong).log_prob(zz).exp()),
        ("20 data points (mixture)", empirical_aggregate_log_density(encoder, points, zz).exp()),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(8, 3.4))  # narrow: its text stays legible
    for ax, (title, density) in zip(axes, panels, strict=True):
        ax.contourf(grid, grid, density, levels=12, cmap="Blues")
        ax.contour(grid, grid, prior, levels=6, colors="k", linewidths=0.8, linestyles="--")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("$z_1$")
    axes[0].set_ylabel("$z_2$")
    fig.suptitle("aggregate posterior q(z) (filled) against the prior p(z) (dashed)", fontsize=11)
    fig.tight_layout()
    figure_text.save(fig, out / "aggregate.png", dpi=120)
    plt.close(fig)


def one_sample(out: Path) -> None:
    """docs/one-sample.md: Var log w and χ² against 2 KL near the posterior; gaps against k."""
    generator = torch.Generator().manual_seed(0)
    options = {"dtype": F64, "generator": generator}
    truth = toyvae.LinearGaussian(torch.randn(5, 2, **options), torch.randn(5, **options), 0.3)
    x, _ = truth.sample((16,), generator=generator)
    weight = 1 + 0.3 * torch.randn(5, 2, **options)
    model = toyvae.LinearGaussian(weight, x.mean(0), noise_variance=0.5)  # as on the page
    x = x[0]
    posterior = model.posterior(x)
    mu, s = posterior.loc, posterior.scale_tril
    e = torch.tensor([[0.5, 0.0], [0.7, -0.4]], dtype=F64)
    a = torch.tensor([0.6, -0.8], dtype=F64)

    def q_t(t):
        return MultivariateNormal(
            mu + t * (s @ a), scale_tril=s @ (torch.eye(2, dtype=F64) + t * e)
        )

    ts = np.geomspace(0.01, 0.3, 20)
    twice_kl = np.array([2 * toyvae.kl_to_posterior(model, x, q_t(t)).item() for t in ts])
    variance = np.array([toyvae.log_weight_moments(model, x, q_t(t)).variance.item() for t in ts])
    chi2 = np.array([toyvae.chi_square_divergence(model, x, q_t(t)).item() for t in ts])

    # One panel above the other, 7 inches wide: legible on the site's text column.
    fig, (left, right) = plt.subplots(2, 1, figsize=(7, 9))
    left.loglog(twice_kl, variance, "o-", ms=3, label=r"$\mathrm{Var}\,\log w$")
    left.loglog(twice_kl, chi2, "s-", ms=3, label=r"$\chi^2(p_\theta(z\mid x)\,\|\,q_t)$")
    left.loglog(twice_kl, twice_kl, "k--", lw=0.8, label=r"$2\,\mathrm{KL}$ (diagonal)")
    left.set_xlabel(r"$2\,\mathrm{KL}(q_t\,\|\,p_\theta(z\mid x))$")
    left.set_title(r"towards the posterior along $q_t$ (O4)", fontsize=10)
    left.legend()

    ks = [1, 2, 4, 8, 16, 32, 64]
    log_evidence = model.log_evidence(x).item()
    mean_field = best_mean_field(model, x)
    for q, name, colour in [
        (mean_field, r"mean-field $q$, $\chi^2 = \infty$", "C0"),
        (q_t(0.3), r"$q_{0.3}$", "C1"),
    ]:
        kl = toyvae.kl_to_posterior(model, x, q).item()
        gaps, errors = [], []
        for k in ks:
            draws = toyvae.iwae_estimates(model, x, q, k, 20_000, generator=generator)
            gaps.append(log_evidence - draws.mean().item())
            errors.append(2 * draws.std().item() / 20_000**0.5)
        right.errorbar(ks, gaps, yerr=errors, fmt="o", ms=4, color=colour, label=f"IWAE, {name}")
        right.plot(ks, [kl] * len(ks), ":", color=colour, label=f"average of $k$, {name}")
        chi_square = toyvae.chi_square_divergence(model, x, q).item()
        if np.isfinite(chi_square):
            right.plot(
                ks,
                [chi_square / (2 * k) for k in ks],
                "-",
                color=colour,
                lw=0.8,
                label=rf"$\chi^2/(2k)$, {name}",
            )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("$k$ (samples per data point)")
    right.set_ylabel(r"$\log p_\theta(x) - \mathbb{E}[\mathrm{estimate}]$ (nats)")
    right.set_title("what $k$ samples buy (O5)", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    figure_text.save(fig, out / "one-sample.png", dpi=120)
    plt.close(fig)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    one_sample(out)
    counterexample(out)
    training(out)
    aggregate(out)


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent.parent / "docs" / "figures"
    )
