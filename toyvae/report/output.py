"""The report's results as a terminal table, Markdown, JSON, and the plots that go with them."""

from __future__ import annotations

import json
import math
from typing import NamedTuple

from toyvae.report.checks import Row

__all__ = ["ModelResult", "failures", "markdown", "table", "to_json"]


class ModelResult(NamedTuple):
    """One section of the report.

    Attributes
    ----------
    name : str
        The section's name: a model's, ``<model> fit`` or ``fixed-problems``.
    description : str
        One line under the name.
    rows : list of Row
        Its rows, in the table's order.
    kind : str
        ``"model"``: the battery on a model, whose failures fail the run; ``"fit"``: the verdict
        on a user's fit (stationarity of the exact log-likelihood), shown but never a failure
        of the run; ``"problems"``: the fixed problems.
    """

    name: str
    description: str
    rows: list[Row]
    kind: str = "model"


_PROBLEMS_HEADING = "Classic questions on fixed problems"


def _verdict(row: Row, kind: str = "model") -> str:
    if kind == "fit":
        return {True: "zero", False: "NOT 0", None: "skip"}[row.passed]
    return {True: "pass", False: "FAIL", None: "skip"}[row.passed]


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


def failures(results: list[ModelResult]) -> list[str]:
    """``model: property`` for every row that failed (a fit's verdict is not a failure)."""
    return [
        f"{r.name}: {row.property}"
        for r in results
        if r.kind != "fit"
        for row in r.rows
        if row.passed is False
    ]


def _fit_summary(results: list[ModelResult]) -> list[str]:
    """One sentence per fit section: stationary or not, and in which parameters."""
    lines = []
    for r in (r for r in results if r.kind == "fit"):
        off = [row.property.split("∇")[1].split(" ")[0] for row in r.rows if row.passed is False]
        if off:
            lines.append(
                f"{r.name}: NOT at a stationary point of the exact log-likelihood "
                f"(∇ ≠ 0 in {', '.join(off)}); this does not fail the run"
            )
        elif any(row.passed for row in r.rows):
            lines.append(f"{r.name}: at a stationary point of the exact log-likelihood")
    return lines


def _summary(results: list[ModelResult]) -> str:
    rows = [row for r in results if r.kind != "fit" for row in r.rows]
    ran = sum(row.passed is not None for row in rows)
    skipped = len(rows) - ran
    failed = failures(results)
    tail = f", {skipped} skipped" if skipped else ""
    fits = "".join(f"\n{line}" for line in _fit_summary(results))
    if failed:
        return f"FAILED: {len(failed)} of {ran} checks{tail}: " + "; ".join(failed) + fits
    return f"All {ran} checks passed{tail}." + fits


def table(results: list[ModelResult], header: str) -> str:
    """A plain-text table per model: property, worst error, tolerance, verdict, why."""
    width = max(len(row.property) for r in results for row in r.rows)
    lines = [header, ""]
    for r in results:
        if r.kind == "problems":
            lines += ["-" * len(_PROBLEMS_HEADING), _PROBLEMS_HEADING, ""]
        lines.append(f"{r.name}: {r.description}")
        lines.append(f"  {'property':<{width}}  {'error':>9}  {'tolerance':>9}  result  why")
        for row in r.rows:
            lines.append(
                f"  {row.property:<{width}}  {_number(row.error):>9}  "
                f"{_number(row.tolerance):>9}  {_verdict(row, r.kind):<6}  {row.reason}"
            )
        lines.append("")
    lines.append(_summary(results))
    return "\n".join(lines)


def markdown(results: list[ModelResult], header: str) -> str:
    """The same tables in Markdown, one per model."""
    lines = ["# toyvae report", "", header, ""]
    for r in results:
        if r.kind == "problems":
            lines += [f"## {_PROBLEMS_HEADING}", ""]
        level = "###" if r.kind == "problems" else "##"
        lines += [f"{level} {r.name}", "", r.description, ""]
        lines += ["| property | worst error | tolerance | result | why |", "|---|---|---|---|---|"]
        for row in r.rows:
            reason = row.reason.replace("|", "\\|")
            lines.append(
                f"| {row.property} | {_number(row.error)} | {_number(row.tolerance)} | "
                f"{_verdict(row, r.kind)} | {reason} |"
            )
        lines.append("")
    lines += [_summary(results), ""]
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def to_json(results: list[ModelResult], settings: dict) -> str:
    """The same results as JSON: settings, overall verdict, failing rows, and the rows of each
    model (``models``), of each fit verdict (``fits``, results ``zero``/``NOT 0``/``skip``,
    plus ``stationary``) and of the fixed problems (``problems``)."""

    def section(r: ModelResult) -> dict:
        return {
            "name": r.name,
            "description": r.description,
            "rows": [
                {
                    "property": row.property,
                    "error": _finite(row.error),
                    "tolerance": _finite(row.tolerance),
                    "reason": row.reason,
                    "result": _verdict(row, r.kind),
                }
                for row in r.rows
            ],
        }

    document = {
        "settings": settings,
        "passed": not failures(results),
        "failures": failures(results),
        "models": [section(r) for r in results if r.kind == "model"],
        "fits": [
            section(r) | {"stationary": all(row.passed is not False for row in r.rows)}
            for r in results
            if r.kind == "fit"
        ],
        "problems": [section(r) for r in results if r.kind == "problems"],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)
