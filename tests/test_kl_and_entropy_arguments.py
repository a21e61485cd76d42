"""toyvae.gaussian_kl and toyvae.entropy: errors name the argument at fault (q or p), and batch
shapes broadcast by NumPy's rule, with values against toyvae.reference (NumPy/SciPy)."""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference

F64 = torch.float64


def _mvn(loc, scale_tril):
    return MultivariateNormal(
        torch.tensor(loc, dtype=F64), scale_tril=torch.tensor(scale_tril, dtype=F64)
    )


def _standard(k):
    return _mvn(np.zeros(k), np.eye(k))


@pytest.mark.parametrize(
    ("q", "p", "pattern"),
    [
        ("not a distribution", _standard(2), r"^q must be a torch\.distributions\."),
        (_standard(2), "not a distribution", r"^p must be a torch\.distributions\."),
    ],
)
def test_gaussian_kl_type_errors_name_the_argument(q, p, pattern):
    """A non-Gaussian q or p is a TypeError whose message starts with that argument's name."""
    with pytest.raises(TypeError, match=pattern):
        toyvae.gaussian_kl(q, p)


def test_gaussian_kl_event_size_mismatch_is_a_value_error_naming_p():
    """p over 3 variables against q over 2: ValueError naming p and both sizes (not a
    RuntimeError from a matrix product deep inside)."""
    with pytest.raises(ValueError, match=r"^p must have event shape \(2,\).*\(3,\)"):
        toyvae.gaussian_kl(_standard(2), _standard(3))


def test_gaussian_kl_names_p_when_only_p_is_invalid():
    """p with a NaN mean: the message names p's mean, not q's."""
    p = MultivariateNormal(
        torch.tensor([0.0, float("nan")], dtype=F64),
        scale_tril=torch.eye(2, dtype=F64),
        validate_args=False,  # torch would reject it first; toyvae must too, naming it
    )
    with pytest.raises(ValueError, match=r"^p's mean must be finite"):
        toyvae.gaussian_kl(_standard(2), p)


def test_entropy_type_error_names_q():
    with pytest.raises(TypeError, match=r"^q must be a torch\.distributions\."):
        toyvae.entropy(3.0)


def test_entropy_value_error_names_q():
    q = MultivariateNormal(
        torch.tensor([float("inf"), 0.0], dtype=F64),
        scale_tril=torch.eye(2, dtype=F64),
        validate_args=False,  # torch would reject it first; toyvae must too, naming it
    )
    with pytest.raises(ValueError, match=r"^q's mean must be finite"):
        toyvae.entropy(q)


# Batches: q over a (2, 3) batch, p over a (3,) batch, and an unbatched Gaussian; K = 2.
LOC_23 = np.linspace(-1.0, 1.0, 12).reshape(2, 3, 2)
TRIL = np.array([[1.0, 0.0], [0.3, 0.8]])
TRIL_23 = TRIL * np.array([1.0, 1.2, 0.9, 0.6, 1.1, 1.4]).reshape(2, 3, 1, 1)
LOC_3 = np.array([[0.1, 0.2], [-0.3, 0.5], [0.7, -0.4]])
TRIL_3 = np.array([[[1.0, 0.0], [0.2, 1.3]], [[1.5, 0.0], [-0.4, 0.7]], [[0.7, 0.0], [0.1, 0.9]]])
LOC_1 = np.array([0.25, -0.5])
TRIL_1 = np.array([[0.9, 0.0], [-0.2, 1.1]])

CASES = {
    "(2,3) vs (3,)": ((LOC_23, TRIL_23), (LOC_3, TRIL_3), (2, 3)),
    "(3,) vs (2,3)": ((LOC_3, TRIL_3), (LOC_23, TRIL_23), (2, 3)),
    "() vs (3,)": ((LOC_1, TRIL_1), (LOC_3, TRIL_3), (3,)),
    "(3,) vs ()": ((LOC_3, TRIL_3), (LOC_1, TRIL_1), (3,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gaussian_kl_broadcasts_batch_shapes(case):
    """Batch shapes broadcast as in NumPy (trailing axes aligned), and every element is the
    textbook KL of its pair."""
    (loc_q, tril_q), (loc_p, tril_p), batch = CASES[case]
    kl = toyvae.gaussian_kl(_mvn(loc_q, tril_q), _mvn(loc_p, tril_p))
    assert kl.shape == batch
    expected = reference.gaussian_kl(
        loc_q, tril_q @ np.swapaxes(tril_q, -1, -2), loc_p, tril_p @ np.swapaxes(tril_p, -1, -2)
    )
    # KL values are O(1) and every covariance here has a condition number below 10, so the
    # Cholesky route and NumPy's inverse/slogdet agree to a few ulps of O(1) (~1e-15);
    # 1e-12 leaves a wide margin.
    np.testing.assert_allclose(kl.numpy(), expected, rtol=0, atol=1e-12)


def test_a_size_mismatch_between_q_and_p_names_q_not_a_model():
    """gaussian_kl has no model: p's event size is compared with q's, and the message says so."""
    q = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    p = MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^p must have event shape \(2,\) to match q's event"):
        toyvae.gaussian_kl(q, p)
