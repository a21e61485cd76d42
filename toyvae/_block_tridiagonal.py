r"""Odd–even cyclic reduction of a symmetric block-tridiagonal matrix with repeated blocks.

The matrix Λ has n diagonal blocks of size K×K: ``first``, then ``middle`` repeated n − 2
times, then ``last``, and every sub-diagonal block equal to ``lower`` (Λ[t+1, t] = ``lower``,
Λ[t, t+1] = ``lower``ᵀ). That is the posterior precision of a time-invariant linear-Gaussian
state-space model. Eliminating the odd-numbered blocks (a Schur complement onto the even ones)
gives a matrix of the same shape with ⌈n/2⌉ blocks, again with one repeated middle block and
one repeated sub-diagonal block, because every eliminated block except possibly the very last
is a middle block:

    first'  = first  − Yᵀ Y                   (Y  = L_mid⁻¹ lower,   Yᵀ Y  = lowerᵀ D_mid⁻¹ lower)
    middle' = middle − Yᵀ Y − Y_tᵀ Y_t        (Y_t = L_mid⁻¹ lowerᵀ, Y_tᵀY_t = lower D_mid⁻¹ lowerᵀ)
    lower'  = −Y_tᵀ Y                         (= −lower D_mid⁻¹ lower)

and ``last'`` is ``last − Y_tᵀ Y_t`` (n odd) or ``middle − Y_tᵀ Y_t − Zᵀ Z`` with
Z = L_last⁻¹ lower (n even). After ⌈log₂ n⌉ levels one block is left.

So the matrix work, :func:`factor`, is O(K³ log n): a few K×K Cholesky factors per level.
Everything that depends on the right-hand side, :func:`solve`, is O(n K²) in products of
(rows, K) slabs with one shared K×K matrix: large matrix products, no per-block calls. The
diagonal blocks of Λ⁻¹ and its first off-diagonal, :func:`selected_inverse`, run the same
levels backwards in O(n K³). log det Λ is the sum, over the levels, of 2 Σ log diag of the
eliminated blocks' Cholesky factors. The arithmetic is the same as block Gaussian elimination
in the order odd blocks first, then the odd blocks of what is left, and so on; every torch
operation is differentiable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from toyvae._linalg import solve_rows

__all__ = [
    "Level",
    "UniformBlockTridiagonal",
    "expand_selected",
    "factor",
    "log_det",
    "selected_inverse",
    "solve",
]


class UniformBlockTridiagonal(NamedTuple):
    """A symmetric block-tridiagonal matrix with ``size`` diagonal blocks.

    Attributes
    ----------
    size : int
        n, the number of diagonal blocks.
    first, middle, last : (K, K) tensors
        Diagonal blocks 0, 1 … n−2 (all equal) and n−1. For n = 1 only ``first`` is used; for
        n = 2, ``first`` and ``last``.
    lower : (K, K) tensor
        Every sub-diagonal block Λ[t+1, t].
    """

    size: int
    first: torch.Tensor
    middle: torch.Tensor
    last: torch.Tensor
    lower: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (nK, nK) matrix, for small n (tests and dense exact answers)."""
        n, k = self.size, self.first.shape[-1]
        blocks = [[torch.zeros_like(self.first) for _ in range(n)] for _ in range(n)]
        for t in range(n):
            blocks[t][t] = self.first if t == 0 else self.last if t == n - 1 else self.middle
            if t + 1 < n:
                blocks[t + 1][t] = self.lower
                blocks[t][t + 1] = self.lower.mT
        return torch.cat([torch.cat(row, -1) for row in blocks], -2).reshape(n * k, n * k)


class Level(NamedTuple):
    """One level of the reduction: the eliminated blocks' factors, or the final block's.

    Attributes
    ----------
    size : int
        n at this level.
    lower : (K, K) tensor
        This level's sub-diagonal block.
    chol_middle : (K, K) tensor or None
        Cholesky factor of the middle block, when a middle block is eliminated (n ≥ 3).
    chol_last : (K, K) tensor or None
        Cholesky factor of the last block, when it is eliminated (n even), or of the single
        remaining block (n = 1).
    left, right : (K, K) tensors or None
        Y = L_mid⁻¹ lower and Y_t = L_mid⁻¹ lowerᵀ: an eliminated middle block's coupling to its
        left and right neighbours, in the coordinates of its Cholesky factor.
    last_left : (K, K) tensor or None
        Z = L_last⁻¹ lower, for an eliminated last block (n even).
    """

    size: int
    lower: torch.Tensor
    chol_middle: torch.Tensor | None
    chol_last: torch.Tensor | None
    left: torch.Tensor | None
    right: torch.Tensor | None
    last_left: torch.Tensor | None


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    factor_, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            "the posterior precision is not numerically positive definite: a pivot block of its "
            "cyclic reduction failed to factor (the model's covariances are too ill-conditioned)"
        )
    return factor_


def _tri_solve(chol: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """L⁻¹ M for one (K, K) lower factor and a (K, …) matrix."""
    return torch.linalg.solve_triangular(chol, matrix, upper=False)


def factor(matrix: UniformBlockTridiagonal) -> list[Level]:
    """The levels of the cyclic reduction of ``matrix``: O(K³ log n), independent of any data."""
    levels = []
    n, first, middle, last, lower = matrix
    while n > 1:
        chol_middle = left = right = chol_last = last_left = None
        m = n // 2
        if n >= 3:  # at least one middle block is eliminated (blocks 1, 3, …, all ≤ n − 2)
            chol_middle = _cholesky(middle)
            left = _tri_solve(chol_middle, lower)
            right = _tri_solve(chol_middle, lower.mT)
        if n % 2 == 0:  # the last block, n − 1, is odd: eliminated, with no right neighbour
            chol_last = _cholesky(last)
            last_left = _tri_solve(chol_last, lower)
        levels.append(Level(n, lower, chol_middle, chol_last, left, right, last_left))

        from_middle_left = left.mT @ left if left is not None else None  # lowerᵀ D_mid⁻¹ lower
        from_middle_right = right.mT @ right if right is not None else None  # lower D_mid⁻¹ lowerᵀ
        new_n = n - m
        new_first = first - (from_middle_left if n >= 3 else last_left.mT @ last_left)
        if n % 2 == 1:
            new_last = last - from_middle_right
        elif n >= 4:
            new_last = middle - from_middle_right - last_left.mT @ last_left
        else:
            new_last = new_first
        new_middle = middle - from_middle_left - from_middle_right if new_n >= 3 else new_first
        new_lower = -(right.mT @ left) if n >= 3 else lower
        n, first, middle, last, lower = new_n, new_first, new_middle, new_last, new_lower
    levels.append(Level(1, lower, None, _cholesky(first), None, None, None))
    return levels


def log_det(levels: list[Level]) -> torch.Tensor:
    """log det Λ = Σ over levels of 2 Σ log diag of every eliminated block's Cholesky factor."""

    def half_log_det(chol: torch.Tensor) -> torch.Tensor:
        return chol.diagonal().log().sum()

    total = 2 * half_log_det(levels[-1].chol_last)
    for level in levels[:-1]:
        n, m = level.size, level.size // 2
        middles = m - (n % 2 == 0)
        if middles:
            total = total + 2 * middles * half_log_det(level.chol_middle)
        if n % 2 == 0:
            total = total + 2 * half_log_det(level.chol_last)
    return total


def _rows_cholesky_solve(chol: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (L Lᵀ)⁻¹ b for every row b of ``rows`` (…, K)."""
    flat = rows.reshape(-1, rows.shape[-1])
    return torch.cholesky_solve(flat.mT, chol).mT.reshape(rows.shape)


def _interleave(even: torch.Tensor, odd: torch.Tensor, dim: int) -> torch.Tensor:
    """e0, o0, e1, o1, … along ``dim`` (negative), for len(even) − len(odd) ∈ {0, 1}."""
    m = odd.shape[dim]
    paired = torch.stack([even.narrow(dim, 0, m), odd], dim)
    shape = list(paired.shape)
    axis = paired.ndim + dim - 1
    merged = paired.reshape(*shape[:axis], 2 * m, *shape[axis + 2 :])
    return torch.cat([merged, even.narrow(dim, m, even.shape[dim] - m)], dim)


def _shift_pad(rows: torch.Tensor, before: int, total: int) -> torch.Tensor:
    """``rows`` (…, r, K) zero-padded in time to (…, total, K), starting at ``before``."""
    return F.pad(rows, (0, 0, before, total - before - rows.shape[-2]))


def solve(levels: list[Level], rhs: torch.Tensor) -> torch.Tensor:
    """Λ⁻¹ b for b of shape (…, n, K), from the levels of :func:`factor`: O(n K²)."""
    level = levels[0]
    if level.size == 1:
        return _rows_cholesky_solve(level.chol_last, rhs)
    n, m = level.size, level.size // 2
    n_keep = n - m
    middles = m - (n % 2 == 0)  # eliminated middle blocks: every odd block except a last one
    even, odd = rhs[..., 0::2, :], rhs[..., 1::2, :]

    # Schur complement of the right-hand side: each eliminated block j sends −Λ[i, j] D_j⁻¹ b_j
    # to its neighbours i = j ± 1. In rows, with c_j = L_j⁻¹ b_j: c_j Y to the left, c_j Y_t to
    # the right.
    update = torch.zeros_like(even)
    if middles:
        c_middle = solve_rows(level.chol_middle, odd[..., :middles, :])
        update = update + _shift_pad(c_middle @ level.left, 0, n_keep)
        update = update + _shift_pad(c_middle @ level.right, 1, n_keep)
    if n % 2 == 0:
        c_last = solve_rows(level.chol_last, odd[..., middles:, :])
        update = update + _shift_pad(c_last @ level.last_left, middles, n_keep)
    kept = solve(levels[1:], even - update)

    # Back substitution: x_j = D_j⁻¹ (b_j − Λ[j, j−1] x_{j−1} − Λ[j, j+1] x_{j+1}).
    back = odd - kept[..., :m, :] @ level.lower.mT
    parts = []
    if middles:
        back_middle = back[..., :middles, :] - kept[..., 1 : middles + 1, :] @ level.lower
        parts.append(_rows_cholesky_solve(level.chol_middle, back_middle))
    if n % 2 == 0:
        parts.append(_rows_cholesky_solve(level.chol_last, back[..., middles:, :]))
    return _interleave(kept, torch.cat(parts, -2), -2)


def _inverse(chol: torch.Tensor) -> torch.Tensor:
    """D⁻¹ = L⁻ᵀ L⁻¹ from D's Cholesky factor L (a conditional covariance, needed itself)."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    inverse_factor = _tri_solve(chol, eye)
    return inverse_factor.mT @ inverse_factor


def selected_inverse(levels: list[Level]) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal blocks (n, K, K) of Λ⁻¹ and its sub-diagonal blocks (n − 1, K, K).

    An eliminated block j with kept neighbours i = j − 1 and k = j + 1 is, given them, Gaussian
    with covariance D_j⁻¹ and mean D_j⁻¹(b_j − lower z_i − lowerᵀ z_k), so with
    M_i = −D_j⁻¹ lower and M_k = −D_j⁻¹ lowerᵀ (:func:`expand_selected`).
    """
    level = levels[0]
    if level.size == 1:
        cov = _inverse(level.chol_last).unsqueeze(0)
        return cov, cov[:0]
    kept_cov, kept_cross = selected_inverse(levels[1:])
    middle = last = None
    if level.chol_middle is not None:
        d_inv = _inverse(level.chol_middle)
        middle = d_inv, -d_inv @ level.lower, -d_inv @ level.lower.mT
    if level.size % 2 == 0:
        d_inv = _inverse(level.chol_last)
        last = d_inv, -d_inv @ level.lower
    return expand_selected(level.size, kept_cov, kept_cross, middle, last)


def expand_selected(
    n: int, kept_cov, kept_cross, middle, last
) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the selected inverse, from the kept blocks' to all n blocks'.

    ``middle`` is (D⁻¹, M_i, M_k) for the eliminated interior blocks (or ``None``), ``last``
    (D⁻¹, M_i) for an eliminated last block (n even, else ``None``): an eliminated block is,
    given its kept neighbours i and k, Gaussian with covariance D⁻¹ and a mean linear in them
    with coefficients M_i and M_k, so

        Σ_jj = D⁻¹ + [M_i M_k] Cov(z_i, z_k) [M_i M_k]ᵀ,
        Σ_ji = M_i Σ_ii + M_k Σ_ki,    Σ_kj = Σ_ki M_iᵀ + Σ_kk M_kᵀ,

    where Σ_ii, Σ_kk and Σ_ki come from the reduced matrix (Σ_ki is its sub-diagonal block).
    """
    middles = n // 2 - (n % 2 == 0)
    covs, cross_back, cross_forward = [], [], []
    if middles:
        d_inv, m_i, m_k = middle
        s_ii, s_kk = kept_cov[:middles], kept_cov[1 : middles + 1]
        s_ki = kept_cross[:middles]
        covs.append(
            d_inv
            + m_i @ s_ii @ m_i.mT
            + m_k @ s_kk @ m_k.mT
            + m_i @ s_ki.mT @ m_k.mT
            + m_k @ s_ki @ m_i.mT
        )
        cross_back.append(m_i @ s_ii + m_k @ s_ki)
        cross_forward.append(s_ki @ m_i.mT + s_kk @ m_k.mT)
    if n % 2 == 0:
        d_inv, m_i = last
        s_ii = kept_cov[middles : middles + 1]
        covs.append(d_inv + m_i @ s_ii @ m_i.mT)
        cross_back.append(m_i @ s_ii)
    cov = _interleave(kept_cov, torch.cat(covs, 0), -3)
    # Sub-diagonal block t is Cov(z_{t+1}, z_t): for t = 2p it is Σ_ji of the p-th eliminated
    # block (j = 2p + 1), for t = 2p + 1 it is Σ_kj of the same block.
    back = torch.cat(cross_back, 0)
    forward = torch.cat(cross_forward, 0) if cross_forward else back[:0]
    return cov, _interleave(back, forward, -3)
