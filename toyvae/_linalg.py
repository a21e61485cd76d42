"""Triangular solves along the last axis, shared by the model families."""

from __future__ import annotations

import torch


def solve_rows(tril: torch.Tensor, rows: torch.Tensor, *, upper: bool = False) -> torch.Tensor:
    """L⁻¹ v for every row v of ``rows`` (…, K), L one lower (K, K) factor (or an upper one,
    with ``upper=True``): one solve with many right-hand sides."""
    flat = rows.reshape(-1, rows.shape[-1])
    return torch.linalg.solve_triangular(tril, flat.mT, upper=upper).mT.reshape(rows.shape)
