"""Annealed importance sampling and BDMC: the exact perfect-transition sandwich, and HMC runs.

The exact checks compare closed forms to rounding. The Monte Carlo checks use the chains'
sample standard error (the exact variance of an HMC-driven AIS weight is not known): a one-sided
z of 4.75 has false-alarm probability 1e-6 under the normal approximation of a mean of 256
independent chains' bounds (chains are independent, so that is the ordinary CLT).
"""

from __future__ import annotations

import math

import pytest
import seeds
import torch

import toyvae
from toyvae import ais
from toyvae.hmc import HMCKernel
from toyvae.tolerances import identity_tolerance

OPTIONS = {"dtype": torch.float64}
Z_ONE_SIDED = 4.75  # Φ(−4.75) ≈ 1.0e-6
KERNEL = HMCKernel(step_size=0.2, num_steps=3)


def _model():
    generator = seeds.generator(0)
    weight = torch.randn(5, 2, generator=generator, **OPTIONS)
    noise = torch.rand(5, generator=generator, **OPTIONS) + 0.5
    model = toyvae.LinearGaussian(weight, noise_variance=noise)
    x, z = model.sample((3,), generator=generator)
    return model, x, z


def _ssm():
    model = toyvae.LinearGaussianSSM(
        torch.tensor([[0.9, 0.2], [-0.1, 0.7]], **OPTIONS),
        0.3,
        torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]], **OPTIONS),
        torch.tensor([0.5, 1.0, 0.2], **OPTIONS),
    )
    x, _ = model.sample(2, num_steps=3, generator=seeds.generator(1))
    return model.with_num_steps(3), x


@pytest.mark.parametrize("family", ["linear", "state-space"])
def test_one_step_sandwich_is_elbo_of_the_prior_and_evidence_plus_kl(family):
    """T = 1: lower = ELBO(prior), upper = log p(x) + KL(p(z|x) ‖ p(z)), to rounding.

    Both sides are computed independently: toyvae.elbo and toyvae.gaussian_kl against
    thermodynamic_bounds' quadratic-form moments; the tolerance is the identity tolerance
    (4·n·eps·M) times the posterior's condition number for the triangular solves.
    """
    model, x = _ssm() if family == "state-space" else _model()[:2]
    bounds = ais.thermodynamic_bounds(model, x, ais.linear_schedule(1))
    prior = model.prior()
    exact = model.exact(x)
    posterior = torch.distributions.MultivariateNormal(
        exact.posterior.loc, scale_tril=exact.posterior.scale_tril
    )
    condition = toyvae.tolerances.posterior_condition(model)
    tolerance = 8 * condition * identity_tolerance(model, x, posterior)
    elbo_of_prior = toyvae.elbo(model, x, prior)
    assert ((bounds.lower - elbo_of_prior).abs() <= tolerance).all()
    upper = exact.log_evidence + toyvae.gaussian_kl(posterior, prior)
    assert ((bounds.upper - upper).abs() <= tolerance).all()


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 100])
def test_perfect_transition_sandwich_contains_log_evidence_and_narrows_as_one_over_t(steps):
    """lower ≤ log p(x) ≤ upper, and for T equal steps the width is (E_1 ℓ − E_0 ℓ)/T exactly."""
    model, x, _ = _model()
    log_evidence = model.log_evidence(x)
    bounds = ais.thermodynamic_bounds(model, x, ais.linear_schedule(steps))
    one = ais.thermodynamic_bounds(model, x, ais.linear_schedule(1))
    tolerance = 8 * identity_tolerance(model, x) * toyvae.tolerances.posterior_condition(model)
    assert (bounds.lower <= log_evidence + tolerance).all()
    assert (log_evidence <= bounds.upper + tolerance).all()
    # The sum telescopes: width = Δβ Σ_t (E_t ℓ − E_{t−1} ℓ) = (E_1 ℓ − E_0 ℓ)/T; T = 1 gives
    # E_1 ℓ − E_0 ℓ itself. Rounding: T + 1 expectations, each to the identity tolerance.
    width, expected = bounds.upper - bounds.lower, (one.upper - one.lower) / steps
    assert ((width - expected).abs() <= (steps + 1) * tolerance).all()


def test_tempered_posteriors_are_the_prior_and_the_posterior_at_the_ends():
    """π_0 is the prior and π_1 the exact posterior (mean and Cholesky factor, to rounding)."""
    model, x, _ = _model()
    start, end = ais.tempered(model, x, 0.0), ais.tempered(model, x, 1.0)
    posterior = model.posterior(x)
    eps = torch.finfo(torch.float64).eps
    scale = 64 * eps * toyvae.tolerances.posterior_condition(model) ** 2
    assert torch.allclose(start.loc, torch.zeros(2, **OPTIONS), atol=scale)
    assert torch.allclose(start.scale_tril, torch.eye(2, **OPTIONS).expand(3, 2, 2), atol=scale)
    assert torch.allclose(end.loc, posterior.loc, atol=scale * posterior.loc.abs().max())
    assert torch.allclose(end.scale_tril, posterior.scale_tril, atol=scale)


def _sandwich(steps, chains=256):
    """BDMC on data simulated from the model: forward from the prior, reverse from the latent.

    256 simulated (x, z) pairs, one reverse chain each started at the z that generated x (an
    exact posterior draw), and one forward chain each: bounds minus log p(x), per pair.
    """
    model = _model()[0]
    x, z = model.sample((chains,), generator=seeds.generator(7))
    log_evidence = model.log_evidence(x)
    betas = ais.linear_schedule(steps)
    forward = ais.forward_ais(model, x, 1, betas, KERNEL, generator=seeds.generator(8))
    reverse = ais.reverse_ais(model, x, z[None], betas, KERNEL, generator=seeds.generator(9))
    return forward.bounds[0] - log_evidence, reverse.bounds[0] - log_evidence


def _mean_and_error(values):
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# false alarm: 4 one-sided z's at 1e-6 (2 schedules × lower, upper); the narrowing's z was 9.6 to
# 12.3 at offsets 0–5, so it misses 4.75 with probability ≈ Φ(−5) ≤ 1e-6.
@pytest.mark.false_alarm(5e-6)
def test_bdmc_sandwich_contains_log_evidence_and_narrows_with_more_temperatures():
    """On simulated data: E lower ≤ log p(x) ≤ E upper, and T = 30 is narrower than T = 3."""
    widths = {}
    for steps in (3, 30):
        lower, upper = _sandwich(steps)
        lower_mean, lower_error = _mean_and_error(lower)
        upper_mean, upper_error = _mean_and_error(upper)
        assert lower_mean <= Z_ONE_SIDED * lower_error, (steps, lower_mean, lower_error)
        assert upper_mean >= -Z_ONE_SIDED * upper_error, (steps, upper_mean, upper_error)
        widths[steps] = (upper - lower, math.hypot(lower_error, upper_error))
    (wide, wide_error), (narrow, narrow_error) = widths[3], widths[30]
    difference = float(wide.mean() - narrow.mean())
    assert difference > Z_ONE_SIDED * math.hypot(wide_error, narrow_error), widths


@pytest.mark.false_alarm(6e-6)  # 3 data points × a two-sided 4.75-s.e. band (2e-6 each)
def test_forward_ais_estimate_from_many_chains_is_near_log_evidence():
    """log mean w over 256 chains is consistent with log p(x): E w = p(x) (unbiased weights).

    Checked on w/p(x), whose mean is 1: the 256 chains' sample standard error of the mean of
    w/p(x), times 4.75 each side (two-sided 2e-6 under the CLT over independent chains).
    """
    model, x, _ = _model()
    run = ais.forward_ais(
        model, x, 256, ais.linear_schedule(30), KERNEL, generator=seeds.generator(10)
    )
    ratios = (run.bounds - model.log_evidence(x)).exp()
    mean, error = ratios.mean(0), ratios.std(0) / math.sqrt(256)
    assert ((mean - 1).abs() <= Z_ONE_SIDED * error).all(), (mean, error)
    assert run.evaluations == 30 + 29 * (KERNEL.num_steps + 1)


def test_bad_arguments_raise_errors_that_name_them():
    """A schedule that does not run from 0 to 1, a wrong kernel or initial shape: named errors."""
    model, x, _ = _model()
    with pytest.raises(ValueError, match="betas must increase"):
        ais.forward_ais(model, x, 2, torch.tensor([0.0, 0.5], **OPTIONS), KERNEL)
    with pytest.raises(TypeError, match="kernel must be"):
        ais.forward_ais(model, x, 2, ais.linear_schedule(2), "hmc")
    with pytest.raises(ValueError, match="initial must"):
        ais.reverse_ais(model, x, torch.zeros(2, 2, **OPTIONS), ais.linear_schedule(2), KERNEL)
    with pytest.raises(ValueError, match="beta must"):
        ais.tempered(model, x, 1.5)
