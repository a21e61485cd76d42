r"""Pyro: a model and guide from a toyvae model, and a check of the user's own Pyro model and guide.

Needs the optional extra (``pip install toyvae[pyro]``, pyro-ppl from PyPI).

- :func:`model_and_guide` builds a Pyro model and guide from a function that builds a
  :class:`toyvae.LinearGaussian` and one that gives q for a batch, with a data plate (optionally
  subsampled).
- :func:`check_pyro_elbo` checks the user's own model and guide with any Pyro ELBO:
  ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``, ``JitTrace_ELBO`` (any
  ``num_particles``: their average estimates the ELBO) and ``RenyiELBO(alpha=0,
  num_particles=k)``, Pyro's IWAE_k. Pyro's conventions are handled here: its loss is −ELBO
  summed over the plate (a subsampled plate is scaled by N/b, so the target stays the full-data
  sum); ``poutine.scale(…, scale=s)`` is stated with ``scale=s``; an ELBO without
  ``differentiable_loss`` (``RenyiELBO``, ``TraceGraph_ELBO``) is differentiated through its
  ``loss_and_grads``, reading the ``.grad`` it accumulates.

A known trap, flagged with its own diagnosis: ``RenyiELBO`` sums the log weights over every
dimension not declared by a ``pyro.plate``, so without a data plate it computes *one* joint
IWAE over the whole batch, log (1/k) Σ_i Π_n w_{i,n}: a looser bound than Σ_n IWAE_k(x_n).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

try:
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import RenyiELBO
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "toyvae.interop.pyro needs Pyro: pip install 'toyvae[pyro]' (pyro-ppl)"
    ) from error

from toyvae._checks import describe
from toyvae.bounds import check_call
from toyvae.estimators import log_weights_at
from toyvae.model import LinearGaussian
from toyvae.testing.check import (
    _REFERENCE_SEED_OFFSET,
    DEFAULT_NUM_DRAWS,
    ELBOCheck,
    _build,
    _check,
    _check_options,
    _seeded_global_generator,
)

__all__ = ["assert_pyro_elbo", "check_pyro_elbo", "model_and_guide"]


def _pyro_distribution(d):
    """A torch Gaussian (MultivariateNormal or Independent(Normal, 1)) as a Pyro distribution."""
    if isinstance(d, torch.distributions.Independent) and isinstance(
        d.base_dist, torch.distributions.Normal
    ):
        return dist.Normal(d.base_dist.loc, d.base_dist.scale).to_event(d.reinterpreted_batch_ndims)
    if isinstance(d, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(d.loc, scale_tril=d.scale_tril)
    raise TypeError(
        f"q must return a MultivariateNormal or an Independent(Normal, 1), got {describe(d)}"
    )


def model_and_guide(
    model: Callable[[], LinearGaussian],
    q: Callable[[torch.Tensor], torch.distributions.Distribution],
    *,
    subsample_size: int | None = None,
) -> tuple[Callable, Callable]:
    """A Pyro model and guide, each called with the data x (N, D), from toyvae's pieces.

    ``model()`` builds a :class:`toyvae.LinearGaussian` (from ``pyro.param`` values or module
    parameters); ``q(x)`` returns q(z|x) for a batch. Both run inside ``pyro.plate("data", N,
    subsample_size=subsample_size)``, so Pyro's loss is −ELBO summed over the rows (scaled by
    N/b when subsampled). The latent site is ``"z"``, the observed one ``"x"``. Parameters of
    plain modules are not registered with Pyro: check with ``via="differentiable_loss"``, or
    register them (``pyro.module``) for ``loss_and_grads`` and ``SVI``.
    """
    if subsample_size is not None and (
        isinstance(subsample_size, bool)
        or not isinstance(subsample_size, int)
        or subsample_size < 1
    ):
        raise ValueError(
            f"subsample_size must be a positive integer or None, got {describe(subsample_size)}"
        )

    def pyro_model(x):
        m = model()
        if not isinstance(m, LinearGaussian):
            raise TypeError(f"model() must return a toyvae.LinearGaussian, got {describe(m)}")
        prior = m.prior()
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as rows:
            batch = x[rows]
            z = pyro.sample(
                "z",
                dist.MultivariateNormal(prior.loc, scale_tril=prior.scale_tril).expand(
                    batch.shape[:-1]
                ),
            )
            pyro.sample("x", _pyro_distribution(m.likelihood(z)), obs=batch)

    def pyro_guide(x):
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as rows:
            pyro.sample("z", _pyro_distribution(q(x[rows])))

    return pyro_model, pyro_guide


def _has_plate(model, args, kwargs) -> bool:
    """Whether any sample site of one trace of ``model`` lies inside a ``pyro.plate``."""
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    return any(
        site["type"] == "sample" and site["cond_indep_stack"] for site in trace.nodes.values()
    )


def _joint_iwae(model_fn, q_fn, x, k, scale, num_draws, seed):
    """The mean of one joint IWAE_k over the whole batch, Σ_n log w summed before the log-mean,
    in Pyro's units (−scale × it), with its Monte Carlo standard error."""
    generator = torch.Generator(device=x.device).manual_seed(seed + _REFERENCE_SEED_OFFSET + 1)
    draws = []
    with torch.no_grad():
        model, q = _build(model_fn, q_fn, x)
        bound = check_call(model, x, q)[0]
        for _ in range(16):
            eps = torch.randn(
                (num_draws, k, x.shape[0], bound.latent_dim),
                generator=generator,
                dtype=x.dtype,
                device=x.device,
            )
            joint = log_weights_at(model, x, q, eps).sum(-1)  # (draws, k)
            draws.append(torch.logsumexp(joint, 1) - math.log(k))
    draws = torch.cat(draws)
    mean = -scale * float(draws.mean())
    return mean, scale * float(draws.std()) / math.sqrt(draws.numel())


def _observed_scale(model, args, kwargs, seed, device) -> tuple[float, int]:
    """The scale Pyro applies to the observed site (poutine.scale × N/b), and its rows b."""
    with _seeded_global_generator(seed, device):
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    for site in trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            value = site["value"]
            event = len(site["fn"].event_shape)
            rows = math.prod(value.shape[: value.ndim - event]) if value.ndim > event else 1
            return float(site["scale"]), int(rows)
    return 1.0, 1


def _tempered_iwae(model_fn, q_fn, x, k, t, rows, seed):
    """What RenyiELBO(alpha=0) estimates when each site carries the scale t (t = scale·N/b),
    by vectorised draws, with its standard error: −Σ_n E[log (1/k) Σ_i w_i,n^t] without
    subsampling; with a subsample of b < N rows, −b·E[log (1/k) Σ_i w_i,n_i^t] with n_i
    independent uniform rows, one per particle (each particle draws its own subsample)."""
    generator = torch.Generator(device=x.device).manual_seed(seed + _REFERENCE_SEED_OFFSET + 2)
    with torch.no_grad():
        model, q = _build(model_fn, q_fn, x)
        bound = check_call(model, x, q)[0]
        eps = torch.randn(
            (4096, k, x.shape[0], bound.latent_dim),
            generator=generator,
            dtype=x.dtype,
            device=x.device,
        )
        log_w = log_weights_at(model, x, q, eps)  # (draws, k, N)
        n = x.shape[0]
        if rows < n:
            # Each particle runs the guide and model afresh and draws its own subsample, so
            # slot j of particle i holds a uniformly random row n_i, independently over i.
            picked = torch.randint(0, n, (log_w.shape[0], k, 1), generator=generator)
            log_w = log_w.gather(2, picked.to(log_w.device))  # (draws, k, 1)
            draws = -rows * (torch.logsumexp(t * log_w, 1) - math.log(k)).squeeze(-1)
        else:
            per_row = torch.logsumexp(t * log_w, 1) - math.log(k)  # (draws, N)
            draws = -per_row.sum(-1)
    return float(draws.mean()), float(draws.std()) / math.sqrt(draws.numel())


def check_pyro_elbo(
    elbo,
    model: Callable,
    guide: Callable,
    *args,
    exact_model,
    q,
    x: torch.Tensor | None = None,
    parameters=None,
    scale: float = 1.0,
    num_draws: int = DEFAULT_NUM_DRAWS,
    false_alarm: float = 1e-6,
    seed: int = 0,
    check_gradient: bool = True,
    via: str = "loss_and_grads",
    **kwargs,
) -> ELBOCheck:
    r"""Check a Pyro ELBO on the user's own model and guide against toyvae's exact answers.

    Parameters
    ----------
    elbo : pyro.infer.ELBO
        ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``, ``JitTrace_ELBO`` (target:
        the ELBO, whatever ``num_particles``), or ``RenyiELBO(alpha=0, num_particles=k)``
        (target: IWAE_k).
    model, guide : callable
        The user's Pyro model and guide; called as ``model(*args, **kwargs)``.
    exact_model : callable
        Builds the exact toyvae model from the user's parameters, e.g.
        ``lambda: toyvae.LinearGaussian(pyro.param("W"), pyro.param("b"), pyro.param("psi"))``.
    q : callable
        ``q(x)`` returns the guide's q(z|x) for the full batch, as a torch distribution.
    x : tensor, optional
        The full data set; ``args[0]`` by default.
    parameters : optional
        As for :func:`toyvae.testing.check_elbo`; by default every leaf the exact answers
        depend on, named after Pyro's param store where it holds them.
    scale : float
        The factor of ``poutine.scale`` around the model and guide (1 without one).
    num_draws, false_alarm, seed, check_gradient
        As for :func:`toyvae.testing.check_elbo`.
    via : {"loss_and_grads", "differentiable_loss"}
        How the gradient is taken: the ``.grad`` that ``elbo.loss_and_grads`` accumulates (what
        ``pyro.infer.SVI`` uses), or autograd through ``elbo.differentiable_loss`` (what a
        custom training loop uses; not every ELBO has it). ``loss_and_grads`` reaches only the
        parameters Pyro knows (``pyro.param``, ``pyro.module``, ``PyroModule``).

    Returns
    -------
    ELBOCheck
        In Pyro's units: the loss, −scale × ELBO (or IWAE_k) summed over the data.
    """
    if not all(hasattr(elbo, name) for name in ("loss", "loss_and_grads")):
        raise TypeError(f"elbo must be a pyro.infer ELBO instance, got {describe(elbo)}")
    if not (callable(model) and callable(guide)):
        raise TypeError(
            f"model and guide must be callables, got {describe(model)} and {describe(guide)}"
        )
    x = args[0] if x is None and args else x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be the data as a torch tensor (or args[0]), got {describe(x)}")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {describe(scale)}")
    k = 1
    if isinstance(elbo, RenyiELBO):
        if elbo.alpha != 0:
            raise ValueError(
                f"elbo: only RenyiELBO(alpha=0) (IWAE) has an exact target here, got alpha = "
                f"{elbo.alpha}"
            )
        k = elbo.num_particles
    _check_options(k, True, "sum", num_draws, false_alarm, seed, check_gradient)

    with _seeded_global_generator(seed, x.device):  # first calls create the params
        guide(*args, **kwargs)
        plated = _has_plate(model, args, kwargs)
    store = pyro.get_param_store()
    names = {id(t): name for name, t in store.named_parameters()}
    if via not in ("loss_and_grads", "differentiable_loss"):
        raise ValueError(f"via must be 'loss_and_grads' or 'differentiable_loss', got {via!r}")
    use_autograd = via == "differentiable_loss"
    if use_autograd and not hasattr(elbo, "differentiable_loss"):
        raise ValueError(
            f"via: {type(elbo).__name__} has no differentiable_loss; use via='loss_and_grads'"
        )
    site_scale, rows = _observed_scale(model, args, kwargs, seed, x.device)

    def estimate(_x):
        return elbo.differentiable_loss(model, guide, *args, **kwargs)

    def draw(params, check_gradient):
        if use_autograd:
            with torch.enable_grad():
                value = estimate(x)
                if not check_gradient:
                    return value.detach(), None
                grads = torch.autograd.grad(value, params, allow_unused=True)
        else:
            for p in params:
                p.grad = None
            if check_gradient:
                value = elbo.loss_and_grads(model, guide, *args, **kwargs)
            else:
                value = elbo.loss(model, guide, *args, **kwargs)
            grads = [p.grad for p in params]
            for p in params:
                p.grad = None
        flat = None
        if check_gradient:
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
                or [torch.zeros(0, dtype=x.dtype, device=x.device)]
            )
        value = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(())
        return value, flat

    extra = None
    if k > 1 and plated and site_scale != 1.0:

        def extra(mean, se, threshold, target):
            tempered, tempered_se = _tempered_iwae(exact_model, q, x, k, site_scale, rows, seed)
            z = (mean - tempered) / math.sqrt(se**2 + tempered_se**2)
            if abs(z) > threshold:
                return [], []
            return ["renyi_scale_inside_log"], [
                f"  diagnosis: RenyiELBO applies each site's scale t = {site_scale:.4g} "
                "(poutine.scale, or N/b from a subsampled plate) to the log weights inside the "
                "log-mean-exp"
                + (
                    ", and each particle draws its own subsample, so one log-mean-exp mixes "
                    "weights of different data points"
                    if rows < x.shape[0]
                    else ""
                )
                + f" (mean {tempered:.6g} ± {tempered_se:.2g} predicted, z = {z:+.1f}): it "
                f"does not estimate t·IWAE_{k}. With RenyiELBO, neither subsample nor scale"
            ]

    elif k > 1 and not plated:

        def extra(mean, se, threshold, target):
            joint, joint_se = _joint_iwae(exact_model, q, x, k, scale, num_draws, seed)
            z = (mean - joint) / math.sqrt(se**2 + joint_se**2)
            if abs(z) > threshold:
                return [], []
            return ["renyi_without_plate"], [
                "  diagnosis: RenyiELBO without a data plate computes one joint IWAE over the "
                f"whole batch, log (1/k) Σ_i Π_n w_i,n (mean {joint:.6g} ± {joint_se:.2g} "
                f"predicted, z = {z:+.1f}): a looser bound than Σ_n IWAE_{k}(x_n). Put the "
                "data in a pyro.plate (in the model and in the guide)"
            ]

    return _check(
        estimate, exact_model, q, x, parameters, k, True, "sum", num_draws, false_alarm, seed,
        check_gradient, scale=float(scale), draw=draw, names=names, extra=extra,
    )  # fmt: skip


def assert_pyro_elbo(elbo, model, guide, *args, **options) -> ELBOCheck:
    """Like :func:`check_pyro_elbo`, for pytest: raise ``AssertionError`` with the report."""
    check = check_pyro_elbo(elbo, model, guide, *args, **options)
    if not check.passed:
        raise AssertionError(check.message)
    return check
