"""Contracts of toyvae.gradients that a user relies on, against independent NumPy references.

- ``gradient_draws``: one row per surrogate row, zeros for an input the surrogate does not use,
  and a 0-d surrogate refused with a message naming it.
- Defaults: ``elbo_surrogate_at`` and ``gradient_estimator_moments`` use the
  reparameterisation estimator when none is named.
- Values: every estimator's surrogate equals the log weight log p(x, z) − log q(z) per batch
  element, also when each element has its own q.
- Shapes and batches: ``closed_form_gradient_moments`` of one point has shapes (K,) and (K, K);
  ``gradient_estimator_moments`` broadcasts x's batch with q's (common noise), with the exact
  moments of the mean's gradient from Λ = Σ⁻¹: ĝ_m = −Λ(z − μ) for the reparameterisation
  estimator, so E ĝ_m = −Λ(m − μ) and Var ĝ_m,i = Σ_k (ΛL)²_ik.
- dtypes: float32 q and model give float32 quadrature moments.

Every check is deterministic; the exact references are NumPy/SciPy (toyvae.reference).
"""

from __future__ import annotations

import numpy as np
import pytest
import seeds
import torch
from scipy.stats import multivariate_normal
from test_estimator_contracts import DT, D, K, _parameters
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference
from toyvae.gradients import (
    ESTIMATORS,
    closed_form_gradient_moments,
    elbo_surrogate_at,
    gradient_draws,
    gradient_estimator_moments,
)

# Tolerance for float64 values of O(1)–O(30) quantities (log weights, Λ(m − μ), (ΛL)²) from
# K = 2 computations with condition number < 20, compared with NumPy's: each side's rounding
# is ≲ 1e2·κ·eps·size ≈ 1e-12; 1e-10 is a wide margin, and every mutation checked here moves
# the values by O(1) or raises.
ATOL = 1e-10


def _numpy(*tensors):
    return tuple(t.detach().numpy() for t in tensors)


def _precision_and_mean(weight, bias, noise, x):
    """Λ = Σ⁻¹ and μ of p(z|x), from NumPy."""
    mean, cov = reference.posterior(*_numpy(weight, bias, noise, x))
    return np.linalg.inv(cov), mean


def _q_factor():
    return torch.tensor([[1.2, 0.0], [0.3, 0.8]], dtype=DT)


# -- gradient_draws -------------------------------------------------------------------------


def test_gradient_draws_refuses_a_0d_surrogate_by_name():
    a = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"^surrogate must have a leading axis of rows, got a 0-d tensor$"
    ):
        gradient_draws(a.sum(), (a,))


def test_gradient_draws_rows_and_zeros_for_an_unused_input():
    """Row s is ∇ surrogate[s].sum(): for surrogate[s] = Σⱼ tₛⱼ aⱼ summed over a trailing axis
    of 2, that is 2·tₛ (exact in floating point); an input the surrogate does not depend on
    gets zeros of its shape, not an error."""
    a = torch.tensor([0.5, -1.5], dtype=DT, requires_grad=True)
    unused = torch.ones(3, 4, dtype=DT, requires_grad=True)
    t = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.25, 8.0]], dtype=DT)
    surrogate = (t * a).unsqueeze(-1).expand(3, 2, 2).sum(-2)  # (3 rows, 2): each entry t·a
    grads, zeros = gradient_draws(surrogate, (a, unused))
    assert torch.equal(grads, 2 * t)
    assert zeros.shape == (3, 3, 4)
    assert torch.equal(zeros, torch.zeros(3, 3, 4, dtype=DT))


# -- defaults and values ----------------------------------------------------------------------


def test_elbo_surrogate_at_defaults_to_the_reparameterization_estimator():
    """Without ``estimator``: the reparameterisation surrogate, whose value is the log weight
    (checked against NumPy/SciPy) and whose gradient in q's mean is ∇_m log w(m + Lε) =
    −Λ(z − μ) (log q(m + Lε) = −½‖ε‖² − log det L + const does not depend on m); the
    path-derivative and score-function draws differ from it by O(1) at these points."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    loc = (post.loc + torch.tensor([0.3, -0.2], dtype=DT)).requires_grad_(True)
    tril = post.scale_tril @ _q_factor()
    q = MultivariateNormal(loc, scale_tril=tril)
    eps = torch.randn(5, K, generator=seeds.generator(6), dtype=DT)
    surrogate = elbo_surrogate_at(model, x, q, eps)
    z = (loc + eps @ tril.mT).detach().numpy()
    want = reference.log_joint(*_numpy(weight, bias, noise, x), z) - multivariate_normal(
        *_numpy(loc, tril @ tril.mT)
    ).logpdf(z)
    np.testing.assert_allclose(surrogate.detach().numpy(), want, rtol=0, atol=ATOL)
    precision, mean = _precision_and_mean(weight, bias, noise, x)
    draws = gradient_draws(surrogate, (loc,))[0].numpy()
    np.testing.assert_allclose(draws, -(z - mean) @ precision.T, rtol=0, atol=ATOL)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_surrogate_values_are_the_log_weights_when_each_element_has_its_own_q(estimator):
    """x of shape (D,) and q with batch (3,), every q its own mean and scale: each element's
    surrogate value is its own log weight (NumPy/SciPy), whatever the estimator."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    g = seeds.generator(7)
    loc = post.loc + 0.3 * torch.randn(3, K, generator=g, dtype=DT)
    scales = torch.tensor([0.6, 1.0, 1.7], dtype=DT).reshape(3, 1, 1)
    tril = scales * (post.scale_tril @ _q_factor())
    q = MultivariateNormal(loc, scale_tril=tril)
    eps = torch.randn(4, 3, K, generator=g, dtype=DT)
    values = elbo_surrogate_at(model, x, q, eps, estimator=estimator).detach().numpy()
    assert values.shape == (4, 3)
    z = (loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)).numpy()
    joint = reference.log_joint(*_numpy(weight, bias, noise, x), z)
    for b in range(3):
        log_q = multivariate_normal(*_numpy(loc[b], tril[b] @ tril[b].mT)).logpdf(z[:, b])
        np.testing.assert_allclose(values[:, b], joint[:, b] - log_q, rtol=0, atol=ATOL)


def test_gradient_estimator_moments_defaults_to_the_reparameterization_estimator():
    """E ĝ_m = −Λ(m − μ) and Var ĝ_m,i = Σ_k (ΛL)²_ik for the default estimator (the
    path-derivative variance is Σ_k ((ΛL − L⁻ᵀ))²_ik, different here)."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    loc = (post.loc + torch.tensor([0.3, -0.2], dtype=DT)).requires_grad_(True)
    tril = post.scale_tril @ _q_factor()
    q = MultivariateNormal(loc, scale_tril=tril)
    moments = gradient_estimator_moments(model, x, q, (loc,))
    precision, mean = _precision_and_mean(weight, bias, noise, x)
    lam_l = precision @ tril.numpy()
    np.testing.assert_allclose(
        moments.mean[0].numpy(), -precision @ (loc.detach().numpy() - mean), rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(moments.variance[0].numpy(), (lam_l**2).sum(-1), rtol=0, atol=ATOL)


# -- batches and shapes -------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["reparameterization", "path_derivative"])
def test_closed_form_gradient_moments_of_one_point_have_unbatched_shapes(estimator):
    """x of shape (D,) and q without batch: means and variances of shapes (K,) and (K, K),
    with E ĝ_m = −Λ(m − μ) (the ELBO's gradient in m) from NumPy."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    q = MultivariateNormal(
        post.loc + torch.tensor([0.3, -0.2], dtype=DT),
        scale_tril=post.scale_tril @ _q_factor(),
    )
    moments = closed_form_gradient_moments(model, x, q, estimator=estimator)
    assert [t.shape for t in moments.mean] == [(K,), (K, K)]
    assert [t.shape for t in moments.variance] == [(K,), (K, K)]
    precision, mean = _precision_and_mean(weight, bias, noise, x)
    want = -precision @ (q.loc.numpy() - mean)
    np.testing.assert_allclose(moments.mean[0].numpy(), want, rtol=0, atol=ATOL)


def test_quadrature_moments_with_a_batch_of_x_and_one_shared_q():
    """x of batch (3,), one q: the draw is the gradient of Σ_b log w_b at common ε, so
    ĝ_m = −Σ_b Λ(m + Lε − μ_b): mean −Σ_b Λ(m − μ_b), variance 3²·Σ_k (ΛL)²_ik."""
    weight, bias, noise, _ = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    xs = torch.randn(3, D, generator=seeds.generator(8), dtype=DT)
    post = model.posterior(xs)
    loc = (post.loc.mean(0) + 0.1).requires_grad_(True)
    tril = post.scale_tril[0] @ _q_factor()  # Σ, so S, is x-independent
    q = MultivariateNormal(loc, scale_tril=tril)
    assert q.batch_shape == ()
    moments = gradient_estimator_moments(model, xs, q, (loc,))
    assert moments.mean[0].shape == (K,)
    precision = np.linalg.inv(post.covariance_matrix[0].numpy())  # Σ is x-independent
    means = np.stack(
        [reference.posterior(*_numpy(weight, bias, noise, x))[0] for x in xs]
    )  # (3, K)
    want_mean = -(precision @ (loc.detach().numpy() - means).T).sum(-1)
    want_var = 9 * ((precision @ tril.numpy()) ** 2).sum(-1)
    np.testing.assert_allclose(moments.mean[0].numpy(), want_mean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(moments.variance[0].numpy(), want_var, rtol=0, atol=ATOL)


def test_quadrature_moments_with_one_x_and_a_batch_of_q():
    """One x, q of batch (2,) with its own means: the gradient in loc[b] is element b's own
    draw, mean −Λ(m_b − μ), variance Σ_k (ΛL_b)²_ik, as closed_form_gradient_moments says."""
    weight, bias, noise, x = _parameters()
    model = toyvae.LinearGaussian(weight, bias, noise)
    post = model.posterior(x)
    loc = (post.loc + torch.tensor([[0.3, -0.2], [-0.5, 0.1]], dtype=DT)).requires_grad_(True)
    tril = torch.stack([post.scale_tril @ _q_factor(), 1.5 * post.scale_tril])
    q = MultivariateNormal(loc, scale_tril=tril)
    moments = gradient_estimator_moments(model, x, q, (loc,))
    assert moments.mean[0].shape == (2, K)
    precision, mean = _precision_and_mean(weight, bias, noise, x)
    want_mean = -(loc.detach().numpy() - mean) @ precision.T
    want_var = ((precision @ tril.numpy()) ** 2).sum(-1)
    np.testing.assert_allclose(moments.mean[0].numpy(), want_mean, rtol=0, atol=ATOL)
    np.testing.assert_allclose(moments.variance[0].numpy(), want_var, rtol=0, atol=ATOL)


# -- dtypes -----------------------------------------------------------------------------------


def test_float32_quadrature_moments_are_float32():
    """float32 model and q: float32 moments, within float32 rounding of float64 on the same
    numbers (unit roundoff 6e-8; sums over 25 nodes of O(10) products with condition < 20
    stay below ~1e-4 absolute on these O(1)–O(10) entries; 1e-3 leaves a margin)."""
    weight, bias, noise, x = (t.float() for t in _parameters())
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = toyvae.LinearGaussian(weight.to(dtype), bias.to(dtype), noise.to(dtype))
        post = model.posterior(x.to(dtype))
        loc = (post.loc + 0.2).requires_grad_(True)
        q = MultivariateNormal(loc, scale_tril=post.scale_tril * 1.3)
        results[dtype] = gradient_estimator_moments(
            model, x.to(dtype), q, (loc,), estimator="path_derivative"
        )
    for got, want in zip(
        results[torch.float32].mean + results[torch.float32].variance,
        results[torch.float64].mean + results[torch.float64].variance,
        strict=True,
    ):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
