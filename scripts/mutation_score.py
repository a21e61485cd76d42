r"""The mutation score of the mathematical modules, from a mutmut run and its triaged survivors.

    bash scripts/mutation_score.sh            # runs mutmut (several hours on 2 cores), then this
    python scripts/mutation_score.py RESULTS [RESULTS …] [--triage docs/data/mutation-triage.tsv]
                                             [--out docs/data/mutation-score.md]

RESULTS are the outputs of ``mutmut results --all true`` (one line per mutant,
``name: status``); a later file's status for the same mutant wins. The triage file has one line
per survivor: ``name<TAB>equivalent<TAB>reason`` for a mutant that computes what the original
computes, or ``name<TAB>killed<TAB>test`` for one that a test added after the run kills (checked
by running that test with the mutant active: ``MUTANT_UNDER_TEST=name pytest test`` in the
run's ``mutants/`` folder must fail). A fresh run of scripts/mutation_score.sh counts those as
killed by itself.

score = killed / (mutants − equivalent) over the mutants the run checked, where "killed"
includes timeouts and the later kills; mutants the run did not reach are counted apart.
"""

from __future__ import annotations

import argparse
import collections
import datetime
from pathlib import Path

KILLED = {"killed", "timeout"}


def read_results(paths: list[Path]) -> dict[str, str]:
    statuses: dict[str, str] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            name, sep, status = line.strip().rpartition(": ")
            if sep and name:
                statuses[name] = status.strip()
    return statuses


def read_triage(path: Path | None) -> dict[str, dict[str, str]]:
    """{"equivalent": {name: reason}, "killed": {name: test}} from the triage file."""
    triage: dict[str, dict[str, str]] = {"equivalent": {}, "killed": {}}
    if path is None or not path.exists():
        return triage
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].strip() in triage:
            triage[parts[1].strip()][parts[0].strip()] = parts[2].strip()
    return triage


def module_of(name: str) -> str:
    return name.split(".x", 1)[0]


def function_of(name: str) -> str:
    """``toyvae.model.xǁLinearGaussianǁ__repr____mutmut_1`` → ``LinearGaussian.__repr__``."""
    local = name.split(".x", 1)[1].rsplit("__mutmut_", 1)[0]
    if "ǁ" in local:  # "ǁClassǁmethod"
        return ".".join(part for part in local.split("ǁ") if part)
    return local[1:]  # "_function": mutmut's prefix is "x_"


def summarise(statuses: dict[str, str], triage: dict[str, dict[str, str]], commit: str = "") -> str:
    equivalent, killed_later = triage["equivalent"], triage["killed"]
    unknown = sorted((set(equivalent) | set(killed_later)) - set(statuses))
    if unknown:
        raise SystemExit(f"triage names mutants the results do not have: {unknown[:3]} …")
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    open_survivors = []
    for name, status in sorted(statuses.items()):
        counts = per_module[module_of(name)]
        counts["mutants"] += 1
        if status in KILLED:
            counts["killed"] += 1
        elif status != "not checked" and name in killed_later:
            counts["killed"] += 1
            counts["later"] += 1
        elif name in equivalent:
            counts["equivalent"] += 1
        elif status == "not checked":
            counts["not checked"] += 1
        else:
            counts["survived"] += 1
            open_survivors.append((name, status))
    total = sum(per_module.values(), collections.Counter())

    def score(c: collections.Counter) -> str:
        denominator = c["mutants"] - c["not checked"] - c["equivalent"]
        return f"{100 * c['killed'] / denominator:.1f}%" if denominator else "–"

    lines = [
        f"Measured {datetime.date.today().isoformat()} with mutmut"
        + (f" on commit {commit}" if commit else "")
        + " (`bash scripts/mutation_score.sh`).",
        "",
        "| module | mutants | not checked | killed (by new tests) | equivalent | survived "
        "| score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module in [*sorted(per_module), "all"]:
        c = total if module == "all" else per_module[module]
        # Module names without the package prefix: a `toyvae.…` span on a page must be a link.
        label = "**all**" if module == "all" else f"`{module.removeprefix('toyvae.')}`"
        lines.append(
            f"| {label} | {c['mutants']} | {c['not checked']} | {c['killed']} ({c['later']}) | "
            f"{c['equivalent']} | {c['survived']} | {score(c)} |"
        )
    lines += ["", "Equivalent mutants (the program's behaviour does not change):", ""]
    lines += ["| mutant | reason |", "|---|---|"]
    for name in sorted(equivalent):
        where = f"{module_of(name).removeprefix('toyvae.')}.{function_of(name)}"
        lines.append(f"| `{where}` ({name.rsplit('_', 1)[1]}) | {equivalent[name]} |")
    lines += ["", "Survivors neither killed nor shown equivalent:", ""]
    if open_survivors:
        per_function = collections.Counter(
            (module_of(n), function_of(n), s) for n, s in open_survivors
        )
        lines += ["| module | function | status | mutants |", "|---|---|---|---:|"]
        for (module, function, status), count in sorted(per_function.items()):
            lines.append(
                f"| `{module.removeprefix('toyvae.')}` | `{function}` | {status} | {count} |"
            )
    else:
        lines.append("none.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--triage", type=Path, default=Path("docs/data/mutation-triage.tsv"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", default="", help="the commit the run mutated")
    args = parser.parse_args()
    text = summarise(read_results(args.results), read_triage(args.triage), args.commit)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
