"""The best mean-field q and the approximation and amortisation gaps, against hand-derived gaps."""

import math

import pytest
import seeds
import torch
from torch.distributions import Independent, Normal

import toyvae
from toyvae.encoder import LinearGaussianEncoder
from toyvae.gaps import best_mean_field, inference_gaps
from toyvae.ppca import data_with_spectrum, ppca_maximum_likelihood
from toyvae.tolerances import EPS

F64 = torch.float64


def test_best_mean_field_is_a_stationary_point_with_the_hand_derived_gap():
    """q* = N(μ, diag 1/Λ_ii) has zero ELBO gradient; its gap is ½[Σ log Λ_ii − log det Λ]."""
    gen = seeds.generator(4)
    model = toyvae.LinearGaussian(
        torch.randn(4, 3, dtype=F64, generator=gen),
        torch.randn(4, dtype=F64, generator=gen),
        torch.rand(4, dtype=F64, generator=gen) + 0.3,
    )
    x = torch.randn(6, 4, dtype=F64, generator=gen)
    best = best_mean_field(model, x)
    loc = best.base_dist.loc.clone().requires_grad_()
    log_scale = best.base_dist.scale.log().clone().requires_grad_()
    value = toyvae.elbo(model, x, Independent(Normal(loc, log_scale.exp()), 1)).sum()
    grads = torch.autograd.grad(value, (loc, log_scale))
    psi = torch.diag(model.noise_variance)
    precision = torch.eye(3, dtype=F64) + model.weight.mT @ torch.linalg.solve(psi, model.weight)
    kappa = torch.linalg.cond(precision).item()
    # ∂/∂m = −Λ(m − μ) and ∂/∂log s = 1 − Λ_ii s²: zero up to (D + K)·eps·κ(Λ) of their terms,
    # which are of size Λ_ii·|μ| and Λ_ii s² = 1.
    size = precision.diagonal().max().item() * (1 + best.base_dist.loc.abs().max().item())
    for g in grads:
        assert g.abs().max().item() <= 16 * 7 * EPS * kappa * size
    gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    kl = toyvae.kl_to_posterior(model, x, best)
    # A K-term sum of logs of size ≤ log κ, computed two ways: 16·K·eps·(1 + log-det sizes).
    assert (kl - gap).abs().max().item() <= 16 * 3 * EPS * kappa * (1 + torch.logdet(precision))


def test_gaps_add_up_and_vanish_for_the_best_amortised_encoder():
    """approximation + amortisation = KL(q ‖ p(z|x)); zero amortisation for the best encoder."""
    gen = seeds.generator(5)
    model = toyvae.LinearGaussian(
        torch.randn(4, 2, dtype=F64, generator=gen), torch.randn(4, dtype=F64, generator=gen), 0.7
    )
    x = torch.randn(5, 4, dtype=F64, generator=gen)
    exact = LinearGaussianEncoder.exact_posterior(model)
    precision = torch.linalg.inv(exact.scale_tril @ exact.scale_tril.mT)
    # The best mean-field encoder: the posterior mean map, variances 1/Λ_ii (x-independent).
    best = LinearGaussianEncoder(exact.weight, exact.bias, torch.diag(precision.diagonal().rsqrt()))
    off = LinearGaussianEncoder(
        exact.weight * 1.3, exact.bias, torch.diag(torch.tensor([0.5, 2.0]))
    )
    kappa = torch.linalg.cond(precision).item()
    for encoder, family in [(best, "diagonal"), (off, "diagonal"), (exact, "full"), (off, "full")]:
        q = encoder(x)
        gaps = inference_gaps(model, x, q, family=family)
        total = toyvae.kl_to_posterior(model, x, q)
        # Three exact quantities of size ≤ |log p(x)| meet: 4·(D + K)·eps·κ·(their size).
        size = model.log_evidence(x).abs().max().item()
        tol = 4 * 6 * EPS * kappa * size
        assert (gaps.approximation + gaps.amortisation - total).abs().max().item() <= tol
        if encoder is best or encoder is exact:
            assert gaps.amortisation.abs().max().item() <= tol
        else:
            assert gaps.amortisation.min().item() > 0.01
        if family == "full":
            assert gaps.approximation.abs().max().item() <= tol
    diagonal_gap = inference_gaps(model, x, best(x)).approximation
    expected = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert (diagonal_gap - expected).abs().max().item() <= tol
    with pytest.raises(ValueError, match="family must be 'diagonal' or 'full', got 'mean'"):
        inference_gaps(model, x, best(x), family="mean")


def test_rotation_leaves_likelihood_but_costs_the_mean_field_elbo_an_exact_gap():
    """W R keeps log p(x); the best mean-field ELBO drops by ½ log((ac²+bs²)(bc²+as²)/ab)."""
    eigenvalues = [9.0, 4.0, 1.0, 0.6]
    x = data_with_spectrum(eigenvalues, n=50, seed=seeds.seed(2))
    model = ppca_maximum_likelihood(x, 2)
    sigma2 = model.noise_variance.item()
    a, b = eigenvalues[0] / sigma2, eigenvalues[1] / sigma2  # Λ = I + WᵀW/σ² = diag(λ_i/σ²)
    angle = 0.4
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=F64)
    rotated = toyvae.LinearGaussian(model.weight @ rotation, model.bias, model.noise_variance)
    log_p = model.log_evidence(x)
    # log p depends on W only through WWᵀ = W R Rᵀ Wᵀ: equal to (D + K)·eps·κ·|log p|.
    tol = 16 * 6 * EPS * a * (1 + log_p.abs().max().item())
    assert (rotated.log_evidence(x) - log_p).abs().max().item() <= tol
    gap_ml = log_p - toyvae.elbo(model, x, best_mean_field(model, x))
    gap_rotated = log_p - toyvae.elbo(rotated, x, best_mean_field(rotated, x))
    expected = 0.5 * math.log((a * c * c + b * s * s) * (b * c * c + a * s * s) / (a * b))
    assert gap_ml.abs().max().item() <= tol  # the ML W has orthogonal columns
    assert (gap_rotated - expected).abs().max().item() <= tol
    assert expected > 0.01


def test_best_mean_field_needs_a_linear_gaussian_model():
    """best_mean_field of something that is not a LinearGaussian raises TypeError naming it."""
    with pytest.raises(TypeError, match=r"model must be a toyvae\.LinearGaussian, got str"):
        best_mean_field("model", torch.zeros(1, 2, dtype=F64))
