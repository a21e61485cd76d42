"""Rerun every stochastic test under many seeds and compare its failures with its false-alarm rate.

A test is stochastic when it draws a seed from tests/seeds.py (during the test, or when its
module is imported) or carries ``@pytest.mark.false_alarm(p)``; Hypothesis tests are left to the
deep profile (``HYPOTHESIS_PROFILE=deep``), since their randomness is Hypothesis's. The steps:

1. Discovery: one run of the default suite at offset 0 with ``TOYVAE_SEED_RECORD`` set, which
   records each test's outcome, whether it drew a seed, and its stated p (tests/conftest.py).
   Kept in ``<workdir>/discovery.json``; ``--rediscover`` runs it again.
2. Offsets j = 1…N: the stochastic tests rerun with ``TOYVAE_SEED_OFFSET=j``, one pytest
   process per offset, ``--jobs`` at a time. Each offset's outcomes are kept in
   ``<workdir>/offset-<j>/``; an offset already there is not run again, so a run can be
   stopped and extended (``--start``).
3. The verdict per test: with f failures in n runs and stated p, the binomial tail
   P(X ≥ f | n, p). Below 1e-3 (``--alarm``) the test fails more often than it says it can:
   flagged. A test with no marker states p = 0, so one failure flags it.

Examples::

    .venv/bin/python scripts/flake_rate.py                 # 200 offsets, 2 jobs
    .venv/bin/python scripts/flake_rate.py --seeds 20 -k estimators
    .venv/bin/python scripts/flake_rate.py --report-only   # the table from what is in workdir
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest"]
ALARM = 1e-3
# The docs tests import test modules (to check citations, in page examples), which draws those
# modules' import-time seeds; the pages themselves are not stochastic tests.
NOT_STOCHASTIC = ("tests/test_docs.py", "tests/test_site.py")


def binomial_tail(failures: int, runs: int, p: float) -> float:
    """P(X ≥ failures) for X ~ Binomial(runs, p): the chance of seeing this many or more."""
    if failures <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    return float(stats.binom.sf(failures - 1, runs, p))


@dataclass
class Row:
    nodeid: str
    p: float
    stated: bool  # False: no marker, p = 0 by the seeds.py convention
    runs: int
    failures: int
    skipped: int

    @property
    def tail(self) -> float:
        return binomial_tail(self.failures, self.runs, self.p)

    def flagged(self, alarm: float = ALARM) -> bool:
        return self.tail < alarm


def _read_jsonl(folder: Path) -> list[dict]:
    lines = []
    for path in sorted(folder.glob("*.jsonl")):
        lines += [json.loads(t) for t in path.read_text(encoding="utf-8").splitlines() if t]
    return lines


def _pytest(args: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(
            [*PYTEST, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    return done.returncode


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TOYVAE_SEED_OFFSET", None)
    env.pop("HYPOTHESIS_PROFILE", None)  # Hypothesis tests are not rerun; keep the default
    env.update(extra)
    return env


def discover(workdir: Path, pytest_args: list[str], jobs: int) -> dict:
    """Run the suite once at offset 0, recording which tests draw seeds and their stated p."""
    folder = workdir / "discovery"
    for old in folder.glob("*.jsonl"):
        old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code = _pytest(
        ["-q", "-p", "no:cacheprovider", "-n", str(jobs), *pytest_args],
        _env(TOYVAE_SEED_RECORD=str(folder)),
        workdir / "discovery.log",
    )
    lines = _read_jsonl(folder)
    tests = {}
    for line in lines:
        stochastic = (line["seeded"] or line["false_alarm"] is not None) and not line["hypothesis"]
        if stochastic and not line["nodeid"].startswith(NOT_STOCHASTIC):
            tests[line["nodeid"]] = {"p": line["false_alarm"], "outcome": line["outcome"]}
    unseeded = sorted(
        t["nodeid"] for t in lines if t.get("global_rng") and t["nodeid"] not in tests
    )
    found = {
        "exit_code": code,
        "seconds": time.perf_counter() - start,
        "collected": len(lines),
        "hypothesis": sorted(t["nodeid"] for t in lines if t["hypothesis"]),
        "tests": dict(sorted(tests.items())),
        # Tests that drew from torch's or NumPy's global generator without a test seed.
        "global_rng_unseeded": unseeded,
    }
    (workdir / "discovery.json").write_text(json.dumps(found, indent=1), encoding="utf-8")
    return found


def run_offset(workdir: Path, offset: int, nodeids: list[str], pytest_args=()) -> float:
    """Run ``nodeids`` once with TOYVAE_SEED_OFFSET=offset in one process; return its seconds."""
    folder = workdir / f"offset-{offset}"
    partial = workdir / f"offset-{offset}.partial"
    for old in partial.glob("*.jsonl"):
        old.unlink()
    start = time.perf_counter()
    _pytest(
        ["-q", "-p", "no:cacheprovider", "-n", "0", *pytest_args, *nodeids],
        _env(TOYVAE_SEED_OFFSET=str(offset), TOYVAE_SEED_RECORD=str(partial)),
        workdir / f"offset-{offset}.log",
    )
    partial.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)  # complete: only now does it count
    return time.perf_counter() - start


def summarise(workdir: Path, discovery: dict, offsets: Iterable[int]) -> list[Row]:
    tests = discovery["tests"]
    counts = {n: [0, 0, 0] for n in tests}  # runs, failures, skipped
    for offset in offsets:
        folder = workdir / f"offset-{offset}"
        if not folder.is_dir():
            continue
        for line in _read_jsonl(folder):
            if line["nodeid"] not in counts:
                continue
            c = counts[line["nodeid"]]
            c[0] += 1
            c[1] += line["outcome"] == "failed"
            c[2] += line["outcome"] == "skipped"
    rows = []
    for nodeid, info in tests.items():
        runs, failures, skipped = counts[nodeid]
        p = info["p"]
        rows.append(Row(nodeid, p or 0.0, p is not None, runs - skipped, failures, skipped))
    return rows


def _fmt_p(row: Row) -> str:
    return f"{row.p:.1e}" if row.stated else "0 (unmarked)"


def table(rows: list[Row], alarm: float, markdown: bool) -> str:
    ordered = sorted(rows, key=lambda r: (not r.flagged(alarm), -r.failures, r.nodeid))
    head = ("test", "stated p", "runs", "failures", "P(X ≥ failures)", "verdict")
    body = [
        (
            f"`{r.nodeid}`" if markdown else r.nodeid,
            _fmt_p(r),
            str(r.runs),
            str(r.failures),
            f"{r.tail:.2g}",
            "FLAKY" if r.flagged(alarm) else "ok",
        )
        for r in ordered
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    widths[0] = min(widths[0], 100)
    return "\n".join(
        "  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(cells))
        for cells in [head, *body]
    )


def by_file(rows: list[Row], alarm: float) -> str:
    """One Markdown row per test file: tests, runs per test, failures, flagged, largest stated p."""
    files: dict[str, list[Row]] = {}
    for row in rows:
        files.setdefault(row.nodeid.split("::")[0], []).append(row)
    lines = [
        "| file | stochastic tests | runs per test | failures | flagged | largest stated p |",
        "|---|---|---|---|---|---|",
    ]
    for name, group in sorted(files.items()):
        runs = sorted({r.runs for r in group})
        largest = max((r.p for r in group), default=0.0)
        lines.append(
            f"| `{name}` | {len(group)} | {runs[0] if len(runs) == 1 else f'{runs[0]}–{runs[-1]}'}"
            f" | {sum(r.failures for r in group)} | {sum(r.flagged(alarm) for r in group)}"
            f" | {f'{largest:.1e}' if largest else '0'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="offsets to run (default 200)")
    parser.add_argument("--start", type=int, default=1, help="first offset (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at once")
    parser.add_argument("-k", dest="keyword", help="only tests whose node id contains this")
    parser.add_argument("--tests", nargs="*", default=(), help="only these node ids or files")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "flake_rate")
    parser.add_argument("--markdown", type=Path, default=Path("/tmp/flake_rate.md"))
    parser.add_argument("--alarm", type=float, default=ALARM, help="flag tails below this")
    parser.add_argument("--rediscover", action="store_true", help="run the discovery again")
    parser.add_argument("--report-only", action="store_true", help="tabulate, run nothing")
    parser.add_argument(
        "--pytest-args",
        default="",
        help="extra pytest arguments for every run (e.g. '-m slow' for the slow tests)",
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    discovery_file = args.workdir / "discovery.json"
    if args.rediscover or not discovery_file.exists():
        print("discovery: the default suite at offset 0, recording seeded tests ...", flush=True)
        discovery = discover(args.workdir, args.pytest_args.split(), args.jobs)
        print(
            f"discovery: {len(discovery['tests'])} stochastic tests of {discovery['collected']} "
            f"run, {len(discovery['hypothesis'])} Hypothesis tests left to the deep profile "
            f"({discovery['seconds']:.0f} s)",
            flush=True,
        )
    else:
        discovery = json.loads(discovery_file.read_text(encoding="utf-8"))

    selected = {
        nodeid: info
        for nodeid, info in discovery["tests"].items()
        if (not args.keyword or args.keyword in nodeid)
        and (not args.tests or any(nodeid.startswith(t) for t in args.tests))
    }
    discovery = {**discovery, "tests": selected}
    nodeids = list(selected)
    offsets = range(args.start, args.start + args.seeds)
    if not args.report_only and nodeids:
        todo = [j for j in offsets if not (args.workdir / f"offset-{j}").is_dir()]
        print(f"{len(nodeids)} tests × {len(todo)} offsets, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            extra = args.pytest_args.split()
            futures = {j: pool.submit(run_offset, args.workdir, j, nodeids, extra) for j in todo}
            for j, future in futures.items():
                print(f"offset {j}: {future.result():.0f} s", flush=True)

    rows = summarise(args.workdir, discovery, offsets)
    flagged = [r for r in rows if r.flagged(args.alarm)]
    print(table(rows, args.alarm, markdown=False))
    runs = sorted({r.runs for r in rows})
    done = [j for j in offsets if (args.workdir / f"offset-{j}").is_dir()]
    summary = (
        f"{len(rows)} stochastic tests; runs per test: {runs[0] if runs else 0}"
        f"{'' if len(runs) <= 1 else f' to {runs[-1]}'} ({len(done)} of the offsets "
        f"{offsets.start}–{offsets.stop - 1} completed); {sum(r.failures for r in rows)} "
        f"failures in all; {len(flagged)} flagged (P(X ≥ failures) < {args.alarm:g} at the "
        "stated p)."
    )
    print(summary)
    failing = [r for r in rows if r.failures or r.flagged(args.alarm)]
    args.markdown.write_text(
        f"{summary}\n\n{by_file(rows, args.alarm)}\n\n"
        + (
            f"Tests that failed at least once:\n\n{table(failing, args.alarm, True)}\n\n"
            if failing
            else ""
        )
        + f"Every stochastic test:\n\n{table(rows, args.alarm, True)}\n",
        "utf-8",
    )
    print(f"wrote {args.markdown}")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
