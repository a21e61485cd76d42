r"""Monte Carlo log weights, ELBO and IWAE estimates, and their exact statistics.

For q(z) = N(m, L Lᵀ) draw z = m + L ε with ε ~ N(0, I_K). The log importance weight is

    log w(z) = log p(x, z) − log q(z) = log p(x) + log p(z|x) − log q(z)

(Bayes' rule). With the exact posterior N(μ, S Sᵀ), Λ = (S Sᵀ)⁻¹ = I + G, write

    B = S⁻¹ L,    c = S⁻¹ (m − μ),    u = c + B ε = S⁻¹ (z − μ).

Then log p(z|x) − log q(z) = log det B − ½‖u‖² + ½‖ε‖², so

    log w = log p(x) + log det B + ½ (ε − u)ᵀ(ε + u).                                  (1)

Everything that depends on D (log p(x), μ) is computed once, in O(N·D·K); each sample then
costs O(K²). At q = p(z|x), B = I and c = 0, so u = ε and every log w is log p(x) to rounding.

In ε, (1) is a quadratic form, ℓ = log w − log p(x) = ½ εᵀ(I − BᵀB)ε − cᵀBε − ½‖c‖² + log det B,
so its mean and variance and the moments of w/p(x) = exp(ℓ) are Gaussian integrals:

    E ℓ   = −KL(q ‖ p(z|x))                 (the ELBO is log p(x) + E ℓ)
    Var ℓ = ½ ‖I − BᵀB‖_F² + ‖Bᵀc‖²
    E[(w/p(x))²] = det(B)² det(M)^(−½) exp(2‖L_M⁻¹ Bᵀc‖² − ‖c‖²),   M = 2BᵀB − I = L_M L_Mᵀ,

finite exactly when M ≻ 0 (equivalently 2Λ − Σ_q⁻¹ ≻ 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import MultivariateNormal

from toyvae._checks import broadcast_batch, check_count, check_finite, describe
from toyvae.bounds import check_call
from toyvae.gaussians import Gaussian, kl_from_relative, relative
from toyvae.interface import ConjugateModel, batch_shape

__all__ = [
    "LogWeightMoments",
    "chi_square_divergence",
    "iwae_estimate",
    "iwae_estimates",
    "iwae_first_order_bias",
    "log_weight_cumulants",
    "log_weight_moments",
    "log_weights",
    "log_weights_at",
]

_METHODS = ("structured", "plain")


# -- validation -------------------------------------------------------------------------------


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {describe(generator)}")


def _check_method(method) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _batch_shape(model: ConjugateModel, x: torch.Tensor, q: Gaussian) -> torch.Size:
    return torch.Size(broadcast_batch(x=batch_shape(model, x), q=q.loc.shape[:-1]))


def _standard_normal(sample_shape, model, x, q, generator) -> torch.Tensor:
    shape = (*sample_shape, *_batch_shape(model, x, q), q.dim)
    return torch.randn(shape, generator=generator, dtype=q.loc.dtype, device=q.loc.device)


def _check_noise(noise, model, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch tensor, got {describe(noise)}")
    batch = _batch_shape(model, x, q)
    event = (*batch, q.dim)
    if noise.ndim < len(event) or tuple(noise.shape[noise.ndim - len(event) :]) != event:
        raise ValueError(
            f"noise must have shape (*sample_shape, *batch, K) with (*batch, K) = {event}, "
            f"got {describe(noise)}"
        )
    noise = noise.to(dtype=q.loc.dtype, device=q.loc.device)
    check_finite(noise, "noise")
    return noise


# -- the structured form ----------------------------------------------------------------------


class Whitened(NamedTuple):
    """q seen in the exact posterior's coordinates: u = S⁻¹(z − μ) = offset + scale @ ε.

    Attributes
    ----------
    log_evidence : tensor
        log p(x), x's batch shape.
    scale : tensor
        B = S⁻¹ L, (*batch, K, K), S the posterior's and L q's Cholesky factor.
    offset : tensor
        c = S⁻¹ (m − μ), (*batch, K).
    log_det_scale : tensor
        log det B = log det L − log det S.
    kl : tensor
        KL(q ‖ p(z|x)), from the same factors.
    excess : tensor
        E = B − I, computed from the difference of the factors: accurate relative to its own
        size as q approaches the posterior.
    """

    log_evidence: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    log_det_scale: torch.Tensor
    kl: torch.Tensor
    excess: torch.Tensor


def whitened(model: ConjugateModel, x: torch.Tensor, q: Gaussian) -> Whitened:
    """The once-per-batch precomputation: log p(x) and q in the posterior's coordinates.

    Everything the Monte Carlo estimators and their exact statistics need comes from the
    model's :meth:`~toyvae.ConjugateModel.exact` answers; each sample then costs O(K²).
    """
    exact = model.exact(x)
    r = relative(q, exact.posterior)
    eye = torch.eye(q.dim, dtype=q.loc.dtype, device=q.loc.device)
    scale = r.excess + eye
    # log det B = Σ log(1 + Eᵢᵢ), accurate as q approaches the posterior.
    log_det = torch.log1p(r.excess.diagonal(dim1=-2, dim2=-1)).sum(-1)
    kl = kl_from_relative(r)
    return Whitened(exact.log_evidence, scale, r.offset, log_det, kl, r.excess)


_whitened = whitened  # the name older code imports


def _affine(offset: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """offset + scale @ ε for ε of shape (*sample_shape, *batch, K): O(K²) per sample.

    The sample axes are moved next to K so each batch element is one (S, K) @ (K, K) product.
    """
    batch_ndim = offset.ndim - 1
    event = eps.shape[eps.ndim - batch_ndim - 1 :]  # (*batch, K)
    samples = math.prod(eps.shape[: eps.ndim - batch_ndim - 1])
    flat = eps.reshape(samples, *event)  # (S, *batch, K); explicit S: a batch may be empty
    moved = flat.movedim(0, -2)  # (*batch, S, K)
    out = moved @ scale.mT + offset.unsqueeze(-2)
    return out.movedim(-2, 0).reshape(eps.shape)


def _structured_log_weights(w: Whitened, eps: torch.Tensor) -> torch.Tensor:
    """Equation (1), O(K²) per sample."""
    u = _affine(w.offset, w.scale, eps)
    half_gap = 0.5 * ((eps - u) * (eps + u)).sum(-1)  # ½(‖ε‖² − ‖u‖²), exact 0 when u = ε
    return w.log_evidence + w.log_det_scale + half_gap


def _plain_log_weights(model, x: torch.Tensor, q: Gaussian, eps: torch.Tensor):
    """log p(x, z) − log q(z) from the model's conditional densities at z = m + L ε."""
    z = q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    q_dist = MultivariateNormal(q.loc, scale_tril=q.scale_tril)
    return model.log_joint(x, z) - q_dist.log_prob(z)


def _log_weights(model, x, q: Gaussian, eps: torch.Tensor, method: str) -> torch.Tensor:
    if method == "plain":
        return _plain_log_weights(model, x, q, eps)
    return _structured_log_weights(_whitened(model, x, q), eps)


# -- public estimators ------------------------------------------------------------------------


def log_weights(model, x, q, num_samples, *, generator=None, method="structured"):
    r"""Reparameterised log importance weights log p_θ(x, z_s) − log q(z_s), z_s ~ q.

    .. math::
        z_s = m + L\varepsilon_s,\quad \varepsilon_s \sim \mathcal N(0, I_K),\qquad
        \log w_s = \log p(x) + \log\det B + \tfrac12(\varepsilon_s - u_s)^\top(\varepsilon_s + u_s)

    with B = S⁻¹L and u_s = S⁻¹(z_s − μ) in the exact posterior's coordinates (module
    docstring). Differentiable in the model's and q's parameters.

    Parameters
    ----------
    model : ConjugateModel
        A :class:`toyvae.LinearGaussian` or any other family of the interface.
    x : (..., D) tensor
        Data; (..., T, D) for a state-space model.
    q : MultivariateNormal or Independent(Normal, 1)
        Event shape (K,), batch shape broadcasting with ``x.shape[:-1]``.
    num_samples : int
    generator : torch.Generator, optional
        Source of ε; the global generator when ``None``.
    method : {"structured", "plain"}
        ``"structured"`` costs O(K²) per sample after an O(N·D·K) pass; ``"plain"`` evaluates
        the torch distributions at z, O(D·K) per sample. They agree to rounding.

    Returns
    -------
    (num_samples, *batch) tensor
    """
    model, x, gq = check_call(model, x, q)
    num_samples = check_count(num_samples, "num_samples")
    _check_generator(generator)
    _check_method(method)
    eps = _standard_normal((num_samples,), model, x, gq, generator)
    return _log_weights(model, x, gq, eps, method)


def log_weights_at(model, x, q, noise, *, method="structured"):
    r"""Log weights at given standard-normal noise: z = m + L ε for each ε in ``noise``.

    ``noise`` has shape (*sample_shape, *batch, K), where batch is the broadcast of
    ``x.shape[:-1]`` with q's batch shape. Use it for common random numbers across methods, or
    with :func:`gauss_hermite_noise` nodes for exact expectations of polynomials in ε.
    """
    model, x, gq = check_call(model, x, q)
    _check_method(method)
    eps = _check_noise(noise, model, x, gq)
    return _log_weights(model, x, gq, eps, method)


def _log_mean_exp(values: torch.Tensor, dim: int) -> torch.Tensor:
    """log((1/k) Σ exp(values)) along ``dim``, via logsumexp (no overflow or underflow)."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def iwae_estimate(model, x, q, k, *, generator=None, method="structured"):
    r"""One draw of the importance-weighted bound estimator, shape: the batch.

    .. math::
        \hat L_k = \log\frac1k\sum_{i=1}^k w_i,\qquad
        L_k = \mathbb E\,\hat L_k \le L_{k+1} \le \log p(x)

    k = 1 is the single-sample ELBO estimator (unbiased for the ELBO). Computed with logsumexp.
    """
    return iwae_estimates(model, x, q, k, 1, generator=generator, method=method)[0]


def iwae_estimates(model, x, q, k, num_estimates, *, generator=None, method="structured"):
    """``num_estimates`` independent draws of :func:`iwae_estimate`, shape (num_estimates, *batch).

    Vectorised: one (num_estimates, k, *batch) array of log weights, no Python loop.
    """
    model, x, gq = check_call(model, x, q)
    k = check_count(k, "k")
    num_estimates = check_count(num_estimates, "num_estimates")
    _check_generator(generator)
    _check_method(method)
    eps = _standard_normal((num_estimates, k), model, x, gq, generator)
    return _log_mean_exp(_log_weights(model, x, gq, eps, method), 1)


# -- exact statistics -------------------------------------------------------------------------


class LogWeightMoments(NamedTuple):
    """Exact mean and variance of log w under q; ``mean`` is the ELBO."""

    mean: torch.Tensor
    variance: torch.Tensor


def log_weight_moments(model, x, q) -> LogWeightMoments:
    r"""Exact mean and variance of log w = log p(x, z) − log q(z) for z ~ q.

    In ε, log w − log p(x) = εᵀAε + aᵀε + const with A = ½(I − BᵀB), a = −Bᵀc, so

    .. math::
        \begin{aligned}
        \mathbb E\log w &= \log p(x) - \mathrm{KL}(q\,\|\,p(z\mid x)) = \mathrm{ELBO}(q), \\
        \operatorname{Var}\log w &= 2\operatorname{tr}A^2 + \lVert a\rVert^2
            = \tfrac12\lVert I - B^\top B\rVert_F^2 + \lVert B^\top c\rVert^2
        \end{aligned}

    (E εᵀAε = tr A, Var(εᵀAε + aᵀε) = 2 tr A² + ‖a‖²). The variance is zero exactly when
    B is orthogonal and c = 0, i.e. q = p(z|x).
    """
    model, x, gq = check_call(model, x, q)
    w = whitened(model, x, gq)
    mean = w.log_evidence - w.kl
    # I − BᵀB = −(E + Eᵀ + EᵀE) with B = I + E: no cancellation near the posterior.
    spread = (w.excess + w.excess.mT + w.excess.mT @ w.excess).square().sum((-2, -1))
    shift = (w.offset.unsqueeze(-2) @ w.scale).squeeze(-2).square().sum(-1)
    return LogWeightMoments(mean, 0.5 * spread + shift)


def _log_det_identity_plus_gram(g: torch.Tensor) -> torch.Tensor:
    """log det(I + GᵀG) ≥ 0, accurate relative to itself even when GᵀG is tiny.

    For ‖G‖_F² < 0.05 by the series Σ_k (−1)^{k+1} tr(H^k)/k, H = GᵀG, whose terms after the
    twelfth are below 2e-17·tr H (tr H^k ≤ ‖H‖^{k−1} tr H for H ⪰ 0); otherwise from the
    Cholesky factor of I + H, whose absolute rounding error is then small relative to the value.
    """
    h = g.mT @ g
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    small = g.square().sum((-2, -1)) < 0.05
    hs = torch.where(small[..., None, None], h, torch.zeros_like(h))
    series, power = torch.zeros_like(small, dtype=h.dtype), eye.expand_as(hs)
    for k in range(1, 13):
        power = power @ hs
        series = series + (-1) ** (k + 1) * power.diagonal(dim1=-2, dim2=-1).sum(-1) / k
    direct = 2 * torch.linalg.cholesky(eye + h).diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return torch.where(small, series, direct)


def _log_second_moment(w: Whitened) -> torch.Tensor:
    """log E_q[(w/p(x))²] ≥ 0, +inf where M = 2BᵀB − I is not positive definite.

    With B = I + E, F = BᵀB − I = E + Eᵀ + EᵀE and F' = BBᵀ − I = E + Eᵀ + EEᵀ (both accurate
    relative to their own size), M = I + 2F and M' = 2BBᵀ − I = I + 2F', the closed form of
    :func:`chi_square_divergence` rearranges (the matrices are functions of BᵀB, so they
    commute; and B M⁻¹ Bᵀ = (I + M'⁻¹)/2 by push-through) into two non-negative terms,

        2 log det B − ½ log det M = ½ log det(I + F M⁻¹ F),
        2 cᵀB M⁻¹Bᵀc − ‖c‖²       = cᵀ M'⁻¹ c,

    neither a difference of O(1) numbers, so χ² keeps its relative accuracy as q approaches
    the posterior and is never negative.
    """
    e = w.excess
    eye = torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)
    f = e + e.mT + e.mT @ e
    f_prime = e + e.mT + e @ e.mT
    m, m_prime = eye + 2 * f, eye + 2 * f_prime
    factor, info = torch.linalg.cholesky_ex(m)
    finite = info == 0  # M and M' have the same eigenvalues: one test serves both
    # Re-factor harmless matrices where M fails, so no NaN reaches values or gradients.
    safe = finite[..., None, None]
    factor = torch.linalg.cholesky(torch.where(safe, m, eye))
    factor_prime = torch.linalg.cholesky(torch.where(safe, m_prime, eye))
    g = torch.linalg.solve_triangular(
        factor, torch.where(safe, f, torch.zeros_like(f)), upper=False
    )
    offset = w.offset.unsqueeze(-1).expand(*factor_prime.shape[:-1], 1)
    solved = torch.linalg.solve_triangular(factor_prime, offset, upper=False).squeeze(-1)
    value = 0.5 * _log_det_identity_plus_gram(g) + solved.square().sum(-1)
    value, finite = torch.broadcast_tensors(value, finite)
    return torch.where(finite, value, torch.full_like(value, math.inf))


def chi_square_divergence(model, x, q) -> torch.Tensor:
    r"""χ²(p(z|x) ‖ q) = E_q[(w/p(x))²] − 1 = Var_q(w) / p(x)², exactly; +inf where infinite.

    .. math::
        \mathbb E_q\Big[\Big(\frac{w}{p(x)}\Big)^2\Big] = \int\frac{p(z\mid x)^2}{q(z)}\,dz
            = \frac{(\det B)^2}{\sqrt{\det M}}\exp\big(2 c^\top B M^{-1}B^\top c
            - \lVert c\rVert^2\big),\qquad M = 2B^\top B - I

    The integral is finite iff M ≻ 0, i.e. 2Λ − Σ_q⁻¹ ≻ 0: q must not be much narrower than
    the posterior in any direction. Where it is not, the result is ``inf`` (never NaN).
    """
    model, x, gq = check_call(model, x, q)
    return torch.expm1(_log_second_moment(whitened(model, x, gq)))


def iwae_first_order_bias(model, x, q, k) -> torch.Tensor:
    r"""The first-order IWAE bias, log p(x) − L_k ≈ Var_q(w) / (2k p(x)²) = χ² / (2k).

    From log R = (R−1) − ½(R−1)² + O((R−1)³) with R = (1/k)Σ w_i/p(x), E R = 1 and
    Var R = χ²/k; exact as k → ∞: k (log p(x) − L_k) → χ²/2 when the moments exist.
    """
    k = check_count(k, "k")
    return chi_square_divergence(model, x, q) / (2 * k)


def log_weight_cumulants(model, x, q) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact second and fourth cumulants (κ₂, κ₄) of log w = log p(x, z) − log q(z), z ~ q.

    In the noise ε of z = m + Lε, log w − log p(x) = εᵀAε + bᵀε + const, a Gaussian quadratic
    form with A = ½(I − BᵀB) and b = −Bᵀc (module docstring). Its cumulant generating function

    .. math::
        \log\mathbb E\, e^{t(\varepsilon^\top A\varepsilon + b^\top\varepsilon)}
            = -\tfrac12\log\det(I - 2tA) + \tfrac12 t^2\, b^\top(I - 2tA)^{-1} b

    has Taylor coefficients κ_r = 2^{r−1}(r−1)! tr A^r + r!·2^{r−3} bᵀA^{r−2}b (r ≥ 2), so

    .. math::
        \kappa_2 = 2\operatorname{tr}A^2 + \lVert b\rVert^2
            = \operatorname{Var}\log w,\qquad
        \kappa_4 = 48\big(\operatorname{tr}A^4 + b^\top A^2 b\big)

    and the squared deviation (log w − ELBO)² has mean κ₂ and variance κ₄ + 2κ₂²: what a
    Monte Carlo check of :func:`log_weight_moments`' variance needs. Every term is non-negative
    (A is symmetric), so neither cumulant suffers cancellation. Both are zero exactly when
    q = p(z|x).

    Returns
    -------
    (kappa2, kappa4) : tensors
        Each of the broadcast batch shape of x and q.
    """
    model, x, gq = check_call(model, x, q)
    w = whitened(model, x, gq)
    # A = ½(I − BᵀB) = −½(E + Eᵀ + EᵀE) with B = I + E: no cancellation near the posterior.
    a = -0.5 * (w.excess + w.excess.mT + w.excess.mT @ w.excess)
    b = -(w.offset.unsqueeze(-2) @ w.scale).squeeze(-2)
    a2 = a @ a
    kappa2 = 2 * a2.diagonal(dim1=-2, dim2=-1).sum(-1) + b.square().sum(-1)
    kappa4 = 48 * ((a2 * a2.mT).sum((-2, -1)) + (b.unsqueeze(-2) @ a2 @ b.unsqueeze(-1))[..., 0, 0])
    batch = _batch_shape(model, x, gq)
    return kappa2.expand(batch), kappa4.expand(batch)
