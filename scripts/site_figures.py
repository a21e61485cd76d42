r"""Figures for the documentation site, computed by toyvae itself: python scripts/site_figures.py

- ``elbo-gap.png``: the ELBO and log p(x) as q moves from the prior to the exact posterior;
  the gap between them, shaded, is KL(q ‖ p(z|x)), computed separately and drawn on top.
- ``iwae-vs-k.png``: the IWAE bound L_k against k, each estimated from many independent draws
  (with an interval of ±4 exact-variance-free standard errors), between the exact ELBO (k = 1)
  and log p(x), with the first-order asymptote log p(x) − χ²/(2k).
- ``snr.png``: the IWAE gradient signal-to-noise ratios of Rainforth et al. (2018) against k,
  from ``toyvae.snr`` (1000 draws per k).
- ``kl-resolution.png``: KL(q_t ‖ p(z|x)) against t on log-log axes along a path to the posterior,
  toyvae's and torch's ``kl_divergence``, against the law c·t² (slope 2).
- ``mean-field.png``: the exact posterior's density contours for K = 2 with the best mean-field
  q* = N(μ, diag(1/Λ_ii)) and the full-covariance q (the posterior itself) drawn over them, and
  the diagonal of Σ (the marginal variances) for contrast; docs/closed-form-elbo.md.
- ``accuracy.md``: the table of achieved float64 errors against the 60-digit mpmath oracle,
  from ``tests/test_high_precision.py``, included by docs/how-we-know.md.

Written to ``docs/figures/`` (git-ignored; ``scripts/build_docs.sh`` regenerates them) or to
the folder given as the only argument. Deterministic: fixed seeds, no clock. Each PNG records
its smallest text size for scripts/check_site.mjs (scripts/figure_text.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import figure_text
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Ellipse
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.estimators import iwae_estimates, iwae_first_order_bias
from toyvae.learning import best_mean_field
from toyvae.snr import gradient_snr, plot_snr, rainforth_problem

ROOT = Path(__file__).resolve().parent.parent
DPI = 150


def example_model():
    """The landing page's model: D = 5, K = 2, diagonal noise, one observation."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 2, dtype=torch.float64, generator=generator)
    noise_variance = torch.rand(5, dtype=torch.float64, generator=generator) + 0.5
    model = toyvae.LinearGaussian(weight, noise_variance=noise_variance)
    x, _ = model.sample(generator=generator)
    return model, x


def path_to_posterior(model, x, steps: int = 101):
    """q_t for t in [0, 1]: mean and Cholesky factor linear from the prior to the posterior."""
    posterior = model.posterior(x)
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    start_loc = torch.zeros(model.latent_dim, dtype=torch.float64)  # the prior N(0, I)
    start_tril = torch.eye(model.latent_dim, dtype=torch.float64)
    loc = (1 - t)[:, None] * start_loc + t[:, None] * posterior.loc
    tril = (1 - t)[:, None, None] * start_tril + t[:, None, None] * posterior.scale_tril
    return t, MultivariateNormal(loc, scale_tril=tril)


def elbo_gap_figure(path: Path) -> None:
    model, x = example_model()
    t, q = path_to_posterior(model, x)
    log_evidence = model.log_evidence(x).expand(t.shape)
    bound = toyvae.elbo(model, x, q)
    kl = toyvae.kl_to_posterior(model, x, q)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(
        t,
        bound,
        log_evidence,
        color="tab:orange",
        alpha=0.3,
        label=r"gap $=\mathrm{KL}(q \,\|\, p_\theta(z \mid x))$",
    )
    ax.plot(t, log_evidence, color="black", lw=2, label=r"$\log p_\theta(x)$ (exact)")
    ax.plot(t, bound, color="tab:blue", lw=2, label=r"$\mathrm{ELBO}(q_t)$ (exact)")
    # The KL is computed on its own; log p(x) − KL lands on the ELBO curve: the identity.
    ax.plot(
        t[::5],
        (log_evidence - kl)[::5],
        "o",
        color="tab:red",
        ms=4,
        label=r"$\log p_\theta(x) - \mathrm{KL}$, computed separately",
    )
    ax.set_xlabel(r"$t$: $q_t$ moves from the prior ($t=0$) to $p_\theta(z \mid x)$ ($t=1$)")
    ax.set_ylabel("nats")
    ax.set_title(
        r"$\log p_\theta(x) = \mathrm{ELBO}(q) + \mathrm{KL}(q \,\|\, p_\theta(z \mid x))$"
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figure_text.save(fig, path, DPI)
    plt.close(fig)


def iwae_figure(path: Path, num_estimates: int = 4000) -> None:
    model, x = example_model()
    posterior = model.posterior(x)
    # Wider than the posterior and off-centre: the importance weights have finite variance
    # (χ² < ∞) so the first-order asymptote exists, and the bound is visibly loose at k = 1.
    q = MultivariateNormal(posterior.loc + 0.6, scale_tril=1.5 * posterior.scale_tril)
    ks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    generator = torch.Generator().manual_seed(1)
    means, errors = [], []
    for k in ks:
        draws = iwae_estimates(model, x, q, k, num_estimates, generator=generator)
        means.append(draws.mean().item())
        errors.append(4 * draws.std().item() / num_estimates**0.5)  # ±4 standard errors
    log_evidence = model.log_evidence(x).item()
    asymptote = [log_evidence - iwae_first_order_bias(model, x, q, k).item() for k in ks]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(log_evidence, color="black", lw=2, label=r"$\log p_\theta(x)$ (exact)")
    ax.axhline(
        toyvae.elbo(model, x, q).item(),
        color="tab:blue",
        ls="--",
        label=r"$\mathrm{ELBO}(q) = L_1$ (exact)",
    )
    ax.plot(
        ks,
        asymptote,
        color="tab:green",
        ls=":",
        lw=2,
        label=r"$\log p_\theta(x) - \chi^2/(2k)$ (first order)",
    )
    ax.errorbar(
        ks,
        means,
        yerr=errors,
        fmt="o",
        color="tab:red",
        capsize=3,
        label=rf"$L_k$, mean of {num_estimates} draws $\pm$ 4 s.e.",
    )
    ax.set_xscale("log", base=2)
    ax.set_ylim(min(means) - 0.5, log_evidence + 0.3)
    ax.set_xlabel(r"$k$, importance samples per estimate")
    ax.set_ylabel("nats")
    ax.set_title(r"IWAE bounds $L_k$ rise monotonically to $\log p_\theta(x)$")
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figure_text.save(fig, path, DPI)
    plt.close(fig)


# Column headings for the fields of the tests' row type; any other field shows its own name.
HEADINGS = {
    "comparisons": "n",
    "max_kappa": "max κ",
    "max_relative": "max relative error",
    "max_ulps": "max ulps",
    "max_scaled": "max error / (ε·scale)",
    "max_of_bound": "max error / bound",
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-2 <= abs(value) < 1e4 else f"{value:.1e}"
    return str(value).replace("_", "\\_")


def accuracy_table(path: Path) -> None:
    """The achieved-error table of tests/test_high_precision.py, as a Markdown table.

    Its columns are the fields of the tests' own row type, so the table follows the tests.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from test_high_precision import achieved_errors  # the tests' own measurement

    rows = achieved_errors()
    fields = rows[0]._fields
    lines = [
        "| " + " | ".join(HEADINGS.get(f, f.replace("_", " ")) for f in fields) + " |",
        "|" + "|".join("---" if isinstance(v, str) else "---:" for v in rows[0]) + "|",
    ]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def kl_resolution_figure(path: Path) -> None:
    """KL(q_t ‖ p(z|x)) for q_t = N(μ + t·a, Σ): c·t² exactly, c = ½ aᵀΛa (Λ formed densely)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    model = toyvae.LinearGaussian(weight, noise_variance=0.5)
    x = torch.randn(20, generator=generator, dtype=torch.float64)
    a = torch.randn(5, generator=generator, dtype=torch.float64)
    post = model.posterior(x)
    precision = torch.eye(5, dtype=torch.float64) + weight.T @ weight / 0.5
    c = float(0.5 * a @ precision @ a)
    ts = torch.logspace(-1, -13, 49, dtype=torch.float64)
    ours, theirs = [], []
    for t in ts.tolist():
        q = MultivariateNormal(post.mean + t * a, scale_tril=post.scale_tril)
        ours.append(float(toyvae.kl_to_posterior(model, x, q)))
        theirs.append(float(torch.distributions.kl_divergence(q, post)))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.loglog(ts, [c * t**2 for t in ts.tolist()], "k-", lw=3, alpha=0.25, label=r"$c\,t^2$")
    ax.loglog(ts, ours, "o", ms=3.5, label="toyvae.kl_to_posterior")
    positive = [(t, v) for t, v in zip(ts.tolist(), theirs, strict=True) if v > 0]
    ax.loglog(*zip(*positive, strict=True), "x", ms=4, label="torch kl_divergence")
    floor = 1e-29  # where torch's KL is 0 or negative, drawn on this line
    zero = [t for t, v in zip(ts.tolist(), theirs, strict=True) if v <= 0]
    ax.loglog(zero, [floor] * len(zero), "v", ms=4, color="C1", label="torch: 0 or negative")
    ax.set(xlabel="t", ylabel=r"KL$(q_t \,\|\, p(z \mid x))$", ylim=(floor / 3, 10))
    ax.set_title("The gap along a path to the posterior, in float64", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure_text.save(fig, path, DPI)
    plt.close(fig)


def mean_field_model():
    """tests/test_flows.py's model: D = 3, K = 2, Ψ = 0.3 I; its posterior correlation is -0.87."""
    weight = torch.tensor([[1.0, 0.9], [1.0, 1.1], [0.5, 0.4]], dtype=torch.float64)
    model = toyvae.LinearGaussian(weight, noise_variance=0.3)
    return model, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def _ellipse(mean, covariance, radius, **style) -> Ellipse:
    """The set {z : (z − mean)ᵀ covariance⁻¹ (z − mean) = radius²}, as a patch."""
    values, vectors = torch.linalg.eigh(covariance)  # ascending: the last column is the long axis
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    width, height = (2 * radius * values.flip(0).sqrt()).tolist()
    return Ellipse(mean.tolist(), width, height, angle=angle, fill=False, **style)


def mean_field_figure(path: Path) -> None:
    """The exact posterior (K = 2), the full-covariance q and the best mean-field q over it."""
    model, x = mean_field_model()
    posterior = model.exact(x).posterior.distribution()
    mean, covariance = posterior.loc, posterior.covariance_matrix
    mean_field = best_mean_field(model, x)  # N(μ, diag(1/Λ_ii)), (C9)
    radii = (1.0, 2.0)  # Mahalanobis radii: 39% and 86% of the mass in two dimensions

    grid = torch.linspace(-1.6, 2.9, 301, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1)
    density = posterior.log_prob(zz).exp()
    peak = posterior.log_prob(mean).exp().item()
    levels = [peak * math.exp(-(r**2) / 2) for r in (3.0, 2.5, 2.0, 1.5, 1.0, 0.5)] + [peak * 1.01]

    fig, ax = plt.subplots(figsize=(5.5, 6.4), layout="constrained")
    ax.contourf(grid, grid, density, levels=levels, cmap="Blues")
    styles = [
        ("full-covariance $q$ = the posterior", covariance, {"color": "black", "ls": "--"}),
        (
            r"best mean-field $q^*$: variances $1/\Lambda_{ii}$",
            torch.diag(mean_field.variance),
            {"color": "tab:red", "lw": 2},
        ),
        (
            r"diagonal of $\Sigma$ (not the best mean-field $q$)",
            torch.diag(covariance.diagonal()),
            {"color": "0.4", "ls": ":", "lw": 1.5},
        ),
    ]
    for label, cov, style in styles:
        for radius in radii:
            patch = ax.add_patch(_ellipse(mean, cov, radius, **style))
            if radius == radii[0]:
                patch.set_label(label)
    ax.plot(*mean.tolist(), "k+", ms=10, label=r"posterior mean $\mu$")
    ax.set_aspect("equal")
    ax.set(xlim=(grid[0], grid[-1]), ylim=(grid[0], grid[-1]), xlabel="$z_1$", ylabel="$z_2$")
    fig.suptitle(r"$p_\theta(z \mid x)$ (filled) and Gaussian $q$, at radii 1 and 2", fontsize=11)
    fig.legend(loc="outside lower center", fontsize=10)
    figure_text.save(fig, path, 120)
    plt.close(fig)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    elbo_gap_figure(out / "elbo-gap.png")
    iwae_figure(out / "iwae-vs-k.png")
    kl_resolution_figure(out / "kl-resolution.png")
    generator = torch.Generator().manual_seed(0)
    problem = rainforth_problem(generator=generator)
    table = gradient_snr(problem, (1, 4, 16, 64, 256), 1000, generator=generator)
    with figure_text.recording():  # toyvae.snr.plot_snr saves the figure itself
        plot_snr(table, out / "snr.png")
    mean_field_figure(out / "mean-field.png")
    accuracy_table(out / "accuracy.md")
    names = "elbo-gap.png, iwae-vs-k.png, kl-resolution.png, snr.png, mean-field.png, accuracy.md"
    print(f"site_figures: {names} in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "figures")
