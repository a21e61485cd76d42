"""The exact-identity rows: log p(x) = ELBO + KL, tightness, KL ≥ 0, Bayes' rule, the oracle.

All but the oracle row are written against :class:`toyvae.ConjugateModel` only, so they run on
every model family; each is held to κ(S)·4(D+K)·eps·M
(:func:`~toyvae.report.rows.solve_tolerance`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import MultivariateNormal

from toyvae import reference
from toyvae.bounds import elbo, kl_to_posterior, kl_to_prior
from toyvae.gaussians import Gaussian, as_gaussian
from toyvae.interface import batch_shape
from toyvae.report._variational import random_gaussians
from toyvae.report.rows import (
    IDENTITY,
    Budget,
    Row,
    apply,
    options,
    rounding_unit,
    skip,
    skip_unless_linear_gaussian,
    solve_tolerance,
    stream,
    worst,
)
from toyvae.tolerances import identity_tolerance


def _distribution(g: Gaussian) -> MultivariateNormal:
    """A canonical Gaussian (such as an exact posterior) as a torch ``MultivariateNormal``."""
    return MultivariateNormal(g.loc, scale_tril=g.scale_tril)


@stream("check_identity")
def check_identity(model, x, generator, *, budget=None) -> Row:
    """log p(x) = ELBO(q) + KL(q ‖ p(z|x)) for every q: three independent computations."""
    log_evidence = model.exact(x).log_evidence
    errors, tols = [], []
    for q in random_gaussians(model, x, generator):
        residual = log_evidence - elbo(model, x, q) - kl_to_posterior(model, x, q)
        errors.append(residual.abs())
        tols.append(solve_tolerance(model, x, q))
    return worst("log p(x) = ELBO + KL", torch.cat(errors), torch.cat(tols), IDENTITY)


@stream("check_tightness")
def check_tightness(model, x, generator, *, budget=None) -> Row:
    """At q = p(z|x): ELBO = log p(x) and KL(q ‖ p(z|x)) = 0, to rounding."""
    exact = model.exact(x)
    post = _distribution(exact.posterior)
    tol = solve_tolerance(model, x, post)
    gap = (elbo(model, x, post) - exact.log_evidence).abs()
    kl = kl_to_posterior(model, x, post).abs()
    return worst("tight at the posterior", torch.cat([gap, kl]), torch.cat([tol, tol]), IDENTITY)


@stream("check_kl_nonnegative")
def check_kl_nonnegative(model, x, generator, *, budget=None) -> Row:
    """KL(q ‖ p(z|x)) ≥ 0 and KL(q ‖ p(z)) ≥ 0, also for q a hair from the posterior.

    The error is the violation, max(0, −KL).
    """
    post = _distribution(model.exact(x).posterior)
    # Relative perturbation 1e-4: KL ≈ 1e-8, where rounding could make it negative.
    hair = MultivariateNormal(post.loc * (1 + 1e-4), scale_tril=post.scale_tril * (1 - 1e-4))
    errors, tols = [], []
    for q in [*random_gaussians(model, x, generator), hair, post]:
        tol = solve_tolerance(model, x, q)
        for kl in (kl_to_posterior(model, x, q), kl_to_prior(q, model).expand_as(tol)):
            errors.append((-kl).clamp_min(0))
            tols.append(tol)
    return worst("KL ≥ 0", torch.cat(errors), torch.cat(tols), IDENTITY + "; error = max(0, −KL)")


@stream("check_bayes_rule")
def check_bayes_rule(model, x, generator, *, budget=None) -> Row:
    """log p(x, z) − log p(z|x) = log p(x) at every z, not only on average."""
    batch, k = batch_shape(model, x), model.latent_dim
    exact = model.exact(x)
    post = exact.posterior
    prior = model.prior()
    # z from the prior, from the posterior, and far out (3 prior standard deviations more).
    noise = torch.randn(3, *batch, k, generator=generator, **options(model))
    z = torch.stack(
        [
            prior.loc + apply(prior.scale_tril, noise[0]),
            post.loc + apply(post.scale_tril, noise[1]),
            prior.loc + 3 * apply(prior.scale_tril, noise[2]),
        ]
    )
    log_posterior = _distribution(post).log_prob(z)
    error = (model.log_joint(x, z) - log_posterior - exact.log_evidence).abs()
    tol = solve_tolerance(model, x, z=z)
    reason = IDENTITY + ", with the terms of log p(x, z) and log p(z|x)"
    return worst("Bayes' rule", error, tol, reason)


def _condition(eigenvalues: torch.Tensor) -> float:
    return float(eigenvalues.max() / eigenvalues.min())


ORACLE_DIGITS = 1e-6
"""The dense oracle is compared with only where its own error bound, relative to M, is at most
this (at least six correct digits): an oracle is an oracle only where it is accurate."""


def _kl_to_prior_from_factor(mean: np.ndarray, tril: np.ndarray) -> np.ndarray:
    """KL(N(m, LLᵀ) ‖ N(0, I)) = ½[‖L‖²_F + ‖m‖² − K − 2 Σ log L_ii], textbook, from L itself.

    log det Σ from L's diagonal, not from the rounded product LLᵀ: with q's smallest variance near
    eps times its largest, slogdet(LLᵀ) has no correct digits left (κ(Σ_q) amplifies the
    rounding of the product), while the diagonal of L carries it exactly.
    """
    k = mean.shape[-1]
    log_det = 2 * np.log(np.abs(np.diagonal(tril, axis1=-2, axis2=-1))).sum(-1)
    return 0.5 * ((tril**2).sum((-2, -1)) + (mean**2).sum(-1) - k - log_det)


def _covariance_rounding(model, tril: torch.Tensor) -> torch.Tensor:
    """A bound on the oracle's error from receiving fl(LLᵀ) instead of LLᵀ in E_q log p(x|z).

    It enters only through ½ tr(G Σ), G = WᵀΨ⁻¹W, and |fl(LLᵀ) − LLᵀ| ≤ K·eps·|L||L|ᵀ entrywise
    (Higham, §3.5), so the error is at most ½K·eps·Σᵢⱼ |G|ᵢⱼ (|L||L|ᵀ)ᵢⱼ; twice that for the
    oracle's own products with Σ.
    """
    weight = model.weight.detach()
    whitened = model.noise.whiten_columns(weight)
    gram = (whitened.mT @ whitened).abs()
    spread = tril.detach().abs() @ tril.detach().abs().mT
    eps = torch.finfo(model.dtype).eps
    return model.latent_dim * eps * (gram * spread).sum((-2, -1))


@stream("check_reference")
def check_reference(model, x, generator, *, budget=None) -> Row:
    """log p(x) and ELBO(q) agree with the dense NumPy/SciPy oracle :mod:`toyvae.reference`.

    A linear-Gaussian row (the oracle takes W, b and Ψ): skipped for other model families.
    The oracle's explicit inverses amplify rounding by κ(C) (log p) and κ(Ψ) (the ELBO's
    reconstruction term); where that leaves it fewer than six correct digits
    (κ·4(D+K)·eps > :data:`ORACLE_DIGITS`), or where SciPy refuses the matrix, that comparison
    is skipped and the reason names the condition number. The ELBO's KL(q ‖ p(z)) is taken from
    q's own Cholesky factor (:func:`_kl_to_prior_from_factor`), the oracle's reconstruction term
    from q's covariance, with the rounding of LLᵀ in the tolerance.
    """
    budget = budget or Budget()
    prop = "reference agreement"
    skipped = skip_unless_linear_gaussian(prop, model)
    if skipped is not None:
        return skipped
    d = model.data_dim
    if budget.max_reference_dim is not None and d > budget.max_reference_dim:
        return skip(prop, f"skipped: the dense O(D³) oracle at D={d} (runs without --quick)")
    weight = model.weight.detach().cpu().numpy()
    bias = model.bias.detach().cpu().numpy()
    noise = model.noise_variance.detach().cpu().numpy()
    xs = x.detach().cpu().numpy()
    psi = model.noise.eigenvalues()
    # λmin(C) ≥ λmin(Ψ) and λmax(C) ≤ ‖W‖² + λmax(Ψ) for C = WWᵀ + Ψ: a cheap bound on κ(C).
    top = float(torch.linalg.matrix_norm(model.weight.detach(), 2) ** 2)
    kappa_c = (top + float(psi.max())) / float(psi.min())
    kappa_psi = _condition(psi)
    digits = rounding_unit(model)  # 4(D+K)·eps
    errors, tols, left_out = [], [], []
    if kappa_c * digits > ORACLE_DIGITS:
        left_out.append(f"log p(x): κ(C) ≤ {kappa_c:.1e} leaves the oracle < 6 digits")
    else:
        try:
            theirs = reference.log_evidence(weight, bias, noise, xs)
        except (np.linalg.LinAlgError, ValueError) as error:
            left_out.append(f"log p(x): SciPy refuses C (κ(C) ≤ {kappa_c:.1e}: {error})")
        else:
            ours = model.exact(x).log_evidence.detach().cpu().numpy()
            errors.append(np.abs(ours - theirs))
            tols.append(kappa_c * identity_tolerance(model, x).cpu().numpy())
    if kappa_psi * digits > ORACLE_DIGITS:
        left_out.append(f"ELBO: κ(Ψ) = {kappa_psi:.1e} leaves the oracle < 6 digits")
        qs = []
    else:
        qs = random_gaussians(model, x, generator)
    for q in qs:
        g = as_gaussian(q)
        loc, tril = g.loc.detach(), g.scale_tril.detach().expand(*g.loc.shape, -1)
        ours = elbo(model, x, q).detach().cpu().numpy()
        try:
            reconstruction = reference.expected_log_likelihood(
                weight, bias, noise, xs, loc.cpu().numpy(), g.covariance().detach().cpu().numpy()
            )
        except (np.linalg.LinAlgError, ValueError) as error:
            left_out.append(f"ELBO at one q: the oracle refuses its covariance ({error})")
            continue
        theirs = reconstruction - _kl_to_prior_from_factor(loc.cpu().numpy(), tril.cpu().numpy())
        errors.append(np.abs(ours - theirs))
        tol = kappa_psi * identity_tolerance(model, x, q) + _covariance_rounding(model, tril)
        tols.append(tol.cpu().numpy())
    reason = (
        "κ·4(D+K)·eps·M: the oracle's inverses amplify by κ(C) (log p), κ(Ψ) (ELBO), plus "
        "K·eps·Σ|G||L||L|ᵀ for q's covariance LLᵀ"
    )
    if not errors:
        return skip(prop, "skipped: " + "; ".join(left_out))
    if left_out:
        reason += "; left out: " + "; ".join(left_out)
    return worst(prop, np.concatenate(errors), np.concatenate(tols), reason)
