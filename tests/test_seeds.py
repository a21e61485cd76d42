"""tests/seeds.py moves every test seed under TOYVAE_SEED_OFFSET and no seed without it, and
scripts/flake_rate.py's verdict is the binomial tail it says it is."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import seeds
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "flake_rate.py"


def _flake_rate():
    spec = importlib.util.spec_from_file_location("flake_rate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    module = sys.modules.setdefault(spec.name, module)  # its dataclass resolves annotations there
    spec.loader.exec_module(module)
    return module


def _draws(n: int) -> tuple[torch.Tensor, np.ndarray]:
    return torch.randn(5, generator=seeds.generator(n)), seeds.rng(n).normal(size=5)


def _plain(n: int) -> tuple[torch.Tensor, np.ndarray]:
    return torch.randn(5, generator=torch.Generator().manual_seed(n)), np.random.default_rng(
        n
    ).normal(size=5)


@pytest.mark.parametrize("value", [None, "", "0"])
def test_without_an_offset_every_seed_is_the_one_written(monkeypatch, value):
    """Unset, empty or 0: seed(n) is n, and the generators draw what plain seeding draws."""
    if value is None:
        monkeypatch.delenv(seeds.ENV, raising=False)
    else:
        monkeypatch.setenv(seeds.ENV, value)
    assert [seeds.seed(n) for n in (0, 1, 5, 20240611)] == [0, 1, 5, 20240611]
    (torch_draws, numpy_draws), (torch_plain, numpy_plain) = _draws(3), _plain(3)
    assert torch.equal(torch_draws, torch_plain)
    assert np.array_equal(numpy_draws, numpy_plain)


def test_an_offset_moves_every_seed_to_unrelated_reproducible_streams(monkeypatch):
    """Under an offset each seed is another 32-bit number, the same every time, unrelated to the
    seeds written (no n + j) and to the seeds of other offsets."""
    monkeypatch.setenv(seeds.ENV, "1")
    one = [seeds.seed(n) for n in range(100)]
    assert one == [seeds.seed(n) for n in range(100)]  # reproducible
    assert all(0 <= s < 2**32 for s in one) and len(set(one)) == 100
    (torch_draws, numpy_draws), (torch_plain, numpy_plain) = _draws(3), _plain(3)
    assert not torch.equal(torch_draws, torch_plain)
    assert not np.array_equal(numpy_draws, numpy_plain)
    assert torch.equal(_draws(3)[0], torch_draws)
    monkeypatch.setenv(seeds.ENV, "2")
    two = [seeds.seed(n) for n in range(100)]
    monkeypatch.setenv(seeds.ENV, "-1")
    minus_one = [seeds.seed(n) for n in range(100)]
    # 300 hashes in 2³²: a chance collision has probability ≈ 300²/2³³ ≈ 1e-5, and these are
    # fixed numbers, so this either always holds or never.
    assert len(set(one) | set(two) | set(minus_one) | set(range(200))) == 500


def test_a_bad_offset_or_seed_is_refused(monkeypatch):
    """A non-integer offset names the variable; a negative or non-integer seed is refused."""
    monkeypatch.setenv(seeds.ENV, "two")
    with pytest.raises(ValueError, match="TOYVAE_SEED_OFFSET must be an integer, got 'two'"):
        seeds.seed(0)
    monkeypatch.delenv(seeds.ENV)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            seeds.seed(bad)


def test_flake_rate_verdict_is_the_binomial_tail():
    """P(X ≥ f) for X ~ Binomial(n, p), checked on cases worked by hand."""
    flake_rate = _flake_rate()
    tail = flake_rate.binomial_tail
    assert tail(0, 200, 1e-6) == 1.0  # no failures: nothing to explain
    # One failure in 200 runs at p = 1e-6: 1 − (1 − p)²⁰⁰ ≈ 2e-4.
    assert math.isclose(tail(1, 200, 1e-6), -math.expm1(200 * math.log1p(-1e-6)), rel_tol=1e-9)
    # Two: 1 − (1 − p)²⁰⁰ − 200 p (1 − p)¹⁹⁹ ≈ C(200, 2) p² = 1.99e-8.
    two = 1 - (1 - 1e-6) ** 200 - 200 * 1e-6 * (1 - 1e-6) ** 199
    assert math.isclose(tail(2, 200, 1e-6), 1.99e-8, rel_tol=1e-3)
    assert math.isclose(tail(2, 200, 1e-6), two, rel_tol=1e-6)  # the subtraction loses digits
    # A fair coin: P(X ≥ 3 of 10) = 1 − (1 + 10 + 45)/1024.
    assert math.isclose(tail(3, 10, 0.5), 1 - 56 / 1024, rel_tol=1e-12)
    assert tail(1, 200, 0.0) == 0.0  # p = 0 claimed: one failure disproves it

    def row(failures, p, stated=True):
        return flake_rate.Row("t", p, stated, 200, failures, 0)

    # Flagged below 1e-3: one failure in 200 is too many at p = 1e-6 (tail 2e-4), not at 1e-5
    # (tail 2e-3); two are too many at 1e-5 (tail 2e-6); any failure of an unmarked test is.
    assert row(1, 1e-6).flagged() and not row(1, 1e-5).flagged() and row(2, 1e-5).flagged()
    assert row(1, 0.0, stated=False).flagged() and not row(0, 0.0, stated=False).flagged()
    table = flake_rate.table([row(1, 1e-6), row(0, 1e-6)], 1e-3, markdown=True).splitlines()
    assert table[0].startswith("| test | stated p | runs | failures | P(X ≥ failures) |")
    assert table[2].endswith("| 1 | 0.0002 | FLAKY |") and table[3].endswith("| ok |")
