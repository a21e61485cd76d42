"""Contracts of the two cyclic reductions behind LinearGaussianSSM, against dense linear algebra.

``toyvae._block_tridiagonal`` reduces a symmetric block-tridiagonal precision Λ with repeated
blocks; ``toyvae._square_root_reduction`` reduces the rows F of the least-squares problem whose
normal matrix is Λ = FᵀF. Every answer (Λ⁻¹b, log det Λ, the blocks of Λ⁻¹ on and below the
diagonal, the factor L with Λ = LᵀL) is compared with the dense matrix's, for every chain
length from 1 to 9 (odd, even, powers of two) and batched right-hand sides.

Tolerances: both routes are backward stable, so each is within a small multiple of
nK·κ(Λ)·eps of the exact answer relative to its largest entry (Higham §7.2, §9, §19); the
inputs are drawn so that κ(Λ) ≤ 1e2 or so, and the bound is computed from κ itself.
"""

from __future__ import annotations

import mp_oracle as oracle
import numpy as np
import pytest
import seeds
import torch

from toyvae import _block_tridiagonal as btd
from toyvae import _square_root_reduction as sr

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
SIZES = list(range(1, 10))


# -- block-tridiagonal Λ -------------------------------------------------------------------------


def uniform_matrix(size, k, seed, dtype=F64):
    """A positive definite repeated-block tridiagonal Λ for every seed: diagonal blocks ⪰ 3I,
    ‖lower‖₂ = 1, so λ_min(Λ) ≥ 3 − 2 = 1 (block Gershgorin)."""
    gen = seeds.generator(seed)

    def spd():
        a = torch.randn(k, k, generator=gen, dtype=F64)
        return (a @ a.T / k + 3 * torch.eye(k, dtype=F64)).to(dtype)

    lower = torch.randn(k, k, generator=gen, dtype=F64)
    lower = (lower / torch.linalg.matrix_norm(lower, 2)).to(dtype)
    return btd.UniformBlockTridiagonal(size, spd(), spd(), spd(), lower), gen


def numpy_dense(matrix):
    """Λ assembled entry block by entry block in NumPy (the textbook layout)."""
    n, k = matrix.size, matrix.first.shape[-1]
    out = np.zeros((n * k, n * k))
    for t in range(n):
        block = matrix.first if t == 0 else matrix.last if t == n - 1 else matrix.middle
        out[t * k : (t + 1) * k, t * k : (t + 1) * k] = block.numpy()
        if t + 1 < n:
            out[(t + 1) * k : (t + 2) * k, t * k : (t + 1) * k] = matrix.lower.numpy()
            out[t * k : (t + 1) * k, (t + 1) * k : (t + 2) * k] = matrix.lower.numpy().T
    return out


def blocks_of_inverse(inverse, n, k):
    """The diagonal blocks (n, K, K) and the sub-diagonal blocks Σ[t+1, t] (n − 1, K, K)."""
    blocks = inverse.reshape(n, k, n, k)
    steps = torch.arange(n)
    return blocks[steps, :, steps], blocks[steps[1:], :, steps[:-1]]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_dense_places_first_middle_last_and_lower_blocks(size):
    """UniformBlockTridiagonal.dense() is the textbook (nK, nK) layout of its blocks."""
    matrix, _ = uniform_matrix(size, 2, seed=size)
    dense = matrix.dense()
    assert dense.dtype == F64 and dense.shape == (2 * size, 2 * size)
    # Only copies of the given entries and zeros: exact.
    assert np.array_equal(dense.numpy(), numpy_dense(matrix))


@pytest.mark.parametrize("size", SIZES)
def test_block_reduction_solves_and_inverts_like_dense_algebra(size):
    """solve (any batch of right-hand sides), log det and the selected inverse of Λ equal the
    dense answers, and keep their documented shapes."""
    k = 3
    matrix, gen = uniform_matrix(size, k, seed=100 + size)
    dense = torch.from_numpy(numpy_dense(matrix))
    levels = btd.factor(matrix)
    # Backward-stable eliminations: errors ≲ nK κ(Λ) eps relative (Higham §7.2, §9); κ ≤ 1e2.
    bound = 10 * size * k * torch.linalg.cond(dense).item() * EPS
    for batch in [(), (2, 3)]:
        rhs = torch.randn(*batch, size, k, generator=gen, dtype=F64)
        flat = rhs.reshape(-1, size * k)
        expected = torch.linalg.solve(dense, flat.mT).mT.reshape(rhs.shape)
        got = btd.solve(levels, rhs)
        assert got.shape == rhs.shape
        assert (got - expected).abs().max() <= bound * expected.abs().max()
    assert abs(btd.log_det(levels) - torch.logdet(dense)) <= bound * max(
        1.0, torch.logdet(dense).abs().item()
    )
    cov, cross = btd.selected_inverse(levels)
    want_cov, want_cross = blocks_of_inverse(torch.linalg.inv(dense), size, k)
    assert cov.shape == (size, k, k) and cross.shape == (size - 1, k, k)
    scale = want_cov.abs().max()
    assert (cov - want_cov).abs().max() <= bound * scale
    assert torch.all((cross - want_cross).abs() <= bound * scale)


@pytest.mark.parametrize("size", [1, 2, 5, 6])
def test_block_reduction_of_a_float32_matrix_is_float32(size):
    """A float32 Λ gives float32 solutions, log det and selected inverse, float32-accurate."""
    k = 2
    matrix, gen = uniform_matrix(size, k, seed=200 + size, dtype=torch.float32)
    dense = torch.from_numpy(numpy_dense(matrix))  # float64 copy of the float32 entries
    levels = btd.factor(matrix)
    rhs = torch.randn(size, k, generator=gen, dtype=F64)
    got = btd.solve(levels, rhs.float())
    log_det = btd.log_det(levels)
    cov, cross = btd.selected_inverse(levels)
    assert {got.dtype, log_det.dtype, cov.dtype, cross.dtype} == {torch.float32}
    # float32 elimination: ≲ nK κ eps32 relative, ×10 for the products; κ ≤ 1e2.
    bound = 10 * size * k * torch.linalg.cond(dense).item() * EPS32
    expected = torch.linalg.solve(dense, rhs.reshape(-1)).reshape(size, k)
    assert (got.double() - expected).abs().max() <= bound * expected.abs().max()
    want_cov, want_cross = blocks_of_inverse(torch.linalg.inv(dense), size, k)
    assert (cov.double() - want_cov).abs().max() <= bound * want_cov.abs().max()
    assert torch.all((cross.double() - want_cross).abs() <= bound * want_cov.abs().max())


def test_block_reduction_log_det_and_solve_are_differentiable():
    """Gradients of log det Λ and of bᵀΛ⁻¹b through the reduction equal the dense ones."""
    size, k = 6, 2
    matrix, gen = uniform_matrix(size, k, seed=300)
    blocks = [t.clone().requires_grad_() for t in matrix[1:]]
    rhs = torch.randn(size, k, generator=gen, dtype=F64)

    def both(dense_route):
        m = btd.UniformBlockTridiagonal(size, *blocks)
        if dense_route:
            dense = m.dense()
            value = torch.logdet(dense) + rhs.reshape(-1) @ torch.linalg.solve(
                dense, rhs.reshape(-1)
            )
        else:
            levels = btd.factor(m)
            value = btd.log_det(levels) + (rhs * btd.solve(levels, rhs)).sum()
        return torch.autograd.grad(value, blocks)

    # Two backward-stable float64 routes through a κ ≤ 1e2 matrix: 1e4 eps covers both.
    for got, want in zip(both(False), both(True), strict=True):
        assert torch.allclose(got, want, rtol=1e4 * EPS, atol=1e4 * EPS)


@pytest.mark.parametrize("size, block", [(1, "first"), (2, "last"), (3, "middle"), (4, "last")])
def test_block_reduction_refuses_an_indefinite_precision(size, block):
    """A pivot block that is not positive definite is a ValueError saying so."""
    matrix, _ = uniform_matrix(size, 2, seed=400 + size)
    matrix = matrix._replace(**{block: -torch.eye(2, dtype=F64)})
    # One sentence: what is wrong, then why (from its start to its end, nothing around it).
    message = r"^the posterior precision is not numerically positive definite: .* cyclic reduction "
    with pytest.raises(ValueError, match=message + r"failed to factor \(.*ill-conditioned\)$"):
        btd.factor(matrix)


def schur_complement(dense, keep, k):
    """Λ_SS − Λ_SE Λ_EE⁻¹ Λ_ES onto the blocks ``keep`` (the others eliminated), densely."""
    n = dense.shape[0] // k
    index = torch.arange(n * k).reshape(n, k)
    kept = index[keep].reshape(-1)
    gone = index[[t for t in range(n) if t not in keep]].reshape(-1)
    if gone.numel() == 0:
        return dense
    coupling = dense[kept][:, gone]
    return dense[kept][:, kept] - coupling @ torch.linalg.solve(dense[gone][:, gone], coupling.T)


@pytest.mark.parametrize("size", [2, 3, 5, 6, 8])
def test_block_reduction_levels_are_the_schur_complements_of_their_level(size):
    """Level j of factor() describes Λ's Schur complement onto blocks 0, 2ʲ, 2·2ʲ, …: its size,
    sub-diagonal block, and the Cholesky factors of its eliminated middle and last blocks (or of
    the single block left)."""
    k = 2
    matrix, _ = uniform_matrix(size, k, seed=450 + size)
    dense = torch.from_numpy(numpy_dense(matrix))
    levels = btd.factor(matrix)
    # Eliminations in float64 of a κ ≤ 1e2 matrix: 1e3 eps relative covers every level.
    tol = 1e3 * EPS * dense.abs().max()
    for j, level in enumerate(levels):
        reduced = schur_complement(dense, list(range(0, size, 2**j)), k)
        n = reduced.shape[0] // k
        blocks = reduced.reshape(n, k, n, k)
        assert level.size == n and level.lower.shape == (k, k)
        assert (level.chol_middle is None) == (n < 3)
        assert (level.chol_last is None) == (n % 2 == 1 and n > 1)
        if n >= 2:
            assert (level.lower - blocks[1, :, 0]).abs().max() <= tol
        if n >= 3:
            chol = level.chol_middle
            assert (chol @ chol.mT - blocks[1, :, 1]).abs().max() <= tol
        if level.chol_last is not None:
            chol = level.chol_last
            assert (chol @ chol.mT - blocks[-1, :, -1]).abs().max() <= tol
    assert levels[-1].size == 1


@pytest.mark.parametrize("longer", [0, 1])
@pytest.mark.parametrize("dim", [-1, -2, -3])
def test_interleave_alternates_even_and_odd_entries(longer, dim):
    """_interleave gives e0, o0, e1, o1, … (and the extra e last) along a negative axis."""
    m = 3
    gen = seeds.generator(500)
    shape = [2, 4, 5]
    shape[dim] = m + longer
    even = torch.randn(*shape, generator=gen)
    shape[dim] = m
    odd = torch.randn(*shape, generator=gen)
    pieces = []
    for j in range(m + longer):
        pieces.append(even.narrow(dim, j, 1))
        if j < m:
            pieces.append(odd.narrow(dim, j, 1))
    assert torch.equal(btd._interleave(even, odd, dim), torch.cat(pieces, dim))


# -- the square-root reduction of the rows F --------------------------------------------------


def chain_rows(size, k, counts, seed):
    """Random rows: ``counts`` = rows of (first, middle, last, each pair)."""
    gen = seeds.generator(seed)
    first, middle, last, pair = counts

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    rows = sr.ChainRows(size, randn(first, k), randn(middle, k), randn(last, k), *randn(2, pair, k))
    return rows, gen


def dense_rows(rows):
    """F: every unary and pair row placed in its states' columns."""
    n, k = rows.size, rows.first.shape[-1]
    unary = [rows.first] + [rows.middle] * max(n - 2, 0) + [rows.last] * (n > 1)
    placed = [torch.nn.functional.pad(u, (t * k, (n - 1 - t) * k)) for t, u in enumerate(unary)]
    pair = torch.cat([rows.left, rows.right], -1)
    placed += [torch.nn.functional.pad(pair, (t * k, (n - 2 - t) * k)) for t in range(n - 1)]
    return torch.cat(placed, -2)


# (first, middle, last, pair) row counts for K = 3: fewer rows than K (one observation), more
# (merged and compressed last rows), and the last state with more rows than the middle ones.
COUNTS = [(4, 1, 1, 3), (5, 4, 2, 3), (3, 2, 5, 2)]


@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_square_root_reduction_solves_and_inverts_like_dense_least_squares(size, counts):
    """solve is the least-squares solution for any batch of right-hand sides; log det, the
    selected inverse and the precision factor are those of FᵀF."""
    k = 3
    rows, gen = chain_rows(size, k, counts, seed=600 + 10 * size + counts[2])
    f = dense_rows(rows)
    gram = f.T @ f
    levels = sr.factor(rows)
    # QR is backward stable: errors ≲ nK κ(FᵀF) eps relative (Higham §19–20); ×10 slack.
    bound = 10 * size * k * torch.linalg.cond(gram).item() * EPS
    r_first, r_middle, r_last, r_pair = counts
    for batch in [(), (2,)]:
        rhs = [
            torch.randn(*batch, r_first, generator=gen, dtype=F64),
            torch.randn(*batch, max(size - 2, 0), r_middle, generator=gen, dtype=F64),
            torch.randn(*batch, r_last, generator=gen, dtype=F64),
            torch.randn(*batch, max(size - 1, 0), r_pair, generator=gen, dtype=F64),
        ]
        y = torch.cat(
            [rhs[0]]
            + [rhs[1][..., t, :] for t in range(size - 2)]
            + [rhs[2]] * (size > 1)
            + [rhs[3][..., t, :] for t in range(size - 1)],
            -1,
        )
        expected = torch.linalg.solve(gram, (y @ f).unsqueeze(-1)).squeeze(-1)
        expected = expected.reshape(*batch, size, k)
        got = sr.solve(levels, *rhs)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= bound * expected.abs().max()
    # log det: an absolute error of about κ·eps per eigenvalue's logarithm.
    assert abs(sr.log_det(levels) - torch.logdet(gram)) <= bound
    cov, cross = sr.selected_inverse(levels)
    want_cov, want_cross = blocks_of_inverse(torch.linalg.inv(gram), size, k)
    assert cov.shape == (size, k, k) and cross.shape == (size - 1, k, k)
    scale = want_cov.abs().max()
    assert (cov - want_cov).abs().max() <= bound * scale
    assert torch.all((cross - want_cross).abs() <= bound * scale)
    lower = sr.precision_factor(rows)
    assert torch.equal(lower, lower.tril()) and bool((lower.diagonal() > 0).all())
    assert (lower.mT @ lower - gram).abs().max() <= bound * gram.abs().max()
    # precision_factor is precision_blocks assembled: (n, K, K) and (n − 1, K, K) blocks.
    diagonal, coupling = sr.precision_blocks(rows)
    assert diagonal.shape == (size, k, k) and coupling.shape == (size - 1, k, k)
    blocks = lower.reshape(size, k, size, k)
    assert torch.equal(diagonal, torch.stack([blocks[t, :, t] for t in range(size)]))
    if size > 1:
        assert torch.equal(coupling, torch.stack([blocks[t + 1, :, t] for t in range(size - 1)]))


@pytest.mark.parametrize("shape", [(7, 3), (3, 3), (2, 4)])
def test_rotate_is_a_reduced_qr_of_the_rows(shape):
    """_rotate gives Q with orthonormal columns and upper triangular R, Q R = rows, with the
    rows of Q in the rows' own order."""
    gen = seeds.generator(700)
    rows = torch.randn(*shape, generator=gen, dtype=F64)
    rows[0] *= 1e-3  # not already in decreasing norm: the sort must be undone
    q, r = sr._rotate(rows)
    rank = min(shape)
    assert q.shape == (shape[0], rank) and r.shape == (rank, shape[1])
    # Householder QR: ‖QR − A‖ and ‖QᵀQ − I‖ ≲ m n eps (Higham Thm 19.4); ×10 slack.
    tol = 10 * shape[0] * shape[1] * EPS
    assert torch.equal(r, r.triu())
    assert (q @ r - rows).abs().max() <= tol * rows.abs().max()
    assert (q.mT @ q - torch.eye(rank, dtype=F64)).abs().max() <= tol


def test_rotate_keeps_the_digits_of_small_rows_beside_large_ones():
    """With rows 1e8 times larger than the others (tiny observation noise), RᵀR still carries
    the small rows' O(1) directions: (RᵀR)⁻¹ agrees with the 60-digit inverse of the Gram
    matrix, whatever order the rows come in."""
    k = 4
    gen = seeds.generator(750)
    # Orthonormal small rows (κ = 1) and two large rows: Gram = I + HᵀH, κ(Gram⁻¹ on the O(1)
    # directions) = 1, so a row-wise backward-stable QR gives (RᵀR)⁻¹ to a few eps.
    small = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))[0]
    large = 1e8 * torch.randn(2, k, generator=gen, dtype=F64)
    for rows in [torch.cat([small, large]), torch.cat([large, small])]:
        exact_mp = oracle.to_mp(rows.numpy())
        exact = oracle.to_float((exact_mp.T * exact_mp) ** -1)
        _, r = sr._rotate(rows)
        inverse = torch.linalg.inv(r)
        got = (inverse @ inverse.mT).numpy()
        # Row-wise stable: ≲ m n eps relative (Cox & Higham 1998); an unsorted QR is off ~1e-8.
        assert np.abs(got - exact).max() <= 10 * rows.numel() * EPS * np.abs(exact).max()


@pytest.mark.parametrize("count", [2, 3, 6])
def test_compress_keeps_the_gram_matrix_with_at_most_k_rows(count):
    """_compress returns rows that fit (≤ K) unchanged, else K rows with the same Gram matrix."""
    gen = seeds.generator(800 + count)
    rows = torch.randn(count, 3, generator=gen, dtype=F64)
    rotation, kept = sr._compress(rows)
    if count <= 3:
        assert rotation is None and kept is rows
    else:
        assert kept.shape == (3, 3) and rotation.shape == (count, 3)
        # Householder QR: Gram matrices agree to ≲ m n eps ‖rows‖²; ×10 slack.
        gram = rows.T @ rows
        assert (kept.T @ kept - gram).abs().max() <= 10 * count * 3 * EPS * gram.abs().max()


def test_square_root_levels_carry_no_autograd_history():
    """factor and precision_factor work under no_grad: their tensors are plain values even
    when the rows require gradients (derivatives come from the other route)."""
    rows, _ = chain_rows(6, 2, (3, 2, 2, 2), seed=900)
    rows = sr.ChainRows(rows.size, *(t.requires_grad_() for t in rows[1:]))
    for level in sr.factor(rows):
        for value in level[1:]:
            assert value is None or not value.requires_grad
    assert not sr.precision_factor(rows).requires_grad
