"""Every seed a test uses, in one place: the seeds as written, or all of them moved at once.

A test that draws random numbers takes its generator from here (``generator(n)`` for torch,
``rng(n)`` for NumPy) or passes ``seed(n)`` where a function takes a seed
(``torch.manual_seed``, ``fit_linear_vae(seed=…)``, ``check_elbo(seed=…)``, ``--seed``).

- ``TOYVAE_SEED_OFFSET`` unset or 0 (the default run): ``seed(n) == n``, so every test draws
  exactly the numbers it drew before this module existed.
- ``TOYVAE_SEED_OFFSET=j`` (any other integer): ``seed(n)`` is a 32-bit number derived from
  (n, j) by NumPy's ``SeedSequence``, a hash. Runs j = 1, 2, … therefore draw unrelated
  streams; a plain n + j would not (run 1's seed 1 would be run 0's seed 2).

``scripts/flake_rate.py`` reruns the stochastic tests under many offsets and compares each
test's failure count with its stated false-alarm probability (``@pytest.mark.false_alarm``).
Hypothesis tests are not moved by the offset: their randomness is Hypothesis's, exercised by
the deep profile (``HYPOTHESIS_PROFILE=deep``, tests/conftest.py).

``calls`` counts the seeds handed out, and ``imported_with_seeds`` names the test files whose
import drew one (cases built at module level, for ``parametrize``), so that tests/conftest.py
can tell, when ``TOYVAE_SEED_RECORD`` is set, which tests use one: the stochastic tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

ENV = "TOYVAE_SEED_OFFSET"
calls = 0
imported_with_seeds: set[str] = set()
_TESTS = str(Path(__file__).resolve().parent)


def offset() -> int:
    """The offset in the environment now (0 when unset or empty)."""
    text = os.environ.get(ENV, "").strip()
    try:
        return int(text) if text else 0
    except ValueError:
        raise ValueError(f"{ENV} must be an integer, got {text!r}") from None


def seed(n: int) -> int:
    """``n`` itself in the default run; under an offset j ≠ 0, a hash of (n, j) in [0, 2³²)."""
    global calls
    calls += 1
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(_TESTS):
        imported_with_seeds.add(str(Path(frame.f_code.co_filename).resolve()))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"a test seed must be a non-negative integer, got {n!r}")
    j = offset()
    if j == 0:
        return n
    # SeedSequence takes non-negative entropy: fold the sign of j into a third word. 32 bits, as
    # NumPy's own seeds: every seed-taking function here accepts them (`toyvae report` packs
    # its seed with a 32-bit stream key into torch's 64-bit seed, so it needs seed < 2³²).
    words = np.random.SeedSequence([n, abs(j), int(j < 0)]).generate_state(1, dtype=np.uint32)
    return int(words[0])


def generator(n: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed(n)``."""
    return torch.Generator().manual_seed(seed(n))


def rng(n: int) -> np.random.Generator:
    """A NumPy ``Generator`` (PCG64) seeded with ``seed(n)``."""
    return np.random.default_rng(seed(n))
