r"""The exact ELBO of a Gaussian q under any :class:`toyvae.ConjugateModel`, its terms, the gap.

For a model with prior p(z) and exact answers (log p(x), p(z|x)) from
:meth:`~toyvae.ConjugateModel.exact`:

    ELBO(q)        = E_q log p(x|z) − KL(q ‖ p(z))    (the model's reconstruction term, our KL)
    KL(q ‖ p(z|x)) = closed form, from the posterior's Cholesky factor
    log p(x)       = ELBO(q) + KL(q ‖ p(z|x))         (two independent computations)

For the linear-Gaussian model, in whitened coordinates (Ã = L_Ψ⁻¹W, r̃ = L_Ψ⁻¹(x − b),
G = ÃᵀÃ, q = N(m, S)), E_q log p(x|z) = −½ [D log 2π + log det Ψ + ‖r̃ − Ã m‖² + tr(G S)].
"""

from __future__ import annotations

import torch

from toyvae._checks import broadcast_batch, check_finite, check_positive
from toyvae.gaussians import Gaussian, _kl, as_gaussian, standard_normal
from toyvae.interface import (
    ConjugateModel,
    StructuredGaussian,
    batch_shape,
    check_model,
    for_data,
)

__all__ = ["elbo", "expected_log_likelihood", "kl_to_posterior", "kl_to_prior"]


def check_call(model, x, q) -> tuple[ConjugateModel, torch.Tensor, Gaussian]:
    """Validate (model, x, q) for a call: the model (bound to x when its family needs that,
    :func:`toyvae.interface.for_data`), x as a tensor and q in canonical form, in model's dtype.
    """
    model = check_model(for_data(model, x))
    x = model.check_data(x)
    gq = as_gaussian(q, "q", dim=model.latent_dim)
    broadcast_batch(q=gq.loc.shape[:-1], x=batch_shape(model, x))
    return model, x, as_model_dtype(gq, model.dtype)


def as_model_dtype(q: Gaussian, dtype: torch.dtype, name: str = "q") -> Gaussian:
    """q cast to the model's dtype, checked again there: a float64 mean of 1e39 is finite, but
    not in float32, and a scale of 1e-50 becomes 0."""
    if q.loc.dtype == dtype:
        return q
    cast = Gaussian(q.loc.to(dtype), q.scale_tril.to(dtype))
    where = f" in the model's dtype {dtype} (q is {q.loc.dtype}; cast or rescale it)"
    check_finite(cast.loc, f"{name}'s mean{where}")
    check_finite(cast.scale_tril, f"{name}'s scale{where}")
    check_positive(cast.scale_tril.diagonal(dim1=-2, dim2=-1), f"{name}'s scale{where}")
    return cast


def check_inputs(model, x, q) -> tuple[torch.Tensor, Gaussian]:
    """:func:`check_call` without the model: x and q in canonical form."""
    return check_call(model, x, q)[1:]


_check_inputs = check_inputs  # the name older code imports


def _prior(model: ConjugateModel) -> Gaussian:
    p = model.prior()
    return Gaussian(p.loc, p.scale_tril)


def expected_log_likelihood(model, x, q) -> torch.Tensor:
    r"""E_{q(z)} log p_θ(x|z), the reconstruction term of the ELBO, in closed form.

    .. math::
        \mathbb E_q \log p(x\mid z) = -\tfrac12\big[D\log 2\pi + \log\det\Psi
            + \lVert \tilde r - \tilde W m\rVert^2 + \operatorname{tr}(\tilde W^\top\tilde W S)\big]

    (for the linear-Gaussian model; each family computes its own). Shape: the broadcast of q's
    batch shape with x's.
    """
    model, x, gq = check_call(model, x, q)
    return model.expected_log_likelihood(x, gq)


def kl_to_prior(q, model=None) -> torch.Tensor:
    r"""KL(q(z) ‖ p(z)), shape q's batch shape.

    Without ``model``, p(z) = N(0, I): ½ [tr S + ‖m‖² − K − log det S]. With a
    :class:`toyvae.ConjugateModel`, its own prior.
    """
    if model is None:
        gq = as_gaussian(q, "q")
        return _kl(gq, standard_normal(gq.dim, gq.loc.dtype, gq.loc.device))
    check_model(model)
    gq = as_gaussian(q, "q", dim=model.latent_dim)
    return _kl(as_model_dtype(gq, model.dtype), _prior(model))


def elbo(model, x, q) -> torch.Tensor:
    r"""The evidence lower bound of q at x, in closed form.

    .. math::
        \mathrm{ELBO}(q) = \mathbb E_q[\log p_\theta(x, z) - \log q(z)]
            = \mathbb E_q\log p_\theta(x\mid z) - \mathrm{KL}(q\,\|\,p(z))
            \le \log p_\theta(x)

    with equality exactly when q = p_θ(z|x). ``model`` is any :class:`toyvae.ConjugateModel`;
    ``q`` a torch Gaussian, or a :class:`toyvae.StructuredGaussian` (a Markov chain, a top-down
    hierarchy), whose ELBO is computed by its own per-step or per-layer route. Shape: the
    broadcast of q's batch shape with x's.
    """
    if isinstance(q, StructuredGaussian):
        return q.elbo(model, x)
    model, x, gq = check_call(model, x, q)
    if hasattr(model, "elbo"):  # a family that regroups the terms (ConjugateModel's docstring)
        return model.elbo(x, gq)
    return model.expected_log_likelihood(x, gq) - _kl(gq, _prior(model))


def kl_to_posterior(model, x, q) -> torch.Tensor:
    r"""KL(q(z) ‖ p_θ(z|x)) in closed form, from the exact posterior's Cholesky factor.

    Computed directly (not as log p(x) − ELBO), so the identity
    log p(x) = ELBO(q) + KL(q ‖ p(z|x)) is a check between independent computations. A
    :class:`toyvae.StructuredGaussian` q computes it from its structure.
    """
    if isinstance(q, StructuredGaussian):
        return q.kl_to_posterior(model, x)
    model, x, gq = check_call(model, x, q)
    return _kl(gq, model.exact(x).posterior)
