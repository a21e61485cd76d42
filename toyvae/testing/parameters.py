r"""Which of the user's parameters a check covers, and what to call them.

The exact target of a check is a function of the user's own parameters: whatever tensors that
require grad the model they build and the q they return depend on. Those are found by walking
the autograd graph of the exact answers back to its leaves, so nothing has to be declared.
Parameters that do not require grad (a frozen decoder variance) are not in the graph and are
simply not checked. Names come from the ``torch.nn.Module`` s and tensors that the user's
functions refer to (their closures and globals), or from an explicit ``parameters=`` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from toyvae._checks import describe

__all__ = ["Parameter", "Parameters", "graph_leaves", "resolve_parameters"]


class Parameter(NamedTuple):
    """One checked parameter.

    Attributes
    ----------
    name : str
        What the report calls it, e.g. ``"enc.mean.weight"``.
    tensor : tensor
        The leaf tensor itself (requires grad).
    group : str
        ``"q"`` if q(x) depends on it, ``"model"`` if the model does, ``"model and q"`` if both,
        ``"neither"`` if only the user's estimate can depend on it.
    """

    name: str
    tensor: torch.Tensor
    group: str


class Parameters(NamedTuple):
    """The parameters a check covers, and those it leaves out.

    Attributes
    ----------
    checked : tuple of Parameter
        Leaves that require grad, in a stable order (named ones in module order first).
    frozen : tuple of str
        Names of parameters that were found (in a module or in ``parameters=``) but do not
        require grad: not checked.
    """

    checked: tuple[Parameter, ...]
    frozen: tuple[str, ...]


def graph_leaves(*outputs: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``outputs`` depend on, each once, in a fixed order."""
    leaves, seen, visited = [], set(), set()
    stack = []
    for out in reversed(outputs):
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            continue
        if out.grad_fn is None:
            stack.append(("leaf", out))
        else:
            stack.append(("fn", out.grad_fn))
    while stack:
        kind, item = stack.pop()
        if kind == "leaf":
            if id(item) not in seen:
                seen.add(id(item))
                leaves.append(item)
            continue
        if item is None or item in visited:
            continue
        visited.add(item)
        variable = getattr(item, "variable", None)  # AccumulateGrad holds the leaf
        if isinstance(variable, torch.Tensor):
            stack.append(("leaf", variable))
        for nxt, _ in reversed(item.next_functions):
            if nxt is not None:
                stack.append(("fn", nxt))
    return leaves


def _referenced(fn, depth: int = 2) -> dict[str, object]:
    """The variables a function's code refers to: its closure cells and the globals it names."""
    found: dict[str, object] = {}
    if isinstance(fn, nn.Module) or depth == 0:
        return found
    self = getattr(fn, "__self__", None)
    if isinstance(self, nn.Module):
        found[type(self).__name__] = self
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None:
        return found
    for name, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or (), strict=False):
        try:
            found.setdefault(name, cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    module_globals = getattr(func, "__globals__", {})
    for name in code.co_names:
        if name in module_globals:
            found.setdefault(name, module_globals[name])
    for value in list(found.values()):
        if callable(value) and not isinstance(value, nn.Module | type):
            for name, inner in _referenced(value, depth - 1).items():
                found.setdefault(name, inner)
    return found


def _named_tensors(objects: Mapping[str, object]) -> list[tuple[str, torch.Tensor]]:
    named = []
    for var, value in objects.items():
        if isinstance(value, nn.Module):
            named += [(f"{var}.{n}", p) for n, p in value.named_parameters()]
        elif isinstance(value, torch.Tensor) and value.is_leaf and value.requires_grad:
            named.append((var, value))  # a plain tensor counts only if it requires grad
    return named


def _explicit(parameters) -> list[tuple[str, torch.Tensor]]:
    """``parameters=`` as (name, tensor) pairs: a Module, a mapping, or an iterable of either."""
    if isinstance(parameters, nn.Module):
        return list(parameters.named_parameters())
    if isinstance(parameters, Mapping):
        items = list(parameters.items())
    elif isinstance(parameters, Iterable) and not isinstance(parameters, torch.Tensor | str):
        items = []
        for i, item in enumerate(parameters):
            if isinstance(item, nn.Module):
                items += [
                    (f"{type(item).__name__}[{i}].{n}", p) for n, p in item.named_parameters()
                ]
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                items.append(item)
            elif isinstance(item, torch.Tensor):
                items.append((f"parameters[{i}]", item))
            else:
                raise TypeError(
                    "parameters must hold modules, tensors or (name, tensor) pairs, got "
                    f"{describe(item)} at position {i}"
                )
    else:
        raise TypeError(
            "parameters must be a torch.nn.Module, a mapping name -> tensor or an iterable of "
            f"modules, tensors or (name, tensor) pairs, got {describe(parameters)}"
        )
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"parameters[{name!r}] must be a torch tensor, got {describe(tensor)}")
    return items


def resolve_parameters(
    parameters,
    functions: Mapping[str, Callable],
    model_outputs: Iterable[torch.Tensor],
    q_outputs: Iterable[torch.Tensor],
    *,
    names: Mapping[int, str] | None = None,
) -> Parameters:
    """The parameters to check: explicit ones, or the leaves of the exact answers' graph.

    ``functions`` maps a role (``"estimate"``, ``"model"``, ``"q"``) to the user's callable;
    modules among them, or referred to by them, give the names. ``model_outputs`` and
    ``q_outputs`` are tensors computed from the model's and from q's parameters alone.
    ``names`` maps ``id(tensor)`` to a name for leaves nothing else names (Pyro's param store).
    """
    model_leaves = {id(t) for t in graph_leaves(*model_outputs)}
    q_leaves = graph_leaves(*q_outputs)
    q_ids = {id(t) for t in q_leaves}

    if parameters is not None:
        named = _explicit(parameters)
        candidates = named
    else:
        referenced: dict[str, object] = {}
        for role, fn in functions.items():
            if isinstance(fn, nn.Module):
                referenced.setdefault(role, fn)
            for name, value in _referenced(fn).items():
                referenced.setdefault(name, value)
        names = names or {}
        # Names given by the caller (Pyro's param store) win over variable names.
        named = [(names.get(id(t), n), t) for n, t in _named_tensors(referenced)]
        by_id = {id(t): t for t in graph_leaves(*model_outputs, *q_outputs)}
        known = {id(t) for _, t in named}
        # Every named parameter (frozen ones are reported), then graph leaves nothing names.
        candidates = list(named)
        unnamed = [t for i, t in by_id.items() if i not in known]
        candidates += [
            (names.get(id(t), f"tensor {tuple(t.shape)} #{j}"), t)
            for j, t in enumerate(unnamed, start=1)
        ]

    checked, frozen, seen = [], [], set()
    for name, tensor in candidates:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if not tensor.requires_grad:
            frozen.append(name)
            continue
        in_model, in_q = id(tensor) in model_leaves, id(tensor) in q_ids
        group = {(True, True): "model and q", (True, False): "model", (False, True): "q"}.get(
            (in_model, in_q), "neither"
        )
        checked.append(Parameter(name, tensor, group))
    return Parameters(tuple(checked), tuple(frozen))
