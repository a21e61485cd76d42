"""The ``--model`` file format: a linear-Gaussian model (and optionally its data) in one ``.npz``.

A NumPy ``.npz`` archive, written without pickling, with exactly the keys ``weight`` (D, K),
``bias`` (D,), ``noise_variance`` (a scalar variance σ², a (D,) vector of variances or a (D, D)
covariance) and optionally ``x`` (N, D), the data. :func:`save` writes it, :func:`read` reads
model and data, :func:`load` the model alone; ``toyvae report --model FILE`` reads the same.
Every problem with a file is a ``ValueError`` whose one-line message names the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from toyvae._checks import describe
from toyvae.model import LinearGaussian

__all__ = ["ModelFile", "load", "read", "save"]

REQUIRED = ("weight", "bias", "noise_variance")
"""The keys every model file has; ``x`` is the one optional key."""


class ModelFile(NamedTuple):
    """What a model file holds.

    Attributes
    ----------
    model : LinearGaussian
        The model, float64, with the standard prior N(0, I).
    x : tensor or None
        The data (N, D) saved with it, or ``None``.
    """

    model: LinearGaussian
    x: torch.Tensor | None


def save(model: LinearGaussian, path, *, x=None) -> Path:
    """Write ``model`` (and the data ``x``, if given) to ``path`` in the ``--model`` format.

    The file is written at exactly ``path`` (no suffix is added); parameters are detached and
    stored as float64 NumPy arrays. Only a :class:`toyvae.LinearGaussian` with the standard
    prior N(0, I) fits the format. Returns the path.

    Raises
    ------
    TypeError
        ``model`` is not a ``LinearGaussian``.
    ValueError
        ``model`` has another prior, or ``x`` is not an (N, D) matrix with N ≥ 1 finite rows.
    """
    if not isinstance(model, LinearGaussian):
        raise TypeError(f"model must be a toyvae.LinearGaussian, got {type(model).__name__}")
    prior = model.prior()
    eye = torch.eye(model.latent_dim, dtype=model.dtype, device=model.device)
    if not (bool((prior.loc == 0).all()) and bool((prior.scale_tril == eye).all())):
        raise ValueError(
            "model must have the standard prior N(0, I) to be saved (the file format has no "
            "prior), got another prior"
        )
    arrays = {
        name: getattr(model, name).detach().cpu().double().numpy()
        for name in ("weight", "bias", "noise_variance")
    }
    if x is not None:
        arrays["x"] = _data(model, x).detach().cpu().double().numpy()
    path = Path(path)
    with path.open("wb") as file:
        np.savez(file, **arrays)
    return path


def _data(model: LinearGaussian, x) -> torch.Tensor:
    x = model.check_data(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be an (N, D) matrix with N ≥ 1 rows, got {describe(x)}")
    return x


# The first bytes of the formats a user is likely to hand over instead of an .npz.
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")
_NPY = b"\x93NUMPY"


def _arrays(path: Path) -> dict:
    """The archive's arrays, or a ValueError whose message says what the file is instead."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected an .npz file")
    try:
        with path.open("rb") as file:
            head = file.read(8)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not head:
        raise ValueError(f"{path}: empty file, expected an .npz archive (numpy.savez)")
    if head.startswith(_NPY):
        raise ValueError(
            f"{path}: a single NumPy array (.npy), expected an .npz archive with keys "
            f"{', '.join(REQUIRED)} (numpy.savez or toyvae.io.save)"
        )
    if not head.startswith(_ZIP):
        raise ValueError(
            f"{path}: not an .npz archive (numpy.savez or toyvae.io.save write one); it starts "
            f"with {head[:4]!r}"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        reason = "an entry holds pickled objects" if "pickle" in str(error) else str(error)
        raise ValueError(f"{path}: not a readable .npz archive ({reason})") from None


def read(path) -> ModelFile:
    """The model and, if the file has one, the data x of a model file.

    Every key is validated as :class:`toyvae.LinearGaussian` validates it. Raises
    ``ValueError`` with a one-line message naming the file and the problem: no such file, a
    directory, an empty file, a ``.npy`` array or another format, a missing or unknown key, a
    wrong shape, a non-positive variance, a non-finite entry.
    """
    path = Path(path)
    arrays = _arrays(path)
    missing = [key for key in REQUIRED if key not in arrays]
    if missing:
        raise ValueError(
            f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"expected {', '.join(REQUIRED)} and optionally x (found: "
            f"{', '.join(sorted(arrays)) or 'nothing'})"
        )
    unknown = sorted(set(arrays) - {*REQUIRED, "x"})
    if unknown:
        raise ValueError(
            f"{path}: unexpected key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"expected {', '.join(REQUIRED)} and optionally x"
        )
    try:
        model = LinearGaussian(arrays["weight"], arrays["bias"], arrays["noise_variance"])
        x = _data(model, arrays["x"]) if "x" in arrays else None
    except (TypeError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"{path}: {message}") from None
    return ModelFile(model, x)


def load(path) -> LinearGaussian:
    """The model of a model file (:func:`read` without the data)."""
    return read(path).model
