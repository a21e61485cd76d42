r"""The linear-Gaussian model p(z) = N(m₀, P₀), p(x|z) = N(Wz + b, Ψ): exact evidence and posterior.

Everything is computed in *whitened* coordinates. With the prior z = m₀ + L₀ u, u ~ N(0, I)
(P₀ = L₀L₀ᵀ; by default m₀ = 0, L₀ = I) and Ψ = L_Ψ L_Ψᵀ, write Ã = L_Ψ⁻¹ W L₀ and
r̃ = L_Ψ⁻¹ (x − b − W m₀). Then the posterior precision of u is Λ = I_K + ÃᵀÃ (a K×K matrix
that does not depend on x), its posterior mean is μ = Λ⁻¹ Ãᵀ r̃, and by completing the square

    log p(x) = −½ [D log 2π + log det Ψ + log det Λ + ‖r̃ − Ã μ‖² + ‖μ‖²].

The posterior of z is N(m₀ + L₀ μ, L₀ Λ⁻¹ L₀ᵀ), with Cholesky factor L₀ S for S Sᵀ = Λ⁻¹.
When D ≤ K, log det Ψ + log det Λ is computed as the log det of the marginal covariance
C = W P₀ Wᵀ + Ψ from a QR of [(W L₀)ᵀ; L_Ψᵀ]: with small noise the two terms would cancel.
For isotropic or diagonal Ψ, L_Ψ is a vector of square roots, so no D×D matrix is formed
when D > K: the cost is O(N·D·K + D·K² + K³).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
)

from toyvae._checks import (
    as_tensor,
    broadcast_batch,
    check_affine_map,
    check_finite,
    check_last_dim,
    describe,
)
from toyvae._frozen import Frozen
from toyvae._linalg import solve_rows
from toyvae.gaussians import LOG_2PI, Gaussian, _kl, as_gaussian, standard_normal
from toyvae.interface import Exact
from toyvae.noise import noise_covariance

__all__ = ["LinearGaussian"]

# log_evidence processes the rows of x in blocks of about this many entries (1 MiB in float64):
# small enough for cache and for the allocator to recycle, large enough that per-block overhead
# (and, with intra-op threads, per-block synchronisation) stays small. See benchmarks/README.md.
_BLOCK_ELEMENTS = 2**17


class _Factors(NamedTuple):
    """The x-independent quantities every exact computation needs, computed once per call."""

    whitened_weight: torch.Tensor  # Ã = L_Ψ⁻¹ W L₀, (D, K)
    mean_map: torch.Tensor  # Q₁J (D, K): μ = S (Q₁J)ᵀ r̃, from the QR of [ÃJ; J]
    precision_tril: torch.Tensor  # lower Lr with Λ = I + ÃᵀÃ = Lrᵀ Lr
    posterior_scale_tril: torch.Tensor  # lower S = Lr⁻¹, so S Sᵀ = Λ⁻¹
    log_det_marginal: torch.Tensor  # log det C = log det Ψ + log det Λ, C = W P₀ Wᵀ + Ψ
    marginal_factor: torch.Tensor | None  # upper R_C with C = R_Cᵀ R_C, for D ≤ K only
    bias: torch.Tensor  # b + W m₀: the mean of x


class LinearGaussian(Frozen):
    r"""Linear-Gaussian latent variable model (probabilistic PCA, factor analysis).

    .. math::
        p(z) = \mathcal N(m_0, P_0), \qquad p_\theta(x\mid z) = \mathcal N(Wz + b, \Psi)

    with the standard prior m₀ = 0, P₀ = I_K unless ``prior`` is given.

    Parameters
    ----------
    weight : (D, K) tensor or array
        Loading matrix W. Its dtype and device are the model's (NumPy becomes float64).
    bias : (D,) tensor or array, optional
        Offset b; zeros when ``None``.
    noise_variance : float, 0-d, (D,) or (D, D) tensor or array
        Noise **variance** Ψ: a scalar σ² (isotropic, probabilistic PCA), a vector of
        variances (diagonal, factor analysis) or a full symmetric positive-definite covariance.
    prior : MultivariateNormal, optional
        A Gaussian prior p(z) with event shape (K,) and no batch shape; N(0, I_K) when ``None``.

    The model is immutable: its attributes cannot be reassigned, and a parameter tensor
    modified in place after construction (an optimizer step, an edit of Ψ's upper triangle)
    makes every later call raise ``RuntimeError`` instead of silently computing with stale or
    inconsistent values. Build a new model from the updated parameters (cheap: nothing is
    factored at construction but for validation). Parameters may require grad; every method
    is differentiable in them, including through a dtype conversion.
    """

    def __init__(self, weight, bias=None, noise_variance=1.0, *, prior=None):
        given = {"weight": weight, "bias": bias, "noise_variance": noise_variance}
        weight, bias = check_affine_map(weight, bias, "D", "K")
        d, k = weight.shape
        noise = noise_covariance(as_tensor(noise_variance, "noise_variance", like=weight), d)
        if prior is None:
            prior_loc = prior_tril = None
        else:
            prior_loc, prior_tril = _check_prior(prior, k, weight)
            given["prior.loc"], given["prior.scale_tril"] = prior.loc, prior.scale_tril
        self._freeze(
            given,
            weight=weight,
            bias=bias,
            noise=noise,
            prior_loc=prior_loc,
            prior_tril=prior_tril,
        )

    def __repr__(self) -> str:
        prior = "" if self._prior_tril is None else ", prior=Gaussian"
        return (
            f"LinearGaussian(data_dim={self.data_dim}, latent_dim={self.latent_dim}, "
            f"noise={self.noise_kind}{prior}, dtype={self.dtype})"
        )

    # -- attributes ---------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """W, (D, K)."""
        return self._weight

    @property
    def bias(self) -> torch.Tensor:
        """b, (D,)."""
        return self._bias

    @property
    def noise(self):
        """Ψ as a noise object (:mod:`toyvae.noise`): isotropic, diagonal or full."""
        return self._noise

    @property
    def noise_variance(self) -> torch.Tensor:
        """Ψ as given: 0-d, (D,) or (D, D), in the model's dtype."""
        return self._noise.variance

    @property
    def noise_kind(self) -> str:
        """``"isotropic"``, ``"diagonal"`` or ``"full"``."""
        return self._noise.kind

    @property
    def data_dim(self) -> int:
        """D, the dimension of x."""
        return self._weight.shape[0]

    @property
    def latent_dim(self) -> int:
        """K, the dimension of z."""
        return self._weight.shape[1]

    @property
    def data_event_shape(self) -> torch.Size:
        """(D,): one observation is a vector."""
        return torch.Size([self.data_dim])

    @property
    def term_count(self) -> int:
        """D + K: the number of terms in each exact quantity's sums (for tolerances)."""
        return self.data_dim + self.latent_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._weight.dtype

    @property
    def device(self) -> torch.device:
        return self._weight.device

    # -- the prior ----------------------------------------------------------------------------

    def _prior(self) -> Gaussian:
        if self._prior_tril is None:
            return standard_normal(self.latent_dim, self.dtype, self.device)
        return Gaussian(self._prior_loc, self._prior_tril)

    def prior(self) -> MultivariateNormal:
        """p(z): N(0, I_K), or the Gaussian prior given at construction."""
        self._verify()
        p = self._prior()
        return MultivariateNormal(p.loc, scale_tril=p.scale_tril)

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        """u = L₀⁻¹ (z − m₀) for z (..., K)."""
        if self._prior_tril is None:
            return z
        return solve_rows(self._prior_tril, z - self._prior_loc)

    def _destandardise(self, u: Gaussian) -> Gaussian:
        """N(m₀ + L₀ μ_u, L₀ S_u S_uᵀ L₀ᵀ) from N(μ_u, S_u S_uᵀ); L₀ S_u stays lower triangular."""
        if self._prior_tril is None:
            return u
        return Gaussian(
            self._prior_loc + u.loc @ self._prior_tril.mT, self._prior_tril @ u.scale_tril
        )

    # -- input checks -------------------------------------------------------------------------

    def check_data(self, x, name: str = "x") -> torch.Tensor:
        """x as a finite (..., D) tensor in the model's dtype, or ``ValueError``/``TypeError``."""
        x = as_tensor(x, name, like=self._weight)
        check_last_dim(x, name, self.data_dim, "the model's data dimension D")
        check_finite(x, name)
        return x

    _check_x = check_data

    def _check_z(self, z, name: str = "z") -> torch.Tensor:
        z = as_tensor(z, name, like=self._weight)
        check_last_dim(z, name, self.latent_dim, "the model's latent dimension K")
        check_finite(z, name)
        return z

    # -- factors ------------------------------------------------------------------------------

    def _factors(self) -> _Factors:
        self._verify()
        weight, bias = self._weight, self._bias
        if self._prior_tril is not None:
            bias = bias + weight @ self._prior_loc
            weight = weight @ self._prior_tril
        whitened = self._noise.whiten_columns(weight)
        mean_map, precision_tril = _stacked_qr(whitened)
        eye = torch.eye(self.latent_dim, dtype=whitened.dtype, device=whitened.device)
        scale_tril = torch.linalg.solve_triangular(precision_tril, eye, upper=False)
        if self.data_dim > self.latent_dim:
            marginal = None
            log_det = self._noise.log_det() + 2 * precision_tril.diagonal().log().sum()
        else:
            # D ≤ K: with small noise log det Ψ and log det Λ are each about D·|log σ²| and
            # cancel to an O(1) log det C, losing as many ulps, and the whitened route's
            # quadratic form carries eps·‖Ã‖ (in float32, most of its digits). C = MᵀM with
            # M = [(W L₀)ᵀ; L_Ψᵀ], whose QR ((K + D) × D, no larger than Λ's) gives both.
            stacked = torch.cat([weight.mT, self._noise.tril().mT], dim=-2)
            marginal = torch.linalg.qr(stacked).R
            log_det = 2 * marginal.diagonal().abs().log().sum()
        return _Factors(whitened, mean_map, precision_tril, scale_tril, log_det, marginal, bias)

    def _posterior_u(self, x: torch.Tensor, factors: _Factors) -> tuple[torch.Tensor, Gaussian]:
        """The whitened residual r̃ and the posterior of u, N(S (Q₁J)ᵀ r̃, S Sᵀ), for rows x.

        μ = Λ⁻¹Ãᵀr̃ is the least-squares solution of [Ã; I] μ ≈ [r̃; 0], read off the QR
        factors: its error grows with κ([Ã; I]) = √κ(Λ), not with κ(Λ) as the normal equations'.
        """
        residual = self._noise.whiten(x - factors.bias)
        s = factors.posterior_scale_tril
        mean = (residual @ factors.mean_map) @ s.mT
        return residual, Gaussian(mean, s.expand(*mean.shape, self.latent_dim))

    # -- distributions ------------------------------------------------------------------------

    def likelihood(self, z) -> Independent | MultivariateNormal:
        """p(x|z) = N(Wz + b, Ψ), batch shape ``z.shape[:-1]``."""
        self._verify()
        z = self._check_z(z)
        return self._noise.distribution(z @ self._weight.mT + self._bias)

    def marginal(self) -> LowRankMultivariateNormal | MultivariateNormal:
        """p(x) = N(b + W m₀, W P₀ Wᵀ + Ψ): low-rank plus diagonal, or dense for full Ψ."""
        self._verify()
        weight, bias = self._weight, self._bias
        if self._prior_tril is not None:
            bias = bias + weight @ self._prior_loc
            weight = weight @ self._prior_tril
        if self.noise_kind == "full":
            return MultivariateNormal(
                bias, covariance_matrix=weight @ weight.mT + self._noise.variance
            )
        diag = self._noise.variance.expand(self.data_dim)
        return LowRankMultivariateNormal(bias, cov_factor=weight, cov_diag=diag)

    # -- exact quantities ---------------------------------------------------------------------

    def posterior(self, x) -> MultivariateNormal:
        r"""The exact posterior p(z|x) = N(μ(x), Σ), batch shape ``x.shape[:-1]``.

        .. math::
            \Sigma = (P_0^{-1} + W^\top\Psi^{-1}W)^{-1}, \qquad
            \mu(x) = m_0 + \Sigma W^\top \Psi^{-1}(x - b - W m_0)

        Σ does not depend on x; it is factored once per call.
        """
        post = self.exact(self.check_data(x)).posterior
        return post.distribution()

    def exact(self, x: torch.Tensor) -> Exact:
        """log p(x) and p(z|x) for a checked x (the :class:`toyvae.ConjugateModel` method)."""
        factors = self._factors()
        _, post = self._posterior_u(x, factors)
        if not bool(torch.isfinite(post.loc).all()):
            raise ValueError(
                "x is so far from the model's mean that its posterior mean overflows float64: "
                f"the largest |x| entry is {x.detach().abs().max().item():.3g}"
            )
        return Exact(self._log_evidence(x, factors), self._destandardise(post))

    def log_evidence(self, x) -> torch.Tensor:
        r"""log p_θ(x) = log N(x; b + W m₀, W P₀ Wᵀ + Ψ), shape ``x.shape[:-1]``.

        .. math::
            \log p(x) = -\tfrac12\big[D\log 2\pi + \log\det\Psi + \log\det\Lambda
                + \lVert\tilde r - \tilde W\mu\rVert^2 + \lVert\mu\rVert^2\big]

        with Λ = I + W̃ᵀW̃, W̃ = L_Ψ⁻¹WL₀, r̃ = L_Ψ⁻¹(x − b − Wm₀), μ the posterior mean of
        u = L₀⁻¹(z − m₀). The two squared norms are the quadratic form of the marginal written as
        a sum of non-negative terms (completing the square), so no cancellation occurs; for
        D ≤ K, log det Ψ + log det Λ is computed as log det(W P₀ Wᵀ + Ψ), which does not cancel
        either.
        """
        return self._log_evidence(self.check_data(x), self._factors())

    def _log_evidence(self, x: torch.Tensor, factors: _Factors) -> torch.Tensor:
        rows = x.reshape(-1, self.data_dim)
        # Blocks of about _BLOCK_ELEMENTS entries: each block's (B, D) temporaries stay in cache
        # and are recycled by the allocator. Whole (N, D) temporaries cost more in fresh pages
        # than in arithmetic (benchmarks/README.md).
        block = max(1, _BLOCK_ELEMENTS // self.data_dim)
        quadratic = torch.cat([self._quadratic(part, factors) for part in rows.split(block)])
        constant = self.data_dim * LOG_2PI + factors.log_det_marginal
        return -0.5 * (constant + quadratic.reshape(x.shape[:-1]))

    def _quadratic(self, x: torch.Tensor, factors: _Factors) -> torch.Tensor:
        """The marginal's quadratic form (x − b)ᵀC⁻¹(x − b) for rows x (B, D): ‖R_C⁻ᵀ(x − b)‖²
        for D ≤ K, else ‖r̃ − W̃μ‖² + ‖μ‖²."""
        if factors.marginal_factor is not None:
            whitened = solve_rows(factors.marginal_factor.mT, x - factors.bias)
            quadratic = whitened.square().sum(-1)
        else:
            residual, post = self._posterior_u(x, factors)
            # r̃ − μ W̃ᵀ in one fused product-and-add.
            misfit = torch.addmm(residual, post.loc, factors.whitened_weight.mT, alpha=-1)
            quadratic = misfit.square().sum(-1) + post.loc.square().sum(-1)
        # Inputs and parameters are finite, so a NaN here can only come from an overflow (x near
        # float64's largest number: inf − inf or inf·0 in the residual or the posterior mean).
        # The quadratic form, at least ‖μ‖², then overflows in exact arithmetic too, and
        # log p(x) = −inf is its correct rounding. Checked on the (B,) result, not the (B, D) data.
        overflow = torch.isnan(quadratic)
        return torch.where(overflow, torch.full_like(quadratic, torch.inf), quadratic)

    def expected_log_likelihood(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        r"""E_q log p(x|z) for a checked x and canonical q (the interface method).

        .. math::
            -\tfrac12\big[D\log 2\pi + \log\det\Psi + \lVert L_\Psi^{-1}(x - b - Wm)\rVert^2
                + \operatorname{tr}(W^\top\Psi^{-1}W\,S)\big],\qquad q = \mathcal N(m, S)

        Computed from W directly, not from the posterior: the ELBO's own route.
        """
        self._verify()
        whitened = self._noise.whiten_columns(self._weight)
        misfit = self._noise.whiten(x - self._bias) - q.loc @ whitened.mT
        # tr(G S) = ‖R L_q‖_F², R the triangular factor of Ã = QR (‖Ã L_q‖ = ‖R L_q‖): a sum of
        # squares. As Σᵢⱼ Gᵢⱼ Sᵢⱼ it would cancel: with small noise and K > D, entries of
        # G ≈ 1e12 times entries of S ≈ 1 that sum to O(D), losing 12 digits. The value is the
        # QR form's; the derivative is the Gram form's (the same function, so the same
        # derivative), because the QR's backward pass is undefined when Ã is rank-deficient
        # (a constant feature, a square W with a zero row).
        gram_form = ((whitened.mT @ whitened) * q.covariance()).sum((-2, -1))
        with torch.no_grad():
            factor = torch.linalg.qr(whitened).R  # (min(D, K), K)
            qr_form = (factor @ q.scale_tril).square().sum((-2, -1))
        spread = gram_form + (qr_form - gram_form).detach()
        constant = self.data_dim * LOG_2PI + self._noise.log_det()
        return -0.5 * (constant + misfit.square().sum(-1) + spread)

    def elbo(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        r"""ELBO(q) for a checked x and canonical q, summed so that nothing cancels near p(z|x).

        In the prior's standard coordinates u (q_u = N(m, S), S = L_S L_Sᵀ),

        .. math::
            \mathrm{ELBO} = -\tfrac12\big[D\log 2\pi + \log\det\Psi + \log\det\Lambda
                + \lVert\tilde r - \tilde W m\rVert^2 + \lVert m\rVert^2\big]
                - \mathrm{KL}\big(\mathcal N(m, S)\,\|\,\mathcal N(m, \Lambda^{-1})\big)

        which is E_q log p(x|z) − KL(q ‖ p(z)) with the terms of ½[tr(ΛS) − K − log det S]
        regrouped. Near the posterior those terms are each as large as tr(W̃ᵀW̃S) (with small
        noise and K > D, rounding of 1e-11 each) while their sum is stationary in q; the last KL
        keeps its relative accuracy (:func:`toyvae.gaussians.kl_from_relative`). The mean part
        is the ELBO's own, from W and b as given, not from the posterior mean; the covariance
        part shares the posterior's factor with :func:`toyvae.kl_to_posterior`.
        """
        factors = self._factors()
        if self._prior_tril is None:
            u = q
        else:
            scale = torch.linalg.solve_triangular(self._prior_tril, q.scale_tril, upper=False)
            u = Gaussian(self._standardise(q.loc), scale)
        misfit = self._noise.whiten(x - factors.bias) - u.loc @ factors.whitened_weight.mT
        mean_part = misfit.square().sum(-1) + u.loc.square().sum(-1)
        spread = _kl(u, Gaussian(u.loc, factors.posterior_scale_tril))
        constant = self.data_dim * LOG_2PI + factors.log_det_marginal
        return -0.5 * (constant + mean_part) - spread

    def log_joint(self, x, z) -> torch.Tensor:
        """log p_θ(x, z) = log p_θ(x|z) + log p(z), broadcasting x (..., D) with z (..., K)."""
        self._verify()
        x = self.check_data(x)
        z = self._check_z(z)
        broadcast_batch(x=x.shape[:-1], z=z.shape[:-1])
        log_likelihood = self._noise.log_density(x - self._bias - z @ self._weight.mT)
        return log_likelihood + self._log_prior(z)

    def _log_prior(self, z: torch.Tensor) -> torch.Tensor:
        u = self._standardise(z)
        log_det = 0.0 if self._prior_tril is None else self._prior().log_det_cov()
        return -0.5 * (self.latent_dim * LOG_2PI + log_det + u.square().sum(-1))

    def posterior_precision(self) -> torch.Tensor:
        """Λ_z = P₀⁻¹ + WᵀΨ⁻¹W, the posterior precision of z (K, K); x-independent."""
        factors = self._factors()
        eye = torch.eye(self.latent_dim, dtype=self.dtype, device=self.device)
        precision = factors.precision_tril.mT @ factors.precision_tril
        if self._prior_tril is None:
            return precision
        # Λ_z = L₀⁻ᵀ Λ_u L₀⁻¹.
        inverse = torch.linalg.solve_triangular(self._prior_tril, eye, upper=False)
        return inverse.mT @ precision @ inverse

    def posterior_mean_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, c) with the posterior mean μ(x) = V x + c: V = Σ WᵀΨ⁻¹ (K, D), c = μ(0)."""
        factors = self._factors()
        eye = torch.eye(self.data_dim, dtype=self.dtype, device=self.device)
        # Rows of L_Ψ⁻¹ (columns of the whitened identity) through the posterior-mean map of u.
        s = factors.posterior_scale_tril
        rows = self._noise.whiten_columns(eye).mT
        weight = ((rows @ factors.mean_map) @ s.mT).mT
        if self._prior_tril is not None:
            weight = self._prior_tril @ weight
            return weight, self._prior_loc - weight @ factors.bias
        return weight, -weight @ factors.bias

    def sample(self, sample_shape=(), generator: torch.Generator | None = None):
        """Draw ``(x, z)`` from the joint: z ~ p(z), x = Wz + b + L_Ψ ε with ε ~ N(0, I).

        ``x`` has shape ``(*sample_shape, D)`` and ``z`` shape ``(*sample_shape, K)``;
        ``sample_shape`` may be an int, as in torch.
        """
        self._verify()
        shape = torch.Size([sample_shape] if isinstance(sample_shape, int) else sample_shape)
        options = {"dtype": self.dtype, "device": self.device, "generator": generator}
        u = torch.randn(*shape, self.latent_dim, **options)
        eps = torch.randn(*shape, self.data_dim, **options)
        prior = self._prior()
        z = u if self._prior_tril is None else prior.loc + u @ prior.scale_tril.mT
        return z @ self._weight.mT + self._bias + self._noise.color(eps), z

    # -- scikit-learn and files ---------------------------------------------------------------

    @classmethod
    def from_sklearn(cls, estimator, *, variance=None) -> LinearGaussian:
        """The model of a fitted scikit-learn ``FactorAnalysis`` or ``PCA`` (probabilistic PCA).

        See :func:`toyvae.interop.sklearn.from_sklearn`, which this calls, for the conventions
        (``variance="unbiased"`` or ``"ml"`` for PCA's noise variance) and the warnings.
        """
        from toyvae.interop.sklearn import from_sklearn

        return from_sklearn(estimator, variance=variance)

    def save(self, path, *, x=None) -> None:
        """Write the model (and optionally data x) to ``path`` in the ``--model`` .npz format of
        ``toyvae report``; :func:`toyvae.load` reads it back (:mod:`toyvae.io`)."""
        from toyvae.io import save

        save(self, path, x=x)

    # -- tolerances ---------------------------------------------------------------------------

    def magnitude(self, x: torch.Tensor, q: Gaussian | None = None, *, z=None) -> torch.Tensor:
        """M, the sum of |terms| of log p(x) (and of ELBO(q), KL, log p(x, z)): see
        :func:`toyvae.tolerances.magnitude`. Textbook formulas, in the prior's standard
        coordinates u = L₀⁻¹(z − m₀)."""
        return _magnitude(self, x, q, z)


def _check_prior(prior, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(prior, MultivariateNormal):
        raise TypeError(
            f"prior must be a torch.distributions.MultivariateNormal or None, got {describe(prior)}"
        )
    if prior.event_shape != (k,) or prior.batch_shape != ():
        raise ValueError(
            f"prior must have event shape ({k},) (the latent dimension K of weight) and no "
            f"batch shape, got event shape {tuple(prior.event_shape)} and batch shape "
            f"{tuple(prior.batch_shape)}"
        )
    g = as_gaussian(prior, "prior", dim=k)
    return g.loc.to(like.dtype), g.scale_tril.to(like.dtype)


def _stacked_qr(whitened: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q₁J, Lr) from the QR factorisation of [ÃJ; J], J the exchange matrix (columns reversed).

    Λ = I + ÃᵀÃ = MᵀM with M = [Ã; I], so a QR of M gives Λ's factor without forming ÃᵀÃ,
    whose rounding would square Λ's condition number (and with small noise and K > D lose the
    unit eigenvalues entirely). Reversing the columns, MJ = QR', makes Lr = J R' J lower
    triangular with Λ = Lrᵀ Lr, so S = Lr⁻¹ is the lower Cholesky factor of Λ⁻¹; and the
    posterior mean μ = Λ⁻¹ Mᵀ[r̃; 0] = S J Q₁ᵀ r̃, with Q₁ the first D rows of Q. Signs are
    chosen so that Lr has a positive diagonal.
    """
    k = whitened.shape[-1]
    eye = torch.eye(k, dtype=whitened.dtype, device=whitened.device)
    q, r = torch.linalg.qr(torch.cat([whitened.flip(-1), eye.flip(-1)], dim=-2))
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(r.dtype)
    q, r = q * sign, r * sign.unsqueeze(-1)
    return q[: whitened.shape[0]].flip(-1), r.flip(-2, -1)


def _magnitude(model: LinearGaussian, x: torch.Tensor, q: Gaussian | None, z) -> torch.Tensor:
    """M by textbook dense linear algebra (elementwise for a scalar or diagonal Ψ), in float64
    whatever the model's dtype: M is a scale, and in float32 the textbook log det(I + G) of a
    model with small noise is NaN."""
    noise = model.noise
    weight, bias = model.weight.detach().double(), model.bias.detach().double()
    prior = model._prior()
    m0, l0 = prior.loc.detach().double(), prior.scale_tril.detach().double()
    x = x.double()
    q = None if q is None else Gaussian(q.loc.double(), q.scale_tril.double())
    z = None if z is None else z.double()
    # Standard coordinates u = L₀⁻¹(z − m₀): the model is W L₀, b + W m₀ with prior N(0, I).
    bias = bias + weight @ m0
    weight = weight @ l0
    eigenvalues = noise.eigenvalues().double()
    if noise.kind == "full":
        inverse = torch.linalg.inv(noise.variance.detach().double())

        def quadratic(v):
            return ((v @ inverse) * v).sum(-1)

        gram = weight.mT @ inverse @ weight
    else:
        # A scalar or diagonal Ψ is never expanded to D×D: D may be in the thousands.
        inverse = 1 / eigenvalues

        def quadratic(v):
            return (v.square() * inverse).sum(-1)

        gram = (weight * inverse.unsqueeze(-1)).mT @ weight
    k = model.latent_dim
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    residual = x.detach() - bias
    whitened_norm = quadratic(residual)
    prior_log_det = prior.log_det_cov().detach().double().abs()
    total = (
        model.data_dim * LOG_2PI
        + eigenvalues.log().abs().sum()
        + torch.logdet(eye + gram)
        + 2 * whitened_norm
        + k
        + prior_log_det
    )
    if q is not None:
        mean = solve_rows(l0, q.loc.detach() - m0)
        scale = torch.linalg.solve_triangular(l0, q.scale_tril.detach(), upper=False)
        cov = scale @ scale.mT
        total = (
            total
            + 2 * quadratic(mean @ weight.mT)
            + mean.square().sum(-1)
            + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            # tr(G S) = Σᵢⱼ Gᵢⱼ Sᵢⱼ: its terms, not its value, which can cancel to far less.
            + (gram.abs() * cov.abs()).sum((-2, -1))
            + 2 * scale.diagonal(dim1=-2, dim2=-1).log().sum(-1).abs()
        )
    if z is not None:
        u = solve_rows(l0, z.detach() - m0)
        squared = u.square().sum(-1)
        decoded = u @ weight.mT
        # log p(x, z): ‖u‖² and the whitened misfit (x−b−Wz)ᵀΨ⁻¹(x−b−Wz). log p(z|x):
        # (u−μ)ᵀΛ(u−μ) ≤ 2(uᵀΛu + μᵀΛμ) = 2(‖u‖² + uᵀGu + μᵀΛμ), and μᵀΛμ ≤ r̃ᵀr̃
        # because μᵀΛμ = r̃ᵀÃΛ⁻¹Ãᵀr̃ and ÃΛ⁻¹Ãᵀ = Ã(I + ÃᵀÃ)⁻¹Ãᵀ ⪯ I. Plus K·log 2π twice.
        total = (
            total
            + squared
            + quadratic(residual - decoded)
            + 2 * (squared + quadratic(decoded) + whitened_norm)
            + 2 * k * LOG_2PI
        )
    return total
