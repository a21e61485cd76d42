"""A t-test on skewed draws, with and without the ELBO checker's floor under the standard error.

The checker's gradient coordinate for a per-row scale parameter is, draw by draw, of the form
c (ε² − 1) + b ε with ε ~ N(0, 1): skewed. This script simulates the test of its mean from n
draws, |mean| / standard error against the Student-t threshold t_{n−1}(1 − α/2), with the
standard error taken three ways: the draws' own (s/√n), and at least f·σ/√n for f = 1 (the
exact σ) and f = 0.8 (a floor 20% too small, far beyond the error of σ estimated from 1000
draws). It prints the Markdown table of the observed rates.

    .venv/bin/python scripts/skewed_mean_test.py --reps 1e7
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

ALPHAS = (1e-3, 1e-4, 1e-5, 1e-6)


def rejections(n: int, b: float, reps: int, seed: int, chunk: int = 100_000) -> dict[str, list]:
    """Counts of |t| above the threshold at each α, per standard error, over ``reps`` tests."""
    rng = np.random.default_rng(seed)
    thresholds = np.array([stats.t.isf(a / 2, n - 1) for a in ALPHAS])
    sigma = np.sqrt(2 + b * b)  # Var(ε² − 1 + b ε) = 2 + b²
    counts = {"own": np.zeros(len(ALPHAS)), "floor σ": np.zeros(len(ALPHAS))}
    counts["floor 0.8σ"] = np.zeros(len(ALPHAS))
    for _ in range(reps // chunk):
        eps = rng.standard_normal((chunk, n))
        draws = eps * eps - 1 + b * eps
        mean, s = draws.mean(1), draws.std(1, ddof=1)
        for name, spread in (
            ("own", s),
            ("floor σ", np.maximum(s, sigma)),
            ("floor 0.8σ", np.maximum(s, 0.8 * sigma)),
        ):
            t = np.abs(mean) / (spread / np.sqrt(n))
            counts[name] += (t[:, None] > thresholds).sum(0)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="n, draws per test")
    parser.add_argument("--reps", type=float, default=1e7, help="simulated tests per row")
    args = parser.parse_args()
    reps = int(args.reps) // 100_000 * 100_000
    start = time.time()
    rows = []
    for seed, b in enumerate((0.0, 1.0)):
        counts = rejections(args.draws, b, reps, seed)
        for name, c in counts.items():
            cells = " | ".join(f"{int(k)} ({k / reps:.1e})" if k else "0" for k in c)
            rows.append(f"| ε² − 1 + {b:g}·ε | {name} | {cells} |")
    print(
        f"Measured with `scripts/skewed_mean_test.py --draws {args.draws} --reps {args.reps:g}` "
        f"({time.time() - start:.0f} s): {reps:.0e} simulated tests per row, {args.draws} draws "
        "each; the number of tests whose |t| crossed the threshold of each stated probability "
        "α (the observed rate in brackets).\n"
    )
    print("| draw | standard error | " + " | ".join(f"α = {a:.0e}" for a in ALPHAS) + " |")
    print("|---|---|" + "---:|" * len(ALPHAS))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
