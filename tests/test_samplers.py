"""The sampler checker: passes exact draws and correct HMC, flags every planted sampler bug.

False alarms: every ``check_sampler`` call that is expected to pass runs at the default
false_alarm = 1e-6 (Bonferroni over its statistics, to the accuracy of the skew-corrected
normal approximation of the Markov chain CLT; see toyvae.testing.samplers). Calls expected to
fail are deterministic (fixed seeds) and fail by a wide margin: their worst |z| is asserted to
exceed twice the threshold, so they are no borderline draws. Each ESS is Pyro's, so the module
needs the ``pyro`` extra.
"""

from __future__ import annotations

import warnings

import pytest
import scipy.signal
import seeds
import torch

import toyvae
from toyvae import hmc
from toyvae.hierarchical import HierarchicalLinearGaussian
from toyvae.testing import assert_sampler, check_sampler

pytest.importorskip("pyro", reason="the sampler checker's ESS is Pyro's: the pyro extra")

OPTIONS = {"dtype": torch.float64}


def _model():
    # Pinned, not moved by TOYVAE_SEED_OFFSET: the HMC step sizes below are tuned to this
    # model's posterior (see FULL_REFRESH); fresh seeds move the chains and draws only.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 2, generator=generator, **OPTIONS)
    noise = torch.rand(5, generator=generator, **OPTIONS) + 0.5
    model = toyvae.LinearGaussian(weight, noise_variance=noise)
    x, _ = model.sample(generator=generator)
    return model, x


def _exact_draws(model, x, shape, seed):
    """Independent draws from the exact posterior, (*shape, *batch, K)."""
    exact = toyvae.interface.for_data(model, x).exact(model.check_data(x)).posterior
    eps = torch.randn((*shape, *exact.loc.shape), generator=seeds.generator(seed), **OPTIONS)
    return exact.loc + (exact.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


def _families():
    generator = seeds.generator(4)
    linear = toyvae.LinearGaussian(
        torch.randn(4, 3, generator=generator, **OPTIONS), noise_variance=0.5
    )
    x_linear, _ = linear.sample((2,), generator=generator)  # a batch of two data points
    weights = [
        torch.randn(4, 2, generator=generator, **OPTIONS),
        torch.randn(2, 2, generator=generator, **OPTIONS),
    ]
    hierarchical = HierarchicalLinearGaussian(weights, noise_variances=[0.5, 0.3])
    x_hierarchical, _ = hierarchical.sample(generator=generator)
    ssm = toyvae.LinearGaussianSSM(
        torch.tensor([[0.9, 0.2], [-0.1, 0.7]], **OPTIONS),
        0.3,
        torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]], **OPTIONS),
        torch.tensor([0.5, 1.0, 0.2], **OPTIONS),
    )
    x_ssm, _ = ssm.sample(num_steps=4, generator=generator)
    return [
        pytest.param(linear, x_linear, id="linear"),
        pytest.param(hierarchical, x_hierarchical, id="hierarchical"),
        pytest.param(ssm, x_ssm, id="state-space"),
    ]


@pytest.mark.parametrize("model, x", _families())
@pytest.mark.false_alarm(1e-6)  # the checker's false alarm
def test_exact_posterior_draws_pass_for_every_family(model, x):
    """Independent exact posterior draws pass, for each family of the interface (FA ≤ 1e-6)."""
    draws = _exact_draws(model, x, (2, 2000), seed=1)
    check = check_sampler(model, x, draws)
    assert check.passed, check.message
    # Independent draws: Pyro's ESS is close to the 4000 draws (its estimate's spread at this
    # length is a few per cent; 0.7 and 1.3 are far outside it).
    assert 0.7 * 4000 < float(check.ess.min()) and float(check.ess.max()) < 1.3 * 4000


def test_a_sampler_that_targets_the_prior_fails():
    """Draws from the prior p(z), not p(z|x), fail by hundreds of standard errors."""
    model, x = _model()
    prior = model.prior()
    eps = torch.randn(2, 2000, 2, generator=seeds.generator(2), **OPTIONS)
    draws = prior.loc + eps @ prior.scale_tril.mT
    check = check_sampler(model, x, draws)
    assert not check.passed
    assert float(check.z.abs().max()) > 2 * check.threshold, check.message


def test_a_stuck_chain_fails_for_lack_of_effective_draws():
    """A chain that never moves (at the exact posterior mean) has ESS 0 and fails, saying so."""
    model, x = _model()
    draws = model.posterior(x).loc.expand(1, 500, 2).clone()
    check = check_sampler(model, x, draws)
    assert not check.passed
    assert "too few effective draws" in check.message


# -- the reference HMC, correct and with planted bugs -----------------------------------------


def _run(kernel, num_samples=300, chains=128, seed=3):
    """HMC chains started at exact posterior draws (no warm-up needed), as (chains, draws, K)."""
    model, x = _model()
    initial = _exact_draws(model, x, (chains,), seed=seed + 100)
    chain = hmc.hmc(
        lambda z: model.log_joint(x, z),
        initial,
        num_samples,
        kernel,
        generator=seeds.generator(seed),
    )
    return model, x, chain.draws.movedim(0, 1)


def acceptance_without_kinetic_energy(log_density, momentum, new_log_density, new_momentum):
    """Planted bug: the Metropolis ratio π(z′)/π(z) of random-walk Metropolis, in HMC."""
    return new_log_density - log_density


def leapfrog_with_full_first_step(log_density, position, momentum, gradient, step_size, steps):
    """Planted bug: full momentum steps where the first and last should be half steps."""
    value = None
    for _ in range(steps):
        momentum = momentum + step_size * gradient
        position = position + step_size * momentum
        value, gradient = hmc._value_and_gradient(log_density, position)
    return position, momentum, value, gradient


def no_reversal(momentum):
    """Planted bug: the momentum is not negated on rejection."""
    return momentum


# Step sizes against the posterior's standard deviations (0.28 and 0.46): ε = 0.15 with 4 steps
# keeps full-refresh HMC off the half-period resonance that would make the chains antithetic;
# ε = 0.6 with persistence 0.8 rejects often (acceptance ≈ 0.4), which is when the reversal
# matters.
FULL_REFRESH = hmc.HMCKernel(step_size=0.15, num_steps=4)
PARTIAL_REFRESH = hmc.HMCKernel(step_size=0.6, num_steps=1, persistence=0.8)


@pytest.mark.parametrize("kernel", [FULL_REFRESH, PARTIAL_REFRESH], ids=["full", "partial"])
@pytest.mark.false_alarm(1e-6)  # the checker's false alarm
def test_correct_reference_hmc_passes(kernel):
    """toyvae's reference HMC, full or partial momentum refreshment, passes (FA ≤ 1e-6)."""
    model, x, draws = _run(kernel, num_samples=500 if kernel.persistence else 300)
    assert_sampler(model, x, draws)


PLANTED = {
    "wrong acceptance ratio": hmc.HMCKernel(
        0.15, 4, log_acceptance=acceptance_without_kinetic_energy
    ),
    "wrong leapfrog half-step": hmc.HMCKernel(0.15, 4, integrator=leapfrog_with_full_first_step),
    "missing momentum flip": hmc.HMCKernel(0.6, 1, persistence=0.8, reversal=no_reversal),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_every_planted_sampler_bug_is_flagged(bug):
    """Each planted bug fails the check on a z-score beyond twice the threshold, not on ESS."""
    kernel = PLANTED[bug]
    model, x, draws = _run(kernel, num_samples=500 if kernel.persistence else 300)
    check = check_sampler(model, x, draws)
    assert not check.passed
    assert float(check.ess.min()) >= check.min_ess, check.message  # decided, not "run longer"
    assert float(check.z.abs().max()) > 2 * check.threshold, check.message


def test_pyro_and_arviz_effective_sample_sizes_agree():
    """Pyro's ESS (the checker's) and ArviZ's ``ess(method="mean")`` agree within 2 %.

    Both are Geyer's initial monotone sequence estimator with Stan's multi-chain variance.
    ArviZ's splits each chain in two halves first, so Pyro's is given the same 8 half-chains:
    then they differ only in normalisation. ArviZ's lag-k autocovariance divides by the length
    N, Pyro's by N − k, so Pyro's ρ_k is larger by N/(N − k) and its τ = 1 + 2Σρ_k larger by
    about 2Σ(k/N)ρ_k = 2φ/((1 − φ)²N) = 0.04 for AR(1) with φ = 0.8 and N = 1000, against
    τ = (1 + φ)/(1 − φ) = 9: 0.44 %, with the noise of the ρ_k over the ~30 lags summed on top
    of that a fraction of it (0.46 % mean, 0.63 % worst over 60 seeds). Whole chains instead of
    halves would differ by the estimators' own sampling noise, up to 7 % over those seeds.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ's once-a-day refactor notice
        arviz = pytest.importorskip("arviz")
    generator = seeds.generator(5)
    noise = torch.randn(4, 2000, 3, generator=generator, **OPTIONS).numpy()
    chains = torch.from_numpy(scipy.signal.lfilter([1.0], [1.0, -0.8], noise, axis=1))  # AR(1)
    ours = toyvae.testing.samplers.pyro_ess(chains.reshape(8, 1000, 3))  # ArviZ's halves
    theirs = torch.tensor(
        [float(arviz.ess(chains[..., i].numpy(), method="mean")) for i in range(3)], **OPTIONS
    )
    assert torch.allclose(ours, theirs, rtol=0.02), (ours, theirs)


def test_bad_arguments_raise_errors_that_name_them():
    """Wrong draws shape, type, false_alarm and min_ess raise errors naming the argument."""
    model, x = _model()
    draws = _exact_draws(model, x, (1, 100), seed=6)
    with pytest.raises(ValueError, match="draws must have shape"):
        check_sampler(model, x, draws[0])
    with pytest.raises(TypeError, match="draws must be"):
        check_sampler(model, x, draws.numpy())
    with pytest.raises(ValueError, match="false_alarm"):
        check_sampler(model, x, draws, false_alarm=2.0)
    with pytest.raises(ValueError, match="min_ess"):
        check_sampler(model, x, draws, min_ess=0)
    with pytest.raises(TypeError, match="model must implement"):
        check_sampler(object(), x, draws)
