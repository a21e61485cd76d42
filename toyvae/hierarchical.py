r"""The hierarchical linear-Gaussian model z_L → … → z_1 → x, a top-down q, and the per-layer ELBO.

The model has L ≥ 2 latent layers of sizes K_1, …, K_L:

    z_L ~ N(0, I),   z_l | z_{l+1} ~ N(W_l z_{l+1} + b_l, Ψ_l)  (l = L−1, …, 1),
    x | z_1 ~ N(W_0 z_1 + b_0, Ψ_0).

Per-layer lists are ordered from the data side (``weights[0]`` is W_0, of shape (D, K_1)); the
flat latent vector z of size K = K_1 + … + K_L is ordered *top-down*, z = (z_L, …, z_1). In that
order the chain z_l = W_l z_{l+1} + b_l + L_{Ψ_l} ε_l is z = m + T ε with T block lower
triangular and lower-triangular diagonal blocks: the prior's Cholesky factor, built exactly.

The hierarchy is one big linear-Gaussian model: prior N(m, T Tᵀ) over z and
x | z ~ N([0 … 0, W_0] z + b_0, Ψ_0). Its exact evidence and posterior are those of a
:class:`toyvae.LinearGaussian` with that prior, so there is one implementation of them.

A top-down q (:class:`TopDownGaussian`) has the same shape as the prior, q(z_L) ∏ q(z_l | z_{>l}),
and :func:`layerwise_elbo` computes the ELBO as hierarchical VAEs write it, one KL per layer,
each averaged in closed form over q's layers above.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.distributions import MultivariateNormal

from toyvae._checks import (
    as_tensor,
    broadcast_batch,
    check_finite,
    check_last_dim,
    check_ndim,
    check_positive,
    describe,
)
from toyvae._frozen import Frozen
from toyvae.bounds import as_model_dtype, kl_to_posterior
from toyvae.gaussians import LOG_2PI, Gaussian, _kl, as_gaussian, standard_normal
from toyvae.interface import Exact
from toyvae.model import LinearGaussian
from toyvae.noise import noise_covariance

__all__ = ["HierarchicalLinearGaussian", "LayerwiseELBO", "TopDownGaussian", "layerwise_elbo"]


def _is_sequence(value) -> bool:
    return isinstance(value, list | tuple)


def _history(weight: torch.Tensor, width: int) -> torch.Tensor:
    """A conditional's weight over all the layers above, (…, K_l, width), in top-down order.

    A ladder weight (…, K_l, K_{l+1}) acts on the last K_{l+1} of them (the parent): zeros on
    its left. A weight that is already ``width`` wide is returned as it is.
    """
    missing = width - weight.shape[-1]
    if missing == 0:
        return weight
    zeros = weight.new_zeros(*weight.shape[:-1], missing)
    return torch.cat([zeros, weight], -1)


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _joint(
    locs: Sequence[torch.Tensor],
    scale_trils: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    batch: tuple[int, ...],
) -> Gaussian:
    r"""The joint N(μ, T Tᵀ) of a top-down Gaussian over z = (z_L, …, z_1), built exactly.

    Ancestral form: z_L = m_L + S_L ε_L, z_l = A_l z_{>l} + m_l + S_l ε_l, so with T_{>l} the
    factor of the layers above, the block row of z_l is [A_l T_{>l}, S_l, 0] and its mean is
    A_l μ_{>l} + m_l. No covariance is formed or factored.
    """
    dims = [loc.shape[-1] for loc in locs]
    total = sum(dims)
    top = len(locs) - 1
    means: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    above = 0  # Σ_{j>l} K_j: the size of the layers above the current one
    for layer in range(top, -1, -1):
        k = dims[layer]
        scale = scale_trils[layer].expand(*batch, k, k)
        loc = locs[layer].expand(*batch, k)
        right = scale.new_zeros(*batch, k, total - above - k)
        if layer == top:
            means.append(loc)
            rows.append(torch.cat([scale, right], -1))
        else:
            mean_above = torch.cat(means, -1)
            tril_above = torch.cat(rows, -2)[..., :above]
            a = _history(weights[layer], above)
            means.append(_matvec(a, mean_above) + loc)
            rows.append(torch.cat([a @ tril_above, scale, right], -1))
        above += k
    return Gaussian(torch.cat(means, -1), torch.cat(rows, -2))


class TopDownGaussian(Frozen):
    r"""A Gaussian over a hierarchy's latents, as top-down conditionals (a ladder encoder's q).

    .. math::
        q(z) = q(z_L)\prod_{l<L} q(z_l\mid z_{>l}), \qquad
        q(z_L) = \mathcal N(m_L, S_L S_L^\top), \qquad
        q(z_l\mid z_{>l}) = \mathcal N(A_l z_{>l} + m_l, S_l S_l^\top)

    Lists are ordered from the data side, like :class:`HierarchicalLinearGaussian`'s, by layer
    l = 1, …, L at position l − 1.

    Parameters
    ----------
    locs : list of L tensors or arrays
        ``locs[l-1]`` is m_l, shape (…, K_l); ``locs[-1]`` is q(z_L)'s mean. May carry a batch
        shape (an encoder's output for a batch of x).
    scale_trils : list of L tensors or arrays
        ``scale_trils[l-1]`` is S_l, (…, K_l, K_l), lower triangular with a positive diagonal.
    weights : list of L − 1 tensors or arrays
        ``weights[l-1]`` is A_l. Either (…, K_l, K_{l+1}): a *ladder* conditional on the layer
        directly above (q(z_l | z_{l+1}); it pairs with the model's ``weights[l]``), or
        (…, K_l, K_{l+1} + … + K_L): a conditional on all the layers above, in the flat
        top-down order (z_L, …, z_{l+1}), which is what :meth:`from_multivariate_normal`
        returns, since a general Gaussian's conditionals depend on every layer above.

    Batch shapes broadcast. NumPy becomes float64; every tensor takes ``locs[0]``'s dtype and
    device. Immutable.
    """

    def __init__(self, locs, scale_trils, weights):
        if not _is_sequence(locs) or len(locs) < 2:
            raise (ValueError if _is_sequence(locs) else TypeError)(
                "locs must be a list of L ≥ 2 mean vectors [m_1 (…, K_1), …, m_L (…, K_L)], "
                f"got {describe(locs) if not _is_sequence(locs) else f'{len(locs)} of them'}"
            )
        num_layers = len(locs)
        first = as_tensor(locs[0], "locs[0]")
        like = first
        checked_locs = []
        for i, loc in enumerate(locs):
            name = f"locs[{i}]"
            loc = first if i == 0 else as_tensor(loc, name, like=like)
            if loc.ndim == 0 or loc.shape[-1] == 0:
                raise ValueError(
                    f"{name} must be a mean vector (…, K_{i + 1}) with K_{i + 1} ≥ 1, "
                    f"got {describe(loc)}"
                )
            check_finite(loc, name)
            checked_locs.append(loc)
        dims = [loc.shape[-1] for loc in checked_locs]

        _check_length(scale_trils, "scale_trils", num_layers, "one lower-triangular S_l per layer")
        checked_scales = []
        for i, scale in enumerate(scale_trils):
            name = f"scale_trils[{i}]"
            scale = as_tensor(scale, name, like=like)
            k = dims[i]
            if scale.ndim < 2 or scale.shape[-2:] != (k, k):
                raise ValueError(
                    f"{name} must have shape (…, {k}, {k}) (K_{i + 1} from locs[{i}]), "
                    f"got {describe(scale)}"
                )
            check_finite(scale, name)
            _check_lower_triangular(scale, name)
            checked_scales.append(scale)

        _check_length(weights, "weights", num_layers - 1, "one A_l per layer below the top")
        checked_weights = []
        for i, weight in enumerate(weights):
            name = f"weights[{i}]"
            weight = as_tensor(weight, name, like=like)
            k, parent, history = dims[i], dims[i + 1], sum(dims[i + 1 :])
            if (
                weight.ndim < 2
                or weight.shape[-2] != k
                or weight.shape[-1] not in (parent, history)
            ):
                widths = f"{parent}" if parent == history else f"{parent} or {history}"
                raise ValueError(
                    f"{name} must have shape (…, {k}, {widths}) (K_{i + 1} rows; columns for "
                    f"the layer above, K_{i + 2}, or for all the layers above), "
                    f"got {describe(weight)}"
                )
            check_finite(weight, name)
            checked_weights.append(weight)

        shapes = {f"locs[{i}]": t.shape[:-1] for i, t in enumerate(checked_locs)}
        shapes |= {f"scale_trils[{i}]": t.shape[:-2] for i, t in enumerate(checked_scales)}
        shapes |= {f"weights[{i}]": t.shape[:-2] for i, t in enumerate(checked_weights)}
        batch = broadcast_batch(**shapes)
        self._freeze(
            {},
            locs=tuple(checked_locs),
            scale_trils=tuple(checked_scales),
            weights=tuple(checked_weights),
            batch_shape=torch.Size(batch),
        )

    @classmethod
    def _unchecked(cls, locs, scale_trils, weights, batch) -> TopDownGaussian:
        """From parts already checked (the model's prior, a factored Gaussian)."""
        self = cls.__new__(cls)
        self._freeze(
            {},
            locs=tuple(locs),
            scale_trils=tuple(scale_trils),
            weights=tuple(weights),
            batch_shape=torch.Size(batch),
        )
        return self

    def __repr__(self) -> str:
        return (
            f"TopDownGaussian(layer_dims={self.layer_dims}, batch_shape={tuple(self.batch_shape)}, "
            f"dtype={self.dtype})"
        )

    @property
    def locs(self) -> tuple[torch.Tensor, ...]:
        """(m_1, …, m_L): the conditional means' offsets, data side first."""
        return self._locs

    @property
    def scale_trils(self) -> tuple[torch.Tensor, ...]:
        """(S_1, …, S_L): the conditionals' lower Cholesky factors."""
        return self._scale_trils

    @property
    def weights(self) -> tuple[torch.Tensor, ...]:
        """(A_1, …, A_{L−1}): ladder (K_l, K_{l+1}) or all-layers-above (K_l, Σ_{j>l} K_j)."""
        return self._weights

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    @property
    def layer_dims(self) -> tuple[int, ...]:
        """(K_1, …, K_L)."""
        return tuple(loc.shape[-1] for loc in self._locs)

    @property
    def num_layers(self) -> int:
        return len(self._locs)

    @property
    def latent_dim(self) -> int:
        """K = K_1 + … + K_L."""
        return sum(self.layer_dims)

    @property
    def dtype(self) -> torch.dtype:
        return self._locs[0].dtype

    def _joint(self) -> Gaussian:
        return _joint(self._locs, self._scale_trils, self._weights, tuple(self._batch_shape))

    def to_multivariate_normal(self) -> MultivariateNormal:
        r"""The joint q(z) over the flat latents z = (z_L, …, z_1), event shape (K,).

        Its ``scale_tril`` is block lower triangular, built exactly from the conditionals:
        the block row of z_l is [A_l T_{>l}, S_l, 0], with T_{>l} the factor of the layers
        above; its mean is A_l μ_{>l} + m_l. No covariance is formed or factored.
        """
        joint = self._joint()
        return joint.distribution()

    def elbo(self, model: HierarchicalLinearGaussian, x) -> torch.Tensor:
        """The per-layer ELBO (:func:`layerwise_elbo`): what :func:`toyvae.elbo` computes for q."""
        return layerwise_elbo(model, x, self).elbo

    def kl_to_posterior(self, model: HierarchicalLinearGaussian, x) -> torch.Tensor:
        """KL(q ‖ p(z|x)) from q's joint factor and the exact posterior's (no per-layer route)."""
        return kl_to_posterior(model, x, self.to_multivariate_normal())

    @classmethod
    def from_multivariate_normal(cls, q, layer_dims) -> TopDownGaussian:
        r"""The top-down conditionals of any Gaussian q over the flat latents (z_L, …, z_1).

        Block Cholesky: with q = N(μ, T Tᵀ) and T partitioned by layers, z = μ + T ε gives
        q(z_l | z_{>l}) = N(A_l z_{>l} + m_l, S_l S_lᵀ) with

            S_l = T_{l,l},   A_l = T_{l,>l} T_{>l,>l}⁻¹,   m_l = μ_l − A_l μ_{>l},

        one triangular solve per layer. Every A_l is returned over all the layers above (a
        general Gaussian's conditionals depend on all of them; for the exact posterior of a
        :class:`HierarchicalLinearGaussian` only the parent block is nonzero, to rounding).

        ``q`` is a ``MultivariateNormal`` or ``Independent(Normal, 1)`` with event shape (K,);
        ``layer_dims`` is (K_1, …, K_L), e.g. a model's
        :attr:`~HierarchicalLinearGaussian.layer_dims`.
        """
        dims = _check_layer_dims(layer_dims)
        g = as_gaussian(q, "q", dim=sum(dims))
        batch = tuple(g.loc.shape[:-1])
        tril, mean = g.scale_tril, g.loc
        _check_lower_triangular(tril, "q's scale_tril")
        locs, scales, weights = [], [], []
        start = 0
        for layer in range(len(dims) - 1, -1, -1):
            k = dims[layer]
            block = slice(start, start + k)
            scales.append(tril[..., block, block])
            if start == 0:
                locs.append(mean[..., block])
            else:
                a = torch.linalg.solve_triangular(
                    tril[..., :start, :start], tril[..., block, :start], upper=False, left=False
                )
                weights.append(a)
                locs.append(mean[..., block] - _matvec(a, mean[..., :start]))
            start += k
        return cls._unchecked(locs[::-1], scales[::-1], weights[::-1], batch)


def _check_length(value, name: str, length: int, what: str) -> None:
    if not _is_sequence(value):
        raise TypeError(f"{name} must be a list or tuple ({what}), got {describe(value)}")
    if len(value) != length:
        raise ValueError(f"{name} must hold {length} entries ({what}), got {len(value)}")


def _check_lower_triangular(matrix: torch.Tensor, name: str) -> None:
    above = matrix.detach().triu(1)
    if bool((above != 0).any()):
        raise ValueError(
            f"{name} must be lower triangular (a Cholesky factor), got entries above the "
            f"diagonal up to {above.abs().max().item():.3g} in magnitude"
        )
    check_positive(matrix.diagonal(dim1=-2, dim2=-1), f"{name}'s diagonal")


def _check_layer_dims(layer_dims) -> tuple[int, ...]:
    if not _is_sequence(layer_dims) or len(layer_dims) < 2:
        raise (ValueError if _is_sequence(layer_dims) else TypeError)(
            f"layer_dims must be a list or tuple of L ≥ 2 layer sizes (K_1, …, K_L), "
            f"got {describe(layer_dims)}"
        )
    for k in layer_dims:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(
                f"layer_dims must hold positive integers (K_1, …, K_L), got {tuple(layer_dims)}"
            )
    return tuple(int(k) for k in layer_dims)


class HierarchicalLinearGaussian(Frozen):
    r"""A linear-Gaussian model with L ≥ 2 latent layers z_L → … → z_1 → x.

    .. math::
        z_L \sim \mathcal N(0, I), \qquad
        z_l \mid z_{l+1} \sim \mathcal N(W_l z_{l+1} + b_l, \Psi_l)\ (l = L-1, \dots, 1),
        \qquad x \mid z_1 \sim \mathcal N(W_0 z_1 + b_0, \Psi_0)

    Parameters
    ----------
    weights : list or tuple of L matrices
        Ordered from the data side: ``weights[0]`` is W_0, (D, K_1), and ``weights[l]`` is W_l,
        (K_l, K_{l+1}). ``weights[0]``'s dtype and device are the model's (NumPy becomes
        float64); the others are converted to them.
    biases : list or tuple of L vectors (or ``None`` entries), optional
        ``biases[l]`` is b_l, of length D for l = 0 and K_l otherwise; zeros when ``None``.
    noise_variances : float, 0-d tensor, or a list or tuple of L variances
        Ψ_l, each a **variance** as in :class:`toyvae.LinearGaussian`: a scalar, a vector of
        variances or a full covariance matrix. A single scalar is shared by every layer.

    The flat latent vector is z = (z_L, …, z_1), top-down, of size K = K_1 + … + K_L: in that
    order the prior's Cholesky factor, and that of every :class:`TopDownGaussian`, is block
    lower triangular. :meth:`split_latents` cuts it into layers. The model implements
    :class:`toyvae.ConjugateModel`; it is immutable (a parameter modified in place makes every
    later call raise ``RuntimeError``), and every method is differentiable in the parameters.
    """

    def __init__(self, weights, biases=None, noise_variances=1.0):
        given: dict = {}
        if not _is_sequence(weights):
            raise TypeError(
                "weights must be a list or tuple of L ≥ 2 matrices [W_0 (D, K_1), W_1 (K_1, K_2), "
                f"…], ordered from the data side, got {describe(weights)}"
            )
        if len(weights) < 2:
            raise ValueError(
                "weights must hold L ≥ 2 matrices (one per latent layer), got "
                f"{len(weights)}; for a single latent layer use toyvae.LinearGaussian"
            )
        num_layers = len(weights)
        checked_weights: list[torch.Tensor] = []
        for layer, weight in enumerate(weights):
            name = f"weights[{layer}]"
            given[name] = weight
            like = checked_weights[0] if checked_weights else None
            weight = as_tensor(weight, name, like=like)
            rows = "D" if layer == 0 else f"K_{layer}"
            check_ndim(weight, name, (2,), f"a ({rows}, K_{layer + 1}) matrix")
            if 0 in weight.shape:
                raise ValueError(
                    f"{name} must have {rows} ≥ 1 rows and K_{layer + 1} ≥ 1 columns, "
                    f"got {describe(weight)}"
                )
            if layer > 0 and weight.shape[0] != checked_weights[-1].shape[1]:
                previous = tuple(checked_weights[-1].shape)
                raise ValueError(
                    f"{name} must have K_{layer} = {previous[1]} rows, the columns of "
                    f"weights[{layer - 1}] {previous}, got {describe(weight)}"
                )
            check_finite(weight, name)
            checked_weights.append(weight)
        like = checked_weights[0]
        sizes = [w.shape[0] for w in checked_weights]  # D, K_1, …, K_{L−1}: each layer's size

        if biases is None:
            biases = [None] * num_layers
        _check_length(biases, "biases", num_layers, "b_0, …, b_{L−1}; None entries for zeros")
        checked_biases = []
        for layer, (bias, size) in enumerate(zip(biases, sizes, strict=True)):
            name = f"biases[{layer}]"
            if bias is None:
                checked_biases.append(like.new_zeros(size))
                continue
            given[name] = bias
            bias = as_tensor(bias, name, like=like)
            if bias.shape != (size,):
                raise ValueError(
                    f"{name} must have shape ({size},), the rows of weights[{layer}] "
                    f"{tuple(checked_weights[layer].shape)}, got {describe(bias)}"
                )
            check_finite(bias, name)
            checked_biases.append(bias)

        if _is_sequence(noise_variances):
            _check_length(
                noise_variances, "noise_variances", num_layers, "Ψ_0, …, Ψ_{L−1}, one per layer"
            )
            per_layer = list(noise_variances)
            names = [f"noise_variances[{layer}]" for layer in range(num_layers)]
        else:
            shared = as_tensor(noise_variances, "noise_variances", like=like)
            if shared.ndim != 0:
                raise ValueError(
                    "noise_variances must be a scalar variance shared by every layer, or a list "
                    f"of {num_layers} per-layer variances (scalar, vector or matrix each), "
                    f"got {describe(noise_variances)}"
                )
            per_layer = [shared] * num_layers
            names = ["noise_variances"] * num_layers
            given["noise_variances"] = noise_variances
        noises = []
        for variance, size, name in zip(per_layer, sizes, names, strict=True):
            if name != "noise_variances":
                given[name] = variance
            noises.append(noise_covariance(as_tensor(variance, name, like=like), size, name))

        self._freeze(
            given,
            weights=tuple(checked_weights),
            biases=tuple(checked_biases),
            noises=tuple(noises),
        )

    def __repr__(self) -> str:
        kinds = ", ".join(noise.kind for noise in self._noises)
        return (
            f"HierarchicalLinearGaussian(data_dim={self.data_dim}, layer_dims={self.layer_dims}, "
            f"noise=({kinds}), dtype={self.dtype})"
        )

    # -- attributes ---------------------------------------------------------------------------

    @property
    def weights(self) -> tuple[torch.Tensor, ...]:
        """(W_0, …, W_{L−1}): W_0 is (D, K_1), W_l is (K_l, K_{l+1})."""
        return self._weights

    @property
    def biases(self) -> tuple[torch.Tensor, ...]:
        """(b_0, …, b_{L−1}): b_0 is (D,), b_l is (K_l,)."""
        return self._biases

    @property
    def noises(self) -> tuple:
        """(Ψ_0, …, Ψ_{L−1}) as noise objects (:mod:`toyvae.noise`)."""
        return self._noises

    @property
    def noise_variances(self) -> tuple[torch.Tensor, ...]:
        """(Ψ_0, …, Ψ_{L−1}) as given: 0-d, vector or matrix each, in the model's dtype."""
        return tuple(noise.variance for noise in self._noises)

    @property
    def num_layers(self) -> int:
        """L, the number of latent layers."""
        return len(self._weights)

    @property
    def layer_dims(self) -> tuple[int, ...]:
        """(K_1, …, K_L), data side first."""
        return tuple(weight.shape[1] for weight in self._weights)

    @property
    def data_dim(self) -> int:
        """D, the dimension of x."""
        return self._weights[0].shape[0]

    @property
    def latent_dim(self) -> int:
        """K = K_1 + … + K_L, the size of the flat latent vector."""
        return sum(self.layer_dims)

    @property
    def data_event_shape(self) -> torch.Size:
        """(D,): one observation is a vector."""
        return torch.Size([self.data_dim])

    @property
    def term_count(self) -> int:
        """D + K + L: the flat model's D + K terms, plus the L per-layer terms of the ELBO."""
        return self.data_dim + self.latent_dim + self.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self._weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self._weights[0].device

    # -- the flat latent vector ---------------------------------------------------------------

    def split_latents(self, z) -> tuple[torch.Tensor, ...]:
        """Cut flat latents z (…, K), ordered (z_L, …, z_1), into layers (z_1, …, z_L)."""
        z = self._check_z(z)
        top_down = z.split(self.layer_dims[::-1], dim=-1)
        return tuple(top_down[::-1])

    def join_latents(self, layers) -> torch.Tensor:
        """The flat latents (z_L, …, z_1) from layers (z_1, …, z_L), batch shapes broadcasting."""
        _check_length(layers, "layers", self.num_layers, "z_1, …, z_L")
        tensors = []
        for layer, (value, k) in enumerate(zip(layers, self.layer_dims, strict=True)):
            name = f"layers[{layer}]"
            value = as_tensor(value, name, like=self._weights[0])
            check_last_dim(value, name, k, f"the size K_{layer + 1} of latent layer {layer + 1}")
            check_finite(value, name)
            tensors.append(value)
        batch = broadcast_batch(**{f"layers[{i}]": t.shape[:-1] for i, t in enumerate(tensors)})
        return torch.cat([t.expand(*batch, t.shape[-1]) for t in tensors[::-1]], -1)

    def _check_z(self, z, name: str = "z") -> torch.Tensor:
        z = as_tensor(z, name, like=self._weights[0])
        check_last_dim(z, name, self.latent_dim, "the model's flat latent dimension K")
        check_finite(z, name)
        return z

    def check_data(self, x, name: str = "x") -> torch.Tensor:
        """x as a finite (…, D) tensor in the model's dtype, or ``ValueError``/``TypeError``."""
        x = as_tensor(x, name, like=self._weights[0])
        check_last_dim(x, name, self.data_dim, "the model's data dimension D")
        check_finite(x, name)
        return x

    # -- the prior ----------------------------------------------------------------------------

    def prior_top_down(self) -> TopDownGaussian:
        """p(z) as a :class:`TopDownGaussian`: m_l = b_l, S_l = L_{Ψ_l}, A_l = W_l; top N(0, I)."""
        self._verify()
        top = standard_normal(self.layer_dims[-1], self.dtype, self.device)
        latent = range(1, self.num_layers)
        return TopDownGaussian._unchecked(
            [*(self._biases[layer] for layer in latent), top.loc],
            [*(self._noises[layer].tril() for layer in latent), top.scale_tril],
            [self._weights[layer] for layer in latent],
            (),
        )

    def prior(self) -> MultivariateNormal:
        """p(z) over the flat latents (z_L, …, z_1); its Cholesky factor is built exactly."""
        return self.prior_top_down().to_multivariate_normal()

    # -- exact answers: one big linear-Gaussian model -----------------------------------------

    def as_linear_gaussian(self) -> LinearGaussian:
        """The same model as one :class:`toyvae.LinearGaussian` over the flat latents.

        Prior :meth:`prior`; x | z ~ N([0 … 0, W_0] z + b_0, Ψ_0). Built on each call (cheap),
        so that gradients reach the current parameters.
        """
        self._verify()
        weight = self._weights[0]
        padded = torch.cat(
            [weight.new_zeros(self.data_dim, self.latent_dim - weight.shape[1]), weight], -1
        )
        return LinearGaussian(padded, self._biases[0], self._noises[0].variance, prior=self.prior())

    def exact(self, x: torch.Tensor) -> Exact:
        """log p(x) and p(z|x) for a checked x (the :class:`toyvae.ConjugateModel` method)."""
        return self.as_linear_gaussian().exact(x)

    def elbo(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        """ELBO(q) for a checked x and canonical q over the flat latents, by
        :meth:`toyvae.LinearGaussian.elbo` (accurate near the posterior); the per-layer route of a
        top-down q is :meth:`TopDownGaussian.elbo`."""
        return self.as_linear_gaussian().elbo(x, q)

    def log_evidence(self, x) -> torch.Tensor:
        """log p_θ(x), shape ``x.shape[:-1]``, from :meth:`as_linear_gaussian`."""
        return self.exact(self.check_data(x)).log_evidence

    def posterior(self, x) -> MultivariateNormal:
        """p(z|x) over the flat latents (z_L, …, z_1), batch shape ``x.shape[:-1]``."""
        post = self.exact(self.check_data(x)).posterior
        return post.distribution()

    def expected_log_likelihood(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        r"""E_q log p(x|z_1) for a checked x and canonical q over the flat latents.

        .. math::
            -\tfrac12\big[D\log 2\pi + \log\det\Psi_0 + \lVert L_{\Psi_0}^{-1}(x - b_0 - W_0 m_1)
                \rVert^2 + \operatorname{tr}(W_0^\top\Psi_0^{-1}W_0\,R R^\top)\big]

        with m_1 and R the last K_1 entries of q's mean and rows of its Cholesky factor (z_1 is
        last in top-down order), so R Rᵀ is q's covariance of z_1. Not computed from the
        posterior: the ELBO's own route.
        """
        self._verify()
        k1 = self.layer_dims[0]
        noise = self._noises[0]
        whitened = noise.whiten_columns(self._weights[0])  # L_Ψ⁻¹ W_0, (D, K_1)
        misfit = noise.whiten(x - self._biases[0]) - q.loc[..., -k1:] @ whitened.mT
        rows = q.scale_tril[..., -k1:, :]
        spread = ((whitened.mT @ whitened) * (rows @ rows.mT)).sum((-2, -1))
        constant = self.data_dim * LOG_2PI + noise.log_det()
        return -0.5 * (constant + misfit.square().sum(-1) + spread)

    def log_joint(self, x, z) -> torch.Tensor:
        """log p(x, z) = log p(z_L) + Σ_{l<L} log p(z_l | z_{l+1}) + log p(x | z_1), broadcast."""
        self._verify()
        x = self.check_data(x)
        layers = self.split_latents(z)
        top = layers[-1]
        total = -0.5 * (top.shape[-1] * LOG_2PI + top.square().sum(-1))
        children = (x, *layers[:-1])
        for layer, (child, parent) in enumerate(zip(children, layers, strict=True)):
            residual = child - parent @ self._weights[layer].mT - self._biases[layer]
            total = total + self._noises[layer].log_density(residual)
        return total

    def sample(self, sample_shape=(), generator: torch.Generator | None = None):
        """Draw ``(x, z)`` ancestrally: z_L ~ N(0, I), then each layer down to x.

        ``x`` has shape ``(*sample_shape, D)`` and ``z`` the flat ``(*sample_shape, K)``, ordered
        (z_L, …, z_1) (:meth:`split_latents` cuts it). Standard normals are drawn from
        ``generator`` in that order, top layer first, x's last.
        """
        self._verify()
        shape = torch.Size([sample_shape] if isinstance(sample_shape, int) else sample_shape)
        options = {"dtype": self.dtype, "device": self.device, "generator": generator}
        current = torch.randn(*shape, self.layer_dims[-1], **options)
        top_down = [current]
        for layer in range(self.num_layers - 1, -1, -1):
            noise = self._noises[layer]
            eps = torch.randn(*shape, noise.dim, **options)
            current = current @ self._weights[layer].mT + self._biases[layer] + noise.color(eps)
            top_down.append(current)
        return top_down.pop(), torch.cat(top_down, -1)

    # -- tolerances ---------------------------------------------------------------------------

    def magnitude(self, x: torch.Tensor, q: Gaussian | None = None, *, z=None) -> torch.Tensor:
        """M, the sum of |terms| of log p(x) (and of ELBO(q), KL(q ‖ p(z|x)); of log p(x, z)).

        The flat model's M (:meth:`toyvae.LinearGaussian.magnitude`, in the prior's standard
        coordinates, where ELBO, KL and the quadratic forms are the same numbers), plus the terms
        that the per-layer routes split further: Σ_l |log λ_i(Ψ_l)| over the latent layers'
        noise eigenvalues (log det of the prior, one layer at a time) and, with ``q``,
        Σ_i |2 log T_ii| over q's Cholesky diagonal (its per-layer log-determinants).
        """
        total = self.as_linear_gaussian().magnitude(x, q, z=z)
        total = total + sum(noise.eigenvalues().log().abs().sum() for noise in self._noises[1:])
        if q is not None:
            diagonal = q.scale_tril.detach().diagonal(dim1=-2, dim2=-1)
            total = total + 2 * diagonal.log().abs().sum(-1)
        return total


class LayerwiseELBO(NamedTuple):
    """The ELBO of a top-down q, term by term, as hierarchical VAEs write it.

    Attributes
    ----------
    elbo : tensor
        ``reconstruction − sum(kls)``: the ELBO, equal to :func:`toyvae.elbo` of the joint q.
    reconstruction : tensor
        E_q log p(x | z_1): how well q's codes of the bottom layer explain x.
    kls : tuple of L tensors
        One KL per layer, data side first. ``kls[l-1]`` for l < L is
        E_{q(z_{>l})} KL(q(z_l | z_{>l}) ‖ p(z_l | z_{l+1})): what layer l's code costs beyond
        what the layer above predicts, under the learned conditional prior p(z_l | z_{l+1}),
        averaged over q's codes of the layers above. ``kls[-1]`` is KL(q(z_L) ‖ N(0, I)).
        They sum to KL(q ‖ p(z)) (the chain rule of KL).
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kls: tuple[torch.Tensor, ...]


def layerwise_elbo(model: HierarchicalLinearGaussian, x, q) -> LayerwiseELBO:
    r"""The ELBO of q at x, one closed-form term per layer.

    .. math::
        \mathrm{ELBO} = \mathbb E_q\log p(x\mid z_1) - \mathrm{KL}(q(z_L)\,\|\,p(z_L))
            - \sum_{l<L}\mathbb E_{q(z_{>l})}\,\mathrm{KL}\big(q(z_l\mid z_{>l})\,\|\,
            p(z_l\mid z_{l+1})\big)

    Both conditionals are Gaussian with means affine in the layers above, so each expectation
    is the KL between the conditionals at q's mean μ_{>l} of those layers plus
    ½ tr(Ψ_l⁻¹ (A_l − W̄_l) Σ_{>l} (A_l − W̄_l)ᵀ), with W̄_l = [0 … 0, W_l] and Σ_{>l} q's
    covariance of the layers above (from its exact Cholesky factor).

    ``q`` is a :class:`TopDownGaussian` with the model's layer sizes, or any Gaussian over the
    flat latents (converted by :meth:`TopDownGaussian.from_multivariate_normal`). Shapes: the
    broadcast of q's batch shape with ``x.shape[:-1]``.
    """
    if not isinstance(model, HierarchicalLinearGaussian):
        raise TypeError(
            f"model must be a toyvae.HierarchicalLinearGaussian, got {type(model).__name__}"
        )
    x = model.check_data(x)
    if not isinstance(q, TopDownGaussian):
        q = TopDownGaussian.from_multivariate_normal(q, model.layer_dims)
    elif q.layer_dims != model.layer_dims:
        raise ValueError(
            f"q must have the model's layer sizes (K_1, …, K_L) = {model.layer_dims}, "
            f"got a TopDownGaussian with layer_dims {q.layer_dims}"
        )
    batch = broadcast_batch(q=q.batch_shape, x=x.shape[:-1])
    dtype = model.dtype
    # Cast and checked again in the model's dtype (a float64 mean of 1e39 overflows float32).
    joint = as_model_dtype(q._joint(), dtype)
    reconstruction = model.expected_log_likelihood(x, joint).expand(batch)

    dims = model.layer_dims
    top = model.num_layers - 1
    kls: list[torch.Tensor] = [None] * model.num_layers  # type: ignore[list-item]
    above = 0
    for layer in range(top, -1, -1):
        k = dims[layer]
        layer_q = as_model_dtype(Gaussian(q.locs[layer], q.scale_trils[layer]), dtype)
        scale, loc = layer_q.scale_tril.expand(*batch, k, k), layer_q.loc
        if layer == top:
            kls[layer] = _kl(
                Gaussian(loc.expand(*batch, k), scale), standard_normal(k, dtype, model.device)
            )
        else:
            parent = dims[layer + 1]
            weight, bias, noise = (
                model.weights[layer + 1],
                model.biases[layer + 1],
                model.noises[layer + 1],
            )
            mean_above = joint.loc[..., :above]
            tril_above = joint.scale_tril[..., :above, :above]
            a = _history(q.weights[layer].to(dtype), above)
            q_mean = _matvec(a, mean_above) + loc
            p_mean = mean_above[..., above - parent :] @ weight.mT + bias
            at_mean = _kl(
                Gaussian(q_mean.expand(*batch, k), scale),
                Gaussian(p_mean.expand(*batch, k), noise.tril()),
            )
            # ½ tr(Ψ_l⁻¹ (A_l − W̄_l) Σ_{>l} (A_l − W̄_l)ᵀ) = ½ ‖L_Ψ⁻¹ (A_l − W̄_l) T_{>l}‖²_F.
            spread = noise.whiten_columns((a - _history(weight, above)) @ tril_above)
            kls[layer] = at_mean + 0.5 * spread.square().sum((-2, -1)).expand(batch)
        above += k
    total = reconstruction - torch.stack(torch.broadcast_tensors(*kls)).sum(0)
    return LayerwiseELBO(total, reconstruction, tuple(kls))
