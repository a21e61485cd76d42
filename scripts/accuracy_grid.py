r"""log p(x) across hard regimes against the 60-digit oracle: toyvae and its peers, side by side.

python scripts/accuracy_grid.py [OUT_DIR]  →  accuracy-grid.md and accuracy-grid.png

For each case (D, K, noise variance scale, condition number of W, distance |x − b|) the oracle
(tests/mp_oracle.py, 60 digits) gives the exact log p(x) for the float64 inputs and the
problem's own float64 floor: the largest change of the exact answer over a few random
perturbations of every input by one rounding, |δθ| ≤ eps·|θ| (see tests/test_hard_regimes.py).
Each method's error is reported in units of that floor: about 1 means as accurate as float64
allows for these inputs; "fails" means it raised or returned a non-finite number.

Peers: torch's dense ``MultivariateNormal`` and ``LowRankMultivariateNormal``, SciPy's
``multivariate_normal.logpdf`` (dense), scikit-learn's ``FactorAnalysis.score_samples`` (its
fitted attributes set to the model). Included by docs/how-we-know.md; the site build runs it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import figure_text
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import scipy.stats
import torch
from sklearn.decomposition import FactorAnalysis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import mp_oracle as oracle  # noqa: E402

from toyvae import LinearGaussian  # noqa: E402

EPS = float(np.finfo(np.float64).eps)
PATTERNS = 3  # random one-rounding perturbations per floor estimate
METHODS = ("toyvae", "torch MVN", "torch LowRank", "SciPy", "scikit-learn FA")


class Case(NamedTuple):
    d: int
    k: int
    noise: float  # scale of the noise variances (log-uniform over a factor e² around it)
    weight_cond: float  # condition number of W
    distance: float  # x drawn from the model, then moved by this much when it is above 1

    @property
    def label(self) -> str:
        return (
            f"D={self.d}, K={self.k}, Ψ~{self.noise:.0e}, κ(W)={self.weight_cond:.0e}, "
            f"‖x−b‖~{self.distance:.0e}"  # not |x−b|: a "|" would split the table's cell
        )


CASES = [
    Case(5, 2, 1.0, 1.0, 1.0),
    Case(20, 5, 1.0, 1.0, 1.0),
    Case(50, 10, 1.0, 1.0, 1.0),
    Case(3, 6, 1e-10, 1.0, 1.0),
    Case(4, 8, 1e-12, 1.0, 1.0),
    Case(10, 20, 1e-6, 1.0, 1.0),
    Case(10, 3, 1e-12, 1.0, 1.0),
    Case(20, 5, 1e12, 1.0, 1.0),
    Case(8, 4, 1e-4, 1e8, 1.0),
    Case(20, 10, 1.0, 1e8, 1.0),
    Case(6, 3, 1.0, 1.0, 1e6),
    Case(30, 60, 1e-8, 1e4, 1e3),
    Case(1, 1, 1e-12, 1.0, 1.0),
    Case(1, 2, 1.0, 1.0, 1e6),
]


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((case.d, case.d)))
    right, _ = np.linalg.qr(rng.standard_normal((case.k, case.k)))
    rank = min(case.d, case.k)
    singular = np.logspace(0, -np.log10(case.weight_cond), rank)
    weight = left[:, :rank] * singular @ right[:, :rank].T
    bias = rng.standard_normal(case.d)
    noise = case.noise * np.exp(rng.uniform(-1, 1, case.d))
    z = rng.standard_normal(case.k)
    x = bias + weight @ z + np.sqrt(noise) * rng.standard_normal(case.d)
    if case.distance > 1:  # far from the model's mean: |x − b| of this size
        x = x + case.distance * rng.standard_normal(case.d)
    return weight, bias, noise, x


def _exact(weight, bias, noise, x):
    return oracle.Model(weight, bias, noise).log_evidence(x)


def _floor(weight, bias, noise, x, exact) -> float:
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(PATTERNS):
        perturbed = []
        for value in (weight, bias, noise, x):
            signs = rng.choice([-1.0, 1.0], size=np.shape(value))
            mp_value = oracle.to_mp(value)
            flat = oracle.to_mp(signs)
            for i in range(mp_value.rows):
                for j in range(mp_value.cols):
                    mp_value[i, j] *= 1 + oracle.MP.mpf(EPS) * flat[i, j]
            perturbed.append(mp_value)
        weight_p, bias_p, noise_p, x_p = perturbed  # noise_p: a column of variances
        worst = max(worst, abs(float(_exact(weight_p, bias_p, noise_p, x_p) - exact)))
    return worst


def _methods(weight, bias, noise, x) -> dict[str, float]:
    w, b, psi, xt = (torch.from_numpy(a) for a in (weight, bias, noise, x))
    cov = w @ w.T + torch.diag(psi)

    def fa():
        estimator = FactorAnalysis(n_components=weight.shape[1])
        estimator.components_, estimator.noise_variance_ = weight.T, noise
        estimator.mean_ = bias
        return float(estimator.score_samples(x[None])[0])

    runs = {
        "toyvae": lambda: float(LinearGaussian(weight, bias, noise).log_evidence(xt)),
        "torch MVN": lambda: float(torch.distributions.MultivariateNormal(b, cov).log_prob(xt)),
        "torch LowRank": lambda: float(
            torch.distributions.LowRankMultivariateNormal(b, w, psi).log_prob(xt)
        ),
        "SciPy": lambda: float(scipy.stats.multivariate_normal(bias, cov.numpy()).logpdf(x)),
        "scikit-learn FA": fa,
    }
    out = {}
    for name, run in runs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = run()
        except Exception:  # a peer that cannot factor the matrix: reported as "fails"
            value = float("nan")
        out[name] = value
    return out


def grid(cases=CASES, seed: int = 0) -> list[tuple[Case, float, dict[str, float]]]:
    """(case, floor, {method: error / floor or nan}) for every case."""
    rows = []
    for number, case in enumerate(cases):
        weight, bias, noise, x = _inputs(case, seed + number)
        exact = _exact(weight, bias, noise, x)
        floor = max(_floor(weight, bias, noise, x, exact), EPS * abs(float(exact)))
        ratios = {}
        for name, value in _methods(weight, bias, noise, x).items():
            error = abs(float(oracle.MP.mpf(value) - exact)) if np.isfinite(value) else np.nan
            ratios[name] = error / floor
        rows.append((case, floor, ratios))
    return rows


def _cell(ratio: float) -> str:
    return "fails" if not np.isfinite(ratio) else f"{ratio:.1f}" if ratio < 1e3 else f"{ratio:.0e}"


def write(out: Path) -> None:
    rows = grid()
    lines = [
        "| # | case | floor (absolute) | " + " | ".join(METHODS) + " |",
        "|---:|---|---:|" + "---:|" * len(METHODS),
    ]
    for number, (case, floor, ratios) in enumerate(rows, start=1):  # the figure's case numbers
        cells = " | ".join(_cell(ratios[m]) for m in METHODS)
        lines.append(f"| {number} | {case.label} | {floor:.1e} | {cells} |")
    (out / "accuracy-grid.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    positions = np.arange(len(rows))
    for offset, method in enumerate(METHODS):
        values = [ratios[method] for _, _, ratios in rows]
        # Failures on the top row; errors below 0.02 floors (0 included, which a log axis
        # cannot show) on the bottom row.
        shown = [max(v, 0.02) if np.isfinite(v) else 1e17 for v in values]
        ax.semilogy(positions + 0.12 * (offset - 2), shown, "o", ms=4, label=method)
    ax.axhline(1e17, color="k", lw=0.5, ls=":")
    ax.text(len(rows) - 0.5, 1e17, "fails", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(positions, [str(i + 1) for i in positions])
    ax.set(xlabel="case (numbered as in the table)", ylabel="error / float64 floor")
    ax.axhline(0.02, color="k", lw=0.5, ls=":")
    ax.text(-0.6, 0.02, "≤ 0.02", va="bottom", ha="left", fontsize=8)
    ax.set_ylim(0.01, 1e23)  # room above the "fails" row for the legend, which would hide it
    ax.set_title("log p(x) against the 60-digit oracle, in units of each case's floor", fontsize=9)
    ax.legend(fontsize=7, ncol=len(METHODS), loc="upper center", columnspacing=1.0)
    fig.tight_layout()
    figure_text.save(fig, out / "accuracy-grid.png", dpi=150)  # records its smallest text
    plt.close(fig)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "figures"
    target.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    write(target)
    print(f"accuracy_grid: accuracy-grid.md, accuracy-grid.png in {target}")
