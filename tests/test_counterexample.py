"""x = w(z₁ + z₂) + ε: objectives and optima against their closed forms."""

import math

import pytest

from toyvae.counterexample import counterexample_objectives, counterexample_optima
from toyvae.tolerances import EPS


@pytest.mark.parametrize("w", [0.3, 0.7701, 1.0, 1.8])
@pytest.mark.parametrize("s", [3.0, 5.0])
def test_counterexample_objectives_match_their_closed_forms(w, s):
    """E log p_w(x) and the best mean-field ELBO equal the hand-derived closed forms."""
    values = counterexample_objectives(w, s)
    u = w * w
    log_likelihood = -0.5 * (math.log(2 * math.pi) + math.log(1 + 2 * u) + s / (1 + 2 * u))
    elbo = -0.5 * (math.log(2 * math.pi) + 2 * math.log(1 + u) + s / (1 + 2 * u))
    # A handful of terms of size ≤ 3 each, computed through 2×2 factorisations: 64·eps·3.
    assert abs(values.log_likelihood.item() - log_likelihood) <= 64 * EPS * 3
    assert abs(values.elbo.item() - elbo) <= 64 * EPS * 3
    # The gap is the mean-field KL to the posterior, ½ log((1 + w²)²/(1 + 2w²)) > 0.
    gap = 0.5 * math.log((1 + u) ** 2 / (1 + 2 * u))
    assert abs((values.log_likelihood - values.elbo).item() - gap) <= 128 * EPS * 3


def test_counterexample_optima_match_the_closed_forms():
    """E[x²] = 3: log p(x) peaks at w = 1, the mean-field ELBO at w = √((√33 − 1)/8) ≈ 0.770."""
    s = 3.0
    optima = counterexample_optima(s)
    ml = math.sqrt((s - 1) / 2)
    u = (s - 4 + math.sqrt(s * s + 8 * s)) / 8
    best = math.sqrt(u)
    assert best == pytest.approx(math.sqrt((math.sqrt(33) - 1) / 8), rel=4 * EPS)

    # A maximiser is located only to within √(2δ/|f''|), δ the rounding in f (about 16·eps·|f|,
    # |f| ≤ 3): the objective is flat to second order there. f'' by central differences.
    def curvature(field, w, h=1e-4):
        f = [getattr(counterexample_objectives(w + t * h, s), field).item() for t in (-1, 0, 1)]
        return abs(f[0] - 2 * f[1] + f[2]) / h**2

    # Brent's own stopping tolerance xatol = 1e-12 adds to the rounding-limited one.
    for found, exact, field in [
        (optima.maximum_likelihood, ml, "log_likelihood"),
        (optima.maximum_elbo, best, "elbo"),
    ]:
        assert abs(found - exact) <= math.sqrt(2 * 16 * EPS * 3 / curvature(field, exact)) + 1e-12
    # ELBO ascent trades likelihood for a smaller gap: both orderings hold by a margin.
    at_ml, at_best = counterexample_objectives(ml, s), counterexample_objectives(best, s)
    assert at_ml.log_likelihood.item() - at_best.log_likelihood.item() > 0.02
    assert at_best.elbo.item() - at_ml.elbo.item() > 0.02
    assert (at_best.log_likelihood - at_best.elbo).item() < (
        at_ml.log_likelihood - at_ml.elbo
    ).item()


def test_second_moment_at_most_one_is_rejected():
    """E[x²] ≤ 1 (where maximum likelihood puts w = 0) raises ValueError naming second_moment."""
    with pytest.raises(ValueError, match="second_moment must be a number > 1"):
        counterexample_optima(0.5)
