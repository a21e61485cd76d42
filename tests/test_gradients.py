"""ELBO gradient estimators against autograd on the closed-form ELBO.

Each single-sample estimator is a polynomial of degree ≤ 4 in ε, so Gauss–Hermite quadrature
of order 5 gives its exact mean and variance: unbiasedness is checked exactly, and the Monte
Carlo check uses a median-of-means radius from the exact variance (false alarm ≤ 1e-6).
"""

from __future__ import annotations

import itertools

import pytest
import seeds
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import toyvae
from toyvae.estimators import log_weights_at
from toyvae.gradients import (
    CLOSED_FORM_ESTIMATORS,
    ESTIMATORS,
    closed_form_gradient_moments,
    elbo_surrogate,
    elbo_surrogate_at,
    gradient_draws,
    gradient_estimator_moments,
)
from toyvae.stats import gauss_hermite_noise, median_of_means_plan
from toyvae.tolerances import EPS

DT = torch.float64
FALSE_ALARM = 1e-6


def _generator(seed: int) -> torch.Generator:
    return seeds.generator(seed)


class _Case:
    """A model with trainable W, b and a q with trainable mean and log-scale (or Cholesky)."""

    def __init__(self, d: int, k: int, seed: int, *, noise="diagonal", full_q=False):
        g = _generator(seed)
        self.weight = torch.randn(d, k, generator=g, dtype=DT).requires_grad_()
        self.bias = torch.randn(d, generator=g, dtype=DT).requires_grad_()
        psi = 0.3 + torch.rand(d, generator=g, dtype=DT) if noise == "diagonal" else 0.6
        self.model = toyvae.LinearGaussian(self.weight, self.bias, psi)
        self.x, _ = self.model.sample((), generator=g)
        self.x = self.x.detach()
        post = self.model.posterior(self.x)
        self.loc = (post.loc + 0.3 * torch.randn(k, generator=g, dtype=DT)).detach()
        self.loc.requires_grad_()
        self.full_q = full_q
        if full_q:
            tril = post.scale_tril * 1.2 + 0.1 * torch.tril(torch.ones(k, k, dtype=DT), -1)
            self.tril = tril.detach().requires_grad_()
            self.q_params = (self.loc, self.tril)
        else:
            sd = post.covariance_matrix.diagonal().sqrt()
            self.log_scale = (sd.log() + 0.2 * torch.randn(k, generator=g, dtype=DT)).detach()
            self.log_scale.requires_grad_()
            self.q_params = (self.loc, self.log_scale)
        self.params = (*self.q_params, self.weight, self.bias)

    def q(self):
        if self.full_q:
            # torch.tril: the upper triangle is not a parameter of q (else its gradient would
            # depend on whether an implementation reads it).
            return MultivariateNormal(self.loc, scale_tril=torch.tril(self.tril))
        return Independent(Normal(self.loc, self.log_scale.exp()), 1)

    def exact_gradient(self):
        return torch.autograd.grad(toyvae.elbo(self.model, self.x, self.q()), self.params)


CASES = [
    pytest.param({"d": 5, "k": 2, "seed": 1}, id="diagonal-q"),
    pytest.param({"d": 4, "k": 3, "seed": 2, "noise": "isotropic", "full_q": True}, id="full-q"),
]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("spec", CASES)
def test_every_estimator_is_exactly_unbiased(spec, estimator):
    """E[ĝ] by exact Gauss–Hermite quadrature equals ∇ELBO from autograd on the closed form."""
    case = _Case(**spec)
    exact = case.exact_gradient()
    moments = gradient_estimator_moments(
        case.model, case.x, case.q(), case.params, estimator=estimator
    )
    d, k = case.weight.shape
    for mean, variance, want in zip(moments.mean, moments.variance, exact, strict=True):
        # A quadrature sum of 5^K draws, each a sum of D + K terms: rounding of
        # 4 (D + K) eps times the size of a draw, E|ĝ| ≤ |E ĝ| + sd(ĝ), times 5^K nodes.
        scale = want.abs() + variance.sqrt()
        tol = 4 * (d + k) * 5**k * EPS * scale
        assert torch.all((mean - want).abs() <= tol)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_sample_average_is_exactly_unbiased(estimator):
    """E ∇[½(ĝ(ε₁) + ĝ(ε₂))] over independent pairs, by exact quadrature, equals ∇ELBO."""
    # The test above evaluates all nodes in one call, so a baseline shared by the call (say
    # the batch mean of log w) is one constant c there, and c·Σω∇log q = 0 hides it. Here each
    # call holds one pair only, as a 2-sample estimate does: a baseline built from the pair
    # itself couples ε₁ and ε₂ and biases the score term by a factor 1 − 1/2.
    case = _Case(3, 1, seed=11)
    exact = case.exact_gradient()
    nodes, weights = gauss_hermite_noise(1, 5)
    means = [torch.zeros_like(p) for p in case.params]
    sizes = [torch.zeros_like(p) for p in case.params]
    for i, j in itertools.product(range(5), repeat=2):
        pair = torch.stack([nodes[i], nodes[j]])  # (2, K): two samples
        surrogate = elbo_surrogate_at(case.model, case.x, case.q(), pair, estimator=estimator)
        grads = torch.autograd.grad(surrogate.mean(0), case.params)
        for mean, size, g in zip(means, sizes, grads, strict=True):
            mean += weights[i] * weights[j] * g
            size += weights[i] * weights[j] * g.abs()
    d, k = case.weight.shape
    for mean, size, want in zip(means, sizes, exact, strict=True):
        # The pair average has degree ≤ 4 in each of ε₁, ε₂, so order 5 per coordinate is
        # exact. Rounding: each draw errs by 4(D + K)·eps of its size, and the 25-term
        # quadrature sum by 25·eps of Σω|g| (Higham), against the exact gradient's own
        # 4(D + K)·eps·|∇ELBO|.
        tol = (4 * (d + k) + 25) * EPS * size + 4 * (d + k) * EPS * want.abs()
        assert torch.all((mean - want).abs() <= tol)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("spec", CASES)
def test_exact_moments_agree_with_an_independent_order_6_quadrature(spec, estimator):
    """gradient_estimator_moments equals Σω ĝ and Σω (ĝ − mean)² over order-6 nodes."""
    case = _Case(**spec)
    moments = gradient_estimator_moments(
        case.model, case.x, case.q(), case.params, estimator=estimator
    )
    d, k = case.weight.shape
    nodes, weights = gauss_hermite_noise(k, 6)
    surrogate = elbo_surrogate_at(case.model, case.x, case.q(), nodes, estimator=estimator)
    draws = gradient_draws(surrogate, case.params)
    for mean, variance, draw in zip(moments.mean, moments.variance, draws, strict=True):
        w = weights.reshape(-1, *([1] * (draw.ndim - 1)))
        mean6 = (w * draw).sum(0)
        variance6 = (w * (draw - mean6).square()).sum(0)
        # Draws have degree ≤ 4 in ε, squared ≤ 8: orders 5 and 6 (exact to degree 9 and 11)
        # both give the exact moments; order 4 (degree 7) misses the ε⁸ terms of the variance.
        # Rounding: each draw errs by u = 4(D + K)·eps of its size, so each (ĝ − mean)² by
        # 4u(|ĝ| + |mean|)²; each quadrature sum by its node count (5^K, 6^K)·eps (Higham).
        # Both sides, bounded with S = Σω(|ĝ| + |mean|)² (order 6; ×2 for order 5's S).
        size = (w * (draw.abs() + mean6.abs()).square()).sum(0)
        factor = (2 * 4 * 4 * (d + k) + 2 * 6**k) * EPS
        assert torch.all((variance - variance6).abs() <= factor * size)
        assert torch.all((mean - mean6).abs() <= factor * size.sqrt())


def test_estimators_differ_only_in_variance_and_share_the_model_gradient():
    """Same mean; θ-gradient draws coincide; score function ≫ total ≥ path derivative here."""
    case = _Case(5, 2, seed=3)
    moments = {
        name: gradient_estimator_moments(case.model, case.x, case.q(), case.params, estimator=name)
        for name in ESTIMATORS
    }
    total, path, score = (moments[name].variance for name in ESTIMATORS)
    # W and b: ∇_θ log p(x, z) at the same z for all three, so identical variances (rounding).
    for a, b, c in zip(total[2:], path[2:], score[2:], strict=True):
        tol = 64 * EPS * a.abs().max()
        assert torch.all((a - b).abs() <= tol) and torch.all((a - c).abs() <= tol)
    # q's mean: the score-function estimator is far noisier than either path estimator.
    assert torch.all(score[0] > 2 * total[0]) and torch.all(score[0] > 2 * path[0])


def test_path_derivative_is_exactly_zero_at_the_posterior_and_total_is_not():
    """At q = p(z|x) every path-derivative draw is 0 (to rounding); total-gradient draws are not."""
    case = _Case(6, 3, seed=4, full_q=True)
    post = case.model.posterior(case.x)
    loc = post.loc.detach().requires_grad_()
    tril = post.scale_tril.detach().requires_grad_()
    q = MultivariateNormal(loc, scale_tril=tril)
    draws = gradient_draws(
        elbo_surrogate(
            case.model, case.x, q, 32, estimator="path_derivative", generator=_generator(5)
        ),
        (loc, tril),
    )
    # Each draw is Λ(z − μ) − Σ_q⁻¹(z − m), two equal O(‖Λ‖ ‖z − μ‖) vectors; rounding of a few
    # eps times their size. ‖Λ‖ = 1 + ‖G‖ ≤ 1 + ‖W‖²/min ψ, and ‖ε‖ ≤ 6 √K covers 32 draws.
    lam = 1 + torch.linalg.matrix_norm(case.weight.detach(), 2) ** 2 / 0.3
    tol = 64 * 3 * EPS * lam * 6 * 3**0.5 * lam
    for d in draws:
        assert torch.all(d.abs() <= tol)
    total = gradient_draws(
        elbo_surrogate(case.model, case.x, q, 32, generator=_generator(5)), (loc, tril)
    )
    assert torch.all(total[0].abs().amax(-1) > 1e-3)


def test_surrogate_values_are_the_log_weights():
    """Every surrogate's value is log w at the same noise (only its gradient differs)."""
    case = _Case(5, 2, seed=6)
    noise = torch.randn(7, 2, generator=_generator(7), dtype=DT)
    lw = log_weights_at(case.model, case.x, case.q(), noise)
    for name in ESTIMATORS:
        value = elbo_surrogate_at(case.model, case.x, case.q(), noise, estimator=name)
        # Different summation orders of the same D + K terms (Higham n·eps·M).
        assert torch.all((value - lw).abs() <= 4 * 7 * EPS * (lw.abs() + 10))


@pytest.mark.parametrize("estimator", ESTIMATORS)
# false alarm: 19 coordinates (m, log s: 2 each; W: 10; b: 5) × a median-of-means radius at 1e-6
@pytest.mark.false_alarm(1.9e-5)
def test_monte_carlo_gradient_means_are_within_exact_variance_bounds(estimator):
    """The mean of 20000 draws lies within a median-of-means radius (exact variance) of ∇ELBO."""
    case = _Case(5, 2, seed=8)
    exact = case.exact_gradient()
    variance = gradient_estimator_moments(
        case.model, case.x, case.q(), case.params, estimator=estimator
    ).variance
    n = 20_000
    groups, factor = median_of_means_plan(n, FALSE_ALARM)
    surrogate = elbo_surrogate(
        case.model, case.x, case.q(), n, estimator=estimator, generator=_generator(9)
    )
    size = n // groups
    group_means = gradient_draws(
        surrogate[: groups * size].reshape(groups, size).mean(1), case.params
    )
    for draws, var, want in zip(group_means, variance, exact, strict=True):
        median = draws.median(0).values
        # Median of group means: |error| ≤ factor·σ except with probability ≤ 1e-6.
        assert torch.all((median - want).abs() <= factor * var.sqrt())


def test_bad_estimator_name_raises():
    """An unknown estimator name raises ValueError listing the valid ones."""
    case = _Case(3, 2, seed=10)
    with pytest.raises(ValueError, match="path_derivative"):
        elbo_surrogate(case.model, case.x, case.q(), 2, estimator="stl")


def _batched_q(model, x, seed: int):
    """One full-covariance q per data point, parameterised as the report does: (m, tril(raw))."""
    g = _generator(seed)
    post = model.posterior(x)
    shape = post.loc.shape
    k = shape[-1]
    loc = (post.loc + 0.3 * torch.randn(shape, generator=g, dtype=DT)).detach()
    # Off-diagonal noise on both triangles: the upper one is junk that torch.tril drops.
    noise = 0.1 * torch.randn(*shape[:-1], k, k, generator=g, dtype=DT)
    noise = noise - torch.diag_embed(noise.diagonal(dim1=-2, dim2=-1))
    raw = (1.2 * post.scale_tril + noise).detach()
    loc.requires_grad_()
    raw.requires_grad_()
    return loc, raw, MultivariateNormal(loc, scale_tril=torch.tril(raw))


def _posterior_condition(model, x) -> float:
    """κ(S) of the posterior's Cholesky factor: the closed form solves against S (and B)."""
    return float(torch.linalg.cond(model.posterior(x).scale_tril.detach()).max())


@pytest.mark.parametrize("estimator", CLOSED_FORM_ESTIMATORS)
@pytest.mark.parametrize(("d", "k", "noise"), [(5, 2, "diagonal"), (4, 3, "isotropic")])
def test_closed_form_moments_equal_the_quadrature_moments(d, k, noise, estimator):
    """closed_form_gradient_moments equals order-5 quadrature of the draws in (m, L), per point."""
    case = _Case(d, k, seed=20 + k, noise=noise)
    model = case.model
    x, _ = model.sample((2,), generator=_generator(21))  # two points, each with its own q
    x = x.detach()
    loc, raw, q = _batched_q(model, x, seed=22)
    closed = closed_form_gradient_moments(model, x, q, estimator=estimator)
    quadrature = gradient_estimator_moments(model, x, q, (loc, raw), estimator=estimator)
    nodes, weights = gauss_hermite_noise(k, 5)
    draws = gradient_draws(
        elbo_surrogate_at(model, x, q, nodes.unsqueeze(1).expand(-1, 2, k), estimator=estimator),
        (loc, raw),
    )
    u = 4 * (d + k) * EPS
    kappa = _posterior_condition(model, x)
    for mean, variance, qmean, qvariance, draw in zip(
        closed.mean, closed.variance, quadrature.mean, quadrature.variance, draws, strict=True
    ):
        w = weights.reshape(-1, *([1] * (draw.ndim - 1)))
        size = (w * (draw.abs() + qmean.abs()).square()).sum(0)
        # Quadrature side, as in the order-6 test above: each draw errs by u = 4(D + K)·eps of
        # its size, (ĝ − mean)² by 4u(|ĝ| + |mean|)², each sum by 5^K·eps (Higham). Closed
        # form: sums of K products after triangular solves against S, B, so u amplified by
        # κ(S) (B = S⁻¹L is as well conditioned as S here, L ≈ 1.2 S), on the same S.
        factor = (4 * 4 * u + 5**k * EPS) + 2 * kappa * u
        assert torch.all((variance - qvariance).abs() <= factor * size)
        assert torch.all((mean - qmean).abs() <= factor * size.sqrt())
    # The quadrature moments of the upper triangle are 0 (not parameters); so are the closed form's.
    assert torch.all(torch.triu(closed.variance[1], 1) == 0)


def _quadratic_coefficients(values, k: int):
    """a, b, C of a polynomial a + bᵀε + εᵀCε of degree ≤ 2 from its values at 0, ±eᵢ, eᵢ + eⱼ.

    ``values`` are ordered as :func:`_interpolation_nodes` orders the nodes; unit steps make
    central differences exact for a quadratic: bᵢ = (g(eᵢ) − g(−eᵢ))/2,
    Cᵢᵢ = (g(eᵢ) + g(−eᵢ))/2 − g(0), Cᵢⱼ = Cⱼᵢ = (g(eᵢ + eⱼ) − g(eᵢ) − g(eⱼ) + g(0))/2.
    """
    a = values[0]
    plus, minus = values[1 : 1 + k], values[1 + k : 1 + 2 * k]
    b = (plus - minus) / 2
    c = torch.zeros(k, k, *a.shape, dtype=a.dtype)
    for i in range(k):
        c[i, i] = (plus[i] + minus[i]) / 2 - a
    for n, (i, j) in enumerate(itertools.combinations(range(k), 2)):
        c[i, j] = c[j, i] = (values[1 + 2 * k + n] - plus[i] - plus[j] + a) / 2
    return a, b, c


def _interpolation_nodes(k: int) -> torch.Tensor:
    eye = torch.eye(k, dtype=DT)
    pairs = [eye[i] + eye[j] for i, j in itertools.combinations(range(k), 2)]
    return torch.stack([torch.zeros(k, dtype=DT), *eye, *(-eye), *pairs])


@pytest.mark.parametrize("estimator", CLOSED_FORM_ESTIMATORS)
def test_closed_form_moments_beyond_quadrature_match_the_draws_as_quadratics(estimator):
    """At K = 8 (5^K = 390625 nodes) the draws are exact quadratics a + bᵀε + εᵀCε in ε, whose
    mean a + tr C and variance ‖b‖² + 2‖C‖²_F are the closed form's."""
    d, k = 10, 8
    case = _Case(d, k, seed=30)
    model, x = case.model, case.x.unsqueeze(0)
    loc, raw, q = _batched_q(model, x, seed=31)
    nodes = _interpolation_nodes(k)
    extra = torch.randn(4, k, generator=_generator(32), dtype=DT)
    every = torch.cat([nodes, extra]).unsqueeze(1)  # (nodes, 1 point, K)
    draws = gradient_draws(elbo_surrogate_at(model, x, q, every, estimator=estimator), (loc, raw))
    closed = closed_form_gradient_moments(model, x, q, estimator=estimator)
    u = _posterior_condition(model, x) * 4 * (d + k) * EPS
    for draw, mean, variance in zip(draws, closed.mean, closed.variance, strict=True):
        a, b, c = _quadratic_coefficients(draw[: len(nodes)], k)
        # Each draw errs by u = κ(S)·4(D + K)·eps of G, the largest |draw|; a, b, C entries
        # combine ≤ 4 draws with weights ≤ 1, so δ = 2uG each.
        delta = 2 * u * draw.abs().amax(0)
        # Degree ≤ 2: the quadratic through the nodes reproduces the draws at random ε
        # (|ε|² ≲ 30 multiplies δ at most by 1 + √K·6 + K·36 ≤ 330).
        for e, g in zip(extra, draw[len(nodes) :], strict=True):
            fitted = a + torch.einsum("i,i...->...", e, b) + torch.einsum("i,j,ij...->...", e, e, c)
            assert torch.all((fitted - g).abs() <= 330 * delta + u * g.abs())
        trace = torch.einsum("ii...->...", c)
        b2 = b.square().sum(0)
        c2 = c.square().sum((0, 1))
        # Mean: a + tr C sums K + 1 coefficients; variance: a perturbation δ of each of the
        # K + K² coefficients moves ‖b‖² + 2‖C‖² by ≤ 2δ(Σ|b| + 2Σ|C|) + (K + 2K²)δ²; the
        # closed form's own rounding u of each side's size.
        mean_tol = (k + 1) * delta + u * (mean.abs() + variance.sqrt())
        variance_tol = 2 * delta * (b.abs().sum(0) + 2 * c.abs().sum((0, 1)))
        variance_tol = variance_tol + (k + 2 * k**2) * delta**2 + u * variance
        assert torch.all((a + trace - mean[0]).abs() <= mean_tol[0])
        assert torch.all((b2 + 2 * c2 - variance[0]).abs() <= variance_tol[0])


def test_closed_form_path_derivative_variance_vanishes_at_the_posterior():
    """At q = p(z|x) the closed-form path-derivative variance is 0 to rounding; total's is not."""
    case = _Case(6, 5, seed=40, full_q=True)
    post = case.model.posterior(case.x)
    q = MultivariateNormal(post.loc.detach(), scale_tril=post.scale_tril.detach())
    path = closed_form_gradient_moments(case.model, case.x, q, estimator="path_derivative")
    total = closed_form_gradient_moments(case.model, case.x, q)
    for variance in path.variance:
        # E = B − I and c come from the difference of equal factors: exactly 0 here.
        assert torch.all(variance == 0)
    # Total gradient: Var ĝ_m = Σₖ (ΛL)ᵢₖ² = ‖S⁻ᵀ row‖² ≥ 1/λmax(Σ_post) ≥ 1 (Λ ⪰ I).
    assert torch.all(total.variance[0] >= 1 - 1e-12)


def test_closed_form_moments_refuse_the_score_function():
    """The score function (degree 4 in ε) has no closed form here: ValueError naming the way."""
    case = _Case(3, 2, seed=41)
    with pytest.raises(ValueError, match="gradient_estimator_moments"):
        closed_form_gradient_moments(case.model, case.x, case.q(), estimator="score_function")
    with pytest.raises(ValueError, match="path_derivative"):
        closed_form_gradient_moments(case.model, case.x, case.q(), estimator="stl")
