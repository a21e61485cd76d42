"""The ``toyvae`` command: ``toyvae report [--quick] [--seed N] [--out DIR] [--model FILE] ...``.

Exit status: 0 when every property holds, 1 when one fails (the failing rows are named),
2 for bad arguments or a bad model file (a one-line error, no traceback).

This module imports torch, tqdm and the battery only when a report runs, so ``toyvae --help``
and ``toyvae --version`` answer without loading them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

__all__ = ["main", "run_battery"]


class _UsageError(Exception):
    """Bad arguments: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and raise instead of exiting."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("toyvae")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return getattr(sys.modules.get("toyvae"), "__version__", "unknown")


TIMING = "docs/report.md#how-long-it-takes"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="toyvae",
        description="Check variational inference against exact answers on linear-Gaussian models.",
    )
    parser.add_argument("--version", action="version", version=f"toyvae {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    report = commands.add_parser(
        "report",
        help="run the verification battery and print one row per property",
        description=(
            "Run the verification battery on the built-in models (or on --model FILE) and "
            "print one row per property: worst error, tolerance, why, pass/fail. Exit status "
            "0 when every property holds, 1 otherwise, 2 for bad arguments or files. "
            f"How long each mode takes: {TIMING}."
        ),
    )
    report.add_argument(
        "--quick", action="store_true", help=f"smaller samples and fewer rows (see {TIMING})"
    )
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
    report.add_argument(
        "--max-rows",
        type=_positive("--max-rows"),
        metavar="N",
        help="data rows the checks use (evenly spaced; default 16, 8 with --quick); the fit "
        "verdict always uses every row",
    )
    report.add_argument(
        "--threads",
        type=_positive("--threads"),
        metavar="N",
        help="torch threads (default: 1 for small models, where more only spin; more for "
        "large ones)",
    )
    report.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown only on a terminal)"
    )
    return parser


def _positive(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
        return value

    parse.__name__ = option
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _generator(seed: int, *labels: str, device):
    """A generator per (seed, model, stream): rows do not depend on which other rows ran."""
    import torch

    key = zlib.crc32("/".join([str(seed), *labels]).encode())
    # Reduced into torch's signed 64-bit seed range: unchanged for seeds below 2**31, and no
    # overflow for the larger seeds that --seed accepts.
    return torch.Generator(device=device).manual_seed((seed * 2**32 + key) % 2**63)


def _stream(check) -> str:
    """A check's random-stream key (:func:`toyvae.report.checks.stream`), not its name."""
    key = getattr(check, "stream", None)
    if not isinstance(key, str):
        raise TypeError(
            f"check {getattr(check, '__name__', check)!r} has no stream key: mark it with "
            "@toyvae.report.checks.stream(key)"
        )
    return key


def _rows(x, max_rows: int):
    """At most ``max_rows`` rows of x, evenly spaced from the first to the last, in order."""
    import torch

    n = x.shape[0]
    if n <= max_rows:
        return x
    index = torch.linspace(0, n - 1, max_rows, dtype=torch.float64).round().long()
    return x[index.to(x.device)]


def _data(case, budget, seed: int, max_rows: int):
    if case.x is not None:
        return _rows(case.model.check_data(case.x), max_rows)
    generator = _generator(seed, case.name, "data", device=case.model.device)
    return case.model.sample((budget.points,), generator=generator)[0]


PROBLEMS_NAME = "fixed-problems"
PROBLEMS_DESCRIPTION = (
    "the same in every run, whatever --model: the mean-field counterexample "
    "x = w(z₁ + z₂) + ε with E[x²] = 3, and PPCA fitted to 200 points (D=10, K=3)"
)


def _fits(case) -> bool:
    """Whether the case gets a verdict on its fit: a user's data and a LinearGaussian with the
    standard prior (the form the verdict's gradients take)."""
    from toyvae.report.rows import skip_unless_linear_gaussian

    return case.x is not None and skip_unless_linear_gaussian("fit", case.model) is None


def run_battery(
    cases,
    budget,
    seed: int,
    *,
    progress: bool = False,
    max_rows: int | None = None,
    problems: bool = True,
):
    """Run every check on every case, then (with ``problems``) the fixed problems.

    A case with data of its own is checked at ``max_rows`` of its rows (evenly spaced; default
    ``budget.points``) and, for a :class:`toyvae.LinearGaussian`, gets a verdict on its fit
    from every row (:func:`toyvae.report._fit.fit_verdict`; a section of ``kind="fit"`` right
    after the model's, which never counts as a failure). Returns ``(results, data)``: the
    :class:`ModelResult` sections and the data each case was checked at.
    """
    from toyvae.report import checks
    from toyvae.report._fit import fit_verdict
    from toyvae.report.output import ModelResult

    max_rows = budget.points if max_rows is None else max_rows
    tasks = [(case, check) for case in cases for check in checks.CHECKS]
    tasks += [(None, problem) for problem in (checks.PROBLEMS if problems else ())]
    rows: dict[str, list] = {case.name: [] for case in cases}
    problem_rows = []
    data = {case.name: _data(case, budget, seed, max_rows) for case in cases}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="toyvae report", unit="check", file=sys.stderr)
    for case, check in tasks:
        label = PROBLEMS_NAME if case is None else case.name
        name = getattr(check, "__name__", "?").removeprefix("check_").removeprefix("problem_")
        if bar is not None:
            bar.set_postfix_str(f"{label}: {name}")
        if case is None:
            problem_rows.append(check(budget=budget))
        else:
            generator = _generator(seed, case.name, _stream(check), device=case.model.device)
            rows[case.name].append(check(case.model, data[case.name], generator, budget=budget))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    results = []
    for case in cases:
        description = case.description
        if case.x is not None and case.x.shape[0] > data[case.name].shape[0]:
            description += (
                f"; checked at {data[case.name].shape[0]} of its {case.x.shape[0]} rows, "
                "evenly spaced (--max-rows)"
            )
        results.append(ModelResult(case.name, description, rows[case.name]))
        if _fits(case):
            summary, fit_rows = fit_verdict(case.model, case.model.check_data(case.x))
            results.append(ModelResult(f"{case.name} fit", summary, fit_rows, "fit"))
    if problem_rows:
        results.append(ModelResult(PROBLEMS_NAME, PROBLEMS_DESCRIPTION, problem_rows, "problems"))
    return results, data


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise _UsageError(f"toyvae report: error: --out {out}: exists and is not a directory")
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


LARGE_WORK = 2**18
"""D·K from which the command uses more than one thread: below it, torch's intra-op threads
mostly spin on small tensors (docs/report.md#how-long-it-takes)."""


def _threads(cases, requested: int | None) -> int:
    """The thread count: ``--threads``, else 1 unless some model has D·K ≥ :data:`LARGE_WORK`,
    then the CPUs this process may use, at most 8."""
    if requested is not None:
        return requested
    work = max(
        (getattr(case.model, "data_dim", 1) * case.model.latent_dim for case in cases), default=0
    )
    if work < LARGE_WORK:
        return 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, available or 1))


def _report(args, started: float) -> int:
    from toyvae.report import checks, models
    from toyvae.report.output import failures, markdown, table, to_json

    budget = checks.QUICK if args.quick else checks.Budget()
    if args.model is not None:
        try:
            cases = [models.load_model(args.model)]
        except ValueError as error:
            raise _UsageError(f"toyvae report: error: --model {error}") from None
    else:
        cases = models.builtin_models(quick=args.quick)
    if args.out is not None:
        _prepare_out(args.out)
    import torch

    # The command owns its process, so it chooses the thread count; library calls never do.
    threads = _threads(cases, args.threads)
    torch.set_num_threads(threads)
    progress = not args.no_progress and sys.stderr.isatty()
    max_rows = budget.points if args.max_rows is None else args.max_rows
    results, data = run_battery(
        cases,
        budget,
        args.seed,
        progress=progress,
        max_rows=max_rows,
        problems=args.model is None,
    )
    if args.out is not None:
        items = [
            (case, x, _generator(args.seed, case.name, "plots", device=x.device))
            for case in cases
            for x in [data[case.name]]
        ]
        _plotting()(items, budget, args.out)
    elapsed = time.perf_counter() - started
    mode = "--quick" if args.quick else "default"
    header = (
        f"toyvae report ({mode} run, seed {args.seed}, {threads} thread"
        f"{'s' if threads > 1 else ''}, {elapsed:.1f} s in all): worst error per property and "
        f"model; false-alarm probability ≤ {checks.FALSE_ALARM:g} per random row"
    )
    print(table(results, header))
    if args.out is not None:
        settings = {
            "quick": args.quick,
            "seed": args.seed,
            "seconds": round(elapsed, 2),
            "threads": threads,
            "max_rows": max_rows,
        }
        (args.out / "report.md").write_text(markdown(results, header), encoding="utf-8")
        (args.out / "report.json").write_text(to_json(results, settings), encoding="utf-8")
        print(f"Wrote report.md, report.json and plots to {args.out}")
    return 1 if failures(results) else 0


def main(argv=None) -> int:
    """Entry point of the ``toyvae`` command; returns the exit status."""
    started = time.perf_counter()
    parser = _parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        return _report(args, started)
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 2
