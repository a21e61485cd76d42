"""The derivation pages in docs/: their code runs, their maths renders, their citations exist.

Each page is run as one test: Sybil reads its ```python blocks (plain code, or ``>>>`` examples
whose printed output is compared) and evaluates them in order in one namespace, as the page
reads. One test per page rather than one per block, so that no runner can separate a block
from the earlier blocks whose names it uses (``-k``, ``pytest-xdist``).

The maths is checked by ``tools/check_math.mjs`` with KaTeX in strict mode. That needs Node.js
and ``npm ci`` at the repository root; without them these tests fail, never skip, so CI cannot
pass with the check silently switched off.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CHECK_MATH = ROOT / "tools" / "check_math.mjs"

SYBIL = Sybil([PythonCodeBlockParser(doctest_optionflags=doctest.NORMALIZE_WHITESPACE)])

# A cited function, in backticks: `toyvae.elbo`, `toyvae.LinearGaussian.log_evidence`.
NAME = re.compile(r"`(toyvae(?:\.\w+)+)`")
# A cited test: tests/path/to/test_file.py::test_name, or ::Class::test_name.
TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+(?:::\w+)?)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _page_id(page: Path) -> str:
    return page.name


def _prose_lines(page: Path) -> list[str]:
    """The page's lines with fenced code blanked out, so line numbers stay right."""
    lines, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            lines.append("")
        else:
            lines.append("" if inside else line)
    return lines


def _node() -> str:
    """Path to node, or a failure that says how to get it and KaTeX."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: install Node.js (apt-get install nodejs npm), then `npm ci`")
    if not (ROOT / "node_modules" / "katex" / "package.json").is_file():
        pytest.fail(f"KaTeX is not installed: run `npm ci` in {ROOT} (see package.json)")
    return node


def _check_math(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_node(), str(CHECK_MATH), *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_there_are_pages():
    """docs/ holds the four derivation pages."""
    names = {page.name for page in PAGES}
    assert {"index.md", "elbo.md", "linear-gaussian.md", "closed-form-elbo.md"} <= names


# Pages with nothing to compute: a list of papers, a list of terms.
NO_CODE = {"references.md", "glossary.md"}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_examples_run(page):
    """Every Python block of the page runs, in order, and every >>> output is as printed."""
    examples = list(SYBIL.parse(page).examples())
    assert examples or page.name in NO_CODE, f"{page.name} has no ```python example"
    for example in examples:
        example.evaluate()  # raises SybilFailure naming the file and line on a mismatch


def test_every_formula_renders_under_katex_strict():
    """Every $…$ and $$…$$ formula in docs/*.md renders with KaTeX, strict mode, no error."""
    result = _check_math(DOCS)
    assert result.returncode == 0, result.stderr + result.stdout


def test_math_check_names_file_and_line_of_each_broken_formula(tmp_path):
    """The KaTeX check flags an undefined macro and a stray $ by line, and ignores code."""
    page = tmp_path / "page.md"
    page.write_text(
        "Fine: $\\log p(x)$ and\n"  # line 1
        "$$\n\\mathrm{KL}(q \\,\\|\\, p) \\ge 0 \\tag{1}\n$$\n"  # lines 2-4
        "Broken: $\\undefinedmacro{x}$.\n"  # line 5
        "Stray: $ x$ is not math.\n"  # line 6
        "```python\ncost = '$5'  # code, not math\n```\n"  # lines 7-9
        "Code span: `$x`.\n",  # line 10
        encoding="utf-8",
    )
    result = _check_math(page)
    assert result.returncode == 1, result.stdout + result.stderr
    flagged = set(re.findall(rf"^{re.escape(str(page))}:(\d+):", result.stderr, re.MULTILINE))
    assert flagged == {"5", "6"}, result.stderr


def _resolve(name: str):
    """The object a dotted name cites: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part, None)
        return obj
    return None


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_cited_names_exist(page):
    """Every `toyvae.…` name cited on the page is an attribute of the installed package."""
    missing = []
    for number, line in enumerate(_prose_lines(page), start=1):
        for name in NAME.findall(line):
            if _resolve(name) is None:
                missing.append(f"{page.name}:{number}: {name}")
    assert not missing, "cited names that do not exist:\n" + "\n".join(missing)


def _test_names(path: Path) -> set[str]:
    """``test_x`` and ``Class::test_x`` for every test function defined in the file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return {name for name in names if name.split("::")[-1].startswith("test")}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_cited_tests_exist(page):
    """Every tests/…::test_name cited on the page is a test defined in that file."""
    missing = []
    for number, line in enumerate(_prose_lines(page), start=1):
        for path, name in TEST.findall(line):
            file = ROOT / path
            if not file.is_file() or name not in _test_names(file):
                missing.append(f"{page.name}:{number}: {path}::{name}")
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)


def _identities(lines: list[str]):
    """(line number, text of the paragraph after it) for each tagged $$ display."""
    number = 0
    while number < len(lines):
        if lines[number].strip().startswith("$$"):
            start = number
            end = number if lines[number].strip().count("$$") == 2 else number + 1
            while end < len(lines) and "$$" not in lines[end]:
                end += 1
            display = "\n".join(lines[start : end + 1])
            after = end + 1
            while after < len(lines) and not lines[after].strip():
                after += 1
            paragraph = []
            while after < len(lines) and lines[after].strip():
                paragraph.append(lines[after])
                after += 1
            if "\\tag{" in display:
                yield start + 1, " ".join(paragraph)
            number = end + 1
        else:
            number += 1


# Pages whose subject is a derivation: each must display labelled identities. Reference pages
# (API, notation, the report, the checker's walkthrough) may or may not.
DERIVATIONS = [
    "elbo.md",
    "linear-gaussian.md",
    "closed-form-elbo.md",
    "estimators.md",
    "one-sample.md",
    "iwae.md",
    "gradients.md",
    "snr.md",
    "prior-vs-aggregate.md",
    "joint-kl.md",
    "elbo-vs-likelihood.md",
]


@pytest.mark.parametrize("name", DERIVATIONS)
def test_derivation_pages_display_labelled_identities(name):
    """Every derivation page exists and displays at least one labelled (\\tag) identity."""
    assert list(_identities(_prose_lines(DOCS / name))), f"{name} displays no labelled identity"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_identity_names_its_code_and_its_test(page):
    """Each labelled display (\\tag) is followed by 'Computed by `toyvae.…`' and a cited test."""
    identities = list(_identities(_prose_lines(page)))
    bad = [
        f"{page.name}:{number}"
        for number, paragraph in identities
        if not ("Computed by" in paragraph and NAME.search(paragraph))
        or not ("Checked by" in paragraph and TEST.search(paragraph))
    ]
    assert not bad, "identities that do not name their code and test:\n" + "\n".join(bad)


TAG = re.compile(r"\\tag\{([^}]*)\}")
# A reference to a labelled identity in prose: (C6), (SS2), (O5); not maths such as (W, b).
LABEL_REFERENCE = re.compile(r"(?<![\w\\])\(([A-Z]{1,2}\d{1,2})\)")


def labels_by_page(pages) -> dict[str, list[str]]:
    """Each equation label (the argument of ``\\tag``) and the pages that define it."""
    defined: dict[str, list[str]] = {}
    for page in pages:
        for line in _prose_lines(page):
            for label in TAG.findall(line):
                defined.setdefault(label, []).append(page.name)
    return defined


def duplicate_labels(pages) -> list[str]:
    """'(label): page, page' for each label defined more than once across (or within) pages."""
    return [
        f"({label}): {', '.join(where)}"
        for label, where in sorted(labels_by_page(pages).items())
        if len(where) > 1
    ]


def test_no_equation_label_is_defined_twice():
    """Each \\tag{…} label is defined once in all of docs/: a cited (L3) names one identity."""
    duplicates = duplicate_labels(PAGES)
    assert not duplicates, "labels defined more than once:\n" + "\n".join(duplicates)


def test_duplicate_label_check_flags_a_label_on_two_pages(tmp_path):
    """The label check flags (L1) tagged on two pages and passes distinct labels."""
    one, two = tmp_path / "one.md", tmp_path / "two.md"
    one.write_text("$$\na = b \\tag{L1}\n$$\n\n$$\nc = d\n\\tag{L2}\n$$\n", encoding="utf-8")
    two.write_text("$$\ne = f \\tag{L1}\n$$\n\n```\n\\tag{L2} in code\n```\n", encoding="utf-8")
    assert duplicate_labels([one, two]) == ["(L1): one.md, two.md"]
    assert duplicate_labels([one]) == []


def test_every_cited_label_is_defined():
    """Every label cited in prose, such as (C6), is the \\tag of a displayed identity on a page."""
    defined = labels_by_page(PAGES)
    missing = [
        f"{page.name}:{number}: ({label})"
        for page in PAGES
        for number, line in enumerate(_prose_lines(page), start=1)
        for label in LABEL_REFERENCE.findall(line)
        if label not in defined
    ]
    assert not missing, "cited labels that no page defines:\n" + "\n".join(missing)


# A figure on a page: ![alt](figures/name.png), as the whole line.
FIGURE = re.compile(r"^\s*!\[[^\]]*\]\(figures/[^)]+\)")


def uncaptioned_figures(page: Path) -> list[str]:
    """'page:line' for each figure not inside <figure markdown> … <figcaption>text</figcaption>."""
    lines = _prose_lines(page)
    bad = []
    for number, line in enumerate(lines):
        if not FIGURE.match(line):
            continue
        before = lines[number - 1].strip() if number else ""
        after = " ".join(lines[number + 1 : number + 3])
        caption = re.search(r"<figcaption>(.*?)</figcaption>", after)
        if not before.startswith("<figure") or caption is None or not caption.group(1).strip():
            bad.append(f"{page.name}:{number + 1}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_figure_has_a_caption(page):
    """Each figure sits in a <figure> with a non-empty <figcaption> right under the image."""
    bad = uncaptioned_figures(page)
    assert not bad, "figures without a caption:\n" + "\n".join(bad)


def test_caption_check_flags_a_bare_figure(tmp_path):
    """The caption check flags a bare image and an empty caption, and passes a captioned one."""
    page = tmp_path / "page.md"
    page.write_text(
        "![a](figures/a.png)\n\n"  # line 1: bare
        '<figure markdown="span">\n  ![b](figures/b.png)\n  <figcaption></figcaption>\n'
        "</figure>\n\n"  # line 4: empty caption
        '<figure markdown="span">\n  ![c](figures/c.png)\n  <figcaption>C.</figcaption>\n'
        "</figure>\n",
        encoding="utf-8",
    )
    assert uncaptioned_figures(page) == ["page.md:1", "page.md:4"]


REFERENCE_LINK = re.compile(r"\(references\.md#([\w-]+)\)")


def test_every_reference_is_cited_and_every_citation_has_a_reference():
    """Each entry of references.md is linked from a page, and each such link names an entry."""
    entries = set(re.findall(r'<span id="([\w-]+)"></span>', (DOCS / "references.md").read_text()))
    cited = {
        (page.name, key)
        for page in PAGES
        for line in _prose_lines(page)
        for key in REFERENCE_LINK.findall(line)
    }
    unknown = sorted(f"{name}: #{key}" for name, key in cited if key not in entries)
    assert not unknown, f"citations of no entry on references.md: {unknown}"
    uncited = sorted(entries - {key for _, key in cited})
    assert not uncited, f"references that no page cites: {uncited}"


# An inline link or image, [text](target) or ![alt](target "title"); the text may hold one level
# of brackets. And a snippet include, --8<-- "figures/accuracy.md" (read from docs/).
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
SNIPPET = re.compile(r'^--8<-- "([^"]+)"')
CODE_SPAN = re.compile(r"`[^`]*`")
GENERATED_PAGES = {"tests.md"}  # written by docs/hooks.py at build time, not a file in docs/


def generated_figures() -> set[str]:
    """Names of the files that the figure scripts run by scripts/build_docs.sh write to figures/.

    docs/figures/ is not committed: the build regenerates it. A name counts if it is a string
    literal ending in .png or .md in one of those scripts.
    """
    build = (ROOT / "scripts" / "build_docs.sh").read_text(encoding="utf-8")
    names = set()
    for script in set(re.findall(r"scripts/\w+\.py", build)):
        for node in ast.walk(ast.parse((ROOT / script).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"[\w.-]+\.(png|md)", node.value):
                    names.add(node.value)
    return names


def broken_links(page: Path, docs: Path = DOCS, generated: set[str] | None = None) -> list[str]:
    """'page:line: target: why' for each relative link, image or snippet of the page that a
    reader of the Markdown (on GitHub, in an editor) or the build could not follow."""
    generated = generated_figures() if generated is None else generated
    bad = []
    for number, line in enumerate(_prose_lines(page), start=1):
        line = CODE_SPAN.sub(lambda span: " " * len(span[0]), line)  # `[a](b)` is not a link
        targets = [(t, page.parent) for t in LINK.findall(line)]
        targets += [(t, docs) for t in SNIPPET.findall(line.strip())]  # base_path: docs
        for target, base in targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc or not parts.path:
                continue  # a web address, or an anchor on this page
            path = unquote(parts.path)
            where = f"{page.name}:{number}: {target}"
            if path.startswith("/"):
                bad.append(f"{where}: absolute, not relative to the page")
                continue
            file = (base / path).resolve()
            if not file.is_relative_to(docs.resolve()):
                bad.append(f"{where}: outside docs/")
            elif file.parent == (docs / "figures").resolve():
                if file.name not in generated:
                    bad.append(f"{where}: no figure script of the build writes it")
            elif file.relative_to(docs.resolve()).as_posix() in GENERATED_PAGES:
                continue
            elif not file.is_file():
                bad.append(f"{where}: no such file")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_and_image_resolves(page):
    """Every relative link, image and snippet of the page resolves from the page's own folder,
    as on GitHub: to a committed file, or to a figure the build generates into docs/figures/."""
    bad = broken_links(page)
    assert not bad, "links that do not resolve:\n" + "\n".join(bad)


def test_link_check_flags_missing_absolute_and_ungenerated_targets(tmp_path):
    """The link check flags a missing page, an absolute path and a figure no script makes."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "other.md").write_text("# Other\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#other) [web](https://example.org/x.md) [here](#top)\n"  # line 1: fine
        "[missing](nowhere.md)\n"  # line 2
        "![abs](/figures/a.png)\n"  # line 3
        "![made](figures/a.png) ![not made](figures/b.png)\n"  # line 4: b.png is not made
        '--8<-- "figures/table.md"\n'  # line 5: made
        "[tests](tests.md) and `[code](nowhere.md)` in prose\n",  # line 6
        encoding="utf-8",
    )
    bad = broken_links(page, docs=tmp_path, generated={"a.png", "table.md"})
    assert [entry.split(": ")[0] for entry in bad] == ["page.md:2", "page.md:3", "page.md:4"]
    assert "figures/b.png" in bad[-1]
