"""ELBO ascent against likelihood ascent: Fisher's identity, and toyvae.learning as the index of
the topic (each name re-exported from the module of its concept)."""

import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
import toyvae.aggregate
import toyvae.counterexample
import toyvae.encoder
import toyvae.gaps
import toyvae.learning
import toyvae.ppca
import toyvae.training
from toyvae.tolerances import EPS

F64 = torch.float64


# -- Fisher's identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_fisher_identity_elbo_gradient_is_evidence_gradient_at_the_posterior(noise):
    """With q held at p_θ(z|x), ∇_θ ELBO(θ, q) = ∇_θ log p_θ(x) for W, b and Ψ (autograd)."""
    gen = seeds.generator(3)
    d, k, n = 5, 2, 7
    weight = torch.randn(d, k, dtype=F64, generator=gen).requires_grad_()
    bias = torch.randn(d, dtype=F64, generator=gen).requires_grad_()
    shape = () if noise == "isotropic" else (d,)
    psi = (torch.rand(shape, dtype=F64, generator=gen) + 0.5).requires_grad_()
    model = toyvae.LinearGaussian(weight, bias, psi)
    x = 2 * torch.randn(n, d, dtype=F64, generator=gen)
    with torch.no_grad():
        posterior = model.posterior(x)  # q fixed: no gradient flows into it
    params = (weight, bias, psi)
    by_elbo = torch.autograd.grad(toyvae.elbo(model, x, posterior).sum(), params)
    by_evidence = torch.autograd.grad(model.log_evidence(x).sum(), params)
    # Each gradient entry sums n·(D + K) products formed through triangular solves with the
    # Cholesky factor of Λ = I + WᵀΨ⁻¹W (relative error ≤ (D + K)·eps·κ(Λ) each, Higham
    # Thm 8.5); the products are bounded by the largest gradient entry times n.
    kappa = torch.linalg.cond(torch.linalg.inv(posterior.covariance_matrix[0])).item()
    for a, b in zip(by_elbo, by_evidence, strict=True):
        scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() <= 8 * n * (d + k) * EPS * kappa * scale
    # Not vacuous: held at another q, the ELBO gradient is different by far more.
    other = MultivariateNormal(posterior.loc + 0.5, posterior.covariance_matrix)
    moved = torch.autograd.grad(toyvae.elbo(model, x, other).sum(), params)
    assert max((a - b).abs().max().item() for a, b in zip(moved, by_evidence, strict=True)) > 0.1


# -- the old names --------------------------------------------------------------------------------

HOMES = [toyvae.gaps, toyvae.counterexample, toyvae.ppca, toyvae.training]


@pytest.mark.parametrize("name", toyvae.learning.__all__)
def test_learning_re_exports_each_name_from_its_one_home(name):
    """Every name toyvae.learning exports is the object of exactly one concept module."""
    obj = getattr(toyvae.learning, name)
    homes = [m.__name__ for m in HOMES if name in m.__all__ and getattr(m, name) is obj]
    assert homes == [obj.__module__]


def test_aggregate_keeps_the_encoder_under_its_old_name():
    """toyvae.aggregate.LinearGaussianEncoder is the one encoder of toyvae.encoder."""
    from toyvae.aggregate import LinearGaussianEncoder

    assert LinearGaussianEncoder is toyvae.encoder.LinearGaussianEncoder
