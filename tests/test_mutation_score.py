"""scripts/mutation_score.py's arithmetic, and the mutation numbers on docs/how-we-know.md.

The run itself takes hours and does not run here; its committed outputs do: the page's prose
numbers must be those of docs/data/mutation-score.md and docs/data/mutation-triage.tsv.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mutation_score  # noqa: E402


def test_score_counts_later_kills_and_leaves_out_equivalent_and_unreached_mutants():
    statuses = {
        "toyvae.m.x_f__mutmut_1": "killed",
        "toyvae.m.x_f__mutmut_2": "survived",  # killed later by a new test
        "toyvae.m.x_f__mutmut_3": "survived",  # equivalent
        "toyvae.m.x_f__mutmut_4": "survived",  # open
        "toyvae.m.x_f__mutmut_5": "not checked",
        "toyvae.m.xǁCǁg__mutmut_1": "timeout",
    }
    triage = {
        "equivalent": {"toyvae.m.x_f__mutmut_3": "same value"},
        "killed": {"toyvae.m.x_f__mutmut_2": "tests/t.py::t"},
    }
    text = mutation_score.summarise(statuses, triage)
    # 6 mutants, 1 not checked, killed = killed + timeout + later kill = 3, 1 equivalent,
    # 1 open: score 3 / (6 − 1 − 1) = 75.0%.
    assert "| **all** | 6 | 1 | 3 (1) | 1 | 1 | 75.0% |" in text
    assert "| `m.f` (3) | same value |" in text
    assert "| `m` | `f` | survived | 1 |" in text
    assert mutation_score.function_of("toyvae.m.xǁCǁ__init____mutmut_7") == "C.__init__"


def test_the_page_quotes_the_committed_run():
    page = (ROOT / "docs" / "how-we-know.md").read_text(encoding="utf-8")
    score = (ROOT / "docs" / "data" / "mutation-score.md").read_text(encoding="utf-8")
    triage = (ROOT / "docs" / "data" / "mutation-triage.tsv").read_text(encoding="utf-8")
    row = re.search(r"\| \*\*all\*\* \| (\d+) \| (\d+) \|", score)
    mutants, not_checked = int(row[1]), int(row[2])
    results = sorted((ROOT / "docs" / "data").glob("mutation-results-*.txt"))
    statuses = mutation_score.read_results(results)
    assert len(statuses) == mutants  # the table is the committed results' summary
    if not_checked:
        assert f"The {not_checked:,} mutants no run reached" in " ".join(page.split())
    else:
        assert "Every mutant was run." in page
    equivalent = [line for line in triage.splitlines() if "\tequivalent\t" in line]
    on_device = [line for line in equivalent if "device" in line.split("\t")[2].lower()]
    flat = " ".join(page.split())
    assert f"Of the {len(equivalent)} equivalent mutants, {len(on_device)} change" in flat
    killed = sum(s in mutation_score.KILLED for s in statuses.values())
    later = len([line for line in triage.splitlines() if "\tkilled\t" in line])
    relevant = mutants - not_checked - len(equivalent)
    assert f"killed {killed:,} of the {relevant:,} mutants" in flat
    assert f"({100 * killed / relevant:.1f}%); the other {later} survived them" in flat
