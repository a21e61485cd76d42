"""``toyvae report``: the one-command verification run (battery of checks, table, files).

The names below are loaded on first use, so that ``toyvae --help`` does not import torch.
"""

import importlib

__all__ = ["CHECKS", "Budget", "Case", "Row", "builtin_models", "load_model", "main", "run_battery"]

_WHERE = {
    "CHECKS": "toyvae.report.checks",
    "Budget": "toyvae.report.checks",
    "Row": "toyvae.report.checks",
    "Case": "toyvae.report.models",
    "builtin_models": "toyvae.report.models",
    "load_model": "toyvae.report.models",
    "main": "toyvae.report.cli",
    "run_battery": "toyvae.report.cli",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'toyvae.report' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
