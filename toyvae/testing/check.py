r"""Check a user's ELBO, IWAE_k or loss code, as written, against the exact answer.

:func:`check_elbo` takes the user's own estimate (or loss) function, a function that builds the
exact model from their parameters, and one that gives q for a batch:

    check_elbo(my_loss, model=lambda: toyvae.LinearGaussian(dec.weight, dec.bias,
               dec.log_var.exp()), q=lambda x: Independent(Normal(*enc(x)), 1), x=x, loss=True)

The exact target is toyvae's closed form evaluated at the model and q they build, and its
gradient with respect to *their* parameters follows by autograd: every tensor that requires
grad and that the model or q depends on is checked (:mod:`toyvae.testing.parameters`); frozen
ones are not. Any family of the model interface works, and any q :func:`toyvae.elbo` takes (a
Markov chain over time steps, a top-down hierarchy), so a per-step or per-layer ELBO written by
the user is checked the same way. :func:`check_elbo_estimator` is the same check on toyvae's own
:class:`~toyvae.testing.LinearVAE`. When a check fails, :mod:`toyvae.testing.diagnose` names the
common mistake whose exact prediction fits.

The estimator is drawn ``num_draws`` times; its mean is compared with the exact target by a
z-test whose standard error comes from the draws themselves, but is never taken below that of
the reparameterised estimator of the same target (log w for the ELBO, log (1/k) Σ w_i for
IWAE_k), whose spread comes from 1000 draws of its own. The floor is what makes the stated
false-alarm probability hold: a per-row scale's gradient carries −Λ_jj σ_j² ε_j², skewed, and
a few draws that miss its long tail have a mean and a standard error both too small (with the
draws' own standard error alone, a correct estimator failed 1.25% of checks at 50 draws where
1e-6 was stated). Its price: an estimator that varies less (an analytic KL, more samples per
draw) is held to the reparameterised one's standard error, so more draws are needed to see the
same offset. Its gradient with respect to every encoder and decoder parameter is compared the
same way with the exact gradient, coordinate by coordinate: that is what catches an estimator
with the right value but no reparameterisation.

Targets, for a batch x of N rows and the reduction the user states:

- k = 1: the exact ELBO, ``toyvae.elbo(model(), x, q(x))``, and its gradient by autograd.
- k > 1: L_k = E log (1/k) Σ_i w_i has no closed form. It is written as
  L_k = ELBO + E[log (1/k) Σ_i w_i − (1/k) Σ_i log w_i]: the exact ELBO plus the mean of a
  non-negative gap whose variance is much smaller than that of the IWAE estimate itself (the
  two terms are strongly correlated). The gap is averaged over 16 × ``num_draws`` vectorised
  draws, with its own standard error, which enters the z-test; value and gradient both.
  The exact bounds ELBO ≤ L_k ≤ log p(x) are shown in the report.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.stats
import torch
from torch.distributions import MultivariateNormal

from toyvae._checks import describe
from toyvae.bounds import check_call, elbo, kl_to_prior
from toyvae.estimators import log_weights_at
from toyvae.gaussians import as_gaussian
from toyvae.interface import ConjugateModel
from toyvae.testing.diagnose import ExactTerms, exact_terms, value_explanations
from toyvae.testing.parameters import Parameter, Parameters, resolve_parameters
from toyvae.testing.vae import LinearVAE, linear_vae

__all__ = [
    "DEFAULT_NUM_DRAWS",
    "ELBOCheck",
    "assert_elbo",
    "assert_elbo_estimator",
    "check_elbo",
    "check_elbo_estimator",
]

DEFAULT_NUM_DRAWS = 200
# The reference for k > 1 uses this many times num_draws draws of the gap, in this many batches
# (the batches give the reference gradient's standard error).
_REFERENCE_FACTOR = 16
_REFERENCE_BATCHES = 64
# The reference's random stream must be independent of the one the estimator gets.
_REFERENCE_SEED_OFFSET = 0x5EED_0F_1A7E
# The floor under the draws' standard errors is the standard deviation of the reparameterised
# estimator, from this many draws (its relative error ≈ √((κ − 1)/4n), 6% for ε²'s κ = 15),
# differentiated this many at a time, from its own random stream.
_SPREAD_DRAWS = 1000
_SPREAD_CHUNK = 100
_SPREAD_SEED_OFFSET = 0x5EED_5D
# Explanations that shift the value by a constant, leaving the gradient as it should be.
_GRADIENT_NEUTRAL = ("dropped_log_2pi", "iwae_missing_log_k")


class ELBOCheck(NamedTuple):
    """The verdict of :func:`check_elbo` and :func:`check_elbo_estimator`; ``str(check)`` is the
    report.

    Values are in the user's units: the stated reduction over x's rows, and −ELBO for a loss.
    ``z`` = difference / √(max(standard_error, floor)² + exact_standard_error² + rounding²),
    where the floor is the reparameterised estimator's standard error for as many draws.

    Attributes
    ----------
    passed : bool
        Value and (when checked) gradient consistent with the exact ones.
    mean : float
        Mean of the estimator's draws.
    standard_error : float
        Of that mean, from the draws' sample variance.
    exact : float
        The target: the exact ELBO (k = 1) or the IWAE_k reference (k > 1).
    exact_standard_error : float
        0 for k = 1; the reference's Monte Carlo error for k > 1.
    difference : float
        mean − exact.
    z : float
        The value's z-statistic.
    threshold : float
        |z| above this fails.
    direction : str
        ``"consistent"``, ``"too high"``, ``"too low"`` or ``"not finite"``.
    gradient_passed : bool or None
        None when the gradient was not checked.
    gradient_z : float or None
        The largest |z| over gradient coordinates, with its sign.
    gradient_parameter : str or None
        The coordinate where it occurs, e.g. ``"encoder.mean.bias[1]"``.
    num_draws : int
        Number of calls of the estimator.
    message : str
        The report.
    diagnosis : tuple of str
        Names of the explanations that fit a failed check (:mod:`toyvae.testing.diagnose`):
        e.g. ``("dropped_log_2pi",)``, ``("reduction",)``, ``("detached_sample",)``; empty when
        the check passed or nothing known fits.
    frozen : tuple of str
        Parameters found but not checked because they do not require grad.
    """

    passed: bool
    mean: float
    standard_error: float
    exact: float
    exact_standard_error: float
    difference: float
    z: float
    threshold: float
    direction: str
    gradient_passed: bool | None
    gradient_z: float | None
    gradient_parameter: str | None
    num_draws: int
    message: str
    diagnosis: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message


class _Target(NamedTuple):
    value: torch.Tensor  # 0-d
    value_se: torch.Tensor  # 0-d
    gradient: torch.Tensor  # (P,)
    gradient_se: torch.Tensor  # (P,)
    bounds: tuple[float, float] | None  # reduced (ELBO, log p(x)), in the user's sign
    magnitude: torch.Tensor  # Σ of |terms| of the exact value, for the rounding allowance
    terms: ExactTerms  # per-row exact quantities, for the diagnoses
    kl_gradient: torch.Tensor  # ∂(sign · reduced −KL(q ‖ p(z)))/∂params: a detached sample's
    value_sd: torch.Tensor  # 0-d: one reparameterised draw's standard deviation (the floor)
    gradient_sd: torch.Tensor | None  # (P,): the same for each gradient coordinate


def _reduce(per_example: torch.Tensor, reduction: str, sign: float, keep: int = 0) -> torch.Tensor:
    """sign × the stated reduction over all but the first ``keep`` dimensions (the draws)."""
    rows = per_example.flatten(keep)  # a 0-d tensor flattens to one element
    total = rows.mean(-1) if reduction == "mean" else rows.sum(-1)
    return sign * total


def _joined(grads, params, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """Gradients joined into one flat vector (per leading index); a parameter the output does
    not depend on (grad None) gets zeros."""
    return torch.cat(
        [
            p.new_zeros(*lead, p.numel()) if g is None else g.reshape(*lead, p.numel())
            for g, p in zip(grads, params, strict=True)
        ],
        dim=-1,
    )


def _flat_gradient(output: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∂output/∂params flattened; parameters the output does not depend on get zeros."""
    if not params:
        return torch.zeros(0, dtype=output.dtype, device=output.device)
    if not output.requires_grad:
        return _joined([None] * len(params), params)
    return _joined(torch.autograd.grad(output, params, allow_unused=True), params)


def _build(model_fn, q_fn, x):
    """The user's model and q for x (the model bound to x), freshly built."""
    model = (
        model_fn()
        if callable(model_fn) and not isinstance(model_fn, ConjugateModel)
        else (model_fn)
    )
    q = q_fn(x) if callable(q_fn) and not hasattr(q_fn, "log_prob") else q_fn
    return model, q


def _log_weights(model_fn, q_fn, x, sample_shape, generator):
    """The reparameterised log weights of the user's model and q at fresh standard-normal noise,
    shape (*sample_shape, *batch), differentiable in the user's parameters."""
    model, q = _build(model_fn, q_fn, x)
    bound = check_call(model, x, q)[0]
    batch = x.shape[: x.ndim - len(bound.data_event_shape)]
    shape = (*sample_shape, *batch, bound.latent_dim)
    eps = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    return log_weights_at(model, x, q, eps)


def _per_draw(log_w: torch.Tensor, k: int, reduction: str, sign: float) -> torch.Tensor:
    """Draws (d, k, *batch) of log weights → d draws of the reparameterised estimate of the
    target: log (1/k) Σ_i w_i (the log weight itself for k = 1), reduced over the batch."""
    return _reduce(torch.logsumexp(log_w, 1) - math.log(k), reduction, sign, keep=1)


def _flat_jacobian(outputs: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∂outputs[d]/∂params flattened, one row per draw d (vectorised backward passes)."""
    rows = outputs.shape[0]
    if not outputs.requires_grad:
        return _joined([None] * len(params), params, (rows,))
    eye = torch.eye(rows, dtype=outputs.dtype, device=outputs.device)
    grads = torch.autograd.grad(
        outputs, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True
    )
    return _joined(grads, params, (rows,))


def _reference_spread(model_fn, q_fn, x, params, k, reduction, sign, seed, with_gradient):
    """Standard deviations of one draw of the reparameterised estimator of the target, its
    value and (``with_gradient``) each gradient coordinate, from _SPREAD_DRAWS draws.

    They are the floor under the standard errors of the user's draws: a skewed estimator (a
    per-row scale's gradient carries −Λ_jj σ_j² ε_j²) whose few draws miss its long tail has a
    sample standard error far too small, and the Student-t threshold, far out in its tail, is
    then crossed far more often than it says."""
    generator = torch.Generator(device=x.device).manual_seed(seed + _SPREAD_SEED_OFFSET)
    values, rows = [], []
    for _ in range(_SPREAD_DRAWS // _SPREAD_CHUNK):
        with torch.enable_grad():
            log_w = _log_weights(model_fn, q_fn, x, (_SPREAD_CHUNK, k), generator)
            draws = _per_draw(log_w, k, reduction, sign)
            if with_gradient:
                rows.append(_flat_jacobian(draws, params))
        values.append(draws.detach())
    gradient = torch.cat(rows).std(0) if with_gradient else None
    return torch.cat(values).std(), gradient


def _exact_target(
    model_fn, q_fn, x, params, k, reduction, sign, num_draws, seed, check_gradient
) -> _Target:
    with torch.enable_grad():
        model, q = _build(model_fn, q_fn, x)
        exact_elbo = elbo(model, x, q)
        value = _reduce(exact_elbo, reduction, sign)
        gradient = _flat_gradient(value, params)
        again = _build(model_fn, q_fn, x)  # a fresh graph for the second gradient
        bound, _, gq = check_call(again[0], x, again[1])
        q_dense = MultivariateNormal(gq.loc, scale_tril=gq.scale_tril)
        kl = kl_to_prior(q_dense, bound)
        kl_gradient = _flat_gradient(_reduce(-kl.expand(exact_elbo.shape), reduction, sign), params)
    terms = exact_terms(model, x, q)
    with torch.no_grad():
        magnitude = _reduce(terms.reconstruction.abs() + terms.kl, reduction, 1.0)
        magnitude = magnitude.to(value.dtype)
    value_sd, gradient_sd = _reference_spread(
        model_fn, q_fn, x, params, k, reduction, sign, seed, check_gradient and bool(params)
    )
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    if k == 1:
        return _Target(
            value.detach(), zero, gradient, torch.zeros_like(gradient), None, magnitude, terms,
            kl_gradient, value_sd, gradient_sd,
        )  # fmt: skip

    # L_k = ELBO + E[gap], gap = log mean_i w_i − mean_i log w_i ≥ 0, by vectorised draws.
    generator = torch.Generator(device=x.device).manual_seed(seed + _REFERENCE_SEED_OFFSET)
    per_batch = max(1, _REFERENCE_FACTOR * num_draws // _REFERENCE_BATCHES)
    gaps, gap_gradients = [], []
    for _ in range(_REFERENCE_BATCHES):
        with torch.enable_grad():
            log_w = _log_weights(model_fn, q_fn, x, (per_batch, k), generator)
            gap = torch.logsumexp(log_w, 1) - math.log(k) - log_w.mean(1)
            gap = _reduce(gap.mean(0), reduction, sign)
            gap_gradients.append(_flat_gradient(gap, params))
        gaps.append(gap.detach())
    gaps, gap_gradients = torch.stack(gaps), torch.stack(gap_gradients)
    root = math.sqrt(_REFERENCE_BATCHES)
    with torch.no_grad():
        log_evidence = _reduce(terms.model.exact(x).log_evidence, reduction, sign)
    return _Target(
        value.detach() + gaps.mean(),
        gaps.std() / root,
        gradient + gap_gradients.mean(0),
        gap_gradients.std(0) / root,
        (float(value.detach()), float(log_evidence)),
        magnitude + math.log(k),
        terms,
        kl_gradient,
        value_sd,
        gradient_sd,
    )


@contextlib.contextmanager
def _seeded_global_generator(seed: int, device: torch.device):
    """Seed torch's global generator for ``device`` inside, and restore it on the way out.

    So an estimator that calls ``q.rsample()`` (which ignores the generator it is given) is
    reproducible too, and the caller's random state is left as it was.
    """
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _as_value(output, reduction: str, batch_shape: torch.Size) -> torch.Tensor:
    """The estimator's output as a 0-d tensor, after checking its type and shape."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise TypeError(
            f"estimator must return a floating-point torch tensor, got {describe(output)}"
        )
    if reduction == "none":
        if output.shape != batch_shape:
            raise ValueError(
                f"estimator must return one value per row of x, shape {tuple(batch_shape)}, "
                f"with reduction='none', got {describe(output)}"
            )
        return output.sum()
    if output.numel() != 1:
        raise ValueError(
            f"estimator must return a single number with reduction={reduction!r}, got "
            f"{describe(output)} (pass reduction='none' for one value per row of x)"
        )
    return output.reshape(())


def _coordinate(params: tuple[Parameter, ...], index: int) -> tuple[str, Parameter]:
    """The name of flat gradient coordinate ``index``, e.g. ``encoder.mean.weight[1, 4]``."""
    for p in params:
        t = p.tensor
        if index < t.numel():
            if not t.ndim:
                return p.name, p
            where = np.unravel_index(index, tuple(t.shape))
            return f"{p.name}[{', '.join(str(int(i)) for i in where)}]", p
        index -= t.numel()
    raise IndexError(index)


def _parameter_name(named: list[tuple[str, torch.Tensor]], index: int) -> str:
    """The name of flat gradient coordinate ``index`` among (name, tensor) pairs."""
    params = tuple(Parameter(n, t, "") for n, t in named)
    return _coordinate(params, index)[0]


def _check_options(k, loss, reduction, num_draws, false_alarm, seed, check_gradient) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (1 for the ELBO), got {describe(k)}")
    if not isinstance(loss, bool):
        raise TypeError(f"loss must be a bool, got {describe(loss)}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 10:
        raise ValueError(f"num_draws must be an integer of at least 10, got {describe(num_draws)}")
    if not (isinstance(false_alarm, float) and 0 < false_alarm < 1):
        raise ValueError(f"false_alarm must be a float in (0, 1), got {describe(false_alarm)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {describe(seed)}")
    if not isinstance(check_gradient, bool):
        raise TypeError(f"check_gradient must be a bool, got {describe(check_gradient)}")


def _vae_hint(vae) -> str:
    if isinstance(vae, tuple) and len(vae) == 3:
        kinds = ", ".join(type(v).__name__ for v in vae)
        return (
            f"vae must be a toyvae.testing.LinearVAE (encoder, decoder, x), got a tuple of "
            f"({kinds}). For your own modules use toyvae.testing.check_elbo(estimate, model, q, "
            "x): model() builds the exact model from your parameters, q(x) returns your q"
        )
    what = describe(vae) if not isinstance(vae, tuple | list) else f"a {type(vae).__name__}"
    return (
        f"vae must be a toyvae.testing.LinearVAE (encoder, decoder, x), got {what}; for your "
        "own modules use toyvae.testing.check_elbo(estimate, model, q, x)"
    )


def check_elbo_estimator(
    estimator: Callable,
    vae: LinearVAE | None = None,
    *,
    k: int = 1,
    loss: bool = False,
    reduction: str = "sum",
    num_draws: int = DEFAULT_NUM_DRAWS,
    false_alarm: float = 1e-6,
    seed: int = 0,
    check_gradient: bool = True,
) -> ELBOCheck:
    r"""Decide whether ``estimator`` is consistent with the exact ELBO (or IWAE_k bound).

    The check of :func:`check_elbo` on toyvae's own linear VAE: ``estimator(x, encoder,
    decoder, generator)`` is checked with ``model = decoder.model``, ``q = encoder`` and every
    encoder and decoder parameter that requires grad (named ``encoder.…``, ``decoder.…``).

    Parameters
    ----------
    estimator : callable
        ``estimator(x, encoder, decoder, generator)`` returns one draw of the estimate, a
        tensor. It must draw its noise from ``generator`` (a seeded ``torch.Generator``) or
        from torch's global generator, which is seeded here and restored afterwards.
    vae : LinearVAE, optional
        ``(encoder, decoder, x)``; by default :func:`linear_vae` ``()``: D = 6, K = 3, N = 32,
        float64, an encoder deliberately different from the exact posterior.
    k, loss, reduction, num_draws, false_alarm, seed, check_gradient
        As for :func:`check_elbo`.

    Returns
    -------
    ELBOCheck
    """
    vae = linear_vae() if vae is None else vae
    if not callable(estimator):
        raise TypeError(
            f"estimator must be a function (x, encoder, decoder, generator) -> estimate, "
            f"got {describe(estimator)}"
        )
    if not isinstance(vae, LinearVAE):
        raise TypeError(_vae_hint(vae))
    _check_options(k, loss, reduction, num_draws, false_alarm, seed, check_gradient)
    encoder, decoder, x = vae
    named = {f"encoder.{n}": p for n, p in encoder.named_parameters()}
    named |= {f"decoder.{n}": p for n, p in decoder.named_parameters()}
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def estimate(x):
        return estimator(x, encoder, decoder, generator)

    return _check(
        estimate, decoder.model, encoder, x, named, k, loss, reduction, num_draws, false_alarm,
        seed, check_gradient,
    )  # fmt: skip


def check_elbo(
    estimate: Callable,
    model,
    q,
    x: torch.Tensor,
    *,
    parameters=None,
    k: int = 1,
    loss: bool = False,
    reduction: str = "sum",
    num_draws: int = DEFAULT_NUM_DRAWS,
    false_alarm: float = 1e-6,
    seed: int = 0,
    check_gradient: bool = True,
) -> ELBOCheck:
    r"""Check the user's own ELBO, IWAE_k or loss code against the exact answer and its gradient.

    Parameters
    ----------
    estimate : callable
        ``estimate(x)`` returns one draw of the user's estimate (or loss) for the batch x, a
        tensor, computed by their own modules. Its noise comes from torch's global generator
        (``torch.randn_like``, ``q.rsample()``), which is seeded here and restored afterwards.
    model : callable or ConjugateModel
        ``model()`` builds the exact model that the user's parameters define, e.g.
        ``lambda: toyvae.LinearGaussian(dec.weight, dec.bias, dec.log_var.exp())``; any family
        of the model interface (:class:`toyvae.HierarchicalLinearGaussian`,
        :class:`toyvae.LinearGaussianSSM`). Called afresh, so it sees the current parameters.
    q : callable
        ``q(x)`` returns the user's q for the batch: ``Independent(Normal, 1)``,
        ``MultivariateNormal``, or a structured q (:class:`toyvae.MarkovGaussian`,
        :class:`toyvae.TopDownGaussian`), e.g. ``lambda x: Independent(Normal(*enc(x)), 1)``.
    x : tensor
        The batch: (N, D), or (N, T, D) for sequences.
    parameters : Module, mapping or iterable, optional
        What to check and what to call it. By default every tensor that requires grad and that
        ``model()`` or ``q(x)`` depends on (found in the autograd graph), named after the
        modules and tensors the three functions refer to; parameters that do not require grad
        (a frozen decoder variance) are not checked, and the report lists them.
    k : int
        1 if ``estimate`` estimates the ELBO; k > 1 if it estimates the IWAE bound
        L_k = E log (1/k) Σ_{i≤k} p(x, z_i)/q(z_i|x).
    loss : bool
        True if ``estimate`` returns the loss −ELBO (or −IWAE_k).
    reduction : {"sum", "mean", "none"}
        How ``estimate`` reduces over the rows of x: sum or mean, or "none" for one value per
        row (summed here).
    num_draws : int
        Number of calls. The smallest offset the check detects shrinks like 1/√num_draws.
    false_alarm : float
        Probability that a correct estimator fails, split evenly between the value test and
        the gradient test, and within the gradient test evenly between coordinates
        (Bonferroni). Thresholds are Student-t quantiles with num_draws − 1 degrees of
        freedom, and each standard error is at least the reparameterised estimator's (Notes).
        Measured on a correct estimator with skewed per-row gradients (scripts/
        checker_false_alarm.py, docs page "Check your ELBO"), the rate stays below the stated
        one; an estimator that varies much more than the reparameterised one and is skewed
        is not covered by the floor, and for it the probability holds only as num_draws grows.
    seed : int
        Seeds torch's global generator for the draws, and the reference draws (k > 1).
    check_gradient : bool
        Also compare the mean gradient of the estimate with respect to every checked parameter
        with the exact gradient: the only way to see an estimator that samples z without the
        reparameterisation (its value is right; its gradient with respect to q's parameters
        averages to the score function's mean, zero).

    Returns
    -------
    ELBOCheck
        ``passed``, the numbers behind it and, when it failed, the diagnosis: which common
        mistake (a dropped ½ log 2π, a reduction, a sign, …) the exact numbers fit.

    Notes
    -----
    With the draws' mean m̄, sample standard error s, the reparameterised estimator's standard
    error σ/√n (σ from 1000 draws of it) and target τ (with Monte Carlo error s_τ for k > 1),
    the value fails when

    .. math::
        |Z| = \frac{|\bar m - \tau|}{\sqrt{\max(s, \sigma/\sqrt n)^2 + s_\tau^2 + r^2}}
        > t_{n-1}(1 - \alpha/4)

    (α/2 in place of α/4 when the gradient is not checked), where r = (N + n)·ϵ·M allows for
    rounding (ϵ: the machine epsilon; n: the model's term count, D + K for the
    linear-Gaussian model; M: the sum of the magnitudes of the reconstruction and KL terms;
    it matters only for estimators with no variance at all, such as a correct log-weight
    estimator with the exact posterior as q). Each gradient coordinate is tested the same way,
    with its own σ, at α/4 divided by the number of coordinates.
    """
    if not callable(estimate):
        raise TypeError(f"estimate must be a function x -> estimate, got {describe(estimate)}")
    if not (callable(model) or isinstance(model, ConjugateModel)):
        raise TypeError(
            "model must be a function that builds the exact model from your parameters (e.g. "
            "lambda: toyvae.LinearGaussian(dec.weight, dec.bias, dec.log_var.exp())) or a "
            f"toyvae.ConjugateModel, got {describe(model)}"
        )
    if not callable(q) and not hasattr(q, "log_prob") and not hasattr(q, "to_multivariate_normal"):
        raise TypeError(
            "q must be a function x -> q(z|x) (e.g. lambda x: Independent(Normal(*enc(x)), 1)), "
            f"got {describe(q)}"
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch tensor, got {describe(x)}")
    _check_options(k, loss, reduction, num_draws, false_alarm, seed, check_gradient)
    return _check(
        estimate, model, q, x, parameters, k, loss, reduction, num_draws, false_alarm, seed,
        check_gradient,
    )  # fmt: skip


def _resolve(estimate, model_fn, q_fn, x, parameters, names=None) -> Parameters:
    with torch.enable_grad():
        model, q = _build(model_fn, q_fn, x)
        try:
            bound, _, _ = check_call(model, x, q)
        except (TypeError, ValueError) as error:
            raise type(error)(f"model() and q(x) must describe x: {error}") from error
        gq = as_gaussian(q, "q")
        model_out = bound.exact(x).log_evidence
    functions = {"estimate": estimate, "model": model_fn, "q": q_fn}
    return resolve_parameters(
        parameters, functions, [model_out], [gq.loc, gq.scale_tril], names=names
    )


def _check(
    estimate, model_fn, q_fn, x, parameters, k, loss, reduction, num_draws, false_alarm, seed,
    check_gradient, *, scale=1.0, draw=None, names=None, extra=None,
) -> ELBOCheck:  # fmt: skip
    """The check. ``draw(params, check_gradient) -> (value, flat gradient or None)`` replaces
    autograd through ``estimate(x)`` (for code that only accumulates ``.grad``, as Pyro's
    ``loss_and_grads``); ``extra(mean, se, threshold, target) -> (names, lines)`` adds
    diagnoses; ``scale`` multiplies the target (a loss scaled by ``poutine.scale``)."""
    found = _resolve(estimate, model_fn, q_fn, x, parameters, names)
    checked = found.checked
    params = [p.tensor for p in checked]
    sign = (-1.0 if loss else 1.0) * scale
    target = _exact_target(
        model_fn, q_fn, x, params, k, reduction, sign, num_draws, seed, check_gradient
    )
    bound = target.terms.model
    batch = x.shape[: x.ndim - len(bound.data_event_shape)]

    values, gradients = [], []
    with _seeded_global_generator(seed, x.device), torch.enable_grad():
        for _ in range(num_draws):
            if draw is None:
                value = _as_value(estimate(x), reduction, batch)
                if check_gradient:
                    gradients.append(_flat_gradient(value, params))
            else:
                value, gradient = draw(params, check_gradient)
                if check_gradient:
                    gradients.append(gradient)
            values.append(value.detach().to(target.value.dtype))
    values = torch.stack(values)
    # The coarser of the model's dtype and the estimator's (that of its last draw).
    eps = max(torch.finfo(target.value.dtype).eps, torch.finfo(value.dtype).eps)
    # A floating-point sum of n terms is off by at most n·ε·Σ|terms| (Higham §4.2); the
    # estimate sums N rows of (for the linear-Gaussian model) D + K elementwise terms.
    rows = batch.numel()
    unit = (rows + bound.term_count) * eps

    root = math.sqrt(num_draws)
    mean, se, spread, z = _z_scores(
        values,
        target.value,
        target.value_se,
        unit * target.magnitude,
        target.value_sd.to(values.dtype) / root,
    )
    alpha = false_alarm / 2 if check_gradient else false_alarm
    threshold = float(scipy.stats.t.isf(alpha / 2, num_draws - 1))
    finite = bool(torch.isfinite(values).all())
    value_ok = finite and abs(float(z)) <= threshold

    grad_ok = grad_z = grad_name = grad_line = None
    diagnosis: list[str] = []
    diagnosis_lines: list[str] = []
    if check_gradient and params:
        gradients = torch.stack(gradients).to(target.gradient.dtype)
        scale = gradients.abs().mean(0) + target.gradient.abs()
        g_mean, g_se, _, g_z = _z_scores(
            gradients, target.gradient, target.gradient_se, unit * scale,
            target.gradient_sd.to(gradients.dtype) / root,
        )  # fmt: skip
        g_threshold = float(scipy.stats.t.isf(false_alarm / 4 / len(g_z), num_draws - 1))
        g_finite = bool(torch.isfinite(gradients).all())
        worst = int(torch.nan_to_num(g_z.abs(), nan=math.inf).argmax())
        grad_name, _ = _coordinate(checked, worst)
        grad_z = float(g_z[worst])
        grad_ok = g_finite and bool((g_z.abs() <= g_threshold).all())
        grad_line = _gradient_line(
            grad_ok, g_finite, grad_z, grad_name, float(g_mean[worst]), float(g_se[worst]),
            float(target.gradient[worst]), k, g_threshold, len(g_z),
        )  # fmt: skip
        if not grad_ok and g_finite:
            names, lines = _gradient_diagnosis(
                checked, g_z, g_threshold, gradients, target, unit, value_ok
            )
            diagnosis += names
            diagnosis_lines += lines
    elif check_gradient:
        grad_ok = True
        grad_line = "  gradient: no parameter requires grad: nothing to check"

    if not finite:
        direction = "not finite"
    elif value_ok:
        direction = "consistent"
    else:
        direction = "too high" if float(mean) > float(target.value) else "too low"
    passed = value_ok and grad_ok is not False
    if finite and not value_ok:
        fits = value_explanations(
            target.terms,
            mean=float(mean),
            standard_error=float(se),
            target=float(target.value),
            target_se=float(target.value_se),
            threshold=threshold,
            rounding_unit=unit,
            magnitude=float(target.magnitude),
            sign=sign,
            reduction=reduction,
            loss=loss,
            k=k,
        )
        if grad_ok is False:
            # A constant offset leaves the gradient right: when the gradient is wrong too, an
            # explanation that also changes the gradient is preferred, if one fits.
            moving = tuple(e for e in fits if e.name not in _GRADIENT_NEUTRAL)
            fits = moving or fits
        value_lines = _value_diagnosis_lines(fits, threshold)
        diagnosis = [e.name for e in fits] + diagnosis
        if extra is not None:
            more_names, more_lines = extra(float(mean), float(se), threshold, float(target.value))
            if more_names:
                diagnosis = more_names + diagnosis
                value_lines = more_lines + (value_lines if fits else [])
        diagnosis_lines = value_lines + diagnosis_lines
    report = dict(
        passed=passed,
        mean=float(mean),
        standard_error=float(se),
        exact=float(target.value),
        exact_standard_error=float(target.value_se),
        difference=float(mean - target.value),
        z=float(z),
        threshold=threshold,
        direction=direction,
        gradient_passed=grad_ok,
        gradient_z=grad_z,
        gradient_parameter=grad_name,
        num_draws=num_draws,
    )
    n_bad = int((~torch.isfinite(values)).sum())
    reach = threshold * float(spread)
    message = _message(
        report, k, loss, reduction, rows, false_alarm, target.bounds, grad_line, n_bad, reach,
        found.frozen, diagnosis_lines, float(target.value_sd) / root,
    )  # fmt: skip
    return ELBOCheck(
        **report,
        message=message,
        diagnosis=tuple(dict.fromkeys(diagnosis)),
        frozen=found.frozen,
    )


def _value_diagnosis_lines(fits, threshold: float) -> list[str]:
    if not fits:
        return [
            "  diagnosis: none of the common mistakes fits exactly (checked: sign, reduction, "
            "dropped ½ log 2π, KL sign/averaging/log-det, variance as standard deviation, "
            "mixed batch reductions, IWAE's log k)"
        ]
    lines = []
    for i, e in enumerate(fits):
        lead = "  diagnosis: " if i == 0 else "  or:        "
        lines.append(f"{lead}{e.text} (mean {e.expected:.6g} predicted, z = {_z_text(e.z)})")
    if len(fits) > 1:
        lines.append(f"  ({len(fits)} explanations fit within |z| ≤ {threshold:.2f}: more draws "
                     "would tell them apart)")  # fmt: skip
    return lines


def _group_of(p: Parameter) -> str:
    """The module a parameter belongs to, by its name: ``enc`` for ``enc.mean.weight``."""
    return p.name.split(".")[0].split("[")[0] if "." in p.name else p.name


def _gradient_diagnosis(checked, g_z, g_threshold, gradients, target, unit, value_ok):
    """Which parameter groups fail, and whether q's failure is that of a detached sample."""
    sizes = [p.tensor.numel() for p in checked]
    bad = (g_z.abs() > g_threshold).split(sizes)
    groups: dict[str, list[int]] = {}
    for p, b in zip(checked, bad, strict=True):
        count = groups.setdefault(_group_of(p), [0, 0])
        count[0] += int(b.sum())
        count[1] += b.numel()
    failing = [f"{name} ({n} of {total} coordinates)" for name, (n, total) in groups.items() if n]
    passing = [name for name, (n, _) in groups.items() if not n]
    lines = [
        "  gradient diagnosis: wrong in " + ", ".join(failing)
        + (f"; right in {', '.join(passing)}" if passing else "")
    ]  # fmt: skip
    names = []
    unused = [p.name for p, b in zip(checked, bad, strict=True) if p.group == "neither" and b.any()]
    if unused:
        names.append("parameter_not_in_model")
        lines.append(
            f"    neither model() nor q(x) depends on {', '.join(unused)}, but your estimate "
            "does: the model and q you gave do not describe your code"
        )
    in_q = torch.cat(
        [torch.full((p.tensor.numel(),), p.group == "q", dtype=torch.bool) for p in checked]
    ).to(g_z.device)
    failing_q = bool(((g_z.abs() > g_threshold) & in_q).any())
    failing_other = bool(((g_z.abs() > g_threshold) & ~in_q).any())
    if failing_q and not failing_other and bool(in_q.any()):
        n = gradients.shape[0]
        g_mean = gradients.mean(0)
        g_se = gradients.std(0) / math.sqrt(n)
        for hypothesis, expected in (
            ("zero", torch.zeros_like(g_mean)),
            ("minus the KL's gradient", target.kl_gradient.to(g_mean.dtype)),
        ):
            rounding = unit * (gradients.abs().mean(0) + expected.abs())
            spread = (
                (g_se.square() + rounding.square()).sqrt().clamp_min(torch.finfo(g_mean.dtype).tiny)
            )
            z = ((g_mean - expected) / spread)[in_q]
            exact_q = target.gradient[in_q].abs()
            separated = bool((exact_q / spread[in_q] > 2 * g_threshold).any())
            if separated and bool((z.abs() <= g_threshold).all()):
                names.append("detached_sample")
                form = (
                    "the score function's mean, as a log-weight estimate with a detached z gives"
                    if hypothesis == "zero"
                    else "what an analytic-KL estimate with a detached z gives"
                )
                lines.append(
                    f"    the gradient with respect to q's parameters averages to {hypothesis} "
                    f"({form}): z is cut off from q (q.sample(), z.detach(), or sampling under "
                    "torch.no_grad()); draw it with q.rsample() or mean + std · ε"
                )
                break
        else:
            lines.append("    only q's parameters are wrong, but not as a detached sample would be")
    return names, lines


def _z_scores(samples, target, target_se, rounding, floor):
    """Mean, standard error, the z-test's denominator and z of ``samples`` (n, ...); the
    standard error enters the denominator as at least ``floor``, the reparameterised
    estimator's."""
    n = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(n)
    spread = (torch.maximum(se, floor).square() + target_se.square() + rounding.square()).sqrt()
    spread = spread.clamp_min(torch.finfo(samples.dtype).tiny)
    return mean, se, spread, (mean - target) / spread


def _what(k: int, loss: bool) -> str:
    bound = "ELBO" if k == 1 else f"IWAE_{k}"
    return f"loss −{bound}" if loss else bound


def _gradient_line(ok, finite, z, name, mean, se, exact, k, threshold, count) -> str:
    source = "exact" if k == 1 else "reference"
    if not finite:
        return "  gradient: NOT FINITE (NaN or inf in some draws)"
    if ok:
        return (
            f"  gradient: consistent with the {source} gradient in all {count} coordinates "
            f"(largest |z| = {abs(z):.1f}, at {name}; |z| > {threshold:.2f} fails)"
        )
    return (
        f"  gradient: WRONG: ∂estimate/∂{name} averages {mean:.4g} ± {se:.2g}, the {source} "
        f"gradient is {exact:.4g} (z = {_z_text(z)}; |z| > {threshold:.2f} fails)"
    )


def _z_text(z: float) -> str:
    return f"{z:+.1f}" if abs(z) < 1e4 else f"{z:+.2e}"


def _message(
    r, k, loss, reduction, rows, false_alarm, bounds, grad_line, n_bad, reach, frozen=(),
    diagnosis_lines=(), floor=0.0,
) -> str:  # fmt: skip
    what = _what(k, loss)
    exact_name = f"exact {what}" if k == 1 else f"reference {what}"
    verdict = "passed" if r["passed"] else "FAILED"
    over = f"the {rows} rows of x"
    how = {"sum": f"summed over {over}", "mean": f"averaged over {over}"}.get(
        reduction, f"one per row, summed over {over}"
    )
    lines = [f"{what} estimator check: {verdict} (false-alarm probability {false_alarm:.0e})"]
    if r["direction"] == "not finite":
        lines.append(f"  value: NOT FINITE in {n_bad} of {r['num_draws']} draws (NaN or inf)")
    elif r["direction"] == "consistent":
        lines.append(
            f"  value: consistent with the {exact_name}: off by {r['difference']:+.3g} nats "
            f"(z = {_z_text(r['z'])}); offsets beyond ±{reach:.2g} nats would fail"
        )
    else:
        side = "above" if r["direction"] == "too high" else "below"
        lines.append(
            f"  value: the estimate is {abs(r['difference']):.3g} nats {side} the "
            f"{exact_name} (z = {_z_text(r['z'])}; |z| > {r['threshold']:.2f} fails): "
            f"{r['direction']}"
        )
    lines.append(
        f"    estimate  {r['mean']:.6g} ± {r['standard_error']:.2g}"
        f"   mean ± standard error of {r['num_draws']} draws"
        + (f", floor {floor:.2g}" if floor > r["standard_error"] else "")
    )
    if k == 1:
        lines.append(f"    exact     {r['exact']:.6g}   {how}")
    else:
        lines.append(
            f"    reference {r['exact']:.6g} ± {r['exact_standard_error']:.2g}   exact ELBO + "
            f"Monte Carlo gap, {how}"
        )
        low, high = sorted(bounds)
        names = ("log p(x)", "ELBO") if loss else ("ELBO", "log p(x)")
        sign = "−" if loss else ""
        lines.append(
            f"    bounds    {sign}{names[0]} = {low:.6g} ≤ {what} ≤ {sign}{names[1]} = {high:.6g}"
            " (exact)"
        )
    if frozen:
        lines.append(f"  not checked (requires_grad=False): {', '.join(frozen)}")
    if grad_line is not None:
        lines.append(grad_line)
    lines.extend(diagnosis_lines)
    return "\n".join(lines)


def assert_elbo_estimator(
    estimator: Callable, vae: LinearVAE | None = None, **options
) -> ELBOCheck:
    """Like :func:`check_elbo_estimator`, for pytest: raise ``AssertionError`` with the report.

    Returns the :class:`ELBOCheck` when the estimator passes.
    """
    check = check_elbo_estimator(estimator, vae, **options)
    if not check.passed:
        raise AssertionError(check.message)
    return check


def assert_elbo(estimate: Callable, model, q, x, **options) -> ELBOCheck:
    """Like :func:`check_elbo`, for pytest: raise ``AssertionError`` whose message is the report
    and its diagnosis. Returns the :class:`ELBOCheck` when the estimate passes."""
    check = check_elbo(estimate, model, q, x, **options)
    if not check.passed:
        raise AssertionError(check.message)
    return check
