r"""The verdict on a fit: is a user's model at a stationary point of the exact log-likelihood?

For a :class:`toyvae.LinearGaussian` with the standard prior and the data it was fitted to, the
gradient of the mean log p(x) in W, b and Ψ, by autograd of the exact
:meth:`~toyvae.LinearGaussian.log_evidence` over every data row, against what zero means in
floating point. With C = WWᵀ + Ψ and yₙ = C⁻¹(xₙ − b), each gradient is a difference of two
terms that cancel at a stationary point:

    ∇_W = −C⁻¹W + mean yₙyₙᵀW,   ∇_b = mean yₙ,   ∇_Ψ = −½C⁻¹ + ½ mean yₙyₙᵀ

(for a diagonal Ψ its diagonal, for σ²I its trace). Each entry is held to
κ(C)·4(D+K)·eps times the sum of the two terms' absolute values, computed densely, the
tolerance of the fixed PPCA problem's stationarity row. A maximum-likelihood fit passes;
an optimiser that stopped early does not, and the row shows by how much.

A feature that is constant in the data makes the likelihood unbounded (log p → ∞ as its
variance → 0), so no maximum exists there; for a diagonal Ψ such features are left out and the
verdict is on the marginal model of the others (exact: dropping a feature with diagonal Ψ is
marginalising it), as the section's description says.
"""

from __future__ import annotations

import torch

from toyvae.model import LinearGaussian
from toyvae.report.rows import Row, rounding_unit, skip, worst

__all__ = ["MAX_FIT_DIM", "fit_verdict"]

MAX_FIT_DIM = 4000
"""The verdict forms C = WWᵀ + Ψ densely (O(D³)): above this D it is skipped."""

PROPERTIES = ("fit: ∇W mean log p = 0", "fit: ∇b mean log p = 0", "fit: ∇Ψ mean log p = 0")


def _constant_features(x: torch.Tensor) -> torch.Tensor:
    """Indices of the columns of x whose entries are all equal."""
    return (x.amax(0) == x.amin(0)).nonzero().reshape(-1)


def fit_verdict(model: LinearGaussian, x: torch.Tensor) -> tuple[str, list[Row]]:
    """``(description, rows)``: exact log p(x) per row (mean and worst) and the three gradient
    rows, for a model and the (N, D) data it was fitted to."""
    log_p = model.log_evidence(x).detach()
    worst_row = int(log_p.argmin())
    n, d = x.shape
    description = (
        f"exact log p(x) over all {n} data rows: mean {float(log_p.mean()):.6g}, worst "
        f"{float(log_p[worst_row]):.6g} (row {worst_row})"
    )
    if d > MAX_FIT_DIM:
        why = f"skipped: the verdict forms the D×D covariance, D={d} > {MAX_FIT_DIM}"
        return description, [skip(prop, why) for prop in PROPERTIES]
    note = ""
    constant = _constant_features(x)
    if constant.numel() and model.noise_kind == "diagonal":
        keep = torch.ones(d, dtype=torch.bool, device=x.device)
        keep[constant] = False
        if not bool(keep.any()):
            why = "skipped: every feature is constant in the data (log p(x) is unbounded)"
            return description, [skip(prop, why) for prop in PROPERTIES]
        listed = ", ".join(str(int(i)) for i in constant[:8])
        listed += ", …" if constant.numel() > 8 else ""
        note = (
            f"; {constant.numel()} constant feature{'s' if constant.numel() > 1 else ''} "
            f"({listed}) left out: log p(x) grows without bound as their variance → 0, so the "
            f"verdict is on the marginal model of the other {int(keep.sum())}"
        )
        model = LinearGaussian(model.weight[keep], model.bias[keep], model.noise_variance[keep])
        x = x[:, keep]
    description += note
    return description, _gradient_rows(model, x)


def _gradient_rows(model: LinearGaussian, x: torch.Tensor) -> list[Row]:
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (model.weight, model.bias, model.noise_variance)
    ]
    gradients = torch.autograd.grad(LinearGaussian(*leaves).log_evidence(x).mean(), leaves)
    weight, bias = model.weight.detach(), model.bias.detach()
    cov = weight @ weight.mT + model.noise.dense().detach()
    eigenvalues = torch.linalg.eigvalsh(cov)
    inverse = torch.linalg.inv(cov)
    residual = (x - bias).mT  # (D, N)
    solved = inverse @ residual  # yₙ = C⁻¹(xₙ − b), columns
    n = x.shape[0]
    spread = solved.abs() @ solved.abs().mT / n  # mean |yₙ||yₙ|ᵀ, (D, D)
    noise_terms = 0.5 * (inverse.abs() + spread)
    kind = model.noise_kind
    if kind == "diagonal":
        noise_terms = noise_terms.diagonal()
    elif kind == "isotropic":
        noise_terms = noise_terms.diagonal().sum()
    sizes = [
        inverse.abs() @ weight.abs() + spread @ weight.abs(),
        (inverse.abs() @ residual.abs()).mean(1),
        noise_terms,
    ]
    g_weight, g_bias, g_noise = (g.detach() for g in gradients)
    if kind == "full":
        # Whatever of Ψ's two triangles the model reads, the symmetric part is the gradient
        # in the symmetric matrix Ψ.
        g_noise = 0.5 * (g_noise + g_noise.mT)
    scale = float(eigenvalues.max() / eigenvalues.min()) * rounding_unit(model)
    reason = (
        "κ(C)·4(D+K)·eps·Σ|terms| entrywise (the two terms cancel at a maximum); the entry "
        "with the largest error/tolerance"
    )
    rows = []
    gradients = (g_weight, g_bias, g_noise)
    errors = _standard_errors(model, solved)
    for prop, g, size, error in zip(PROPERTIES, gradients, sizes, errors, strict=True):
        z = float((g.abs() / error.clamp_min(torch.finfo(g.dtype).tiny)).max())
        rows.append(worst(prop, g.abs(), scale * size, f"{reason}; max |∇|/s.e. = {z:.2g}"))
    return rows


def _standard_errors(model: LinearGaussian, solved: torch.Tensor):
    """The standard errors of the three gradients as means over the rows: sd(gₙ)/√N entrywise.

    The per-row gradients are −C⁻¹W + yₙ(Wᵀyₙ)ᵀ, yₙ and −½C⁻¹ + ½yₙyₙᵀ; only the second terms
    vary with n. A gradient smaller than its standard error is below what the data can resolve:
    another optimiser step would move the parameters by less than their own sampling noise.
    """
    n = solved.shape[1]
    y = solved  # (D, N)
    v = model.weight.detach().mT @ y  # (K, N): Wᵀyₙ

    def sd(mean_of_squares, mean):
        return (mean_of_squares - mean.square()).clamp_min(0).sqrt() / n**0.5

    weight = sd(y.square() @ v.square().mT / n, y @ v.mT / n)
    bias = sd(y.square().mean(1), y.mean(1))
    kind = model.noise_kind
    if kind == "full":
        noise = 0.5 * sd(y.square() @ y.square().mT / n, y @ y.mT / n)
    elif kind == "diagonal":
        noise = 0.5 * sd(y.pow(4).mean(1), y.square().mean(1))
    else:
        squares = y.square().sum(0)
        noise = 0.5 * sd(squares.square().mean(), squares.mean())
    return weight, bias, noise
