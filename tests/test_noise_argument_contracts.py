"""The ``noise`` and ``estimator`` arguments of the at-given-noise functions.

``log_weights_at`` and ``elbo_surrogate_at`` take standard-normal noise of shape
(*sample_shape, *batch, K), sample_shape possibly empty; they convert it to the model's dtype,
and refuse a non-tensor, an integer tensor, a wrong trailing shape or a non-finite entry with
the documented error type and a message that names ``noise`` and shows what was given. An
unknown estimator name is refused with the list of valid ones.

Every check is deterministic; the reference log weights are NumPy/SciPy (toyvae.reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference
from toyvae.estimators import log_weights_at
from toyvae.gradients import elbo_surrogate_at

DT = torch.float64
D, K = 3, 2
# Log weights here are sums of O(10) terms of size ≲ 30 (K = 2, condition number < 20): toyvae's
# and NumPy's rounding stay below 1e3·eps·30 ≈ 7e-12 each; 1e-10 leaves a wide margin.
ATOL = 1e-10


def _case():
    """Fixed, exactly representable numbers: no random draws."""
    weight = torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]], dtype=DT)
    bias = torch.tensor([0.5, -1.0, 0.25], dtype=DT)
    noise = torch.tensor([0.5, 0.75, 1.25], dtype=DT)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    model = toyvae.LinearGaussian(weight, bias, noise)
    loc = torch.tensor([0.25, -0.5], dtype=DT)
    tril = torch.tensor([[0.75, 0.0], [0.125, 0.5]], dtype=DT)
    q = MultivariateNormal(loc, scale_tril=tril)
    return model, x, q, (weight, bias, noise)


def _reference_log_weight(params, x, q, eps: np.ndarray) -> np.ndarray:
    weight, bias, noise = (t.numpy() for t in params)
    z = q.loc.numpy() + eps @ q.scale_tril.numpy().T
    log_q = multivariate_normal(q.loc.numpy(), q.covariance_matrix.numpy()).logpdf(z)
    return reference.log_joint(weight, bias, noise, x.numpy(), z) - log_q


FUNCTIONS = {
    "log_weights_at": lambda model, x, q, noise: log_weights_at(model, x, q, noise),
    "elbo_surrogate_at": lambda model, x, q, noise: elbo_surrogate_at(model, x, q, noise),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_noise_without_a_sample_axis_gives_one_log_weight(name):
    """sample_shape = (): noise of shape (K,) gives a 0-d result, the log weight at that ε."""
    model, x, q, params = _case()
    eps = torch.tensor([0.5, -1.25], dtype=DT)
    got = FUNCTIONS[name](model, x, q, eps)
    assert got.shape == ()
    want = _reference_log_weight(params, x, q, eps.numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_noise_is_converted_to_the_models_dtype(name):
    """float32 noise for a float64 model gives float64 log weights at exactly those values
    (the noise entries are float32 numbers, exactly representable in float64)."""
    model, x, q, params = _case()
    eps = torch.tensor([[0.5, -1.25], [2.0, 0.375], [-0.75, 0.0]], dtype=torch.float32)
    got = FUNCTIONS[name](model, x, q, eps)
    assert got.dtype == DT
    want = _reference_log_weight(params, x, q, eps.double().numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(
    ("noise", "shown"),
    [
        ([0.0, 1.0], r"\[0\.0, 1\.0\] of type list"),
        (torch.tensor([0, 1]), r"an array of shape \(2,\) \(torch\.int64\)"),
    ],
)
def test_noise_that_is_not_a_floating_point_tensor_is_refused(name, noise, shown):
    model, x, q, _ = _case()
    with pytest.raises(
        TypeError, match=rf"^noise must be a floating-point torch tensor, got {shown}$"
    ):
        FUNCTIONS[name](model, x, q, noise)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_noise_of_the_wrong_shape_is_refused(name):
    model, x, q, _ = _case()
    with pytest.raises(
        ValueError,
        match=r"^noise must have shape \(\*sample_shape, \*batch, K\) with \(\*batch, K\) = "
        r"\(2,\), got an array of shape \(4, 3\) \(torch\.float64\)$",
    ):
        FUNCTIONS[name](model, x, q, torch.zeros(4, 3, dtype=DT))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_noise_without_the_batch_axes_of_q_is_refused(name):
    """q with batch (3,): noise needs the trailing shape (3, K), even for one x."""
    model, x, q, _ = _case()
    batched = MultivariateNormal(q.loc.expand(3, K), scale_tril=q.scale_tril)
    with pytest.raises(
        ValueError,
        match=r"^noise must have shape \(\*sample_shape, \*batch, K\) with \(\*batch, K\) = "
        r"\(3, 2\), got an array of shape \(4, 2\) \(torch\.float64\)$",
    ):
        FUNCTIONS[name](model, x, batched, torch.zeros(4, K, dtype=DT))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_non_finite_noise_is_refused(name):
    model, x, q, _ = _case()
    eps = torch.tensor([[0.0, math.nan], [1.0, 2.0]], dtype=DT)
    with pytest.raises(
        ValueError,
        match=r"^noise must be finite, got 1 NaN or infinite entry in an array of shape "
        r"\(2, 2\) \(torch\.float64\)$",
    ):
        FUNCTIONS[name](model, x, q, eps)


def test_an_unknown_estimator_is_refused_with_the_valid_names():
    model, x, q, _ = _case()
    with pytest.raises(
        ValueError,
        match=r"^estimator must be one of \('reparameterization', 'path_derivative', "
        r"'score_function'\), got 'reinforce'$",
    ):
        elbo_surrogate_at(model, x, q, torch.zeros(K, dtype=DT), estimator="reinforce")
