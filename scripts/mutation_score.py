r"""The mutation score of the mathematical modules, from a mutmut run and its triaged survivors.

    bash scripts/mutation_score.sh            # runs mutmut (about 2 hours on 2 cores), then this
    python scripts/mutation_score.py RESULTS [RESULTS …] [--triage docs/data/mutation-triage.tsv]
                                             [--out docs/data/mutation-score.md]

RESULTS are the outputs of ``mutmut results --all true`` (one line per mutant,
``name: status``). A later file's status for the same mutant wins, so a rerun of the survivors
after new tests were added can follow the first run. The triage file has one line per survivor
that is equivalent to the original program, ``name<TAB>equivalent<TAB>reason``; other lines
(``killed``) are ignored here, since a kill must show up as a status in RESULTS.

score = killed / (mutants − equivalent), where "killed" includes timeouts and "mutants" counts
every mutant mutmut generated, survivors and mutants no test reaches included.
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


def read_equivalent(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    equivalent = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].strip() == "equivalent":
            equivalent[parts[0].strip()] = parts[2].strip()
    return equivalent


def module_of(name: str) -> str:
    return name.split(".x", 1)[0]


def function_of(name: str) -> str:
    """``toyvae.model.xǁLinearGaussianǁ__repr____mutmut_1`` → ``LinearGaussian.__repr__``."""
    local = name.split(".x", 1)[1].rsplit("__mutmut_", 1)[0]
    return local.strip("ǁ_").replace("ǁ", ".") if "ǁ" in local else local.lstrip("_")


def summarise(statuses: dict[str, str], equivalent: dict[str, str]) -> str:
    unknown = sorted(set(equivalent) - set(statuses))
    if unknown:
        raise SystemExit(f"triage names mutants the results do not have: {unknown[:3]} …")
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    open_survivors = []
    for name, status in sorted(statuses.items()):
        counts = per_module[module_of(name)]
        counts["mutants"] += 1
        if status in KILLED:
            counts["killed"] += 1
        elif name in equivalent:
            counts["equivalent"] += 1
        elif status == "not checked":
            counts["not checked"] += 1
        else:
            counts["survived"] += 1
            open_survivors.append((name, status))
    total = sum(per_module.values(), collections.Counter())

    def score(c: collections.Counter) -> str:
        denominator = c["mutants"] - c["equivalent"]
        return f"{100 * c['killed'] / denominator:.1f}%" if denominator else "–"

    lines = [
        f"Measured {datetime.date.today().isoformat()} with mutmut "
        f"(`bash scripts/mutation_score.sh`).",
        "",
        "| module | mutants | killed | equivalent | survived | not checked | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module in [*sorted(per_module), "all"]:
        c = total if module == "all" else per_module[module]
        label = "**all**" if module == "all" else f"`{module}`"
        lines.append(
            f"| {label} | {c['mutants']} | {c['killed']} | {c['equivalent']} | "
            f"{c['survived']} | {c['not checked']} | {score(c)} |"
        )
    lines += ["", "Equivalent mutants (the program's behaviour does not change):", ""]
    lines += ["| mutant | reason |", "|---|---|"]
    for name in sorted(equivalent):
        lines.append(f"| `{function_of(name)}` ({name.rsplit('_', 1)[1]}) | {equivalent[name]} |")
    lines += ["", "Survivors not yet killed or classified:", ""]
    if open_survivors:
        per_function = collections.Counter(
            (module_of(n), function_of(n), s) for n, s in open_survivors
        )
        lines += ["| module | function | status | mutants |", "|---|---|---|---:|"]
        for (module, function, status), count in sorted(per_function.items()):
            lines.append(f"| `{module}` | `{function}` | {status} | {count} |")
    else:
        lines.append("none.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--triage", type=Path, default=Path("docs/data/mutation-triage.tsv"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = summarise(read_results(args.results), read_equivalent(args.triage))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
