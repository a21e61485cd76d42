r"""toyvae.hierarchical: the contracts that test_hierarchical.py's value tests leave open.

Error messages (the error type, the argument named first, and what was expected in the symbols
the docstrings use), conversion to the documented dtype (a float32 q against a float64 model
and the reverse included), unbatched and two-axis batch shapes, the reprs, sample()'s
documented draw order, and the documented sum that magnitude() (the tolerance measure M) is.
Every input is a fixed number or a fixed torch.Generator seed: nothing here is statistical.

Values are compared with independent NumPy references (the textbook Gaussian density, and
toyvae.reference.gaussian_chain for a top-down Gaussian's joint), to bounds derived beside each
assertion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference as ref
from toyvae.hierarchical import HierarchicalLinearGaussian, TopDownGaussian, layerwise_elbo
from toyvae.tolerances import identity_tolerance

EPS = float(np.finfo(np.float64).eps)

# A fixed three-layer model: D = 3, (K_1, K_2, K_3) = (2, 2, 1), one noise of each kind.
WEIGHTS = [
    np.array([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.7]]),  # W_0, (D, K_1)
    np.array([[0.8, -0.4], [0.5, 1.1]]),  # W_1, (K_1, K_2)
    np.array([[1.5], [-0.6]]),  # W_2, (K_2, K_3)
]
BIASES = [np.array([0.1, -0.2, 0.3]), np.array([0.5, -0.5]), np.array([-0.25, 0.75])]
NOISES = [np.array([0.5, 1.5, 0.8]), 0.7, np.array([[1.0, 0.3], [0.3, 0.6]])]
DIMS = (2, 2, 1)


def _model(dtype=torch.float64) -> HierarchicalLinearGaussian:
    weights = [torch.as_tensor(WEIGHTS[0], dtype=dtype), *WEIGHTS[1:]]
    return HierarchicalLinearGaussian(weights, BIASES, NOISES)


def _q_parts():
    """A valid three-layer TopDownGaussian's (locs, scale_trils, ladder weights) for DIMS."""
    locs = [np.array([0.2, -0.1]), np.array([1.0, 0.4]), np.array([-0.3])]
    scales = [np.array([[0.9, 0.0], [0.2, 0.5]]), np.array([[1.2, 0.0], [-0.3, 0.8]]), np.eye(1)]
    weights = [np.array([[0.4, -0.2], [0.1, 0.3]]), np.array([[0.7], [-1.1]])]
    return locs, scales, weights


def _replace(parts, index, value):
    changed = list(parts)
    changed[index] = value
    return changed


def _with_nan(shape):
    value = np.ones(shape)
    value.flat[-1] = np.nan
    return value


# -- error messages ----------------------------------------------------------------------------


def _top_down(change):
    def call():
        locs, scales, weights = _q_parts()
        return TopDownGaussian(*change(locs, scales, weights))

    return call


def _two_layers(**changes):
    """HierarchicalLinearGaussian with D = 3, (K_1, K_2) = (2, 1) and the given arguments."""
    return HierarchicalLinearGaussian(**({"weights": [np.ones((3, 2)), np.ones((2, 1))]} | changes))


_NOT_AN_ARRAY = "must be a torch tensor, a NumPy array or a real number, got "

# (call, error type, the message's expected start). The messages name the argument first
# (with its index), then what was expected in the docstrings' symbols (K_l for layer l, S_l,
# A_l, z_1 … z_L), then what came.
MESSAGES = [
    pytest.param(
        _top_down(lambda m, s, a: (np.zeros(3), s, a)),
        TypeError,
        "locs must be a list of L ≥ 2 mean vectors [m_1 (…, K_1), …, m_L (…, K_L)], got an "
        "array of shape (3,)",
        id="locs-not-a-list",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (_replace(m, 0, "m1"), s, a)),
        TypeError,
        "locs[0] " + _NOT_AN_ARRAY,
        id="locs0-not-an-array",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (_replace(m, 1, "m2"), s, a)),
        TypeError,
        "locs[1] " + _NOT_AN_ARRAY,
        id="locs1-not-an-array",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (_replace(m, 1, 0.0), s, a)),
        ValueError,
        "locs[1] must be a mean vector (…, K_2) with K_2 ≥ 1, got 0.0",
        id="locs1-scalar",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (_replace(m, 1, _with_nan(2)), s, a)),
        ValueError,
        "locs[1] must be finite, got 1 NaN or infinite entry",
        id="locs1-nan",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, s[:2], a)),
        ValueError,
        "scale_trils must hold 3 entries (one lower-triangular S_l per layer), got 2",
        id="scale_trils-length",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, _replace(s, 1, "S2"), a)),
        TypeError,
        "scale_trils[1] " + _NOT_AN_ARRAY,
        id="scale_trils1-not-an-array",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, _replace(s, 1, np.eye(3)), a)),
        ValueError,
        "scale_trils[1] must have shape (…, 2, 2) (K_2 from locs[1]), got an array of shape (3, 3)",
        id="scale_trils1-shape",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, _replace(s, 1, _with_nan((2, 2))), a)),
        ValueError,
        "scale_trils[1] must be finite, got 1 NaN or infinite entry",
        id="scale_trils1-nan",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, s, a[:1])),
        ValueError,
        "weights must hold 2 entries (one A_l per layer below the top), got 1",
        id="weights-length",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, s, _replace(a, 0, "A1"))),
        TypeError,
        "weights[0] " + _NOT_AN_ARRAY,
        id="weights0-not-an-array",
    ),
    pytest.param(
        # Three rows where A_1 needs K_1 = 2; the columns (K_2 = 2) alone would fit.
        _top_down(lambda m, s, a: (m, s, _replace(a, 0, np.ones((3, 2))))),
        ValueError,
        "weights[0] must have shape (…, 2, 2 or 3) (K_1 rows; columns for the layer above, K_2, "
        "or for all the layers above), got an array of shape (3, 2)",
        id="weights0-rows",
    ),
    pytest.param(
        _top_down(lambda m, s, a: (m, s, _replace(a, 1, _with_nan((2, 1))))),
        ValueError,
        "weights[1] must be finite, got 1 NaN or infinite entry",
        id="weights1-nan",
    ),
    pytest.param(
        lambda: TopDownGaussian.from_multivariate_normal(
            MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3).double()), DIMS
        ),
        ValueError,
        "q must have event shape (5,) to match the model's latent dimension, got event shape (3,)",
        id="q-event-shape",
    ),
    pytest.param(
        # A factor with an entry above the diagonal (torch's own check switched off).
        lambda: TopDownGaussian.from_multivariate_normal(
            MultivariateNormal(
                torch.zeros(3, dtype=torch.float64),
                scale_tril=torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]).double(),
                validate_args=False,
            ),
            (2, 1),
        ),
        ValueError,
        "q's scale_tril must be lower triangular (a Cholesky factor), got entries above the "
        "diagonal up to 0.5 in magnitude",
        id="q-scale_tril-not-lower",
    ),
    pytest.param(
        lambda: TopDownGaussian.from_multivariate_normal(
            MultivariateNormal(torch.zeros(4), torch.eye(4)), (4,)
        ),
        ValueError,
        "layer_dims must be a list or tuple of L ≥ 2 layer sizes (K_1, …, K_L), got (4,) of type "
        "tuple",
        id="layer_dims-one-layer",
    ),
    pytest.param(
        lambda: TopDownGaussian.from_multivariate_normal(
            MultivariateNormal(torch.zeros(4), torch.eye(4)), (True, 3)
        ),
        ValueError,
        "layer_dims must hold positive integers (K_1, …, K_L), got (True, 3)",
        id="layer_dims-bool",
    ),
    pytest.param(
        lambda: TopDownGaussian.from_multivariate_normal(
            MultivariateNormal(torch.zeros(4), torch.eye(4)), (2.0, 2)
        ),
        ValueError,
        "layer_dims must hold positive integers (K_1, …, K_L), got (2.0, 2)",
        id="layer_dims-float",
    ),
    pytest.param(
        lambda: _model().join_latents([np.zeros(2)]),
        ValueError,
        "layers must hold 3 entries (z_1, …, z_L), got 1",
        id="layers-length",
    ),
    pytest.param(
        lambda: _model().join_latents(["z1", np.zeros(2), np.zeros(1)]),
        TypeError,
        "layers[0] " + _NOT_AN_ARRAY,
        id="layers0-not-an-array",
    ),
    pytest.param(
        lambda: _model().join_latents([np.zeros(2), np.zeros(3), np.zeros(1)]),
        ValueError,
        "layers[1] must have last dimension 2 (the size K_2 of latent layer 2), got an array of "
        "shape (3,)",
        id="layers1-size",
    ),
    pytest.param(
        lambda: _model().join_latents([np.zeros(2), np.zeros(2), _with_nan(1)]),
        ValueError,
        "layers[2] must be finite, got 1 NaN or infinite entry",
        id="layers2-nan",
    ),
    pytest.param(
        lambda: _model().split_latents("z"), TypeError, "z " + _NOT_AN_ARRAY, id="z-not-an-array"
    ),
    pytest.param(
        lambda: _model().split_latents(np.zeros(4)),
        ValueError,
        "z must have last dimension 5 (the model's flat latent dimension K), got an array of shape "
        "(4,)",
        id="z-size",
    ),
    pytest.param(
        lambda: _model().split_latents(_with_nan(5)),
        ValueError,
        "z must be finite, got 1 NaN",
        id="z-nan",
    ),
    pytest.param(
        lambda: _model().log_joint(np.zeros(3), np.zeros(4)),
        ValueError,
        "z must have last dimension 5 (the model's flat latent dimension K)",
        id="log_joint-z-size",
    ),
    pytest.param(
        lambda: layerwise_elbo(toyvae.LinearGaussian(np.ones((3, 2))), np.zeros(3), None),
        TypeError,
        "model must be a toyvae.HierarchicalLinearGaussian, got LinearGaussian",
        id="layerwise_elbo-model-type",
    ),
    pytest.param(lambda: _model().log_evidence("x"), TypeError, "x " + _NOT_AN_ARRAY, id="x-type"),
    pytest.param(
        lambda: _model().log_evidence(np.zeros(2)),
        ValueError,
        "x must have last dimension 3 (the model's data dimension D), got an array of shape (2,)",
        id="x-size",
    ),
    pytest.param(
        lambda: _model().posterior(_with_nan(3)),
        ValueError,
        "x must be finite, got 1 NaN",
        id="x-nan",
    ),
    pytest.param(
        lambda: _two_layers(weights=np.ones((3, 2))),
        TypeError,
        "weights must be a list or tuple of L ≥ 2 matrices [W_0 (D, K_1), W_1 (K_1, K_2), …], "
        "ordered from the data side, got an array of shape (3, 2)",
        id="model-weights-not-a-list",
    ),
    pytest.param(
        lambda: _two_layers(weights=[np.ones(3), np.ones((2, 1))]),
        ValueError,
        "weights[0] must be a (D, K_1) matrix, got an array of shape (3,)",
        id="model-weights0-vector",
    ),
    pytest.param(
        lambda: _two_layers(weights=[np.ones((0, 2)), np.ones((2, 1))]),
        ValueError,
        "weights[0] must have D ≥ 1 rows and K_1 ≥ 1 columns, got an array of shape (0, 2)",
        id="model-weights0-empty",
    ),
    pytest.param(
        lambda: _two_layers(weights=[np.ones((3, 2)), np.ones((3, 1))]),
        ValueError,
        "weights[1] must have K_1 = 2 rows, the columns of weights[0] (3, 2), got an array of "
        "shape (3, 1)",
        id="model-weights1-rows",
    ),
    pytest.param(
        lambda: _two_layers(biases=[None]),
        ValueError,
        "biases must hold 2 entries (b_0, …, b_{L−1}; None entries for zeros), got 1",
        id="model-biases-length",
    ),
    pytest.param(
        lambda: _two_layers(biases=["b0", None]),
        TypeError,
        "biases[0] " + _NOT_AN_ARRAY,
        id="model-biases0-not-an-array",
    ),
    pytest.param(
        lambda: _two_layers(noise_variances=[1.0]),
        ValueError,
        "noise_variances must hold 2 entries (Ψ_0, …, Ψ_{L−1}, one per layer), got 1",
        id="model-noise-length",
    ),
    pytest.param(
        lambda: _two_layers(noise_variances="a"),
        TypeError,
        "noise_variances " + _NOT_AN_ARRAY,
        id="model-noise-not-an-array",
    ),
    pytest.param(
        lambda: _two_layers(noise_variances=np.ones(3)),
        ValueError,
        "noise_variances must be a scalar variance shared by every layer, or a list of 2 "
        "per-layer variances (scalar, vector or matrix each), got an array of shape (3,)",
        id="model-noise-shape",
    ),
    pytest.param(
        lambda: _two_layers(noise_variances=-1.0),
        ValueError,
        "noise_variances must be strictly positive, got a smallest entry of -1.0",
        id="model-noise-negative",
    ),
    pytest.param(
        lambda: _two_layers(noise_variances=[1.0, "a"]),
        TypeError,
        "noise_variances[1] " + _NOT_AN_ARRAY,
        id="model-noise1-not-an-array",
    ),
]


@pytest.mark.parametrize(("call", "error", "start"), MESSAGES)
def test_errors_name_the_argument_and_what_was_expected(call, error, start):
    """Each bad argument raises the documented type with a message that starts with its name."""
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value).startswith(start), (start, str(raised.value))


# -- dtype ---------------------------------------------------------------------------------------


def test_top_down_gaussian_takes_the_dtype_of_locs0():
    """'every tensor takes locs[0]'s dtype': float32 locs[0] makes NumPy (float64) parts float32."""
    locs, scales, weights = _q_parts()
    locs = _replace(locs, 0, torch.tensor(locs[0], dtype=torch.float32))
    q = TopDownGaussian(locs, scales, weights)
    parts = {"locs": q.locs, "scale_trils": q.scale_trils, "weights": q.weights}
    for name, tensors in parts.items():
        assert all(t.dtype == torch.float32 for t in tensors), (name, [t.dtype for t in tensors])
    assert q.dtype == torch.float32 and q.to_multivariate_normal().mean.dtype == torch.float32


def test_data_and_latents_are_converted_to_the_models_dtype():
    """A float32 model computes in float32 from NumPy (float64) x and z, and splits and joins
    NumPy latents into float32 tensors."""
    model = _model(torch.float32)
    assert model.dtype == torch.float32
    x = np.array([0.5, -1.0, 2.0])
    assert model.log_evidence(x).dtype == torch.float32
    assert model.log_joint(x, np.ones(5)).dtype == torch.float32
    z = np.arange(5.0)
    assert all(layer.dtype == torch.float32 for layer in model.split_latents(z))
    joined = model.join_latents([np.zeros(2), np.ones(2), np.array([2.0])])
    assert joined.dtype == torch.float32


# -- batch shapes --------------------------------------------------------------------------------


def _chain_joint(locs, scales, weights):
    """The dense joint of a ladder top-down Gaussian over (z_L, …, z_1), by the reference chain."""
    covariances = [s @ s.T for s in scales]
    return ref.gaussian_chain(
        locs[-1], covariances[-1], weights[::-1], locs[-2::-1], covariances[-2::-1]
    )


def _joint_bounds(locs, scales, weights) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise |error| bounds for the joint's mean and covariance, two routes compared.

    Both routes (the module's factor T, then T Tᵀ; the reference chain's W Σ Wᵀ + S Sᵀ) sum
    products whose inner sizes add up to at most K per product (T's rows over the layers
    above) plus K for the covariance, and L additions of offsets: n = 2K + L = 13. Higham's
    γ_n|A||B| bounds each route's error by n·eps times the same computation on absolute values,
    which the reference chain run on |m_l|, |S_l|, |A_l| gives (it dominates |T||T|ᵀ entrywise).
    Two routes: twice that.
    """
    n = 2 * 5 + 3
    mean_abs, cov_abs = _chain_joint(
        [np.abs(m) for m in locs], [np.abs(s) for s in scales], [np.abs(a) for a in weights]
    )
    return 2 * n * EPS * mean_abs, 2 * n * EPS * cov_abs


def test_a_batch_from_scale_trils_or_weights_alone_is_q_batch():
    """Batch shapes broadcast from every part: per-x scales or weights alone make the batch."""
    locs, scales, weights = _q_parts()
    stretch = np.array([0.5, 1.0, 2.0])[:, None, None]
    batched_scales = _replace(scales, 1, scales[1] * stretch)  # scale_trils[1]: (3, 2, 2)
    batched_weights = _replace(weights, 1, weights[1] * stretch)  # weights[1]: (3, 2, 1)
    # weights[0]: (3, 2, 2), a batched ladder weight narrower than the layers above (K_2 + K_3).
    batched_ladder = _replace(weights, 0, weights[0] * stretch)
    for parts in [
        (locs, batched_scales, weights),
        (locs, scales, batched_weights),
        (locs, scales, batched_ladder),
    ]:
        q = TopDownGaussian(*parts)
        assert q.batch_shape == (3,)
        joint = q.to_multivariate_normal()
        assert joint.batch_shape == (3,)
        for i in range(3):
            element = [[p[i] if np.ndim(p) == 3 else p for p in part] for part in parts]
            mean, cov = _chain_joint(*element)
            mean_bound, cov_bound = _joint_bounds(*element)
            assert np.all(np.abs(joint.mean[i].numpy() - mean) <= mean_bound)
            assert np.all(np.abs(joint.covariance_matrix[i].numpy() - cov) <= cov_bound)


def test_from_multivariate_normal_keeps_the_batch_shape():
    """The conditionals of an unbatched q are unbatched; a (2, 3) batch stays (2, 3)."""
    locs, scales, weights = _q_parts()
    mean, cov = _chain_joint(locs, scales, weights)
    single = MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    q = TopDownGaussian.from_multivariate_normal(single, DIMS)
    assert q.batch_shape == () and q.to_multivariate_normal().batch_shape == ()
    assert all(loc.shape == (k,) for loc, k in zip(q.locs, DIMS, strict=True))
    batched = MultivariateNormal(torch.tensor(mean).expand(2, 3, 5), torch.tensor(cov))
    q = TopDownGaussian.from_multivariate_normal(batched, DIMS)
    assert q.batch_shape == (2, 3) and q.to_multivariate_normal().batch_shape == (2, 3)


def test_split_and_join_unbatched_and_two_axis_latents():
    """split_latents/join_latents cut and glue the last axis only, for any batch shape."""
    model = _model()
    for shape in [(), (2, 3)]:
        z = torch.arange(float(np.prod(shape, dtype=int) * 5), dtype=torch.float64)
        z = z.reshape(*shape, 5)
        z1, z2, z3 = model.split_latents(z)
        # Top-down order (z_3, z_2, z_1) with sizes (1, 2, 2): slicing is exact.
        assert torch.equal(z3, z[..., :1]) and torch.equal(z2, z[..., 1:3])
        assert torch.equal(z1, z[..., 3:])
        assert torch.equal(model.join_latents([z1, z2, z3]), z)
    # Unbatched layers of different sizes join into one unbatched vector.
    joined = model.join_latents([np.array([3.0, 4.0]), np.array([1.0, 2.0]), np.array([0.0])])
    assert torch.equal(joined, torch.arange(5.0, dtype=torch.float64))


def _log_normal(residual, covariance):
    """log N(r; 0, Σ) by the textbook formula, along the last axis."""
    n = covariance.shape[0]
    _, log_det = np.linalg.slogdet(covariance)
    quadratic = np.einsum(
        "...i,...i->...", residual, np.linalg.solve(covariance, residual[..., None])[..., 0]
    )
    return -0.5 * (n * np.log(2 * np.pi) + log_det + quadratic)


def _reference_log_joint(x, z):
    """log p(z_3) + log p(z_2|z_3) + log p(z_1|z_2) + log p(x|z_1), z = (z_3, z_2, z_1)."""
    layers = [z[..., 3:], z[..., 1:3], z[..., :1]]  # z_1, z_2, z_3
    total = _log_normal(layers[-1], np.eye(1))
    children = [x, *layers[:-1]]
    for weight, bias, noise, child, parent in zip(
        WEIGHTS, BIASES, NOISES, children, layers, strict=True
    ):
        covariance = ref.noise_covariance(noise, len(bias))
        total = total + _log_normal(child - parent @ weight.T - bias, covariance)
    return total


@pytest.mark.parametrize("shape", [(), (2, 3)], ids=["unbatched", "batch-2x3"])
def test_log_joint_of_unbatched_and_two_axis_batches(shape):
    """log p(x, z) for one point, and for a (2, 3) batch, is the sum of the conditionals."""
    model = _model()
    count = int(np.prod(shape, dtype=int))
    x = np.linspace(-1.5, 2.0, count * 3).reshape(*shape, 3)
    z = np.linspace(1.2, -0.8, count * 5).reshape(*shape, 5)
    value = model.log_joint(x, z)
    assert value.shape == shape
    expected = _reference_log_joint(x, z)
    # Two sums of the n = D + K + L terms of log p(x, z), each within n·eps·M (identity_tolerance
    # allows 4·n·eps·M); NumPy's solve against Ψ_l adds a factor κ(Ψ_l) ≤ 3 for these noises.
    tolerance = 3 * identity_tolerance(model, torch.as_tensor(x), z=torch.as_tensor(z)).numpy()
    assert np.all(np.abs(value.numpy() - expected) <= tolerance)


# -- sampling ------------------------------------------------------------------------------------


def test_sample_shapes_unbatched_and_two_axis():
    """sample() gives one x (D,) and one flat z (K,); sample((2, 3)) gives (2, 3, D), (2, 3, K)."""
    model = _model()
    x, z = model.sample(generator=torch.Generator().manual_seed(0))
    assert x.shape == (3,) and z.shape == (5,)
    x, z = model.sample((2, 3), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 3) and z.shape == (2, 3, 5)


def test_sample_follows_the_documented_draws():
    """The draws are standard normals from the generator, top layer first and x's last, each
    coloured by its layer's Cholesky factor: z_l = W_l z_{l+1} + b_l + L_Ψl ε_l."""
    model = _model()
    n = 4
    x, z = model.sample((n,), generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    top = torch.randn(n, 1, dtype=torch.float64, generator=draws).numpy()
    current, magnitude = top, np.abs(top)
    expected, bounds = [current], [magnitude]
    for layer in range(2, -1, -1):
        size = len(BIASES[layer])
        eps = torch.randn(n, size, dtype=torch.float64, generator=draws).numpy()
        factor = np.linalg.cholesky(ref.noise_covariance(NOISES[layer], size))
        weight, bias = WEIGHTS[layer], BIASES[layer]
        current = current @ weight.T + bias + eps @ factor.T
        magnitude = magnitude @ np.abs(weight).T + np.abs(bias) + np.abs(eps) @ np.abs(factor).T
        expected.append(current)
        bounds.append(magnitude)
    # Each entry of a layer is a sum of at most 2 + 1 + 3 = 6 terms (W_l z_{l+1}, b_l, L_Ψl ε_l),
    # and NumPy's and torch's Cholesky factors of Ψ_l differ by at most 2·eps of |L_Ψl| (a 2 × 2
    # or diagonal factorisation): 8·eps of the absolute recursion per layer (Higham's γ_n),
    # errors carried down the 4 steps through |W_l|, which the recursion includes: 4·8·eps.
    # Two routes: twice that.
    factor = 2 * 4 * 8 * EPS
    assert np.all(
        np.abs(z.numpy() - np.concatenate(expected[:-1], -1))
        <= factor * np.concatenate(bounds[:-1], -1)
    )
    assert np.all(np.abs(x.numpy() - expected[-1]) <= factor * bounds[-1])


# -- repr ----------------------------------------------------------------------------------------


def test_reprs_show_sizes_noise_kinds_batch_and_dtype():
    """The reprs name the layer sizes, each layer's noise kind, q's batch shape and the dtype."""
    assert repr(_model()) == (
        "HierarchicalLinearGaussian(data_dim=3, layer_dims=(2, 2, 1), "
        "noise=(diagonal, isotropic, full), dtype=torch.float64)"
    )
    locs, scales, weights = _q_parts()
    q = TopDownGaussian([np.tile(locs[0], (3, 1)), *locs[1:]], scales, weights)
    assert repr(q) == "TopDownGaussian(layer_dims=(2, 2, 1), batch_shape=(3,), dtype=torch.float64)"


# -- a float32 q against a float64 model ------------------------------------------------------


def _dyadic_q_parts():
    """q's parts with at most 4 significant bits each: every product and sum in q's joint
    factor (at most 3 factors, 5 terms) fits float32's 24-bit significand, so float32 and
    float64 give the same joint exactly."""
    locs = [np.array([0.5, -0.25]), np.array([1.0, 0.75]), np.array([-0.5])]
    scales = [np.array([[1.0, 0.0], [0.25, 0.5]]), np.array([[1.25, 0.0], [-0.5, 0.75]]), np.eye(1)]
    weights = [np.array([[0.5, -0.25], [0.125, 0.75]]), np.array([[0.5], [-1.5]])]
    return locs, scales, weights


def test_layerwise_elbo_of_a_float32_q_is_computed_in_the_models_dtype():
    """A float32 encoder's q, checked against a float64 model, gives float64 per-layer terms
    equal to the ELBO of the same q's dense joint by the flat model's route."""
    model = _model()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64)
    locs, scales, weights = _dyadic_q_parts()
    q32 = TopDownGaussian([torch.tensor(m, dtype=torch.float32) for m in locs], scales, weights)
    assert q32.dtype == torch.float32
    terms = layerwise_elbo(model, x, q32)
    assert terms.elbo.dtype == torch.float64 and terms.reconstruction.dtype == torch.float64
    assert all(kl.dtype == torch.float64 for kl in terms.kls)
    mean, cov = _chain_joint(locs, scales, weights)
    dense = MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    # Two routes (per layer, and the flat model's) to sums of the terms in M: identity_tolerance;
    # the dense joint's covariance is refactored by MultivariateNormal, whose factor is exact to
    # κ(Σ)·eps relative, κ(Σ) < 100 here, so allow that factor on top.
    tolerance = 100 * identity_tolerance(model, x, dense)
    assert ((terms.elbo - toyvae.elbo(model, x, dense)).abs() <= tolerance).all()
    assert (
        (terms.reconstruction - toyvae.expected_log_likelihood(model, x, dense)).abs() <= tolerance
    ).all()


# -- the tolerance measure M -----------------------------------------------------------------


def test_magnitude_adds_the_layer_terms_to_the_flat_models():
    """M = the flat model's M (LinearGaussian.magnitude) + Σ_{l≥1} Σ_i |log λ_i(Ψ_l)|, plus with q
    Σ_i |2 log T_ii| over q's Cholesky diagonal, per batch element (the documented sum)."""
    model = _model()
    flat = model.as_linear_gaussian()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75], [0.0, 1.0, -2.0]], dtype=torch.float64)
    z = torch.tensor(np.linspace(-1.0, 1.5, 15).reshape(3, 5))
    layer_terms = sum(
        np.abs(np.log(np.linalg.eigvalsh(ref.noise_covariance(v, len(b))))).sum()
        for v, b in zip(NOISES[1:], BIASES[1:], strict=True)
    )
    locs, scales, weights = _q_parts()
    stretch = np.array([0.5, 1.0, 3.0])[:, None, None]
    q = TopDownGaussian(locs, _replace(scales, 1, scales[1] * stretch), weights)
    joint = q.to_multivariate_normal()
    cov = joint.covariance_matrix.numpy()
    q_terms = np.abs(2 * np.log(np.diagonal(np.linalg.cholesky(cov), axis1=-2, axis2=-1))).sum(-1)
    gaussian = toyvae.Gaussian(joint.mean, joint.scale_tril)
    cases = [
        (model.magnitude(x), flat.magnitude(x).numpy() + layer_terms),
        (model.magnitude(x, z=z), flat.magnitude(x, z=z).numpy() + layer_terms),
        (model.magnitude(x, gaussian), flat.magnitude(x, gaussian).numpy() + layer_terms + q_terms),
    ]
    for value, expected in cases:
        assert value.shape == expected.shape == (3,)
        # Sums of at most n = term_count nonnegative terms, each to a few eps relative (log of
        # eigenvalues of Ψ_l with κ(Ψ_l) < 3, and of a Cholesky diagonal): 8·n·eps·M.
        assert np.all(np.abs(value.numpy() - expected) <= 8 * model.term_count * EPS * expected)


def test_layerwise_elbo_of_a_float64_q_is_computed_in_a_float32_models_dtype():
    """A float64 q against a float32 model gives float32 terms (the model's dtype), equal to the
    float64 model's ELBO of the same q to the float32 identity tolerance."""
    model32, model64 = _model(torch.float32), _model()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64)
    locs, scales, weights = _dyadic_q_parts()
    q64 = TopDownGaussian([torch.tensor(m) for m in locs], scales, weights)
    terms = layerwise_elbo(model32, x, q64)
    assert terms.elbo.dtype == torch.float32 and terms.reconstruction.dtype == torch.float32
    assert all(kl.dtype == torch.float32 for kl in terms.kls)
    mean, cov = _chain_joint(locs, scales, weights)
    dense = MultivariateNormal(torch.tensor(mean), torch.tensor(cov))
    # The float32 route against the float64 one: float32 rounding of the parameters and of every
    # step, each a sum of the terms in M: the float32 identity tolerance, 4·n·eps32·M.
    tolerance = identity_tolerance(model32, x.float(), dense).double()
    assert ((terms.elbo.double() - toyvae.elbo(model64, x, dense)).abs() <= tolerance).all()


# -- the model's defaults, conversions and in-place checks -------------------------------------


def test_default_noise_is_unit_variance_in_every_layer():
    """Without noise_variances every Ψ_l is I, and log p(x) is the reference chain's with σ² = 1."""
    model = HierarchicalLinearGaussian(WEIGHTS, BIASES)
    assert [n.kind for n in model.noises] == ["isotropic"] * 3
    assert all(float(v) == 1.0 for v in model.noise_variances)
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    expected, _, _ = ref.hierarchical_exact(WEIGHTS, BIASES, 1.0, x)
    # Two routes to sums of the terms in M (identity_tolerance); the reference factors the
    # dense marginal covariance C_x, which adds its condition number κ(C_x) (< 50 here).
    _, cov = ref.gaussian_chain(
        np.zeros(1), np.eye(1), WEIGHTS[::-1], BIASES[::-1], [np.eye(2), np.eye(2), np.eye(3)]
    )
    kappa = np.linalg.cond(cov[5:, 5:])
    assert kappa < 50
    tolerance = kappa * identity_tolerance(model, torch.as_tensor(x)).numpy()
    assert np.all(np.abs(model.log_evidence(x).numpy() - expected) <= tolerance)


def test_a_float16_shared_noise_variance_is_converted_to_the_models_dtype():
    """'the others are converted to' weights[0]'s dtype: a float16 scalar Ψ included."""
    model = _two_layers(noise_variances=torch.tensor(0.5, dtype=torch.float16))
    assert all(v.dtype == torch.float64 and float(v) == 0.5 for v in model.noise_variances)


def _edit_bias():
    bias = torch.zeros(3, dtype=torch.float64)
    return _two_layers(biases=[bias, None]), bias


def _edit_shared(dtype):
    def build():
        variance = torch.tensor(0.5, dtype=dtype)
        return _two_layers(noise_variances=variance), variance

    return build


def _edit_layer_noise():
    variance = torch.tensor(0.5, dtype=torch.float64)
    return _two_layers(noise_variances=[1.0, variance]), variance


@pytest.mark.parametrize(
    ("build", "name"),
    [
        pytest.param(_edit_bias, "biases[0]", id="bias"),
        pytest.param(_edit_shared(torch.float64), "noise_variances", id="shared-noise"),
        # A float32 Ψ is copied into the float64 model: the model watches the caller's tensor,
        # whose edit the copy would never see.
        pytest.param(_edit_shared(torch.float32), "noise_variances", id="shared-float32-noise"),
        pytest.param(_edit_layer_noise, "noise_variances[1]", id="layer-noise"),
    ],
)
def test_an_in_place_edit_of_any_given_tensor_raises_naming_it(build, name):
    """'a parameter modified in place makes every later call raise RuntimeError', naming it."""
    model, tensor = build()
    x = np.zeros(3)
    model.log_evidence(x)  # unedited: fine
    tensor.add_(1.0)
    with pytest.raises(RuntimeError) as raised:
        model.log_evidence(x)
    assert str(raised.value).startswith(f"{name} was modified in place"), str(raised.value)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("part", ["mean", "scale"])
def test_a_float64_top_down_q_that_does_not_fit_a_float32_model_is_refused(layer, part):
    """A float64 layer mean of 1e39 (float32's largest is 3.4e38) or scale of 1e-50 (0 in
    float32) is refused with a ValueError naming q and the model's dtype, not turned into an
    inf or a NaN ELBO, whether the layer is the bottom one or the top one."""
    x = torch.zeros(3, dtype=torch.float32)  # D = 3: BIASES[0]
    locs, scales, weights = _q_parts()
    if part == "mean":
        locs[layer] = locs[layer] + 1e39
    else:
        scales[layer] = scales[layer] * 1e-50
    q = TopDownGaussian(locs, scales, weights)  # NumPy: float64
    with pytest.raises(ValueError, match=r"q's .*model's dtype torch\.float32"):
        layerwise_elbo(_model(torch.float32), x, q)


def test_layerwise_elbo_of_a_float64_q_on_a_float32_model_is_float32():
    """A float64 top-down q is cast to a float32 model's dtype layer by layer: the ELBO and
    every per-layer KL come back in float32 (the dtype the model computes in)."""
    x = torch.zeros(3, dtype=torch.float32)  # D = 3: BIASES[0]
    q = TopDownGaussian(*_q_parts())  # NumPy: float64
    result = layerwise_elbo(_model(torch.float32), x, q)
    assert result.elbo.dtype == torch.float32
    assert all(kl.dtype == torch.float32 for kl in result.kls)


def test_a_layer_mean_that_overflows_float32_is_refused_even_when_the_joint_mean_does_not():
    """m_1 = 1e39 with a ladder weight that cancels it (z_1's mean m_1 + A_1 m_2 = 0, and
    A_1 L_2 = −1 with L_2 = 1e-39, a float32 subnormal): the joint fits float32, but the layer's
    own mean does not, so a float32 model refuses q by name."""
    x = torch.zeros(3, dtype=torch.float32)  # D = 3: BIASES[0]
    locs, scales, weights = _q_parts()
    locs[1], locs[2], scales[2] = np.array([1e39, 0.0]), np.array([1.0]), np.array([[1e-39]])
    weights[1] = np.array([[-1e39], [0.0]])
    with pytest.raises(ValueError, match=r"q's mean in the model's dtype torch\.float32"):
        layerwise_elbo(_model(torch.float32), x, TopDownGaussian(locs, scales, weights))
