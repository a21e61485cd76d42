r"""Normalizing flows as q, trained on the ELBO and measured against the exact posterior.

A flow q is an ``nn.Module`` with ``sample_and_log_prob(num_samples, generator=None)``
returning reparameterised draws z (num_samples, K) and log q(z), and ``log_prob(z)``, which
calling the module also returns:

- :class:`AffineFlow`: z = m + L ε, ε ~ N(0, I): a full-covariance (or, with
  ``diagonal=True``, mean-field) Gaussian written as a one-layer flow. Its ELBO is also
  closed-form (:meth:`AffineFlow.distribution` is a ``MultivariateNormal`` for
  :func:`toyvae.elbo`);
- :class:`ZukoFlow`: a flow from zuko (a maintained PyTorch flow library: plain
  ``nn.Module`` s, rsample with log-densities, masked autoregressive, coupling and spline
  flows), here :func:`zuko_maf`, a masked autoregressive flow (Papamakarios et al., 2017) of
  a given depth. Needs the ``flows`` extra (``pip install toyvae[flows]``).

For a linear-Gaussian posterior no flow can beat the full-covariance Gaussian: that Gaussian
*is* the posterior, so its gap is 0, and every flow whose family contains the Gaussians (an
affine autoregressive layer does) has the same optimum. What remains after training is
optimisation and Monte Carlo error, which makes the exact posterior a clean test bench for a
flow implementation. :func:`kl_gap` measures it: KL(q ‖ p(z|x)) = log p(x) − ELBO(q), estimated
by Monte Carlo with its standard error; :func:`reverse_kl_gap` measures KL(p(z|x) ‖ q) from
exact posterior draws. Both are ≥ 0, so a flow whose log-density is wrong by a constant makes
one of them negative.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from toyvae._checks import check_count, describe
from toyvae.interface import check_model, for_data

__all__ = [
    "AffineFlow",
    "GapEstimate",
    "ZukoFlow",
    "fit",
    "kl_gap",
    "reverse_kl_gap",
    "zuko_maf",
]

_LOG_2PI = math.log(2 * math.pi)


class GapEstimate(NamedTuple):
    """A Monte Carlo estimate of a KL divergence.

    Attributes
    ----------
    value : float
        The mean of the per-draw log-density differences.
    standard_error : float
        Their sample standard deviation over √n.
    num_samples : int
    """

    value: float
    standard_error: float
    num_samples: int


class AffineFlow(nn.Module):
    """z = loc + L ε with ε ~ N(0, I_K): a Gaussian q as a one-layer flow.

    L is lower triangular with a positive diagonal, stored as its strictly lower part and the
    log of its diagonal (``diagonal=True``: the diagonal only, a mean-field q). Starts at the
    standard normal, or at ``loc`` and ``scale_tril`` when given.
    """

    def __init__(self, latent_dim, *, diagonal=False, dtype=torch.float64, device=None):
        super().__init__()
        k = check_count(latent_dim, "latent_dim")
        options = {"dtype": dtype, "device": device}
        self.diagonal = bool(diagonal)
        self.loc = nn.Parameter(torch.zeros(k, **options))
        self.log_scale = nn.Parameter(torch.zeros(k, **options))
        self.lower = nn.Parameter(torch.zeros(k, k, **options), requires_grad=not diagonal)

    def scale_tril(self) -> torch.Tensor:
        """L: exp(log_scale) on the diagonal, the strictly lower part below (zero if diagonal)."""
        lower = torch.zeros_like(self.lower) if self.diagonal else self.lower.tril(-1)
        return lower + torch.diag_embed(self.log_scale.exp())

    def distribution(self) -> MultivariateNormal:
        """q as a ``MultivariateNormal``, for the closed-form :func:`toyvae.elbo`."""
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril())

    def sample_and_log_prob(self, num_samples, generator=None):
        """(z, log q(z)) for num_samples reparameterised draws; z is (num_samples, K)."""
        eps = torch.randn(
            (num_samples, self.loc.shape[-1]),
            generator=generator,
            dtype=self.loc.dtype,
            device=self.loc.device,
        )
        z = self.loc + eps @ self.scale_tril().mT
        log_q = -0.5 * (eps.square().sum(-1) + self.loc.shape[-1] * _LOG_2PI) - self.log_scale.sum()
        return z, log_q

    def log_prob(self, z) -> torch.Tensor:
        """log q(z)."""
        return self.distribution().log_prob(z)

    def forward(self, z) -> torch.Tensor:
        """log q(z): calling the flow evaluates its log-density (used by :func:`fit`)."""
        return self.log_prob(z)


class ZukoFlow(nn.Module):
    """A zuko flow (an unconditional ``zuko.flows.Flow``) with toyvae's flow methods.

    Draws come from ``generator`` (zuko's own sampling uses torch's global generator): the
    base noise ε ~ N(0, I) is pushed through the inverse transform, and
    log q(z) = log N(ε; 0, I) − log |det ∂z/∂ε|.
    """

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def sample_and_log_prob(self, num_samples, generator=None):
        """(z, log q(z)) for num_samples reparameterised draws."""
        distribution = self.flow()
        loc = distribution.base.mean
        eps = torch.randn(
            (num_samples, *distribution.base.event_shape),
            generator=generator,
            dtype=loc.dtype,
            device=loc.device,
        )
        z, ladj = distribution.transform.inv.call_and_ladj(eps)
        return z, distribution.base.log_prob(eps) - ladj

    def log_prob(self, z) -> torch.Tensor:
        """log q(z), through the forward transform."""
        return self.flow().log_prob(z)

    def forward(self, z) -> torch.Tensor:
        """log q(z): calling the flow evaluates its log-density (used by :func:`fit`)."""
        return self.log_prob(z)


def zuko_maf(latent_dim, depth, *, hidden_features=(32, 32), seed=0, dtype=torch.float64):
    """A :class:`ZukoFlow` around ``zuko.flows.MAF`` with ``depth`` affine autoregressive layers.

    Its weights are initialised from ``seed`` in a forked random state, so the global generator
    is left as it was.
    """
    try:
        import zuko
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("zuko_maf needs zuko: pip install 'toyvae[flows]'") from error
    k = check_count(latent_dim, "latent_dim")
    depth = check_count(depth, "depth", why=" (the number of autoregressive layers)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = zuko.flows.MAF(k, 0, transforms=depth, hidden_features=tuple(hidden_features))
    return ZukoFlow(flow.to(dtype))


def _check_flow(flow) -> None:
    if not (hasattr(flow, "sample_and_log_prob") and hasattr(flow, "log_prob")):
        raise TypeError(
            "flow must have sample_and_log_prob(num_samples, generator) and log_prob(z) "
            f"(a toyvae.flows.AffineFlow or ZukoFlow), got {describe(flow)}"
        )


def _setup(model, x):
    model = check_model(for_data(model, x))
    x = model.check_data(x)
    if x.ndim != len(model.data_event_shape):
        raise ValueError(
            f"x must be one observation of shape {tuple(model.data_event_shape)} (a flow is "
            f"fitted to one x), got {describe(x)}"
        )
    return model, x


def fit(
    model,
    x,
    flow,
    *,
    steps,
    num_samples=64,
    learning_rate=1e-2,
    path_derivative=True,
    generator=None,
):
    """Maximise the Monte Carlo ELBO of ``flow`` at one x by Adam; returns the ELBO estimates.

    Each step draws ``num_samples`` reparameterised z and ascends the mean of
    log p(x, z) − log q(z). With ``path_derivative`` (default) log q is evaluated with the
    flow's parameters held fixed (the "sticking the landing" gradient): the same expected
    gradient, zero variance at q = p(z|x).
    """
    model, x = _setup(model, x)
    _check_flow(flow)
    steps = check_count(steps, "steps")
    num_samples = check_count(num_samples, "num_samples")
    optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        z, log_q = flow.sample_and_log_prob(num_samples, generator=generator)
        if path_derivative:
            # Roeder, Wu and Duvenaud (2017): log q with the parameters held fixed, so the
            # gradient flows through z only; it vanishes draw by draw at q = p(z|x).
            detached = {name: p.detach() for name, p in flow.named_parameters()}
            log_q = torch.func.functional_call(flow, detached, (z,))
        objective = (model.log_joint(x, z) - log_q).mean()
        (-objective).backward()
        optimizer.step()
        history.append(float(objective.detach()))
    return history


def kl_gap(model, x, flow, num_samples, *, generator=None) -> GapEstimate:
    r"""KL(q ‖ p_θ(z|x)) = log p_θ(x) − ELBO(q), by Monte Carlo, with its standard error.

    .. math::
        \mathrm{KL}(q \,\|\, p_\theta(z \mid x))
        = \mathbb E_q\big[\log q(z) - \log p_\theta(x, z)\big] + \log p_\theta(x)

    with log p_θ(x) exact. The true value is ≥ 0, and 0 only at q = p_θ(z|x).
    """
    model, x = _setup(model, x)
    _check_flow(flow)
    num_samples = check_count(num_samples, "num_samples", minimum=2)
    with torch.no_grad():
        z, log_q = flow.sample_and_log_prob(num_samples, generator=generator)
        per_draw = log_q - model.log_joint(x, z) + model.exact(x).log_evidence
    return GapEstimate(
        float(per_draw.mean()), float(per_draw.std() / math.sqrt(num_samples)), num_samples
    )


def reverse_kl_gap(model, x, flow, num_samples, *, generator=None) -> GapEstimate:
    r"""KL(p_θ(z|x) ‖ q) = E_p[log p_θ(z|x) − log q(z)], from exact posterior draws.

    Uses only the flow's density (its forward, data-to-noise direction), where :func:`kl_gap`
    uses its sampler: the two together check that q's samples and density agree.
    """
    model, x = _setup(model, x)
    _check_flow(flow)
    num_samples = check_count(num_samples, "num_samples", minimum=2)
    posterior = model.exact(x).posterior
    with torch.no_grad():
        eps = torch.randn(
            (num_samples, posterior.loc.shape[-1]),
            generator=generator,
            dtype=posterior.loc.dtype,
            device=posterior.loc.device,
        )
        z = posterior.loc + eps @ posterior.scale_tril.mT
        exact = MultivariateNormal(posterior.loc, scale_tril=posterior.scale_tril)
        per_draw = exact.log_prob(z) - flow.log_prob(z)
    return GapEstimate(
        float(per_draw.mean()), float(per_draw.std() / math.sqrt(num_samples)), num_samples
    )
