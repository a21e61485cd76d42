"""LinearGaussian.magnitude against its documented sum of term sizes, computed densely in z;
kl_to_prior(q, model): its value across dtypes and the errors that name q; a float32 log p(x)
with D = K and tiny noise against the 60-digit oracle; LinearGaussian's default noise and the
parameter it names in its errors.

M scales every derived tolerance (toyvae.tolerances), so an M larger than documented only
loosens them and no value test notices: M itself is compared here with the sum its docstring
states (tests/test_magnitude_bounds.py checks only that M bounds each quantity).
"""

import math
import re

import mp_oracle as oracle
import numpy as np
import pytest
import seeds
import torch
from torch.distributions import MultivariateNormal

import toyvae
from toyvae import reference
from toyvae.tolerances import magnitude

F64 = torch.float64
EPS = torch.finfo(F64).eps
LOG_2PI = math.log(2 * math.pi)
D, K = 3, 2


# -- magnitude --------------------------------------------------------------------------------


def parameters(noise_kind):
    """A model with a correlated prior off the origin (m₀ ≠ 0, L₀ not diagonal), so that the
    prior's coordinates u = L₀⁻¹(z − m₀) differ from z, and Ψ of the given kind."""
    gen = seeds.generator(31)
    weight = torch.randn(D, K, generator=gen, dtype=F64)
    bias = torch.randn(D, generator=gen, dtype=F64)
    noise = {
        "isotropic": torch.tensor(0.7, dtype=F64),
        "diagonal": torch.tensor([0.5, 1.3, 2.0], dtype=F64),
        "full": torch.tensor([[1.0, 0.3, 0.1], [0.3, 0.8, -0.2], [0.1, -0.2, 1.5]], dtype=F64),
    }[noise_kind]
    prior_mean = torch.tensor([1.5, -2.0], dtype=F64)
    prior_tril = torch.tensor([[1.2, 0.0], [0.7, 0.4]], dtype=F64)
    return weight, bias, noise, prior_mean, prior_tril


def dense_noise(noise):
    if noise.ndim == 0:
        return noise * torch.eye(D, dtype=F64)
    if noise.ndim == 1:
        return torch.diag(noise)
    return noise


def dense_magnitude(weight, bias, noise, prior_mean, prior_tril, x, q=None, z=None):
    """M by the documented sum, densely in z: D log 2π, Σ|log eig Ψ|, log det(I + G) (by the
    determinant lemma, log det(WΣ₀Wᵀ + Ψ) − log det Ψ), twice the whitened distance of x from
    the prior's mean, K, |log det Σ₀|; with q its two quadratics, tr(Σ₀⁻¹Σ_q), the terms
    |Gᵢⱼ||Cᵢⱼ| of tr(G C) in the prior's coordinates and |log det Σ_q − log det Σ₀|; with z,
    ‖u‖², the misfit of log p(x, z), the bound 2(‖u‖² + uᵀGu + distance) of log p(z|x) and
    2K log 2π."""
    psi = dense_noise(noise)
    psi_inv = torch.linalg.inv(psi)
    sigma0 = prior_tril @ prior_tril.T
    sigma0_inv = torch.linalg.inv(sigma0)
    l0_inv = torch.linalg.inv(prior_tril)

    def quadratic(v, matrix):
        return torch.einsum("...i,ij,...j->...", v, matrix, v)

    whitened = weight.T @ psi_inv @ weight  # G in z; in u it is L₀ᵀ (this) L₀
    distance = quadratic(x - bias - weight @ prior_mean, psi_inv)
    total = (
        D * LOG_2PI
        + torch.linalg.eigvalsh(psi).log().abs().sum()
        + torch.linalg.slogdet(weight @ sigma0 @ weight.T + psi)[1]
        - torch.linalg.slogdet(psi)[1]
        + 2 * distance
        + K
        + torch.linalg.slogdet(sigma0)[1].abs()
    )
    if q is not None:
        sigma_q = q.covariance_matrix
        offset = q.loc - prior_mean
        gram_u = prior_tril.T @ whitened @ prior_tril
        cov_u = l0_inv @ sigma_q @ l0_inv.T
        total = (
            total
            + 2 * quadratic(offset, whitened)
            + quadratic(offset, sigma0_inv)
            + (sigma0_inv * sigma_q).sum((-2, -1))  # tr(Σ₀⁻¹Σ_q), both symmetric
            + (gram_u.abs() * cov_u.abs()).sum((-2, -1))
            + (torch.linalg.slogdet(sigma_q)[1] - torch.linalg.slogdet(sigma0)[1]).abs()
        )
    if z is not None:
        centred = z - prior_mean
        squared = quadratic(centred, sigma0_inv)
        total = (
            total
            + squared
            + quadratic(x - bias - z @ weight.T, psi_inv)
            + 2 * (squared + quadratic(centred, whitened) + distance)
            + 2 * K * LOG_2PI
        )
    return total


def some_q(batch):
    gen = seeds.generator(32)
    loc = 2 * torch.randn(*batch, K, generator=gen, dtype=F64)
    tril = 0.4 * torch.randn(*batch, K, K, generator=gen, dtype=F64).tril(-1)
    diagonal = torch.rand(*batch, K, generator=gen, dtype=F64) + 0.3
    return MultivariateNormal(loc, scale_tril=tril + torch.diag_embed(diagonal))


@pytest.mark.parametrize("batch", [(), (4,)], ids=["single", "batch"])
@pytest.mark.parametrize("given", ["x", "q", "z", "q and z"])
@pytest.mark.parametrize("noise_kind", ["isotropic", "diagonal", "full"])
def test_magnitude_is_the_documented_sum_of_term_sizes(noise_kind, given, batch):
    """magnitude(x), with q, with z and with both equals the documented sum of the terms'
    absolute values, computed densely in z, for each kind of Ψ and a prior off the origin."""
    weight, bias, noise, prior_mean, prior_tril = parameters(noise_kind)
    model = toyvae.LinearGaussian(
        weight, bias, noise, prior=MultivariateNormal(prior_mean, scale_tril=prior_tril)
    )
    gen = seeds.generator(33)
    x = 3 * torch.randn(*batch, D, generator=gen, dtype=F64)
    q = some_q(batch) if "q" in given else None
    z = torch.randn(*batch, K, generator=gen, dtype=F64) if "z" in given else None
    got = model.magnitude(x, q, z=z)
    want = dense_magnitude(weight, bias, noise, prior_mean, prior_tril, x, q, z)
    assert got.shape == batch
    # A sum of non-negative terms, each computed in float64 by stable routes from matrices of
    # condition ≲ 1e2 (Ψ, Σ₀, WΣ₀Wᵀ + Ψ): relative agreement to 1e4·eps.
    torch.testing.assert_close(got, want, rtol=1e4 * EPS, atol=0)


# -- kl_to_prior with a model -----------------------------------------------------------------


def prior_model(dtype):
    prior = MultivariateNormal(
        torch.tensor([1.0, -0.5], dtype=dtype),
        scale_tril=torch.tensor([[0.8, 0.0], [0.3, 1.5]], dtype=dtype),
    )
    return toyvae.LinearGaussian(torch.ones(D, K, dtype=dtype), prior=prior)


@pytest.mark.parametrize(
    ("model_dtype", "q_dtype"),
    [(F64, torch.float32), (torch.float32, F64)],
    ids=["float32 q, float64 model", "float64 q, float32 model"],
)
def test_kl_to_prior_casts_q_to_the_models_dtype(model_dtype, q_dtype):
    """kl_to_prior(q, model) with q in another dtype computes in the model's dtype, and equals
    the textbook KL to the model's prior."""
    model = prior_model(model_dtype)
    loc = [0.2, 0.9]
    tril = [[0.5, 0.0], [-0.2, 0.7]]
    q = MultivariateNormal(
        torch.tensor(loc, dtype=q_dtype), scale_tril=torch.tensor(tril, dtype=q_dtype)
    )
    kl = toyvae.kl_to_prior(q, model)
    assert kl.dtype == model_dtype
    # q's numbers are exact in float32 (cast first, as the model does), so the reference sees
    # the same q. Cov. condition ≲ 10: the model's dtype rounds KL ≈ O(1) to a few hundred eps
    # of that dtype at most; 1e3·eps of it.
    loc_q, tril_q = q.loc.double().numpy(), q.scale_tril.double().numpy()
    prior = model.prior()
    tril_p = prior.scale_tril.double().numpy()
    expected = reference.gaussian_kl(
        loc_q, tril_q @ tril_q.T, prior.loc.double().numpy(), tril_p @ tril_p.T
    )
    assert abs(kl.item() - expected) <= 1e3 * torch.finfo(model_dtype).eps * max(1, expected)


@pytest.mark.parametrize(
    ("q", "error", "pattern"),
    [
        ("not a distribution", TypeError, r"^q must be a torch\.distributions\."),
        (
            MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)),
            ValueError,
            r"^q must have event shape \(2,\) to match the model's latent dimension",
        ),
        (
            MultivariateNormal(
                torch.tensor([0.0, math.nan], dtype=F64),
                torch.eye(2, dtype=F64),
                validate_args=False,
            ),
            ValueError,
            r"^q's mean must be finite",
        ),
    ],
    ids=["not a Gaussian", "wrong event size", "nan mean"],
)
def test_kl_to_prior_with_a_model_names_q_in_its_errors(q, error, pattern):
    """kl_to_prior(q, model) rejects a non-Gaussian q, one of the wrong event size (against the
    model's K) or a non-finite one with an error naming q."""
    with pytest.raises(error, match=pattern):
        toyvae.kl_to_prior(q, prior_model(F64))


@pytest.mark.parametrize(
    ("loc", "scale_tril", "what"),
    [
        ([1e39, 0.0], [[1.0, 0.0], [0.0, 1.0]], "mean"),
        ([0.0, 0.0], [[1.0, 0.0], [1e39, 1.0]], "scale"),
    ],
    ids=["mean", "scale"],
)
def test_kl_to_prior_rejects_a_q_that_overflows_in_the_models_dtype(loc, scale_tril, what):
    """A float64 q with an entry 1e39 (finite, but beyond float32's range) is a ValueError
    naming q's mean or scale in the float32 model's dtype, not an infinite KL."""
    q = MultivariateNormal(
        torch.tensor(loc, dtype=F64), scale_tril=torch.tensor(scale_tril, dtype=F64)
    )
    pattern = rf"^q's {what} in the model's dtype torch\.float32 .*must be finite"
    with pytest.raises(ValueError, match=pattern):
        toyvae.kl_to_prior(q, prior_model(torch.float32))


# -- reading q: errors name q and what it got ---------------------------------------------------


def test_magnitude_rejects_a_non_gaussian_q_naming_q_and_what_it_got():
    """toyvae.tolerances.magnitude(model, x, q) with q not a Gaussian is a TypeError that names
    q and quotes the object given."""
    model = prior_model(F64)
    with pytest.raises(
        TypeError, match=r"^q must be a torch\.distributions\..*got 'oops' of type str$"
    ):
        magnitude(model, torch.zeros(D, dtype=F64), "oops")


def _scalar_mean_q():
    """A MultivariateNormal whose mean a caller replaced by a 0-d tensor."""
    q = MultivariateNormal(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    q.loc = torch.tensor(0.0, dtype=F64)
    return q


@pytest.mark.parametrize(
    ("make_q", "pattern"),
    [
        (_scalar_mean_q, r"^q must have an event shape \(K,\), got a scalar distribution$"),
        (
            lambda: MultivariateNormal(
                torch.zeros(4, 3, dtype=F64), torch.eye(3, dtype=F64).expand(4, 3, 3)
            ),
            r"^q must have event shape \(2,\) to match .*, got event shape \(3,\)$",
        ),
        (
            lambda: MultivariateNormal(
                torch.zeros(2, dtype=F64),
                scale_tril=torch.tensor([[1.0, 0.0], [math.inf, 1.0]], dtype=F64),
                validate_args=False,
            ),
            r"^q's scale must be finite",
        ),
    ],
    ids=["scalar mean", "batched, wrong event size", "infinite scale"],
)
def test_kl_to_prior_reports_a_malformed_q_by_name(make_q, pattern):
    """A q with a 0-d mean, a batch of the wrong event size (the message quotes the event shape,
    not the batch) or an infinite scale entry is a ValueError naming q."""
    with pytest.raises(ValueError, match=pattern):
        toyvae.kl_to_prior(make_q(), prior_model(F64))


# -- log p(x) when D = K ----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_float32_log_evidence_with_as_many_latents_as_data_and_tiny_noise(dim):
    """With D = K and Ψ = 1e-12·I, a float32 model's log p(x) keeps float32 accuracy (against
    the 60-digit oracle for the same float32 numbers): D ≤ K takes the route that forms no
    log det Ψ + log det Λ and no whitened quadratic form, which here would cancel ≈ 1e12."""
    rng = seeds.rng(34)
    weight = np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # orthogonal: C ≈ I, condition 1
    bias = rng.standard_normal(dim)
    x = bias + weight @ rng.standard_normal(dim) + 1e-6 * rng.standard_normal(dim)
    weight32, bias32, x32 = (torch.tensor(v, dtype=torch.float32) for v in (weight, bias, x))
    noise32 = torch.tensor(1e-12, dtype=torch.float32)
    got = toyvae.LinearGaussian(weight32, bias32, noise32).log_evidence(x32).item()
    exact = float(
        oracle.Model(
            weight32.double().numpy(), bias32.double().numpy(), noise32.double().numpy()
        ).log_evidence(x32.double().numpy())
    )
    # C = WWᵀ + Ψ ≈ I is perfectly conditioned and the route is backward stable, so the error is
    # a few·(D + K)·eps32 relative at most (measured ≤ 1 eps32); 100·eps32 allows that. The
    # whitened route (‖Ã‖ ≈ 1e6) is off by ≈ 1e-3 relative.
    assert abs(got - exact) <= 100 * torch.finfo(torch.float32).eps * abs(exact), (got, exact)


# -- construction -----------------------------------------------------------------------------


def test_noise_variance_defaults_to_one():
    """LinearGaussian(W) (noise_variance left at its default 1.0) is the model with Ψ = I: the
    same log p(x) as the textbook density N(x; 0, WWᵀ + I)."""
    gen = seeds.generator(35)
    weight = torch.randn(D, K, generator=gen, dtype=F64)
    x = torch.randn(D, generator=gen, dtype=F64)
    got = toyvae.LinearGaussian(weight).log_evidence(x)
    marginal = MultivariateNormal(
        torch.zeros(D, dtype=F64), weight @ weight.T + torch.eye(D, dtype=F64)
    )
    # Both are backward stable on a covariance of condition ≲ 10 and |log p(x)| ≈ 5:
    # 1e3·eps absolute is ample, and Ψ = 2I would move log p(x) by O(1).
    assert abs(got.item() - marginal.log_prob(x).item()) <= 1e3 * EPS


def test_a_non_numeric_noise_variance_is_a_type_error_naming_it():
    """LinearGaussian(W, b, "oops") is a TypeError whose message starts with noise_variance."""
    with pytest.raises(TypeError, match=r"^noise_variance must be a torch tensor"):
        toyvae.LinearGaussian(torch.ones(D, K, dtype=F64), None, "oops")


@pytest.mark.parametrize(
    "name", ["weight", "bias", "noise_variance", "prior.loc", "prior.scale_tril"]
)
def test_a_parameter_modified_in_place_is_named_in_the_error(name):
    """Editing any parameter tensor in place after construction makes the next call raise a
    RuntimeError whose message starts with that parameter's name."""
    tensors = {
        "weight": torch.ones(D, K, dtype=F64),
        "bias": torch.zeros(D, dtype=F64),
        "noise_variance": torch.tensor(0.5, dtype=F64),
        "prior.loc": torch.zeros(K, dtype=F64),
        "prior.scale_tril": torch.eye(K, dtype=F64),
    }
    prior = MultivariateNormal(tensors["prior.loc"], scale_tril=tensors["prior.scale_tril"])
    model = toyvae.LinearGaussian(
        tensors["weight"], tensors["bias"], tensors["noise_variance"], prior=prior
    )
    with torch.no_grad():
        tensors[name].mul_(2.0)
    with pytest.raises(RuntimeError, match=rf"^{re.escape(name)} was modified in place"):
        model.log_evidence(torch.zeros(D, dtype=F64))


@pytest.mark.parametrize(
    "variance", [torch.eye(2, dtype=F64), torch.ones(D, 2, dtype=F64)], ids=["2x2", "3x2"]
)
def test_a_noise_matrix_of_the_wrong_shape_is_a_value_error_naming_it(variance):
    """A 2-D noise_variance that is not D × D (here D = 3) is a ValueError naming
    noise_variance and the three accepted shapes, not a model with a mis-sized Ψ."""
    pattern = (
        r"^noise_variance must be a scalar, a \(3,\) vector of variances or a \(3, 3\) "
        r"covariance matrix, got an array of shape"
    )
    with pytest.raises(ValueError, match=pattern):
        toyvae.LinearGaussian(torch.ones(D, K, dtype=F64), None, variance)
