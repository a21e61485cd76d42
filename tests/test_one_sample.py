"""Near the posterior, the variance of a one-sample ELBO estimate is twice the gap.

Along q_t = N(μ + t S a, S(I + tE)(S(I + tE))ᵀ), with E lower triangular, the exact posterior
N(μ, SSᵀ) seen from q_t has B = S⁻¹L_q = I + tE and c = S⁻¹(m − μ) = t a (the coordinates of
docs/estimators.md). Both sides are then explicit series in t:

    Var log w = ½‖tF + t²EᵀE‖²_F + t²‖(I + tEᵀ)a‖²,       F = E + Eᵀ           (a polynomial)
    2 KL      = 2t tr E + t²(‖E‖²_F + ‖a‖²) − 2 Σ_i log(1 + t E_ii)

and the t² terms agree because ½‖F‖²_F = ‖E‖²_F + tr E² = ‖E‖²_F + Σ E_ii² for triangular E.
"""

from __future__ import annotations

import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.tolerances import EPS, magnitude

DT = torch.float64
# A generic direction: every term of the cubic coefficient is non-zero.
E = torch.tensor([[0.5, 0.0, 0.0], [0.7, -0.4, 0.0], [-0.3, 0.2, 0.8]], dtype=DT)
A = torch.tensor([0.6, -0.8, 0.5], dtype=DT)


def _model(noise: str) -> toyvae.LinearGaussian:
    g = seeds.generator(0)
    weight = torch.randn(5, 3, generator=g, dtype=DT)
    bias = torch.randn(5, generator=g, dtype=DT)
    factor = torch.randn(5, 5, generator=g, dtype=DT)
    psi = {
        "isotropic": torch.tensor(0.4, dtype=DT),
        "diagonal": 0.2 + torch.rand(5, generator=g, dtype=DT),
        "full": factor @ factor.T / 5 + 0.3 * torch.eye(5, dtype=DT),
    }[noise]
    return toyvae.LinearGaussian(weight, bias, psi)


def _coefficients():
    """The t³ coefficient of Var log w − 2 KL, and the t⁴ coefficient of Var log w."""
    f = E + E.T
    ete = E.T @ E
    diag = E.diagonal()
    # ½‖tF + t²EᵀE‖² gives t³⟨F, EᵀE⟩; t²‖a + tEᵀa‖² gives 2t³ aᵀEa; −2 log(1 + tE_ii) has
    # t³ coefficient −(2/3)E_ii³, which 2 KL carries and the difference subtracts.
    cubic = (f * ete).sum() + 2 * A @ E @ A + (2 / 3) * diag.pow(3).sum()
    quartic = 0.5 * ete.square().sum() + (E.T @ A).square().sum()
    return cubic, quartic


@pytest.mark.parametrize("noise", ["isotropic", "diagonal", "full"])
def test_log_weight_variance_is_twice_the_gap_to_second_order(noise):
    """Var log w − 2 KL(q_t ‖ p(z|x)) = κ₃ t³ + O(t⁴) along a path q_t → p(z|x), κ₃ by hand."""
    model = _model(noise)
    x, _ = model.sample((), generator=seeds.generator(1))
    post = model.posterior(x)
    s = post.scale_tril
    cubic, quartic = _coefficients()
    eye = torch.eye(3, dtype=DT)
    kappa = torch.linalg.cond(s @ s.mT)
    for t in (0.1, 0.03, 0.01, 0.003):
        q = MultivariateNormal(post.loc + t * (s @ A), scale_tril=s @ (eye + t * E))
        variance = toyvae.log_weight_moments(model, x, q).variance
        twice_gap = 2 * toyvae.kl_to_posterior(model, x, q)
        residual = variance - twice_gap - cubic * t**3
        # What remains is quartic * t⁴ (Var is a polynomial in t) and the tail
        # 2 Σ_i Σ_{j≥4} |t E_ii|^j / j ≤ ½ Σ_i |t E_ii|⁴ / (1 − |t E_ii|) of the log-det series.
        u = (t * E.diagonal()).abs()
        series = quartic * t**4 + 0.5 * (u**4 / (1 - u)).sum()
        # Rounding: the KL is a sum of K + 2 groups of terms of total size M (Higham n·eps·M,
        # relative to magnitude()), and B = S⁻¹L_q is formed with a relative error of
        # K κ(Σ) eps, which enters both sides through ‖B‖² ≈ K.
        rounding = 4 * (5 + 3) * EPS * magnitude(model, x, q) + 4 * 3 * 3 * kappa * EPS
        assert (residual.abs() <= series + rounding).all(), (t, residual, series, rounding)
        # The bound is sharp: the t² terms cancel, and the t³ term is what is left.
        assert series + rounding < 0.5 * abs(cubic) * t**3
