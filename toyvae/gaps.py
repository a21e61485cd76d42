r"""The approximation and amortisation gaps (Cremer et al. 2018), and the best mean-field q.

log p(x) − ELBO(q) splits into the gap between log p(x) and the best member q* of q's family
at x (approximation) and the gap between q* and q (amortisation: an encoder shares its
parameters over all x). For a linear-Gaussian model both are exact: q* is the exact posterior
for the full-covariance family and :func:`best_mean_field`, in closed form, for the
diagonal one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributions import Independent, Normal

from toyvae.bounds import check_inputs, elbo
from toyvae.encoder import _check_model
from toyvae.model import LinearGaussian

__all__ = ["Gaps", "best_mean_field", "inference_gaps"]


def best_mean_field(model: LinearGaussian, x) -> Independent:
    r"""The mean-field q* = N(m, diag s²) that maximises the ELBO at each x, in closed form.

    .. math::
        m = \mu(x), \qquad s_i^2 = 1 / \Lambda_{ii}, \qquad \Lambda = I + W^\top\Psi^{-1}W

    The ELBO is a quadratic in m completed around the posterior mean μ whatever the covariance,
    and its covariance part −½[tr(Λ diag s²) − Σ log s_i²] is maximised coordinate by coordinate.
    The gap it leaves, KL(q* ‖ p(z|x)) = ½[Σ log Λ_ii − log det Λ], does not depend on x.
    """
    _check_model(model)
    loc = model.posterior(x).loc
    scale = model.posterior_precision().diagonal().rsqrt()
    return Independent(Normal(loc, scale.expand_as(loc)), 1)


class Gaps(NamedTuple):
    """log p(x) − ELBO(q) = approximation + amortisation (Cremer et al. 2018), per data point.

    Attributes
    ----------
    approximation : tensor
        log p(x) − ELBO(q*), q* the best member of q's family at x; x's batch shape.
    amortisation : tensor
        ELBO(q*) − ELBO(q), q the encoder's output at x; x's batch shape.
    """

    approximation: torch.Tensor
    amortisation: torch.Tensor


def inference_gaps(model: LinearGaussian, x, q, *, family: str = "diagonal") -> Gaps:
    r"""The approximation and amortisation gaps of q at x, exactly.

    .. math::
        \log p(x) - \mathrm{ELBO}(q)
        = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation}}
        + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q)}_{\text{amortisation}}

    Parameters
    ----------
    model : LinearGaussian
    x : (..., D) tensor
    q : MultivariateNormal or Independent(Normal, 1)
        The encoder's output at x, for example ``encoder(x)``.
    family : {"diagonal", "full"}
        The family q belongs to, which defines q*: the best mean-field Gaussian
        (:func:`best_mean_field`), or the exact posterior, whose approximation gap is zero.
    """
    x, _ = check_inputs(model, x, q)
    if family == "diagonal":
        best = best_mean_field(model, x)
    elif family == "full":
        best = model.posterior(x)
    else:
        raise ValueError(f"family must be 'diagonal' or 'full', got {family!r}")
    best_elbo = elbo(model, x, best)
    return Gaps(model.log_evidence(x) - best_elbo, best_elbo - elbo(model, x, q))
