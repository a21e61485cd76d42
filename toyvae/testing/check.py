r"""Check a user's ELBO, IWAE_k or loss estimator against the exact answer of a linear VAE.

The estimator is drawn ``num_draws`` times; its mean is compared with the exact target by a
z-test whose standard error comes from the draws themselves (the estimator's variance is the
user's business: an analytic KL or more samples lower it, and that is no bug). Its gradient
with respect to every encoder and decoder parameter is compared the same way with the exact
gradient, coordinate by coordinate: that is what catches an estimator with the right value
but no reparameterisation.

Targets, for a batch x of N rows and the reduction the user states:

- k = 1: the exact ELBO, ``toyvae.elbo(decoder.model(), x, encoder(x))``, and its gradient
  by autograd.
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

from toyvae._checks import describe
from toyvae.bounds import elbo, expected_log_likelihood, kl_to_prior
from toyvae.estimators import log_weights_at
from toyvae.testing.vae import LinearVAE, linear_vae

__all__ = ["DEFAULT_NUM_DRAWS", "ELBOCheck", "assert_elbo_estimator", "check_elbo_estimator"]

DEFAULT_NUM_DRAWS = 200
# The reference for k > 1 uses this many times num_draws draws of the gap, in this many batches
# (the batches give the reference gradient's standard error).
_REFERENCE_FACTOR = 16
_REFERENCE_BATCHES = 64
# The reference's random stream must be independent of the one the estimator gets.
_REFERENCE_SEED_OFFSET = 0x5EED_0F_1A7E


class ELBOCheck(NamedTuple):
    """The verdict of :func:`check_elbo_estimator`; ``str(check)`` is the report.

    Values are in the user's units: the stated reduction over x's rows, and −ELBO for a loss.
    ``z`` = difference / √(standard_error² + exact_standard_error² + rounding²).
    """

    passed: bool
    mean: float  # mean of the estimator's draws
    standard_error: float  # of that mean, from the draws' sample variance
    exact: float  # the target: exact ELBO (k = 1) or the IWAE_k reference (k > 1)
    exact_standard_error: float  # 0 for k = 1; the reference's Monte Carlo error for k > 1
    difference: float  # mean − exact
    z: float
    threshold: float  # |z| above this fails
    direction: str  # "consistent", "too high", "too low" or "not finite"
    gradient_passed: bool | None  # None when the gradient was not checked
    gradient_z: float | None  # the largest |z| over gradient coordinates, with its sign
    gradient_parameter: str | None  # the coordinate where it occurs, e.g. "encoder.mean.bias[1]"
    num_draws: int
    message: str

    def __str__(self) -> str:
        return self.message


class _Target(NamedTuple):
    value: torch.Tensor  # 0-d
    value_se: torch.Tensor  # 0-d
    gradient: torch.Tensor  # (P,)
    gradient_se: torch.Tensor  # (P,)
    bounds: tuple[float, float] | None  # reduced (ELBO, log p(x)), in the user's sign
    magnitude: torch.Tensor  # Σ of |terms| of the exact value, for the rounding allowance


def _reduce(per_example: torch.Tensor, reduction: str, sign: float) -> torch.Tensor:
    total = per_example.mean() if reduction == "mean" else per_example.sum()
    return sign * total


def _flat_gradient(output: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∂output/∂params flattened; parameters the output does not depend on get zeros."""
    if not output.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(output, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _exact_target(vae, params, k, reduction, sign, num_draws, seed) -> _Target:
    encoder, decoder, x = vae
    with torch.enable_grad():
        model, q = decoder.model(), encoder(x)
        exact_elbo = elbo(model, x, q)
        value = _reduce(exact_elbo, reduction, sign)
        gradient = _flat_gradient(value, params)
    with torch.no_grad():
        magnitude = _reduce(
            expected_log_likelihood(model, x, q).abs() + kl_to_prior(q), reduction, 1.0
        )
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    if k == 1:
        return _Target(value.detach(), zero, gradient, torch.zeros_like(gradient), None, magnitude)

    # L_k = ELBO + E[gap], gap = log mean_i w_i − mean_i log w_i ≥ 0, by vectorised draws.
    generator = torch.Generator(device=x.device).manual_seed(seed + _REFERENCE_SEED_OFFSET)
    per_batch = max(1, _REFERENCE_FACTOR * num_draws // _REFERENCE_BATCHES)
    gaps, gap_gradients = [], []
    for _ in range(_REFERENCE_BATCHES):
        with torch.enable_grad():
            model, q = decoder.model(), encoder(x)
            shape = (per_batch, k, *x.shape[:-1], model.latent_dim)
            eps = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
            log_w = log_weights_at(model, x, q, eps)  # (per_batch, k, *batch)
            gap = torch.logsumexp(log_w, 1) - math.log(k) - log_w.mean(1)
            gap = _reduce(gap.mean(0), reduction, sign)
            gap_gradients.append(_flat_gradient(gap, params))
        gaps.append(gap.detach())
    gaps, gap_gradients = torch.stack(gaps), torch.stack(gap_gradients)
    root = math.sqrt(_REFERENCE_BATCHES)
    with torch.no_grad():
        log_evidence = _reduce(model.log_evidence(x), reduction, sign)
    return _Target(
        value.detach() + gaps.mean(),
        gaps.std() / root,
        gradient + gap_gradients.mean(0),
        gap_gradients.std(0) / root,
        (float(value.detach()), float(log_evidence)),
        magnitude + math.log(k),
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


def _parameter_name(named: list[tuple[str, torch.Tensor]], index: int) -> str:
    """The name of flat gradient coordinate ``index``, e.g. ``encoder.mean.weight[1, 4]``."""
    for name, p in named:
        if index < p.numel():
            where = np.unravel_index(index, tuple(p.shape)) if p.ndim else ()
            return f"{name}[{', '.join(str(int(i)) for i in where)}]" if p.ndim else name
        index -= p.numel()
    raise IndexError(index)


def _check_arguments(
    estimator, vae, k, loss, reduction, num_draws, false_alarm, seed, check_gradient
) -> None:
    if not callable(estimator):
        raise TypeError(
            f"estimator must be a function (x, encoder, decoder, generator) -> estimate, "
            f"got {describe(estimator)}"
        )
    if not isinstance(vae, LinearVAE):
        raise TypeError(
            f"vae must be a toyvae.testing.LinearVAE (encoder, decoder, x), got {describe(vae)}"
        )
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

    Parameters
    ----------
    estimator : callable
        ``estimator(x, encoder, decoder, generator)`` returns one draw of the estimate, a
        tensor. It must draw its noise from ``generator`` (a seeded ``torch.Generator``) or
        from torch's global generator, which is seeded here and restored afterwards.
    vae : LinearVAE, optional
        ``(encoder, decoder, x)``; by default :func:`linear_vae` ``()``: D = 6, K = 3, N = 32,
        float64, an encoder deliberately different from the exact posterior.
    k : int
        1 if ``estimator`` estimates the ELBO; k > 1 if it estimates the IWAE bound
        L_k = E log (1/k) Σ_{i≤k} p(x, z_i)/q(z_i|x).
    loss : bool
        True if ``estimator`` returns the loss −ELBO (or −IWAE_k) instead.
    reduction : {"sum", "mean", "none"}
        How ``estimator`` reduces over the rows of x: sum or mean, or "none" for one value
        per row (summed here).
    num_draws : int
        Number of calls. The smallest offset the check detects shrinks like 1/√num_draws.
    false_alarm : float
        Probability that a correct estimator fails, split evenly between the value test and
        the gradient test, and within the gradient test evenly between coordinates
        (Bonferroni). Thresholds are Student-t quantiles with num_draws − 1 degrees of
        freedom; the probability is exact as num_draws grows (central limit theorem) and
        approximate for heavy-tailed estimators at small num_draws.
    seed : int
        Seeds the generator handed to ``estimator`` and the reference draws.
    check_gradient : bool
        Also compare the mean gradient of the estimate with respect to every encoder and
        decoder parameter with the exact gradient. This is the only way to see an estimator
        that samples z without the reparameterisation: its value is right, but its gradient
        with respect to the encoder averages to the score function's mean, zero.

    Returns
    -------
    ELBOCheck
        ``passed`` and the numbers behind it; ``str()`` of it says by how much and in which
        direction the estimate is off.

    Notes
    -----
    With the draws' mean m̄, sample standard error s and target t (with Monte Carlo error
    s_t for k > 1), the value fails when

    .. math:: |z| = \frac{|\bar m - t|}{\sqrt{s^2 + s_t^2 + r^2}} > t_{n-1}(1 - \alpha/4)

    (α/2 in place of α/4 when the gradient is not checked),

    where r = (N + D + K)·ε·M allows for rounding (M: the sum of the magnitudes of the
    reconstruction and KL terms; it matters only for estimators with no variance at all,
    such as any correct one with the exact posterior as encoder).
    """
    vae = linear_vae() if vae is None else vae
    _check_arguments(
        estimator, vae, k, loss, reduction, num_draws, false_alarm, seed, check_gradient
    )
    encoder, decoder, x = vae
    named = [(f"encoder.{n}", p) for n, p in encoder.named_parameters()]
    named += [(f"decoder.{n}", p) for n, p in decoder.named_parameters()]
    params = [p for _, p in named]
    sign = -1.0 if loss else 1.0
    target = _exact_target(vae, params, k, reduction, sign, num_draws, seed)

    values, gradients = [], []
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with _seeded_global_generator(seed, x.device), torch.enable_grad():
        for _ in range(num_draws):
            value = _as_value(estimator(x, encoder, decoder, generator), reduction, x.shape[:-1])
            if check_gradient:
                gradients.append(_flat_gradient(value, params))
            values.append(value.detach().to(target.value.dtype))
    values = torch.stack(values)
    # The coarser of the model's dtype and the estimator's (that of its last draw).
    eps = max(torch.finfo(target.value.dtype).eps, torch.finfo(value.dtype).eps)
    # A floating-point sum of n terms is off by at most n·ε·Σ|terms| (Higham §4.2); the
    # estimate sums N rows of D + K elementwise terms.
    unit = (x.shape[:-1].numel() + x.shape[-1] + decoder.model().latent_dim) * eps

    mean, se, spread, z = _z_scores(values, target.value, target.value_se, unit * target.magnitude)
    alpha = false_alarm / 2 if check_gradient else false_alarm
    threshold = float(scipy.stats.t.isf(alpha / 2, num_draws - 1))
    finite = bool(torch.isfinite(values).all())
    value_ok = finite and abs(float(z)) <= threshold

    grad_ok = grad_z = grad_name = grad_line = None
    if check_gradient:
        gradients = torch.stack(gradients).to(target.gradient.dtype)
        scale = gradients.abs().mean(0) + target.gradient.abs()
        g_mean, g_se, _, g_z = _z_scores(
            gradients, target.gradient, target.gradient_se, unit * scale
        )
        g_threshold = float(scipy.stats.t.isf(false_alarm / 4 / len(g_z), num_draws - 1))
        g_finite = bool(torch.isfinite(gradients).all())
        worst = int(torch.nan_to_num(g_z.abs(), nan=math.inf).argmax())
        grad_z, grad_name = float(g_z[worst]), _parameter_name(named, worst)
        grad_ok = g_finite and bool((g_z.abs() <= g_threshold).all())
        grad_line = _gradient_line(
            grad_ok, g_finite, grad_z, grad_name, float(g_mean[worst]), float(g_se[worst]),
            float(target.gradient[worst]), k, g_threshold, len(g_z),
        )  # fmt: skip

    if not finite:
        direction = "not finite"
    elif value_ok:
        direction = "consistent"
    else:
        direction = "too high" if float(mean) > float(target.value) else "too low"
    passed = value_ok and grad_ok is not False
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
    rows = x.shape[:-1].numel()
    message = _message(
        report, k, loss, reduction, rows, false_alarm, target.bounds, grad_line, n_bad, reach
    )
    return ELBOCheck(**report, message=message)


def _z_scores(samples, target, target_se, rounding):
    """Mean, standard error, the z-test's denominator and z of ``samples`` (n, ...)."""
    n = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(n)
    spread = (se.square() + target_se.square() + rounding.square()).sqrt()
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


def _message(r, k, loss, reduction, rows, false_alarm, bounds, grad_line, n_bad, reach) -> str:
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
    if grad_line is not None:
        lines.append(grad_line)
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
