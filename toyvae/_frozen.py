"""Immutable models: read-only attributes, and a loud error when a parameter changes in place.

A model keeps references to the user's tensors (so gradients reach them) and, for other
inputs, copies. torch counts in-place modifications of every tensor (``Tensor._version``, the
counter autograd itself relies on); the model records the counts at construction and checks
them before computing. An optimizer step on a parameter, or an edit of a full Ψ's upper
triangle, then raises instead of being silently ignored (a converted copy of a parameter in
another dtype would never see the update; a Cholesky factorisation reads only one triangle).
"""

from __future__ import annotations

import torch


class Frozen:
    """Base class: ``_freeze`` sets the private attributes once; no attribute can be set after."""

    _frozen = False

    def _freeze(self, given: dict, **attributes) -> None:
        for name, value in attributes.items():
            object.__setattr__(self, f"_{name}", value)
        watched = tuple(
            (name, value, value._version)
            for name, value in given.items()
            if isinstance(value, torch.Tensor)
        )
        object.__setattr__(self, "_watched", watched)
        object.__setattr__(self, "_frozen", True)

    def _replace(self, **attributes):
        """A copy with some private attributes replaced, watching the same parameters."""
        copy = object.__new__(type(self))
        object.__setattr__(copy, "__dict__", dict(self.__dict__))
        for name, value in attributes.items():
            object.__setattr__(copy, f"_{name}", value)
        return copy

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__} is immutable: cannot set {name!r}; build a new model"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def _verify(self) -> None:
        """``RuntimeError`` if a parameter tensor was modified in place since construction."""
        for name, tensor, version in self._watched:
            if tensor._version != version:
                raise RuntimeError(
                    f"{name} was modified in place after this {type(self).__name__} was built "
                    f"(models are immutable: the model would compute with stale or inconsistent "
                    f"values). Build a new {type(self).__name__} from the updated parameters, "
                    f"e.g. inside the training step."
                )
