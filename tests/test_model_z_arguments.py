"""LinearGaussian's latent argument z (likelihood, log_joint): errors are ValueError/TypeError
whose message starts with "z" and says which size was expected, and z in another dtype is
converted to the model's, as x is."""

import numpy as np
import pytest
import torch

import toyvae
from toyvae import reference

F64 = torch.float64

W = np.array([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.1]])
B = np.array([0.4, -0.2, 1.0])
NOISE = np.array([0.5, 0.8, 1.3])
X = torch.tensor([0.3, -0.9, 2.0], dtype=F64)


def _model():
    return toyvae.LinearGaussian(W, B, NOISE)


def _calls(z):
    model = _model()
    return {"likelihood": lambda: model.likelihood(z), "log_joint": lambda: model.log_joint(X, z)}


@pytest.mark.parametrize("method", ["likelihood", "log_joint"])
def test_z_of_the_wrong_size_names_z_and_the_latent_dimension(method):
    """z with 3 entries for K = 2: the message names z, the expected size and that it is the
    latent dimension K (a z of the data dimension D is the usual mix-up)."""
    call = _calls(torch.zeros(3, dtype=F64))[method]
    with pytest.raises(
        ValueError, match=r"^z must have last dimension 2 \(the model's latent dimension K\)"
    ):
        call()


@pytest.mark.parametrize("method", ["likelihood", "log_joint"])
def test_z_of_the_wrong_type_is_a_type_error_naming_z(method):
    call = _calls("0.5, 1.0")[method]
    with pytest.raises(
        TypeError, match=r"^z must be a torch tensor, a NumPy array or a real number"
    ):
        call()


@pytest.mark.parametrize("method", ["likelihood", "log_joint"])
def test_non_finite_z_is_a_value_error_naming_z(method):
    call = _calls(torch.tensor([0.5, float("nan")], dtype=F64))[method]
    with pytest.raises(ValueError, match=r"^z must be finite, got 1 NaN or infinite entry"):
        call()


def test_float32_z_is_converted_to_the_models_dtype():
    """A float64 model given a float32 z computes in float64, as for x (check_data): the
    result is float64 and equals the textbook log N(x; Wz + b, Ψ) + log N(z; 0, I)."""
    z = np.array([[0.5, -1.25], [2.0, 0.375]])  # exactly representable in float32
    model = _model()
    value = model.log_joint(X, torch.tensor(z, dtype=torch.float32))
    assert value.dtype == F64
    expected = reference.log_joint(W, B, NOISE, X.numpy(), z)
    # Values are O(10) sums of D + K = 5 O(1) terms with well-conditioned diagonal Ψ: scipy and
    # toyvae agree to a few ulps of O(10) (~1e-14); float32 arithmetic anywhere would cost ~1e-6.
    np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-12)
    likelihood = model.likelihood(torch.tensor(z, dtype=torch.float32))
    assert likelihood.mean.dtype == F64
    # Wz + b: sums of three O(1) products, within a few ulps of O(3) (~1e-15) of NumPy's.
    np.testing.assert_allclose(likelihood.mean.numpy(), z @ W.T + B, rtol=0, atol=1e-14)
