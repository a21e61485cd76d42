"""The stationary points of the PPCA likelihood (Tipping & Bishop 1999, §3.2): an oracle for
tests/test_ppca.py, tests/test_gaps.py and tests/test_training.py."""

import itertools
import math


def stationary_log_likelihood(eigenvalues, kept):
    """Average log-likelihood at the PPCA stationary point whose non-zero columns of W use the
    eigenvectors ``kept`` (Tipping & Bishop 1999, §3.2), or None if there is no such point.

    σ² is the mean of the other eigenvalues, each kept one must exceed it (W's column is
    √(λ_i − σ²) u_i), and then log det C = Σ_kept log λ_i + (D − |kept|) log σ², tr(C⁻¹S) = D.
    """
    d = len(eigenvalues)
    others = [lam for i, lam in enumerate(eigenvalues) if i not in kept]
    sigma2 = sum(others) / len(others)
    if any(eigenvalues[i] <= sigma2 for i in kept):
        return None
    log_det = sum(math.log(eigenvalues[i]) for i in kept) + len(others) * math.log(sigma2)
    return -0.5 * (d * math.log(2 * math.pi) + log_det + d)


def ml_and_nearest_saddle(eigenvalues, k):
    """ℓ_ML (the K largest eigenvalues kept) and the best ℓ over the other stationary points."""
    d = len(eigenvalues)
    best = stationary_log_likelihood(eigenvalues, set(range(k)))
    others = [
        stationary_log_likelihood(eigenvalues, set(kept))
        for r in range(k + 1)
        for kept in itertools.combinations(range(d), r)
        if set(kept) != set(range(k))
    ]
    return best, max(value for value in others if value is not None)
