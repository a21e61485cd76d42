"""Argument validation in one place: errors name the argument, what it got, what was expected."""

from __future__ import annotations

import numbers

import numpy as np
import torch


def describe(value) -> str:
    """A short description of ``value`` for error messages: shape and dtype, or the value."""
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.ndim == 0:
            return f"{value.item()!r} ({value.dtype})"
        return f"an array of shape {tuple(value.shape)} ({value.dtype})"
    return f"{value!r} of type {type(value).__name__}"


def as_tensor(value, name: str, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Convert ``value`` to a floating-point tensor.

    NumPy arrays and Python numbers become float64, unless ``like`` is given, in which case
    the result takes ``like``'s dtype and device. Tensors keep their dtype (integer tensors are
    promoted to float64) and, without ``like``, their device; without ``like`` the dtype must
    be float32 or float64 (``TypeError`` for float16 and bfloat16).
    """
    if isinstance(value, torch.Tensor):
        tensor = value
        if not tensor.is_floating_point():
            if tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(
                    f"{name} must be a real floating-point array, got {describe(value)}"
                )
            tensor = tensor.to(torch.float64)
    elif isinstance(value, np.ndarray | numbers.Real | list | tuple):  # bool: rejected by kind
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real numeric array, got {describe(array)}")
        # A copy, never a view: a model must not change when the caller edits their array.
        tensor = torch.tensor(array, dtype=torch.float64)
    else:
        raise TypeError(
            f"{name} must be a torch tensor, a NumPy array or a real number, got {describe(value)}"
        )
    if like is not None:
        return tensor.to(dtype=like.dtype, device=like.device)
    if tensor.dtype not in (torch.float32, torch.float64):
        # This argument sets the dtype everything is computed in; the factorisations toyvae
        # needs (Cholesky, QR, triangular solves) exist in float32 and float64 only.
        raise TypeError(
            f"{name} must be float32 or float64 (it sets the dtype of every exact computation, "
            f"and the factorisations they need exist in these only), got {describe(value)}; "
            f"convert it with .double() or .float()"
        )
    return tensor


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``tensor`` holds a NaN or an infinity."""
    # A finite sum proves every entry finite (a NaN or ±inf entry makes the sum NaN or ±inf),
    # at the cost of one read of the data; only a sum that is not finite, which includes the
    # rare overflow of finite entries, needs the elementwise look below.
    if bool(torch.isfinite(tensor.detach().sum())):
        return
    bad = ~torch.isfinite(tensor.detach())
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(
            f"{name} must be finite, got {count} NaN or infinite "
            f"entr{'y' if count == 1 else 'ies'} in {describe(tensor)}"
        )


def check_ndim(tensor: torch.Tensor, name: str, ndims: tuple[int, ...], expected: str) -> None:
    """Raise ``ValueError`` unless ``tensor.ndim`` is one of ``ndims``."""
    if tensor.ndim not in ndims:
        raise ValueError(f"{name} must be {expected}, got {describe(tensor)}")


def check_last_dim(tensor: torch.Tensor, name: str, size: int, what: str) -> None:
    """Raise ``ValueError`` unless ``tensor``'s last dimension exists and has size ``size``."""
    if tensor.ndim == 0 or tensor.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {size} ({what}), got {describe(tensor)}")


def check_positive(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every entry of ``tensor`` is strictly positive."""
    bad = tensor.detach() <= 0
    if bool(bad.any()):
        smallest = tensor.detach().min().item()
        raise ValueError(f"{name} must be strictly positive, got a smallest entry of {smallest!r}")


def check_symmetric(matrix: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``matrix`` is symmetric to a few ulps of its largest entry."""
    m = matrix.detach()
    asymmetry = (m - m.mT).abs().max().item()
    # A symmetric matrix written out in floating point is exactly symmetric; allow a few ulps of
    # the largest entry for matrices that went through arithmetic (A @ A.T is symmetric to
    # about K ulps).
    allowed = 64 * torch.finfo(m.dtype).eps * m.abs().max().item()
    if asymmetry > allowed:
        raise ValueError(
            f"{name} must be symmetric, got a (D, D) matrix whose largest |M - M.T| entry is "
            f"{asymmetry:.3g} (allowed: {allowed:.3g})"
        )


def cholesky(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """Lower Cholesky factor of ``matrix``, or ``ValueError`` saying it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        eigenvalues = torch.linalg.eigvalsh(matrix.detach())
        raise ValueError(
            f"{name} must be positive definite, got a matrix with smallest eigenvalue "
            f"{eigenvalues.min().item():.3g} and largest {eigenvalues.max().item():.3g}"
        )
    return factor


def broadcast_batch(**shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of the named batch shapes, or ``ValueError`` quoting them all.

    NumPy's rule, which torch follows; ``np.broadcast_shapes`` because
    ``torch.broadcast_shapes`` imports torch's symbolic-shape machinery (about a second) on
    its first call.
    """
    try:
        return tuple(np.broadcast_shapes(*(tuple(s) for s in shapes.values())))
    except ValueError:
        quoted = " and ".join(f"{name} {tuple(s)}" for name, s in shapes.items())
        raise ValueError(f"batch shapes must broadcast together, got {quoted}") from None


def check_count(value, name: str, minimum: int = 1, why: str = "") -> int:
    """``value`` as an int; ``TypeError``/``ValueError`` unless it is an integer ≥ ``minimum``."""
    expected = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}{why}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}{why}, got {value}")
    return int(value)


def check_affine_map(weight, bias, rows: str, columns: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the matrix and offset of an affine map v ↦ weight @ v + bias.

    ``weight`` must be a finite (rows, columns) matrix with both sizes ≥ 1; ``bias`` a finite
    vector of length ``rows`` (zeros when ``None``), converted to weight's dtype and device.
    ``rows`` and ``columns`` name the sizes in messages, e.g. ``"D"`` and ``"K"``.
    """
    weight = as_tensor(weight, "weight")
    check_ndim(weight, "weight", (2,), f"a ({rows}, {columns}) matrix")
    n_rows, n_columns = weight.shape
    if n_rows == 0 or n_columns == 0:
        raise ValueError(
            f"weight must have {rows} ≥ 1 rows and {columns} ≥ 1 columns, got {describe(weight)}"
        )
    check_finite(weight, "weight")
    if bias is None:
        bias = torch.zeros(n_rows, dtype=weight.dtype, device=weight.device)
    bias = as_tensor(bias, "bias", like=weight)
    if bias.shape != (n_rows,):
        raise ValueError(
            f"bias must have shape ({n_rows},) to match weight ({rows}, {columns}) = "
            f"({n_rows}, {n_columns}), got {describe(bias)}"
        )
    check_finite(bias, "bias")
    return weight, bias
