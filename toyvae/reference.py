r"""The independent oracle: every exact quantity by the plainest dense textbook formula.

The tests compare toyvae against this module, so it shares neither code nor structure with
:mod:`toyvae.model`. Where toyvae works in whitened coordinates with Cholesky factors and
never forms a D×D matrix, this module forms the marginal covariance C = WWᵀ + Ψ explicitly,
inverts matrices outright and asks :class:`scipy.stats.multivariate_normal` for
log-densities (Bishop, *Pattern Recognition and Machine Learning*, §2.3 and §12.2). That
costs O(D³) per call and loses accuracy as the condition number of C grows, but every line
can be checked against a textbook, which is what an oracle is for: dense on purpose.

NumPy float64 arrays in and out; torch is never imported. Leading (batch) axes broadcast;
a result with no batch axes is returned as a Python float.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import multivariate_normal

__all__ = [
    "elbo",
    "entropy",
    "expected_log_likelihood",
    "gaussian_kl",
    "kl_to_prior",
    "log_evidence",
    "log_joint",
    "marginal_covariance",
    "noise_covariance",
    "posterior",
]


# -- argument handling (NumPy only, so this module stays free of torch) --------------------


def _array(value, name: str) -> np.ndarray:
    """``value`` as a finite float64 array, or an error naming ``name``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a real number or array, got {value!r} of type {type(value).__name__}"
        ) from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got NaN or infinite entries in {array!r}")
    return array


def _vectors(value, name: str, size: int, what: str) -> np.ndarray:
    """An array of shape (..., size): one or more vectors along the last axis."""
    array = _array(value, name)
    if array.ndim == 0 or array.shape[-1] != size:
        raise ValueError(
            f"{name} must have last dimension {size} ({what}), got shape {array.shape}"
        )
    return array


def _event_size(value, name: str, expected: str) -> int:
    """The size of the last axis of ``value``; a scalar has none."""
    if np.ndim(value) == 0:
        raise ValueError(f"{name} must be {expected}, got the scalar {value!r}")
    return np.shape(value)[-1]


def _covariances(value, name: str, size: int) -> np.ndarray:
    """An array of shape (..., size, size) of symmetric positive-definite matrices."""
    array = _array(value, name)
    if array.ndim < 2 or array.shape[-2:] != (size, size):
        raise ValueError(
            f"{name} must have shape (..., {size}, {size}) (covariance matrices), "
            f"got shape {array.shape}"
        )
    if array.size and np.linalg.eigvalsh(array).min() <= 0:
        raise ValueError(
            f"{name} must be positive definite, got smallest eigenvalue "
            f"{np.linalg.eigvalsh(array).min():.3g}"
        )
    return array


def _weight(value) -> np.ndarray:
    weight = _array(value, "weight")
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a (D, K) matrix with D, K ≥ 1, got shape {weight.shape}")
    return weight


def _bias(value, data_dim: int) -> np.ndarray:
    if value is None:
        return np.zeros(data_dim)
    bias = _array(value, "bias")
    if bias.shape != (data_dim,):
        raise ValueError(f"bias must have shape ({data_dim},), got shape {bias.shape}")
    return bias


def _result(values: np.ndarray, batch: tuple[int, ...]):
    """Shape the per-element results; a result without batch axes becomes a float."""
    values = np.reshape(values, batch)
    return float(values) if batch == () else values


def _logpdf(points: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """log N(points; 0, cov) along the last axis, shape ``points.shape[:-1]``.

    scipy squeezes its output (one point gives a scalar), so flatten and reshape around it.
    """
    size = points.shape[-1]
    values = multivariate_normal(np.zeros(size), cov).logpdf(points.reshape(-1, size))
    return np.reshape(values, points.shape[:-1])


# -- the model --------------------------------------------------------------------------------


def noise_covariance(noise_variance, data_dim: int) -> np.ndarray:
    """Ψ as a dense (D, D) matrix: σ² I for a scalar, diag(v) for a (D,) vector, else itself."""
    psi = _array(noise_variance, "noise_variance")
    if psi.ndim == 0:
        return psi * np.eye(data_dim)
    if psi.shape == (data_dim,):
        return np.diag(psi)
    if psi.shape == (data_dim, data_dim):
        return psi.copy()
    raise ValueError(
        f"noise_variance must be a scalar, a ({data_dim},) vector or a ({data_dim}, {data_dim}) "
        f"matrix, got shape {psi.shape}"
    )


def marginal_covariance(weight, noise_variance) -> np.ndarray:
    """C = W Wᵀ + Ψ, the covariance of x under p(x) = ∫ p(x|z) p(z) dz = N(b, C)."""
    weight = _weight(weight)
    return weight @ weight.T + noise_covariance(noise_variance, weight.shape[0])


def log_evidence(weight, bias, noise_variance, x):
    """log p(x) = log N(x; b, W Wᵀ + Ψ), by scipy; x is (..., D), the result (...)."""
    weight = _weight(weight)
    d = weight.shape[0]
    bias = _bias(bias, d)
    x = _vectors(x, "x", d, "the data dimension D")
    cov = marginal_covariance(weight, noise_variance)
    return _result(_logpdf(x - bias, cov), x.shape[:-1])


def posterior(weight, bias, noise_variance, x) -> tuple[np.ndarray, np.ndarray]:
    """p(z|x) = N(μ(x), Σ) with Σ = (I + Wᵀ Ψ⁻¹ W)⁻¹ and μ(x) = Σ Wᵀ Ψ⁻¹ (x − b).

    Returns ``(means, covariance)``: means of shape (..., K) for x of shape (..., D), and the
    single (K, K) covariance, which does not depend on x.
    """
    weight = _weight(weight)
    d, k = weight.shape
    bias = _bias(bias, d)
    x = _vectors(x, "x", d, "the data dimension D")
    psi_inv = np.linalg.inv(noise_covariance(noise_variance, d))
    covariance = np.linalg.inv(np.eye(k) + weight.T @ psi_inv @ weight)
    gain = covariance @ weight.T @ psi_inv  # (K, D): μ = gain (x − b)
    return (x - bias) @ gain.T, covariance


def log_joint(weight, bias, noise_variance, x, z):
    """log p(x, z) = log N(x; Wz + b, Ψ) + log N(z; 0, I), x (..., D) and z (..., K) broadcasting.

    The first term is evaluated as log N(x − Wz − b; 0, Ψ), the same density translated.
    """
    weight = _weight(weight)
    d, k = weight.shape
    bias = _bias(bias, d)
    x = _vectors(x, "x", d, "the data dimension D")
    z = _vectors(z, "z", k, "the latent dimension K")
    batch = np.broadcast_shapes(x.shape[:-1], z.shape[:-1])
    x = np.broadcast_to(x, (*batch, d))
    z = np.broadcast_to(z, (*batch, k))
    psi = noise_covariance(noise_variance, d)
    log_likelihood = _logpdf(x - z @ weight.T - bias, psi)
    log_prior = _logpdf(z, np.eye(k))
    return _result(log_likelihood + log_prior, batch)


# -- Gaussians --------------------------------------------------------------------------------


def gaussian_kl(mean_q, cov_q, mean_p, cov_p):
    r"""KL(q ‖ p) between N(μq, Σq) and N(μp, Σp), batched over leading axes.

    .. math::
        \mathrm{KL} = \tfrac12\big[\operatorname{tr}(\Sigma_p^{-1}\Sigma_q)
            + (\mu_p-\mu_q)^\top\Sigma_p^{-1}(\mu_p-\mu_q) - K
            + \ln\det\Sigma_p - \ln\det\Sigma_q\big]

    Means are (..., K), covariances (K, K) or (..., K, K); all leading axes broadcast.
    """
    k = _event_size(mean_q, "mean_q", "a mean vector (..., K)")
    mean_q = _vectors(mean_q, "mean_q", k, "K")
    mean_p = _vectors(mean_p, "mean_p", k, "mean_q's dimension K")
    cov_q = _covariances(cov_q, "cov_q", k)
    cov_p = _covariances(cov_p, "cov_p", k)
    batch = np.broadcast_shapes(
        mean_q.shape[:-1], mean_p.shape[:-1], cov_q.shape[:-2], cov_p.shape[:-2]
    )
    mean_q, mean_p = (np.broadcast_to(m, (*batch, k)).reshape(-1, k) for m in (mean_q, mean_p))
    cov_q, cov_p = (np.broadcast_to(c, (*batch, k, k)).reshape(-1, k, k) for c in (cov_q, cov_p))
    values = np.empty(len(mean_q))
    for i in range(len(values)):
        p_inv = np.linalg.inv(cov_p[i])
        diff = mean_p[i] - mean_q[i]
        _, log_det_p = np.linalg.slogdet(cov_p[i])
        _, log_det_q = np.linalg.slogdet(cov_q[i])
        values[i] = 0.5 * (
            np.trace(p_inv @ cov_q[i]) + diff @ p_inv @ diff - k + log_det_p - log_det_q
        )
    return _result(values, batch)


def kl_to_prior(mean_q, cov_q):
    """KL(q ‖ N(0, I)) = ½ [tr Σq + ‖μq‖² − K − ln det Σq], via :func:`gaussian_kl`."""
    k = _event_size(mean_q, "mean_q", "a mean vector (..., K)")
    return gaussian_kl(mean_q, cov_q, np.zeros(k), np.eye(k))


def entropy(cov):
    """H[N(μ, Σ)] = ½ K (1 + ln 2π) + ½ ln det Σ, for Σ of shape (K, K) or (..., K, K)."""
    k = _event_size(cov, "cov", "a covariance matrix (..., K, K)")
    cov = _covariances(cov, "cov", k)
    _, log_det = np.linalg.slogdet(cov)
    return _result(0.5 * k * (1 + math.log(2 * math.pi)) + 0.5 * log_det, cov.shape[:-2])


# -- the ELBO ---------------------------------------------------------------------------------


def expected_log_likelihood(weight, bias, noise_variance, x, mean_q, cov_q):
    r"""E_{q(z)} log N(x; Wz + b, Ψ) for q = N(m, S).

    .. math::
        \mathbb E_q \log\mathcal N(x; Wz + b, \Psi)
            = \log\mathcal N(x; Wm + b, \Psi) - \tfrac12\operatorname{tr}(\Psi^{-1} W S W^\top)

    x (..., D), m (..., K) and S (K, K) or (..., K, K) broadcast over their leading axes.
    """
    weight = _weight(weight)
    d, k = weight.shape
    bias = _bias(bias, d)
    x = _vectors(x, "x", d, "the data dimension D")
    mean_q = _vectors(mean_q, "mean_q", k, "the latent dimension K")
    cov_q = _covariances(cov_q, "cov_q", k)
    batch = np.broadcast_shapes(x.shape[:-1], mean_q.shape[:-1], cov_q.shape[:-2])
    x = np.broadcast_to(x, (*batch, d)).reshape(-1, d)
    mean_q = np.broadcast_to(mean_q, (*batch, k)).reshape(-1, k)
    cov_q = np.broadcast_to(cov_q, (*batch, k, k)).reshape(-1, k, k)
    psi = noise_covariance(noise_variance, d)
    psi_inv = np.linalg.inv(psi)
    at_mean = _logpdf(x - mean_q @ weight.T - bias, psi)
    spread = np.array([np.trace(psi_inv @ weight @ s @ weight.T) for s in cov_q])
    return _result(at_mean - 0.5 * spread, batch)


def elbo(weight, bias, noise_variance, x, mean_q, cov_q):
    """ELBO(q) = E_q log p(x|z) − KL(q ‖ p(z)); broadcasts like :func:`expected_log_likelihood`."""
    reconstruction = expected_log_likelihood(weight, bias, noise_variance, x, mean_q, cov_q)
    return reconstruction - kl_to_prior(mean_q, cov_q)


# -- the hierarchical model (toyvae.HierarchicalLinearGaussian) ---------------------------------

__all__ += ["gaussian_chain", "hierarchical_exact"]


def gaussian_chain(
    top_mean, top_cov, weights, biases, covariances
) -> tuple[np.ndarray, np.ndarray]:
    """The joint (mean, covariance) of y_0, …, y_n: y_0 ~ N(m, P), y_j = W_j y_{j−1} + b_j + e_j.

    e_j ~ N(0, Σ_j) independent; lists in generation order (W_1, …, W_n). By the textbook
    propagation (Bishop, *Pattern Recognition and Machine Learning*, §2.3.3): E y_j = W_j E y_{j−1}
    + b_j, Cov(y_j, y_i) = W_j Cov(y_{j−1}, y_i) for i < j, Var y_j = W_j Var(y_{j−1}) W_jᵀ + Σ_j.
    Returns the stacked mean (Σ sizes,) and the dense covariance, y_0 first.
    """
    mean = _array(top_mean, "top_mean")
    cov = _covariances(top_cov, "top_cov", mean.shape[-1])
    previous = slice(0, mean.shape[-1])
    for j, (weight, bias, sigma) in enumerate(zip(weights, biases, covariances, strict=True)):
        weight = _array(weight, f"weights[{j}]")
        n = weight.shape[0]
        bias = np.zeros(n) if bias is None else _array(bias, f"biases[{j}]")
        sigma = _covariances(sigma, f"covariances[{j}]", n)
        cross = weight @ cov[previous, :]  # Cov(y_j, everything so far)
        variance = weight @ cov[previous, previous] @ weight.T + sigma
        cov = np.block([[cov, cross.T], [cross, variance]])
        mean = np.concatenate([mean, weight @ mean[previous] + bias])
        previous = slice(len(mean) - n, len(mean))
    return mean, cov


def hierarchical_exact(weights, biases, noise_variances, x):
    """log p(x) and p(z|x) of the hierarchical model, by Gaussian conditioning of the dense joint.

    The model of :class:`toyvae.HierarchicalLinearGaussian`: lists ordered from the data side
    (``weights[0]`` is W_0, (D, K_1)); ``biases`` None or a list with None entries for zeros;
    ``noise_variances`` one variance shared by all layers or a list (scalar, vector or matrix
    each). The joint of (z_L, …, z_1, x) comes from :func:`gaussian_chain`; then p(x) is its
    x-marginal, by scipy, and the posterior is the textbook conditional (Bishop §2.3.1):

        μ = μ_z + Σ_zx Σ_xx⁻¹ (x − μ_x),     Σ = Σ_zz − Σ_zx Σ_xx⁻¹ Σ_xz.

    Returns ``(log_evidence, means, covariance)``: log p(x) of shape x.shape[:-1] (a float for
    one x), posterior means (..., K) over the flat latents (z_L, …, z_1), and the (K, K)
    posterior covariance.
    """
    weights = [_array(w, f"weights[{layer}]") for layer, w in enumerate(weights)]
    sizes = [w.shape[0] for w in weights]
    num_layers = len(weights)
    biases = [None] * num_layers if biases is None else list(biases)
    if not isinstance(noise_variances, list | tuple):
        noise_variances = [noise_variances] * num_layers
    noises = [noise_covariance(v, n) for v, n in zip(noise_variances, sizes, strict=True)]
    top = weights[-1].shape[1]
    order = list(range(num_layers - 1, -1, -1))  # generation order: W_{L−1}, …, W_0
    mean, cov = gaussian_chain(
        np.zeros(top),
        np.eye(top),
        [weights[layer] for layer in order],
        [biases[layer] for layer in order],
        [noises[layer] for layer in order],
    )
    d = sizes[0]
    x = _vectors(x, "x", d, "the data dimension D")
    k = len(mean) - d
    z, o = slice(0, k), slice(k, k + d)
    log_evidence = _result(_logpdf(x - mean[o], cov[o, o]), x.shape[:-1])
    gain = cov[z, o] @ np.linalg.inv(cov[o, o])  # Σ_zx Σ_xx⁻¹, (K, D)
    means = mean[z] + (x - mean[o]) @ gain.T
    covariance = cov[z, z] - gain @ cov[o, z]
    return log_evidence, means, covariance


# -- the state-space model (toyvae.LinearGaussianSSM) -------------------------------------------

__all__ += ["ssm_exact", "ssm_moments"]


def ssm_moments(
    transition,
    transition_noise,
    emission,
    emission_noise,
    emission_bias,
    initial_mean,
    initial_covariance,
    num_steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stacked prior and data moments of the linear-Gaussian state-space model.

    z₁ ~ N(m₀, P₀), z_t = A z_{t−1} + N(0, Q), x_t = C z_t + d + N(0, R). By the textbook
    propagation (Bishop, *Pattern Recognition and Machine Learning*, §13.3): E z_t = A^{t−1} m₀,
    Var z_t = A Var(z_{t−1}) Aᵀ + Q, Cov(z_t, z_s) = A^{t−s} Var z_s for t ≥ s; and
    x_{1:T} = (I_T ⊗ C) z_{1:T} + 1_T ⊗ d + noise of covariance I_T ⊗ R.
    Returns ``(mean_z (TK,), cov_z (TK, TK), mean_x (TD,), cov_x (TD, TD))``. Noise arguments
    are a scalar, a vector of variances or a matrix (``noise_covariance``); ``None`` for d, m₀,
    P₀ means zeros, zeros and the identity.
    """
    a = _array(transition, "transition")
    c = _array(emission, "emission")
    d_size, k = c.shape
    q = noise_covariance(transition_noise, k)
    r = noise_covariance(emission_noise, d_size)
    d = np.zeros(d_size) if emission_bias is None else _array(emission_bias, "emission_bias")
    m0 = np.zeros(k) if initial_mean is None else _array(initial_mean, "initial_mean")
    p0 = np.eye(k) if initial_covariance is None else noise_covariance(initial_covariance, k)
    means, variances = [m0], [p0]
    for _ in range(1, num_steps):
        means.append(a @ means[-1])
        variances.append(a @ variances[-1] @ a.T + q)
    cov_z = np.zeros((num_steps * k, num_steps * k))
    for s in range(num_steps):
        block = variances[s]
        for t in range(s, num_steps):
            cov_z[t * k : (t + 1) * k, s * k : (s + 1) * k] = block
            cov_z[s * k : (s + 1) * k, t * k : (t + 1) * k] = block.T
            block = a @ block
    stacked_c = np.kron(np.eye(num_steps), c)
    mean_z = np.concatenate(means)
    mean_x = stacked_c @ mean_z + np.tile(d, num_steps)
    cov_x = stacked_c @ cov_z @ stacked_c.T + np.kron(np.eye(num_steps), r)
    return mean_z, cov_z, mean_x, cov_x


def ssm_exact(
    transition,
    transition_noise,
    emission,
    emission_noise,
    emission_bias,
    initial_mean,
    initial_covariance,
    x,
):
    """log p(x_{1:T}) and p(z_{1:T}|x) of the state-space model, by dense Gaussian conditioning.

    x is (..., T, D). log p(x) is scipy's log-density of the stacked x under N(mean_x, cov_x)
    from :func:`ssm_moments`; the posterior is the textbook conditional (Bishop §2.3.1),
    μ = μ_z + Σ_zx Σ_xx⁻¹ (x − μ_x), Σ = Σ_zz − Σ_zx Σ_xx⁻¹ Σ_xz. Returns
    ``(log_evidence, means (..., T·K), covariance (T·K, T·K))``.
    """
    x = _array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, D), got shape {x.shape}")
    num_steps = x.shape[-2]
    mean_z, cov_z, mean_x, cov_x = ssm_moments(
        transition,
        transition_noise,
        emission,
        emission_noise,
        emission_bias,
        initial_mean,
        initial_covariance,
        num_steps,
    )
    stacked = x.reshape(*x.shape[:-2], -1)
    stacked_c = np.kron(np.eye(num_steps), _array(emission, "emission"))
    cross = cov_z @ stacked_c.T  # Σ_zx
    gain = cross @ np.linalg.inv(cov_x)
    log_evidence = _result(_logpdf(stacked - mean_x, cov_x), x.shape[:-2])
    means = mean_z + (stacked - mean_x) @ gain.T
    return log_evidence, means, cov_z - gain @ cross.T
