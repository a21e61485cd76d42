"""The central identity log p(x) = ELBO(q) + KL(q ‖ p(z|x)), its bound, and its tightness."""

import itertools
import math

import mp_oracle as oracle
import pytest
import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import MultivariateNormal

import toyvae
from toyvae.strategies import gaussians, linear_gaussian_models, observations
from toyvae.tolerances import EPS, identity_tolerance


@st.composite
def model_data_q(draw, batch_shape=(3,)):
    model = draw(linear_gaussian_models())
    x = draw(observations(model, batch_shape=batch_shape))
    q = draw(gaussians(model.latent_dim, batch_shape=draw(st.sampled_from([(), batch_shape]))))
    return model, x, q


def dense_precision(model):
    """Λ = I + Wᵀ Ψ⁻¹ W by the textbook dense formula (independent of toyvae's whitening)."""
    psi = model.noise_variance
    if model.noise_kind != "full":
        psi = torch.diag(psi.expand(model.data_dim))
    w = model.weight
    return torch.eye(model.latent_dim, dtype=w.dtype) + w.mT @ torch.linalg.solve(psi, w)


@given(model_data_q())
def test_evidence_is_elbo_plus_kl(case):
    """log p(x) = ELBO(q) + KL(q ‖ p(z|x)) for every Gaussian q, to rounding."""
    model, x, q = case
    evidence, kl = model.log_evidence(x), toyvae.kl_to_posterior(model, x, q)
    tolerance = identity_tolerance(model, x, q)
    # toyvae.elbo regroups its terms with the posterior's covariance factor (accurate near the
    # posterior); the reconstruction term minus KL(q ‖ p(z)) shares nothing with the other two.
    # Independently computed sums of the terms in M: see tolerances.identity_tolerance.
    independent = toyvae.expected_log_likelihood(model, x, q) - toyvae.kl_to_prior(q)
    for bound in (toyvae.elbo(model, x, q), independent):
        assert ((evidence - bound - kl).abs() <= tolerance).all()


@given(model_data_q())
def test_elbo_is_a_lower_bound_and_kl_separates_means(case):
    """ELBO(q) ≤ log p(x), and KL(q ‖ p(z|x)) ≥ ½‖m − μ‖², so it is zero only at q's mean = μ."""
    model, x, q = case
    tol = identity_tolerance(model, x, q)
    kl = toyvae.kl_to_posterior(model, x, q)
    assert (toyvae.elbo(model, x, q) <= model.log_evidence(x) + tol).all()
    # KL = ½[(m−μ)ᵀΛ(m−μ) + Σ(λᵢ − 1 − log λᵢ)] with λᵢ the eigenvalues of Σ_post⁻¹Σ_q; each
    # bracketed part is ≥ 0 and Λ ⪰ I, so KL ≥ ½‖m − μ‖², which vanishes only at m = μ.
    mu = model.posterior(x).mean
    assert (kl >= 0.5 * (q.mean - mu).square().sum(-1) - tol).all()


@given(model_data_q())
def test_kl_is_positive_unless_covariance_matches(case):
    """With q's mean at μ, KL(q ‖ p(z|x)) = ½ Σ (λᵢ − 1 − log λᵢ): zero only if Σ_q = Σ_post."""
    model, x, q = case
    g = toyvae.as_gaussian(q)
    mu = model.posterior(x).mean
    centred = MultivariateNormal(mu, scale_tril=g.scale_tril)
    kl = toyvae.kl_to_posterior(model, x, centred)
    # The reference is exact: the 60-digit KL of the very float64 numbers toyvae was given
    # (q's mean is μ rounded, so it adds ½ δᵀΛδ with δ ≈ eps·|μ|: far below the tolerance).
    # Float64 routes to ½ Σ (λᵢ − 1 − log λᵢ) were not accurate enough on the deep profile's
    # draws: a symmetric eigensolver gets each λᵢ to eps·λ_max, so log λ_min errs by
    # eps·κ(L_qᵀ Λ L_q) (1.1e-13 against a tolerance of 8.6e-14 at κ = 1e3, where toyvae was
    # off by 1.8e-15), and the non-symmetric eigvals of Λ Σ_q were worse.
    exact_model = oracle.Model(model.weight, model.bias, model.noise_variance)
    loc = mu.expand(*kl.shape, model.latent_dim)
    tril = g.scale_tril.expand(*kl.shape, model.latent_dim, model.latent_dim)
    tol = identity_tolerance(model, x, centred)
    for i in range(kl.shape[0]):
        exact = exact_model.kl_to_posterior(x[i], loc[i], oracle.covariance_from_tril(tril[i]))
        assert abs(oracle.to_mp(kl[i].item()) - exact) <= tol[i].item(), (i, kl[i], exact)


@given(st.data(), linear_gaussian_models())
def test_bound_is_tight_at_the_posterior(data, model):
    """At q = p(z|x): ELBO = log p(x) and KL(q ‖ p(z|x)) = 0, to rounding."""
    x = data.draw(observations(model, batch_shape=(4,)))
    posterior = model.posterior(x)
    tol = identity_tolerance(model, x, posterior)
    assert (toyvae.kl_to_posterior(model, x, posterior).abs() <= tol).all()
    assert ((toyvae.elbo(model, x, posterior) - model.log_evidence(x)).abs() <= tol).all()


@given(st.data(), linear_gaussian_models())
def test_bayes_rule_pointwise(data, model):
    """log p(x, z) − log p(z|x) = log p(x) at every z, not only on average."""
    x = data.draw(observations(model, batch_shape=(3,)))
    z = data.draw(arrays(float, (3, model.latent_dim), elements=st.floats(-10, 10)))
    z = torch.as_tensor(z)
    lhs = model.log_joint(x, z) - model.posterior(x).log_prob(z)
    # identity_tolerance with z adds the terms of log p(x, z) and log p(z|x) to M.
    tol = identity_tolerance(model, x, z=z)
    assert ((lhs - model.log_evidence(x)).abs() <= tol).all()


@given(model_data_q())
def test_elbo_is_expected_log_joint_plus_entropy(case):
    """ELBO(q) = E_q log p(x, z) + H[q], with E_q of the quadratic log p(x, ·) in closed form."""
    model, x, q = case
    g = toyvae.as_gaussian(q)
    # log p(x, z) is quadratic in z with Hessian −Λ, so E_q log p(x, z) = log p(x, m) − ½ tr(Λ S).
    expected_log_joint = model.log_joint(x, g.loc) - 0.5 * (
        dense_precision(model) * g.covariance()
    ).sum((-2, -1))
    elbo = toyvae.elbo(model, x, q)
    other_route = expected_log_joint + toyvae.entropy(q)
    assert ((elbo - other_route).abs() <= identity_tolerance(model, x, q)).all()
    terms = toyvae.expected_log_likelihood(model, x, q) - toyvae.kl_to_prior(q)
    assert ((elbo - terms).abs() <= identity_tolerance(model, x, q)).all()


def path_to_posterior(model, x, direction, shape_change, t):
    """q_t = N(μ + t·a, S (I + tE)(I + tE)ᵀ Sᵀ): the posterior at t = 0."""
    post = model.posterior(x)
    k = model.latent_dim
    eye = torch.eye(k, dtype=torch.float64)
    return MultivariateNormal(
        post.mean + t * direction, scale_tril=post.scale_tril @ (eye + t * shape_change)
    )


@given(
    linear_gaussian_models().flatmap(
        lambda m: st.tuples(
            st.just(m),
            observations(m),
            arrays(float, (m.latent_dim,), elements=st.floats(-2, 2)),
            arrays(float, (m.latent_dim, m.latent_dim), elements=st.floats(-0.4, 0.4)),
        )
    )
)
def test_gap_closes_quadratically_along_a_path(case):
    """Along q_t → p(z|x), ELBO(q_t) rises monotonically to log p(x); KL(q_t ‖ p) = c·t² + O(t³)."""
    model, x, a, e = case
    a, e = torch.as_tensor(a), torch.tril(torch.as_tensor(e))
    precision = dense_precision(model)
    diag = e.diagonal()
    # KL(t) = ½[t² aᵀΛa + ‖I + tE‖²_F − K − 2 Σ log(1 + t Eᵢᵢ)]: expanding the log gives
    # c = ½[aᵀΛa + ‖E‖²_F + Σ Eᵢᵢ²] and a remainder bounded by the tail of the log series.
    c = 0.5 * (a @ precision @ a + e.square().sum() + diag.square().sum())
    ts = [2.0**-j for j in range(0, 21, 2)]
    elbos = []
    for t in ts:
        q = path_to_posterior(model, x, a, e, t)
        kl = toyvae.kl_to_posterior(model, x, q)
        elbos.append(toyvae.elbo(model, x, q))
        tol = identity_tolerance(model, x, q)
        # |Σ log-series tail| ≤ (t³/3) Σ|Eᵢᵢ|³ / (1 − t·max|Eᵢᵢ|), and max|Eᵢᵢ| ≤ 0.4.
        remainder = t**3 / 3 * diag.abs().pow(3).sum() / (1 - t * 0.4)
        assert abs(kl - c * t**2) <= remainder + tol
    # KL(t) is convex in t with minimum 0 at t = 0, so ELBO(q_t) rises as t falls.
    tol = identity_tolerance(model, x, path_to_posterior(model, x, a, e, 1.0))
    for earlier, later in itertools.pairwise(elbos):
        assert later >= earlier - tol
    assert abs(elbos[-1] - model.log_evidence(x)) <= c * ts[-1] ** 2 + tol


@pytest.mark.parametrize("target", [1e-13, 1e-20, 1e-26])
def test_kl_resolution_in_float64(target):
    """KL(q_t ‖ p(z|x)) keeps its t² law down to KL ≈ 1e-26 on a D = 20, K = 5 model.

    The KL is a sum of non-negative squares (no cancellation), so the only loss is in
    representing q itself: q's mean μ + t·a is rounded once, which moves each component of
    the shift t·a by at most eps·|μᵢ + t·aᵢ|; to first order the KL, a quadratic in the shift,
    then moves by at most twice the largest such relative change. Plus the rounding of the
    K-term sums, 10·K·eps relative.
    """
    gen = seeds.generator(0)
    w = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    model = toyvae.LinearGaussian(w, noise_variance=0.5)
    x = torch.randn(20, generator=gen, dtype=torch.float64)
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    e = torch.zeros(5, 5, dtype=torch.float64)
    c = 0.5 * (a @ dense_precision(model) @ a)  # exact: the covariance is held at the posterior's
    t = math.sqrt(target / c)
    q = path_to_posterior(model, x, a, e, t)
    kl = toyvae.kl_to_posterior(model, x, q)
    representation = 2 * (EPS * q.loc.abs() / (t * a.abs())).max()
    assert abs(kl / (c * t**2) - 1) <= representation + 10 * 5 * EPS
