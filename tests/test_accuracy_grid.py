"""log p(x) on the docs' accuracy grid (scripts/accuracy_grid.py): never worse than torch.

The grid's cases are the hard regimes of docs/how-we-know.md (small noise next to K > D, noise
of 1e12, cond(W) = 1e8, |x − b| = 1e6); the exact answer is the 60-digit oracle's. Two correct
float64 results of log p(x) can differ by the roundings of their last few additions, about an
ulp of the value each: toyvae may trail a peer by 2 ulps, no more. Where a peer fails (raises or
returns a non-finite number) toyvae must still return a finite value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import accuracy_grid

PEERS = ("torch MVN", "torch LowRank")


# ASCII ids (the labels' Ψ and κ are escaped in node ids, which then cannot be selected again).
IDS = [
    f"{n + 1}: D={c.d} K={c.k} noise={c.noise:.0e} cond={c.weight_cond:.0e} dist={c.distance:.0e}"
    for n, c in enumerate(accuracy_grid.CASES)
]


@pytest.mark.parametrize("number", range(len(accuracy_grid.CASES)), ids=IDS)
def test_toyvae_is_never_worse_than_torch(number):
    """toyvae's log p(x) error ≤ torch's MultivariateNormal's and LowRank's + 2 ulps."""
    case = accuracy_grid.CASES[number]
    weight, bias, noise, x = accuracy_grid._inputs(case, number)  # the grid's own seeds
    exact = accuracy_grid._exact(weight, bias, noise, x)
    values = accuracy_grid._methods(weight, bias, noise, x)
    ulp = np.spacing(abs(float(exact)))

    def error(name):
        return abs(float(accuracy_grid.oracle.MP.mpf(values[name]) - exact))

    assert np.isfinite(values["toyvae"])
    for peer in PEERS:
        if np.isfinite(values[peer]):
            assert error("toyvae") <= error(peer) + 2 * ulp, (peer, error("toyvae") / ulp)
