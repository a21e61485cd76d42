"""Hypothesis profiles: a quick default, and a deep one for opt-in runs.

Select with ``HYPOTHESIS_PROFILE=deep pytest`` (or ``pytest --hypothesis-profile=deep``).
"""

import os

import torch
from hypothesis import HealthCheck, settings

# The tests run thousands of tiny (K×K, D ≤ 6) operations, for which intra-op threads only add
# synchronisation: measured on the 2-core CI machine under load, one thread was 3× faster.
torch.set_num_threads(1)

# Models are built from numpy arrays and torch tensors: a draw takes milliseconds, which
# Hypothesis's too_slow check would flag on a busy 2-core machine. Determinism comes from
# derandomize=True: the same examples every run, so a failure always reproduces.
_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("default", max_examples=60, derandomize=True, **_common)
settings.register_profile("deep", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# -- seeds and false alarms (tests/seeds.py, scripts/flake_rate.py) ------------------------------


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "false_alarm(p): at most p, the probability that this test fails on correct code when its "
        "seeds are fresh (TOYVAE_SEED_OFFSET): its assertions' false-alarm probabilities added "
        "up. A test that draws from tests/seeds.py without this marker claims p = 0 (it holds "
        "for every seed). scripts/flake_rate.py compares the failure counts with p.",
    )


# With TOYVAE_SEED_RECORD=<folder>, each test process appends one JSON line per test to
# <folder>/<pid>.jsonl: its outcome, whether it drew a seed from tests/seeds.py (during the test,
# or when its module was imported), its false_alarm marker and whether Hypothesis drives it.
# scripts/flake_rate.py reads these; a plain run records nothing.
_RECORD = os.environ.get("TOYVAE_SEED_RECORD")
if _RECORD:
    import json
    from pathlib import Path

    import numpy as np
    import pytest
    import seeds

    _outcomes: dict[str, list[str]] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        _outcomes.setdefault(item.nodeid, []).append(report.outcome)
        return report

    def _global_state():
        # The legacy global generator is what a stray np.random.normal() would draw from.
        return torch.get_rng_state(), np.random.get_state()[1].copy()  # noqa: NPY002

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, (torch_state, numpy_state) = seeds.calls, _global_state()
        result = yield
        torch_after, numpy_after = _global_state()
        phases = _outcomes.pop(item.nodeid, [])
        outcome = "failed" if "failed" in phases else "skipped" if "skipped" in phases else "passed"
        marker = item.get_closest_marker("false_alarm")
        line = {
            "nodeid": item.nodeid,
            "outcome": outcome,
            "seeded": seeds.calls != before
            or str(Path(item.path).resolve()) in seeds.imported_with_seeds,
            "false_alarm": None if marker is None else float(marker.args[0]),
            # Drew from torch's or NumPy's global generator (unseeded, order-dependent draws).
            "global_rng": not torch.equal(torch_state, torch_after)
            or not np.array_equal(numpy_state, numpy_after),
            "hypothesis": bool(getattr(getattr(item, "obj", None), "is_hypothesis_test", False)),
            "offset": seeds.offset(),
        }
        folder = Path(_RECORD)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        return result
