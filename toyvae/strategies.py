"""Hypothesis strategies for linear-Gaussian models, Gaussian variational distributions and data.

All strategies are built from bounded floats with ``map``/``flatmap`` (no ``filter``), so they
shrink towards small, simple examples: zero weights, unit variances, standard-normal q.
Bounds are keyword-only; the defaults keep every exact computation well conditioned:
the posterior precision I + WᵀΨ⁻¹W has condition number at most
1 + D·max_weight²/min_noise_variance.

Requires the ``hypothesis`` package (a test dependency of toyvae).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae.model import LinearGaussian

__all__ = ["gaussians", "linear_gaussian_models", "observations"]

NOISE_KINDS = ("isotropic", "diagonal", "full")


def _bounded(shape, bound: float) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays with entries in [-bound, bound], shrinking towards zero."""
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=64)
    return arrays(np.float64, shape, elements=elements)


def _log_uniform(shape, low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    """Positive float64 arrays, log-uniform on [low, high]; shrinks towards sqrt(low·high)."""
    centre = 0.5 * (math.log(low) + math.log(high))
    half = 0.5 * (math.log(high) - math.log(low))
    return _bounded(shape, half).map(lambda u: np.exp(centre + u))


@st.composite
def _noise(draw, kind: str, data_dim: int, low: float, high: float) -> np.ndarray:
    if kind == "isotropic":
        return draw(_log_uniform((), low, high))
    variances = draw(_log_uniform((data_dim,), low, high))
    if kind == "diagonal":
        return variances
    # Full Ψ = Q diag(v) Qᵀ with Q orthogonal (from a QR of a bounded matrix): its eigenvalues
    # stay in [low, high] whatever the rotation, so the bounds mean the same for every kind.
    basis = draw(_bounded((data_dim, data_dim), 1.0)) + np.eye(data_dim)
    q, _ = np.linalg.qr(basis)
    psi = (q * variances) @ q.T
    return 0.5 * (psi + psi.T)


def linear_gaussian_models(
    *,
    min_data_dim: int = 1,
    max_data_dim: int = 6,
    min_latent_dim: int = 1,
    max_latent_dim: int = 3,
    max_weight: float = 3.0,
    max_bias: float = 3.0,
    min_noise_variance: float = 0.05,
    max_noise_variance: float = 20.0,
    noise_kinds: tuple[str, ...] = NOISE_KINDS,
) -> st.SearchStrategy[LinearGaussian]:
    """Float64 ``LinearGaussian`` models.

    Weights and biases are uniform in ``[-max_weight, max_weight]`` and
    ``[-max_bias, max_bias]``; noise variances (eigenvalues of Ψ, for full noise) are
    log-uniform in ``[min_noise_variance, max_noise_variance]``; ``noise_kinds`` is a subset
    of ``("isotropic", "diagonal", "full")``.
    """
    unknown = set(noise_kinds) - set(NOISE_KINDS)
    if unknown or not noise_kinds:
        raise ValueError(
            f"noise_kinds must be a non-empty subset of {NOISE_KINDS}, got {noise_kinds}"
        )

    @st.composite
    def models(draw) -> LinearGaussian:
        d = draw(st.integers(min_data_dim, max_data_dim))
        k = draw(st.integers(min_latent_dim, max_latent_dim))
        kind = draw(st.sampled_from(noise_kinds))
        weight = draw(_bounded((d, k), max_weight))
        bias = draw(_bounded((d,), max_bias))
        noise = draw(_noise(kind, d, min_noise_variance, max_noise_variance))
        return LinearGaussian(weight, bias, noise)

    return models()


def gaussians(
    dim: int,
    *,
    batch_shape: tuple[int, ...] = (),
    kinds: tuple[str, ...] = ("full", "diagonal"),
    max_mean: float = 3.0,
    min_scale: float = 0.1,
    max_scale: float = 3.0,
    max_correlation: float = 1.0,
) -> st.SearchStrategy[MultivariateNormal | Independent]:
    """Float64 Gaussians with event shape ``(dim,)``: what VAE encoders produce.

    ``"full"`` gives a ``MultivariateNormal`` with a lower-triangular scale whose diagonal is
    log-uniform in ``[min_scale, max_scale]`` and whose off-diagonal entries are at most
    ``max_correlation`` times the diagonal entry of their row; ``"diagonal"`` gives an
    ``Independent(Normal, 1)``. Means are uniform in ``[-max_mean, max_mean]``.
    """
    shape = (*batch_shape, dim)

    @st.composite
    def draw_gaussian(draw):
        kind = draw(st.sampled_from(kinds))
        loc = torch.as_tensor(draw(_bounded(shape, max_mean)))
        scales = torch.as_tensor(draw(_log_uniform(shape, min_scale, max_scale)))
        if kind == "diagonal":
            return Independent(Normal(loc, scales), 1)
        off = torch.as_tensor(draw(_bounded((*shape, dim), max_correlation)))
        tril = torch.tril(off, diagonal=-1) * scales.unsqueeze(-1) + torch.diag_embed(scales)
        return MultivariateNormal(loc, scale_tril=tril)

    return draw_gaussian()


def observations(
    model, *, batch_shape: tuple[int, ...] = (), max_abs: float = 10.0
) -> st.SearchStrategy[torch.Tensor]:
    """Data x of shape ``(*batch_shape, *model.data_event_shape)``, in ``[-max_abs, max_abs]``.

    ``model`` is any :class:`toyvae.ConjugateModel` (bound to a length, for a state-space model).

    Not drawn from the model: the identities hold for every x, and arbitrary x reach the tails
    that sampling from p(x) rarely visits.
    """
    shape = (*batch_shape, *model.data_event_shape)
    return _bounded(shape, max_abs).map(
        lambda a: torch.as_tensor(a, dtype=model.dtype, device=model.device)
    )


# -- hierarchical models (toyvae.HierarchicalLinearGaussian) ----------------------------------

__all__ += ["hierarchical_models", "top_down_gaussians"]


def hierarchical_models(
    *,
    min_layers: int = 2,
    max_layers: int = 3,
    min_data_dim: int = 1,
    max_data_dim: int = 4,
    min_layer_dim: int = 1,
    max_layer_dim: int = 3,
    max_weight: float = 1.5,
    max_bias: float = 2.0,
    min_noise_variance: float = 0.1,
    max_noise_variance: float = 10.0,
    noise_kinds: tuple[str, ...] = NOISE_KINDS,
):
    """Float64 ``HierarchicalLinearGaussian`` models with L in ``[min_layers, max_layers]``.

    Each layer's size is in ``[min_layer_dim, max_layer_dim]`` and each Ψ_l's kind is drawn from
    ``noise_kinds``; weights, biases and noise variances are drawn as in
    :func:`linear_gaussian_models`. The prior variance of z_1 grows like a product of the
    layers' ‖W_l‖², so the default ``max_weight`` is smaller than that strategy's.
    """
    from toyvae.hierarchical import HierarchicalLinearGaussian

    unknown = set(noise_kinds) - set(NOISE_KINDS)
    if unknown or not noise_kinds:
        raise ValueError(
            f"noise_kinds must be a non-empty subset of {NOISE_KINDS}, got {noise_kinds}"
        )
    if min_layers < 2 or max_layers < min_layers:
        raise ValueError(
            f"need 2 ≤ min_layers ≤ max_layers, got min_layers={min_layers}, "
            f"max_layers={max_layers}"
        )

    @st.composite
    def models(draw) -> HierarchicalLinearGaussian:
        num_layers = draw(st.integers(min_layers, max_layers))
        d = draw(st.integers(min_data_dim, max_data_dim))
        dims = [d] + [draw(st.integers(min_layer_dim, max_layer_dim)) for _ in range(num_layers)]
        weights, biases, noises = [], [], []
        for layer in range(num_layers):
            rows, columns = dims[layer], dims[layer + 1]
            weights.append(draw(_bounded((rows, columns), max_weight)))
            biases.append(draw(_bounded((rows,), max_bias)))
            kind = draw(st.sampled_from(noise_kinds))
            noises.append(draw(_noise(kind, rows, min_noise_variance, max_noise_variance)))
        return HierarchicalLinearGaussian(weights, biases, noises)

    return models()


def top_down_gaussians(
    model,
    *,
    batch_shape: tuple[int, ...] = (),
    max_mean: float = 3.0,
    min_scale: float = 0.1,
    max_scale: float = 3.0,
    max_weight: float = 2.0,
    max_correlation: float = 1.0,
):
    """Float64 ``TopDownGaussian`` q over ``model``'s layers, means of batch shape ``batch_shape``.

    Each conditional's weight A_l is either a ladder (on the layer above) or over all the layers
    above, entries uniform in ``[-max_weight, max_weight]``; each S_l is lower triangular with a
    diagonal log-uniform in ``[min_scale, max_scale]`` and off-diagonal entries at most
    ``max_correlation`` times their row's diagonal entry; means (an encoder's output) are
    uniform in ``[-max_mean, max_mean]``.
    """
    from toyvae.hierarchical import TopDownGaussian

    dims = model.layer_dims

    @st.composite
    def draw_q(draw) -> TopDownGaussian:
        locs, trils, weights = [], [], []
        for layer, k in enumerate(dims):
            locs.append(torch.as_tensor(draw(_bounded((*batch_shape, k), max_mean))))
            scales = torch.as_tensor(draw(_log_uniform((k,), min_scale, max_scale)))
            off = torch.as_tensor(draw(_bounded((k, k), max_correlation)))
            trils.append(torch.tril(off, -1) * scales.unsqueeze(-1) + torch.diag_embed(scales))
            if layer < len(dims) - 1:
                above = dims[layer + 1] if draw(st.booleans()) else sum(dims[layer + 1 :])
                weights.append(torch.as_tensor(draw(_bounded((k, above), max_weight))))
        return TopDownGaussian(locs, trils, weights)

    return draw_q()


# -- state-space models (toyvae.LinearGaussianSSM) ----------------------------------------------

__all__ += ["sequences", "state_space_models"]


def state_space_models(
    *,
    min_state_dim: int = 1,
    max_state_dim: int = 3,
    min_data_dim: int = 1,
    max_data_dim: int = 4,
    min_num_steps: int = 1,
    max_num_steps: int = 6,
    max_transition_norm: float = 0.95,
    max_emission: float = 2.0,
    max_bias: float = 2.0,
    min_noise_variance: float = 0.1,
    max_noise_variance: float = 10.0,
    noise_kinds: tuple[str, ...] = NOISE_KINDS,
):
    """Float64 ``LinearGaussianSSM`` models bound to a length T ∈ [min_num_steps, max_num_steps].

    A is a matrix with entries in [−1, 1] scaled so that its spectral norm is at most
    ``max_transition_norm`` (= ρ). Exactness needs no bound on A, but with ρ < 1 every prior
    variance stays below λ_max(P₀) + λ_max(Q)/(1 − ρ²) whatever T, so the conditioning of the
    posterior precision does not grow with the length. C and d are uniform in
    ``[-max_emission, max_emission]`` and ``[-max_bias, max_bias]``; the eigenvalues of Q, R
    and P₀ are log-uniform in ``[min_noise_variance, max_noise_variance]``, each of a kind
    drawn from ``noise_kinds`` (for P₀: from those kinds too).
    """
    from toyvae.state_space import LinearGaussianSSM

    unknown = set(noise_kinds) - set(NOISE_KINDS)
    if unknown or not noise_kinds:
        raise ValueError(
            f"noise_kinds must be a non-empty subset of {NOISE_KINDS}, got {noise_kinds}"
        )

    def scaled(matrix: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(matrix, 2)
        return matrix * (max_transition_norm / max(1.0, norm))

    @st.composite
    def models(draw):
        k = draw(st.integers(min_state_dim, max_state_dim))
        d = draw(st.integers(min_data_dim, max_data_dim))
        t = draw(st.integers(min_num_steps, max_num_steps))
        transition = draw(_bounded((k, k), 1.0).map(scaled))
        emission = draw(_bounded((d, k), max_emission))
        bias = draw(_bounded((d,), max_bias))
        initial_mean = draw(_bounded((k,), max_bias))
        noises = [
            draw(
                _noise(
                    draw(st.sampled_from(noise_kinds)), size, min_noise_variance, max_noise_variance
                )
            )
            for size in (k, d, k)
        ]
        return LinearGaussianSSM(
            transition,
            noises[0],
            emission,
            noises[1],
            emission_bias=bias,
            initial_mean=initial_mean,
            initial_covariance=noises[2],
            num_steps=t,
        )

    return models()


def sequences(model, *, batch_shape: tuple[int, ...] = (), max_abs: float = 10.0):
    """Data x of shape ``(*batch_shape, T, D)`` for a bound ``LinearGaussianSSM``, uniform in
    ``[-max_abs, max_abs]`` (not drawn from the model: the identities hold for every x)."""
    shape = (*batch_shape, *model.data_event_shape)
    return _bounded(shape, max_abs).map(
        lambda a: torch.as_tensor(a, dtype=model.dtype, device=model.device)
    )
