r"""Figures and numbers for docs/beyond-the-elbo.md: python scripts/beyond_figures.py [OUT]

- ``flow-depth.png``: KL(q ‖ p(z|x)) = log p(x) − ELBO(q) after training, with ±2 standard
  errors, for zuko masked autoregressive flows of depth 1, 2 and 4, next to a mean-field and a
  full-covariance affine flow trained the same way and the exact mean-field optimum.
- ``beyond-numbers.md``: a table of the measured numbers the page quotes (the AIS/BDMC
  sandwich widths against T, AIS against IWAE at equal compute, the flow gaps).

Written to ``docs/figures/`` (git-ignored; ``scripts/build_docs.sh`` runs this) or to the
folder given. Deterministic: fixed seeds. The PNG records its smallest text size for
scripts/check_site.mjs (scripts/figure_text.py).
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

import toyvae
from toyvae import ais, flows
from toyvae.hmc import HMCKernel

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"dtype": torch.float64}


def flow_model():
    """tests/test_flows.py's model: D = 3, K = 2, a strongly correlated posterior."""
    weight = torch.tensor([[1.0, 0.9], [1.0, 1.1], [0.5, 0.4]], **OPTIONS)
    model = toyvae.LinearGaussian(weight, noise_variance=0.3)
    return model, torch.tensor([1.0, 2.0, 0.5], **OPTIONS)


def flow_gaps(steps=500):
    model, x = flow_model()
    rows = []
    candidates = [("mean-field affine", flows.AffineFlow(2, diagonal=True), 3e-2)]
    candidates.append(("full-covariance affine", flows.AffineFlow(2), 3e-2))
    candidates += [(f"MAF depth {d}", flows.zuko_maf(2, d, seed=0), 3e-3) for d in (1, 2, 4)]
    for name, flow, rate in candidates:
        flows.fit(
            model,
            x,
            flow,
            steps=steps,
            learning_rate=rate,
            generator=torch.Generator().manual_seed(1),
        )
        gap = flows.kl_gap(model, x, flow, 20_000, generator=torch.Generator().manual_seed(2))
        rows.append((name, gap))
    precision = model.posterior(x).precision_matrix
    best_mean_field = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))
    return rows, best_mean_field


def flow_figure(path, rows, best_mean_field):
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [name for name, _ in rows]
    values = [max(gap.value, 1e-6) for _, gap in rows]
    errors = [2 * gap.standard_error for _, gap in rows]
    ax.errorbar(
        range(len(rows)),
        values,
        yerr=errors,
        fmt="o",
        color="tab:red",
        capsize=4,
        label=r"$\log p_\theta(x) - \mathrm{ELBO}(q)$ after 500 steps, $\pm$ 2 s.e.",
    )
    ax.axhline(best_mean_field, color="tab:blue", ls="--", label="best mean-field q (exact)")
    ax.set_xticks(range(len(rows)), names, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel(r"KL$(q \,\|\, p_\theta(z \mid x))$, nats")
    ax.set_title("The gap left by each q on a correlated linear-Gaussian posterior")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figure_text.save(fig, path, dpi=150)
    plt.close(fig)


def ais_rows():
    """BDMC on 256 simulated pairs of the landing page's model, and IWAE at equal compute."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 2, generator=generator, **OPTIONS)
    noise = torch.rand(5, generator=generator, **OPTIONS) + 0.5
    model = toyvae.LinearGaussian(weight, noise_variance=noise)
    x, z = model.sample((256,), generator=torch.Generator().manual_seed(7))
    log_evidence = model.log_evidence(x)
    kernel = HMCKernel(step_size=0.2, num_steps=3)
    rows = []
    for steps in (3, 10, 30, 100):
        betas = ais.linear_schedule(steps)
        forward = ais.forward_ais(
            model, x, 1, betas, kernel, generator=torch.Generator().manual_seed(8)
        )
        reverse = ais.reverse_ais(
            model, x, z[None], betas, kernel, generator=torch.Generator().manual_seed(9)
        )
        lower = forward.bounds[0] - log_evidence
        upper = reverse.bounds[0] - log_evidence
        perfect = ais.thermodynamic_bounds(model, x, betas)
        iwae = (
            toyvae.iwae_estimates(
                model,
                x,
                model.prior(),
                forward.evaluations,
                1,
                generator=torch.Generator().manual_seed(3),
            )[0]
            - log_evidence
        )
        root = math.sqrt(x.shape[0])
        rows.append(
            (
                steps,
                forward.evaluations,
                (float(lower.mean()), float(lower.std() / root)),
                (float(upper.mean()), float(upper.std() / root)),
                float((perfect.upper - perfect.lower).mean()),
                (float(iwae.mean()), float(iwae.std() / root)),
            )
        )
    return rows


def numbers_table(path, ais_table, rows, best_mean_field):
    def pm(pair):
        return f"{pair[0]:+.3f} ± {pair[1]:.3f}"

    lines = [
        "| T | evaluations per chain | AIS lower − log p(x) | reverse AIS upper − log p(x) "
        "| width | width, perfect transitions (exact) | IWAE (prior q, same k) − log p(x) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for steps, evaluations, lower, upper, perfect, iwae in ais_table:
        lines.append(
            f"| {steps} | {evaluations} | {pm(lower)} | {pm(upper)} | "
            f"{upper[0] - lower[0]:.3f} | {perfect:.3f} | {pm(iwae)} |"
        )
    lines += ["", "| q | KL(q ‖ p(z∣x)) after training |", "|---|---:|"]
    lines += [f"| {name} | {gap.value:.2e} ± {gap.standard_error:.1e} |" for name, gap in rows]
    lines.append(f"| best mean-field q (exact) | {best_mean_field:.4f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows, best_mean_field = flow_gaps()
    flow_figure(out / "flow-depth.png", rows, best_mean_field)
    numbers_table(out / "beyond-numbers.md", ais_rows(), rows, best_mean_field)
    print(f"beyond_figures: flow-depth.png, beyond-numbers.md in {out}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # this script owns its process; tiny tensors: one thread is fastest
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "figures")
