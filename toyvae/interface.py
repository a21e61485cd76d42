r"""The model interface: what a model family offers the algorithms, and nothing more.

Every model family in toyvae (the linear-Gaussian model, the hierarchical model, the
state-space model) is a :class:`ConjugateModel`: a joint Gaussian p_θ(x, z) whose latent z is
a flat vector of size K (a hierarchy's layers or a sequence's time steps, concatenated). Once
per batch of data it returns its exact answers as an :class:`Exact` value, and it computes
the reconstruction term E_q log p_θ(x|z) of the ELBO by its own route. Everything else
(:func:`toyvae.elbo`, :func:`toyvae.kl_to_posterior`, the log weights, IWAE, χ², the
gradient estimators and their exact moments, the tolerances and the report's rows) is written
against this interface only, so a new family is one new module.

The ELBO is E_q log p(x|z) − KL(q ‖ p(z)), from :meth:`ConjugateModel.expected_log_likelihood`
and :meth:`ConjugateModel.prior`; the KL to the posterior is computed from
:meth:`ConjugateModel.exact`. The identity log p(x) = ELBO(q) + KL(q ‖ p(z|x)) is therefore a
check between two independent computations.

A family may also define ``elbo(x, q)`` (validated inputs, like the methods below), and
:func:`toyvae.elbo` then uses it. The linear-Gaussian, hierarchical and state-space models
do: near the posterior the two terms above are each far larger than their difference (with
small noise and K > D, rounding of 1e-11 in a difference of 1e-13), so they regroup the sum,
and their ELBO shares the posterior's covariance factor with the KL. For them the independent
check is E_q log p(x|z) − KL(q ‖ p(z)) + KL(q ‖ p(z|x)) = log p(x), which the tests make.

Methods of the interface take *validated* inputs: ``x`` from :meth:`ConjugateModel.check_data`
and ``q`` already in canonical :class:`~toyvae.gaussians.Gaussian` form, in the model's dtype.
The public functions of toyvae validate; the methods compute.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch.distributions import MultivariateNormal

from toyvae.gaussians import Gaussian

__all__ = [
    "ConjugateModel",
    "Exact",
    "StructuredGaussian",
    "batch_shape",
    "check_model",
    "for_data",
]


class Exact(NamedTuple):
    """A model's exact answers for a batch of data x.

    Attributes
    ----------
    log_evidence : tensor
        log p_θ(x), with x's batch shape.
    posterior : Gaussian
        p_θ(z|x) in canonical form (mean, lower Cholesky factor of the covariance), batch shape
        x's batch shape, event shape (K,). Computed from the same factorisation as
        ``log_evidence``.
    """

    log_evidence: torch.Tensor
    posterior: Gaussian


@runtime_checkable
class ConjugateModel(Protocol):
    """A joint Gaussian p_θ(x, z) with closed-form evidence and posterior.

    Attributes
    ----------
    latent_dim : int
        K, the size of the flat latent vector z.
    data_event_shape : torch.Size
        The shape of one observation: (D,) for one vector, (T, D) for a sequence. The batch
        shape of x is what precedes it.
    term_count : int
        n, the number of terms in each exact quantity's floating-point sums (for a
        linear-Gaussian model, D + K): rounding errors are at most about n·eps·M, M from
        :meth:`magnitude` (Higham, *Accuracy and Stability*, §4.2).
    dtype, device
        Where the model's parameters live; q is cast to this dtype.
    """

    @property
    def latent_dim(self) -> int: ...

    @property
    def data_event_shape(self) -> torch.Size: ...

    @property
    def term_count(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def check_data(self, x, name: str = "x") -> torch.Tensor:
        """x as a finite tensor of shape (*batch, *data_event_shape) in the model's dtype, or
        ``ValueError``/``TypeError`` naming ``name``."""
        ...

    def prior(self) -> MultivariateNormal:
        """p(z) over the flat latent vector, event shape (K,)."""
        ...

    def exact(self, x: torch.Tensor) -> Exact:
        """log p_θ(x) and p_θ(z|x) for a checked batch x."""
        ...

    def expected_log_likelihood(self, x: torch.Tensor, q: Gaussian) -> torch.Tensor:
        """E_q log p_θ(x|z) in closed form, for a checked x and a canonical q whose batch shape
        broadcasts with x's; shape: the broadcast batch shape. Not computed from :meth:`exact`.
        """
        ...

    def log_joint(self, x, z) -> torch.Tensor:
        """log p_θ(x, z) from the model's conditional densities, broadcasting batch shapes."""
        ...

    def magnitude(self, x: torch.Tensor, q: Gaussian | None = None, *, z=None) -> torch.Tensor:
        """M: the sum of the absolute values of the terms of log p(x) (and, with ``q``, of
        ELBO(q) and KL(q ‖ p(z|x)); with ``z``, of log p(x, z) and log p(z|x)), by textbook
        formulas. Shape: the broadcast batch shape."""
        ...


@runtime_checkable
class StructuredGaussian(Protocol):
    """A Gaussian q given by its structure: a Markov chain over time steps, a top-down hierarchy.

    Such a q is what sequential and hierarchical VAEs produce. :func:`toyvae.elbo` and
    :func:`toyvae.kl_to_posterior` hand it to its own ``elbo`` and ``kl_to_posterior``, which
    use the structure (per-step or per-layer terms, never a dense T·K × T·K matrix); every other
    function (the log weights, IWAE, χ², gradients) uses its dense form
    :meth:`to_multivariate_normal`.
    """

    def to_multivariate_normal(self) -> MultivariateNormal:
        """q as one MultivariateNormal over the flat latents (dense)."""
        ...

    def elbo(self, model, x) -> torch.Tensor:
        """ELBO(q) at x, by the structure's own route (validating model and x)."""
        ...

    def kl_to_posterior(self, model, x) -> torch.Tensor:
        """KL(q ‖ p(z|x)), computed independently of :meth:`elbo`."""
        ...


def for_data(model, x):
    """``model`` bound to the data x, for families whose event shape depends on the data.

    A family may define ``for_data(x)``, returning a :class:`ConjugateModel` for x's shape (a
    state-space model reads the sequence length T from x: its latent size is T·K). The generic
    functions call it first, so such a model is used unbound; other models are returned as they
    are.
    """
    hook = getattr(type(model), "for_data", None)
    return model if hook is None else hook(model, x)


def check_model(model) -> ConjugateModel:
    """``model`` if it implements :class:`ConjugateModel`, else ``TypeError``."""
    if not isinstance(model, ConjugateModel):
        raise TypeError(
            "model must implement toyvae.ConjugateModel (a LinearGaussian, HierarchicalLinear"
            f"Gaussian, LinearGaussianSSM or your own), got {type(model).__name__}"
        )
    return model


def batch_shape(model: ConjugateModel, x: torch.Tensor) -> torch.Size:
    """The batch shape of a checked x: its shape without the model's data event shape."""
    return x.shape[: x.ndim - len(model.data_event_shape)]
