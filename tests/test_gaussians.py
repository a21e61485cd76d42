"""Canonical Gaussians: reading torch distributions, KL, entropy, and validation of q."""

import numpy as np
import pytest
import seeds
import torch
from hypothesis import given
from hypothesis import strategies as st
from mp_oracle import covariance_from_tril, to_mp
from mp_oracle import gaussian_kl as exact_kl
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import toyvae
from toyvae.strategies import gaussians
from toyvae.tolerances import EPS

F64 = torch.float64


def kl_magnitude(q, p):
    """Sum of |terms| of KL(q ‖ p): trace, Mahalanobis, K, both log-determinants (dense)."""
    gq, gp = toyvae.as_gaussian(q), toyvae.as_gaussian(p)
    cov_p_inv = torch.linalg.inv(gp.covariance())
    diff = (gp.loc - gq.loc).unsqueeze(-1)
    return (
        (cov_p_inv * gq.covariance()).sum((-2, -1)).abs()
        + (diff.mT @ cov_p_inv @ diff).squeeze((-2, -1))
        + gq.dim
        + gq.log_det_cov().abs()
        + gp.log_det_cov().abs()
    )


def kl_tolerance(q, p):
    """4·K·κ(Σ_p)·eps·M: K-term sums (Higham), amplified by triangular solves against L_p."""
    gp = toyvae.as_gaussian(p)
    kappa = torch.linalg.cond(gp.covariance())
    return 4 * gp.dim * kappa * EPS * kl_magnitude(q, p)


pairs = st.integers(1, 4).flatmap(
    lambda k: st.tuples(gaussians(k, batch_shape=(2,)), gaussians(k, batch_shape=(2,)))
)


@given(pairs)
def test_kl_matches_torch_where_torch_has_it(pair):
    """gaussian_kl equals torch's kl_divergence for MVN–MVN and Normal–Normal pairs."""
    q, p = pair
    ours = toyvae.gaussian_kl(q, p)
    if type(q) is type(p):
        theirs = kl_divergence(q, p)
    else:  # torch has no mixed rule: compare with both read as MultivariateNormal
        theirs = kl_divergence(as_mvn(q), as_mvn(p))
    assert ((ours - theirs).abs() <= kl_tolerance(q, p)).all()


def as_mvn(d):
    g = toyvae.as_gaussian(d)
    return MultivariateNormal(g.loc, scale_tril=g.scale_tril)


@given(pairs)
def test_kl_matches_the_dense_textbook_formula(pair):
    """gaussian_kl equals ½[tr(Σp⁻¹Σq) + (μp−μq)ᵀΣp⁻¹(μp−μq) − K + log det Σp − log det Σq]."""
    q, p = pair
    gq, gp = toyvae.as_gaussian(q), toyvae.as_gaussian(p)
    cq, cp = gq.covariance(), gp.covariance()
    inv = torch.linalg.inv(cp)
    diff = (gp.loc - gq.loc).unsqueeze(-1)
    dense = 0.5 * (
        (inv * cq.mT).sum((-2, -1))
        + (diff.mT @ inv @ diff).squeeze((-2, -1))
        - gq.dim
        + torch.logdet(cp)
        - torch.logdet(cq)
    )
    assert ((toyvae.gaussian_kl(q, p) - dense).abs() <= kl_tolerance(q, p)).all()


@given(st.integers(1, 4).flatmap(lambda k: gaussians(k, batch_shape=(3,))))
def test_kl_to_itself_is_zero_and_entropy_matches_torch(q):
    """KL(q ‖ q) = 0 to rounding, and entropy(q) equals torch's entropy."""
    assert (toyvae.gaussian_kl(q, q).abs() <= kl_tolerance(q, q)).all()
    k = q.event_shape[0]
    # H = ½K(1 + log 2π) + Σ log Lᵢᵢ: K + 1 terms of size ≤ |log 3| + 1.5
    assert ((toyvae.entropy(q) - q.entropy()).abs() <= 8 * (k + 1) * 3 * EPS).all()


def test_kl_broadcasts_batch_shapes():
    """A (3,)-batch q against a ()-batch p gives three KLs; incompatible batches raise."""
    q = Independent(Normal(torch.zeros(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64)), 1)
    p = MultivariateNormal(torch.ones(2, dtype=F64), scale_tril=torch.eye(2, dtype=F64))
    assert toyvae.gaussian_kl(q, p).shape == (3,)
    p4 = MultivariateNormal(torch.ones(4, 2, dtype=F64), scale_tril=torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match=r"batch shapes must broadcast.*q \(3,\) and p \(4,\)"):
        toyvae.gaussian_kl(q, p4)


def test_bad_variational_distributions_are_rejected():
    """Non-Gaussians, wrong latent size, NaN means and batch mismatches raise, naming q."""
    model = toyvae.LinearGaussian(torch.ones(3, 2, dtype=F64))
    x = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(TypeError, match=r"q must be a torch\.distributions\.MultivariateNormal"):
        toyvae.elbo(model, x, Normal(torch.zeros(2), torch.ones(2)))
    wrong_k = MultivariateNormal(torch.zeros(3, dtype=F64), scale_tril=torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=r"event shape \(2,\).*got event shape \(3,\)"):
        toyvae.elbo(model, x, wrong_k)
    nan_mean = Independent(
        Normal(torch.tensor([0.0, float("nan")]), torch.ones(2), validate_args=False), 1
    )
    with pytest.raises(ValueError, match="q's mean must be finite"):
        toyvae.kl_to_posterior(model, x, nan_mean)
    batch5 = Independent(Normal(torch.zeros(5, 2, dtype=F64), torch.ones(5, 2, dtype=F64)), 1)
    with pytest.raises(ValueError, match=r"batch shapes must broadcast.*q \(5,\) and x \(4,\)"):
        toyvae.elbo(model, x, batch5)
    with pytest.raises(TypeError, match=r"model must implement toyvae\.ConjugateModel"):
        toyvae.elbo("model", x, batch5)
    zero_scale = Independent(Normal(torch.zeros(2), torch.zeros(2), validate_args=False), 1)
    with pytest.raises(ValueError, match=r"q.s scale.*strictly positive"):
        toyvae.kl_to_prior(zero_scale)


def test_only_one_reinterpreted_dimension_is_a_gaussian_over_z():
    """Independent(Normal, 2) has event shape (N, K), not (K,): it is rejected, naming q."""
    q = Independent(Normal(torch.zeros(3, 2, dtype=F64), torch.ones(3, 2, dtype=F64)), 2)
    with pytest.raises(TypeError, match=r"q must be a torch\.distributions\.MultivariateNormal"):
        toyvae.kl_to_prior(q)


def test_a_float32_q_works_with_a_float64_model():
    """q in float32 with a float64 model: results are float64 and equal those of q cast up."""
    gen = seeds.generator(0)
    model = toyvae.LinearGaussian(torch.randn(4, 2, generator=gen, dtype=F64))
    x = torch.randn(3, 4, generator=gen, dtype=F64)
    loc, scale = torch.randn(3, 2), torch.rand(3, 2) + 0.5
    q32 = Independent(Normal(loc, scale), 1)
    q64 = Independent(Normal(loc.double(), scale.double()), 1)
    for function in (toyvae.elbo, toyvae.kl_to_posterior, toyvae.expected_log_likelihood):
        value = function(model, x, q32)
        # float32 → float64 is exact, so both runs see the same numbers and agree exactly.
        assert value.dtype == F64 and torch.equal(value, function(model, x, q64))


def test_kl_keeps_relative_accuracy_as_q_approaches_p():
    """gaussian_kl along q_t → p: relative error ≤ 1e-13 of the 60-digit value down to KL ≈ 1e-19.

    The KL is evaluated as a sum of non-negative terms (off-diagonal squares of E = L_p⁻¹L_q − I,
    e^{2ℓ} − 1 − 2ℓ per diagonal, ‖c‖²), each accurate to a few ulps of itself; K = 4 sums of
    at most 16 terms then give ~50 eps ≈ 1e-14 relative. The textbook order (tr + quadratic − K
    + log-det difference) loses everything below KL ≈ 1e-16 (torch's kl_divergence reaches
    relative errors of 1 there).
    """
    rng = seeds.rng(1)
    k = 4
    lp = np.tril(rng.normal(size=(k, k)), -1) * 0.3 + np.diag(rng.uniform(0.5, 2, size=k))
    mp_ = rng.normal(size=k)
    d_l, d_m = np.tril(rng.normal(size=(k, k))), rng.normal(size=k)
    p = MultivariateNormal(torch.tensor(mp_), scale_tril=torch.tensor(lp))
    for e in range(1, 11):
        t = 10.0**-e
        lq, mq = lp + t * d_l, mp_ + t * d_m
        q = MultivariateNormal(torch.tensor(mq), scale_tril=torch.tensor(lq))
        exact = float(
            exact_kl(to_mp(mq), covariance_from_tril(lq), to_mp(mp_), covariance_from_tril(lp))
        )
        kl = toyvae.gaussian_kl(q, p).item()
        assert kl >= 0 and abs(kl - exact) <= 1e-13 * exact, (t, kl, exact)


def test_kl_of_a_tiny_mean_shift_is_not_zero():
    """KL(N(0, 1) ‖ N(1e-8, 1)) = 5e-17, not 0: the mean term is a square, never a difference."""
    q = Independent(
        Normal(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)), 1
    )
    p = Independent(
        Normal(torch.full((1,), 1e-8, dtype=torch.float64), torch.ones(1, dtype=torch.float64)), 1
    )
    # ½(1e-8)² is one product and one halving: exact to an ulp.
    assert toyvae.gaussian_kl(q, p).item() == pytest.approx(5e-17, rel=4 * EPS)


def test_a_float64_q_that_does_not_fit_a_float32_model_is_refused():
    """q is validated after the cast to the model's dtype: 1e39 overflows float32, 1e-50 is 0."""
    model = toyvae.LinearGaussian(torch.ones(3, 2))
    x = torch.zeros(3)
    big = MultivariateNormal(torch.full((2,), 1e39, dtype=torch.float64), torch.eye(2))
    with pytest.raises(ValueError, match=r"q's mean in the model's dtype torch\.float32"):
        toyvae.elbo(model, x, big)
    tiny = Independent(
        Normal(torch.zeros(2, dtype=torch.float64), torch.full((2,), 1e-50, dtype=torch.float64)), 1
    )
    with pytest.raises(ValueError, match=r"q's scale in the model's dtype.*strictly positive"):
        toyvae.kl_to_posterior(model, x, tiny)


def test_distributions_handed_out_validate_their_arguments():
    """A Gaussian's torch distribution keeps torch's argument checks: a NaN point is refused,
    and so is a factor with a negative diagonal built by hand."""
    # torch's default is to validate, but the default is global and torch._dynamo switches it
    # off when it starts (an earlier test in the same process may have): set it here.
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        g = toyvae.gaussians.Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
        with pytest.raises(ValueError, match="value"):
            g.distribution().log_prob(torch.tensor([float("nan"), 0.0], dtype=F64))
        bad = toyvae.gaussians.Gaussian(torch.zeros(2, dtype=F64), -torch.eye(2, dtype=F64))
        with pytest.raises(ValueError, match="scale_tril"):
            bad.distribution()
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)
