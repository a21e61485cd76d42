"""toyvae.interop.pyro: Pyro's ELBOs on a user's own model and guide, against the exact answers.

Skipped only when Pyro is not installed (``pip install toyvae[pyro]``); CI installs it. The
model and guide below are written as a Pyro user writes them (``pyro.param``, a data plate),
with the parameters of toyvae's default linear VAE, whose encoder is deliberately not the
exact posterior.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import scipy.stats
import seeds
import torch

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import (  # noqa: E402
    JitTrace_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from torch.distributions import Independent, Normal, constraints  # noqa: E402

import toyvae  # noqa: E402
from toyvae.estimators import log_weight_cumulants  # noqa: E402
from toyvae.interop.pyro import check_pyro_elbo, model_and_guide  # noqa: E402
from toyvae.testing import linear_vae, reconstruction_moments  # noqa: E402

Z_1E6 = float(scipy.stats.norm.isf(0.5e-6))
VAE = linear_vae()
N, D = VAE.x.shape
K = 3


def _initial():
    e, d = VAE.encoder, VAE.decoder
    with torch.no_grad():
        return {
            "W": d.mean.weight.clone(),
            "b": d.mean.bias.clone(),
            "psi": d.logvar.exp().clone(),
            "V": e.mean.weight.clone(),
            "c": e.mean.bias.clone(),
            "s": (0.5 * e.logvar.bias).exp().clone(),
        }


def _user(plate=True, subsample_size=None):
    """The user's model and guide, and the exact model and q they define."""
    init = _initial()

    def model(x):
        w, b = pyro.param("W", init["W"]), pyro.param("b", init["b"])
        psi = pyro.param("psi", init["psi"], constraint=constraints.positive)
        if not plate:
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], K), 1.0).to_event(2))
            pyro.sample("x", dist.Normal(z @ w.T + b, psi.sqrt()).to_event(2), obs=x)
            return
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as rows:
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, psi.sqrt()).to_event(1), obs=x[rows])

    def guide(x):
        v, c = pyro.param("V", init["V"]), pyro.param("c", init["c"])
        s = pyro.param("s", init["s"], constraint=constraints.positive)
        if not plate:
            pyro.sample("z", dist.Normal(x @ v.T + c, s).to_event(2))
            return
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as rows:
            pyro.sample("z", dist.Normal(x[rows] @ v.T + c, s).to_event(1))

    def exact_model():
        return toyvae.LinearGaussian(pyro.param("W"), pyro.param("b"), pyro.param("psi"))

    def q(x):
        return Independent(Normal(x @ pyro.param("V").T + pyro.param("c"), pyro.param("s")), 1)

    return model, guide, exact_model, q


@functools.cache
def _check(elbo_name, num_particles=1, plate=True, subsample_size=None, scale=1.0, **options):
    pyro.clear_param_store()
    model, guide, exact_model, q = _user(plate, subsample_size)
    if scale != 1.0:
        model, guide = poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale)
    classes = {
        "Trace_ELBO": Trace_ELBO,
        "TraceMeanField_ELBO": TraceMeanField_ELBO,
        "TraceGraph_ELBO": TraceGraph_ELBO,
        "JitTrace_ELBO": JitTrace_ELBO,
    }
    if elbo_name == "RenyiELBO":
        elbo = RenyiELBO(alpha=0, num_particles=num_particles)
    else:
        elbo = classes[elbo_name](num_particles=num_particles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JitTrace_ELBO's tracer warnings
        return check_pyro_elbo(
            elbo,
            model,
            guide,
            VAE.x,
            exact_model=exact_model,
            q=q,
            scale=scale,
            **{"seed": seeds.seed(0), **options},
        )


@pytest.mark.parametrize(
    "elbo", ["Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO", "JitTrace_ELBO"]
)
@pytest.mark.false_alarm(1e-6)  # the checker's own false alarm
def test_pyro_elbos_pass_on_a_correct_model_and_guide(elbo):
    """Each of Pyro's ELBOs is consistent with −ELBO summed over the plate, value and gradient
    (taken as SVI takes it, through loss_and_grads), at the checker's defaults."""
    check = _check(elbo)
    assert check.passed, check.message
    assert "in all 54 coordinates" in check.message  # W, b, psi, V, c, s by their store names


@pytest.mark.false_alarm(1e-6)  # the checker's own false alarm
def test_renyi_alpha_zero_is_pyros_iwae():
    """RenyiELBO(alpha=0, num_particles=5) with a data plate is consistent with −IWAE_5."""
    check = _check("RenyiELBO", 5, num_draws=50)
    assert check.passed, check.message


@pytest.mark.false_alarm(2e-6)  # two passing checks at 1e-6 each
def test_subsampled_plate_and_poutine_scale_are_handled():
    """A subsampled plate (Pyro scales by N/b) and poutine.scale(1/N), stated as scale=1/N,
    keep Trace_ELBO consistent; an undeclared scale is diagnosed as a reduction."""
    sub = _check("Trace_ELBO", subsample_size=8, num_draws=100)
    assert sub.passed, sub.message
    scaled = _check("Trace_ELBO", scale=1 / N, num_draws=100)
    assert scaled.passed, scaled.message
    pyro.clear_param_store()
    model, guide, exact_model, q = _user()
    undeclared = check_pyro_elbo(
        Trace_ELBO(),
        poutine.scale(model, scale=1 / N),
        poutine.scale(guide, scale=1 / N),
        VAE.x,
        exact_model=exact_model,
        q=q,
        num_draws=100,
        seed=seeds.seed(0),
    )
    assert undeclared.diagnosis[:1] == ("reduction",), undeclared.message


def test_renyi_without_a_data_plate_is_flagged_as_one_joint_iwae():
    """With no plate, RenyiELBO's log-mean-exp runs over the whole batch at once: a looser
    bound; the check fails and says so."""
    check = _check("RenyiELBO", 5, plate=False, num_draws=50)
    assert not check.passed
    assert check.diagnosis[:1] == ("renyi_without_plate",), check.message
    assert "one joint IWAE over the whole batch" in check.message


@pytest.mark.parametrize(
    ("options", "rows"),
    [({"subsample_size": 8}, "mixes weights of different data points"), ({"scale": 1 / N}, "")],
    ids=["subsample", "scale"],
)
def test_renyi_with_subsampling_or_scale_is_flagged(options, rows):
    """RenyiELBO puts the site scale inside the log-mean-exp (and, subsampled, mixes rows
    across particles): it does not estimate scale × IWAE_k, and the diagnosis says why."""
    check = _check("RenyiELBO", 5, num_draws=50, **options)
    assert not check.passed
    assert check.diagnosis[:1] == ("renyi_scale_inside_log",), check.message
    assert rows in check.message


@pytest.mark.false_alarm(1e-6)  # the value test of the check (half its 1e-6) must pass
def test_jit_differentiable_loss_gradient_is_twice_the_true_one():
    """JitTrace_ELBO's differentiable_loss, differentiated by autograd with respect to the
    param store's tensors, fails the gradient check (its loss_and_grads passes, above)."""
    check = _check("JitTrace_ELBO", via="differentiable_loss", num_draws=50)
    assert check.direction == "consistent", check.message
    assert check.gradient_passed is False, check.message


@pytest.mark.false_alarm(1e-6)  # the checker's own false alarm
def test_model_and_guide_from_toyvae_pieces_pass():
    """model_and_guide builds a plated Pyro model and guide from plain modules; their gradient
    is taken by autograd (Pyro's loss_and_grads reaches only parameters registered with it)."""
    encoder, decoder, x = VAE
    model, guide = model_and_guide(decoder.model, encoder)
    check = check_pyro_elbo(
        TraceMeanField_ELBO(),
        model,
        guide,
        x,
        exact_model=decoder.model,
        q=encoder,
        num_draws=100,
        via="differentiable_loss",
        seed=seeds.seed(0),
    )
    assert check.passed, check.message
    # The worst coordinate is wherever the draws put it: a decoder parameter (named after the
    # module whose bound method model() is) or an encoder one (named by its role, q).
    assert check.gradient_parameter.split(".")[0] in ("LinearDecoder", "q"), (
        check.gradient_parameter
    )


@pytest.mark.parametrize(
    ("elbo", "form"), [("Trace_ELBO", "log_weight"), ("TraceMeanField_ELBO", "reconstruction")]
)
@pytest.mark.false_alarm(1e-6)  # one two-sided band at 1e-6
def test_pyro_elbo_variance_is_the_exact_one(elbo, form):
    """The sample variance of Pyro's loss draws is the exact variance of its estimator: Σ Var
    log w for Trace_ELBO, Σ Var log p(x|z) for the analytic-KL TraceMeanField_ELBO, within the
    1e-6 band z·√(κ₄/n + 2σ⁴/(n − 1)) of a sample variance of n iid draws."""
    check = _check(elbo)
    with torch.no_grad():
        model, q = VAE.decoder.model(), VAE.encoder(VAE.x)
        if form == "log_weight":
            kappa2, kappa4 = (t.sum().item() for t in log_weight_cumulants(model, VAE.x, q))
        else:
            moments = reconstruction_moments(model, VAE.x, q)
            kappa2, kappa4 = moments.variance.sum().item(), moments.fourth_cumulant.sum().item()
    n = check.num_draws
    sample_variance = check.standard_error**2 * n
    band = Z_1E6 * math.sqrt(kappa4 / n + 2 * kappa2**2 / (n - 1))
    assert abs(sample_variance - kappa2) <= band, (sample_variance, kappa2, band)


def test_check_pyro_elbo_errors_name_the_argument():
    """A non-ELBO, a Renyi α ≠ 0 and a bad ``via`` are refused with the argument named."""
    model, guide, exact_model, q = _user()
    with pytest.raises(TypeError, match=r"elbo must be a pyro\.infer ELBO instance"):
        check_pyro_elbo(3, model, guide, VAE.x, exact_model=exact_model, q=q)
    with pytest.raises(ValueError, match=r"only RenyiELBO\(alpha=0\)"):
        check_pyro_elbo(RenyiELBO(alpha=0.5), model, guide, VAE.x, exact_model=exact_model, q=q)
    with pytest.raises(ValueError, match="RenyiELBO has no differentiable_loss"):
        check_pyro_elbo(
            RenyiELBO(),
            model,
            guide,
            VAE.x,
            exact_model=exact_model,
            q=q,
            via="differentiable_loss",
        )
