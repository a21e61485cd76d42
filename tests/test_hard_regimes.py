"""Exact where it is hard: small noise, K > D, ill-conditioned W, against each problem's floor.

The tolerance here is not a bound on rounding built from the size of the terms (which, with
Ã ≈ 1e6, has about 1e7 of slack) but the problem's own float64 floor: how much the exact
answer moves when every input is perturbed by one rounding, |δθ| ≤ eps·|θ|. The oracle
computes it at 60 digits as the largest change over a few random sign patterns s,
|f(θ ∘ (1 + eps·s)) − f(θ)|, a lower estimate of the componentwise condition number times
eps (each pattern hits the worst case only in part: we allow 30 times it). An algorithm that is
backward stable lands within a small multiple of it; one that squares a condition number
(the normal equations Λ = I + ÃᵀÃ, or the textbook r̃ᵀr̃ − μᵀΛμ) does not.
"""

from __future__ import annotations

import mp_oracle as oracle
import numpy as np
import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

from toyvae import LinearGaussian, elbo, expected_log_likelihood, kl_to_posterior

EPS = float(np.finfo(np.float64).eps)
PATTERNS = 4  # random sign patterns per floor estimate
ALLOWANCE = 30  # multiples of the estimated floor: see the module docstring


class Hard:
    """A model and one observation in a hard regime, with q near its posterior."""

    def __init__(
        self, seed: int, d: int, k: int, noise: float, weight_cond: float = 1.0, *, pinned=False
    ):
        # pinned: the seed as written, not moved by TOYVAE_SEED_OFFSET (a documented example).
        rng = np.random.default_rng(seed) if pinned else seeds.rng(seed)
        left, _ = np.linalg.qr(rng.standard_normal((d, d)))
        right, _ = np.linalg.qr(rng.standard_normal((k, k)))
        singular = np.logspace(0, -np.log10(weight_cond), min(d, k))
        self.weight = left[:, : min(d, k)] * singular @ right[:, : min(d, k)].T
        self.bias = rng.standard_normal(d)
        self.noise = noise * np.exp(rng.uniform(-1, 1, d))
        z = rng.standard_normal(k)
        self.x = self.bias + self.weight @ z + np.sqrt(self.noise) * rng.standard_normal(d)
        model = LinearGaussian(self.weight, self.bias, self.noise)
        post = model.posterior(torch.from_numpy(self.x))
        self.q_tril = 1.01 * post.scale_tril.numpy()
        self.q_loc = post.loc.numpy() + post.scale_tril.numpy() @ (0.01 * rng.standard_normal(k))
        self.name = f"D={d} K={k} noise~{noise:.0e} cond(W)={weight_cond:.0e}"
        if pinned:
            self.name += f" seed={seed}"

    def exact(self, quantity: str, theta: dict):
        model = oracle.Model(theta["weight"], theta["bias"], theta["noise"])
        if quantity == "log_evidence":
            return model.log_evidence(theta["x"])
        cov_q = oracle.covariance_from_tril(theta["q_tril"])
        return getattr(model, quantity)(theta["x"], theta["q_loc"], cov_q)

    def floor(self, quantity: str) -> float:
        """max over sign patterns of |f(θ(1 + eps·s)) − f(θ)|, in 60 digits."""
        names = ["weight", "bias", "noise", "x", "q_loc", "q_tril"]
        theta = {name: getattr(self, name) for name in names}
        exact = self.exact(quantity, theta)
        rng = seeds.rng(0)
        worst = 0.0
        for _ in range(PATTERNS):
            perturbed = {}
            for name, value in theta.items():
                signs = rng.choice([-1.0, 1.0], size=np.shape(value))
                mp_value = oracle.to_mp(value)
                if isinstance(mp_value, oracle.MP.matrix):
                    flat = oracle.to_mp(signs)
                    for i in range(mp_value.rows):
                        for j in range(mp_value.cols):
                            mp_value[i, j] *= 1 + EPS * flat[i, j]
                perturbed[name] = mp_value
            if quantity != "log_evidence":  # q's factor stays lower triangular
                perturbed["q_tril"] = oracle.to_mp(np.tril(oracle.to_float(perturbed["q_tril"])))
            worst = max(worst, abs(float(self.exact(quantity, perturbed) - exact)))
        return worst

    def toyvae(self, quantity: str) -> float:
        model = LinearGaussian(self.weight, self.bias, self.noise)
        x = torch.from_numpy(self.x)
        if quantity == "log_evidence":
            return model.log_evidence(x).item()
        q = MultivariateNormal(
            torch.from_numpy(self.q_loc), scale_tril=torch.from_numpy(self.q_tril)
        )
        functions = {
            "elbo": elbo,
            "kl_to_posterior": kl_to_posterior,
            "expected_log_likelihood": expected_log_likelihood,
        }
        return functions[quantity](model, x, q).item()


CASES = [
    Hard(0, 3, 6, 1e-10),
    Hard(1, 4, 8, 1e-12),
    Hard(2, 10, 3, 1e-12),
    Hard(3, 6, 4, 1e-8, weight_cond=1e6),
    Hard(4, 5, 10, 1e-6, weight_cond=1e4),
    # Found by scripts/flake_rate.py (TOYVAE_SEED_OFFSET=7 moves seed 0 to this one): here the
    # ELBO summed as E_q log p(x|z) − KL(q ‖ p(z)) is 35 floors off, the regrouped sum 0.1.
    Hard(1369798745, 3, 6, 1e-10, pinned=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "quantity", ["log_evidence", "elbo", "kl_to_posterior", "expected_log_likelihood"]
)
def test_within_a_small_multiple_of_the_problems_own_floor(case, quantity):
    """log p(x), the ELBO, the KL and E_q log p(x|z) are within 30× the float64 floor the
    oracle estimates (for E_q log p(x|z) alone that floor is far above the ELBO's: its terms are
    not stationary at the posterior)."""
    exact = float(
        case.exact(
            quantity,
            {n: getattr(case, n) for n in ["weight", "bias", "noise", "x", "q_loc", "q_tril"]},
        )
    )
    floor = case.floor(quantity)
    error = abs(case.toyvae(quantity) - exact)
    # Plus one ulp of the value: the floor estimate can be below the final rounding itself.
    assert error <= ALLOWANCE * floor + EPS * abs(exact), (error, floor, exact)
