r"""Exact mean and variance of the reconstruction term log p_θ(x|z), z ~ q: the analytic-KL ELBO.

An ELBO estimator that samples only the reconstruction term and takes the KL in closed form,
log p(x|z) − KL(q ‖ p(z)) at one z ~ q (Pyro's ``TraceMeanField_ELBO``, the textbook VAE loss),
has the variance of log p(x|z) alone. It is computed through the model interface only: by
Bayes' rule log p(x|z) = log p(x) + log p(z|x) − log p(z), two Gaussian log-densities in z.
With z = m + Lε, ε ~ N(0, I), the posterior N(μ, SSᵀ) and the prior N(m₀, L₀L₀ᵀ),

    B₁ = S⁻¹L,  c₁ = S⁻¹(m − μ),   B₀ = L₀⁻¹L,  c₀ = L₀⁻¹(m − m₀),
    log p(x|z) = const + εᵀAε + bᵀε,   A = −½(B₁ᵀB₁ − B₀ᵀB₀),   b = −(B₁ᵀc₁ − B₀ᵀc₀),

so Var log p(x|z) = 2 tr A² + ‖b‖² (ε standard normal). For the linear-Gaussian model
B₁ᵀB₁ − B₀ᵀB₀ = Lᵀ WᵀΨ⁻¹W L: the difference of two precisions, computed here as a difference,
so the relative accuracy is about ε·‖B₁ᵀB₁‖/‖A‖ (it degrades only where the likelihood is
weak next to the prior). The log-weight estimator's variance is
:func:`toyvae.log_weight_moments`; either can be the larger one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from toyvae.bounds import check_call

__all__ = ["ReconstructionMoments", "reconstruction_moments"]


class ReconstructionMoments(NamedTuple):
    """Exact moments of log p_θ(x|z) under z ~ q, each of the broadcast batch shape.

    Attributes
    ----------
    mean : tensor
        E_q log p_θ(x|z): the model's own closed form
        (:meth:`toyvae.ConjugateModel.expected_log_likelihood`).
    variance : tensor
        Var_q log p_θ(x|z) = 2 tr A² + ‖b‖², from the exact posterior and the prior (module
        docstring): the variance of one draw of the analytic-KL ELBO estimator.
    fourth_cumulant : tensor
        κ₄ = 48 (tr A⁴ + bᵀA²b), the Gaussian quadratic form's fourth cumulant (as in
        :func:`toyvae.log_weight_cumulants`): a sample variance of n draws has variance
        κ₄/n + 2 variance²/(n − 1).
    """

    mean: torch.Tensor
    variance: torch.Tensor
    fourth_cumulant: torch.Tensor


def _whiten(tril: torch.Tensor, loc: torch.Tensor, q_loc: torch.Tensor, q_tril: torch.Tensor):
    """(T⁻¹L, T⁻¹(m − loc)) for a Gaussian with Cholesky factor T and mean loc."""
    tril, q_tril = torch.broadcast_tensors(tril, q_tril)
    scale = torch.linalg.solve_triangular(tril, q_tril, upper=False)
    diff = (q_loc - loc).unsqueeze(-1)
    offset = torch.linalg.solve_triangular(tril, diff.expand(*tril.shape[:-1], 1), upper=False)
    return scale, offset.squeeze(-1)


def reconstruction_moments(model, x, q) -> ReconstructionMoments:
    r"""Exact mean and variance of log p_θ(x|z) for z ~ q, for any :class:`toyvae.ConjugateModel`.

    .. math::
        \operatorname{Var}_q \log p_\theta(x\mid z) = 2\operatorname{tr}A^2 + \lVert b\rVert^2,
        \qquad A = -\tfrac12\big(B_1^\top B_1 - B_0^\top B_0\big),\quad
        b = -\big(B_1^\top c_1 - B_0^\top c_0\big)

    (module docstring). ``q`` is anything :func:`toyvae.elbo` accepts; a structured q is used in
    its dense form. Differentiable in the model's and q's parameters.
    """
    model, x, gq = check_call(model, x, q)
    mean = model.expected_log_likelihood(x, gq)
    posterior = model.exact(x).posterior
    prior = model.prior()
    b1, c1 = _whiten(posterior.scale_tril, posterior.loc, gq.loc, gq.scale_tril)
    b0, c0 = _whiten(prior.scale_tril, prior.loc, gq.loc, gq.scale_tril)
    a = -0.5 * (b1.mT @ b1 - b0.mT @ b0)
    b = -((c1.unsqueeze(-2) @ b1) - (c0.unsqueeze(-2) @ b0)).squeeze(-2)
    a2 = a @ a
    variance = 2 * a2.diagonal(dim1=-2, dim2=-1).sum(-1) + b.square().sum(-1)
    quartic = (b.unsqueeze(-2) @ a2 @ b.unsqueeze(-1))[..., 0, 0]
    kappa4 = 48 * ((a2 * a2.mT).sum((-2, -1)) + quartic)
    return ReconstructionMoments(mean, variance.expand(mean.shape), kappa4.expand(mean.shape))
