"""Bad input, fuzzed: every public (model, x, q) function answers right or names the argument.

Hypothesis draws a valid model, data and q, then corrupts one argument in one way. Each call
must either return the value it returns on the uncorrupted equivalent (an integer, float16 or
non-contiguous x is the same data), or raise ``ValueError``/``TypeError`` whose message names
the corrupted argument. Never a traceback from inside torch (``RuntimeError``,
``IndexError``, LAPACK errors), never a silent NaN.
"""

from __future__ import annotations

import pytest
import seeds
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal

import toyvae
from toyvae.strategies import linear_gaussian_models

F64 = torch.float64

FUNCTIONS = {
    "elbo": toyvae.elbo,
    "kl_to_posterior": toyvae.kl_to_posterior,
    "expected_log_likelihood": toyvae.expected_log_likelihood,
    "log_weight_moments": lambda m, x, q: toyvae.log_weight_moments(m, x, q).variance,
    "chi_square_divergence": toyvae.chi_square_divergence,
    "log_weights": lambda m, x, q: toyvae.log_weights(m, x, q, 3, generator=seeds.generator(0)),
    "iwae_estimates": lambda m, x, q: toyvae.iwae_estimates(
        m, x, q, 2, 2, generator=seeds.generator(0)
    ),
}

# Corruptions of x that keep the same data: the result must equal the clean one.
SAME_DATA = {
    "int": lambda x: x.round().to(torch.int64),
    "float16": lambda x: x.to(torch.float16),
    "non-contiguous": lambda x: torch.stack([x, x], -1)[..., 0],
}

# Corruptions of x that must be refused, and the words the message must contain.
BAD_X = {
    "wrong last dimension": (lambda x: x[..., :-1], ValueError, "x"),
    "NaN entry": (lambda x: _set_first(x, float("nan")), ValueError, "x must be finite"),
    "infinite entry": (lambda x: _set_first(x, float("inf")), ValueError, "x must be finite"),
    "complex": (lambda x: x.to(torch.complex128), TypeError, "x"),
    "bool": (lambda x: x > 0, TypeError, "x"),
    "string": (lambda x: "data", TypeError, "x"),
    "batch that does not broadcast": (lambda x: torch.cat([x, x]), ValueError, "batch shapes"),
}

# Corruptions of q that must be refused.
BAD_Q = {
    "not a Gaussian": (lambda q: Normal(0.0, 1.0), TypeError, "q must be"),
    "wrong event size": (
        lambda q: MultivariateNormal(
            torch.zeros(q.mean.shape[-1] + 1, dtype=F64),
            scale_tril=torch.eye(q.mean.shape[-1] + 1, dtype=F64),
        ),
        ValueError,
        "q must have event shape",
    ),
    "NaN mean": (
        lambda q: Independent(
            Normal(_set_first(q.mean, float("nan")), q.stddev, validate_args=False), 1
        ),
        ValueError,
        "q's mean must be finite",
    ),
    "zero scale": (
        lambda q: Independent(Normal(q.mean, _set_first(q.stddev, 0.0), validate_args=False), 1),
        ValueError,
        "q's scale",
    ),
}


def _set_first(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[0] = value
    return out


@st.composite
def cases(draw):
    model = draw(linear_gaussian_models(max_data_dim=4, max_latent_dim=3))
    n = draw(st.integers(2, 3))  # with one row, any batch broadcasts with it
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = 3 * torch.randn(n, model.data_dim, generator=gen, dtype=F64)
    loc = torch.randn(n, model.latent_dim, generator=gen, dtype=F64)
    scale = 0.5 + torch.rand(n, model.latent_dim, generator=gen, dtype=F64)
    q = Independent(Normal(loc, scale), 1)
    return model, x, q, draw(st.sampled_from(sorted(FUNCTIONS)))


@settings(max_examples=25)  # enough to reach every (function, corruption) pair
@given(cases(), st.sampled_from(sorted(SAME_DATA)))
def test_same_data_in_another_form_gives_the_same_answer(case, form):
    """An integer, float16 or non-contiguous x is accepted and gives the answer for its values."""
    model, x, q, name = case
    function = FUNCTIONS[name]
    changed = SAME_DATA[form](x)
    expected = function(model, changed.to(F64), q)  # the same values, as float64
    got = function(model, changed, q)
    assert torch.equal(got, expected)
    assert not torch.isnan(got).any()


@settings(max_examples=40)
@given(cases(), st.sampled_from(sorted(BAD_X)))
def test_bad_data_raise_errors_that_name_them(case, kind):
    """Each corruption of x raises ValueError/TypeError naming x (or the batch shapes)."""
    model, x, q, name = case
    corrupt, error, words = BAD_X[kind]
    bad = corrupt(x)
    if kind == "wrong last dimension" and bad.shape[-1] == 0:
        bad = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=F64)
    with pytest.raises(error, match=words):
        FUNCTIONS[name](model, bad, q)


@settings(max_examples=25)
@given(cases(), st.sampled_from(sorted(BAD_Q)))
def test_bad_variational_distributions_raise_errors_that_name_them(case, kind):
    """Each corruption of q raises ValueError/TypeError naming q."""
    model, x, q, name = case
    corrupt, error, words = BAD_Q[kind]
    with pytest.raises(error, match=words):
        FUNCTIONS[name](model, x, corrupt(q))


@settings(max_examples=15)
@given(cases())
def test_an_empty_batch_gives_empty_results(case):
    """Zero data points: every function returns an empty result of the right batch shape."""
    model, x, q, name = case
    empty_x = x[:0]
    empty_q = Independent(Normal(q.base_dist.loc[:0], q.base_dist.scale[:0]), 1)
    result = FUNCTIONS[name](model, empty_x, empty_q)
    assert result.numel() == 0


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "complex", "bool"])
def test_every_family_refuses_parameters_it_cannot_compute_in(kind):
    """Half-precision, complex or boolean parameters raise a TypeError naming the argument."""
    dtype = {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "complex": torch.complex128,
        "bool": torch.bool,
    }[kind]
    with pytest.raises(TypeError, match="weight"):
        toyvae.LinearGaussian(torch.ones(3, 2, dtype=dtype))
    with pytest.raises(TypeError, match="transition"):
        toyvae.LinearGaussianSSM(torch.eye(2, dtype=dtype), 1.0, torch.ones(3, 2), 1.0)
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        toyvae.HierarchicalLinearGaussian([torch.ones(3, 2, dtype=dtype), torch.ones(2, 2)])


def test_every_family_handles_an_empty_batch():
    """log_evidence, posterior and log_joint of every family take zero data points."""
    lg = toyvae.LinearGaussian(torch.ones(3, 2, dtype=F64))
    hier = toyvae.HierarchicalLinearGaussian(
        [torch.ones(3, 2, dtype=F64), torch.ones(2, 2, dtype=F64)]
    )
    ssm = toyvae.LinearGaussianSSM(
        0.5 * torch.eye(2, dtype=F64), 1.0, torch.ones(3, 2, dtype=F64), 1.0
    )
    for model, x in [
        (lg, torch.zeros(0, 3, dtype=F64)),
        (hier, torch.zeros(0, 3, dtype=F64)),
        (ssm, torch.zeros(0, 4, 3, dtype=F64)),
    ]:
        assert model.log_evidence(x).shape == (0,)
        posterior = model.posterior(x)
        assert posterior.batch_shape == (0,)
        assert model.log_joint(x, posterior.loc).shape == (0,)
