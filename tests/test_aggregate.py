"""Aggregate posterior, ELBO surgery and the joint KL, against dense textbook formulas."""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import seeds
import torch
from hypothesis import given
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.aggregate import (
    LinearGaussianEncoder,
    _stratified,
    aggregate_kl_to_prior,
    aggregate_posterior,
    elbo_surgery,
    empirical_aggregate_log_density,
    empirical_elbo_surgery,
    expected_elbo,
    joint_kl,
)
from toyvae.strategies import linear_gaussian_models
from toyvae.tolerances import EPS

F64 = torch.float64
# Two-sided normal tail P(|Z| > 5) = 5.7e-7 ≤ 1e-6: the false-alarm probability per assertion.
Z = 5.0


def random_case(seed, d=4, k=2):
    """A diagonal-noise model, an arbitrary encoder (full L_S) and a Gaussian data distribution."""
    gen = seeds.generator(seed)
    o = {"dtype": F64, "generator": gen}
    model = toyvae.LinearGaussian(
        torch.randn(d, k, **o), torch.randn(d, **o), torch.rand(d, **o) + 0.3
    )
    lower = torch.randn(k, k, **o).tril(-1) + torch.diag(torch.rand(k, **o) + 0.5)
    encoder = LinearGaussianEncoder(torch.randn(k, d, **o), torch.randn(k, **o), lower)
    a = torch.randn(d, d, **o)
    data = MultivariateNormal(torch.randn(d, **o), a @ a.T + torch.eye(d, dtype=F64))
    return model, encoder, data


def dense_kl(m0, c0, m1, c1):
    """KL(N(m0, c0) ‖ N(m1, c1)) by the textbook formula with NumPy inverses and slogdet."""
    m0, c0, m1, c1 = (np.asarray(t, dtype=np.float64) for t in (m0, c0, m1, c1))
    inv = np.linalg.inv(c1)
    diff = m1 - m0
    return 0.5 * (
        np.trace(inv @ c0)
        + diff @ inv @ diff
        - len(m0)
        + np.linalg.slogdet(c1)[1]
        - np.linalg.slogdet(c0)[1]
    )


def kl_tolerance(*covariances):
    """Rounding allowance for a dense-vs-Cholesky KL in dimension n: n·eps·κ·(sum of |terms|).

    Each KL term (trace, Mahalanobis, log-determinants) is an n-term sum computed through a
    factorisation whose relative error is at most n·eps·κ (Higham, Thm 10.3); the terms are
    bounded by n·κ, so 8·n²·eps·κ² covers both sides of the comparison.
    """
    n = covariances[0].shape[-1]
    kappa = max(float(np.linalg.cond(np.asarray(c))) for c in covariances)
    return 8 * n * n * EPS * kappa * kappa


# -- the encoder and its data ----------------------------------------------------------------------


def test_bad_data_and_mismatched_dimensions_are_named():
    """Batched data, a (D,)-less data set, a wrong-sized encoder and num_samples < 2 are named."""
    model, encoder, data = random_case(0)
    batched = MultivariateNormal(data.loc.expand(2, 4), data.covariance_matrix)
    with pytest.raises(ValueError, match=r"data must be one Gaussian.*\(2,\)"):
        aggregate_posterior(encoder, batched)
    with pytest.raises(ValueError, match=r"data must have event shape \(4,\)"):
        aggregate_posterior(encoder, MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3)))
    with pytest.raises(ValueError, match=r"x must be an \(N, D\) data set"):
        empirical_elbo_surgery(encoder, torch.zeros(4, dtype=F64), 10)
    with pytest.raises(ValueError, match=r"num_samples must be an integer ≥ 2 .*got 1"):
        empirical_elbo_surgery(encoder, torch.zeros(3, 4, dtype=F64), 1)
    small = LinearGaussianEncoder(torch.ones(1, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"D = 4 to its K = 2.*D = 4, K = 1"):
        joint_kl(model, small, data)
    with pytest.raises(TypeError, match=r"encoder must be a toyvae\.LinearGaussianEncoder"):
        aggregate_posterior(model, data)


def test_float32_encoder_and_data_give_float32_results():
    """A float32 encoder computes in float32, whatever the data distribution's dtype."""
    _, encoder, data = random_case(1)
    enc32 = LinearGaussianEncoder(
        encoder.weight.float(), encoder.bias.float(), encoder.scale_tril.float()
    )
    assert aggregate_posterior(enc32, data).loc.dtype == torch.float32
    assert elbo_surgery(enc32, data).average_kl.dtype == torch.float32


# -- the aggregate posterior of Gaussian data ----------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_aggregate_posterior_has_the_textbook_moments(seed):
    """q(z) = N(Vm + c, VCVᵀ + S) for q(x) = N(m, C): the law of total mean and variance."""
    _, encoder, data = random_case(seed)
    agg = aggregate_posterior(encoder, data)
    v, c, s = encoder.weight, encoder.bias, encoder.scale_tril @ encoder.scale_tril.mT
    cov = data.covariance_matrix
    expected_cov = v @ cov @ v.mT + s
    # Products of (D + K)-term sums: error ≤ (D + K)·eps times the sum of absolute values
    # |V||C||V|ᵀ + |S| (plus the Cholesky round trip, another K·eps of it).
    scale = v.abs() @ cov.abs() @ v.abs().mT + s.abs()
    assert (agg.covariance_matrix - expected_cov).abs().max() <= 16 * 6 * EPS * scale.max()
    mean_scale = v.abs() @ data.loc.abs() + c.abs()
    assert ((agg.loc - (v @ data.loc + c)).abs() <= 8 * 6 * EPS * mean_scale).all()


@given(linear_gaussian_models(max_data_dim=5))
def test_aggregate_posterior_is_the_prior_when_data_come_from_the_model(model):
    """Data q(x) = p_θ(x) and the exact-posterior encoder give q(z) = N(0, I) exactly."""
    marginal = model.marginal()
    data = MultivariateNormal(marginal.loc, marginal.covariance_matrix)
    encoder = LinearGaussianEncoder.exact_posterior(model)
    agg = aggregate_posterior(encoder, data)
    eye = torch.eye(model.latent_dim, dtype=F64)
    # V C Vᵀ + Σ = Σ G Σ + Σ G + ... = I is the sum of terms as large as |V||C||V|ᵀ; V carries
    # a relative error ≤ (D + K)·eps·κ(Λ) and C one ≤ D·eps·κ(C) from its Cholesky factor.
    v = encoder.weight
    scale = (v.abs() @ data.covariance_matrix.abs() @ v.abs().mT).max().item() + 1
    kappa = (
        torch.linalg.cond(data.covariance_matrix).item()
        + torch.linalg.cond(torch.linalg.inv(encoder.scale_tril @ encoder.scale_tril.mT)).item()
    )
    tol = 8 * (model.data_dim + model.latent_dim) * EPS * kappa * scale
    assert (agg.covariance_matrix - eye).abs().max() <= tol
    mean_scale = (v.abs() @ model.bias.abs()).max().item() + 1
    assert agg.loc.abs().max() <= tol * mean_scale
    # KL(N(μ, I + E) ‖ N(0, I)) = ¼‖E‖_F² + ½‖μ‖² + O(‖E‖³) is second order in the errors,
    # but the KL is itself a sum of terms of size about K (trace, −K, log-determinant), which
    # rounding leaves 4K·eps away from their exact sum.
    kl = aggregate_kl_to_prior(encoder, data).item()
    k = model.latent_dim
    assert abs(kl) <= k * (tol * mean_scale) ** 2 + 4 * k * k * EPS


@pytest.mark.parametrize(("data_mean", "data_variance"), [(0.0, 0.5), (0.0, 6.0), (1.5, 2.75)])
def test_misspecified_aggregate_differs_from_the_prior_by_the_exact_amount(
    data_mean, data_variance
):
    """One dimension: q(z) = N(wm/(w²+σ²), 1 + w²(s² − w² − σ²)/(w²+σ²)²), KL by hand."""
    w, sigma2 = 1.5, 0.5  # the model's marginal is N(0, w² + σ²) = N(0, 2.75)
    model = toyvae.LinearGaussian(torch.tensor([[w]], dtype=F64), noise_variance=sigma2)
    encoder = LinearGaussianEncoder.exact_posterior(model)
    data = MultivariateNormal(
        torch.tensor([data_mean], dtype=F64), torch.tensor([[data_variance]], dtype=F64)
    )
    total = w * w + sigma2
    mean = w * data_mean / total
    variance = 1 + w * w * (data_variance - total) / total**2
    kl = 0.5 * (variance - 1 - math.log(variance) + mean * mean)
    agg = aggregate_posterior(encoder, data)
    # One-dimensional quantities of size ≤ 10 built from a handful of operations: 64·eps each.
    assert abs(agg.loc.item() - mean) <= 64 * EPS
    assert abs(agg.variance.item() - variance) <= 64 * EPS * 10
    assert abs(aggregate_kl_to_prior(encoder, data).item() - kl) <= 64 * EPS * 10
    matched = data_mean == 0.0 and data_variance == total
    assert matched or kl > 1e-3  # every parametrised case is misspecified


# -- ELBO surgery ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_elbo_surgery_terms_match_dense_formulas_and_add_up(seed):
    """E KL(q(z|x) ‖ p) = I(x; z) + KL(q(z) ‖ p), each term against a dense formula."""
    _, encoder, data = random_case(seed)
    surgery = elbo_surgery(encoder, data)
    v, c = encoder.weight.numpy(), encoder.bias.numpy()
    s = (encoder.scale_tril @ encoder.scale_tril.mT).numpy()
    m, cov = data.loc.numpy(), data.covariance_matrix.numpy()
    k = v.shape[0]
    # E_x KL(N(Vx + c, S) ‖ N(0, I)) = ½[tr S + ‖Vm + c‖² + tr(VCVᵀ) − K − log det S].
    mean = v @ m + c
    average = 0.5 * (
        np.trace(s) + mean @ mean + np.trace(v @ cov @ v.T) - k - np.linalg.slogdet(s)[1]
    )
    # I(x; z) of the joint Gaussian: ½ log det C_x det C_z / det C_joint.
    cz = v @ cov @ v.T + s
    joint = np.block([[cov, cov @ v.T], [v @ cov, cz]])
    information = 0.5 * (
        np.linalg.slogdet(cov)[1] + np.linalg.slogdet(cz)[1] - np.linalg.slogdet(joint)[1]
    )
    marginal = dense_kl(mean, cz, np.zeros(k), np.eye(k))
    tol = kl_tolerance(joint, s) * (1 + abs(average))
    assert abs(surgery.average_kl.item() - average) <= tol
    assert abs(surgery.mutual_information.item() - information) <= tol
    assert abs(surgery.marginal_kl.item() - marginal) <= tol
    total = surgery.mutual_information + surgery.marginal_kl
    assert abs((total - surgery.average_kl).item()) <= tol


# -- the joint view ------------------------------------------------------------------------------


def joint_gaussians(model, encoder, data):
    """The (D + K)-dimensional inference and generative joints over (x, z), written out densely."""
    w, b = model.weight, model.bias
    psi = torch.diag(model.noise_variance.expand(model.data_dim))
    v, c = encoder.weight, encoder.bias
    s = encoder.scale_tril @ encoder.scale_tril.mT
    m, cov = data.loc, data.covariance_matrix
    q_mean = torch.cat([m, v @ m + c])
    q_cov = torch.cat(
        [torch.cat([cov, cov @ v.mT], 1), torch.cat([v @ cov, v @ cov @ v.mT + s], 1)]
    )
    eye = torch.eye(model.latent_dim, dtype=F64)
    p_mean = torch.cat([b, torch.zeros_like(eye[0])])
    p_cov = torch.cat([torch.cat([w @ w.mT + psi, w], 1), torch.cat([w.mT, eye], 1)])
    return q_mean, q_cov, p_mean, p_cov


@pytest.mark.parametrize("seed", range(4))
def test_joint_kl_is_the_kl_between_the_two_joint_gaussians(seed):
    """KL(q(x)q(z|x) ‖ p(z)p(x|z)) = −E ELBO − H[q(x)] equals the dense (D+K)-dim Gaussian KL."""
    model, encoder, data = random_case(seed)
    q_mean, q_cov, p_mean, p_cov = joint_gaussians(model, encoder, data)
    expected = dense_kl(q_mean, q_cov, p_mean, p_cov)
    assert abs(joint_kl(model, encoder, data).item() - expected) <= kl_tolerance(q_cov, p_cov) * (
        1 + abs(expected)
    )


@pytest.mark.parametrize("seed", range(3))
def test_expected_elbo_is_the_average_over_sigma_points(seed):
    """E_{N(m,C)} ELBO(x) equals the mean ELBO over the 2D points m ± √D L_C e_i.

    The ELBO is a quadratic in x, and those points have exactly the mean m and covariance C.
    """
    model, encoder, data = random_case(seed)
    d = model.data_dim
    offsets = math.sqrt(d) * data.scale_tril.mT  # rows √D L_C e_i
    points = torch.cat([data.loc + offsets, data.loc - offsets])
    average = toyvae.elbo(model, points, encoder(points)).mean()
    value = expected_elbo(model, encoder, data)
    # Both are sums of the same (D + K) groups of terms (tolerances.identity_tolerance), but
    # the point average adds the terms of 2D ELBOs whose magnitude is at most that of the
    # largest point's: bound by 8·(D + K)·eps·D·max|ELBO| · κ(C).
    kappa = torch.linalg.cond(data.covariance_matrix).item()
    tol = (
        8
        * (d + model.latent_dim)
        * EPS
        * d
        * kappa
        * toyvae.elbo(model, points, encoder(points)).abs().max().item()
    )
    assert abs((value - average).item()) <= tol


@given(linear_gaussian_models(max_data_dim=5))
def test_joint_kl_vanishes_when_model_matches_and_encoder_is_exact(model):
    """Data from the model and the exact-posterior encoder: the joint KL is zero to rounding."""
    marginal = model.marginal()
    data = MultivariateNormal(marginal.loc, marginal.covariance_matrix)
    encoder = LinearGaussianEncoder.exact_posterior(model)
    value = joint_kl(model, encoder, data).item()
    # −E ELBO and H[q(x)] are each a sum of (D + K) groups of terms, the largest being
    # D log 2π, log det Ψ and log det C; cancellation leaves (D + K)·eps·κ(C) of their size.
    d, k = model.data_dim, model.latent_dim
    size = d * (1 + math.log(2 * math.pi)) + torch.logdet(data.covariance_matrix).abs().item()
    kappa = torch.linalg.cond(data.covariance_matrix).item()
    assert abs(value) <= 16 * (d + k) * EPS * kappa * (size + d + k)


def test_joint_kl_is_positive_when_either_part_is_off():
    """Misspecified data, or a non-exact encoder, make the joint KL exactly the chain-rule sum."""
    model, encoder, data = random_case(2)
    exact = LinearGaussianEncoder.exact_posterior(model)
    marginal = model.marginal()
    matched = MultivariateNormal(marginal.loc, marginal.covariance_matrix)
    for enc, dat in [(exact, data), (encoder, matched), (encoder, data)]:
        # Chain rule: KL(q(x) ‖ p(x)) + E_x KL(q(z|x) ‖ p(z|x)), each dense; the second is
        # KL(q(z|m) ‖ p(z|m)) + ½ tr(Λ (V − V*) C (V − V*)ᵀ).
        marginal_kl = dense_kl(
            dat.loc, dat.covariance_matrix, marginal.loc, matched.covariance_matrix
        )
        posterior = model.posterior(dat.loc)
        at_mean = dense_kl(
            enc(dat.loc).loc,
            enc(dat.loc).covariance_matrix,
            posterior.loc,
            posterior.covariance_matrix,
        )
        diff = (enc.weight - exact.weight).numpy()
        precision = np.linalg.inv(posterior.covariance_matrix.numpy())
        spread = 0.5 * np.trace(precision @ diff @ dat.covariance_matrix.numpy() @ diff.T)
        expected = marginal_kl + at_mean + spread
        value = joint_kl(model, enc, dat).item()
        _, q_cov, _, p_cov = joint_gaussians(model, enc, dat)
        assert abs(value - expected) <= kl_tolerance(q_cov, p_cov) * (1 + expected)
        assert value > 1e-2  # each case is off by a finite amount


# -- an empirical data set: a Gaussian mixture --------------------------------------------------


def test_empirical_aggregate_density_is_the_mixture_density():
    """log q(z) for a data set is log (1/N) Σ_n N(z; Vx_n + c, S), checked against SciPy."""
    _, encoder, _ = random_case(3)
    x = torch.randn(6, 4, dtype=F64, generator=seeds.generator(5))
    z = torch.randn(7, 2, dtype=F64, generator=seeds.generator(6))
    cov = (encoder.scale_tril @ encoder.scale_tril.mT).numpy()
    means = (x @ encoder.weight.mT + encoder.bias).numpy()
    dense = np.log(
        np.mean([scipy.stats.multivariate_normal(mu, cov).pdf(z.numpy()) for mu in means], 0)
    )
    value = empirical_aggregate_log_density(encoder, x, z).numpy()
    # A log-mean-exp of N Gaussian log densities, each a K-term quadratic of size ≤ max|log|.
    tol = 16 * (6 + 2) * EPS * np.linalg.cond(cov) * (1 + np.abs(dense).max())
    assert np.abs(value - dense).max() <= tol


def one_dimensional_mixture():
    """K = 1: an encoder, N = 5 data points, and the mixture's component means and scale."""
    # Pinned, not moved by TOYVAE_SEED_OFFSET: the quadrature's 1e-12 convergence (checked in
    # the test below) is a property of these five means; other draws can spread them so far
    # that 120 nodes agree with 160 only to 1e-10. The Monte Carlo draws do move.
    gen = torch.Generator().manual_seed(11)
    x = 2 * torch.randn(5, 3, dtype=F64, generator=gen)
    encoder = LinearGaussianEncoder(
        torch.tensor([[0.6, -0.3, 0.2]], dtype=F64), torch.tensor([0.4], dtype=F64), [[0.7]]
    )
    means = (x @ encoder.weight.mT + encoder.bias).squeeze(-1).numpy()
    return encoder, x, means, 0.7


def gauss_hermite_moments(function, mean, scale, nodes):
    """Mean and variance of f(z) under N(mean, scale²) by Gauss–Hermite quadrature."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    weights = weights / math.sqrt(2 * math.pi)  # ∫ e^{−t²/2} dt = √(2π)
    values = function(mean + scale * points)
    first = weights @ values
    return first, weights @ (values - first) ** 2


def test_stratified_standard_error_uses_the_unbiased_per_stratum_variance():
    """Hand-worked: strata {0, 1, 2} and {1, 3, 5} give mean 2 and s.e.² = (1 + 4)/(2²·3)."""
    terms = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]], dtype=F64)  # (M, N) = (3, 2)
    estimate = _stratified(terms)
    # Sample variances with the M − 1 divisor: s₁² = 2/2 = 1, s₂² = 8/2 = 4; Var of the
    # stratified mean Σ s_n² / (N² M) = 5/12. A handful of roundings on numbers ≤ 12: 16 ulps.
    assert abs(estimate.value.item() - 2.0) <= 16 * EPS * 2.0
    assert abs(estimate.standard_error.item() ** 2 - 5 / 12) <= 16 * EPS * 5 / 12


@pytest.mark.false_alarm(1.2e-6)  # two 5-s.e. normal deviations: 2 × 5.7e-7
def test_empirical_surgery_estimates_match_quadrature_within_exact_standard_errors():
    """K = 1: the Monte Carlo I(x; z) and KL(q(z) ‖ p) are within 5 exact standard errors."""
    encoder, x, means, scale = one_dimensional_mixture()
    n, per_point = len(means), 4096

    def log_mixture(z):
        components = scipy.stats.norm.logpdf(z[..., None], means, scale)
        return scipy.special.logsumexp(components, -1) - math.log(n)

    def moments(nodes):
        kl = [
            gauss_hermite_moments(
                lambda z: log_mixture(z) - scipy.stats.norm.logpdf(z), mean, scale, nodes
            )
            for mean in means
        ]
        information = [
            gauss_hermite_moments(
                lambda z, mean=mean: scipy.stats.norm.logpdf(z, mean, scale) - log_mixture(z),
                mean,
                scale,
                nodes,
            )
            for mean in means
        ]
        return np.array(kl), np.array(information)

    kl_terms, information_terms = moments(120)
    # The integrands are analytic, so Gauss–Hermite converges geometrically: 120 and 160
    # nodes agreeing to 1e-12 bounds the quadrature error far below the Monte Carlo error.
    assert np.abs(np.stack(moments(160)) - np.stack([kl_terms, information_terms])).max() <= 1e-12
    surgery = empirical_elbo_surgery(encoder, x, per_point, generator=seeds.generator(0))
    for estimate, terms in [
        (surgery.marginal_kl, kl_terms),
        (surgery.mutual_information, information_terms),
    ]:
        exact = terms[:, 0].mean()
        # Stratified mean of n·M independent draws: variance Σ_n Var_n / (n² M), exactly.
        standard_error = math.sqrt(terms[:, 1].sum() / (n * n * per_point))
        # Normal approximation to a mean of 4096 draws per stratum of a function with Gaussian
        # tails: P(|error| > 5 s.e.) ≈ 5.7e-7.
        assert abs(estimate.value.item() - exact) <= Z * standard_error
        # The reported standard error estimates this one: its relative error is about
        # √(kurtosis / 2nM) ≈ 1 %, so a factor 2 is never reached by chance.
        assert 0.5 * standard_error <= estimate.standard_error.item() <= 2 * standard_error
    # The exact terms obey the surgery identity and 0 ≤ I ≤ log N.
    information, marginal = information_terms[:, 0].mean(), kl_terms[:, 0].mean()
    # Quadrature error ≤ 1e-12 per term (above), and the closed form's rounding is far below.
    assert abs(information + marginal - surgery.average_kl.item()) <= 2 * n * 1e-12
    assert 0 <= information <= math.log(n)
