"""float32: the accuracy table on docs/how-we-know.md, and the library's float32 tolerance.

scripts/float32_accuracy.py measures toyvae's float32 log p(x), posterior mean, ELBO and KL on
the accuracy grid's models against float64 on the same rounded numbers. Here every case runs,
and each float32 value must lie within ``identity_tolerance`` of the float64 one: the bound the
library states for comparing exact quantities in the model's dtype (4·n·eps·M, with eps the
float32 epsilon). The table itself shows how far inside it each case is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import float32_accuracy as f32

from toyvae import LinearGaussian, elbo, kl_to_posterior
from toyvae.tolerances import identity_tolerance


@pytest.mark.parametrize("number", range(1, len(f32.CASES) + 1))
def test_float32_within_the_stated_float32_tolerance(number):
    case = f32.CASES[number - 1]
    single = f32._rounded(case, seed=number - 1)
    double = {name: value.double() for name, value in single.items()}
    results = {}
    for v in (single, double):
        model = LinearGaussian(v["weight"], v["bias"], v["noise"])
        q = torch.distributions.MultivariateNormal(v["q_loc"], scale_tril=v["q_tril"])
        results[v["x"].dtype] = (
            model,
            q,
            model.log_evidence(v["x"]),
            elbo(model, v["x"], q),
            kl_to_posterior(model, v["x"], q),
        )
    model, q, *got = results[torch.float32]
    _, _, *want = results[torch.float64]
    tolerance = identity_tolerance(model, single["x"], q).double()
    for name, g, w in zip(("log p(x)", "ELBO", "KL"), got, want, strict=True):
        assert torch.isfinite(g), name
        assert (g.double() - w).abs() <= tolerance, (name, g.item(), w.item(), tolerance.item())


def test_the_table_has_every_case_and_column():
    """The page's table is generated (not typed): one row per case, one cell per column."""
    lines = f32.table().splitlines()
    assert len(lines) == 2 + len(f32.CASES)
    assert all(line.count("|") == len(f32.COLUMNS) + 3 for line in lines)
