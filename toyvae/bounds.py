r"""The exact ELBO of a Gaussian q under a linear-Gaussian model, its two terms, and the gap.

For q(z) = N(m, S) with S = L Lᵀ, in the whitened coordinates of :mod:`toyvae.model`
(Ã = L_Ψ⁻¹W, r̃ = L_Ψ⁻¹(x − b), G = ÃᵀÃ):

    E_q log p(x|z) = −½ [D log 2π + log det Ψ + ‖r̃ − Ã m‖² + tr(G S)]
    KL(q ‖ p(z))   = ½ [tr S + ‖m‖² − K − log det S]
    ELBO(q)        = E_q log p(x|z) − KL(q ‖ p(z))
    KL(q ‖ p(z|x)) = log p(x) − ELBO(q)      (computed independently, from the posterior)
"""

from __future__ import annotations

import torch

from toyvae._checks import broadcast_batch
from toyvae.gaussians import LOG_2PI, Gaussian, _kl, as_gaussian
from toyvae.model import LinearGaussian

__all__ = ["elbo", "expected_log_likelihood", "kl_to_posterior", "kl_to_prior"]


def _check_model(model) -> None:
    if not isinstance(model, LinearGaussian):
        raise TypeError(f"model must be a toyvae.LinearGaussian, got {type(model).__name__}")


def _check_inputs(model, x, q) -> tuple[torch.Tensor, Gaussian]:
    """Validate (model, x, q); return x as a tensor and q in canonical form, in model's dtype."""
    _check_model(model)
    x = model._check_x(x)
    gq = as_gaussian(q, "q", dim=model.latent_dim)
    broadcast_batch(q=gq.loc.shape[:-1], x=x.shape[:-1])
    like = model.weight
    gq = Gaussian(gq.loc.to(like.dtype), gq.scale_tril.to(like.dtype))
    return x, gq


def _standard_normal(like: torch.Tensor, dim: int) -> Gaussian:
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return Gaussian(torch.zeros_like(eye[0]), eye)


def _expected_log_likelihood(model: LinearGaussian, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
    factors = model._factors()
    misfit = model._whitened_residual(x, factors) - q.loc @ factors.whitened_weight.mT
    # tr(G S) = tr(Lᵀ G L): the spread of q seen through the whitened decoder.
    spread = (factors.gram * q.covariance()).sum((-2, -1))
    constant = model.data_dim * LOG_2PI + factors.noise_log_det
    return -0.5 * (constant + misfit.square().sum(-1) + spread)


def expected_log_likelihood(model: LinearGaussian, x, q) -> torch.Tensor:
    r"""E_{q(z)} log p_θ(x|z), the reconstruction term of the ELBO, in closed form.

    .. math::
        \mathbb E_q \log p(x\mid z) = -\tfrac12\big[D\log 2\pi + \log\det\Psi
            + \lVert \tilde r - \tilde W m\rVert^2 + \operatorname{tr}(\tilde W^\top\tilde W S)\big]

    Shape: the broadcast of q's batch shape with ``x.shape[:-1]``.
    """
    x, gq = _check_inputs(model, x, q)
    return _expected_log_likelihood(model, x, gq)


def kl_to_prior(q) -> torch.Tensor:
    r"""KL(q(z) ‖ N(0, I)) = ½ [tr S + ‖m‖² − K − log det S], shape q's batch shape."""
    gq = as_gaussian(q, "q")
    return _kl(gq, _standard_normal(gq.loc, gq.dim))


def elbo(model: LinearGaussian, x, q) -> torch.Tensor:
    r"""The evidence lower bound of q at x, in closed form.

    .. math::
        \mathrm{ELBO}(q) = \mathbb E_q[\log p_\theta(x, z) - \log q(z)]
            = \mathbb E_q\log p_\theta(x\mid z) - \mathrm{KL}(q\,\|\,p(z))
            \le \log p_\theta(x)

    with equality exactly when q = p_θ(z|x). Shape: the broadcast of q's batch shape with
    ``x.shape[:-1]``.
    """
    x, gq = _check_inputs(model, x, q)
    return _expected_log_likelihood(model, x, gq) - _kl(gq, _standard_normal(gq.loc, gq.dim))


def kl_to_posterior(model: LinearGaussian, x, q) -> torch.Tensor:
    r"""KL(q(z) ‖ p_θ(z|x)) in closed form, from the exact posterior's Cholesky factor.

    Computed directly (not as log p(x) − ELBO), so the identity
    log p(x) = ELBO(q) + KL(q ‖ p(z|x)) is a check between independent computations.
    """
    x, gq = _check_inputs(model, x, q)
    factors = model._factors()
    posterior = model._posterior(model._whitened_residual(x, factors), factors)
    return _kl(gq, posterior)
