"""MarkovGaussian and its ELBO/KL: shapes, dtypes, argument errors and values vs dense oracles.

The oracles are dense textbook formulas in NumPy: the chain z = M⁻¹(c + noise) with M block
bidiagonal (I on the diagonal, −F_t below it), so E z = M⁻¹c and Cov z = M⁻¹ D M⁻ᵀ with D the
block diagonal of S_t S_tᵀ; the posterior and log p(x) by dense Gaussian conditioning
(``toyvae.reference.ssm_exact``); KL(q ‖ p(z|x)) by ``toyvae.reference.gaussian_kl``, and
ELBO = log p(x) − KL.
"""

from __future__ import annotations

import numpy as np
import pytest
import seeds
import torch

import toyvae
from toyvae import reference as ref
from toyvae.state_space import (
    LinearGaussianSSM,
    MarkovGaussian,
    markov_elbo,
    markov_kl_to_posterior,
)

F64 = torch.float64
EPS = float(np.finfo(np.float64).eps)
K, D = 2, 3
NAMES = ("initial_loc", "initial_scale_tril", "transition", "offset", "scale_tril")


def model_parameters(seed=0):
    """A small model's parameters as NumPy arrays: full Q and P₀, a bias, a mean."""
    rng = seeds.rng(seed)
    a = rng.standard_normal((K, K))
    a = 0.8 * a / np.linalg.norm(a, 2)
    b = rng.standard_normal((K, K))
    return {
        "transition": a,
        "transition_noise": b @ b.T / K + 0.4 * np.eye(K),
        "emission": rng.standard_normal((D, K)),
        "emission_noise": rng.uniform(0.3, 1.0, D),
        "emission_bias": rng.standard_normal(D),
        "initial_mean": rng.standard_normal(K),
        "initial_covariance": 1.5 * np.eye(K) + 0.3,
    }


def make_model(p, dtype=F64):
    def tensor(name):
        return torch.tensor(p[name], dtype=dtype)

    return LinearGaussianSSM(
        tensor("transition"),
        tensor("transition_noise"),
        tensor("emission"),
        tensor("emission_noise"),
        emission_bias=tensor("emission_bias"),
        initial_mean=tensor("initial_mean"),
        initial_covariance=tensor("initial_covariance"),
    )


def chain_arrays(num_steps, batch=(), seed=2):
    """Random chain parameters (NumPy): lower factors with positive diagonals."""
    rng = seeds.rng(seed)
    n = num_steps - 1

    def tril(*shape):
        m = np.tril(0.4 * rng.standard_normal((*shape, K, K)), -1)
        return m + np.eye(K) * rng.uniform(0.4, 1.2, (*shape, 1, K))

    return {
        "initial_loc": rng.standard_normal((*batch, K)),
        "initial_scale_tril": tril(*batch),
        "transition": 0.6 * rng.standard_normal((*batch, n, K, K)),
        "offset": rng.standard_normal((*batch, n, K)),
        "scale_tril": tril(*batch, n),
    }


def chain(arrays, dtype=F64):
    return MarkovGaussian(*(torch.tensor(arrays[name], dtype=dtype) for name in NAMES))


def dense_chain(arrays):
    """Mean (TK,) and covariance (TK, TK) of one unbatched chain, by M z = c + noise."""
    n = arrays["transition"].shape[0] + 1
    m = np.eye(n * K)
    noise = np.zeros((n * K, n * K))
    noise[:K, :K] = arrays["initial_scale_tril"] @ arrays["initial_scale_tril"].T
    for t in range(1, n):
        rows = slice(t * K, (t + 1) * K)
        m[rows, (t - 1) * K : t * K] = -arrays["transition"][t - 1]
        s = arrays["scale_tril"][t - 1]
        noise[rows, rows] = s @ s.T
    c = np.concatenate([arrays["initial_loc"], *arrays["offset"]])
    m_inv = np.linalg.inv(m)
    return m_inv @ c, m_inv @ noise @ m_inv.T


def dense_elbo_and_kl(p, arrays, x):
    """(ELBO, KL(q ‖ p(z|x)), scale) for an unbatched chain, batched x, by dense conditioning;
    scale = |log p(x)| + |KL| + T·K, the size of the terms that meet in either value."""
    log_evidence, post_mean, post_cov = ref.ssm_exact(*p.values(), x)
    mean_q, cov_q = dense_chain(arrays)
    kl = ref.gaussian_kl(mean_q, cov_q, post_mean, post_cov)
    scale = np.abs(log_evidence) + np.abs(kl) + mean_q.size
    return log_evidence - kl, kl, scale


def tolerance(scale, p, num_steps):
    """n·κ·eps·scale with n = T·K terms and κ the posterior covariance's condition number (the
    dense oracle inverts it and C_x, both backward stable), times 1e2 for the mixed routes."""
    cov = ref.ssm_exact(*p.values(), np.zeros((num_steps, D)))[2]
    kappa = np.linalg.cond(cov)
    assert kappa < 1e3  # a well-conditioned case, so the bound is small (≈ 1e-9 relative)
    return 1e2 * num_steps * K * kappa * EPS * scale


# -- values: an unbatched chain against the dense oracle -----------------------------------------


@pytest.mark.parametrize("x_batch", [(), (2,)])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_unbatched_chain_elbo_and_kl_match_dense_conditioning(x_batch, num_steps):
    """A chain without batch dimensions gives the dense ELBO and KL, for one x or a batch."""
    p = model_parameters()
    model = make_model(p)
    arrays = chain_arrays(num_steps)
    q = chain(arrays)
    x = torch.tensor(seeds.rng(3).standard_normal((*x_batch, num_steps, D)), dtype=F64)
    elbo, kl, scale = dense_elbo_and_kl(p, arrays, x.numpy())
    tol = tolerance(scale, p, num_steps)
    for got, expected in ((markov_elbo(model, x, q), elbo), (q.elbo(model, x), elbo)):
        assert got.shape == x_batch
        assert np.all(np.abs(got.numpy() - expected) <= tol)
    for got in (markov_kl_to_posterior(model, x, q), q.kl_to_posterior(model, x)):
        assert got.shape == x_batch
        assert np.all(np.abs(got.numpy() - kl) <= tol)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_log_det_cov_and_marginals_match_the_dense_chain(batch):
    """log det Cov z and the forward moments are the dense chain's, batched or not."""
    arrays = chain_arrays(4, batch)
    q = chain(arrays)
    log_det = q.log_det_cov()
    mean, cov, cross = q.marginals()
    assert log_det.shape == batch
    assert mean.shape == (*batch, 4, K)
    assert cov.shape == (*batch, 4, K, K)
    assert cross.shape == (*batch, 3, K, K)
    for index in np.ndindex(*batch):
        one = {name: value[index] for name, value in arrays.items()}
        dense_mean, dense_cov = dense_chain(one)
        # Both are short sums of products of the same n = T·K = 8 numbers: ≲ n·eps of the
        # largest entry, times 1e2 of margin; the dense log det, by LU, ≲ n·κ·eps absolute.
        n = 4 * K
        tol = 1e2 * n * EPS * max(1.0, np.abs(dense_cov).max(), np.abs(dense_mean).max())
        log_det_tol = 1e2 * n * np.linalg.cond(dense_cov) * EPS
        assert abs(log_det[index].item() - np.linalg.slogdet(dense_cov)[1]) <= log_det_tol
        assert np.abs(mean[index].numpy().ravel() - dense_mean).max() <= tol
        blocks = dense_cov.reshape(4, K, 4, K)
        for t in range(4):
            assert np.abs(cov[index][t].numpy() - blocks[t, :, t, :]).max() <= tol
        for t in range(3):
            assert np.abs(cross[index][t].numpy() - blocks[t + 1, :, t, :]).max() <= tol


def test_single_step_batched_chain():
    """T = 1: an empty (batch, 0, K, K) lag-one covariance, and the ELBO/KL of one Gaussian."""
    p = model_parameters()
    model = make_model(p)
    arrays = chain_arrays(1, (2,))
    q = chain(arrays)
    assert repr(q) == f"MarkovGaussian(batch_shape=(2,), num_steps=1, state_dim={K})"
    mean, cov, cross = q.marginals()
    assert mean.shape == (2, 1, K)
    assert cov.shape == (2, 1, K, K)
    assert cross.shape == (2, 0, K, K)
    x = torch.tensor(seeds.rng(4).standard_normal((2, 1, D)), dtype=F64)
    elbo, kl = markov_elbo(model, x, q), markov_kl_to_posterior(model, x, q)
    for i in range(2):
        one = {name: value[i] for name, value in arrays.items()}
        expected_elbo, expected_kl, scale = dense_elbo_and_kl(p, one, x[i].numpy())
        tol = tolerance(scale, p, 1)
        assert abs(elbo[i].item() - expected_elbo) <= tol
        assert abs(kl[i].item() - expected_kl) <= tol


# -- construction: batch shapes, dtypes and argument errors ----------------------------------------


@pytest.mark.parametrize("batched", NAMES)
def test_a_batch_dimension_on_any_one_argument_batches_the_chain(batched):
    """One argument with a leading batch of 3 makes every attribute (3, …), that entry per row."""
    arrays = chain_arrays(4)
    tensors = {name: torch.tensor(value) for name, value in arrays.items()}
    rows = torch.stack([tensors[batched] * (1 + i) for i in range(3)])
    tensors[batched] = rows
    q = MarkovGaussian(*(tensors[name] for name in NAMES))
    assert q.batch_shape == (3,)
    for name in NAMES:
        value = getattr(q, name)
        assert value.shape == (3, *arrays[name].shape)
        expected = rows if name == batched else tensors[name].expand_as(value)
        # .tril() leaves the (already lower) factors as given: stored values are the inputs
        assert torch.equal(value, expected)


def test_batch_shapes_that_do_not_broadcast_are_rejected():
    """Arguments with batches (2,) and (3,) raise ValueError naming both shapes."""
    arrays = chain_arrays(4, (2,))
    tensors = {name: torch.tensor(value) for name, value in arrays.items()}
    tensors["offset"] = torch.tensor(chain_arrays(4, (3,))["offset"])
    with pytest.raises(ValueError, match=r"batch shapes must broadcast together, got .*\(3,\)"):
        MarkovGaussian(*(tensors[name] for name in NAMES))


@pytest.mark.parametrize("others", ["float32 tensors", "numpy arrays"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_argument_takes_initial_locs_dtype(others, dtype):
    """initial_loc sets the dtype: the other arguments are converted to it, whatever they are."""
    arrays = chain_arrays(3)
    rest = [
        torch.tensor(arrays[name], dtype=torch.float32)
        if others == "float32 tensors"
        else arrays[name]
        for name in NAMES[1:]
    ]
    q = MarkovGaussian(torch.tensor(arrays["initial_loc"], dtype=dtype), *rest)
    for name in NAMES:
        assert getattr(q, name).dtype == dtype, name


def arguments(num_steps=4, **changes):
    arrays = chain_arrays(num_steps)
    arrays.update(changes)
    return [arrays[name] for name in NAMES]


def with_nan(name):
    value = chain_arrays(4)[name].copy()
    value.flat[-1] = np.nan
    return {name: value}


BAD = [
    # (changes, error, message)
    ({"initial_loc": "m"}, TypeError, r"^initial_loc must be a torch tensor"),
    ({"initial_scale_tril": "S"}, TypeError, r"^initial_scale_tril must be a torch tensor"),
    ({"transition": "F"}, TypeError, r"^transition must be a torch tensor"),
    ({"offset": "f"}, TypeError, r"^offset must be a torch tensor"),
    ({"scale_tril": "S"}, TypeError, r"^scale_tril must be a torch tensor"),
    (
        {"initial_loc": 0.5},
        ValueError,
        r"^initial_loc must have shape \(\.\.\., K\), got 0\.5 \(torch\.float64\)$",
    ),
    (
        {"transition": np.zeros((3, K, K + 1))},
        ValueError,
        rf"^transition must have shape \(\.\.\., T − 1, {K}, {K}\) \(K = {K} from initial_loc\), "
        rf"got an array of shape \(3, {K}, {K + 1}\)",
    ),
    (
        {"initial_scale_tril": np.eye(K + 1)},
        ValueError,
        rf"^initial_scale_tril must have shape \(\.\.\., {K}, {K}\) .*got an array of shape",
    ),
    (
        {"offset": np.zeros((2, K))},
        ValueError,
        r"^transition, offset and scale_tril must have the same number of steps T − 1, got ",
    ),
    (with_nan("initial_loc"), ValueError, r"^initial_loc must be finite"),
    (with_nan("initial_scale_tril"), ValueError, r"^initial_scale_tril must be finite"),
    (with_nan("transition"), ValueError, r"^transition must be finite"),
    (with_nan("offset"), ValueError, r"^offset must be finite"),
    (with_nan("scale_tril"), ValueError, r"^scale_tril must be finite"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD)
def test_invalid_chain_arguments_raise_errors_naming_them(changes, error, message):
    """A non-array, a scalar loc, a wrong shape, unequal step counts or a NaN: errors name it."""
    with pytest.raises(error, match=message):
        MarkovGaussian(*arguments(**changes))


# -- markov_elbo and markov_kl_to_posterior: argument checks and dtype ----------------------------

FUNCTIONS = [markov_elbo, markov_kl_to_posterior]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_wrong_model_or_q_types_are_named(function):
    """model must be a LinearGaussianSSM and q a MarkovGaussian: TypeError quoting what came."""
    model = make_model(model_parameters())
    q = chain(chain_arrays(4))
    x = torch.zeros(4, D, dtype=F64)
    with pytest.raises(TypeError, match=r"^model must be a toyvae\.LinearGaussianSSM, got 3 of"):
        function(3, x, q)
    with pytest.raises(
        TypeError, match=r"^q must be a toyvae\.state_space\.MarkovGaussian, got 3 of type int"
    ):
        function(model, x, 3)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_chain_length_and_batch_must_fit_x(function):
    """q's T must be x's; q's batch must broadcast with x's: ValueError stating both."""
    model = make_model(model_parameters())
    x = torch.zeros(2, 5, D, dtype=F64)
    with pytest.raises(ValueError, match=r"^q must be a chain of T = 5 steps \(x's\)"):
        function(model, x, chain(chain_arrays(4)))
    x = torch.zeros(3, 4, D, dtype=F64)
    with pytest.raises(
        ValueError, match=r"^batch shapes must broadcast together, got q \(2,\) and x \(3,\)$"
    ):
        function(model, x, chain(chain_arrays(4, (2,))))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_float32_chain_is_computed_in_the_models_float64(function):
    """A float32 q with a float64 model: a float64 result, equal to that of q cast to float64."""
    model = make_model(model_parameters())
    arrays = chain_arrays(4)
    q32 = chain(arrays, torch.float32)
    q64 = MarkovGaussian(*(getattr(q32, name).double() for name in NAMES))
    x = torch.tensor(seeds.rng(5).standard_normal((4, D)), dtype=F64)
    got = function(model, x, q32)
    assert got.dtype == F64
    # The same float64 numbers go through the same float64 arithmetic: equal exactly.
    assert torch.equal(got, function(model, x, q64))


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_a_float32_model_gives_a_float32_markov_posterior_and_kl(default):
    """A float32 model (and x) computes the posterior chain, the Markov KL and the ELBO (of a
    Markov q and of its dense form) in float32, under
    either torch default dtype, and they agree with the float64 model on the same rounded
    numbers to float32's rounding: the tolerance bound above with float32's eps (κ < 1e3)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        check_float32_markov_posterior_and_kl()
    finally:
        torch.set_default_dtype(previous)


def check_float32_markov_posterior_and_kl():
    p = model_parameters()
    model32, model64 = make_model(p, torch.float32), make_model(p)
    x64 = torch.tensor(seeds.rng(5).standard_normal((4, D)), dtype=torch.float32).double()
    x32 = x64.float()
    post32, post64 = model32.markov_posterior(x32), model64.markov_posterior(x64)
    eps32 = float(torch.finfo(torch.float32).eps)
    for name in NAMES:
        got, want = getattr(post32, name), getattr(post64, name)
        assert got.dtype == torch.float32, name
        assert (got.double() - want).abs().max() <= 1e2 * 4 * K * 1e3 * eps32 * want.abs().max()
    q32 = chain(chain_arrays(4), torch.float32)
    q64 = MarkovGaussian(*(getattr(q32, name).double() for name in NAMES))
    _, _, scale = dense_elbo_and_kl(p, chain_arrays(4), x64.numpy())
    bound32, bound64 = model32.with_num_steps(4), model64.with_num_steps(4)
    pairs = [
        (markov_kl_to_posterior(model32, x32, q32), markov_kl_to_posterior(model64, x64, q64)),
        (markov_elbo(model32, x32, q32), markov_elbo(model64, x64, q64)),
        (
            toyvae.elbo(bound32, x32, q32.to_multivariate_normal()),
            toyvae.elbo(bound64, x64, q64.to_multivariate_normal()),
        ),
    ]
    for got, want in pairs:
        assert got.dtype == torch.float32
        assert abs(got.double() - want) <= tolerance(scale, p, 4) * eps32 / EPS


def test_grad_mode_does_not_change_the_markov_kl():
    """With nothing to differentiate, the KL is the square-root route's value whether or not
    grad mode is on: the derivative's carrier (Λ's blocks, whose terms cancel) is not mixed in,
    even by the one rounding of ``carrier + (value − carrier)``. At the posterior chain the two
    differ: the value is ~1e-30, the carrier's ~1e-15."""
    model = make_model(model_parameters())
    x = torch.tensor(seeds.rng(5).standard_normal((2, 4, D)), dtype=F64)
    q = model.markov_posterior(x)
    with torch.no_grad():
        quiet = markov_kl_to_posterior(model, x, q)
    loud = markov_kl_to_posterior(model, x, q)
    assert not loud.requires_grad
    assert torch.equal(loud, quiet)


# -- the posterior's scale: its derivative ---------------------------------------------------------


def test_posterior_scale_derivative_is_that_of_the_dense_cholesky():
    """d(posterior scale_tril)/d(A, Q, C, R) is that of chol((Mᵀ D⁻¹ M + I ⊗ CᵀR⁻¹C)⁻¹)."""
    p = model_parameters()
    num_steps = 3
    leaves = [torch.tensor(p[name], requires_grad=True) for name in LEAVES]
    a, q, c, r = leaves
    model = LinearGaussianSSM(
        a,
        q,
        c,
        r,
        emission_bias=torch.tensor(p["emission_bias"]),
        initial_mean=torch.tensor(p["initial_mean"]),
        initial_covariance=torch.tensor(p["initial_covariance"]),
    )
    x = torch.tensor(seeds.rng(6).standard_normal((num_steps, D)), dtype=F64)
    weight = torch.tensor(seeds.rng(7).standard_normal((num_steps * K,) * 2), dtype=F64)
    got = torch.autograd.grad((model.posterior(x).scale_tril * weight).sum(), leaves)

    # The dense textbook precision: the prior's Mᵀ D⁻¹ M (M z = noise, M block bidiagonal with
    # −A below the diagonal, D = diag(P₀, Q, …, Q)), plus CᵀR⁻¹C on every diagonal block.
    shift = torch.diag(torch.ones(num_steps - 1, dtype=F64), -1)
    m = torch.eye(num_steps * K, dtype=F64) - torch.kron(shift, a)
    noise = torch.block_diag(torch.tensor(p["initial_covariance"]), *[q] * (num_steps - 1))
    gram = c.T @ torch.diag(1 / r) @ c
    precision = m.T @ torch.linalg.inv(noise) @ m + torch.kron(
        torch.eye(num_steps, dtype=F64), gram
    )
    expected_tril = torch.linalg.cholesky(torch.linalg.inv(precision))
    expected = torch.autograd.grad((expected_tril * weight).sum(), leaves)
    kappa = torch.linalg.cond(precision.detach()).item()
    assert kappa < 1e3  # well conditioned: the bound below is small
    for g, e in zip(got, expected, strict=True):
        # Both differentiate backward-stable factorizations of an n = T·K = 6 matrix: the
        # derivative's error is ≲ n·κ²·eps relative; 1e2 of margin for the different routes.
        assert (g - e).abs().max() <= 1e2 * num_steps * K * kappa**2 * EPS * e.abs().max()


LEAVES = ("transition", "transition_noise", "emission", "emission_noise")
