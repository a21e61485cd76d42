"""The built-in models of ``toyvae report``, and ``--model FILE`` (an ``.npz``) for a user's own.

The built-in models are fixed (built from their own seeds, independent of ``--seed``), so their
one-line descriptions and the tolerances derived from them are the same in every run; ``--seed``
drives the data, the variational distributions and the Monte Carlo draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from toyvae.hierarchical import HierarchicalLinearGaussian
from toyvae.interface import ConjugateModel
from toyvae.io import read
from toyvae.model import LinearGaussian
from toyvae.state_space import LinearGaussianSSM

__all__ = ["Case", "builtin_models", "load_model"]


class Case(NamedTuple):
    """A model to run the battery on, its one-line description, and optionally its data.

    Attributes
    ----------
    name : str
        The model's name in the table (``ppca``, or a ``--model`` file's stem).
    description : str
        One line: the family, its sizes and what is special about it.
    model : ConjugateModel
        Any model family of :class:`toyvae.ConjugateModel`.
    x : tensor or None
        The data, (*batch, *data_event_shape); sampled from the model when ``None``.
    """

    name: str
    description: str
    model: ConjugateModel
    x: torch.Tensor | None = None


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ppca() -> Case:
    rng = _rng(1)
    d, k = 20, 3
    model = LinearGaussian(rng.normal(size=(d, k)), rng.normal(size=d), 0.5)
    return Case("ppca", f"probabilistic PCA: D={d}, K={k}, isotropic Ψ = 0.5·I", model)


def _factor_analysis() -> Case:
    rng = _rng(2)
    d, k = 30, 4
    variances = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=d))
    model = LinearGaussian(rng.normal(size=(d, k)), rng.normal(size=d), variances)
    return Case(
        "factor-analysis",
        f"factor analysis: D={d}, K={k}, diagonal Ψ with variances log-uniform in [0.1, 10]",
        model,
    )


def _full_noise() -> Case:
    rng = _rng(3)
    d, k = 12, 4
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eigenvalues = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=d))
    psi = (basis * eigenvalues) @ basis.T
    model = LinearGaussian(rng.normal(size=(d, k)), rng.normal(size=d), 0.5 * (psi + psi.T))
    return Case(
        "full-noise",
        f"full-covariance noise: D={d}, K={k}, dense Ψ with eigenvalues in [0.2, 5]",
        model,
    )


def _high_dimensional(data_dim: int) -> Case:
    rng = _rng(4)
    k = 8
    variances = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=data_dim))
    weight = rng.normal(size=(data_dim, k)) / np.sqrt(k)
    model = LinearGaussian(weight, rng.normal(size=data_dim), variances)
    return Case(
        "high-dimensional",
        f"high-dimensional: D={data_dim}, K={k}, diagonal Ψ with variances in [0.5, 2]",
        model,
    )


def _ill_conditioned() -> Case:
    rng = _rng(5)
    d, k = 10, 3
    left, _ = np.linalg.qr(rng.normal(size=(d, k)))
    right, _ = np.linalg.qr(rng.normal(size=(k, k)))
    singular = np.array([1e2, 1.0, 1e-2])
    weight = (left * singular) @ right.T
    model = LinearGaussian(weight, rng.normal(size=d), 1e-2)
    precision = np.eye(k) + weight.T @ weight / 1e-2
    kappa = np.linalg.cond(precision)
    return Case(
        "ill-conditioned",
        f"ill-conditioned: D={d}, K={k}, W with singular values 1e2, 1, 1e-2, Ψ = 0.01·I "
        f"(posterior precision κ = {kappa:.1e})",
        model,
    )


def _hierarchical() -> Case:
    rng = _rng(6)
    d, sizes = 6, (2, 2)
    variances = np.exp(rng.uniform(np.log(0.2), np.log(2.0), size=d))
    model = HierarchicalLinearGaussian(
        [rng.normal(size=(d, sizes[0])), rng.normal(size=sizes)],
        [rng.normal(size=d), rng.normal(size=sizes[0])],
        [variances, 0.5],
    )
    return Case(
        "hierarchical",
        f"hierarchical: z₂ → z₁ → x, D={d}, K₁={sizes[0]}, K₂={sizes[1]}, diagonal Ψ₀ in "
        "[0.2, 2], Ψ₁ = 0.5·I",
        model,
    )


def _state_space() -> Case:
    rng = _rng(7)
    d, k, steps = 3, 1, 4
    variances = np.exp(rng.uniform(np.log(0.2), np.log(2.0), size=d))
    model = LinearGaussianSSM(
        np.full((k, k), 0.9),
        0.3,
        rng.normal(size=(d, k)),
        variances,
        emission_bias=rng.normal(size=d),
        num_steps=steps,
    )
    return Case(
        "state-space",
        f"state space: T={steps}, D={d}, K={k} (T·K={steps * k} latents), A = 0.9, Q = 0.3, "
        "diagonal R in [0.2, 2]",
        model,
    )


def builtin_models(*, quick: bool = False) -> list[Case]:
    """PPCA, factor analysis, full Ψ, a high-dimensional and an ill-conditioned model, then a
    hierarchical and a state-space model (on which the linear-Gaussian rows are skipped)."""
    return [
        _ppca(),
        _factor_analysis(),
        _full_noise(),
        _high_dimensional(1000 if quick else 2000),
        _ill_conditioned(),
        _hierarchical(),
        _state_space(),
    ]


def load_model(path) -> Case:
    """Read a model (and optionally data) from an ``.npz`` file (:func:`toyvae.io.read`).

    Keys: ``weight`` (D, K), ``bias`` (D,), ``noise_variance`` (a scalar variance σ², a (D,)
    vector of variances or a (D, D) covariance), and optionally ``x`` (N, D) data; without
    ``x`` the data are sampled from the model. Raises ``ValueError`` with a one-line message
    naming the file and what is wrong.
    """
    path = Path(path)
    model, x = read(path)
    d, k = model.weight.shape
    source = f"{x.shape[0]} data points from the file" if x is not None else "sampled data"
    return Case(
        path.stem,
        f"from {path.name}: D={d}, K={k}, {model.noise_kind} Ψ, {source}",
        model,
        x,
    )
