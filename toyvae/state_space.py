r"""The linear-Gaussian state-space model: exact evidence, posterior and smoothing in O(T).

    z₁ ~ N(m₀, P₀),   z_t = A z_{t−1} + N(0, Q),   x_t = H z_t + d + N(0, R),   t = 1 … T.

In whitened coordinates (R = L_R L_Rᵀ, Q = L_Q L_Qᵀ, H̃ = L_R⁻¹H, Ã = L_Q⁻¹A, r̃_t = L_R⁻¹(x_t − d))
the posterior precision Λ over z_{1:T} is block tridiagonal, the prior's Markov precision plus
G = H̃ᵀH̃ on every diagonal block, and the evidence is, by completing the square at the
posterior mean μ (the solution of Λμ = b),

    log p(x) = −½ [T D log 2π + T log det R + log det P₀ + (T−1) log det Q + log det Λ
                   + Σ_t ‖r̃_t − H̃μ_t‖² + ‖L₀⁻¹(μ₁ − m₀)‖² + Σ_{t≥2} ‖L_Q⁻¹(μ_t − Aμ_{t−1})‖²]

(docs/state-space.md, (SS4)). μ and log det Λ come from odd–even cyclic reduction of the
least-squares rows whose Gram matrix is Λ, by Householder QR (:mod:`toyvae._square_root_reduction`):
Λ itself is never formed, since H̃ᵀH̃ would round away the prior's part of it when the noise is
small and K > D. The model is time-invariant, so every level has one repeated interior block and
the matrix work is O(K³ log T), while the data enter through O(T·D·K) matrix products. When a
derivative is needed it comes from the same reduction of the explicit Λ by Cholesky
(:mod:`toyvae._block_tridiagonal`): the same function in exact arithmetic.

Sequence length. The model object is length-agnostic: :meth:`LinearGaussianSSM.log_evidence`,
:meth:`~LinearGaussianSSM.posterior`, :meth:`~LinearGaussianSSM.smoothed` and
:meth:`~LinearGaussianSSM.exact` read T from x. The :class:`toyvae.interface.ConjugateModel`
interface, however, states a flat latent size T·K and an event shape (T, D) before it sees x;
those need a model bound to a length, ``LinearGaussianSSM(..., num_steps=T)`` or
``model.with_num_steps(T)``. K, the size of one state, is :attr:`~LinearGaussianSSM.state_dim`;
``latent_dim`` is the interface's flat T·K.

A structured q, :class:`MarkovGaussian`, is a Gaussian Markov chain q(z₁) ∏ q(z_t | z_{t−1}), the
form deep Kalman filters produce; :func:`markov_elbo` and :func:`markov_kl_to_posterior` give
its ELBO and KL(q ‖ p(z|x)) in O(T K³) without any TK × TK matrix.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch.distributions import MultivariateNormal

from toyvae import _block_tridiagonal as btd
from toyvae import _square_root_reduction as sr
from toyvae._checks import (
    as_tensor,
    broadcast_batch,
    check_count,
    check_finite,
    check_ndim,
    check_positive,
    describe,
)
from toyvae._frozen import Frozen
from toyvae._linalg import solve_rows
from toyvae.gaussians import LOG_2PI, Gaussian, Relative, _kl, kl_from_relative
from toyvae.interface import Exact
from toyvae.noise import FullNoise, IsotropicNoise, noise_covariance

__all__ = [
    "LinearGaussianSSM",
    "MarkovGaussian",
    "Smoothed",
    "markov_elbo",
    "markov_kl_to_posterior",
]


# -- covariances given as a variance, a vector of variances or a matrix -------------------------


class _Factors(NamedTuple):
    """The x-independent quantities of one call, in whitened coordinates."""

    noise: IsotropicNoise | FullNoise  # R, a noise object (toyvae.noise)
    whitened_emission: torch.Tensor  # H̃ = L_R⁻¹ H, (D, K)
    gram: torch.Tensor  # G = H̃ᵀH̃, (K, K)
    transition_tril: torch.Tensor  # L_Q, (K, K)
    whitened_transition: torch.Tensor  # Ã = L_Q⁻¹ A, (K, K)
    transition_precision: torch.Tensor  # Q⁻¹ = L_Q⁻ᵀ L_Q⁻¹
    initial_tril: torch.Tensor  # L₀, (K, K)
    initial_precision: torch.Tensor  # P₀⁻¹


class _Solution(NamedTuple):
    """One call's posterior: values from the square-root route, derivatives (when needed) from
    the normal-equation route (:meth:`LinearGaussianSSM._solve`)."""

    log_evidence: torch.Tensor
    mean: torch.Tensor  # (…, T, K)
    log_det: torch.Tensor  # log det Λ
    root_levels: list  # toyvae._square_root_reduction levels
    normal_levels: list | None  # toyvae._block_tridiagonal levels, when differentiating


def _value_of(value: torch.Tensor, differentiable: torch.Tensor) -> torch.Tensor:
    """``value``, with the derivative of ``differentiable`` (equal to it in exact arithmetic)."""
    return differentiable + (value - differentiable).detach()


class Smoothed(NamedTuple):
    """The smoothing distribution's first two moments, p(z_t | x_{1:T}) and neighbours.

    Attributes
    ----------
    mean : (..., T, K) tensor
        E[z_t | x], the posterior mean.
    covariance : (..., T, K, K) tensor
        Cov(z_t | x), the marginal posterior covariances (the same for every x of a batch).
    cross_covariance : (..., T − 1, K, K) tensor
        Cov(z_{t+1}, z_t | x) for t = 1 … T − 1, the lag-one covariances.
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    cross_covariance: torch.Tensor


def _covariance(value, name: str, size: int, like: torch.Tensor):
    """A covariance given as a scalar, a vector of variances or a matrix, as a noise object."""
    return noise_covariance(as_tensor(value, name, like=like), size, name)


def _square(value, name: str, size: int | None, symbol: str, like=None) -> torch.Tensor:
    tensor = as_tensor(value, name, like=like)
    check_ndim(tensor, name, (2,), f"a ({symbol}, {symbol}) matrix")
    if tensor.shape[0] != tensor.shape[1] or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} must be a square ({symbol}, {symbol}) matrix, got {describe(tensor)}"
        )
    if size is not None and tensor.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size}, {size}), got {describe(tensor)}")
    check_finite(tensor, name)
    return tensor


def _vector(value, name: str, size: int, what: str, like: torch.Tensor) -> torch.Tensor:
    tensor = as_tensor(value, name, like=like)
    if tensor.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) ({what}), got {describe(tensor)}")
    check_finite(tensor, name)
    return tensor


def _inverse_cholesky(precision: torch.Tensor) -> torch.Tensor:
    """Lower S with S Sᵀ = precision⁻¹: factor the index-reversed matrix, J Λ J = L Lᵀ, so
    Λ = U Uᵀ with U = J L J upper triangular and S = U⁻ᵀ (docs/linear-gaussian.md, (L7))."""
    upper = torch.linalg.cholesky(precision.flip(-2, -1)).flip(-2, -1)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(upper.mT, eye, upper=False)


def _left_solve(tril: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """L⁻¹ M for one lower (K, K) factor and a batch of matrices (…, K, J): one solve."""
    k = tril.shape[-1]
    columns = matrices.movedim(-2, 0)
    solved = torch.linalg.solve_triangular(tril, columns.reshape(k, -1), upper=False)
    return solved.reshape(columns.shape).movedim(0, -2)


class LinearGaussianSSM(Frozen):
    r"""Linear-Gaussian state-space model (the Kalman filter's model), exact in O(T).

    .. math::
        z_1 \sim \mathcal N(m_0, P_0), \quad z_t = A z_{t-1} + \mathcal N(0, Q), \quad
        x_t = H z_t + d + \mathcal N(0, R)

    Parameters
    ----------
    transition : (K, K) tensor or array
        A. Its dtype and device are the model's (NumPy becomes float64).
    transition_noise : float, (K,) or (K, K)
        Q, a covariance: a scalar variance, a vector of variances or a full matrix.
    emission : (D, K) tensor or array
        H (the emission matrix; docs/state-space.md).
    emission_noise : float, (D,) or (D, D)
        R, a covariance, in the same three forms; a scalar or vector never forms a D×D matrix.
    emission_bias : (D,), optional
        d; zeros when ``None``.
    initial_mean : (K,), optional
        m₀; zeros when ``None``.
    initial_covariance : float, (K,) or (K, K), optional
        P₀; the identity when ``None``.
    num_steps : int, optional
        T, binding the model to sequences of that length, which the
        :class:`~toyvae.interface.ConjugateModel` interface needs (its ``latent_dim`` is T·K
        and its ``data_event_shape`` (T, D)). ``None`` (the default): any length, read from x;
        see :meth:`with_num_steps`.

    The model is immutable, as :class:`toyvae.LinearGaussian` is: attributes cannot be set, and a
    parameter changed in place after construction makes every later call raise
    ``RuntimeError``. Parameters may require grad; every method is differentiable in them.
    """

    def __init__(
        self,
        transition,
        transition_noise,
        emission,
        emission_noise,
        *,
        emission_bias=None,
        initial_mean=None,
        initial_covariance=None,
        num_steps: int | None = None,
    ):
        transition = _square(transition, "transition", None, "K")
        k = transition.shape[0]
        emission = as_tensor(emission, "emission", like=transition)
        check_ndim(emission, "emission", (2,), f"a (D, K) matrix with K = {k}")
        if emission.shape[1] != k or emission.shape[0] == 0:
            raise ValueError(
                f"emission must be a (D, K) matrix with D ≥ 1 and K = {k} (transition's size), "
                f"got {describe(emission)}"
            )
        check_finite(emission, "emission")
        d = emission.shape[0]
        if emission_bias is None:
            emission_bias = torch.zeros(d, dtype=transition.dtype, device=transition.device)
        if initial_mean is None:
            initial_mean = torch.zeros(k, dtype=transition.dtype, device=transition.device)
        if initial_covariance is None:
            initial_covariance = torch.eye(k, dtype=transition.dtype, device=transition.device)
        if num_steps is not None:
            num_steps = check_count(num_steps, "num_steps", why=" (the sequence length T)")
        self._transition = transition
        self._emission = emission
        self._emission_bias = _vector(emission_bias, "emission_bias", d, "D", transition)
        self._initial_mean = _vector(initial_mean, "initial_mean", k, "K", transition)
        given = {
            "transition": transition,
            "transition_noise": transition_noise,
            "emission": emission,
            "emission_noise": emission_noise,
            "emission_bias": emission_bias,
            "initial_mean": initial_mean,
            "initial_covariance": initial_covariance,
        }
        self._freeze(
            given,
            transition=transition,
            emission=emission,
            emission_bias=_vector(emission_bias, "emission_bias", d, "D", transition),
            initial_mean=_vector(initial_mean, "initial_mean", k, "K", transition),
            # Validated once here (symmetry, positive definiteness); factored on every call.
            transition_noise=_covariance(transition_noise, "transition_noise", k, transition),
            emission_noise=_covariance(emission_noise, "emission_noise", d, transition),
            initial_covariance=_covariance(initial_covariance, "initial_covariance", k, transition),
            num_steps=num_steps,
        )

    def __repr__(self) -> str:
        steps = "any" if self._num_steps is None else self._num_steps
        return (
            f"LinearGaussianSSM(state_dim={self.state_dim}, data_dim={self.data_dim}, "
            f"num_steps={steps}, dtype={self.dtype})"
        )

    # -- parameters (read-only) -----------------------------------------------------------------

    @property
    def transition(self) -> torch.Tensor:
        """A, (K, K)."""
        return self._transition

    @property
    def transition_noise(self) -> torch.Tensor:
        """Q as given: a scalar variance, a (K,) vector of variances or a (K, K) covariance."""
        return self._transition_noise.variance

    @property
    def emission(self) -> torch.Tensor:
        """C, (D, K)."""
        return self._emission

    @property
    def emission_noise(self) -> torch.Tensor:
        """R as given: a scalar variance, a (D,) vector of variances or a (D, D) covariance."""
        return self._emission_noise.variance

    @property
    def emission_bias(self) -> torch.Tensor:
        """d, (D,)."""
        return self._emission_bias

    @property
    def initial_mean(self) -> torch.Tensor:
        """m₀, (K,)."""
        return self._initial_mean

    @property
    def initial_covariance(self) -> torch.Tensor:
        """P₀ as given (the (K, K) identity by default)."""
        return self._initial_covariance.variance

    @property
    def state_dim(self) -> int:
        """K, the size of one state z_t."""
        return self._transition.shape[0]

    @property
    def data_dim(self) -> int:
        """D, the size of one observation x_t."""
        return self._emission.shape[0]

    @property
    def num_steps(self) -> int | None:
        """T for a model bound to a sequence length, else ``None`` (any length)."""
        return self._num_steps

    @property
    def dtype(self) -> torch.dtype:
        return self._transition.dtype

    @property
    def device(self) -> torch.device:
        return self._transition.device

    def with_num_steps(self, num_steps: int) -> LinearGaussianSSM:
        """The same model (the same parameter tensors, so gradients flow) bound to length T."""
        num_steps = check_count(num_steps, "num_steps", why=" (the sequence length T)")
        return self._replace(num_steps=num_steps)

    def for_data(self, x) -> LinearGaussianSSM:
        """The model bound to x's sequence length (the :class:`~toyvae.ConjugateModel` hook that
        lets toyvae.elbo, kl_to_posterior and the estimators take an unbound model)."""
        if self._num_steps is not None:
            return self
        return self.with_num_steps(self.check_data(x).shape[-2])

    def _bound_steps(self, what: str) -> int:
        if self._num_steps is None:
            raise ValueError(
                f"{what} of a LinearGaussianSSM depends on the sequence length T, and this model "
                "accepts any length; the ConjugateModel interface (toyvae.elbo, kl_to_posterior, "
                "log_weights, …) needs one: bind it with LinearGaussianSSM(..., num_steps=T) or "
                "model.with_num_steps(T) (log_evidence, posterior, smoothed and exact read T "
                "from x and need no binding)"
            )
        return self._num_steps

    # -- the ConjugateModel interface: sizes --------------------------------------------------

    @property
    def latent_dim(self) -> int:
        """T·K, the size of the flat latent vector (z₁, …, z_T) (a bound model only)."""
        return self._bound_steps("latent_dim") * self.state_dim

    @property
    def data_event_shape(self) -> torch.Size:
        """(T, D), the shape of one sequence (a bound model only)."""
        return torch.Size((self._bound_steps("data_event_shape"), self.data_dim))

    @property
    def term_count(self) -> int:
        """T·(D + K): each step adds a length-D and a length-K squared norm and log-determinant
        (a bound model only)."""
        return self._bound_steps("term_count") * (self.data_dim + self.state_dim)

    # -- checks ---------------------------------------------------------------------------------

    def check_data(self, x, name: str = "x") -> torch.Tensor:
        """x as a finite tensor (…, T, D) in the model's dtype (T = num_steps when bound)."""
        x = as_tensor(x, name, like=self._transition)
        expected = (
            f"(..., T, {self.data_dim})"
            if self._num_steps is None
            else (f"(..., {self._num_steps}, {self.data_dim})")
        )
        if x.ndim < 2 or x.shape[-1] != self.data_dim or x.shape[-2] == 0:
            raise ValueError(
                f"{name} must be a sequence of shape {expected} (T ≥ 1 steps of D = "
                f"{self.data_dim}), got {describe(x)}"
            )
        if self._num_steps is not None and x.shape[-2] != self._num_steps:
            raise ValueError(
                f"{name} must have {self._num_steps} steps (shape {expected}), as the model is "
                f"bound to num_steps={self._num_steps}, got {describe(x)}"
            )
        check_finite(x, name)
        return x

    def _check_flat_z(self, z, num_steps: int, name: str = "z") -> torch.Tensor:
        z = as_tensor(z, name, like=self._transition)
        size = num_steps * self.state_dim
        if z.ndim == 0 or z.shape[-1] != size:
            raise ValueError(
                f"{name} must be flat latents of shape (..., T·K) = (..., {size}) with T = "
                f"{num_steps} and K = {self.state_dim} (flatten (..., T, K) latents with "
                f"z.flatten(-2)), got {describe(z)}"
            )
        check_finite(z, name)
        return z

    # -- factors --------------------------------------------------------------------------------

    def _factors(self) -> _Factors:
        self._verify()
        noise = self._emission_noise
        transition_noise = self._transition_noise.tril()
        initial = self._initial_covariance.tril()
        whitened_emission = noise.whiten_columns(self._emission)
        eye = torch.eye(self.state_dim, dtype=self.dtype, device=self.device)
        inverse_q = torch.linalg.solve_triangular(transition_noise, eye, upper=False)
        inverse_p0 = torch.linalg.solve_triangular(initial, eye, upper=False)
        return _Factors(
            noise,
            whitened_emission,
            whitened_emission.mT @ whitened_emission,
            transition_noise,
            inverse_q @ self._transition,
            inverse_q.mT @ inverse_q,
            initial,
            inverse_p0.mT @ inverse_p0,
        )

    def _precision(self, num_steps: int, f: _Factors) -> btd.UniformBlockTridiagonal:
        """Λ = (prior Markov precision) + I_T ⊗ G, block tridiagonal."""
        forward = f.whitened_transition.mT @ f.whitened_transition  # AᵀQ⁻¹A
        if num_steps == 1:
            first = f.initial_precision + f.gram
            return btd.UniformBlockTridiagonal(1, first, first, first, torch.zeros_like(first))
        return btd.UniformBlockTridiagonal(
            num_steps,
            f.initial_precision + forward + f.gram,
            f.transition_precision + forward + f.gram,
            f.transition_precision + f.gram,
            -(f.transition_precision @ self._transition),  # Λ[t+1, t] = −Q⁻¹A
        )

    def _whitened_residual(self, x: torch.Tensor, f: _Factors) -> torch.Tensor:
        """r̃_t = L_R⁻¹ (x_t − d)."""
        return f.noise.whiten(x - self._emission_bias)

    def _rhs(self, residual: torch.Tensor, f: _Factors) -> torch.Tensor:
        """b_t = H̃ᵀ r̃_t, plus P₀⁻¹m₀ at t = 1: Λμ = b gives the posterior mean."""
        b = residual @ f.whitened_emission
        start = f.initial_precision @ self._initial_mean
        return b + torch.nn.functional.pad(start.unsqueeze(0), (0, 0, 0, b.shape[-2] - 1))

    def _prior_misfit(self, z: torch.Tensor, f: _Factors) -> torch.Tensor:
        """Σ‖e_t‖² over the prior's whitened residuals: L₀⁻¹(z₁ − m₀), L_Q⁻¹(z_t − Az_{t−1})."""
        first = torch.linalg.solve_triangular(
            f.initial_tril, (z[..., 0, :] - self._initial_mean).unsqueeze(-1), upper=False
        )
        innovation = z[..., 1:, :] - z[..., :-1, :] @ self._transition.mT
        rest = solve_rows(f.transition_tril, innovation)
        return first.square().sum((-2, -1)) + rest.square().sum((-2, -1))

    def _constant(self, num_steps: int, f: _Factors) -> torch.Tensor:
        """T D log 2π + T log det R + log det P₀ + (T − 1) log det Q."""
        return (
            num_steps * self.data_dim * LOG_2PI
            + num_steps * f.noise.log_det()
            + 2 * f.initial_tril.diagonal().log().sum()
            + 2 * (num_steps - 1) * f.transition_tril.diagonal().log().sum()
        )

    def _chain_rows(self, num_steps: int, f: _Factors) -> tuple[sr.ChainRows, torch.Tensor | None]:
        """The posterior as least squares, in rows: L₀⁻¹z₁ ≈ L₀⁻¹m₀ and H̃z_t ≈ r̃_t (unary),
        L_Q⁻¹z_{t+1} − Ãz_t ≈ 0 (pairs). H̃'s D rows are first rotated to at most K (the
        rotation, to apply to every r̃_t, is returned)."""
        eye = torch.eye(self.state_dim, dtype=self.dtype, device=self.device)
        inverse_p0 = torch.linalg.solve_triangular(f.initial_tril, eye, upper=False)
        inverse_q = torch.linalg.solve_triangular(f.transition_tril, eye, upper=False)
        rotation, emission_rows = sr._compress(f.whitened_emission)
        first = torch.cat([inverse_p0, f.whitened_emission], -2)
        rows = sr.ChainRows(
            num_steps, first, emission_rows, emission_rows, -f.whitened_transition, inverse_q
        )
        return rows, rotation

    def _chain_rhs(self, residual: torch.Tensor, f: _Factors, rotation):
        """The right-hand sides of :meth:`_chain_rows`' rows, for whitened residuals r̃."""
        inverse_p0 = torch.linalg.solve_triangular(
            f.initial_tril, self._initial_mean.unsqueeze(-1), upper=False
        ).squeeze(-1)
        first = torch.cat([inverse_p0.expand(*residual.shape[:-2], -1), residual[..., 0, :]], -1)
        rotated = residual if rotation is None else residual @ rotation
        pair = residual.new_zeros(*residual.shape[:-2], residual.shape[-2] - 1, self.state_dim)
        return first, rotated[..., 1:-1, :], rotated[..., -1, :], pair

    def _solve(self, x: torch.Tensor, f: _Factors) -> _Solution:
        """log p(x), the posterior mean (…, T, K) and log det Λ for a checked x.

        Values come from the square-root reduction (:mod:`toyvae._square_root_reduction`), which
        never forms Λ; when a derivative is needed, it comes from the normal-equation reduction
        of Λ (:mod:`toyvae._block_tridiagonal`), whose value is replaced by the square-root one
        (``a + (b − a).detach()``): the same function in exact arithmetic, differentiable
        everywhere torch's Cholesky is, and rounding-free where the normal equations are not.
        """
        num_steps = x.shape[-2]
        residual = self._whitened_residual(x, f)
        with torch.no_grad():
            rows, rotation = self._chain_rows(num_steps, f)
            root_levels = sr.factor(rows)
            mean = sr.solve(root_levels, *self._chain_rhs(residual, f, rotation))
            log_det = sr.log_det(root_levels)
        normal_levels = None
        watched = (x, f.whitened_emission, f.transition_tril, f.whitened_transition, f.initial_tril)
        watched += (self._emission_bias, self._initial_mean)
        if torch.is_grad_enabled() and any(t.requires_grad for t in watched):
            normal_levels = btd.factor(self._precision(num_steps, f))
            mean = _value_of(mean, btd.solve(normal_levels, self._rhs(residual, f)))
            log_det = _value_of(log_det, btd.log_det(normal_levels))
        quadratic = self._misfit(x, mean, f)
        log_evidence = -0.5 * (self._constant(num_steps, f) + log_det + quadratic)
        return _Solution(log_evidence, mean, log_det, root_levels, normal_levels)

    def _covariances(self, solution: _Solution) -> tuple[torch.Tensor, torch.Tensor]:
        """Cov(z_t|x) (T, K, K) and Cov(z_{t+1}, z_t|x) (T − 1, K, K), valued as in _solve."""
        with torch.no_grad():
            covariance, cross = sr.selected_inverse(solution.root_levels)
        if solution.normal_levels is not None:
            normal_covariance, normal_cross = btd.selected_inverse(solution.normal_levels)
            covariance = _value_of(covariance, normal_covariance)
            cross = _value_of(cross, normal_cross)
        return covariance, cross

    # -- exact answers --------------------------------------------------------------------------

    def log_evidence(self, x) -> torch.Tensor:
        r"""log p_θ(x_{1:T}), shape ``x.shape[:-2]``, exact, for any T in O(T·D·K + K³ log T).

        .. math::
            \begin{aligned}
            \log p(x) = -\tfrac12\big[&TD\log 2\pi + T\log\det R + \log\det P_0
                + (T-1)\log\det Q + \log\det\Lambda \\
                &+ \textstyle\sum_t\lVert\tilde r_t - \tilde H\mu_t\rVert^2
                + \lVert e(\mu)\rVert^2\big]
            \end{aligned}

        with μ the posterior mean and e(μ) the prior's whitened residuals at μ: the quadratic
        form of the marginal, completed into non-negative squares (no cancellation).
        """
        x = self.check_data(x)
        return self._solve(x, self._factors())[0]

    def smoothed(self, x) -> Smoothed:
        """The smoothing moments: E[z_t|x], Cov(z_t|x) and Cov(z_{t+1}, z_t|x), for any T.

        The Rauch–Tung–Striebel smoother's output, computed by cyclic reduction of Λ and its
        selected inverse (only the blocks on and next to the diagonal of Λ⁻¹) in O(T K³).
        """
        x = self.check_data(x)
        solution = self._solve(x, self._factors())
        mean = solution.mean
        covariance, cross = self._covariances(solution)
        batch = x.shape[:-2]
        k = self.state_dim
        return Smoothed(
            mean,
            covariance.expand(*batch, *covariance.shape),
            cross.expand(*batch, x.shape[-2] - 1, k, k),
        )

    def exact(self, x: torch.Tensor) -> Exact:
        """log p(x) and p(z|x) over the flat T·K latents, dense (small T), for a checked x.

        The posterior mean comes from the same cyclic reduction as the evidence; its covariance
        factor S (S Sᵀ = Λ⁻¹) from a state-by-state QR of its rows, never from Λ (values; the
        derivative, when needed, is that of the Cholesky route, as in :meth:`_solve`).
        """
        f = self._factors()
        log_evidence, mean = self._solve(x, f)[:2]
        num_steps = x.shape[-2]
        eye = torch.eye(num_steps * self.state_dim, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            lower = sr.precision_factor(self._chain_rows(num_steps, f)[0])
            scale_tril = torch.linalg.solve_triangular(lower, eye, upper=False)
        if torch.is_grad_enabled() and log_evidence.requires_grad:
            normal = _inverse_cholesky(self._precision(num_steps, f).dense())
            scale_tril = _value_of(scale_tril, normal)
        loc = mean.flatten(-2)
        return Exact(log_evidence, Gaussian(loc, scale_tril.expand(*loc.shape, loc.shape[-1])))

    def posterior(self, x) -> MultivariateNormal:
        """p(z|x) as a ``MultivariateNormal`` over the flat T·K latents (dense: small T)."""
        post = self.exact(self.check_data(x)).posterior
        return post.distribution()

    def markov_posterior(self, x) -> MarkovGaussian:
        """p(z|x) as a :class:`MarkovGaussian` p(z₁|x) ∏ p(z_t | z_{t−1}, x), for any T.

        From the square-root reduction's factor Λ = LᵀL (L block lower bidiagonal,
        :func:`toyvae._square_root_reduction.precision_blocks`): η = L(z − μ) ~ N(0, I), so
        S_t = L_tt⁻¹, F_t = −L_tt⁻¹L_{t,t−1} and f_t = μ_t − F_t μ_{t−1}, with no covariance
        factored or inverted. The derivative, when one is needed, is that of the same chain
        from the smoothing moments: F_t = Cov(z_t, z_{t−1}) Cov(z_{t−1})⁻¹ and
        S_t S_tᵀ = Cov(z_t) − F_t Cov(z_{t−1}, z_t).
        """
        x = self.check_data(x)
        f = self._factors()
        solution = self._solve(x, f)
        mean = solution.mean
        with torch.no_grad():
            diagonal, coupling = sr.precision_blocks(self._chain_rows(x.shape[-2], f)[0])
            eye = torch.eye(self.state_dim, dtype=self.dtype, device=self.device)
            scale = torch.linalg.solve_triangular(diagonal, eye, upper=False)  # L_tt⁻¹
            gain = -torch.linalg.solve_triangular(diagonal[1:], coupling, upper=False)
            chain = [mean[..., 0, :], scale[0], gain, None, scale[1:]]
        if mean.requires_grad:
            covariance, cross = self._covariances(solution)
            previous = torch.linalg.cholesky(covariance[:-1])
            moments_gain = torch.cholesky_solve(cross.mT, previous).mT
            conditional = covariance[1:] - moments_gain @ cross.mT
            conditional = 0.5 * (conditional + conditional.mT)
            chain[1] = _value_of(chain[1], torch.linalg.cholesky(covariance[0]))
            chain[2] = _value_of(chain[2], moments_gain)
            chain[4] = _value_of(chain[4], torch.linalg.cholesky(conditional))
        chain[3] = mean[..., 1:, :] - (chain[2] @ mean[..., :-1, :].unsqueeze(-1)).squeeze(-1)
        return MarkovGaussian(*chain)

    # -- the ConjugateModel interface: distributions and expectations ------------------------

    def _prior_moments(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's mean (T·K,) and block lower-triangular scale (T·K, T·K): z = m + Lε
        with z₁ = m₀ + L₀ε₁, z_t = A z_{t−1} + L_Q ε_t, so block (t, s) of L is A^{t−s} L_s."""
        f = self._factors()
        k = self.state_dim
        means, rows = [self._initial_mean], [f.initial_tril]
        for _ in range(1, num_steps):
            means.append(self._transition @ means[-1])
            rows.append(torch.cat([self._transition @ rows[-1], f.transition_tril], -1))
        width = num_steps * k
        tril = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows], 0)
        return torch.cat(means), tril

    def prior(self) -> MultivariateNormal:
        """p(z_{1:T}) over the flat T·K latents in time order (a bound model only)."""
        loc, tril = self._prior_moments(self._bound_steps("prior()"))
        return MultivariateNormal(loc, scale_tril=tril)

    def expected_log_likelihood(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        r"""E_q Σ_t log N(x_t; H z_t + d, R) for a checked x and a canonical q over T·K.

        .. math::
            -\tfrac12\textstyle\sum_t\big[D\log 2\pi + \log\det R
                + \lVert\tilde r_t - \tilde H m_t\rVert^2 + \operatorname{tr}(G\,\Sigma_{tt})\big]

        with m_t and Σ_tt q's blocks; tr(GΣ_tt) = ‖H̃ L_t‖_F² for L_t the t-th block row of q's
        Cholesky factor. Not computed from :meth:`exact`.
        """
        f = self._factors()
        num_steps, k = x.shape[-2], self.state_dim
        loc = q.loc.unflatten(-1, (num_steps, k))
        misfit = self._whitened_residual(x, f) - loc @ f.whitened_emission.mT
        block_rows = q.scale_tril.unflatten(-2, (num_steps, k))  # (…, T, K, T·K)
        spread = (f.whitened_emission @ block_rows).square().sum((-3, -2, -1))
        constant = num_steps * (self.data_dim * LOG_2PI + f.noise.log_det())
        return -0.5 * (constant + misfit.square().sum((-2, -1)) + spread)

    def elbo(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        r"""ELBO(q) for a checked x and a canonical q over the flat T·K latents, summed so that
        nothing cancels near p(z|x) (:func:`toyvae.elbo` calls it):

        .. math::
            \mathrm{ELBO} = -\tfrac12\big[c + \log\det\Lambda + Q(m)\big]
                - \mathrm{KL}\big(\mathcal N(m, \Sigma_q)\,\|\,\mathcal N(m, \Lambda^{-1})\big)

        with c = TD log 2π + T log det R + log det P₀ + (T − 1) log det Q and Q(m) the
        least-squares misfit of the model's whitened rows at q's mean (log p(x) is the same
        bracket at the posterior mean). It is E_q log p(x|z) − KL(q ‖ p(z)) with the covariance
        terms regrouped: with small noise those are each as large as tr(H̃ᵀH̃ Σ_t) while their
        sum is stationary at the posterior. Λ⁻¹'s factor comes from the square-root reduction;
        the derivative, when one is needed, is that of E_q log p(x|z) − KL(q ‖ p(z)).
        """
        f = self._factors()
        num_steps = x.shape[-2]
        by_terms = self.expected_log_likelihood(x, q) - _kl(
            q, Gaussian(*self._prior_moments(num_steps))
        )
        with torch.no_grad():
            lower = sr.precision_factor(self._chain_rows(num_steps, f)[0])  # Λ = LᵀL
            eye = torch.eye(lower.shape[-1], dtype=self.dtype, device=self.device)
            scale = torch.linalg.solve_triangular(lower, eye, upper=False)
            mean = q.loc.unflatten(-1, (num_steps, self.state_dim))
            log_det = 2 * lower.diagonal().log().sum()
            spread = _kl(q, Gaussian(q.loc, scale.expand(*q.loc.shape, q.loc.shape[-1])))
            value = -0.5 * (self._constant(num_steps, f) + log_det + self._misfit(x, mean, f))
            value = value - spread
        return _value_of(value, by_terms) if by_terms.requires_grad else value

    def _misfit(self, x: torch.Tensor, z: torch.Tensor, f: _Factors) -> torch.Tensor:
        """Σ_t ‖r̃_t − H̃ z_t‖² + the prior's Σ‖e_t‖²: log p(x, z) = −½[c + this], z (…, T, K)."""
        residual = self._whitened_residual(x, f) - z @ f.whitened_emission.mT
        return residual.square().sum((-2, -1)) + self._prior_misfit(z, f)

    def log_joint(self, x, z) -> torch.Tensor:
        """log p(x, z) = log p(z₁) + Σ log p(z_t|z_{t−1}) + Σ log p(x_t|z_t), broadcasting.

        x is (…, T, D) and z the flat latents (…, T·K) of the interface, in time order.
        """
        x = self.check_data(x)
        num_steps = x.shape[-2]
        z = self._check_flat_z(z, num_steps).unflatten(-1, (num_steps, self.state_dim))
        f = self._factors()
        misfit = self._whitened_residual(x, f) - z @ f.whitened_emission.mT
        constant = self._constant(num_steps, f) + num_steps * self.state_dim * LOG_2PI
        return -0.5 * (constant + misfit.square().sum((-2, -1)) + self._prior_misfit(z, f))

    def magnitude(self, x: torch.Tensor, q: Gaussian | None = None, *, z=None) -> torch.Tensor:
        """M: the sum of the absolute values of the terms of log p(x) (with q: of ELBO(q) and
        KL(q ‖ p(z|x)); with flat z: of log p(x, z) and log p(z|x)), by textbook formulas.

        Mirrors :func:`toyvae.tolerances.magnitude`: the constants T·D·log 2π, the absolute
        log-eigenvalues of R (T times), P₀ and Q (T − 1 times), |log det Λ| and, for the two
        squared norms of log p(x), twice the squared whitened distance of x from the prior
        mean path H A^{t−1} m₀ + d (their sum is the minimum over z of a quadratic that takes
        that value at the prior mean path), plus T·K. Dense: small T when q or z is given.
        """
        num_steps, k = x.shape[-2], self.state_dim
        with torch.no_grad():
            r_cov = self._emission_noise
            r_inv = torch.linalg.inv(r_cov.dense().detach()).contiguous()
            q_cov = self._transition_noise.dense().detach()
            p0 = self._initial_covariance.dense().detach()
            f = self._factors()
            precision = self._precision(num_steps, f)
            log_det = btd.log_det(btd.factor(precision))
            prior_mean, _ = self._prior_moments(num_steps)
            prior_path = prior_mean.unflatten(-1, (num_steps, k))
            residual = x.detach() - self._emission_bias
            emission = self._emission.detach()

            def quadratic(v):  # Σ_t v_tᵀ R⁻¹ v_t over (…, T, D)
                return ((v @ r_inv) * v).sum((-2, -1))

            total = (
                num_steps * self.data_dim * math.log(2 * math.pi)
                + num_steps * r_cov.eigenvalues().log().abs().sum()
                + torch.linalg.eigvalsh(p0).log().abs().sum()
                + (num_steps - 1) * torch.linalg.eigvalsh(q_cov).log().abs().sum()
                + log_det.abs()
                + 2 * quadratic(residual - prior_path @ emission.mT)
                + num_steps * k
            )
            if q is None and z is None:
                return total
            dense = precision.dense()
            eye = torch.eye(num_steps, dtype=self.dtype, device=self.device)
            big_c = torch.kron(eye, emission)
            big_g = torch.kron(eye, (emission.mT @ r_inv @ emission).contiguous())
            prior_precision = dense - torch.kron(eye, f.gram)
            if q is not None:
                mean, cov = q.loc.detach(), q.covariance().detach()
                centred = mean - prior_mean
                total = (
                    total
                    + 2 * quadratic((mean @ big_c.mT).unflatten(-1, (num_steps, self.data_dim)))
                    + ((centred @ prior_precision) * centred).sum(-1)
                    + (prior_precision.abs() * cov.abs()).sum((-2, -1))
                    + (big_g.abs() * cov.abs()).sum((-2, -1))
                    + q.log_det_cov().detach().abs()
                )
            if z is not None:
                flat = z.detach()
                centred = flat - prior_mean
                decoded = (flat @ big_c.mT).unflatten(-1, (num_steps, self.data_dim))
                prior_quadratic = ((centred @ prior_precision) * centred).sum(-1)
                # log p(x, z): the prior's and the likelihood's squared whitened residuals.
                # log p(z|x): (z−μ)ᵀΛ(z−μ) ≤ 2(zᵀΛz + μᵀΛμ), and μᵀΛμ is at most the quadratic
                # of log p(x) counted above, bounded like it. Plus T·K·log 2π twice.
                total = (
                    total
                    + prior_quadratic
                    + quadratic(residual - decoded)
                    + 2
                    * (
                        ((flat @ dense) * flat).sum(-1)
                        + quadratic(residual - prior_path @ emission.mT)
                    )
                    + 2 * num_steps * k * math.log(2 * math.pi)
                )
            return total

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, sample_shape=(), num_steps: int | None = None, generator=None):
        """Draw ``(x, z)``: x of shape ``(*sample_shape, T, D)``, z ``(*sample_shape, T, K)``.

        ``num_steps`` defaults to the bound T; an int ``sample_shape`` means ``(sample_shape,)``.
        """
        if num_steps is None:
            num_steps = self._bound_steps("sample()'s num_steps")
        num_steps = check_count(num_steps, "num_steps", why=" (the sequence length T)")
        if isinstance(sample_shape, numbers.Integral) and not isinstance(sample_shape, bool):
            sample_shape = (sample_shape,)
        shape = torch.Size(sample_shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {describe(generator)}"
            )
        f = self._factors()
        k, d = self.state_dim, self.data_dim
        options = {"dtype": self.dtype, "device": self.device, "generator": generator}
        state_noise = torch.randn(*shape, num_steps, k, **options)
        data_noise = torch.randn(*shape, num_steps, d, **options)
        states = [self._initial_mean + state_noise[..., 0, :] @ f.initial_tril.mT]
        innovations = state_noise @ f.transition_tril.mT
        for t in range(1, num_steps):
            states.append(states[-1] @ self._transition.mT + innovations[..., t, :])
        z = torch.stack(states, -2)
        x = z @ self._emission.mT + self._emission_bias + f.noise.color(data_noise)
        return x, z


# -- a structured Markov q ------------------------------------------------------------------------


class MarkovGaussian:
    r"""A Gaussian Markov chain q(z₁) ∏_{t≥2} q(z_t | z_{t−1}) over z_{1:T}, batched.

    .. math::
        q(z_1) = \mathcal N(m_1, S_1S_1^\top), \qquad
        q(z_t\mid z_{t-1}) = \mathcal N(F_t z_{t-1} + f_t,\; S_t S_t^\top)

    What sequential VAEs (deep Kalman filters) produce. Equivalently z = m + Lε with L block
    lower triangular, or a precision with a block-bidiagonal factor.

    Parameters
    ----------
    initial_loc : (..., K)
        m₁.
    initial_scale_tril : (..., K, K)
        S₁, lower triangular with a positive diagonal.
    transition : (..., T − 1, K, K)
        F_2 … F_T.
    offset : (..., T − 1, K)
        f_2 … f_T.
    scale_tril : (..., T − 1, K, K)
        S_2 … S_T, lower triangular with positive diagonals.

    The batch shapes broadcast; T − 1 may be 0 (a single step).
    """

    def __init__(self, initial_loc, initial_scale_tril, transition, offset, scale_tril):
        loc = as_tensor(initial_loc, "initial_loc")
        if loc.ndim == 0:
            raise ValueError(f"initial_loc must have shape (..., K), got {describe(loc)}")
        k = loc.shape[-1]
        tensors = {
            "initial_scale_tril": as_tensor(initial_scale_tril, "initial_scale_tril", like=loc),
            "transition": as_tensor(transition, "transition", like=loc),
            "offset": as_tensor(offset, "offset", like=loc),
            "scale_tril": as_tensor(scale_tril, "scale_tril", like=loc),
        }
        expected = {
            "initial_scale_tril": (2, (k, k), f"(..., {k}, {k})"),
            "transition": (3, (k, k), f"(..., T − 1, {k}, {k})"),
            "offset": (2, (k,), f"(..., T − 1, {k})"),
            "scale_tril": (3, (k, k), f"(..., T − 1, {k}, {k})"),
        }
        for name, tensor in tensors.items():
            ndim, tail, text = expected[name]
            if tensor.ndim < ndim or tuple(tensor.shape[-len(tail) :]) != tail:
                raise ValueError(
                    f"{name} must have shape {text} (K = {k} from initial_loc), got "
                    f"{describe(tensor)}"
                )
        steps = {
            name: tensors[name].shape[-expected[name][0]]
            for name in ("transition", "offset", "scale_tril")
        }
        if len(set(steps.values())) != 1:
            raise ValueError(
                "transition, offset and scale_tril must have the same number of steps T − 1, "
                f"got {steps}"
            )
        batch = broadcast_batch(
            initial_loc=loc.shape[:-1],
            initial_scale_tril=tensors["initial_scale_tril"].shape[:-2],
            transition=tensors["transition"].shape[:-3],
            offset=tensors["offset"].shape[:-2],
            scale_tril=tensors["scale_tril"].shape[:-3],
        )
        check_finite(loc, "initial_loc")
        for name, tensor in tensors.items():
            check_finite(tensor, name)
        for name in ("initial_scale_tril", "scale_tril"):
            check_positive(tensors[name].diagonal(dim1=-2, dim2=-1), f"{name}'s diagonal")
        n = steps["transition"]
        self._initial_loc = loc.expand(*batch, k)
        self._initial_scale_tril = tensors["initial_scale_tril"].tril().expand(*batch, k, k)
        self._transition = tensors["transition"].expand(*batch, n, k, k)
        self._offset = tensors["offset"].expand(*batch, n, k)
        self._scale_tril = tensors["scale_tril"].tril().expand(*batch, n, k, k)

    def __repr__(self) -> str:
        return (
            f"MarkovGaussian(batch_shape={tuple(self.batch_shape)}, num_steps={self.num_steps}, "
            f"state_dim={self.state_dim})"
        )

    initial_loc = property(lambda self: self._initial_loc, doc="m₁, (..., K).")
    initial_scale_tril = property(lambda self: self._initial_scale_tril, doc="S₁, (..., K, K).")
    transition = property(lambda self: self._transition, doc="F_t, (..., T − 1, K, K).")
    offset = property(lambda self: self._offset, doc="f_t, (..., T − 1, K).")
    scale_tril = property(lambda self: self._scale_tril, doc="S_t, (..., T − 1, K, K).")

    @property
    def num_steps(self) -> int:
        """T."""
        return self._transition.shape[-3] + 1

    def elbo(self, model: LinearGaussianSSM, x) -> torch.Tensor:
        """:func:`markov_elbo`: what :func:`toyvae.elbo` computes for this q."""
        return markov_elbo(model, x, self)

    def kl_to_posterior(self, model: LinearGaussianSSM, x) -> torch.Tensor:
        """:func:`markov_kl_to_posterior`: what :func:`toyvae.kl_to_posterior` computes for it."""
        return markov_kl_to_posterior(model, x, self)

    @property
    def state_dim(self) -> int:
        """K."""
        return self._initial_loc.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self._initial_loc.shape[:-1]

    def log_det_cov(self) -> torch.Tensor:
        """log det Cov(z_{1:T}) = 2 Σ_t Σ log diag S_t (the chain's Jacobian is unit triangular)."""
        first = self._initial_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        rest = self._scale_tril.diagonal(dim1=-2, dim2=-1).log().sum((-2, -1))
        return 2 * (first + rest)

    def marginals(self) -> Smoothed:
        """E z_t, Cov z_t and Cov(z_{t+1}, z_t), by the forward recursion in O(T K³):

        m_t = F_t m_{t−1} + f_t,  Σ_t = F_t Σ_{t−1} F_tᵀ + S_t S_tᵀ,
        Cov(z_t, z_{t−1}) = F_t Σ_{t−1}.
        """
        means = [self._initial_loc]
        covs = [self._initial_scale_tril @ self._initial_scale_tril.mT]
        crosses = []
        noise = self._scale_tril @ self._scale_tril.mT
        for t in range(self.num_steps - 1):
            gain = self._transition[..., t, :, :]
            means.append((gain @ means[-1].unsqueeze(-1)).squeeze(-1) + self._offset[..., t, :])
            crosses.append(gain @ covs[-1])
            covs.append(crosses[-1] @ gain.mT + noise[..., t, :, :])
        k = self.state_dim
        cross = (
            torch.stack(crosses, -3)
            if crosses
            else self._transition.new_zeros(*self.batch_shape, 0, k, k)
        )
        return Smoothed(torch.stack(means, -2), torch.stack(covs, -3), cross)

    def to_multivariate_normal(self) -> MultivariateNormal:
        """The same Gaussian over the flat T·K latents (dense: small T). Block (t, s) of the
        scale is F_t ⋯ F_{s+1} S_s, block lower triangular."""
        k, n = self.state_dim, self.num_steps
        mean = self.marginals().mean.flatten(-2)
        rows = [self._initial_scale_tril]
        for t in range(n - 1):
            gain = self._transition[..., t, :, :]
            rows.append(torch.cat([gain @ rows[-1], self._scale_tril[..., t, :, :]], -1))
        width = n * k
        tril = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows], -2)
        return MultivariateNormal(mean, scale_tril=tril)


def _check_markov(model, x, q) -> tuple[torch.Tensor, MarkovGaussian]:
    if not isinstance(model, LinearGaussianSSM):
        raise TypeError(f"model must be a toyvae.LinearGaussianSSM, got {describe(model)}")
    x = model.check_data(x)
    if not isinstance(q, MarkovGaussian):
        raise TypeError(f"q must be a toyvae.state_space.MarkovGaussian, got {describe(q)}")
    if q.state_dim != model.state_dim or q.num_steps != x.shape[-2]:
        raise ValueError(
            f"q must be a chain of T = {x.shape[-2]} steps (x's) of size K = {model.state_dim} "
            f"(the model's), got T = {q.num_steps}, K = {q.state_dim}"
        )
    broadcast_batch(q=q.batch_shape, x=x.shape[:-2])
    return x, q


def _markov_cast(q: MarkovGaussian, like: torch.Tensor) -> MarkovGaussian:
    if q.initial_loc.dtype == like.dtype:
        return q
    return MarkovGaussian(
        *(
            t.to(like.dtype)
            for t in (q.initial_loc, q.initial_scale_tril, q.transition, q.offset, q.scale_tril)
        )
    )


def markov_elbo(model: LinearGaussianSSM, x, q: MarkovGaussian) -> torch.Tensor:
    r"""ELBO(q) for a Markov q, in O(T K³), summed so that nothing cancels near p(z|x):

    .. math::
        \mathrm{ELBO} = -\tfrac12\big[c + \log\det\Lambda + Q(m)\big]
            - \mathrm{KL}\big(\mathcal N(m, \Sigma_q)\,\|\,\mathcal N(m, \Lambda^{-1})\big)

    as in :meth:`LinearGaussianSSM.elbo`, the last KL by the chain rule of
    :func:`markov_kl_to_posterior` (its covariance terms only). Sequential VAEs write the same
    ELBO as a sum over time (:func:`_markov_elbo_by_terms`); with small observation noise
    its terms are each as large as tr(H̃ᵀH̃ Σ_t) while their sum is stationary at the posterior,
    so that form carries only the derivative. Shape: the broadcast of q's batch shape with
    ``x.shape[:-2]``.
    """
    x, q = _check_markov(model, x, q)
    q = _markov_cast(q, x)
    f = model._factors()
    by_terms = _markov_elbo_by_terms(model, x, q, f)
    with torch.no_grad():
        num_steps = x.shape[-2]
        diagonal, coupling = sr.precision_blocks(model._chain_rows(num_steps, f)[0])
        log_det = 2 * diagonal.diagonal(dim1=-2, dim2=-1).log().sum()  # det L = Π det L_tt
        mean, scales = _marginal_scales(q)
        spread = _chain_kl(diagonal, coupling, q, scales, torch.zeros_like(mean))
        value = -0.5 * (model._constant(num_steps, f) + log_det + model._misfit(x, mean, f))
        value = value - spread
    return _value_of(value, by_terms) if by_terms.requires_grad else value


def _markov_elbo_by_terms(model: LinearGaussianSSM, x, q: MarkovGaussian, f) -> torch.Tensor:
    r"""The ELBO the way sequential VAEs write it, differentiable:

    .. math::
        \sum_t \mathbb E_{q(z_t)}\log p(x_t\mid z_t) - \mathrm{KL}(q(z_1)\,\|\,p(z_1))
            - \sum_{t\ge2}\mathbb E_{q(z_{t-1})}\mathrm{KL}\big(q(z_t\mid z_{t-1})\,\|\,
              p(z_t\mid z_{t-1})\big)

    Each expected KL is closed form: with B_t = L_Q⁻¹(F_t − A) and the marginal
    z_{t−1} ~ N(m_{t−1}, Σ_{t−1}), it is ½[‖L_Q⁻¹S_t‖_F² + ‖L_Q⁻¹((F_t − A)m_{t−1} + f_t)‖²
    + tr(B_t Σ_{t−1} B_tᵀ) − K + log det Q − log det S_tS_tᵀ].
    """
    mean, cov, _ = q.marginals()
    k = model.state_dim
    # Reconstruction: −½[D log 2π + log det R + ‖r̃_t − H̃ m_t‖² + tr(G Σ_t)] per step.
    misfit = model._whitened_residual(x, f) - mean @ f.whitened_emission.mT
    spread = (f.gram * cov).sum((-3, -2, -1))
    reconstruction = -0.5 * (
        x.shape[-2] * (model.data_dim * LOG_2PI + f.noise.log_det())
        + misfit.square().sum((-2, -1))
        + spread
    )
    first = _kl(
        Gaussian(q.initial_loc, q.initial_scale_tril), Gaussian(model.initial_mean, f.initial_tril)
    )
    if q.num_steps == 1:
        return reconstruction - first
    drift = q.transition - model.transition  # F_t − A
    shift = (drift @ mean[..., :-1, :].unsqueeze(-1)).squeeze(-1) + q.offset
    whitened_shift = solve_rows(f.transition_tril, shift)
    whitened_drift = _left_solve(f.transition_tril, drift)  # B_t
    spread_drift = ((whitened_drift @ cov[..., :-1, :, :]) * whitened_drift).sum((-2, -1))
    whitened_scale = _left_solve(f.transition_tril, q.scale_tril)
    log_det_q = 2 * f.transition_tril.diagonal().log().sum()
    log_det_s = 2 * q.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    steps = 0.5 * (
        whitened_scale.square().sum((-2, -1))
        + whitened_shift.square().sum(-1)
        + spread_drift
        - k
        + log_det_q
        - log_det_s
    )
    return reconstruction - first - steps.sum(-1)


def markov_kl_to_posterior(model: LinearGaussianSSM, x, q: MarkovGaussian) -> torch.Tensor:
    r"""KL(q ‖ p(z|x)) for a Markov q, as a sum of non-negative terms, in O(T K³).

    The posterior is itself a chain: with Λ = LᵀL, L block lower bidiagonal (its diagonal blocks
    L_tt lower triangular), η = L(z − μ) ~ N(0, I) under p(z|x). KL's chain rule then gives

    .. math::
        \mathrm{KL} = \sum_t \Big(\mathrm{KL}\big(\mathcal N(0, S_tS_t^\top)\,\big\|\,
            \mathcal N(0, (L_{tt}^\top L_{tt})^{-1})\big) + \tfrac12\lVert c_t\rVert^2\Big)
            + \tfrac12\sum_{t\ge2}\lVert B_t C_{t-1}\rVert_F^2

    with δ_t = m_t − μ_t (q's marginal mean less the posterior's), c_t = L_tt δ_t +
    L_{t,t−1} δ_{t−1}, B_t = L_tt F_t + L_{t,t−1} and C_{t−1}C_{t−1}ᵀ = Cov_q(z_{t−1}). Every
    term is non-negative and vanishes at the posterior, and the covariance terms are summed as
    in :func:`toyvae.gaussians.kl_from_relative`, so the KL keeps its relative accuracy as q
    approaches p(z|x) and is never negative. L comes from the square-root reduction, which never
    forms Λ (:func:`toyvae._square_root_reduction.precision_blocks`); the derivative, when one
    is needed, is that of the same KL written against Λ's blocks (:func:`_kl_through_precision`).
    Computed independently of :func:`markov_elbo`.
    """
    x, q = _check_markov(model, x, q)
    q = _markov_cast(q, x)
    f = model._factors()
    solution = model._solve(x, f)
    mu = solution.mean
    differentiable = torch.is_grad_enabled() and (
        mu.requires_grad or any(t.requires_grad for t in _markov_parameters(q))
    )
    with torch.no_grad():
        diagonal, coupling = sr.precision_blocks(model._chain_rows(x.shape[-2], f)[0])
        mean, scales = _marginal_scales(q)
        delta = mean - mu
        offset = (diagonal @ delta.unsqueeze(-1)).squeeze(-1)
        offset[..., 1:, :] += (coupling @ delta[..., :-1, :].unsqueeze(-1)).squeeze(-1)
        kl = _chain_kl(diagonal, coupling, q, scales, offset)
    if differentiable:
        kl = _value_of(kl, _kl_through_precision(model, f, solution, q))
    return kl


def _chain_kl(diagonal, coupling, q: MarkovGaussian, scales, offset) -> torch.Tensor:
    """Σ_t [KL(N(0, S_tS_tᵀ) ‖ N(0, (L_ttᵀL_tt)⁻¹)) + ½‖c_t‖²] + ½ Σ_{t≥2} ‖B_t C_{t−1}‖²_F
    (:func:`markov_kl_to_posterior`) for the offsets c_t given, (…, T, K): zero offsets give
    KL(N(m, Σ_q) ‖ N(m, Λ⁻¹)), the covariance part alone."""
    eye = torch.eye(q.state_dim, dtype=diagonal.dtype, device=diagonal.device)
    excess = diagonal @ torch.cat([q.initial_scale_tril.unsqueeze(-3), q.scale_tril], -3) - eye
    kl = kl_from_relative(Relative(excess, offset)).sum(-1)
    if q.num_steps > 1:
        drift = diagonal[1:] @ q.transition + coupling  # B_t
        kl = kl + 0.5 * (drift @ scales[..., :-1, :, :]).square().sum((-3, -2, -1))
    return kl


def _markov_parameters(q: MarkovGaussian) -> tuple[torch.Tensor, ...]:
    return (q.initial_loc, q.initial_scale_tril, q.transition, q.offset, q.scale_tril)


def _marginal_scales(q: MarkovGaussian) -> tuple[torch.Tensor, torch.Tensor]:
    """q's marginal means m_t (…, T, K) and factors C_t of Cov_q(z_t) (…, T, K, K), C_tC_tᵀ =
    F_t C_{t−1}C_{t−1}ᵀF_tᵀ + S_tS_tᵀ, each from a QR of [C_{t−1}ᵀF_tᵀ; S_tᵀ] (no products
    of factors to subtract or cancel)."""
    means, scales = [q.initial_loc], [q.initial_scale_tril]
    for t in range(q.num_steps - 1):
        gain = q.transition[..., t, :, :]
        means.append((gain @ means[-1].unsqueeze(-1)).squeeze(-1) + q.offset[..., t, :])
        stacked = torch.cat([(gain @ scales[-1]).mT, q.scale_tril[..., t, :, :].mT], -2)
        scales.append(torch.linalg.qr(stacked).R.mT)
    return torch.stack(means, -2), torch.stack(scales, -3)


def _kl_through_precision(model, f, solution, q: MarkovGaussian) -> torch.Tensor:
    r"""The same KL from the posterior's block-tridiagonal precision Λ, differentiable:

    .. math::
        \tfrac12\Big[\sum_t\langle\Lambda_{tt}, \Sigma_t\rangle
            + 2\sum_t\langle\Lambda_{t+1,t}, \Sigma_{t+1,t}\rangle + \delta^\top\Lambda\delta
            - TK - \log\det\Lambda - \log\det\Sigma_q\Big]

    Its terms are each O(TK) and cancel near the posterior: it carries the derivative only."""
    mean, cov, cross = q.marginals()
    n, k = mean.shape[-2], model.state_dim
    precision = model._precision(n, f)
    middle = precision.middle.expand(max(n - 2, 0), k, k)
    ends = (
        [precision.first.unsqueeze(0), middle, precision.last.unsqueeze(0)]
        if n > 1
        else [precision.first.unsqueeze(0)]
    )
    diagonal = torch.cat(ends, 0)  # (T, K, K)
    delta = mean - solution.mean
    quadratic = ((delta.unsqueeze(-2) @ diagonal).squeeze(-2) * delta).sum((-2, -1))
    trace = (diagonal * cov).sum((-3, -2, -1))
    if n > 1:
        coupled = (delta[..., 1:, :] @ precision.lower * delta[..., :-1, :]).sum((-2, -1))
        quadratic = quadratic + 2 * coupled
        trace = trace + 2 * (precision.lower * cross).sum((-3, -2, -1))
    return 0.5 * (trace + quadratic - n * k - solution.log_det - q.log_det_cov())
