"""The reference HMC's parts, exactly; Pyro's NUTS and HMC through the sampler checker (slow).

Exact checks compare to rounding. The Pyro runs are checked by toyvae.testing.check_sampler at
false_alarm = 1e-6 (Bonferroni, skew-corrected normal approximation of the chain CLT).
"""

from __future__ import annotations

import pytest
import seeds
import torch
from test_samplers import _model  # the same small model: one definition

from toyvae import hmc
from toyvae.testing import assert_sampler

OPTIONS = {"dtype": torch.float64}
EPS = torch.finfo(torch.float64).eps


def test_leapfrog_is_time_reversible_and_volume_preserving():
    """Leapfrog, negate p, leapfrog again: back at the start; its Jacobian has determinant 1.

    Rounding: 10 steps of O(1) updates, each a few eps relative; 1e3·eps is far below any real
    defect (a wrong half step misses the start by O(ε²) = 1e-2 here).
    """
    model, x = _model()

    def log_density(z):
        return model.log_joint(x, z)

    z = torch.tensor([[0.3, -0.2]], **OPTIONS)
    p = torch.tensor([[1.0, 0.5]], **OPTIONS)
    _, gradient = hmc._value_and_gradient(log_density, z)
    z1, p1, _, g1 = hmc.leapfrog(log_density, z, p, gradient, 0.1, 10)
    z2, p2, _, _ = hmc.leapfrog(log_density, z1, -p1, g1, 0.1, 10)
    assert torch.allclose(z2, z, atol=1e3 * EPS) and torch.allclose(-p2, p, atol=1e3 * EPS)

    def step(state):
        position, momentum = state[:2].unsqueeze(0), state[2:].unsqueeze(0)
        _, g = hmc._value_and_gradient(log_density, position)
        position, momentum, _, _ = hmc.leapfrog(log_density, position, momentum, g, 0.1, 10)
        return torch.cat([position, momentum], -1).squeeze(0)

    # The target is Gaussian, so leapfrog is linear and its Jacobian is a constant matrix;
    # finite differences of a linear map are exact up to rounding.
    state = torch.cat([z, p], -1).squeeze(0)
    columns = [(step(state + e) - step(state)) for e in torch.eye(4, **OPTIONS)]
    determinant = torch.linalg.det(torch.stack(columns, -1))
    assert abs(float(determinant) - 1) <= 1e4 * EPS


def test_kernel_settings_are_validated_with_named_errors():
    """A non-positive step size, zero steps or persistence outside [0, 1) raise named errors."""
    with pytest.raises(ValueError, match="step_size"):
        hmc.HMCKernel(step_size=0.0, num_steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        hmc.HMCKernel(step_size=0.1, num_steps=0)
    with pytest.raises(ValueError, match="persistence"):
        hmc.HMCKernel(step_size=0.1, num_steps=3, persistence=1.0)


def _pyro_run(kernel_name, num_chains=4, num_samples=2000, warmup=500):
    """Pyro's NUTS or HMC on p(z|x): chains (C, N, K) and gradient evaluations per draw."""
    pyro = pytest.importorskip("pyro", reason="Pyro's samplers are the pyro extra")
    from pyro.infer.mcmc import HMC, MCMC, NUTS

    model, x = _model()
    calls = [0]

    def potential(params):
        calls[0] += 1  # Pyro evaluates the potential once per gradient
        return -model.log_joint(x, params["z"])

    chains, sampling_calls = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds.seed(0))
        for _ in range(num_chains):
            if kernel_name == "nuts":
                kernel = NUTS(potential_fn=potential)
            else:
                kernel = HMC(
                    potential_fn=potential, step_size=0.15, num_steps=4, adapt_step_size=False
                )
            initial = {"z": model.posterior(x).loc.clone()}
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup,
                initial_params=initial,
                disable_progbar=True,
            )
            calls[0] = 0
            mcmc.run()
            sampling_calls += calls[0] * num_samples / (num_samples + warmup)
            chains.append(mcmc.get_samples()["z"])
    del pyro
    return model, x, torch.stack(chains), sampling_calls / (num_chains * num_samples)


@pytest.mark.slow
@pytest.mark.false_alarm(1e-6)  # the sampler checker's false alarm
@pytest.mark.parametrize("kernel_name", ["nuts", "hmc"])
def test_pyro_samplers_pass_the_sampler_checker(kernel_name):
    """Pyro's NUTS (adapted) and fixed-step HMC, 4 chains × 2000 draws, pass (FA ≤ 1e-6)."""
    model, x, draws, gradients_per_draw = _pyro_run(kernel_name)
    check = assert_sampler(model, x, draws)
    mean_ess = check.ess[:2]  # the two posterior means
    total = draws.shape[0] * draws.shape[1]
    per_gradient = (mean_ess / (total * gradients_per_draw)).tolist()
    print(
        f"{kernel_name}: ESS of the means {mean_ess.tolist()} from {total} draws, "
        f"{gradients_per_draw:.2f} gradients per draw, ESS per gradient {per_gradient}"
    )
