r"""Diagnoses: when a check fails, which common mistake explains the numbers exactly.

Each explanation is a hypothesis about the user's code that predicts the mean of their estimate
*exactly*, from toyvae's closed forms: a dropped ½ log 2π per dimension, a reduction over the
batch (a factor N or 1/N), a sign, the KL averaged over latent dimensions, a variance used as a
standard deviation, the IWAE's −log k, and the rest of :data:`toyvae.testing.bugs.CATALOG`. A
hypothesis *fits* when the estimate's mean is within the same z-threshold of its prediction as
the check applies to the target; all that fit are reported. With the rounding and Monte Carlo
errors of a default check (hundredths of a nat), different hypotheses predict values many
standard errors apart, so at most one fits in practice; when several do, all are named.

For the gradient, when it fails, the coordinates are grouped (by the parameter's module and by
whether the model or q depends on it), and q's group is compared with what a sample cut off
from q (``q.sample()``, ``z.detach()``) gives: zero for a log-weight estimator (the score's
mean), −∇ KL(q ‖ p(z)) for an analytic-KL one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from toyvae.bounds import check_call, elbo, kl_to_prior
from toyvae.gaussians import LOG_2PI
from toyvae.model import LinearGaussian

__all__ = ["ExactTerms", "Explanation", "exact_terms", "value_explanations"]

HALF_LOG_2PI = 0.5 * LOG_2PI


class ExactTerms(NamedTuple):
    """Per-row exact quantities the explanations are built from (float64, no gradient).

    Attributes
    ----------
    elbo, reconstruction, kl : tensors
        ELBO(q), E_q log p(x|z) and KL(q ‖ p(z)), one per row of x.
    log_det_q : tensor
        log det Σ_q per row.
    q_variances : tensor or None
        q's marginal variances (rows, K) when q is diagonal; None otherwise.
    rows, data_size, latent_size : int
        N (rows of x), D (numbers per row: T·D for a sequence) and K (latent size: T·K).
    model, x, q
        The model bound to x, x, and q in dense canonical form.
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    log_det_q: torch.Tensor
    q_variances: torch.Tensor | None
    rows: int
    data_size: int
    latent_size: int
    model: object
    x: torch.Tensor
    q: object


def exact_terms(model, x, q) -> ExactTerms:
    """The per-row terms of the exact ELBO of ``q`` at ``x``, without gradients."""
    with torch.no_grad():
        total = elbo(model, x, q).reshape(-1)
        bound, x, gq = check_call(model, x, q)
        kl = kl_to_prior(MultivariateNormal(gq.loc, scale_tril=gq.scale_tril), bound)
        kl = kl.expand(total.shape).reshape(-1)
        scale = gq.scale_tril
        diagonal = scale.diagonal(dim1=-2, dim2=-1)
        is_diagonal = bool((scale.tril(-1) == 0).all())
        variances = diagonal.square().expand(*total.shape, -1) if is_diagonal else None
        log_det = (2 * diagonal.log().sum(-1)).expand(total.shape).reshape(-1)
        return ExactTerms(
            elbo=total.double(),
            reconstruction=(total + kl).double(),
            kl=kl.double(),
            log_det_q=log_det.double(),
            q_variances=None if variances is None else variances.double(),
            rows=total.numel(),
            data_size=math.prod(bound.data_event_shape),
            latent_size=bound.latent_dim,
            model=bound,
            x=x,
            q=gq,
        )


class Explanation(NamedTuple):
    """A common mistake whose exact prediction fits the estimate's mean.

    Attributes
    ----------
    name : str
        A short identifier, e.g. ``"dropped_log_2pi"``, ``"reduction"``, ``"sign"``.
    expected : float
        The mean the estimate has under this hypothesis, in the user's units.
    z : float
        (mean − expected) / spread, with the check's spread.
    text : str
        What the mistake is and how to fix it.
    """

    name: str
    expected: float
    z: float
    text: str


class _Units(NamedTuple):
    sign: float
    reduction: str
    loss: bool
    k: int

    def __call__(self, rows: torch.Tensor) -> float:
        total = rows.mean() if self.reduction == "mean" else rows.sum()
        return self.sign * float(total)


def _constant_text(count: str, what: str, value: float) -> str:
    return f"off by exactly {count}·½ log 2π = {value:+.4g} nats: {what}"


def _candidates(t: ExactTerms, units: _Units, target: float, target_se: float):
    """(name, expected mean in user units, its standard error, text) for each hypothesis."""
    n, d, k = t.rows, t.data_size, t.latent_size
    ones = torch.ones_like(t.elbo)
    what = "ELBO" if units.k == 1 else f"IWAE_{units.k}"
    out = []

    # Sign: the loss −ELBO where the ELBO was declared, or the reverse.
    fix = "pass loss=False" if units.loss else "pass loss=True"
    got = f"the {what}" if units.loss else f"the loss −{what}"
    out.append(
        (
            "sign",
            -target,
            target_se,
            f"the estimate is −1 times the target: it is {got} "
            f"(a forgotten sign); {fix}, or negate it",
        )
    )

    # Reduction over the batch.
    if units.reduction in ("sum", "none") and n > 1:
        for s, tag in ((1, ""), (-1, " and negated")):
            out.append(
                (
                    "reduction",
                    s * target / n,
                    target_se / n,
                    f"the estimate is 1/N = 1/{n} times the target{tag}: it averages over "
                    f"the N = {n} rows of x instead of summing; pass reduction='mean'"
                    + (f" (and loss={not units.loss})" if s < 0 else ""),
                )
            )
    if units.reduction == "mean" and n > 1:
        for s, tag in ((1, ""), (-1, " and negated")):
            out.append(
                (
                    "reduction",
                    s * target * n,
                    target_se * n,
                    f"the estimate is N = {n} times the target{tag}: it sums over the rows "
                    "of x instead of averaging; pass reduction='sum'"
                    + (f" (and loss={not units.loss})" if s < 0 else ""),
                )
            )

    # Constants: a dropped −½ log 2π per dimension.
    named = {
        d: f"the −½ log 2π of each of the D = {d} data dimensions is missing from log p(x|z) "
        "(torch's gaussian_nll_loss(full=False), its default, drops it; so does dropping the "
        "constant from every density, since p(z)'s and q's cancel). Harmless for training, "
        "wrong next to log p(x)",
        k: f"the −½ log 2π of each of the K = {k} latent dimensions is missing from log p(z) "
        "but not from log q(z|x)",
        -k: f"the −½ log 2π of each of the K = {k} latent dimensions is missing from log q(z|x) "
        "but not from log p(z)",
        d + k: f"the −½ log 2π is missing from log p(x|z) and log p(z) (D + K = {d + k} "
        "dimensions) but not from log q(z|x)",
    }
    for count, text in named.items():
        offset = units(count * HALF_LOG_2PI * ones)
        label = {d: "N·D", k: "N·K", -k: "−N·K", d + k: "N·(D+K)"}[count]
        if units.reduction == "mean":
            label = label.replace("N·", "").replace("−N·", "−")
        out.append(
            ("dropped_log_2pi", target + offset, target_se, _constant_text(label, text, offset))
        )

    if units.k > 1:
        offset = units(math.log(units.k) * ones)
        out.append(
            (
                "iwae_missing_log_k",
                target + offset,
                target_se,
                f"off by exactly N·log k = {offset:+.4g} nats: log Σ w instead of "
                "log (1/k) Σ w; subtract log k (torch.logsumexp(log_w, 0) − math.log(k))",
            )
        )
        out.append(
            (
                "iwae_mean_of_log_weights",
                units(t.elbo),
                0.0,
                "the estimate's mean is the exact ELBO, not IWAE_k: it averages the log "
                "weights, (1/k) Σ log w, instead of taking log (1/k) Σ w (logsumexp)",
            )
        )
        return out

    recon, kl = t.reconstruction, t.kl
    out.append(
        (
            "kl_sign",
            units(recon + kl),
            0.0,
            "the estimate's mean is E log p(x|z) + KL(q ‖ p(z)): the KL is added, not subtracted",
        )
    )
    if k > 1:
        out.append(
            (
                "kl_averaged_over_latents",
                units(recon - kl / k),
                0.0,
                f"the estimate's mean is E log p(x|z) − KL/K: the KL is averaged over the "
                f"K = {k} latent dimensions (.mean(-1)) instead of summed",
            )
        )
    if d > 1:
        out.append(
            (
                "reconstruction_averaged_over_data",
                units(recon / d - kl),
                0.0,
                f"the estimate's mean is E log p(x|z)/D − KL: the reconstruction is "
                f"averaged over the D = {d} data dimensions (as an MSE is) instead of summed",
            )
        )
    out.append(
        (
            "kl_missing_log_det",
            units(recon - kl - 0.5 * t.log_det_q),
            0.0,
            "the estimate's mean is that of a KL without its log-determinant term: "
            "½ Σ (σ² + μ² − 1) is missing − log σ²",
        )
    )
    if n > 1 and units.reduction != "none":
        s = units.sign
        out.append(
            (
                "mixed_reduction",
                s * float(recon.sum() / n - kl.sum()),
                0.0,
                "the reconstruction is averaged over the batch but the KL summed over it",
            )
        )
        out.append(
            (
                "mixed_reduction",
                s * float(recon.sum() - kl.sum() / n),
                0.0,
                "the reconstruction is summed over the batch but the KL averaged over it",
            )
        )
    if t.q_variances is not None:
        variances = t.q_variances
        with torch.no_grad():
            q_std_as_var = Independent(Normal(t.q.loc, variances), 1)
            out.append(
                (
                    "variance_as_scale",
                    units(elbo(t.model, t.x, q_std_as_var).reshape(-1)),
                    0.0,
                    "the estimate's mean is the ELBO of q with standard deviation σ²: "
                    "q's variance is passed where torch.distributions.Normal takes a "
                    "standard deviation (Normal(mean, var); use var.sqrt() or "
                    "(0.5 * logvar).exp())",
                )
            )
        log_var = variances.log()
        if bool((log_var != 0).all()):
            shift = 0.5 * (variances / log_var - 1).sum(-1)
            out.append(
                (
                    "log_variance_as_variance",
                    units(t.elbo + shift),
                    0.0,
                    "in log q(z|x) the log-variance stands where the variance should: "
                    "(z − μ)²/log σ² instead of (z − μ)²/σ²",
                )
            )
    if isinstance(t.model, LinearGaussian) and t.model.noise_kind in ("isotropic", "diagonal"):
        noise = t.model.noise_variance
        with torch.no_grad():
            squared = LinearGaussian(
                t.model.weight, t.model.bias, noise.square(), prior=t.model.prior()
            )
            q_dense = MultivariateNormal(t.q.loc, scale_tril=t.q.scale_tril)
            out.append(
                (
                    "variance_as_scale",
                    units(elbo(squared, t.x, q_dense).reshape(-1)),
                    0.0,
                    "the estimate's mean is the ELBO of a likelihood with noise variance "
                    "Ψ², not Ψ: the decoder's variance is passed where "
                    "torch.distributions.Normal takes a standard deviation",
                )
            )
            log_det_noise = float(noise.log().sum() if noise.ndim else d * noise.log())
            prior_log_det = float(2 * t.model.prior().scale_tril.diagonal().log().sum())
            quad_x = -2 * recon - d * LOG_2PI - log_det_noise
            quad_p = 2 * kl + k - prior_log_det + t.log_det_q
            out.append(
                (
                    "missing_half",
                    units(t.elbo - 0.5 * quad_x - 0.5 * quad_p + 0.5 * k),
                    0.0,
                    "the estimate's mean is that of Gaussian log-densities with the "
                    "½ missing on the square: −½ (log 2π + log σ²) − (x − μ)²/σ²",
                )
            )
    return out


def value_explanations(
    terms: ExactTerms,
    *,
    mean: float,
    standard_error: float,
    target: float,
    target_se: float,
    threshold: float,
    rounding_unit: float,
    magnitude: float,
    sign: float,
    reduction: str,
    loss: bool,
    k: int,
) -> tuple[Explanation, ...]:
    """Every hypothesis whose exact prediction is within ``threshold`` of the estimate's mean.

    The spread is the check's: √(SE² + SE_expected² + r²) with r = rounding_unit·(M + |expected|).
    Sorted by |z|. Non-finite means fit nothing.
    """
    if not math.isfinite(mean):
        return ()
    units = _Units(sign, reduction, loss, k)
    fits = []
    for name, expected, expected_se, text in _candidates(terms, units, target, target_se):
        if not math.isfinite(expected):
            continue
        rounding = rounding_unit * (magnitude + abs(expected))
        spread = math.sqrt(standard_error**2 + expected_se**2 + rounding**2)
        spread = max(spread, torch.finfo(torch.float64).tiny)
        z = (mean - expected) / spread
        if abs(z) <= threshold:
            fits.append(Explanation(name, expected, z, text))
    fits.sort(key=lambda e: abs(e.z))
    # The same prediction reached two ways (e.g. −target twice) is reported once.
    unique, seen = [], set()
    for e in fits:
        key = (e.name, round(e.expected, 9))
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return tuple(unique)
