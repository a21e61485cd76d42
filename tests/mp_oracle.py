r"""High-precision oracle: the exact quantities in mpmath, at 60 significant digits.

Every input is a float64 number converted exactly (``mpf(float)`` is exact), so the oracle
gives the exact value for the very numbers toyvae was given, to about 1e-60 relative, far
below float64's unit roundoff of 1.1e-16: any difference from toyvae is toyvae's own rounding.
The formulas are the textbook ones (explicit inverses and determinants); at 60 digits they
cost nothing that matters, since a condition number κ leaves about 60 − log10 κ digits.

Vectors are mpmath column matrices; functions take float64 NumPy arrays (or mpmath matrices)
for a single data point x of shape (D,) and return an ``mpf`` or mpmath matrices. A private
mpmath context keeps the global ``mpmath.mp`` precision untouched.
"""

from __future__ import annotations

import numpy as np
from mpmath.ctx_mp import MPContext

MP = MPContext()
MP.dps = 60


def to_mp(value):
    """A float64 scalar, (n,) or (n, m) array as an exact ``mpf`` or mpmath matrix.

    A 1-D array becomes an (n, 1) column. mpmath matrices pass through unchanged.
    """
    if isinstance(value, MP.matrix):
        return value
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return MP.mpf(float(array))
    if array.ndim == 1:
        array = array[:, None]
    return MP.matrix([[MP.mpf(float(v)) for v in row] for row in array])


def to_float(value) -> np.ndarray:
    """An ``mpf`` or mpmath matrix rounded to float64 (a matrix, columns included, stays 2-D)."""
    if isinstance(value, MP.matrix):
        return np.array(value.tolist(), dtype=np.float64)
    return np.float64(value)


def _eye(n: int):
    return MP.eye(n)


def _trace(matrix):
    return MP.fsum(matrix[i, i] for i in range(matrix.rows))


def _dot(u, v):
    """uᵀ v for two columns."""
    return MP.fsum(u[i] * v[i] for i in range(u.rows))


def _log_det(matrix):
    return MP.log(MP.det(matrix))


def noise_matrix(noise_variance, data_dim: int):
    """Ψ as an exact (D, D) mpmath matrix: σ² I, diag(v) or the full matrix.

    An mpmath column of variances or an mpmath matrix is used as it is (not rounded to float64),
    so callers can pass perturbed, exactly represented inputs.
    """
    if isinstance(noise_variance, MP.matrix):
        if noise_variance.cols == 1 and data_dim != 1:
            return MP.diag([noise_variance[i, 0] for i in range(noise_variance.rows)])
        return noise_variance
    psi = np.asarray(noise_variance, dtype=np.float64)
    if psi.ndim == 0:
        return to_mp(psi) * _eye(data_dim)
    if psi.ndim == 1:
        return MP.diag([to_mp(v) for v in psi])
    return to_mp(psi)


class Model:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, Ψ) in exact arithmetic.

    The x-independent quantities (Ψ⁻¹, C = W Wᵀ + Ψ, C⁻¹, their log-determinants and the
    posterior covariance) are formed once, since mpmath at 60 digits is slow. Every method takes
    one data point x of shape (D,).
    """

    def __init__(self, weight, bias, noise_variance):
        self.weight = to_mp(weight)
        self.bias = to_mp(bias)
        self.data_dim, self.latent_dim = self.weight.rows, self.weight.cols
        self.noise = noise_matrix(noise_variance, self.data_dim)
        self.noise_inv = MP.inverse(self.noise)
        self.marginal_cov = self.weight * self.weight.T + self.noise
        self.marginal_cov_inv = MP.inverse(self.marginal_cov)
        self.log_det_noise = _log_det(self.noise)
        self.log_det_marginal_cov = _log_det(self.marginal_cov)
        precision = _eye(self.latent_dim) + self.weight.T * self.noise_inv * self.weight
        self.posterior_cov = MP.inverse(precision)

    def log_evidence(self, x):
        """log p(x) = −½ [D log 2π + log det C + (x − b)ᵀ C⁻¹ (x − b)], C = W Wᵀ + Ψ."""
        residual = to_mp(x) - self.bias
        quadratic = _dot(residual, self.marginal_cov_inv * residual)
        constant = self.data_dim * MP.log(2 * MP.pi) + self.log_det_marginal_cov
        return -(constant + quadratic) / 2

    def posterior(self, x):
        """(μ, Σ) with Σ = (I + Wᵀ Ψ⁻¹ W)⁻¹ and μ = Σ Wᵀ Ψ⁻¹ (x − b)."""
        residual = to_mp(x) - self.bias
        return self.posterior_cov * (
            self.weight.T * (self.noise_inv * residual)
        ), self.posterior_cov

    def expected_log_likelihood(self, x, mean_q, cov_q):
        """E_q log N(x; Wz + b, Ψ) for q = N(m, S).

        Equal to −½ [D log 2π + log det Ψ + eᵀ Ψ⁻¹ e + tr(Ψ⁻¹ W S Wᵀ)] with e = x − b − W m.
        """
        misfit = to_mp(x) - self.bias - self.weight * to_mp(mean_q)
        spread = _trace(self.noise_inv * self.weight * to_mp(cov_q) * self.weight.T)
        constant = self.data_dim * MP.log(2 * MP.pi) + self.log_det_noise
        return -(constant + _dot(misfit, self.noise_inv * misfit) + spread) / 2

    def elbo(self, x, mean_q, cov_q):
        """ELBO(q) = E_q log p(x|z) − KL(q ‖ p(z))."""
        return self.expected_log_likelihood(x, mean_q, cov_q) - kl_to_prior(mean_q, cov_q)

    def kl_to_posterior(self, x, mean_q, cov_q):
        """KL(q ‖ p(z|x)), with the posterior from :meth:`posterior`."""
        mean_p, cov_p = self.posterior(x)
        return gaussian_kl(mean_q, cov_q, mean_p, cov_p)


def gaussian_kl(mean_q, cov_q, mean_p, cov_p):
    """KL(q ‖ p) = ½ [tr(Σp⁻¹Σq) + (μp − μq)ᵀ Σp⁻¹ (μp − μq) − K + log det Σp − log det Σq]."""
    mean_q, cov_q, mean_p, cov_p = (to_mp(a) for a in (mean_q, cov_q, mean_p, cov_p))
    p_inv = MP.inverse(cov_p)
    diff = mean_p - mean_q
    return (
        _trace(p_inv * cov_q)
        + _dot(diff, p_inv * diff)
        - cov_q.rows
        + _log_det(cov_p)
        - _log_det(cov_q)
    ) / 2


def kl_to_prior(mean_q, cov_q):
    """KL(q ‖ N(0, I)) = ½ [tr S + ‖m‖² − K − log det S]."""
    mean_q, cov_q = to_mp(mean_q), to_mp(cov_q)
    return (_trace(cov_q) + _dot(mean_q, mean_q) - cov_q.rows - _log_det(cov_q)) / 2


def covariance_from_tril(scale_tril):
    """L Lᵀ, exactly, from a float64 lower-triangular factor."""
    tril = to_mp(scale_tril)
    return tril * tril.T


def state_space(transition, transition_noise, emission, emission_noise, bias, x):
    """log p(x_{1:T}), the posterior mean (T·K column) and covariance of a linear-Gaussian
    state-space model with z₁ ~ N(0, I), by the dense stacked textbook formulas.

    ``transition_noise`` (K,) and ``emission_noise`` (D,) are variances; x is (T, D). The prior
    of the stacked z is N(0, Σ_z) with Cov(z_t, z_s) = A^{t−s} P_s (t ≥ s), P₁ = I,
    P_t = A P_{t−1} Aᵀ + Q; x = (I ⊗ C) z + 1 ⊗ d + noise.
    """
    a, c = to_mp(transition), to_mp(emission)
    k, d = a.rows, c.rows
    q = noise_matrix(transition_noise, k)
    r = noise_matrix(emission_noise, d)
    x = to_mp(x)
    num_steps = x.rows
    marginals = [_eye(k)]
    for _ in range(1, num_steps):
        marginals.append(a * marginals[-1] * a.T + q)
    cov_z = MP.matrix(num_steps * k, num_steps * k)
    for t in range(num_steps):
        for s in range(t + 1):
            block = marginals[s]
            for _ in range(t - s):
                block = a * block
            for i in range(k):
                for j in range(k):
                    cov_z[t * k + i, s * k + j] = block[i, j]
                    cov_z[s * k + j, t * k + i] = block[i, j]
    stacked_c = MP.matrix(num_steps * d, num_steps * k)
    stacked_r = MP.matrix(num_steps * d, num_steps * d)
    residual = MP.matrix(num_steps * d, 1)
    bias = to_mp(bias)
    for t in range(num_steps):
        for i in range(d):
            residual[t * d + i] = x[t, i] - bias[i]
            for j in range(k):
                stacked_c[t * d + i, t * k + j] = c[i, j]
            for j in range(d):
                stacked_r[t * d + i, t * d + j] = r[i, j]
    cov_x = stacked_c * cov_z * stacked_c.T + stacked_r
    cov_x_inv = MP.inverse(cov_x)
    log_evidence = (
        -(
            num_steps * d * MP.log(2 * MP.pi)
            + _log_det(cov_x)
            + _dot(residual, cov_x_inv * residual)
        )
        / 2
    )
    gain = cov_z * stacked_c.T * cov_x_inv
    return log_evidence, gain * residual, cov_z - gain * stacked_c * cov_z


def markov_chain(initial_loc, initial_scale_tril, transition, offset, scale_tril):
    """The mean (T·K column) and covariance of the Gaussian chain z₁ = m₁ + S₁ε₁,
    z_t = F_t z_{t−1} + f_t + S_t ε_t (``transition``, ``offset`` and ``scale_tril`` are
    sequences of T − 1 matrices or vectors), from its block lower-triangular scale L:
    block (t, s) of L is F_t ⋯ F_{s+1} S_s, and the covariance is L Lᵀ."""
    loc, first = to_mp(initial_loc), to_mp(initial_scale_tril)
    k, num_steps = loc.rows, len(transition) + 1
    means, rows = [loc], [[first]]
    for gain, shift, scale in zip(transition, offset, scale_tril, strict=True):
        gain = to_mp(gain)
        means.append(gain * means[-1] + to_mp(shift))
        rows.append([gain * block for block in rows[-1]] + [to_mp(scale)])
    mean = MP.matrix(num_steps * k, 1)
    tril = MP.matrix(num_steps * k, num_steps * k)
    for t in range(num_steps):
        for i in range(k):
            mean[t * k + i] = means[t][i]
        for s, block in enumerate(rows[t]):
            for i in range(k):
                for j in range(k):
                    tril[t * k + i, s * k + j] = block[i, j]
    return mean, tril * tril.T
