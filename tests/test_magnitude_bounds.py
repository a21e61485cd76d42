"""toyvae.tolerances.magnitude bounds what it is the scale of, on cases built so that one group
of terms dominates.

M is documented as the sum of the absolute values of the terms of log p(x) (with q: also of
ELBO(q) and KL(q ‖ p(z|x)); with z: also of log p(x, z) and log p(z|x)). A signed sum is at
most the sum of its terms' magnitudes, so |quantity| ≤ M for each of them, whatever the model.
The random models of tests/test_tolerances.py rarely make one term dominate; each case here does
(the constant D log 2π, log det Λ, the residual, the prior's mean or its log-determinant, q's
mean), so M leaving out or shrinking that term shows as a quantity larger than M.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.tolerances import magnitude

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


def _prior(mean, variance):
    k = len(mean)
    return MultivariateNormal(_t(mean), covariance_matrix=variance * torch.eye(k, dtype=F64))


def _q(mean, variance):
    return _prior(mean, variance)


# name: (model, x, q, z). Approximate sizes in the comments: |quantity| against M.
CASES = {
    # D = 10, W ≈ 0, Ψ = I, x = b: log p(x) ≈ −½·10·log 2π ≈ −9.2, from the constant alone.
    "constant": (
        toyvae.LinearGaussian(1e-3 * torch.ones(10, 1, dtype=F64)),
        torch.zeros(10, dtype=F64),
        None,
        None,
    ),
    # W = 1000, Ψ = 1, x = b: log p(x) = −½(log 2π + log(1 + 10⁶)) ≈ −7.8, mostly log det Λ.
    "log det posterior precision": (toyvae.LinearGaussian(_t([[1e3]])), _t([0.0]), None, None),
    # W ≈ 0, Ψ = 1, x − b = 100: log p(x) ≈ −½·10⁴, the whitened residual.
    "residual": (toyvae.LinearGaussian(_t([[1e-3]])), _t([100.0]), None, None),
    # Prior N(3, 1), W = 1, x = −3: x − E[x] = −6 and log p(x) = −½(log 2π + log 2 + 18) ≈ −10.3.
    "prior mean": (
        toyvae.LinearGaussian(_t([[1.0]]), prior=_prior([3.0], 1.0)),
        _t([-3.0]),
        None,
        None,
    ),
    # Prior N(0, 10⁻⁸): log p(z = 0) = −½(log 2π + log 10⁻⁸) ≈ +8.3, so log p(x, z) ≈ +7.4 and
    # log p(z|x) ≈ +8.3 from the prior's log-determinant.
    "prior log det": (
        toyvae.LinearGaussian(_t([[1.0]]), prior=_prior([0.0], 1e-8)),
        _t([0.0]),
        None,
        _t([0.0]),
    ),
    # Prior N(10, 1), x = 10 = E[x], q = N(−10, 1): KL(q ‖ p(z)) = 200 and E_q log p(x|z) ≈ −201,
    # so ELBO ≈ −401 and KL(q ‖ p(z|x)) ≈ +400, from q's mean (20 prior standard deviations off).
    "q mean": (
        toyvae.LinearGaussian(_t([[1.0]]), prior=_prior([10.0], 1.0)),
        _t([10.0]),
        _q([-10.0], 1.0),
        None,
    ),
    # Standard prior, W ≈ 0, q = N(10, 1): KL(q ‖ p(z)) = 50, so ELBO ≈ −51, from q's mean.
    "q mean, small weight": (
        toyvae.LinearGaussian(_t([[1e-3]])),
        _t([0.0]),
        _q([10.0], 1.0),
        None,
    ),
    # W = 10, q = N(1, 10⁻⁶): the misfit x − b − W m = −10 gives E_q log p(x|z) ≈ −½·100 and
    # KL(q ‖ p(z)) ≈ ½ log 10⁶ ≈ 6.9, so ELBO ≈ −58, from q's mean through W.
    "q mean through the weight": (
        toyvae.LinearGaussian(_t([[10.0]])),
        _t([0.0]),
        _q([1.0], 1e-6),
        None,
    ),
    # W ≈ 0, q = N(0, 100): KL(q ‖ p(z)) = ½(100 − 1 − log 100) ≈ 47, so ELBO ≈ −48, from
    # q's variance.
    "q variance": (
        toyvae.LinearGaussian(_t([[1e-3]])),
        _t([0.0]),
        _q([0.0], 100.0),
        None,
    ),
    # W ≈ 0, q = N(0, 10⁻¹⁰): KL(q ‖ p(z)) ≈ ½ log 10¹⁰ ≈ 11.5, so ELBO ≈ −12, from q's
    # log-determinant.
    "q log det": (
        toyvae.LinearGaussian(_t([[1e-3]])),
        _t([0.0]),
        _q([0.0], 1e-10),
        None,
    ),
    # Prior with factor L₀ = [[1, 0], [−10, 1]] (det 1) and q = N(0, I) in z: in the prior's
    # standard coordinates q's covariance is L₀⁻¹L₀⁻ᵀ, of trace 102, so KL(q ‖ p(z)) = 50 and
    # ELBO ≈ −51, from the off-diagonal entry of L₀.
    "q covariance against a correlated prior": (
        toyvae.LinearGaussian(
            1e-3 * torch.ones(1, 2, dtype=F64),
            prior=MultivariateNormal(
                torch.zeros(2, dtype=F64), scale_tril=_t([[1.0, 0.0], [-10.0, 1.0]])
            ),
        ),
        _t([0.0]),
        _q([0.0, 0.0], 1.0),
        None,
    ),
}


def _quantities(model, x, q, z):
    values = {"log p(x)": model.log_evidence(x)}
    if q is not None:
        values["ELBO(q)"] = toyvae.elbo(model, x, q)
        values["KL(q || p(z|x))"] = toyvae.kl_to_posterior(model, x, q)
    if z is not None:
        values["log p(x, z)"] = model.log_joint(x, z)
        values["log p(z|x)"] = model.posterior(x).log_prob(z)
    return values


@pytest.mark.parametrize("case", list(CASES))
def test_magnitude_bounds_each_quantity_when_one_term_dominates(case):
    """|log p(x)|, |ELBO(q)|, KL, |log p(x, z)|, |log p(z|x)| ≤ M."""
    model, x, q, z = CASES[case]
    m = magnitude(model, x, q, z=z)
    assert math.isfinite(m.item())
    for name, value in _quantities(model, x, q, z).items():
        # Exact: |Σ tᵢ| ≤ Σ |tᵢ|. In floating point both sides are sums of ≤ D + K + 8 terms,
        # each correctly rounded to within (D + K + 8)·eps relative (Higham §4.2); the factor
        # 1 + 1e-12 covers that, and the defects this case targets move M by O(1) of itself.
        assert abs(value.item()) <= m.item() * (1 + 1e-12), (name, value.item(), m.item())


def test_magnitude_of_a_batch_is_the_magnitude_of_each_element():
    """M has the broadcast batch shape of x, q and z, and each entry is the M of that element
    alone: a batch never mixes its elements' terms."""
    model = toyvae.LinearGaussian(
        _t([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.1]]),
        _t([0.4, -0.2, 1.0]),
        _t([0.5, 0.8, 1.3]),
        prior=MultivariateNormal(_t([0.7, -1.5]), scale_tril=_t([[1.2, 0.0], [0.6, 0.5]])),
    )
    x = _t([[0.3, -0.9, 2.0], [5.0, 1.0, -4.0], [0.0, 0.0, 0.0]])
    q = MultivariateNormal(
        _t([[0.1, 0.2], [3.0, -2.0], [-1.0, 0.5]]),
        scale_tril=_t(
            [[[1.0, 0.0], [0.3, 0.8]], [[0.1, 0.0], [-0.2, 0.05]], [[4.0, 0.0], [1.0, 2.0]]]
        ),
    )
    z = _t([[0.0, 1.0], [2.0, -3.0], [-0.5, 0.25]])
    batched = magnitude(model, x, q, z=z)
    assert batched.shape == (3,)
    for i in range(3):
        qi = MultivariateNormal(q.loc[i], scale_tril=q.scale_tril[i])
        alone = magnitude(model, x[i], qi, z=z[i])
        assert alone.shape == ()
        # The same terms, summed in the same order; batched and single matrix products may round
        # differently, by a few ulps of M's largest term (≤ M): 1e-13 relative is ample.
        assert abs(batched[i].item() - alone.item()) <= 1e-13 * alone.item(), i
