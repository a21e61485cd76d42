"""The classic questions, on each model: the aggregate posterior, ELBO surgery, the joint KL and
Fisher's identity.

They need a Gaussian data distribution q(x) and linear-Gaussian encoders built from the model's
W, b and Ψ, so they are linear-Gaussian rows: for another model family they are skipped
(:func:`~toyvae.report.rows.skip_unless_linear_gaussian`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import MultivariateNormal

from toyvae.aggregate import (
    LinearGaussianEncoder,
    aggregate_kl_to_prior,
    aggregate_posterior,
    elbo_surgery,
    joint_kl,
)
from toyvae.bounds import elbo, kl_to_posterior
from toyvae.gaussians import gaussian_kl
from toyvae.model import LinearGaussian
from toyvae.report.rows import (
    Row,
    options,
    rounding_unit,
    skip_unless_linear_gaussian,
    stream,
    worst,
)
from toyvae.tolerances import magnitude, posterior_condition


class _Classic(NamedTuple):
    """Gaussian data q(x) = N(b + L_C δ, L_C diag(d²) L_Cᵀ), C = L_C L_Cᵀ = WWᵀ + Ψ, and encoders.

    ``data[0]`` is the model's own marginal (δ = 0, d = 1), ``data[1]`` a misspecified one
    (‖δ‖ ≈ 1, d log-uniform in [1/√2, √2]); ``encoders`` are the exact posterior and one off it.
    """

    data: list[MultivariateNormal]
    shifts: list[torch.Tensor]  # δ
    stretches: list[torch.Tensor]  # d
    encoders: list[LinearGaussianEncoder]

    def pairs(self):
        """(encoder, data, δ, d) for every encoder and data distribution."""
        for encoder in self.encoders:
            for data, shift, stretch in zip(self.data, self.shifts, self.stretches, strict=True):
                yield encoder, data, shift, stretch


def _classic(model: LinearGaussian, generator: torch.Generator) -> _Classic:
    d, k = model.data_dim, model.latent_dim
    like = options(model)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, **like)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, **like)

    # One Cholesky factor of C serves both data distributions, so L_C⁻¹ of either is exact.
    tril = torch.linalg.cholesky(model.marginal().covariance_matrix)
    shifts = [torch.zeros(d, **like), randn(d) / math.sqrt(d)]
    stretches = [torch.ones(d, **like), 2 ** (uniform(d) - 0.5)]
    data = [
        MultivariateNormal(model.bias + tril @ shift, scale_tril=tril * stretch)
        for shift, stretch in zip(shifts, stretches, strict=True)
    ]
    exact = LinearGaussianEncoder.exact_posterior(model)
    factor = torch.tril(0.3 * randn(k, k), -1) + torch.diag(2 ** (2 * uniform(k) - 1))
    off = LinearGaussianEncoder(
        exact.weight * (1 + 0.2 * randn(k, d)),
        exact.bias + 0.1 * randn(k),
        exact.scale_tril @ factor,
    )
    return _Classic(data, shifts, stretches, [exact, off])


def _kappa_marginal(model: LinearGaussian) -> float:
    """A bound on κ(C), C = WWᵀ + Ψ: λmin(C) ≥ λmin(Ψ), λmax(C) ≤ ‖W‖² + λmax(Ψ); also ≥ κ(Ψ)."""
    psi = model.noise.eigenvalues()
    top = float(torch.linalg.matrix_norm(model.weight.detach(), 2) ** 2)
    return (top + float(psi.max())) / float(psi.min())


def _gaussian_kl_tolerance(mean, cov, mean_tol, cov_tol, unit) -> torch.Tensor:
    """How far KL(N(μ̂, Â) ‖ N(0, I)) may be from KL(N(μ, A) ‖ N(0, I)) if |μ̂ − μ| ≤ mean_tol and
    |Â − A| ≤ cov_tol entrywise: first order ½‖I − A⁻¹‖_F·K·cov_tol + ‖μ‖·√K·mean_tol, second
    order ¼(‖A⁻¹‖·K·cov_tol)² + ½K·mean_tol², plus ``unit``·Σ|terms| for the rounding of each.
    """
    k = mean.shape[-1]
    inverse = torch.linalg.inv(cov)
    eye = torch.eye(k, dtype=cov.dtype, device=cov.device)
    first = 0.5 * torch.linalg.matrix_norm(eye - inverse) * k * cov_tol
    first = first + mean.norm() * math.sqrt(k) * mean_tol
    second = (
        0.25 * (torch.linalg.matrix_norm(inverse, 2) * k * cov_tol) ** 2 + 0.5 * k * mean_tol**2
    )
    terms = cov.trace() + mean.square().sum() + k + torch.logdet(cov).abs()
    return first + second + 2 * unit * terms


@stream("check_aggregate_prior")
def check_aggregate_prior(model, x, generator, *, budget=None) -> Row:
    """Data from the model and the exact-posterior encoder: the aggregate posterior is N(0, I).

    Misspecified data N(b + L_C δ, L_C diag(d²) L_Cᵀ) move it by the exact amount: since
    V C Vᵀ + Σ = I (docs/prior-vs-aggregate.md, A2), q(z) = N(Pδ, I + P diag(d² − 1) Pᵀ) with
    P = V L_C. Means, covariances and KL(q(z) ‖ p(z)) against these.
    """
    skipped = skip_unless_linear_gaussian("aggregate posterior (= prior if matched)", model)
    if skipped is not None:
        return skipped
    setup = _classic(model, generator)
    exact = setup.encoders[0]
    k = model.latent_dim
    eye = torch.eye(k, **options(model))
    v, s = exact.weight, exact.scale_tril
    p = v @ setup.data[0].scale_tril
    unit, kappa = rounding_unit(model), posterior_condition(model) ** 2
    errors, tols = [], []
    for data, shift, stretch in zip(setup.data, setup.shifts, setup.stretches, strict=True):
        squares = stretch.square()
        mean, cov = p @ shift, eye + (p * (squares - 1)) @ p.mT
        agg = aggregate_posterior(exact, data)
        # Covariance: V carries Λ's Cholesky backward error times κ(Λ) (V = ΣWᵀΨ⁻¹, and
        # Σ = (Λ + δΛ)⁻¹ gives VCVᵀ + Σ − I ≈ Λ⁻¹δΛ), on top of sums of the terms |P||P|ᵀ.
        cov_scale = (p.abs() * squares.clamp_min(1)) @ p.abs().mT + s.abs() @ s.abs().mT
        cov_tol = kappa * unit * (cov_scale.max() + 1)
        # Mean: V(b + L_C δ) − Vb, one product each; no solve, so no κ.
        mean_scale = v.abs() @ (model.bias.abs() + setup.data[0].scale_tril.abs() @ shift.abs())
        mean_tol = unit * mean_scale.max()
        exact_kl = gaussian_kl(MultivariateNormal(mean, cov), model.prior())
        errors += [
            (agg.covariance_matrix - cov).abs().max(),
            (agg.loc - mean).abs().max(),
            (aggregate_kl_to_prior(exact, data) - exact_kl).abs(),
        ]
        tols += [cov_tol, mean_tol, _gaussian_kl_tolerance(mean, cov, mean_tol, cov_tol, unit)]
    reason = "κ(Λ)·4(D+K)·eps·Σ|terms| (covariance; Λ's backward error ×κ(Λ)), 4(D+K)·eps (mean)"
    return worst(
        "aggregate posterior (= prior if matched)", torch.stack(errors), torch.stack(tols), reason
    )


@stream("check_elbo_surgery")
def check_elbo_surgery(model, x, generator, *, budget=None) -> Row:
    """ELBO surgery E KL(q(z|x) ‖ p(z)) = I(x; z) + KL(q(z) ‖ p(z)), Gaussian data, exactly.

    For data from the model and misspecified data, with the exact-posterior encoder and one off
    it; the three terms are computed separately (:func:`toyvae.aggregate.elbo_surgery`).
    """
    skipped = skip_unless_linear_gaussian("ELBO surgery", model)
    if skipped is not None:
        return skipped
    setup = _classic(model, generator)
    unit = rounding_unit(model)
    errors, tols = [], []
    for encoder, data, _, _ in setup.pairs():
        surgery = elbo_surgery(encoder, data)
        errors.append((surgery.average_kl - surgery.mutual_information - surgery.marginal_kl).abs())
        # M: tr S, ‖Vm + c‖², K and |log det S| (average KL); ‖V L_C‖², tr A and log det A of
        # the aggregate covariance A (twice: mutual information and marginal KL).
        encoder_cov = encoder.scale_tril @ encoder.scale_tril.mT
        spread = encoder.weight @ data.scale_tril
        aggregate_cov = spread @ spread.mT + encoder_cov
        mean = encoder.weight @ data.loc + encoder.bias
        terms = (
            encoder_cov.trace()
            + mean.square().sum()
            + model.latent_dim
            + torch.logdet(encoder_cov).abs()
            + spread.square().sum()
            + aggregate_cov.trace()
            + 2 * torch.logdet(aggregate_cov).abs()
        )
        tols.append(unit * terms)
    reason = "4(D+K)·eps·M: M = Σ|terms| of the three; log det of the aggregate enters twice"
    return worst("ELBO surgery", torch.stack(errors), torch.stack(tols), reason)


def _sigma_points(data: MultivariateNormal) -> torch.Tensor:
    """The 2D points m ± √D L e_i: their mean is m and their covariance L Lᵀ, exactly, so the
    average of a quadratic in x over them is its expectation under N(m, L Lᵀ)."""
    offsets = math.sqrt(data.loc.shape[-1]) * data.scale_tril.mT  # rows √D L e_i
    return torch.cat([data.loc + offsets, data.loc - offsets])


@stream("check_joint_kl")
def check_joint_kl(model, x, generator, *, budget=None) -> Row:
    """KL(q(x, z) ‖ p(x, z)) = −E_{q(x)} ELBO − H[q(x)] equals the chain rule's
    KL(q(x) ‖ p(x)) + E_{q(x)} KL(q(z|x) ‖ p(z|x)), for model-matched and misspecified data.

    The left side is :func:`toyvae.aggregate.joint_kl`; the right side uses
    :func:`toyvae.gaussian_kl` and :func:`toyvae.kl_to_posterior` averaged over sigma points
    (exact: the KL to the posterior is a quadratic in x).
    """
    skipped = skip_unless_linear_gaussian("joint KL = −E ELBO − H[q(x)]", model)
    if skipped is not None:
        return skipped
    setup = _classic(model, generator)
    marginal = setup.data[0]
    d = model.data_dim
    # Solves against L_C (κ(L_C) = √κ(C)) and against the posterior factor S.
    kappa = max(posterior_condition(model), math.sqrt(_kappa_marginal(model)))
    unit = rounding_unit(model)
    errors, tols = [], []
    for encoder, data, shift, stretch in setup.pairs():
        # 2D points of size D: in blocks, so memory stays O(D²) for a user's large D.
        inference, point_terms = 0.0, 0.0
        for points in _sigma_points(data).split(256):
            qs = encoder(points)
            inference = inference + kl_to_posterior(model, points, qs).sum() / (2 * d)
            point_terms = point_terms + magnitude(model, points, qs).sum() / (2 * d)
        chain = gaussian_kl(data, marginal) + inference
        errors.append((joint_kl(model, encoder, data) - chain).abs())
        # M: the terms of ELBO and KL(q ‖ p(z|x)) at the sigma points (their average is that of
        # −E ELBO), of H[q(x)], and of KL(q(x) ‖ p(x)), where L_C⁻¹L_q = diag(d) and
        # L_C⁻¹(m_q − b) = δ by construction.
        log_det_data = data.scale_tril.diagonal().log().sum().abs() * 2
        log_det_marginal = marginal.scale_tril.diagonal().log().sum().abs() * 2
        terms = (
            point_terms
            + d * (1 + math.log(2 * math.pi))
            + 2 * log_det_data
            + stretch.square().sum()
            + shift.square().sum()
            + d
            + log_det_marginal
        )
        tols.append(kappa * unit * terms)
    reason = "max(κ(S), κ(L_C))·4(D+K)·eps·M: M = Σ|terms| of both sides, solves against S, L_C"
    return worst("joint KL = −E ELBO − H[q(x)]", torch.stack(errors), torch.stack(tols), reason)


@stream("check_fisher")
def check_fisher(model, x, generator, *, budget=None) -> Row:
    """Fisher's identity: with q held at p_θ(z|x), ∇_θ ELBO(θ, q) = ∇_θ log p_θ(x) for W, b, Ψ.

    Autograd of both sides, per data point; the error is that of their sums over the points.
    """
    skipped = skip_unless_linear_gaussian("Fisher: ∇θ ELBO = ∇θ log p(x)", model)
    if skipped is not None:
        return skipped
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (model.weight, model.bias, model.noise_variance)
    ]
    copy = LinearGaussian(*leaves)
    with torch.no_grad():
        post = copy.posterior(x)  # held fixed: no gradient flows into q
    by_elbo = [torch.zeros_like(t) for t in leaves]
    by_evidence = [torch.zeros_like(t) for t in leaves]
    sizes = [torch.zeros_like(t) for t in leaves]
    for n in range(x.shape[0]):
        q = MultivariateNormal(post.loc[n], scale_tril=post.scale_tril[n])
        g_elbo = torch.autograd.grad(elbo(copy, x[n], q), leaves)
        g_evidence = torch.autograd.grad(copy.log_evidence(x[n]), leaves)
        for total_e, total_p, size, a, b in zip(
            by_elbo, by_evidence, sizes, g_elbo, g_evidence, strict=True
        ):
            total_e += a
            total_p += b
            size += a.abs() + b.abs()
    # Backward passes round like the forward sums, relative to the per-point gradients' sizes.
    # The ELBO side uses q's Σ = SSᵀ where log p's backward pass reaches Λ⁻¹ through the
    # Cholesky factor: the two differ by Λ's backward error times κ(Λ) = κ(S)² (measured on the
    # ill-conditioned model: κ(S) alone is exceeded 5 times).
    #
    # Both backward passes run through the whitened W̃ = Ψ^(−1/2)W and r̃ = Ψ^(−1/2)(x − b) and the
    # QR factors, which mix the entries: there the rounding is normwise, unit·max of the sizes in
    # whitened units, which the chain rule maps back by Ψᵢ^(−1/2) (W's row i, bᵢ) or Ψᵢ⁻¹ (Ψᵢ).
    # With a variance of 1e-12 (scikit-learn's floor for constant features) that term is 1e12
    # times the entrywise one: without it a correct model fails this row.
    scale = posterior_condition(model) ** 2 * rounding_unit(model)
    if model.noise_kind != "full":
        root = model.noise.eigenvalues().sqrt()  # (D,) whitening scales
        w_size, b_size, psi_size = sizes
        mixed = [
            (w_size * root.unsqueeze(-1)).max() / root.unsqueeze(-1),
            (b_size * root).max() / root,
            (psi_size * root.square()).max() / root.square(),
        ]
        if model.noise_kind == "isotropic":
            mixed[2] = psi_size
        sizes = [size + extra for size, extra in zip(sizes, mixed, strict=True)]
    errors = torch.cat(
        [(a - b).abs().reshape(-1) for a, b in zip(by_elbo, by_evidence, strict=True)]
    )
    tols = torch.cat([scale * size.reshape(-1) for size in sizes])
    reason = (
        "κ(Λ)·4(D+K)·eps·Σ_n(|∇ELBO_n| + |∇log p(x_n)|), entrywise for W, b, Ψ, plus the "
        "same normwise in whitened units, mapped back by Ψᵢ^(−1/2) (W, b) and Ψᵢ⁻¹ (Ψ)"
    )
    return worst("Fisher: ∇θ ELBO = ∇θ log p(x)", errors, tols, reason)
