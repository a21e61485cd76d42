r"""Odd–even cyclic reduction of a chain least-squares problem by orthogonal transformations.

The posterior of a time-invariant linear-Gaussian state-space model is the solution of a
least-squares problem over z_0 … z_{n−1} whose rows touch one state or two neighbours:

    unary rows   U_t z_t ≈ u_t          (U_0 = ``first``, U_{n−1} = ``last``, else ``middle``)
    pair rows    P z_t + S z_{t+1} ≈ v_t (the same P = ``left``, S = ``right`` for every t)

so the posterior precision is Λ = Fᵀ F for the stacked rows F, and the posterior mean minimises
‖F z − y‖². :mod:`toyvae._block_tridiagonal` reduces Λ itself, formed as sums of products such
as H̃ᵀH̃; with small observation noise and more states than observations, those products swamp
the prior's O(1) part by rounding (the condition number of Λ is the square of F's), and log p(x)
loses up to half its digits. Here Λ is never formed: every step is a Householder QR of rows.

Eliminating an odd-numbered interior state j (neighbours i = j − 1, k = j + 1) takes the rows
that touch z_j, in the column order (z_j, z_i, z_k),

    [ S   P   0 ]   pair (i, j)
    [ P   0   S ]   pair (j, k)
    [ U   0   0 ]   unary j

and rotates them, Qᵀ[…] = R: the first K rows [R_jj R_ji R_jk] determine z_j given its
neighbours, z_j = R_jj⁻¹(c_j − R_ji z_i − R_jk z_k), and the next rows, which no longer touch
z_j, are the new pair rows between i and k. Every interior elimination of one level uses the same
matrices, so the reduced problem is again a uniform chain and one QR per level suffices: the
matrix work is O(K³ log n), while the right-hand sides are carried through (…, rows) products
with the level's Q, O(n) work. The last state, when eliminated (n even), gives rows on its left
neighbour, which join that neighbour's unary rows. After ⌈log₂ n⌉ levels one state is left.

Orthogonal transformations leave FᵀF unchanged, so R_jjᵀR_jj is the Schur complement that the
normal-equation route factors by Cholesky, and log det Λ is Σ 2 log|diag R| over the eliminated
blocks and the final one. Rows of a right-hand side that fall outside every R are residuals: they
do not change the solution and are dropped.

Nothing here is differentiated: :mod:`toyvae.state_space` takes values from this route and
derivatives from the normal-equation route (both exact in exact arithmetic).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from toyvae._block_tridiagonal import _interleave, expand_selected
from toyvae._linalg import solve_rows

__all__ = [
    "ChainRows",
    "Level",
    "factor",
    "log_det",
    "precision_blocks",
    "precision_factor",
    "selected_inverse",
    "solve",
]


class ChainRows(NamedTuple):
    """The rows of a uniform chain least-squares problem over n states of size K.

    Attributes
    ----------
    size : int
        n.
    first, middle, last : (r, K) tensors
        The unary rows of state 0, of states 1 … n − 2 (all equal) and of state n − 1; each
        may have its own number of rows. For n = 1 only ``first`` is used.
    left, right : (r_b, K) tensors
        Every pair's rows: ``left`` on z_t, ``right`` on z_{t+1}.
    """

    size: int
    first: torch.Tensor
    middle: torch.Tensor
    last: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


class Level(NamedTuple):
    """One level: the rotations and triangular blocks of its eliminated states.

    ``*_q`` are the kept columns of a level's orthogonal factor (rows of a right-hand side times
    it give the rotated right-hand side); ``*_r`` the K×K triangle R_jj; ``*_left``/``*_right``
    R_ji and R_jk. ``merge_q`` rotates the last eliminated state's leftover rows into its left
    neighbour's unary rows (``None`` when they need no compression). For n = 1 only
    ``final_q`` and ``final_r`` are set.
    """

    size: int
    middle_q: torch.Tensor | None = None
    middle_r: torch.Tensor | None = None
    middle_left: torch.Tensor | None = None
    middle_right: torch.Tensor | None = None
    last_q: torch.Tensor | None = None
    last_r: torch.Tensor | None = None
    last_left: torch.Tensor | None = None
    merge_q: torch.Tensor | None = None
    final_q: torch.Tensor | None = None
    final_r: torch.Tensor | None = None


def _rotate(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, R) of a reduced QR of ``rows``: R has min(rows, columns) rows, and the rows of Qᵀ·rows
    beyond them are zero.

    The rows are factored in order of decreasing norm (Q's rows are returned in the original
    order). Householder QR is backward stable column by column; with rows of very different
    sizes (H̃ ≈ 1e6 beside the prior's O(1) rows) it is also stable row by row only when the
    large rows come first (Cox and Higham, 1998), and the small rows carry the digits of the
    O(1) directions.
    """
    order = torch.argsort(rows.norm(dim=-1), descending=True)
    q_sorted, r = torch.linalg.qr(rows[order])
    q = torch.empty_like(q_sorted)
    q[order] = q_sorted
    return q, r


def _compress(rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """At most K rows with the same Gram matrix as ``rows`` (K columns), and their rotation."""
    k = rows.shape[-1]
    if rows.shape[0] <= k:
        return None, rows
    return _rotate(rows)


def factor(rows: ChainRows) -> list[Level]:
    """The levels of the reduction: O(K³ log n) work, independent of any right-hand side."""
    n, first, middle, last, left, right = rows
    k = first.shape[-1]
    levels = []
    with torch.no_grad():
        while n > 1:
            m = n // 2
            parts: dict = {}
            if n >= 3:  # interior states 1, 3, … are eliminated, with both neighbours
                zero_b = torch.zeros_like(left)
                zero_u = torch.zeros_like(middle)
                stack = torch.cat(
                    [
                        torch.cat([right, left, zero_b], -1),
                        torch.cat([left, zero_b, right], -1),
                        torch.cat([middle, zero_u, zero_u], -1),
                    ],
                    -2,
                )
                q, r = _rotate(stack)
                parts.update(
                    middle_q=q,
                    middle_r=r[:k, :k],
                    middle_left=r[:k, k : 2 * k],
                    middle_right=r[:k, 2 * k :],
                )
                new_left, new_right = r[k:, k : 2 * k], r[k:, 2 * k :]
            if n % 2 == 0:  # the last state, n − 1, is eliminated: it has a left neighbour only
                stack = torch.cat(
                    [torch.cat([right, left], -1), torch.cat([last, torch.zeros_like(last)], -1)],
                    -2,
                )
                q, r = _rotate(stack)
                receiver = middle if n >= 4 else first
                merge_q, merged = _compress(torch.cat([receiver, r[k:, k:]], -2))
                parts.update(last_q=q, last_r=r[:k, :k], last_left=r[:k, k:], merge_q=merge_q)
            levels.append(Level(n, **parts))
            if n == 2:
                first = merged
            elif n % 2 == 0:
                last = merged
            if n >= 3:
                left, right = new_left, new_right
            n -= m
        final_q, final_r = _rotate(first)
        levels.append(Level(1, final_q=final_q, final_r=final_r))
    return levels


def log_det(levels: list[Level]) -> torch.Tensor:
    """log det Λ = Σ 2 log|diag R| over every eliminated block and the final one."""

    def half(r: torch.Tensor) -> torch.Tensor:
        return r.diagonal().abs().log().sum()

    total = 2 * half(levels[-1].final_r)
    for level in levels[:-1]:
        n, m = level.size, level.size // 2
        middles = m - (n % 2 == 0)
        if middles:
            total = total + 2 * middles * half(level.middle_r)
        if n % 2 == 0:
            total = total + 2 * half(level.last_r)
    return total


def _back(r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R⁻¹ v for every row v of ``rows``, R one upper (K, K) triangle."""
    return solve_rows(r, rows, upper=True)


def solve(levels, first, middle, last, pair) -> torch.Tensor:
    """argmin_z ‖F z − y‖², (…, n, K), for the right-hand sides of :class:`ChainRows`' rows.

    ``first`` (…, r_first) and ``last`` (…, r_last) are the end states' unary right-hand sides,
    ``middle`` (…, n − 2, r_middle) the interior states', ``pair`` (…, n − 1, r_b) the pairs'.
    """
    level = levels[0]
    n = level.size
    if n == 1:
        return _back(level.final_r, first @ level.final_q).unsqueeze(-2)
    m = n // 2
    middles = m - (n % 2 == 0)
    kept_n = n - m
    parts, pair_new = [], None
    if middles:
        stack = torch.cat(
            [
                pair[..., 0 : 2 * middles : 2, :],  # pairs (j − 1, j)
                pair[..., 1 : 2 * middles : 2, :],  # pairs (j, j + 1)
                middle[..., 0 : 2 * middles : 2, :],  # states j = 1, 3, …
            ],
            -1,
        )
        rotated = stack @ level.middle_q
        k = level.middle_r.shape[-1]
        c_middle, pair_new = rotated[..., :k], rotated[..., k:]
    new_first, new_last = first, last
    if n % 2 == 0:
        rotated = torch.cat([pair[..., n - 2, :], last], -1) @ level.last_q
        k = level.last_r.shape[-1]
        c_last = rotated[..., :k]
        receiver = middle[..., n - 3, :] if n >= 4 else first
        merged = torch.cat([receiver, rotated[..., k:]], -1)
        if level.merge_q is not None:
            merged = merged @ level.merge_q
        if n == 2:
            new_first = merged
        else:
            new_last = merged
    new_middle = middle[..., 1 : 2 * kept_n - 4 : 2, :]
    kept = solve(levels[1:], new_first, new_middle, new_last, pair_new)

    # Back substitution: z_j = R_jj⁻¹ (c_j − R_ji z_i − R_jk z_k).
    if middles:
        residual = (
            c_middle
            - kept[..., :middles, :] @ level.middle_left.mT
            - kept[..., 1 : middles + 1, :] @ level.middle_right.mT
        )
        parts.append(_back(level.middle_r, residual))
    if n % 2 == 0:
        residual = c_last - kept[..., kept_n - 1, :] @ level.last_left.mT
        parts.append(_back(level.last_r, residual).unsqueeze(-2))
    return _interleave(kept, torch.cat(parts, -2), -2)


def _conditional(r: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
    """−R_jj⁻¹ R_j·: the regression of an eliminated state on one neighbour."""
    return -torch.linalg.solve_triangular(r, coupling, upper=True)


def _inverse_gram(r: torch.Tensor) -> torch.Tensor:
    """(RᵀR)⁻¹ = R⁻¹R⁻ᵀ: an eliminated state's covariance given its neighbours."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    inverse = torch.linalg.solve_triangular(r, eye, upper=True)
    return inverse @ inverse.mT


def selected_inverse(levels: list[Level]) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal blocks (n, K, K) of Λ⁻¹ and its sub-diagonal blocks (n − 1, K, K).

    Given its kept neighbours, an eliminated state is Gaussian with covariance D⁻¹ = (R_jjᵀR_jj)⁻¹
    and mean linear in them with coefficients M_i = −R_jj⁻¹R_ji and M_k = −R_jj⁻¹R_jk; each
    level's blocks follow from the kept ones by
    :func:`toyvae._block_tridiagonal.expand_selected`.
    """
    level = levels[0]
    if level.size == 1:
        cov = _inverse_gram(level.final_r).unsqueeze(0)
        return cov, cov[:0]
    kept_cov, kept_cross = selected_inverse(levels[1:])
    middle = last = None
    if level.middle_r is not None:
        middle = (
            _inverse_gram(level.middle_r),
            _conditional(level.middle_r, level.middle_left),
            _conditional(level.middle_r, level.middle_right),
        )
    if level.last_r is not None:
        last = _inverse_gram(level.last_r), _conditional(level.last_r, level.last_left)
    return expand_selected(level.size, kept_cov, kept_cross, middle, last)


def precision_blocks(rows: ChainRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of the lower triangular L with Λ = LᵀL: its diagonal blocks L_tt (n, K, K),
    lower triangular with positive diagonals, and L_{t,t−1} (n − 1, K, K); L is block lower
    bidiagonal. With η = L(z − μ) ~ N(0, I) under the posterior, it is the chain

        z_t | z_{t−1} ~ N(μ_t − L_tt⁻¹L_{t,t−1}(z_{t−1} − μ_{t−1}), (L_ttᵀL_tt)⁻¹).

    The states are eliminated one at a time from the last to the first, each a small QR of the
    rows that touch it (rows in order of decreasing norm, columns reversed within every block):
    this is the QR of F with all its columns reversed, F J = Q R', so L = J R' J. A single dense
    QR of F J loses the O(1) directions when H̃ is large; block by block, with the rows sorted
    again at every step, it does not (tests/test_hard_state_space.py). O(n K³).
    """
    n, first, middle, last, left, right = rows
    k = first.shape[-1]
    with torch.no_grad():
        diagonals = [None] * n  # R'_tt and R'_t,t−1 per state, in reversed columns
        couplings = [None] * (n - 1)
        leftover = None
        for t in range(n - 1, -1, -1):
            unary = (first if t == 0 else last if t == n - 1 else middle).flip(-1)
            if leftover is not None:
                unary = torch.cat([unary, leftover], -2)
            if t == 0:
                diagonals[t] = _rotate(unary)[1][:k]
                break
            stack = torch.cat(
                [
                    torch.cat([unary, torch.zeros_like(unary)], -1),
                    torch.cat([right.flip(-1), left.flip(-1)], -1),
                ],
                -2,
            )
            r = _rotate(stack)[1]
            diagonals[t], couplings[t - 1] = r[:k, :k], r[:k, k:]
            leftover = r[k:, k:]
        diagonal = torch.stack(diagonals)
        # A row of R' and its sign may flip together (Q's column with it): make diag(L_tt) > 0.
        sign = torch.where(diagonal.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(diagonal.dtype)
        diagonal = (sign.unsqueeze(-1) * diagonal).flip(-2, -1)
        coupling = (
            (sign[1:].unsqueeze(-1) * torch.stack(couplings)).flip(-2, -1)
            if n > 1
            else first.new_zeros(0, k, k)
        )
        return diagonal, coupling


def precision_factor(rows: ChainRows) -> torch.Tensor:
    """Lower triangular L (nK × nK, positive diagonal) with Λ = LᵀL, so that S = L⁻¹ is the
    lower Cholesky factor of Λ⁻¹; dense, for small n (:func:`precision_blocks`, assembled)."""
    diagonal, coupling = precision_blocks(rows)
    n, k = diagonal.shape[0], diagonal.shape[-1]
    lower = diagonal.new_zeros(n * k, n * k)
    for t in range(n):
        lower[t * k : (t + 1) * k, t * k : (t + 1) * k] = diagonal[t]
        if t > 0:
            lower[t * k : (t + 1) * k, (t - 1) * k : t * k] = coupling[t - 1]
    return lower
