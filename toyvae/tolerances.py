r"""Derived tolerances for comparing exact computations: errors in units of eps·M.

Every exact quantity in toyvae (log p(x), the ELBO, a KL, log p(x, z)) is a sum of a few groups
of terms: D·log 2π, log det Ψ, log det Λ, squared norms of whitened residuals, traces and
log-determinants of q's covariance. A floating-point sum of n terms whose absolute values add
up to M is correct to within n·eps·M (Higham, *Accuracy and Stability of Numerical Algorithms*,
§4.2), and each term is itself a length-D or length-K sum. So the natural unit of error is
``eps · M``, with M the sum of the absolute values of all the terms, computed here with plain
textbook linear algebra (dense for a full Ψ, elementwise for a scalar or diagonal Ψ), not with
the whitened Cholesky route of :mod:`toyvae.model` that it is used to check.

Used by the test suite and by ``toyvae report``.
"""

from __future__ import annotations

import torch

from toyvae.gaussians import Gaussian, as_gaussian
from toyvae.interface import check_model, for_data

__all__ = ["EPS", "identity_tolerance", "magnitude", "posterior_condition"]

EPS = torch.finfo(torch.float64).eps


def magnitude(model, x: torch.Tensor, q=None, *, z=None) -> torch.Tensor:
    """M: the sum of the absolute values of every term of log p(x), and of the other quantities.

    With ``q`` (a Gaussian), the terms of ELBO(q) and KL(q ‖ p(z|x)) are added; with ``z``
    (..., K), those of log p(x, z) and log p(z|x) (Bayes' rule at z). Shape: the broadcast batch
    shape of x, q and z. Each model family states its own (:meth:`ConjugateModel.magnitude`).
    """
    model = check_model(for_data(model, x))
    gq = None
    if q is not None:
        g = as_gaussian(q)
        gq = Gaussian(g.loc.to(model.dtype), g.scale_tril.to(model.dtype))
    return model.magnitude(x, gq, z=z)


def identity_tolerance(model, x: torch.Tensor, q=None, *, z=None) -> torch.Tensor:
    """Allowed |error| when comparing exact quantities that are sums of the terms in M.

    4 · n · eps · M: n terms per quantity (Higham's n·eps·M; n = D + K for the linear-Gaussian
    model, the model's ``term_count``), and up to four such quantities meet in one comparison
    (log p(x), ELBO, KL, and their combination).
    ``eps`` is the machine epsilon of the model's dtype. Over 400 Hypothesis examples of
    ``linear_gaussian_models()`` the largest error seen was 1.04 · eps · M, so the bound is
    not tight but is far below any real defect (a defect changes a term by O(1) of itself).
    """
    model = for_data(model, x)
    eps = torch.finfo(model.dtype).eps
    return 4 * model.term_count * eps * magnitude(model, x, q, z=z)


def posterior_condition(model) -> float:
    """κ(S) = √κ(Λ): the condition number of the posterior's Cholesky factor S.

    Quantities computed by triangular solves against S (KL to the posterior, log p(z|x), log
    weights in the posterior's coordinates) have a normwise forward error up to κ(S) times the
    backward error (Higham, §8.2); multiply :func:`identity_tolerance` by this for them. In
    every linear-Gaussian family the posterior covariance does not depend on x, so S is read
    from the exact posterior at x = 0; as a scale factor, its own rounding does not matter.
    """
    check_model(model)
    x = torch.zeros(model.data_event_shape, dtype=model.dtype, device=model.device)
    singular = torch.linalg.svdvals(model.exact(x).posterior.scale_tril.detach())
    return float(singular.max() / singular.min())
