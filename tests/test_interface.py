"""The model interface: a family written from scratch gets every algorithm without new code.

``DenseFamily`` below is a third linear-Gaussian family written only against
``toyvae.ConjugateModel``, by dense textbook formulas (the marginal covariance and Gaussian
conditioning): no whitening, no Woodbury. The bounds, the estimators, the exact statistics, the
gradient moments and the tolerances must accept it unchanged and agree with
``LinearGaussian`` on the same parameters.
"""

import math

import pytest
import seeds
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import toyvae
from toyvae.gaussians import LOG_2PI, Gaussian
from toyvae.interface import batch_shape
from toyvae.tolerances import identity_tolerance, posterior_condition

F64 = torch.float64


class DenseFamily:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, Ψ) by dense formulas: a stand-in for a new family."""

    def __init__(self, weight, bias, psi):
        self.weight, self.bias, self.psi = weight, bias, psi

    latent_dim = property(lambda self: self.weight.shape[1])
    data_event_shape = property(lambda self: torch.Size(self.weight.shape[:1]))
    term_count = property(lambda self: sum(self.weight.shape))
    dtype = property(lambda self: self.weight.dtype)
    device = property(lambda self: self.weight.device)

    def check_data(self, x, name="x"):
        return torch.as_tensor(x, dtype=self.dtype)

    def prior(self):
        k = self.latent_dim
        return MultivariateNormal(torch.zeros(k, dtype=F64), scale_tril=torch.eye(k, dtype=F64))

    def exact(self, x):
        w, b, psi = self.weight, self.bias, self.psi
        cov = w @ w.T + psi
        log_evidence = MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
        gain = torch.linalg.solve(cov, w).T  # Wᵀ C⁻¹
        post_cov = torch.eye(self.latent_dim, dtype=F64) - gain @ w
        post_cov = 0.5 * (post_cov + post_cov.T)
        loc = (x - b) @ gain.T
        tril = torch.linalg.cholesky(post_cov).expand(*loc.shape, self.latent_dim)
        return toyvae.Exact(log_evidence, Gaussian(loc, tril))

    def expected_log_likelihood(self, x, q):
        inv = torch.linalg.inv(self.psi)
        r = x - self.bias - q.loc @ self.weight.T
        trace = ((self.weight.T @ inv @ self.weight) * q.covariance()).sum((-2, -1))
        d = self.weight.shape[0]
        return -0.5 * (d * LOG_2PI + torch.logdet(self.psi) + ((r @ inv) * r).sum(-1) + trace)

    def log_joint(self, x, z):
        likelihood = MultivariateNormal(z @ self.weight.T + self.bias, covariance_matrix=self.psi)
        return likelihood.log_prob(x) + self.prior().log_prob(z)

    def magnitude(self, x, q=None, *, z=None):
        return toyvae.LinearGaussian(self.weight, self.bias, self.psi).magnitude(x, q, z=z)


def _pair(seed=0, d=5, k=3):
    gen = seeds.generator(seed)
    w = torch.randn(d, k, generator=gen, dtype=F64)
    b = torch.randn(d, generator=gen, dtype=F64)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    psi = 0.3 * (a @ a.T) / d + 0.5 * torch.eye(d, dtype=F64)
    x = torch.randn(4, d, generator=gen, dtype=F64)
    q = MultivariateNormal(
        torch.randn(4, k, generator=gen, dtype=F64),
        scale_tril=torch.tril(0.3 * torch.randn(4, k, k, generator=gen, dtype=F64), -1)
        + torch.diag_embed(0.5 + torch.rand(4, k, generator=gen, dtype=F64)),
    )
    return DenseFamily(w, b, psi), toyvae.LinearGaussian(w, b, psi), x, q


def test_both_families_implement_the_protocol():
    """isinstance(model, toyvae.ConjugateModel) for LinearGaussian and a hand-written family."""
    dense, lg, x, _ = _pair()
    assert isinstance(dense, toyvae.ConjugateModel) and isinstance(lg, toyvae.ConjugateModel)
    assert not isinstance(object(), toyvae.ConjugateModel)
    assert batch_shape(dense, x) == (4,)


def test_bounds_accept_any_family_and_agree():
    """elbo, kl_to_posterior and the identity hold for the new family and match LinearGaussian."""
    dense, lg, x, q = _pair()
    tol = posterior_condition(lg) * identity_tolerance(lg, x, q)
    for f in (toyvae.elbo, toyvae.kl_to_posterior, toyvae.expected_log_likelihood):
        # The dense family solves with C = WWᵀ + Ψ (κ(C) ≈ 30 here): its rounding is within the
        # same eps·M unit times κ(C); 100 covers it. A wrong formula differs by O(1).
        assert ((f(dense, x, q) - f(lg, x, q)).abs() <= 100 * tol).all()
    gap = dense.exact(x).log_evidence - toyvae.elbo(dense, x, q)
    assert ((gap - toyvae.kl_to_posterior(dense, x, q)).abs() <= 100 * tol).all()


def test_estimators_and_statistics_need_no_change():
    """Log weights (both paths), IWAE, moments, χ² and gradient moments run on the new family."""
    dense, lg, x, q = _pair()
    noise = torch.randn(6, 4, 3, generator=seeds.generator(3), dtype=F64)
    tol = 100 * posterior_condition(lg) * identity_tolerance(lg, x, q)
    for method in ("structured", "plain"):
        a = toyvae.log_weights_at(dense, x, q, noise, method=method)
        b = toyvae.log_weights_at(lg, x, q, noise, method=method)
        assert ((a - b).abs() <= tol).all()
    md, ml = toyvae.log_weight_moments(dense, x, q), toyvae.log_weight_moments(lg, x, q)
    assert ((md.mean - ml.mean).abs() <= tol).all()
    assert torch.allclose(md.variance, ml.variance, rtol=1e-9, atol=0)
    chi_d, chi_l = toyvae.chi_square_divergence(dense, x, q), toyvae.chi_square_divergence(lg, x, q)
    assert torch.equal(torch.isinf(chi_d), torch.isinf(chi_l))
    finite = torch.isfinite(chi_l)
    assert torch.allclose(chi_d[finite], chi_l[finite], rtol=1e-8, atol=0)
    gen = seeds.generator(4)
    assert toyvae.iwae_estimates(dense, x, q, 4, 3, generator=gen).shape == (3, 4)


def test_gradient_moments_need_no_change():
    """Exact gradient-estimator moments with respect to q's mean agree across the two families."""
    dense, lg, x, _ = _pair(k=2)
    loc = torch.zeros(4, 2, dtype=F64, requires_grad=True)
    q = Independent(Normal(loc, torch.ones(4, 2, dtype=F64)), 1)
    for estimator in toyvae.ESTIMATORS:
        a = toyvae.gradient_estimator_moments(dense, x, q, [loc], estimator=estimator)
        b = toyvae.gradient_estimator_moments(lg, x, q, [loc], estimator=estimator)
        # Both are sums over the same 25 quadrature nodes of values equal to ~1e-13: relative
        # agreement to 1e-8 is rounding; a different estimator differs by O(1).
        assert torch.allclose(a.mean[0], b.mean[0], rtol=1e-8, atol=1e-10)
        assert torch.allclose(a.variance[0], b.variance[0], rtol=1e-8, atol=1e-10)


def test_objects_that_are_not_models_are_rejected_with_the_protocol_name():
    """A non-model gets a TypeError that names toyvae.ConjugateModel and the type it got."""
    _, lg, x, q = _pair()
    with pytest.raises(TypeError, match=r"ConjugateModel.*got dict"):
        toyvae.elbo({}, x, q)
    assert math.isfinite(posterior_condition(lg))
