r"""A row of the report, the sample budget, and the tolerances rows are held to.

A row holds the worst error a check found, the tolerance it was held to, why that tolerance,
and whether the property held. Every check is a function ``check(model, x, generator, *,
budget) -> Row`` that carries its random-stream key in a ``stream`` attribute (:func:`stream`):
the command seeds each check's generator from that key, never from the function's name.

The tolerances are compositions of :mod:`toyvae.tolerances`, not new arithmetic:
:func:`solve_tolerance` is ``posterior_condition · identity_tolerance`` for quantities that
solve against the posterior's Cholesky factor, and :func:`rounding_unit` reads off
``identity_tolerance``'s allowance per unit of M for terms ``magnitude`` does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from toyvae.interface import ConjugateModel
from toyvae.model import LinearGaussian
from toyvae.tolerances import identity_tolerance, magnitude, posterior_condition

FALSE_ALARM = 1e-6  # per row
IDENTITY = "κ(S)·4(D+K)·eps·M: M = Σ|terms| (n-term sums), κ(S) for solves with posterior S"


class Row(NamedTuple):
    """One property on one model: worst error, tolerance, why, and the verdict.

    Attributes
    ----------
    property : str
        The property's name, as the table shows it.
    error : float
        The worst error found (NaN for a skipped row).
    tolerance : float
        The tolerance that error was held to (NaN for a skipped row).
    reason : str
        Why that tolerance; for a skipped row, why it was skipped.
    passed : bool or None
        The verdict; ``None`` for a check that was skipped.
    """

    property: str
    error: float
    tolerance: float
    reason: str
    passed: bool | None


@dataclass(frozen=True)
class Budget:
    """Sample sizes: the default run and ``--quick`` differ only in these.

    Attributes
    ----------
    points : int
        Data points per model (sampled from it; a ``--model`` file's x is kept).
    draws : int
        Monte Carlo draws per data point for the ELBO estimator checks.
    iwae_draws : int
        IWAE_1 estimates; each k gets ⌈iwae_draws/k⌉ (the same radius, from Var = χ²/k).
    iwae_ks : tuple of int
        The k's of the IWAE rows.
    gradient_draws : int
        Gradient estimator draws per data point.
    gradient_points : int
        Data points for the gradient checks (autograd is per point).
    max_quadrature_dim : int
        The score-function estimator's exact gradient moments use 5^K Gauss–Hermite nodes; the
        gradient row leaves that estimator out above this K (the other two have closed-form
        moments and run at any K).
    max_reference_dim : int or None
        The dense O(D³) oracle is skipped above this D; ``None``: never skipped.
    """

    points: int = 16
    draws: int = 100_000
    iwae_draws: int = 20_000
    iwae_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    gradient_draws: int = 4_000
    gradient_points: int = 4
    max_quadrature_dim: int = 4
    max_reference_dim: int | None = None


QUICK = Budget(
    points=8,
    draws=20_000,
    iwae_draws=2_000,
    iwae_ks=(1, 2, 4, 8, 16),
    gradient_draws=1_000,
    gradient_points=2,
    max_quadrature_dim=4,
    max_reference_dim=200,
)


def stream(key: str):
    """Mark a check with its random-stream key: ``@stream("check_identity")``.

    The command seeds the check's generator from (``--seed``, model, key), so renaming or
    wrapping the function (``functools.wraps`` copies the attribute) leaves its draws, and
    therefore its row, unchanged. The keys of the built-in checks are the function names they
    had when the key was introduced; keep them when renaming.
    """

    def mark(check):
        check.stream = key
        return check

    return mark


def worst(prop: str, errors, tolerances, reason: str) -> Row:
    """The row for a set of (error, tolerance) pairs: the pair with the largest error/tolerance.

    A NaN or infinite error fails the row and is the one reported.
    """
    errors, tolerances = torch.broadcast_tensors(
        torch.as_tensor(errors).detach().double().cpu(),
        torch.as_tensor(tolerances).detach().double().cpu(),
    )
    errors, tolerances = errors.reshape(-1), tolerances.reshape(-1)
    bad = ~torch.isfinite(errors)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
    else:
        i = int((errors / tolerances.clamp_min(torch.finfo(torch.float64).tiny)).argmax())
    passed = bool((errors <= tolerances).all()) and not bool(bad.any())
    return Row(prop, float(errors[i]), float(tolerances[i]), reason, passed)


def skip(prop: str, why: str) -> Row:
    """A skipped row: no error, no tolerance, ``passed`` None, ``why`` as the reason."""
    return Row(prop, math.nan, math.nan, why, None)


def skip_unless_linear_gaussian(prop: str, model) -> Row | None:
    """A skipped row unless the model is a :class:`toyvae.LinearGaussian` with p(z) = N(0, I).

    For the rows that read W, b and Ψ (the dense oracle, the classic questions, Fisher's
    identity in θ = (W, b, Ψ)), which the :class:`toyvae.ConjugateModel` interface does not
    expose, and whose closed forms take the standard prior. ``None`` when the row can run.
    """
    if not isinstance(model, LinearGaussian):
        why = f"got a {type(model).__name__}"
    else:
        prior = model.prior()
        eye = torch.eye(model.latent_dim, dtype=model.dtype, device=model.device)
        if bool((prior.loc == 0).all()) and bool((prior.scale_tril == eye).all()):
            return None
        why = "got one with another prior"
    return skip(prop, f"skipped: needs a toyvae.LinearGaussian with p(z) = N(0, I), {why}")


# -- tolerances: compositions of toyvae.tolerances ----------------------------------------------


def solve_tolerance(model: ConjugateModel, x, q=None, *, z=None) -> torch.Tensor:
    """κ(S)·4(D+K)·eps·M: rounding of sums of the terms in M, amplified by triangular solves.

    KL(q ‖ p(z|x)), log p(z|x) and the log weights solve against the posterior's Cholesky
    factor S, whose normwise forward error is up to κ(S) times the backward error
    (:func:`toyvae.tolerances.posterior_condition` times
    :func:`toyvae.tolerances.identity_tolerance`).
    """
    return posterior_condition(model) * identity_tolerance(model, x, q, z=z)


def rounding_unit(model: ConjugateModel) -> float:
    """4·n·eps: :func:`toyvae.tolerances.identity_tolerance`'s allowance per unit of M.

    For terms that :func:`toyvae.tolerances.magnitude` does not count (log q(z), a gradient's
    size). Read off ``identity_tolerance / magnitude`` at x = 0 rather than restated, so the
    report follows any change of the tolerance's derivation (n is the model's ``term_count``).
    """
    x = torch.zeros(model.data_event_shape, dtype=model.dtype, device=model.device)
    return float(identity_tolerance(model, x) / magnitude(model, x))


def options(model: ConjugateModel) -> dict:
    """The model's dtype and device, as keyword arguments for tensor factories."""
    return {"dtype": model.dtype, "device": model.device}


def apply(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """matrix @ v for batches of matrices (..., K, K) and vectors (..., K), broadcasting."""
    return (matrix @ vectors.unsqueeze(-1)).squeeze(-1)
