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
