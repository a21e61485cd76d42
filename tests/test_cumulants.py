"""toyvae.estimators.log_weight_cumulants: the exact κ₂ and κ₄ of log w under q."""

import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import LinearGaussian
from toyvae.estimators import log_weight_cumulants, log_weights_at
from toyvae.report._monte_carlo import log_weight_rounding
from toyvae.report.checks import random_gaussians
from toyvae.stats import gauss_hermite_noise
from toyvae.tolerances import EPS, posterior_condition


def _model():
    rng = seeds.rng(4)
    model = LinearGaussian(rng.normal(size=(6, 2)), rng.normal(size=6), rng.uniform(0.5, 2, 6))
    return model, torch.as_tensor(rng.normal(size=(3, 6)))


def test_fourth_cumulant_of_log_weights_matches_quadrature():
    """κ₂, κ₄ of log w from the cumulant formula equal μ₂, μ₄ − 3μ₂² by Gauss–Hermite quadrature."""
    model, x = _model()
    # The far-away q: large A = ½(I − BᵀB) and b = −Bᵀc, so both kinds of term matter.
    q = random_gaussians(model, x, seeds.generator(0))[2]
    # log w is quadratic in ε, so (log w − m)⁴ has degree 8 ≤ 2·5 − 1: order 5 is exact.
    nodes, weights = gauss_hermite_noise(2, 5)
    eps = nodes[:, None, :].expand(-1, 3, 2)
    ell = log_weights_at(model, x, q, eps)
    w = weights[:, None]
    d = ell - (w * ell).sum(0)
    mu2, mu4 = (w * d**2).sum(0), (w * d**4).sum(0)
    kappa2, kappa4 = log_weight_cumulants(model, x, q)
    # Quadrature side: each log w errs by at most its rounding bound r (4(D+K)·eps·M), the
    # mean by max r, so every deviation d by δ = 2 max r; then μ₂ errs by Σω·2|d|δ and μ₄ by
    # Σω·4|d|³δ, each plus a 25-term summation error 25·eps·μ (Higham).
    delta = 2 * log_weight_rounding(model, x, q, eps).amax(0)
    err2 = (w * 2 * d.abs()).sum(0) * delta + 25 * EPS * mu2
    err4 = (w * 4 * d.abs() ** 3).sum(0) * delta + 25 * EPS * mu4 + 6 * mu2 * err2
    # Formula side: every term of κ₂ and κ₄ is non-negative (tr A², ‖b‖², tr A⁴, bᵀA²b), so
    # no cancellation; B and c come from triangular solves against S, relative error
    # K·κ(Λ)·eps each, at most 4 such factors in a term: 16·K·κ(Λ)·eps relative.
    relative = 16 * 2 * posterior_condition(model) ** 2 * EPS
    assert ((kappa2 - mu2).abs() <= err2 + relative * kappa2).all()
    assert ((kappa4 - (mu4 - 3 * mu2**2)).abs() <= err4 + relative * kappa4).all()


def test_second_cumulant_is_the_variance_of_log_weight_moments():
    """κ₂ is Var log w: the same quantity as log_weight_moments' variance, to rounding."""
    model, x = _model()
    for q in random_gaussians(model, x, seeds.generator(1)):
        kappa2, _ = log_weight_cumulants(model, x, q)
        variance = toyvae.log_weight_moments(model, x, q).variance
        assert torch.allclose(kappa2, variance, rtol=64 * EPS, atol=0)


def test_cumulants_vanish_at_the_posterior_and_have_the_batch_shape():
    """At q = p(z|x), log w = log p(x) for every z: κ₂ = κ₄ = 0; shapes are x's batch shape."""
    model, x = _model()
    post = model.exact(x).posterior
    q = MultivariateNormal(post.loc, scale_tril=post.scale_tril)
    kappa2, kappa4 = log_weight_cumulants(model, x, q)
    assert kappa2.shape == kappa4.shape == (3,)
    assert (kappa2 <= 64 * EPS).all() and (kappa4 <= 64 * EPS).all()
    # One q for a (2, 3) batch of data, and one x and one q with no batch at all.
    near = random_gaussians(model, x[:1], seeds.generator(2))[0]
    assert log_weight_cumulants(model, x.expand(2, 3, 6), near)[0].shape == (2, 3)
    single = MultivariateNormal(post.loc[0], scale_tril=post.scale_tril.expand(3, 2, 2)[0])
    assert log_weight_cumulants(model, x[0], single)[1].shape == ()


def test_cumulants_validate_their_arguments():
    """A q of the wrong event size is a ValueError that names q."""
    model, x = _model()
    with pytest.raises(ValueError, match="q must have event shape"):
        log_weight_cumulants(model, x, MultivariateNormal(torch.zeros(3), torch.eye(3)))
