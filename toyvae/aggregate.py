r"""The aggregate posterior q_φ(z) = E_{q(x)} q_φ(z|x), ELBO surgery, and the joint KL.

A linear-Gaussian encoder q_φ(z|x) = N(Vx + c, S) with an x-independent covariance S = L_S L_Sᵀ
maps a Gaussian data distribution q(x) = N(m, C) to a Gaussian aggregate posterior

    q_φ(z) = N(V m + c, V C Vᵀ + S),

and an empirical data set {x_n} to the mixture (1/N) Σ_n N(V x_n + c, S). Against the prior
p(z) = N(0, I) the average KL splits exactly (Hoffman & Johnson 2016, "ELBO surgery"):

    E_{q(x)} KL(q_φ(z|x) ‖ p(z)) = I_q(x; z) + KL(q_φ(z) ‖ p(z)).

With the generative joint p_θ(x, z) = p(z) p_θ(x|z) and the inference joint
q_φ(x, z) = q(x) q_φ(z|x):

    KL(q_φ(x, z) ‖ p_θ(x, z)) = −E_{q(x)} ELBO(x) − H[q(x)].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import MultivariateNormal

from toyvae._checks import (
    as_tensor,
    check_count,
    check_finite,
    check_last_dim,
    check_ndim,
    cholesky,
)
from toyvae.encoder import LinearGaussianEncoder, _check_encoder, _check_model
from toyvae.gaussians import LOG_2PI, Gaussian, _entropy, _kl, as_gaussian, standard_normal
from toyvae.model import LinearGaussian

# LinearGaussianEncoder lives in toyvae.encoder; importable from here, as it always was.
__all__ = [
    "Estimate",
    "Surgery",
    "aggregate_kl_to_prior",
    "aggregate_posterior",
    "elbo_surgery",
    "empirical_aggregate_log_density",
    "empirical_elbo_surgery",
    "expected_elbo",
    "joint_kl",
]


class Estimate(NamedTuple):
    """A Monte Carlo estimate and its standard error (the standard deviation of the estimate)."""

    value: torch.Tensor
    standard_error: torch.Tensor


class Surgery(NamedTuple):
    """E_{q(x)} KL(q(z|x) ‖ p(z)) = mutual_information + marginal_kl (ELBO surgery).

    For an empirical data set, ``mutual_information`` and ``marginal_kl`` are :class:`Estimate`
    objects; for Gaussian data, all three are exact tensors.
    """

    average_kl: torch.Tensor
    mutual_information: torch.Tensor | Estimate
    marginal_kl: torch.Tensor | Estimate


def _check_data(encoder: LinearGaussianEncoder, data) -> Gaussian:
    """q(x) as a canonical Gaussian in the encoder's dtype, with a single (empty) batch shape."""
    _check_encoder(encoder)
    g = as_gaussian(data, "data", dim=encoder.data_dim)
    if g.loc.ndim != 1:
        raise ValueError(
            f"data must be one Gaussian over x (batch shape ()), got batch shape "
            f"{tuple(g.loc.shape[:-1])}"
        )
    like = encoder.weight
    return Gaussian(g.loc.to(like.dtype), g.scale_tril.to(like.dtype))


def _aggregate(encoder: LinearGaussianEncoder, data: Gaussian) -> Gaussian:
    # z = V x + c + L_S ε with x = m + L_C η: covariance (V L_C)(V L_C)ᵀ + L_S L_Sᵀ.
    spread = encoder.weight @ data.scale_tril
    covariance = spread @ spread.mT + encoder.scale_tril @ encoder.scale_tril.mT
    return Gaussian(encoder._mean(data.loc), cholesky(covariance, "the aggregate covariance"))


def aggregate_posterior(encoder: LinearGaussianEncoder, data) -> MultivariateNormal:
    r"""The aggregate posterior of a Gaussian data distribution, exactly.

    .. math::
        q_\phi(z) = \int q(x)\, q_\phi(z\mid x)\, dx
            = \mathcal N\big(Vm + c,\; V C V^\top + L_S L_S^\top\big)
        \quad\text{for } q(x) = \mathcal N(m, C).

    Parameters
    ----------
    encoder : LinearGaussianEncoder
    data : MultivariateNormal or Independent(Normal, 1)
        q(x), event shape (D,), batch shape ().
    """
    g = _aggregate(encoder, _check_data(encoder, data))
    return MultivariateNormal(g.loc, scale_tril=g.scale_tril)


def aggregate_kl_to_prior(encoder: LinearGaussianEncoder, data) -> torch.Tensor:
    r"""KL(q_φ(z) ‖ N(0, I)) for Gaussian data, exactly; zero iff q_φ(z) is the prior."""
    g = _aggregate(encoder, _check_data(encoder, data))
    return _kl(g, standard_normal(g.dim, g.loc.dtype, g.loc.device))


def elbo_surgery(encoder: LinearGaussianEncoder, data) -> Surgery:
    r"""ELBO surgery for Gaussian data q(x) = N(m, C), every term exact.

    .. math::
        \underbrace{\mathbb E_{q(x)}\mathrm{KL}(q_\phi(z\mid x)\,\|\,p(z))}_{\texttt{average\_kl}}
        = \underbrace{\tfrac12\log\frac{\det(VCV^\top + S)}{\det S}}_{I_q(x;z)}
        + \underbrace{\mathrm{KL}(q_\phi(z)\,\|\,p(z))}_{\texttt{marginal\_kl}}

    The average KL is KL(q(z|m) ‖ p) + ½ tr(V C Vᵀ), since the KL to N(0, I) is ½‖mean‖² plus
    terms that do not depend on x. The mutual information is H[q(z)] − H[q(z|x)]. The three
    are computed separately, so their sum is a check.
    """
    g = _check_data(encoder, data)
    conditional = Gaussian(encoder._mean(g.loc), encoder.scale_tril)
    prior = standard_normal(encoder.latent_dim, g.loc.dtype, g.loc.device)
    spread = encoder.weight @ g.scale_tril
    average_kl = _kl(conditional, prior) + 0.5 * spread.square().sum()
    aggregate = _aggregate(encoder, g)
    information = 0.5 * (aggregate.log_det_cov() - conditional.log_det_cov())
    return Surgery(average_kl, information, _kl(aggregate, prior))


# -- empirical data: the aggregate posterior is a Gaussian mixture ------------------------------


def _check_points(encoder: LinearGaussianEncoder, x) -> torch.Tensor:
    _check_encoder(encoder)
    x = encoder._check_x(x)
    check_ndim(x, "x", (2,), "an (N, D) data set")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one data point, got an empty (0, D) data set")
    return x


def _component_log_densities(encoder: LinearGaussianEncoder, means, z) -> torch.Tensor:
    """log N(z; means_n, S) for z (..., K) and means (N, K): shape (..., N)."""
    diff = (z.unsqueeze(-2) - means).unsqueeze(-1)
    solved = torch.linalg.solve_triangular(encoder.scale_tril, diff, upper=False).squeeze(-1)
    log_det = 2 * encoder.scale_tril.diagonal().log().sum()
    return -0.5 * (encoder.latent_dim * LOG_2PI + log_det + solved.square().sum(-1))


def empirical_aggregate_log_density(encoder: LinearGaussianEncoder, x, z) -> torch.Tensor:
    r"""log q_φ(z) for the empirical data set x (N, D), exactly: a log-mean-exp over N components.

    .. math::
        \log q_\phi(z) = \log \frac1N \sum_{n=1}^N \mathcal N(z;\, V x_n + c,\, S)

    ``z`` has shape (..., K); the result has shape ``z.shape[:-1]``.
    """
    x = _check_points(encoder, x)
    z = as_tensor(z, "z", like=encoder.weight)
    check_last_dim(z, "z", encoder.latent_dim, "the encoder's latent dimension K")
    check_finite(z, "z")
    components = _component_log_densities(encoder, encoder._mean(x), z)
    return torch.logsumexp(components, -1) - math.log(x.shape[0])


def _stratified(terms: torch.Tensor) -> Estimate:
    """Mean over (M, N) terms, drawn M per stratum n; standard error Σ_n s_n² / (N² M)."""
    m, n = terms.shape
    variance = terms.var(0, correction=1).sum() / (n * n * m)
    return Estimate(terms.mean(), variance.sqrt())


def empirical_elbo_surgery(
    encoder: LinearGaussianEncoder,
    x,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> Surgery:
    r"""ELBO surgery for an empirical data set x (N, D): q(x) uniform on the N points.

    ``average_kl`` = (1/N) Σ_n KL(q(z|x_n) ‖ p(z)) is exact. The other two terms are Monte Carlo
    estimates from ``num_samples`` draws z ~ q(z|x_n) for each n (stratified over n):

    .. math::
        I_q(x; z) = \mathbb E_n \mathbb E_{q(z|x_n)}[\log q(z\mid x_n) - \log q_\phi(z)],
        \qquad
        \mathrm{KL}(q_\phi(z)\,\|\,p(z))
            = \mathbb E_n \mathbb E_{q(z|x_n)}[\log q_\phi(z) - \log p(z)]

    with log q_φ(z) the exact mixture density. Each comes with its standard error. Exact bounds
    hold: 0 ≤ I ≤ log N, since x is one of N equally likely points.
    """
    x = _check_points(encoder, x)
    num_samples = check_count(num_samples, "num_samples", 2, " (for a standard error)")
    means = encoder._mean(x)
    prior = standard_normal(encoder.latent_dim, means.dtype, means.device)
    average_kl = _kl(Gaussian(means, encoder.scale_tril), prior).mean()
    eps = torch.randn(
        num_samples, *means.shape, dtype=means.dtype, device=means.device, generator=generator
    )
    z = means + eps @ encoder.scale_tril.mT  # (M, N, K): z[:, n] ~ q(z|x_n)
    components = _component_log_densities(encoder, means, z)  # (M, N, N)
    log_conditional = components.diagonal(dim1=-2, dim2=-1)  # log q(z|x_n) at its own draws
    log_aggregate = torch.logsumexp(components, -1) - math.log(x.shape[0])
    log_prior = -0.5 * (encoder.latent_dim * LOG_2PI + z.square().sum(-1))
    return Surgery(
        average_kl,
        _stratified(log_conditional - log_aggregate),
        _stratified(log_aggregate - log_prior),
    )


# -- the joint view -----------------------------------------------------------------------------


def _check_pair(model, encoder) -> None:
    _check_model(model)
    _check_encoder(encoder)
    if (encoder.data_dim, encoder.latent_dim) != (model.data_dim, model.latent_dim):
        raise ValueError(
            f"encoder must map the model's D = {model.data_dim} to its K = {model.latent_dim}, "
            f"got an encoder with D = {encoder.data_dim}, K = {encoder.latent_dim}"
        )


def _expected_elbo(model: LinearGaussian, encoder: LinearGaussianEncoder, data: Gaussian):
    # The ELBO is a quadratic in x. Its x-dependent squared norms are ‖r̃ − W̃(Vx + c)‖² and
    # ‖Vx + c‖², both ‖A x + a‖² with A = L_Ψ⁻¹(I − WV) and A = V; under x ~ N(m, C) each adds
    # tr(A C Aᵀ) = ‖A L_C‖_F² to its value at x = m.
    at_mean = Gaussian(encoder._mean(data.loc), encoder.scale_tril)
    prior = as_gaussian(model.prior(), "the model's prior")
    value = model.expected_log_likelihood(data.loc, at_mean) - _kl(at_mean, prior)
    eye = torch.eye(model.data_dim, dtype=data.loc.dtype, device=data.loc.device)
    decoded = (eye - model.weight @ encoder.weight) @ data.scale_tril  # (I − WV) L_C
    misfit = model.noise.whiten_columns(decoded)  # L_Ψ⁻¹ (I − WV) L_C
    spread = encoder.weight @ data.scale_tril
    return value - 0.5 * (misfit.square().sum() + spread.square().sum())


def expected_elbo(model: LinearGaussian, encoder: LinearGaussianEncoder, data) -> torch.Tensor:
    r"""E_{q(x)} ELBO(x, q_φ(z|x)) for Gaussian data q(x) = N(m, C), exactly.

    .. math::
        \mathbb E_{q(x)}\mathrm{ELBO} = \mathrm{ELBO}(m, q_\phi(z\mid m))
            - \tfrac12\big[\lVert L_\Psi^{-1}(I - WV)L_C\rVert_F^2 + \lVert V L_C\rVert_F^2\big]
    """
    _check_pair(model, encoder)
    return _expected_elbo(model, encoder, _check_data(encoder, data))


def joint_kl(model: LinearGaussian, encoder: LinearGaussianEncoder, data) -> torch.Tensor:
    r"""KL(q(x) q_φ(z|x) ‖ p(z) p_θ(x|z)) for Gaussian data, exactly.

    .. math::
        \mathrm{KL}\big(q_\phi(x, z)\,\|\,p_\theta(x, z)\big)
            = -\mathbb E_{q(x)}\mathrm{ELBO}(x) - H[q(x)]
            = \mathrm{KL}(q(x)\,\|\,p_\theta(x))
            + \mathbb E_{q(x)}\mathrm{KL}(q_\phi(z|x)\,\|\,p_\theta(z|x))

    Zero exactly when the model's marginal is the data distribution and the encoder is the
    exact posterior.
    """
    _check_pair(model, encoder)
    g = _check_data(encoder, data)
    return -_expected_elbo(model, encoder, g) - _entropy(g)
