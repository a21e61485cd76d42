"""``toyvae report`` end to end on a model a user fits: scikit-learn's digits, K = D = 64.

Marked ``slow`` (about a minute or two): CI runs it with ``pytest -m slow``. The timings and
the busy-machine measurement are in benchmarks/README.md (benchmarks/bench_report_digits.py).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import FactorAnalysis

import toyvae

pytestmark = pytest.mark.slow

# Issue 11's memory target for the full report on this model (peak resident set size).
PEAK_RSS_BYTES = 2 * 2**30


def _digits_model(path):
    """As a user would: FactorAnalysis with its defaults (K = D = 64), from_sklearn, save."""
    x = load_digits().data
    fa = FactorAnalysis(random_state=0).fit(x)
    model = toyvae.LinearGaussian.from_sklearn(fa)
    assert (model.data_dim, model.latent_dim) == (64, 64)
    model.save(path, x=x)
    return path


def test_full_report_on_scikit_learns_digits_has_no_false_failure(tmp_path):
    """The full report on the digits FA fit exits 0: every row passes or is skipped with its
    reason, the gradient row runs at K = 64, the fit verdict is shown, and the peak RSS of the
    run (plots included) stays under 2 GB."""
    path = _digits_model(tmp_path / "digits.npz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "toyvae", "report", "--model", str(path), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert document["passed"] is True and document["failures"] == []
    (model,) = document["models"]
    (fit,) = document["fits"]
    rows = {row["property"]: row for row in model["rows"]}
    assert {row["result"] for row in model["rows"]} <= {"pass", "skip"}
    # Every skipped row says why (the dense oracle: the condition number that stopped it).
    skipped = [row for row in rows.values() if row["result"] == "skip"]
    assert all(row["reason"].startswith("skipped:") for row in skipped)
    gradient = rows["gradient estimators unbiased"]
    assert gradient["result"] == "pass" and "score function left out at K=64" in gradient["reason"]
    assert fit["name"] == "digits fit" and len(fit["rows"]) == 3
    for name in ("interpolation.png", "iwae.png", "variances.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    # ru_maxrss of the children: the largest peak of any child waited for (KB on Linux), so an
    # upper bound on this run's peak.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak <= PEAK_RSS_BYTES, f"peak RSS {peak / 2**30:.2f} GB"


@pytest.mark.slow
def test_fit_verdict_tells_a_stopped_em_from_a_converged_one():
    """On digits with n_components=10, the default (randomized SVD) FactorAnalysis stops where
    ∂ mean log p(x)/∂W is not zero, while svd_method="lapack" stops where it is (docs/report.md).

    Each row's tolerance is derived in toyvae/report/_fit.py (κ(C)·4(D+K)·eps times the terms
    that cancel at a maximum); the verdict is the row's pass/fail.
    """
    from toyvae.report._fit import fit_verdict

    x = load_digits().data
    verdicts = {}
    for method in ("randomized", "lapack"):
        fa = FactorAnalysis(n_components=10, svd_method=method, random_state=0).fit(x)
        model = toyvae.LinearGaussian.from_sklearn(fa)
        _, rows = fit_verdict(model, torch.from_numpy(x))
        verdicts[method] = rows[0]  # the gradient in W
    assert verdicts["randomized"].passed is False
    assert verdicts["randomized"].error > 1e3 * verdicts["randomized"].tolerance
    assert verdicts["lapack"].passed is True
