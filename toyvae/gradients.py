r"""Single-sample ELBO gradient estimators as surrogate objectives, and their exact moments.

Each estimator is a *surrogate*: a tensor whose value is the log weight log w = log p(x, z) −
log q(z) and whose autograd gradient, for one ε, is one draw of the estimator. With
z = m + L ε, ε ~ N(0, I), and φ = q's parameters, θ = the model's:

- ``"reparameterization"`` (total derivative): ∇_φ log w(m + L_qε); both the path through z and
  the explicit dependence of log q on φ.
- ``"path_derivative"`` ("sticking the landing", Roeder et al. 2017): ∇_φ [log p(x, z) −
  log q_φ̄(z)] with φ̄ held fixed, z = m + L_qε live. It drops the score term −∇_φ log q(z), which
  has mean zero, so it is unbiased; at q = p(z|x) the path term ∇_z [log p(z|x) − log q(z)]
  vanishes identically, so every draw is exactly zero.
- ``"score_function"`` (REINFORCE): log w(z̄) ∇_φ log q(z̄) with z̄ held fixed, using
  E_q[∇_φ log q] = 0.

For every estimator the θ-gradient is ∇_θ log p(x, z) at the drawn z (q does not depend on θ).
All three are unbiased for ∇ ELBO; they differ in variance. Because log w is quadratic in ε,
every draw is a polynomial of degree ≤ 4 in ε, so Gauss–Hermite quadrature of order 5 gives
the exact mean and variance (:func:`gradient_estimator_moments`, 5^K nodes). The
reparameterisation and path-derivative draws in q's mean and Cholesky factor are of degree
≤ 2, and their moments have a closed form at any K (:func:`closed_form_gradient_moments`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from toyvae._checks import broadcast_batch, check_count
from toyvae.bounds import check_call
from toyvae.estimators import (
    _affine,
    _check_generator,
    _check_noise,
    _standard_normal,
    _structured_log_weights,
    whitened,
)
from toyvae.gaussians import Gaussian
from toyvae.interface import batch_shape
from toyvae.stats import gauss_hermite_noise

__all__ = [
    "ESTIMATORS",
    "GradientMoments",
    "closed_form_gradient_moments",
    "elbo_surrogate",
    "elbo_surrogate_at",
    "gradient_draws",
    "gradient_estimator_moments",
]

ESTIMATORS = ("reparameterization", "path_derivative", "score_function")


def _check_estimator(estimator) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def _standardised(target: Gaussian, source: Gaussian, eps: torch.Tensor) -> torch.Tensor:
    """L_t⁻¹ (z − m_t) at z = m_s + L_s ε, as offset + scale @ ε: O(K²) per sample."""
    offset = torch.linalg.solve_triangular(
        target.scale_tril, (source.loc - target.loc).unsqueeze(-1), upper=False
    ).squeeze(-1)
    scale = torch.linalg.solve_triangular(target.scale_tril, source.scale_tril, upper=False)
    return _affine(offset, scale, eps)


def _log_det(g: Gaussian) -> torch.Tensor:
    return g.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _surrogate(model, x, q: Gaussian, eps: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "reparameterization":
        return _structured_log_weights(whitened(model, x, q), eps)
    # log p(x, z) = log p(x) + log p(z|x) (Bayes), so every density below is a K-dim Gaussian
    # evaluated in O(K²) per sample; the 2π constants cancel between p(z|x) and q(z).
    exact = model.exact(x)
    posterior = exact.posterior
    frozen = Gaussian(q.loc.detach(), q.scale_tril.detach())
    source, density = (q, frozen) if estimator == "path_derivative" else (frozen, q)
    log_joint = exact.log_evidence - _log_det(posterior)
    log_joint = log_joint - 0.5 * _standardised(posterior, source, eps).square().sum(-1)
    log_q = -_log_det(density) - 0.5 * _standardised(density, source, eps).square().sum(-1)
    if estimator == "path_derivative":
        # z = m + L_qε carries the gradient; q's density is frozen: the score term is dropped.
        return log_joint - log_q
    # Score function: z̄ is fixed. Value log w; φ-gradient log w · ∇ log q; θ-gradient
    # ∇_θ log p(x, z̄).
    log_w = (log_joint - log_q).detach()
    return log_joint - log_q.detach() + log_w * (log_q - log_q.detach())


def elbo_surrogate_at(model, x, q, noise, *, estimator="reparameterization"):
    """The surrogate of :func:`elbo_surrogate` at given standard-normal noise ε.

    ``noise`` has shape (*sample_shape, *batch, K); the result has shape (*sample_shape,
    *batch).
    """
    model, x, gq = check_call(model, x, q)
    _check_estimator(estimator)
    return _surrogate(model, x, gq, _check_noise(noise, model, x, gq), estimator)


def elbo_surrogate(model, x, q, num_samples, *, estimator="reparameterization", generator=None):
    r"""Surrogate objectives whose gradients are draws of an ELBO gradient estimator.

    Returns a (num_samples, *batch) tensor equal in value to the log weights; the gradient of
    ``surrogate[s].sum()`` (with respect to q's or the model's parameters) is one draw of the
    chosen estimator of ∇ Σ_batch ELBO, and the gradient of ``surrogate.mean(0).sum()`` is the
    num_samples-sample average.

    .. math::
        \begin{aligned}
        \text{reparameterization:}\quad & \nabla_\phi \log w(m + L_q\varepsilon), \\
        \text{path\_derivative:}\quad & \nabla_z[\log p(x,z) - \log q(z)]\,\nabla_\phi z, \\
        \text{score\_function:}\quad & \log w(\bar z)\,\nabla_\phi\log q_\phi(\bar z)
        \end{aligned}

    Parameters
    ----------
    model, x, q
        As for :func:`toyvae.log_weights`.
    num_samples : int
    estimator : {"reparameterization", "path_derivative", "score_function"}
    generator : torch.Generator, optional
    """
    model, x, gq = check_call(model, x, q)
    num_samples = check_count(num_samples, "num_samples")
    _check_estimator(estimator)
    _check_generator(generator)
    eps = _standard_normal((num_samples,), model, x, gq, generator)
    return _surrogate(model, x, gq, eps, estimator)


def gradient_draws(surrogate: torch.Tensor, inputs) -> tuple[torch.Tensor, ...]:
    """Per-row gradients: for each input, a (rows, *input.shape) tensor.

    Row s is ∇ ``surrogate[s].sum()``: one draw of the estimator when the rows are samples, a
    group-mean draw when they are averages over groups. One backward pass per row (the graph
    is shared), so keep the rows few: a few hundred quadrature nodes or group means.
    """
    inputs = tuple(inputs)
    if surrogate.ndim == 0:
        raise ValueError("surrogate must have a leading axis of rows, got a 0-d tensor")
    values = surrogate.reshape(surrogate.shape[0], -1).sum(-1)
    rows = []
    for s in range(values.shape[0]):
        last = s == values.shape[0] - 1
        grads = torch.autograd.grad(values[s], inputs, retain_graph=not last, allow_unused=True)
        rows.append(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs, strict=True)]
        )
    return tuple(torch.stack(column) for column in zip(*rows, strict=True))


class GradientMoments(NamedTuple):
    """Exact mean and (elementwise) variance of a gradient estimator, per input."""

    mean: tuple[torch.Tensor, ...]
    variance: tuple[torch.Tensor, ...]


def gradient_estimator_moments(model, x, q, inputs, *, estimator="reparameterization"):
    r"""Exact mean and variance of a single-sample ELBO gradient estimator, by quadrature.

    Every draw is a polynomial of degree ≤ 4 in ε (log w is quadratic; the score ∇ log q is
    quadratic), so its square has degree ≤ 8 and tensor-product Gauss–Hermite quadrature of
    order 5 (exact to degree 9 per coordinate) gives

    .. math::
        \mathbb E\,\hat g = \sum_j \omega_j \hat g(\varepsilon_j),\qquad
        \operatorname{Var}\hat g = \sum_j \omega_j \big(\hat g(\varepsilon_j)
            - \mathbb E\,\hat g\big)^2

    to rounding, with 5^K nodes (keep K ≤ 6). The same ε is used for every batch element, so
    for a batch this is the estimator with common noise; for one x it is the estimator itself.
    ``inputs`` are the tensors to differentiate (q's or the model's parameters).
    """
    model, x, gq = check_call(model, x, q)
    _check_estimator(estimator)
    inputs = tuple(inputs)
    nodes, weights = gauss_hermite_noise(gq.dim, 5, dtype=gq.loc.dtype, device=gq.loc.device)
    batch = torch.Size(broadcast_batch(x=batch_shape(model, x), q=gq.loc.shape[:-1]))
    eps = nodes.reshape(-1, *([1] * len(batch)), gq.dim).expand(-1, *batch, gq.dim)
    draws = gradient_draws(_surrogate(model, x, gq, eps, estimator), inputs)
    means, variances = [], []
    for d in draws:
        w = weights.reshape(-1, *([1] * (d.ndim - 1)))
        mean = (w * d).sum(0)
        means.append(mean)
        variances.append((w * (d - mean).square()).sum(0))
    return GradientMoments(tuple(means), tuple(variances))


CLOSED_FORM_ESTIMATORS = ("reparameterization", "path_derivative")
"""The estimators whose moments in q's (m, L) :func:`closed_form_gradient_moments` gives."""


def closed_form_gradient_moments(model, x, q, *, estimator="reparameterization"):
    r"""Exact mean and variance of a gradient estimator in q's mean m and Cholesky factor L.

    For the reparameterisation and path-derivative estimators, at any K in O(K³) per batch
    element. With z = m + L_qε, the posterior N(μ, SSᵀ) and its precision Λ = S⁻ᵀS⁻¹, the
    draws are (lower triangle of L only: its upper entries are not parameters of q)

    .. math::
        \hat g_m = -v - N\varepsilon,\qquad
        \hat g_{L,ij} = \delta_{ij}/L_{ii} - (v + N\varepsilon)_i\,\varepsilon_j
            \quad (i \ge j)

    with v = Λ(m − μ), and N = ΛL (reparameterisation: ∇_z log p(x, z) = −Λ(z − μ) through
    z, ∇_L log det L = diag(1/Lᵢᵢ)) or N = ΛL − L⁻ᵀ (path derivative: ∇_z log q = −L⁻ᵀε is
    added, the score term is dropped; L⁻ᵀ is upper triangular with diagonal 1/Lᵢᵢ, which
    replaces the δᵢⱼ/Lᵢᵢ). By E εεᵀ = I and Isserlis' E εₖεₗεⱼ² = δₖₗ(1 + 2δₖⱼ),

    .. math::
        \mathbb E\,\hat g_m = -v,\quad \operatorname{Var}\hat g_{m,i} = \sum_k N_{ik}^2,
        \qquad \mathbb E\,\hat g_{L,ij} = -\tilde N_{ij},\quad
        \operatorname{Var}\hat g_{L,ij} = v_i^2 + \sum_k \tilde N_{ik}^2 + \tilde N_{ij}^2

    where Ñ = ΛL − L⁻ᵀ for the mean of both estimators (they share it: ∇ELBO) and Ñ = N in
    the variance. Ñ is formed as S⁻ᵀ(E + (B⁻¹E)ᵀ), B = S⁻¹L = I + E, which is ΛL − L⁻ᵀ without
    the cancellation of its two terms as q approaches the posterior, where the
    path-derivative variance is exactly 0.

    Returns a :class:`GradientMoments` with ``mean = (mean_m, mean_L)`` and ``variance =
    (var_m, var_L)``, of shapes (*batch, K) and (*batch, K, K) (zero above the diagonal), batch
    the broadcast of x's and q's batch shapes. Each batch element's moments are those of the
    gradient of its own surrogate; for a batch whose elements have their own q (parameters of
    shape (*batch, …)), these are the moments :func:`gradient_estimator_moments` gives for
    inputs (m, L) by quadrature (tests/test_gradients.py checks the two agree).
    """
    model, x, gq = check_call(model, x, q)
    if estimator not in CLOSED_FORM_ESTIMATORS:
        _check_estimator(estimator)
        raise ValueError(
            f"estimator must be one of {CLOSED_FORM_ESTIMATORS} for closed-form moments (the "
            f"score-function draws have degree 4 in ε: use gradient_estimator_moments), got "
            f"{estimator!r}"
        )
    with torch.no_grad():
        return _closed_form(model, x, gq, estimator)


def _closed_form(model, x, gq: Gaussian, estimator: str) -> GradientMoments:
    w = whitened(model, x, gq)
    s = model.exact(x).posterior.scale_tril
    batch = w.offset.shape[:-1]
    k = gq.dim
    s = s.expand(*batch, k, k)
    scale, excess = w.scale, w.excess

    def upper_solve(matrix):  # S⁻ᵀ @ matrix
        return torch.linalg.solve_triangular(s.mT, matrix, upper=True)

    v = upper_solve(w.offset.unsqueeze(-1)).squeeze(-1)  # Λ(m − μ) = S⁻ᵀc
    # ΛL − L⁻ᵀ = S⁻ᵀ(B − B⁻ᵀ) and B − B⁻ᵀ = E + (B⁻¹E)ᵀ, accurate relative to E.
    solved = torch.linalg.solve_triangular(scale, excess, upper=False)
    difference = upper_solve(excess + solved.mT)
    spread = upper_solve(scale) if estimator == "reparameterization" else difference
    lower = torch.ones(k, k, dtype=torch.bool, device=v.device).tril()
    row = spread.square().sum(-1)  # Σₖ Nᵢₖ²
    mean_m = -v
    var_m = row
    mean_l = -(difference * lower)
    var_l = (v.square() + row).unsqueeze(-1) + spread.square()
    var_l = var_l * lower
    return GradientMoments((mean_m, mean_l), (var_m, var_l))
