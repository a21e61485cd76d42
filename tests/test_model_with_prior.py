"""A LinearGaussian with a non-standard prior N(m₀, P₀): marginal, posterior precision and the
posterior-mean map against the textbook formulas, evaluated with NumPy inverses.

    p(x)    = N(b + W m₀, W P₀ Wᵀ + Ψ)
    Λ_z     = P₀⁻¹ + Wᵀ Ψ⁻¹ W
    μ(x)    = m₀ + Λ_z⁻¹ Wᵀ Ψ⁻¹ (x − b − W m₀) = V x + c,
    V       = Λ_z⁻¹ Wᵀ Ψ⁻¹,   c = m₀ − V (b + W m₀)

The prior's Cholesky factor L₀ is not diagonal and m₀ ≠ 0, so every place where the prior enters
(its mean, its factor, the triangle of the factor a solve reads) changes the answer by O(0.1).
"""

import numpy as np
import pytest
import torch

import toyvae

F64 = torch.float64

W = np.array([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.1]])
B = np.array([0.4, -0.2, 1.0])
M0 = np.array([0.7, -1.5])
L0 = np.array([[1.2, 0.0], [0.6, 0.5]])  # lower, with a non-zero off-diagonal entry
NOISE = {
    "isotropic": 0.6,
    "diagonal": np.array([0.5, 0.8, 1.3]),
    "full": np.array([[1.0, 0.3, 0.1], [0.3, 0.9, -0.2], [0.1, -0.2, 1.2]]),
}

# All matrices here have entries O(1) and condition numbers below 20, so the model's QR route and
# the textbook inverses below agree to a few hundred ulps of O(1) values (≲ 1e-13). 1e-11 leaves
# two orders of margin and is still ten orders below the O(0.1) changes a wrong prior makes.
TOL = 1e-11


def _psi(kind):
    noise = NOISE[kind]
    return (
        noise * np.eye(3)
        if np.ndim(noise) == 0
        else np.diag(noise)
        if np.ndim(noise) == 1
        else noise
    )


def _model(kind):
    prior = torch.distributions.MultivariateNormal(
        torch.tensor(M0, dtype=F64), scale_tril=torch.tensor(L0, dtype=F64)
    )
    return toyvae.LinearGaussian(W, B, NOISE[kind], prior=prior)


def _textbook_precision(kind):
    p0 = L0 @ L0.T
    return np.linalg.inv(p0) + W.T @ np.linalg.inv(_psi(kind)) @ W


@pytest.mark.parametrize("kind", sorted(NOISE))
def test_marginal_with_a_prior_is_the_textbook_gaussian(kind):
    """marginal() = N(b + W m₀, W P₀ Wᵀ + Ψ) for every kind of noise."""
    marginal = _model(kind).marginal()
    expected_mean = B + W @ M0
    expected_cov = W @ (L0 @ L0.T) @ W.T + _psi(kind)
    np.testing.assert_allclose(marginal.mean.numpy(), expected_mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(marginal.covariance_matrix.numpy(), expected_cov, rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", sorted(NOISE))
def test_posterior_precision_with_a_prior_is_the_textbook_one(kind):
    """posterior_precision() = P₀⁻¹ + WᵀΨ⁻¹W, a (K, K) float64 matrix."""
    precision = _model(kind).posterior_precision()
    assert precision.shape == (2, 2)
    assert precision.dtype == F64
    np.testing.assert_allclose(precision.numpy(), _textbook_precision(kind), rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", sorted(NOISE))
def test_posterior_mean_map_with_a_prior_is_the_textbook_one(kind):
    """posterior_mean_map() = (V, c) with V = Λ_z⁻¹WᵀΨ⁻¹ and c = m₀ − V(b + W m₀)."""
    model = _model(kind)
    weight, offset = model.posterior_mean_map()
    gain = np.linalg.inv(_textbook_precision(kind)) @ W.T @ np.linalg.inv(_psi(kind))
    assert weight.shape == (2, 3)
    assert offset.shape == (2,)
    np.testing.assert_allclose(weight.numpy(), gain, rtol=0, atol=TOL)
    np.testing.assert_allclose(offset.numpy(), M0 - gain @ (B + W @ M0), rtol=0, atol=TOL)
    # The affine map is the posterior mean: at a data point both give μ(x).
    x = torch.tensor([0.3, -0.9, 2.0], dtype=F64)
    np.testing.assert_allclose(
        (weight @ x + offset).numpy(), model.posterior(x).mean.numpy(), rtol=0, atol=TOL
    )


# -- the prior argument ---------------------------------------------------------------------


def test_a_prior_that_is_not_a_multivariate_normal_is_a_type_error_saying_what_it_got():
    with pytest.raises(
        TypeError, match=r"^prior must be a torch\.distributions\.Multivariate"
    ) as info:
        toyvae.LinearGaussian(W, B, 0.6, prior=torch.distributions.Normal(0.0, 1.0))
    assert "of type Normal" in str(info.value)


@pytest.mark.parametrize(
    ("loc", "tril", "pattern"),
    [
        ([0.0, float("nan")], [[1.0, 0.0], [0.5, 1.0]], r"^prior's mean must be finite"),
        ([0.0, 1.0], [[1.0, 0.0], [0.5, -1.0]], r"^prior's scale .* must be strictly positive"),
    ],
)
def test_an_invalid_prior_is_a_value_error_naming_the_prior(loc, tril, pattern):
    """A NaN mean or a non-positive Cholesky diagonal (torch's own validation switched off, so
    toyvae's is what is tested): ValueError whose message starts with "prior"."""
    prior = torch.distributions.MultivariateNormal(
        torch.tensor(loc, dtype=F64),
        scale_tril=torch.tensor(tril, dtype=F64),
        validate_args=False,
    )
    with pytest.raises(ValueError, match=pattern):
        toyvae.LinearGaussian(W, B, 0.6, prior=prior)


def test_a_float32_prior_is_converted_to_a_float64_models_dtype():
    """The model's dtype is its weight's; a prior built in torch's default float32 is converted,
    so every result is float64 and equals the textbook value in float64 arithmetic."""
    prior = torch.distributions.MultivariateNormal(
        torch.tensor(M0, dtype=torch.float32), scale_tril=torch.tensor(L0, dtype=torch.float32)
    )
    model = toyvae.LinearGaussian(W, B, NOISE["diagonal"], prior=prior)
    # The textbook values below use the float32-rounded prior (m₀ = 0.7 is not representable).
    m0 = prior.loc.double().numpy()
    l0 = prior.scale_tril.double().numpy()
    assert model.prior().loc.dtype == F64
    assert model.prior().scale_tril.dtype == F64
    precision = model.posterior_precision()
    assert precision.dtype == F64
    psi_inv = np.linalg.inv(_psi("diagonal"))
    expected = np.linalg.inv(l0 @ l0.T) + W.T @ psi_inv @ W
    np.testing.assert_allclose(precision.numpy(), expected, rtol=0, atol=TOL)
    marginal = model.marginal()
    np.testing.assert_allclose(marginal.mean.numpy(), B + W @ m0, rtol=0, atol=TOL)
