r"""The linear-Gaussian encoder q_φ(z|x) = N(Vx + c, L_S L_Sᵀ): affine mean, fixed covariance.

The one encoder of the library: the aggregate posterior and ELBO surgery
(:mod:`toyvae.aggregate`) take it, linear-VAE training (:mod:`toyvae.training`) builds it from
its parameters at every step and returns it, and :meth:`LinearGaussianEncoder.exact_posterior`
is the exact posterior of a :class:`toyvae.LinearGaussian` written as an encoder (which
:func:`toyvae.testing.linear_vae` also starts from).
"""

from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from toyvae._checks import (
    as_tensor,
    check_affine_map,
    check_finite,
    check_last_dim,
    check_positive,
    describe,
)
from toyvae._frozen import Frozen
from toyvae.model import LinearGaussian

__all__ = ["LinearGaussianEncoder"]


class LinearGaussianEncoder(Frozen):
    r"""q_φ(z|x) = N(Vx + c, L_S L_Sᵀ): an affine mean and an x-independent covariance.

    Parameters
    ----------
    weight : (K, D) tensor or array
        V, the mean map.
    bias : (K,) tensor or array, optional
        c; zeros when ``None``.
    scale_tril : (K, K) tensor or array, optional
        Lower Cholesky factor L_S of the covariance, positive diagonal (only its lower triangle
        is read); the identity when ``None``. A diagonal ``scale_tril`` is a mean-field encoder.

    Calling the encoder on x (..., D) returns a ``MultivariateNormal`` with batch shape
    ``x.shape[:-1]``: exactly what :func:`toyvae.elbo` takes as q. Parameters may require grad
    (every output is differentiable in them). Like :class:`toyvae.LinearGaussian`, the encoder
    is immutable: a parameter tensor modified in place after construction (an optimizer step)
    makes every later use raise ``RuntimeError``; build a new encoder from the updated
    parameters instead.
    """

    def __init__(self, weight, bias=None, scale_tril=None):
        given = {"weight": weight, "bias": bias, "scale_tril": scale_tril}
        weight, bias = check_affine_map(weight, bias, "K", "D")
        k = weight.shape[0]
        if scale_tril is None:
            scale_tril = torch.eye(k, dtype=weight.dtype, device=weight.device)
        scale_tril = as_tensor(scale_tril, "scale_tril", like=weight)
        if scale_tril.shape != (k, k):
            raise ValueError(f"scale_tril must have shape ({k}, {k}), got {describe(scale_tril)}")
        check_finite(scale_tril, "scale_tril")
        scale_tril = scale_tril.tril()
        check_positive(scale_tril.diagonal(), "scale_tril's diagonal")
        self._freeze(given, weight=weight, bias=bias, scale_tril=scale_tril)

    def __repr__(self) -> str:
        return f"LinearGaussianEncoder(data_dim={self.data_dim}, latent_dim={self.latent_dim})"

    @property
    def weight(self) -> torch.Tensor:
        """V, (K, D): the mean map."""
        self._verify()
        return self._weight

    @property
    def bias(self) -> torch.Tensor:
        """c, (K,): the mean at x = 0."""
        self._verify()
        return self._bias

    @property
    def scale_tril(self) -> torch.Tensor:
        """L_S, (K, K): lower Cholesky factor of the covariance, the same for every x."""
        self._verify()
        return self._scale_tril

    @property
    def data_dim(self) -> int:
        """D, the dimension of x."""
        return self._weight.shape[1]

    @property
    def latent_dim(self) -> int:
        """K, the dimension of z."""
        return self._weight.shape[0]

    @classmethod
    def exact_posterior(cls, model: LinearGaussian) -> LinearGaussianEncoder:
        r"""The encoder whose q(z|x) is the exact posterior of ``model`` for every x.

        .. math::
            V = \Sigma W^\top \Psi^{-1}, \qquad c = \mu(0), \qquad L_S = S,\ SS^\top = \Sigma

        (c = −V b under the standard prior). V and c are the model's posterior-mean map
        (:meth:`toyvae.LinearGaussian.posterior_mean_map`); S is the Cholesky factor of its
        x-independent posterior covariance.
        """
        _check_model(model)
        weight, bias = model.posterior_mean_map()
        zero = torch.zeros(model.data_dim, dtype=model.dtype, device=model.device)
        return cls(weight, bias, model.exact(zero).posterior.scale_tril)

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        """Vx + c for a checked x (..., D)."""
        return x @ self.weight.mT + self.bias

    def __call__(self, x) -> MultivariateNormal:
        """q_φ(z|x), batch shape ``x.shape[:-1]``."""
        x = self._check_x(x)
        loc = self._mean(x)
        return MultivariateNormal(
            loc, scale_tril=self.scale_tril.expand(*loc.shape, self.latent_dim)
        )

    def _check_x(self, x, name: str = "x") -> torch.Tensor:
        x = as_tensor(x, name, like=self.weight)
        check_last_dim(x, name, self.data_dim, "the encoder's data dimension D")
        check_finite(x, name)
        return x


def _check_model(model) -> None:
    """``TypeError`` unless ``model`` is a :class:`toyvae.LinearGaussian`."""
    if not isinstance(model, LinearGaussian):
        raise TypeError(f"model must be a toyvae.LinearGaussian, got {type(model).__name__}")


def _check_encoder(encoder) -> None:
    """``TypeError`` unless ``encoder`` is a :class:`LinearGaussianEncoder`."""
    if not isinstance(encoder, LinearGaussianEncoder):
        raise TypeError(
            f"encoder must be a toyvae.LinearGaussianEncoder, got {type(encoder).__name__}"
        )
