"""The numbers behind the report's plots, computed without matplotlib (:mod:`toyvae.report.plots`
draws them)."""

from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from toyvae.bounds import elbo
from toyvae.gaussians import as_gaussian
from toyvae.report.rows import options


def interpolation(model, x, q, steps: int = 41):
    """ELBO(q_t) along q_t = N((1−t)m + tμ, L_t L_tᵀ), L_t = (1−t)L + tS, from q (t=0) to p(z|x).

    Returns ``(t, elbo)`` as NumPy arrays for the first data point.
    """
    point = x[:1]
    g = as_gaussian(q)
    post = model.exact(point).posterior
    t = torch.linspace(0, 1, steps, **options(model))
    loc = (1 - t)[:, None] * g.loc[:1] + t[:, None] * post.loc
    tril = (1 - t)[:, None, None] * g.scale_tril[:1] + t[:, None, None] * post.scale_tril
    path = MultivariateNormal(loc, scale_tril=tril)
    return t.cpu().numpy(), elbo(model, point, path).detach().cpu().numpy()
