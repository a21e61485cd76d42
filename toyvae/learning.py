r"""Is maximising the ELBO the same as maximising log p(x)? Exact answers for linear models.

The ELBO is log p_θ(x) − KL(q ‖ p_θ(z|x)). Ascending it in θ with q held at the exact posterior
follows ∇_θ log p_θ(x) exactly (Fisher's identity). With a restricted family for q it does not:
the KL term rewards models whose posteriors the family fits, at the expense of log p_θ(x). This
module gives what is needed to measure that:

- :func:`best_mean_field`, the best diagonal-covariance q per data point, in closed form;
- :func:`inference_gaps`, the approximation and amortisation gaps of Cremer et al. (2018);
- :func:`counterexample_objectives` and :func:`counterexample_optima`, the two-latent model
  x = w(z₁ + z₂) + ε on which mean-field ELBO ascent lowers log p(x);
- :func:`ppca_maximum_likelihood`, the closed-form ML solution of Tipping & Bishop (1999);
- :func:`fit_linear_vae`, ELBO ascent of a linear VAE, with the exact ELBO or the
  single-sample estimator, returning its history of exact ELBO and log p(x).
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch
from torch.distributions import Independent, MultivariateNormal, Normal
from tqdm.auto import tqdm

from toyvae._checks import as_tensor, check_finite, check_ndim, check_positive, describe
from toyvae.aggregate import LinearGaussianEncoder, _check_model
from toyvae.bounds import _check_inputs, elbo
from toyvae.model import LinearGaussian

__all__ = [
    "CounterexampleObjectives",
    "CounterexampleOptima",
    "Fit",
    "Gaps",
    "History",
    "best_mean_field",
    "counterexample_model",
    "counterexample_objectives",
    "counterexample_optima",
    "data_with_spectrum",
    "fit_linear_vae",
    "inference_gaps",
    "ppca_maximum_likelihood",
]


# -- the best member of a family, and the gaps -------------------------------------------------


def best_mean_field(model: LinearGaussian, x) -> Independent:
    r"""The mean-field q* = N(m, diag s²) that maximises the ELBO at each x, in closed form.

    .. math::
        m = \mu(x), \qquad s_i^2 = 1 / \Lambda_{ii}, \qquad \Lambda = I + W^\top\Psi^{-1}W

    The ELBO is a quadratic in m completed around the posterior mean μ whatever the covariance,
    and its covariance part −½[tr(Λ diag s²) − Σ log s_i²] is maximised coordinate by coordinate.
    The gap it leaves, KL(q* ‖ p(z|x)) = ½[Σ log Λ_ii − log det Λ], does not depend on x.
    """
    _check_model(model)
    loc = model.posterior(x).loc
    scale = model.posterior_precision().diagonal().rsqrt()
    return Independent(Normal(loc, scale.expand_as(loc)), 1)


class Gaps(NamedTuple):
    """log p(x) − ELBO(q) = approximation + amortisation (Cremer et al. 2018), per data point."""

    approximation: torch.Tensor  # log p(x) − ELBO(q*), q* the family's best member at x
    amortisation: torch.Tensor  # ELBO(q*) − ELBO(q), q the encoder's output at x


def inference_gaps(model: LinearGaussian, x, q, *, family: str = "diagonal") -> Gaps:
    r"""The approximation and amortisation gaps of q at x, exactly.

    .. math::
        \log p(x) - \mathrm{ELBO}(q)
        = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation}}
        + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q)}_{\text{amortisation}}

    Parameters
    ----------
    model : LinearGaussian
    x : (..., D) tensor
    q : MultivariateNormal or Independent(Normal, 1)
        The encoder's output at x, for example ``encoder(x)``.
    family : {"diagonal", "full"}
        The family q belongs to, which defines q*: the best mean-field Gaussian
        (:func:`best_mean_field`), or the exact posterior, whose approximation gap is zero.
    """
    x, _ = _check_inputs(model, x, q)
    if family == "diagonal":
        best = best_mean_field(model, x)
    elif family == "full":
        best = model.posterior(x)
    else:
        raise ValueError(f"family must be 'diagonal' or 'full', got {family!r}")
    best_elbo = elbo(model, x, best)
    return Gaps(model.log_evidence(x) - best_elbo, best_elbo - elbo(model, x, q))


# -- the counterexample: x = w (z₁ + z₂) + ε ---------------------------------------------------


def counterexample_model(weight) -> LinearGaussian:
    """x = w (z₁ + z₂) + ε, ε ~ N(0, 1), z ~ N(0, I₂): W = [[w, w]], b = 0, Ψ = 1."""
    w = as_tensor(weight, "weight")
    check_ndim(w, "weight", (0,), "a scalar")
    return LinearGaussian(torch.stack([w, w]).unsqueeze(0), noise_variance=1.0)


class CounterexampleObjectives(NamedTuple):
    """Per-datum averages over data with E[x²] = s, at one weight w."""

    log_likelihood: torch.Tensor  # E log p_w(x)
    elbo: torch.Tensor  # E ELBO(q*), q* the best mean-field Gaussian at each x


def counterexample_objectives(weight, second_moment=3.0) -> CounterexampleObjectives:
    r"""Average log-likelihood and best mean-field ELBO of the counterexample at w.

    Both are quadratics in x with no linear term (b = 0), so their averages depend on the data
    only through s = E[x²]: the two points x = ±√s stand for any data set with that moment.
    Computed with :meth:`LinearGaussian.log_evidence`, :func:`best_mean_field` and
    :func:`toyvae.elbo`; in closed form (docs/elbo-vs-likelihood.md),

    .. math::
        \mathbb E\log p_w(x) = -\tfrac12\Big[\log 2\pi + \log(1 + 2w^2) + \frac{s}{1 + 2w^2}\Big],
        \qquad
        \mathbb E\,\mathrm{ELBO}(q^*) = -\tfrac12\Big[\log 2\pi + 2\log(1 + w^2)
            + \frac{s}{1 + 2w^2}\Big].
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
    maximum_likelihood: float  # the w > 0 that maximises E log p_w(x)
    maximum_elbo: float  # the w > 0 that maximises the best mean-field ELBO


def counterexample_optima(second_moment: float = 3.0) -> CounterexampleOptima:
    """Both maximisers over w > 0, found numerically (bounded Brent search to ~1e-10 in w).

    The closed forms, derived in docs/elbo-vs-likelihood.md, are w² = (s − 1)/2 and
    w² = [s − 4 + √(s² + 8s)]/8; the tests compare the two.
    """
    if not isinstance(second_moment, int | float) or not second_moment > 1:
        raise ValueError(
            f"second_moment must be a number > 1 (else maximum likelihood puts w = 0), "
            f"got {describe(second_moment)}"
        )
    upper = 2 * math.sqrt(second_moment)  # beyond both optima: w² ≤ (s − 1)/2 < s

    def maximiser(field: str) -> float:
        def loss(w: float) -> float:
            return -float(getattr(counterexample_objectives(w, second_moment), field))

        options = {"xatol": 1e-12}
        return scipy.optimize.minimize_scalar(
            loss, bounds=(0.0, upper), method="bounded", options=options
        ).x

    return CounterexampleOptima(maximiser("log_likelihood"), maximiser("elbo"))


# -- probabilistic PCA: the maximum-likelihood solution -----------------------------------------


def _check_data(x) -> torch.Tensor:
    x = as_tensor(x, "x")
    check_ndim(x, "x", (2,), "an (N, D) data set")
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 data points, got {describe(x)}")
    check_finite(x, "x")
    return x


def _check_latent_dim(latent_dim, data_dim: int) -> int:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int):
        raise TypeError(f"latent_dim must be an int, got {describe(latent_dim)}")
    if not 1 <= latent_dim < data_dim:
        raise ValueError(
            f"latent_dim must be in [1, D − 1] = [1, {data_dim - 1}], got {latent_dim}"
        )
    return latent_dim


def data_with_spectrum(eigenvalues, n: int = 100, seed: int = 0) -> torch.Tensor:
    """n float64 points whose sample covariance has exactly the given eigenvalues.

    Standard-normal draws are whitened exactly (by the Cholesky factor of their sample
    covariance), scaled by √λ, rotated by a random orthogonal matrix and shifted by a random
    mean, so that the PPCA maximum-likelihood solution is known in closed form.
    """
    gen = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    raw = torch.randn(n, d, dtype=torch.float64, generator=gen)
    raw = raw - raw.mean(0)
    cov = raw.mT @ raw / n
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), raw.mT, upper=False).mT
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    scales = torch.tensor(eigenvalues, dtype=torch.float64).sqrt()
    return (white * scales) @ rotation.mT + torch.randn(d, dtype=torch.float64, generator=gen)


def ppca_maximum_likelihood(x, latent_dim: int, *, noise_variance=None) -> LinearGaussian:
    r"""The maximum-likelihood probabilistic PCA model of the data x (N, D) (Tipping & Bishop 1999).

    With λ₁ ≥ … ≥ λ_D the eigenvalues of the sample covariance (1/N) Σ (x_n − x̄)(x_n − x̄)ᵀ
    and U_K the eigenvectors of the first K,

    .. math::
        b = \bar x, \qquad \sigma^2 = \frac{1}{D - K}\sum_{j > K}\lambda_j, \qquad
        W = U_K\,\operatorname{diag}\big(\max(\lambda_i - \sigma^2, 0)\big)^{1/2}

    up to a rotation W R, which leaves log p(x) unchanged. The columns of W are orthogonal, so
    the posterior covariance (I + WᵀW/σ²)⁻¹ is diagonal. If ``noise_variance`` is given, σ² is
    held at that value (Lucas et al. 2019): columns with λ_i ≤ σ² are then zero, and those
    latent directions collapse to the prior.
    """
    x = _check_data(x)
    n, d = x.shape
    k = _check_latent_dim(latent_dim, d)
    bias = x.mean(0)
    centred = x - bias
    # eigh returns ascending eigenvalues; flip to λ₁ ≥ … ≥ λ_D.
    eigenvalues, vectors = torch.linalg.eigh(centred.mT @ centred / n)
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    if noise_variance is None:
        noise = eigenvalues[k:].mean()
    else:
        noise = as_tensor(noise_variance, "noise_variance", like=x)
        check_ndim(noise, "noise_variance", (0,), "a scalar variance")
        check_finite(noise, "noise_variance")
        check_positive(noise, "noise_variance")
    weight = vectors[:, :k] * (eigenvalues[:k] - noise).clamp(min=0).sqrt()
    return LinearGaussian(weight, bias, noise)


# -- ELBO ascent of a linear VAE ----------------------------------------------------------------


class History(NamedTuple):
    """Per-step averages over the data, of exact quantities (whatever the training objective)."""

    elbo: np.ndarray  # (1/N) Σ ELBO(x_n, q_φ(z|x_n))
    log_likelihood: np.ndarray  # (1/N) Σ log p_θ(x_n)


class Fit(NamedTuple):
    model: LinearGaussian
    encoder: LinearGaussianEncoder
    history: History


class _LinearVAE(torch.nn.Module):
    """Decoder (W, b, log σ²) and encoder (V, c, L_S) as parameters; L_S diagonal or full."""

    def __init__(self, x, latent_dim, encoder, noise_variance, generator):
        super().__init__()
        d = x.shape[-1]
        options = {"dtype": x.dtype, "device": x.device}
        # Small random W breaks the rotation symmetry of W = 0, which is a saddle point.
        self.weight = torch.nn.Parameter(
            0.1 * torch.randn(d, latent_dim, generator=generator, **options)
        )
        self.bias = torch.nn.Parameter(x.mean(0).clone())
        log_noise = x.var(0).mean().log() if noise_variance is None else noise_variance.log()
        self.log_noise = torch.nn.Parameter(log_noise.clone(), requires_grad=noise_variance is None)
        self.encoder_weight = torch.nn.Parameter(torch.zeros(latent_dim, d, **options))
        self.encoder_bias = torch.nn.Parameter(torch.zeros(latent_dim, **options))
        self.log_scale = torch.nn.Parameter(torch.zeros(latent_dim, **options))
        self.full = encoder == "full"
        self.lower = torch.nn.Parameter(
            torch.zeros(latent_dim, latent_dim, **options), requires_grad=self.full
        )

    def model(self) -> LinearGaussian:
        return LinearGaussian(self.weight, self.bias, self.log_noise.exp())

    def scale_tril(self) -> torch.Tensor:
        strictly_lower = self.lower.tril(-1) if self.full else torch.zeros_like(self.lower)
        return strictly_lower + torch.diag(self.log_scale.exp())

    def q(self, x) -> MultivariateNormal:
        loc = x @ self.encoder_weight.mT + self.encoder_bias
        return MultivariateNormal(
            loc, scale_tril=self.scale_tril().expand(*loc.shape, loc.shape[-1])
        )


def _single_sample_elbo(model: LinearGaussian, x, q: MultivariateNormal, generator) -> torch.Tensor:
    """log p(x, z) − log q(z) at one reparameterised z = m + L ε per data point."""
    eps = torch.randn(q.loc.shape, dtype=q.loc.dtype, device=q.loc.device, generator=generator)
    z = q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    return model.log_joint(x, z) - q.log_prob(z)


def fit_linear_vae(
    x,
    latent_dim: int,
    *,
    encoder: str = "full",
    objective: str = "exact",
    noise_variance=None,
    steps: int = 2000,
    learning_rate: float = 0.02,
    seed: int = 0,
    progress: bool | None = None,
) -> Fit:
    r"""Train a linear VAE on x (N, D) by full-batch ascent of the average ELBO.

    Decoder p_θ(x|z) = N(Wz + b, σ²I), encoder q_φ(z|x) = N(Vx + c, L_S L_Sᵀ) with L_S
    lower-triangular (``encoder="full"``) or diagonal (``"diagonal"``): the linear VAE of
    Lucas et al. (2019). Its global optimum is the probabilistic PCA ML solution
    (:func:`ppca_maximum_likelihood`) with the exact posterior as encoder, up to a rotation
    for the full encoder; the diagonal encoder fixes the rotation in which the posterior is
    diagonal.

    Parameters
    ----------
    x : (N, D) tensor or array
    latent_dim : int
    encoder : {"full", "diagonal"}
    objective : {"exact", "single_sample"}
        The closed-form ELBO, maximised by L-BFGS (strong-Wolfe line search, one iteration per
        step), or its single-sample reparameterised estimator log p(x_n, z_n) − log q(z_n),
        z_n ~ q(z|x_n), one fresh draw per data point and step, maximised by Adam with the
        Robbins–Monro decay lr / √(1 + t/100) so that the gradient noise averages out.
    noise_variance : float, optional
        Hold σ² fixed at this value; learned (as log σ²) when ``None``.
    steps, learning_rate, seed :
        Number of steps, Adam's initial learning rate (single-sample objective only), and the
        seed of the initial W and of the draws.
    progress : bool, optional
        Show a tqdm progress bar; by default only when standard error is a terminal.

    Returns
    -------
    Fit
        The trained ``model`` and ``encoder`` (detached), and the ``history`` of the exact
        average ELBO and log p(x) before each step and after the last (``steps + 1`` values).
    """
    x = _check_data(x)
    k = _check_latent_dim(latent_dim, x.shape[-1])
    if encoder not in ("full", "diagonal"):
        raise ValueError(f"encoder must be 'full' or 'diagonal', got {encoder!r}")
    if objective not in ("exact", "single_sample"):
        raise ValueError(f"objective must be 'exact' or 'single_sample', got {objective!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {describe(steps)}")
    if not isinstance(learning_rate, int | float) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number, got {describe(learning_rate)}")
    if noise_variance is not None:
        noise_variance = as_tensor(noise_variance, "noise_variance", like=x)
        check_ndim(noise_variance, "noise_variance", (0,), "a scalar variance")
        check_finite(noise_variance, "noise_variance")  # inf would pass check_positive
        check_positive(noise_variance, "noise_variance")
    if progress is None:
        progress = sys.stderr.isatty()

    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    vae = _LinearVAE(x, k, encoder, noise_variance, generator)
    parameters = [p for p in vae.parameters() if p.requires_grad]
    if objective == "exact":
        # Deterministic gradients: L-BFGS with a strong-Wolfe line search, one iteration per
        # step (its curvature memory persists across calls), converges to rounding level.
        optimizer = torch.optim.LBFGS(
            parameters,
            lr=1.0,
            max_iter=1,
            max_eval=25,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
    else:
        # Noisy gradients: Adam with a Robbins–Monro decay lr / √(1 + t/100).
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (1 + t / 100) ** -0.5)

    def exact_loss() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -elbo(vae.model(), x, vae.q(x)).mean()
        loss.backward()
        return loss

    elbos, log_likelihoods = [], []
    for step in tqdm(range(steps + 1), desc=f"linear VAE ({objective})", disable=not progress):
        with torch.no_grad():
            model, q = vae.model(), vae.q(x)
            elbos.append(elbo(model, x, q).mean().item())
            log_likelihoods.append(model.log_evidence(x).mean().item())
        if step == steps:
            break
        if objective == "exact":
            optimizer.step(exact_loss)
        else:
            optimizer.zero_grad()
            model, q = vae.model(), vae.q(x)
            (-_single_sample_elbo(model, x, q, generator).mean()).backward()
            optimizer.step()
            schedule.step()

    with torch.no_grad():
        fitted = LinearGaussian(vae.weight.clone(), vae.bias.clone(), vae.log_noise.exp().clone())
        fitted_encoder = LinearGaussianEncoder(
            vae.encoder_weight.clone(), vae.encoder_bias.clone(), vae.scale_tril().clone()
        )
    return Fit(fitted, fitted_encoder, History(np.array(elbos), np.array(log_likelihoods)))
