"""log_evidence at D = 1,000,000, K = 16, against an exact route that never forms a D-long Woodbury.

The reference model is a direct sum rotated in latent space. Split the D coordinates into K
blocks of D/K and let latent k load only on block k, with loadings w_k: W₀ is block-diagonal.
Rotate it by an orthogonal K×K matrix R, W = W₀R. Then WWᵀ = W₀W₀ᵀ, so p(x) is unchanged,
while W is dense and its Gram matrix is full. Under W₀ the blocks are independent, and each
one is a rank-one-plus-diagonal Gaussian N(b_k, w_k w_kᵀ + Ψ_k), whose log-density follows from
the matrix determinant lemma and the Sherman–Morrison formula:

    log N(x_k) = −½ [n log 2π + Σ log ψ + log(1 + a) + ‖r̃‖² − c² / (1 + a)],
    w̃ = w_k / √ψ,  r̃ = (x_k − b_k) / √ψ,  a = ‖w̃‖²,  c = w̃ᵀr̃.

Summing the K blocks gives log p(x) by an independent computation that is exact in exact
arithmetic.
"""

from __future__ import annotations

import math

import seeds
import torch

from toyvae import LinearGaussian

D = 1_000_000
K = 16
N = 3  # data points
BLOCK = D // K
EPS = torch.finfo(torch.float64).eps / 2  # unit roundoff u of float64


def _gamma(n: int) -> float:
    """Higham's γ_n = n u / (1 − n u): relative error bound of an n-term sum in any order."""
    return n * EPS / (1 - n * EPS)


def test_log_evidence_at_a_million_dimensions_matches_independent_blocks():
    """log_evidence at D = 10⁶, K = 16 equals the sum of K exact rank-one block log-densities."""
    gen = seeds.generator(20240611)
    f64 = torch.float64
    loadings = torch.randn(K, BLOCK, generator=gen, dtype=f64)  # w_k for block k
    rotation, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=f64))
    # Row d in block k of W₀R is w_k[d]·R[k, :]: built as (K, BLOCK, K), then flattened to (D, K).
    weight = (loadings.unsqueeze(-1) * rotation.unsqueeze(1)).reshape(D, K)
    bias = torch.randn(D, generator=gen, dtype=f64)
    noise = torch.empty(D, dtype=f64).uniform_(-2.0, 2.0, generator=gen).exp()
    z = torch.randn(N, K, generator=gen, dtype=f64)
    x = z @ weight.mT + bias + noise.sqrt() * torch.randn(N, D, generator=gen, dtype=f64)

    actual = LinearGaussian(weight, bias, noise).log_evidence(x)

    # Independent reference, block by block, in the unrotated coordinates.
    scale = noise.sqrt().reshape(K, BLOCK)
    w = loadings / scale  # (K, BLOCK)
    r = ((x - bias).reshape(N, K, BLOCK)) / scale  # (N, K, BLOCK)
    a = w.square().sum(-1)  # (K,)
    c = (w * r).sum(-1)  # (N, K)
    r_norm2 = r.square().sum((-2, -1))  # (N,)
    explained = (c.square() / (1 + a)).sum(-1)  # (N,)
    log_det = noise.log().sum() + a.log1p().sum()
    expected = -0.5 * (D * math.log(2 * math.pi) + log_det + r_norm2 - explained)

    # Tolerance: a worst-case rounding bound, γ_n (any summation order, so it covers BLAS dot
    # products of length D) times the sum of the magnitudes of everything either side adds up:
    # - the constants: D log 2π, Σ|log ψ|, and Σ log(1 + a_k) (= log det Λ);
    # - toyvae's Gram G = W̃ᵀW̃ (D-long dot products): |δ log det Λ| = |tr(Λ⁻¹ δG)|
    #   ≤ γ_D K tr G, since |Λ⁻¹_ij| ≤ 1;
    # - toyvae's misfit r̃ − W̃μ and its squared norm: ≤ γ Σ_d (|r̃_d| + |w̃_d|·|μ|)²
    #   ≤ γ (2‖r̃‖² + 2‖μ‖² tr G) by Cauchy–Schwarz. Errors in μ itself enter only at second
    #   order, since the completed square is stationary in μ;
    # - the reference's ‖r̃‖², c²/(1 + a), and its sensitivity 2|c| γ Σ|w̃ r̃| / (1 + a) to c.
    # Both sides' elementwise operations add at most K + 8 roundings per term.
    gram_trace = a.sum()  # tr G is rotation invariant: Σ_k ‖w̃_k‖²
    mean_norm2 = (c / (1 + a)).square().sum(-1)  # ‖μ‖², rotation invariant
    c_sensitivity = (2 * c.abs() * (w.abs() * r.abs()).sum(-1) / (1 + a)).sum(-1)
    magnitude = (
        D * math.log(2 * math.pi)
        + noise.log().abs().sum()
        + a.log1p().sum()
        + K * gram_trace
        + 3 * r_norm2
        + 2 * mean_norm2 * gram_trace
        + mean_norm2
        + explained
        + c_sensitivity
    )
    tolerance = _gamma(D + K + 8) * magnitude
    assert actual.shape == (N,)
    assert torch.all((actual - expected).abs() <= tolerance), (actual - expected, tolerance)
