r"""A small reference Hamiltonian Monte Carlo, built from parts that can be swapped for wrong ones.

Not a production sampler (use Pyro's NUTS for that): it exists so that the sampler checker,
:func:`toyvae.testing.check_sampler`, can be shown to catch real mistakes. Each part of one
transition is a plain function that a test may replace:

- :func:`leapfrog`, the integrator: half a momentum step, alternating full position and
  momentum steps, half a momentum step. It is volume preserving and time reversible, which is
  what makes the proposal (leapfrog, then negate the momentum) an involution;
- :func:`hamiltonian_log_acceptance`, the Metropolis log ratio −H(z′, p′) + H(z, p) with
  H = −log π(z) + ½‖p‖²;
- the momentum reversal on rejection, ``torch.neg``, which matters only with partial momentum
  refreshment (Horowitz, 1991): p ← α p + √(1 − α²) ξ, α = ``persistence``.

With ``persistence = 0`` every transition draws a fresh momentum and is the HMC of Duane et al.
(1987) and Neal (2011), *MCMC using Hamiltonian dynamics*. Chains are vectorised: the
log density maps positions of shape (*chains, K) to (*chains,), and its gradient comes from
autograd, one evaluation per leapfrog step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from toyvae._checks import check_count, describe

__all__ = [
    "Chain",
    "HMCKernel",
    "HMCState",
    "hamiltonian_log_acceptance",
    "hmc",
    "hmc_step",
    "init_state",
    "leapfrog",
]


class HMCState(NamedTuple):
    """The state of a batch of chains.

    Attributes
    ----------
    position : tensor
        z, (*chains, K).
    momentum : tensor
        p, (*chains, K): carried over between transitions only when ``persistence > 0``.
    log_density : tensor
        log π(z), (*chains,), for the target the state was last evaluated under.
    gradient : tensor
        ∇ log π(z), (*chains, K).
    """

    position: torch.Tensor
    momentum: torch.Tensor
    log_density: torch.Tensor
    gradient: torch.Tensor


class Chain(NamedTuple):
    """The output of :func:`hmc`.

    Attributes
    ----------
    draws : tensor
        (num_samples, *chains, K): the position after each transition.
    acceptance_rate : tensor
        (*chains,): the fraction of accepted proposals.
    gradient_evaluations : int
        Gradients of log π computed per chain: ``num_steps`` per transition, plus one at the
        start.
    """

    draws: torch.Tensor
    acceptance_rate: torch.Tensor
    gradient_evaluations: int


def _value_and_gradient(log_density, position):
    with torch.enable_grad():
        z = position.detach().requires_grad_(True)
        value = log_density(z)
        (gradient,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), gradient.detach()


def leapfrog(log_density, position, momentum, gradient, step_size, num_steps):
    r"""``num_steps`` leapfrog steps of size ε for H = −log π(z) + ½‖p‖².

    .. math::
        p \leftarrow p + \tfrac\varepsilon2 \nabla\log\pi(z),\quad
        z \leftarrow z + \varepsilon p,\quad
        p \leftarrow p + \tfrac\varepsilon2 \nabla\log\pi(z)

    (consecutive half steps merged into full ones). Returns (position, momentum, log π,
    ∇ log π) at the end; one gradient evaluation per step.
    """
    momentum = momentum + 0.5 * step_size * gradient
    value = None
    for step in range(num_steps):
        position = position + step_size * momentum
        value, gradient = _value_and_gradient(log_density, position)
        scale = step_size if step < num_steps - 1 else 0.5 * step_size
        momentum = momentum + scale * gradient
    return position, momentum, value, gradient


def hamiltonian_log_acceptance(log_density, momentum, new_log_density, new_momentum):
    """log of the Metropolis ratio, −H(z′, p′) + H(z, p), with H = −log π(z) + ½‖p‖²."""
    kinetic = 0.5 * momentum.square().sum(-1)
    new_kinetic = 0.5 * new_momentum.square().sum(-1)
    return (new_log_density - new_kinetic) - (log_density - kinetic)


@dataclass(frozen=True)
class HMCKernel:
    """One HMC transition's settings and parts.

    Attributes
    ----------
    step_size : float
        ε, the leapfrog step size.
    num_steps : int
        L, leapfrog steps per transition (gradient evaluations per transition).
    persistence : float
        α in [0, 1): the momentum is refreshed as α p + √(1 − α²) ξ. 0 is standard HMC.
    integrator : callable
        :func:`leapfrog` or a replacement with its signature.
    log_acceptance : callable
        :func:`hamiltonian_log_acceptance` or a replacement with its signature.
    reversal : callable
        The map applied to the momentum on rejection: ``torch.neg``.
    """

    step_size: float
    num_steps: int
    persistence: float = 0.0
    integrator: Callable = leapfrog
    log_acceptance: Callable = hamiltonian_log_acceptance
    reversal: Callable = torch.neg

    def __post_init__(self):
        if not (isinstance(self.step_size, int | float) and 0 < self.step_size < math.inf):
            raise ValueError(f"step_size must be a positive float, got {describe(self.step_size)}")
        check_count(self.num_steps, "num_steps")
        if not (isinstance(self.persistence, int | float) and 0 <= self.persistence < 1):
            raise ValueError(f"persistence must lie in [0, 1), got {describe(self.persistence)}")


def init_state(log_density, position, *, generator=None) -> HMCState:
    """The state at ``position`` (*chains, K), with a standard normal momentum."""
    if not isinstance(position, torch.Tensor) or not position.is_floating_point():
        raise TypeError(f"position must be a floating-point tensor, got {describe(position)}")
    if position.ndim < 1:
        raise ValueError(f"position must have shape (*chains, K), got {describe(position)}")
    value, gradient = _value_and_gradient(log_density, position)
    momentum = torch.randn(
        position.shape, generator=generator, dtype=position.dtype, device=position.device
    )
    return HMCState(position.detach(), momentum, value, gradient)


def hmc_step(kernel: HMCKernel, log_density, state: HMCState, *, generator=None):
    """One transition that leaves π(z) N(p; 0, I) invariant. Returns (state, accepted).

    The state's log density and gradient must be those of ``log_density`` (recompute them with
    :func:`init_state` after changing the target, as annealed importance sampling does).
    """
    options = {"generator": generator, "dtype": state.position.dtype}
    noise = torch.randn(state.position.shape, device=state.position.device, **options)
    alpha = kernel.persistence
    momentum = alpha * state.momentum + math.sqrt(1 - alpha * alpha) * noise
    position, new_momentum, value, gradient = kernel.integrator(
        log_density, state.position, momentum, state.gradient, kernel.step_size, kernel.num_steps
    )
    log_ratio = kernel.log_acceptance(state.log_density, momentum, value, new_momentum)
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)  # a diverged trajectory is rejected
    uniform = torch.rand(log_ratio.shape, device=log_ratio.device, **options)
    accepted = uniform.log() < log_ratio
    keep = accepted.unsqueeze(-1)
    new_state = HMCState(
        torch.where(keep, position, state.position),
        torch.where(keep, new_momentum, kernel.reversal(momentum)),
        torch.where(accepted, value, state.log_density),
        torch.where(keep, gradient, state.gradient),
    )
    return new_state, accepted


def hmc(log_density, initial, num_samples, kernel: HMCKernel, *, generator=None) -> Chain:
    """Run ``num_samples`` transitions of ``kernel`` from ``initial`` (*chains, K).

    ``log_density`` maps (*chains, K) to (*chains,) and must be differentiable by autograd; an
    unnormalised log density is enough. No warm-up and no adaptation: start the chains from the
    target (or discard the first draws) and pick ``kernel.step_size`` yourself.
    """
    if not isinstance(kernel, HMCKernel):
        raise TypeError(f"kernel must be a toyvae.hmc.HMCKernel, got {describe(kernel)}")
    num_samples = check_count(num_samples, "num_samples")
    state = init_state(log_density, initial, generator=generator)
    draws, accepted = (
        [],
        torch.zeros(initial.shape[:-1], dtype=initial.dtype, device=initial.device),
    )
    for _ in range(num_samples):
        state, step_accepted = hmc_step(kernel, log_density, state, generator=generator)
        draws.append(state.position)
        accepted = accepted + step_accepted.to(accepted.dtype)
    return Chain(torch.stack(draws), accepted / num_samples, 1 + num_samples * kernel.num_steps)
