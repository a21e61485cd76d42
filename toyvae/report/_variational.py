"""The variational distributions the rows test: what encoders produce, near and far.

Both factories read only the model's exact posterior (:meth:`toyvae.ConjugateModel.exact`), so
they serve every model family; q has the batch shape of x and the flat latent event shape (K,).
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae.interface import ConjugateModel, batch_shape
from toyvae.report.rows import apply, options


def random_gaussians(model: ConjugateModel, x: torch.Tensor, generator: torch.Generator):
    """Variational distributions with x's batch shape: what encoders produce, near and far.

    A full-covariance ``MultivariateNormal`` around the posterior, a mean-field
    ``Independent(Normal, 1)`` around it, and one far from it (prior-sized, shifted means).
    """
    batch, k = batch_shape(model, x), model.latent_dim
    post = model.exact(x).posterior
    mean, scale = post.loc, post.scale_tril

    def randn(*shape):
        return torch.randn(*batch, *shape, generator=generator, **options(model))

    def uniform(*shape):
        return torch.rand(*batch, *shape, generator=generator, **options(model))

    # Scales log-uniform in [1/2, 2] times the posterior's; a random lower triangle.
    factor = torch.tril(0.3 * randn(k, k), -1) + torch.diag_embed(2 ** (2 * uniform(k) - 1))
    near = MultivariateNormal(mean + apply(scale, randn(k)), scale_tril=scale @ factor)
    spread = scale.diagonal(dim1=-2, dim2=-1) * 2 ** (2 * uniform(k) - 1)
    mean_field = Independent(Normal(mean + spread * randn(k), spread), 1)
    far_scale = torch.tril(0.5 * randn(k, k), -1) + torch.diag_embed(0.2 + uniform(k))
    far = MultivariateNormal(3 * randn(k), scale_tril=far_scale)
    return [near, mean_field, far]


def wide_gaussian(model: ConjugateModel, x: torch.Tensor, generator: torch.Generator):
    """q = N(μ + S δ, S F Fᵀ Sᵀ) with F's singular values in [1.1, 1.3]: χ²(p(z|x) ‖ q) finite.

    χ² is finite iff 2Λ − Σ_q⁻¹ ≻ 0; any q at least as wide as the posterior in every direction
    qualifies, so the weights w/p(x) have the finite variance χ²/k the IWAE check needs.
    """
    batch, k = batch_shape(model, x), model.latent_dim
    post = model.exact(x).posterior
    rotation, _ = torch.linalg.qr(torch.randn(*batch, k, k, generator=generator, **options(model)))
    singular = 1.1 + 0.2 * torch.rand(*batch, k, generator=generator, **options(model))
    # S (Q diag(s) Qᵀ) is a valid scale; its lower Cholesky factor comes from the covariance.
    shape = (rotation * singular.unsqueeze(-2)) @ rotation.mT
    cov = post.scale_tril @ shape @ shape.mT @ post.scale_tril.mT
    shift = 0.5 * torch.randn(*batch, k, generator=generator, **options(model))
    loc = post.loc + apply(post.scale_tril, shift)
    return MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(0.5 * (cov + cov.mT)))
