"""``toyvae report`` on scikit-learn's digits (N = 1797, D = 64, K = 64): time and peak memory.

    python benchmarks/bench_report_digits.py                  # --quick and full, quiet and busy
    python benchmarks/bench_report_digits.py --modes quick --repeats 3

Builds the model as a user would (``FactorAnalysis().fit(load_digits().data)``,
``toyvae.LinearGaussian.from_sklearn``, ``model.save(path, x=X)``), then runs
``toyvae report --model digits.npz [--quick]`` under ``/usr/bin/time -f "%e s %M KB"``
(wall seconds, peak resident set size), first on the machine as it is ("quiet"), then while
two CPU-bound processes (``timeout 300 python -c "while True: pass"``) run ("busy"). Prints
the 1-minute load average before each run: read the quiet numbers only when it is low.
Targets of issue 11: full ≤ 120 s and ≤ 2 GB quiet; ``--quick`` ≤ 15 s quiet and, busy,
within 2× its quiet time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _model(directory: Path) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.decomposition import FactorAnalysis

    import toyvae

    x = load_digits().data
    model = toyvae.LinearGaussian.from_sklearn(FactorAnalysis(random_state=0).fit(x))
    path = directory / "digits.npz"
    model.save(path, x=x)
    return path


def _run(path: Path, quick: bool) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of one ``toyvae report`` run."""
    command = ["/usr/bin/time", "-f", "%e s %M KB", sys.executable, "-m", "toyvae", "report"]
    command += ["--model", str(path), "--no-progress"] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds, _, kilobytes, _ = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kilobytes) / 1024, done.returncode


def _busy(count: int) -> list[subprocess.Popen]:
    spin = [sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(["timeout", "300", *spin]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="quick,full", help="comma-separated: quick, full")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode and load")
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes for 'busy'")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as directory:
        path = _model(Path(directory))
        print(
            "| mode | load | 1-min load avg before | wall s (median) | peak RSS MB (max) | exit |"
        )
        print("|---|---|---|---|---|---|")
        for load in ("quiet", "busy"):
            spinners = _busy(args.busy) if load == "busy" else []
            try:
                for mode in modes:
                    before = os.getloadavg()[0]
                    runs = [_run(path, mode == "quick") for _ in range(args.repeats)]
                    wall = statistics.median(r[0] for r in runs)
                    peak = max(r[1] for r in runs)
                    status = ",".join(str(r[2]) for r in runs)
                    print(
                        f"| {mode} | {load} | {before:.1f} | {wall:.1f} | {peak:.0f} | {status} |"
                    )
            finally:
                for spinner in spinners:
                    spinner.terminate()
                    spinner.wait()


if __name__ == "__main__":
    main()
