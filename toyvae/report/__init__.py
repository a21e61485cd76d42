"""``toyvae report``: the one-command verification run (battery of checks, table, files)."""

from toyvae.report.checks import CHECKS, Budget, Row
from toyvae.report.cli import main, run_battery
from toyvae.report.models import Case, builtin_models, load_model

__all__ = ["CHECKS", "Budget", "Case", "Row", "builtin_models", "load_model", "main", "run_battery"]
