r"""A linear-Gaussian VAE made of ordinary torch modules, whose exact ELBO and log p(x) are known.

The decoder p_θ(x|z) = N(Wz + b, Ψ) with p(z) = N(0, I_K) is a :class:`toyvae.LinearGaussian`;
the encoder q_φ(z|x) = N(V_μ x + c_μ, diag exp(V_s x + c_s)) is what a VAE's encoder usually
is: two linear maps, to the mean and to the log-variance. So the exact ELBO of the encoder's q
is ``toyvae.elbo(decoder.model(), x, encoder(x))``, differentiable in every parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Independent, Normal

from toyvae._checks import describe
from toyvae.encoder import LinearGaussianEncoder
from toyvae.model import LinearGaussian

__all__ = ["LinearDecoder", "LinearEncoder", "LinearVAE", "linear_vae"]


def _check_dim(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {describe(value)}")
    return value


def _linear(in_features: int, out_features: int, dtype, device) -> nn.Linear:
    # skip_init: no draw from the global random generator; parameters start at zero. It needs a
    # concrete device (None would leave the layer on the meta device): torch's default one.
    device = torch.empty(0, device=device).device
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer


class LinearEncoder(nn.Module):
    r"""q_φ(z|x) = N(μ(x), diag σ²(x)) with μ(x) = V_μ x + c_μ and log σ²(x) = V_s x + c_s.

    ``encoder.mean`` and ``encoder.logvar`` are ``nn.Linear(D, K)`` layers. They start at zero,
    so a fresh encoder returns the prior N(0, I) for every x.

    Written as VAE code is, with a log-variance head, so its variance may depend on x: with
    ``logvar.weight`` = 0 it is a mean-field :class:`toyvae.encoder.LinearGaussianEncoder`
    (V_μ, c_μ, diag exp(½ c_s)), and :meth:`load_exact_posterior_` sets it to one.
    """

    def __init__(self, data_dim: int, latent_dim: int, *, dtype=torch.float64, device=None):
        super().__init__()
        d, k = _check_dim(data_dim, "data_dim"), _check_dim(latent_dim, "latent_dim")
        self.mean = _linear(d, k, dtype, device)
        self.logvar = _linear(d, k, dtype, device)

    def load_exact_posterior_(self, model: LinearGaussian) -> LinearEncoder:
        """Set the parameters to ``model``'s exact posterior, in place; returns the encoder.

        The mean is the posterior-mean map V x + c of
        :meth:`toyvae.encoder.LinearGaussianEncoder.exact_posterior`, and the log-variance the
        constant log diag Σ (``logvar.weight`` = 0). That is the exact posterior when Σ is
        diagonal, as for the decoders of :func:`linear_vae`; otherwise q has the posterior's
        mean and marginal variances, but not its correlations.
        """
        if not isinstance(model, LinearGaussian):
            raise TypeError(f"model must be a toyvae.LinearGaussian, got {describe(model)}")
        k, d = self.mean.weight.shape
        if (model.latent_dim, model.data_dim) != (k, d):
            raise ValueError(
                f"model must have D = {d} and K = {k} like the encoder, got a model with "
                f"D = {model.data_dim}, K = {model.latent_dim}"
            )
        exact = LinearGaussianEncoder.exact_posterior(model)
        with torch.no_grad():
            self.mean.weight.copy_(exact.weight)
            self.mean.bias.copy_(exact.bias)
            self.logvar.weight.zero_()
            self.logvar.bias.copy_(exact.scale_tril.square().sum(-1).log())  # diag of S Sᵀ
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x), each of shape ``(*x.shape[:-1], K)``."""
        return self.mean(x), self.logvar(x)

    def forward(self, x: torch.Tensor) -> Independent:
        """q(z|x) as ``Independent(Normal(mean, exp(½ logvar)), 1)``, batch shape x.shape[:-1]."""
        mean, logvar = self.encode(x)
        return Independent(Normal(mean, (0.5 * logvar).exp()), 1)


class LinearDecoder(nn.Module):
    r"""p_θ(x|z) = N(Wz + b, Ψ) with Ψ = exp(``logvar``): isotropic (a scalar) or diagonal.

    ``decoder.mean`` is an ``nn.Linear(K, D)`` (weight W, bias b); ``decoder.logvar`` is the
    log noise variance, shape () or (D,). :meth:`model` is the exact
    :class:`toyvae.LinearGaussian` these parameters define, differentiable in them.
    """

    def __init__(
        self, latent_dim: int, data_dim: int, *, noise="diagonal", dtype=torch.float64, device=None
    ):
        super().__init__()
        k, d = _check_dim(latent_dim, "latent_dim"), _check_dim(data_dim, "data_dim")
        if noise not in ("isotropic", "diagonal"):
            raise ValueError(f"noise must be 'isotropic' or 'diagonal', got {noise!r}")
        self.mean = _linear(k, d, dtype, device)
        shape = () if noise == "isotropic" else (d,)
        self.logvar = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of p(x|z), each of shape ``(*z.shape[:-1], D)``."""
        mean = self.mean(z)
        return mean, self.logvar.expand_as(mean)

    def forward(self, z: torch.Tensor) -> Independent:
        """p(x|z) as ``Independent(Normal(Wz + b, exp(½ logvar)), 1)``, batch shape z.shape[:-1]."""
        mean, logvar = self.decode(z)
        return Independent(Normal(mean, (0.5 * logvar).exp()), 1)

    def model(self) -> LinearGaussian:
        """The exact model p(z) = N(0, I), p(x|z) = N(Wz + b, exp(logvar)), sharing parameters."""
        return LinearGaussian(self.mean.weight, self.mean.bias, self.logvar.exp())


class LinearVAE(NamedTuple):
    """An encoder, a decoder and a batch of data ``x`` (N, D): what the checker runs on."""

    encoder: LinearEncoder
    decoder: LinearDecoder
    x: torch.Tensor


def linear_vae(
    data_dim: int = 6,
    latent_dim: int = 3,
    num_data: int = 32,
    *,
    exact_encoder: bool = False,
    noise: str = "diagonal",
    seed: int = 0,
    dtype=torch.float64,
    device=None,
) -> LinearVAE:
    r"""A seeded linear VAE and a batch of data drawn from its decoder.

    The decoder's whitened weight Ψ^{-1/2} W = Q diag(s) has orthonormal columns Q scaled by
    s ∈ [1, 2], so the exact posterior covariance Σ = (I + W^⊤Ψ^{-1}W)^{-1} = diag(1/(1+s²))
    is diagonal and a diagonal encoder can represent the exact posterior
    μ(x) = Σ W^⊤Ψ^{-1}(x − b).

    Parameters
    ----------
    data_dim, latent_dim, num_data : int
        D, K and N, the number of rows of ``x``.
    exact_encoder : bool
        If True the encoder is the exact posterior: then every log-weight estimate
        (log p(x, z) − log q(z|x), and IWAE_k built from them) equals log p(x) draw by draw,
        with zero variance. An estimate that samples only the reconstruction term and adds
        the KL in closed form does not: its mean is log p(x), its variance that of
        log p(x|z). If False (default) the encoder is deliberately off
        (perturbed mean map, variances e^0.4 or e^-0.8 times the posterior's, a small
        x-dependence of the variance), so that the ELBO, IWAE_k and log p(x) all differ.
    noise : {"diagonal", "isotropic"}
        The decoder's noise variance: a (D,) vector or a scalar.
    seed : int
        Seeds every parameter and the data; the global random generator is not touched.
    """
    d, k = _check_dim(data_dim, "data_dim"), _check_dim(latent_dim, "latent_dim")
    n = _check_dim(num_data, "num_data")
    if k > d:
        raise ValueError(f"latent_dim must be at most data_dim = {d}, got {k}")
    if not isinstance(exact_encoder, bool):
        raise TypeError(f"exact_encoder must be a bool, got {describe(exact_encoder)}")
    device = torch.empty(0, device=device).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    options = {"dtype": dtype, "device": device, "generator": generator}

    decoder = LinearDecoder(k, d, noise=noise, dtype=dtype, device=device)
    encoder = LinearEncoder(d, k, dtype=dtype, device=device)
    with torch.no_grad():
        noise_logvar = torch.rand(decoder.logvar.shape, **options) * 2 - 1.5  # Ψ ∈ [e^-1.5, e^0.5]
        columns, _ = torch.linalg.qr(torch.randn(d, k, **options))
        scales = 1 + torch.rand(k, **options)
        whitened = columns * scales
        weight = (0.5 * noise_logvar).exp().expand(d).unsqueeze(-1) * whitened
        bias = torch.randn(d, **options)
        decoder.mean.weight.copy_(weight)
        decoder.mean.bias.copy_(bias)
        decoder.logvar.copy_(noise_logvar)
        # The data come first, so exact_encoder=True and False see the same x.
        x, _ = decoder.model().sample((n,), generator=generator)

        # The exact posterior, diagonal here: N(V x + c, Σ), Σ = diag(1/(1+s²)).
        encoder.load_exact_posterior_(decoder.model())
        if not exact_encoder:
            spread = encoder.mean.weight.abs().mean()
            encoder.mean.weight.add_(0.3 * spread * torch.randn(k, d, **options))
            encoder.mean.bias.add_(0.3 * torch.randn(k, **options))
            # Variances alternately e^0.4 times and e^-0.8 times the posterior's: all stay
            # below e^0.4 / 2 < 1, so log σ² < -0.29 never comes near 0.
            offsets = torch.where(torch.arange(k, device=device) % 2 == 0, 0.4, -0.8).to(dtype)
            encoder.logvar.bias.add_(offsets)
            encoder.logvar.weight.copy_(0.01 * torch.randn(k, d, **options))
    return LinearVAE(encoder, decoder, x)
