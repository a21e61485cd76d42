r"""x = w(z₁ + z₂) + ε: the model on which mean-field ELBO ascent lowers log p(x).

With q restricted to diagonal Gaussians, the ELBO is log p_w(x) − KL(q* ‖ p_w(z|x)), and the
KL term grows with w (the two latents' posterior correlation): ELBO ascent stops at a smaller
w than maximum likelihood. Both objectives and both optima are known in closed form
(docs/elbo-vs-likelihood.md); here they are computed from the exact model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import scipy.optimize
import torch

from toyvae._checks import as_tensor, check_finite, check_ndim, check_positive, describe
from toyvae.bounds import elbo
from toyvae.gaps import best_mean_field
from toyvae.model import LinearGaussian

__all__ = [
    "CounterexampleObjectives",
    "CounterexampleOptima",
    "counterexample_model",
    "counterexample_objectives",
    "counterexample_optima",
]


def counterexample_model(weight) -> LinearGaussian:
    """x = w (z₁ + z₂) + ε, ε ~ N(0, 1), z ~ N(0, I₂): W = [[w, w]], b = 0, Ψ = 1."""
    w = as_tensor(weight, "weight")
    check_ndim(w, "weight", (0,), "a scalar")
    return LinearGaussian(torch.stack([w, w]).unsqueeze(0), noise_variance=1.0)


class CounterexampleObjectives(NamedTuple):
    """Per-datum averages over data with E[x²] = ν, at one weight w.

    Attributes
    ----------
    log_likelihood : tensor
        E log p_w(x), 0-d.
    elbo : tensor
        E ELBO(q*), q* the best mean-field Gaussian at each x, 0-d.
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor


def counterexample_objectives(weight, second_moment=3.0) -> CounterexampleObjectives:
    r"""Average log-likelihood and best mean-field ELBO of the counterexample at w.

    Both are quadratics in x with no linear term (b = 0), so their averages depend on the data
    only through ν = E[x²] (``second_moment``): the two points x = ±√ν stand for any data set
    with that moment.
    Computed with :meth:`LinearGaussian.log_evidence`, :func:`toyvae.gaps.best_mean_field`
    and :func:`toyvae.elbo`; in closed form (docs/elbo-vs-likelihood.md),

    .. math::
        \begin{aligned}
        \mathbb E\log p_w(x) &= -\tfrac12\Big[\log 2\pi + \log(1 + 2w^2)
            + \frac{\nu}{1 + 2w^2}\Big], \\
        \mathbb E\,\mathrm{ELBO}(q^*) &= -\tfrac12\Big[\log 2\pi + 2\log(1 + w^2)
            + \frac{\nu}{1 + 2w^2}\Big].
        \end{aligned}
    """
    model = counterexample_model(weight)
    s = as_tensor(second_moment, "second_moment", like=model.weight)
    check_ndim(s, "second_moment", (0,), "a scalar")
    check_finite(s, "second_moment")
    check_positive(s, "second_moment")
    x = torch.stack([s.sqrt(), -s.sqrt()]).unsqueeze(-1)
    return CounterexampleObjectives(
        model.log_evidence(x).mean(), elbo(model, x, best_mean_field(model, x)).mean()
    )


class CounterexampleOptima(NamedTuple):
    """The two maximisers over w > 0 (:func:`counterexample_optima`).

    Attributes
    ----------
    maximum_likelihood : float
        The w > 0 that maximises E log p_w(x).
    maximum_elbo : float
        The w > 0 that maximises the best mean-field ELBO.
    """

    maximum_likelihood: float
    maximum_elbo: float


def counterexample_optima(second_moment: float = 3.0) -> CounterexampleOptima:
    """Both maximisers over w > 0, found numerically (bounded Brent search to ~1e-10 in w).

    The closed forms, derived in docs/elbo-vs-likelihood.md, are w² = (ν − 1)/2 and
    w² = [ν − 4 + √(ν² + 8ν)]/8 (ν = ``second_moment``); the tests compare the two.
    """
    if not isinstance(second_moment, int | float) or not second_moment > 1:
        raise ValueError(
            f"second_moment must be a number > 1 (else maximum likelihood puts w = 0), "
            f"got {describe(second_moment)}"
        )
    upper = 2 * math.sqrt(second_moment)  # beyond both optima: w² ≤ (ν − 1)/2 < ν

    def maximiser(field: str) -> float:
        def loss(w: float) -> float:
            return -float(getattr(counterexample_objectives(w, second_moment), field))

        options = {"xatol": 1e-12}
        return scipy.optimize.minimize_scalar(
            loss, bounds=(0.0, upper), method="bounded", options=options
        ).x

    return CounterexampleOptima(maximiser("log_likelihood"), maximiser("elbo"))
