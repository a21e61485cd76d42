"""The ``toyvae`` command: ``toyvae report [--quick] [--seed N] [--out DIR] [--model FILE]``.

Exit status: 0 when every property holds, 1 when one fails (the failing rows are named),
2 for bad arguments or a bad model file (a one-line error, no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from toyvae.report import checks
from toyvae.report.models import Case, builtin_models, load_model
from toyvae.report.output import ModelResult, failures, markdown, table, to_json

__all__ = ["main", "run_battery"]


class _UsageError(Exception):
    """Bad arguments: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and raise instead of exiting."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="toyvae",
        description="Check variational inference against exact answers on linear-Gaussian models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    report = commands.add_parser(
        "report",
        help="run the verification battery and print one row per property",
        description=(
            "Run the verification battery on the built-in models (or on --model FILE) and "
            "print one row per property: worst error, tolerance, why, pass/fail. Exit status "
            "0 when every property holds, 1 otherwise, 2 for bad arguments or files."
        ),
    )
    report.add_argument("--quick", action="store_true", help="smaller samples (under 30 s)")
    report.add_argument("--seed", type=_seed, default=0, help="seed for data and draws (0)")
    report.add_argument(
        "--out", type=Path, metavar="DIR", help="write report.md, report.json, PNGs"
    )
    report.add_argument(
        "--model",
        type=Path,
        metavar="FILE",
        help=".npz with weight (D, K), bias (D,), noise_variance, optionally x (N, D)",
    )
    return parser


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _generator(seed: int, *labels: str, device) -> torch.Generator:
    """A generator per (seed, model, stream): rows do not depend on which other rows ran."""
    key = zlib.crc32("/".join([str(seed), *labels]).encode())
    return torch.Generator(device=device).manual_seed(seed * 2**32 + key)


def _stream(check) -> str:
    """A check's random-stream key (:func:`toyvae.report.checks.stream`), not its name."""
    key = getattr(check, "stream", None)
    if not isinstance(key, str):
        raise TypeError(
            f"check {getattr(check, '__name__', check)!r} has no stream key: mark it with "
            "@toyvae.report.checks.stream(key)"
        )
    return key


def _data(case: Case, budget: checks.Budget, seed: int) -> torch.Tensor:
    if case.x is not None:
        return case.model.check_data(case.x)
    generator = _generator(seed, case.name, "data", device=case.model.device)
    return case.model.sample((budget.points,), generator=generator)[0]


PROBLEMS_NAME = "fixed-problems"
PROBLEMS_DESCRIPTION = (
    "the same in every run, whatever --model: the mean-field counterexample "
    "x = w(z₁ + z₂) + ε with E[x²] = 3, and PPCA fitted to 200 points (D=10, K=3)"
)


def run_battery(cases, budget: checks.Budget, seed: int, *, progress: bool = True):
    """Run every check on every case, then the fixed problems.

    Returns ``(results, data)``: a :class:`ModelResult` per case followed by one for the fixed
    problems (``kind="problems"``), and the data each case was checked at.
    """
    tasks = [(case, check) for case in cases for check in checks.CHECKS]
    tasks += [(None, problem) for problem in checks.PROBLEMS]
    rows: dict[str, list] = {case.name: [] for case in cases}
    problem_rows = []
    data = {case.name: _data(case, budget, seed) for case in cases}
    bar = tqdm(tasks, desc="toyvae report", unit="check", disable=not progress, file=sys.stderr)
    for case, check in bar:
        label = PROBLEMS_NAME if case is None else case.name
        name = getattr(check, "__name__", "?").removeprefix("check_").removeprefix("problem_")
        bar.set_postfix_str(f"{label}: {name}")
        if case is None:
            problem_rows.append(check(budget=budget))
            continue
        generator = _generator(seed, case.name, _stream(check), device=case.model.device)
        rows[case.name].append(check(case.model, data[case.name], generator, budget=budget))
    results = [ModelResult(c.name, c.description, rows[c.name]) for c in cases]
    if problem_rows:
        results.append(ModelResult(PROBLEMS_NAME, PROBLEMS_DESCRIPTION, problem_rows, "problems"))
    return results, data


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _UsageError(f"toyvae report: error: --out {out}: {error.strerror or error}") from None


def _plotting():
    """The plot writer, with matplotlib's non-interactive Agg backend chosen first.

    The command owns the process, so it picks the backend, and only when plots are written:
    importing toyvae (or :mod:`toyvae.report.plots`) never changes matplotlib's global state.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported by the plots
    from toyvae.report.plots import write_plots

    return write_plots


def _report(args) -> int:
    budget = checks.QUICK if args.quick else checks.Budget()
    if args.model is not None:
        try:
            cases = [load_model(args.model)]
        except ValueError as error:
            raise _UsageError(f"toyvae report: error: --model {error}") from None
    else:
        cases = builtin_models(quick=args.quick)
    if args.out is not None:
        _prepare_out(args.out)
    started = time.perf_counter()
    results, data = run_battery(cases, budget, args.seed)
    elapsed = time.perf_counter() - started
    mode = "--quick" if args.quick else "default"
    header = (
        f"toyvae report ({mode} run, seed {args.seed}, {elapsed:.1f} s): worst error per "
        f"property and model; false-alarm probability ≤ {checks.FALSE_ALARM:g} per random row"
    )
    print(table(results, header))
    if args.out is not None:
        write_plots = _plotting()

        settings = {"quick": args.quick, "seed": args.seed, "seconds": round(elapsed, 2)}
        (args.out / "report.md").write_text(markdown(results, header), encoding="utf-8")
        (args.out / "report.json").write_text(to_json(results, settings), encoding="utf-8")
        items = [
            (case, x, _generator(args.seed, case.name, "plots", device=x.device))
            for case in cases
            for x in [data[case.name]]
        ]
        write_plots(items, budget, args.out)
        print(f"Wrote report.md, report.json and plots to {args.out}")
    return 1 if failures(results) else 0


def main(argv=None) -> int:
    """Entry point of the ``toyvae`` command; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _report(args)
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 2
