"""The linear-Gaussian encoder: the exact posterior as an encoder, validation, immutability."""

import pytest
import seeds
import torch
from hypothesis import given

import toyvae
from toyvae.encoder import LinearGaussianEncoder
from toyvae.strategies import linear_gaussian_models
from toyvae.tolerances import EPS

F64 = torch.float64


def random_encoder(seed, d=4, k=2):
    """An arbitrary encoder with a full L_S (positive diagonal)."""
    gen = seeds.generator(seed)
    o = {"dtype": F64, "generator": gen}
    lower = torch.randn(k, k, **o).tril(-1) + torch.diag(torch.rand(k, **o) + 0.5)
    return LinearGaussianEncoder(torch.randn(k, d, **o), torch.randn(k, **o), lower)


@given(linear_gaussian_models(max_data_dim=5))
def test_exact_posterior_encoder_is_the_model_posterior(model):
    """LinearGaussianEncoder.exact_posterior(model)(x) has the posterior's mean and covariance."""
    encoder = LinearGaussianEncoder.exact_posterior(model)
    x = model.sample((3,), generator=seeds.generator(0))[0]
    q, post = encoder(x), model.posterior(x)
    precision = torch.linalg.inv(post.covariance_matrix[0])
    kappa = torch.linalg.cond(precision).item()
    d, k = model.data_dim, model.latent_dim
    # V x + c and Σ Wᵀ Ψ⁻¹ (x − b) are the same (D + K)-term sums formed in a different order
    # from factors with relative error ≤ (D + K)·eps·κ(Λ), normwise: an entry that is zero in
    # exact arithmetic (a zero column of W) may come out at eps times the row's largest entry.
    # So each row of the mean is held to its largest term, max_i (|V| |x − b| + |V b|)_i, with
    # V the dense mean map.
    v = (
        post.covariance_matrix[0]
        @ model.weight.mT
        @ torch.linalg.inv(
            model.noise_variance
            if model.noise_kind == "full"
            else torch.diag(model.noise_variance.expand(d))
        )
    )
    terms = v.abs() @ (x - model.bias).abs().mT + (v @ model.bias).abs().unsqueeze(-1)
    scale = terms.amax(0, keepdim=True)  # (1, N): the largest term of each row of x
    tol = 8 * (d + k) * EPS * kappa * scale.mT
    assert ((q.mean - post.mean).abs() <= tol).all()
    assert torch.equal(q.scale_tril[0], post.scale_tril[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"weight": torch.ones(3)}, ValueError, ["weight", "(K, D)", "(3,)"]),
        ({"weight": "V"}, TypeError, ["weight", "str"]),
        ({"bias": torch.ones(3)}, ValueError, ["bias", "(2,)", "(3,)"]),
        ({"scale_tril": torch.ones(3, 3)}, ValueError, ["scale_tril", "(2, 2)", "(3, 3)"]),
        ({"scale_tril": -torch.eye(2)}, ValueError, ["scale_tril", "positive", "-1.0"]),
        ({"bias": [0.0, float("nan")]}, ValueError, ["bias", "NaN"]),
    ],
)
def test_bad_encoder_parameters_raise_errors_that_name_them(kwargs, error, words):
    """Malformed encoder parameters raise ValueError/TypeError naming the argument and value."""
    arguments = {"weight": torch.ones(2, 4, dtype=F64), **kwargs}
    with pytest.raises(error) as info:
        LinearGaussianEncoder(**arguments)
    for word in words:
        assert word in str(info.value)


def test_encoder_reads_only_the_lower_triangle_of_scale_tril():
    """Junk above the diagonal of scale_tril changes neither the stored factor nor q(z|x)."""
    encoder = random_encoder(2)
    junk = torch.triu(torch.full((2, 2), 7.0, dtype=F64), 1)
    noisy = LinearGaussianEncoder(encoder.weight, encoder.bias, encoder.scale_tril + junk)
    x = torch.randn(3, 4, dtype=F64, generator=seeds.generator(3))
    # The upper triangle is discarded before any arithmetic, so the results are bit-identical.
    assert torch.equal(noisy.scale_tril, encoder.scale_tril)
    q, clean = noisy(x), encoder(x)
    assert torch.equal(q.loc, clean.loc) and torch.equal(q.scale_tril, clean.scale_tril)
    z = torch.randn(3, 2, dtype=F64, generator=seeds.generator(4))
    assert torch.equal(q.log_prob(z), clean.log_prob(z))


def test_exact_posterior_needs_a_linear_gaussian_model():
    """exact_posterior of something that is not a LinearGaussian raises TypeError naming it."""
    with pytest.raises(TypeError, match=r"model must be a toyvae\.LinearGaussian, got int"):
        LinearGaussianEncoder.exact_posterior(3)


def test_encoder_is_differentiable_in_its_parameters():
    """ELBO(encoder(x)) has the gradient of the same q built from the parameters directly."""
    encoder = random_encoder(5)
    weight, bias, lower = (
        t.clone().requires_grad_() for t in (encoder.weight, encoder.bias, encoder.scale_tril)
    )
    gen = seeds.generator(6)
    model = toyvae.LinearGaussian(torch.randn(4, 2, dtype=F64, generator=gen), noise_variance=0.5)
    x = torch.randn(3, 4, dtype=F64, generator=gen)
    q = LinearGaussianEncoder(weight, bias, lower)(x)
    grads = torch.autograd.grad(toyvae.elbo(model, x, q).sum(), (weight, bias, lower))
    by_hand = torch.distributions.MultivariateNormal(
        x @ weight.mT + bias, scale_tril=lower.tril().expand(3, 2, 2)
    )
    expected = torch.autograd.grad(toyvae.elbo(model, x, by_hand).sum(), (weight, bias, lower))
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(got, want)  # the same operations on the same tensors


def test_encoder_is_immutable_and_an_in_place_edit_raises():
    """Attributes cannot be set, and an optimizer-style in-place edit of V makes later use raise."""
    weight = torch.randn(2, 4, dtype=F64, generator=seeds.generator(7))
    encoder = LinearGaussianEncoder(weight)
    with pytest.raises(AttributeError, match="immutable"):
        encoder.weight = weight
    x = torch.zeros(1, 4, dtype=F64)
    encoder(x)
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.raises(RuntimeError, match="weight was modified in place"):
        encoder(x)
