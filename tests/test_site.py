"""The documentation site: every page in the nav, every public name documented, and, built and
rendered in headless Chromium, every formula typeset, every link resolved, no network request.

The quick checks run by default. The build-and-render checks are marked ``site`` (a few
minutes: it needs 175 s of CPU time, about 200 s on a quiet two-core machine, and took 9 minutes
beside other CPU-bound jobs; the figures, ``mkdocs build --strict``, Chromium on every page at
1280 and 390 px, captions, figure text and overflow included); CI runs them with
``pytest -m site``. They need the ``docs`` extra, ``npm ci`` and Chromium, and fail, never
skip, when one is missing. Screenshots of the top of every page, at 1280 and at 390 px, are
kept in ``build/site-screenshots/1280/`` and ``build/site-screenshots/390/``.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

import toyvae

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCREENSHOTS = ROOT / "build" / "site-screenshots"
GENERATED_PAGES = {"tests.md"}  # made by docs/hooks.py at build time, not files in docs/


def _hooks():
    """docs/hooks.py, the site's MkDocs hooks, as a module."""
    spec = importlib.util.spec_from_file_location("toyvae_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(items) -> set[str]:
    pages = set()
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def _public_modules() -> list:
    """toyvae and every importable submodule with no underscore in its dotted name."""
    found = [toyvae]
    for info in pkgutil.walk_packages(toyvae.__path__, "toyvae."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(importlib.import_module(info.name))
    return found


def _documented_modules() -> list:
    """Public modules that declare their public names in ``__all__``."""
    return [module for module in _public_modules() if hasattr(module, "__all__")]


def _public_callables():
    """(dotted name, object) for each function and class a public module exports."""
    for module in _documented_modules():
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj


# -- quick checks -------------------------------------------------------------------------------


def test_every_page_is_in_the_nav():
    """Every Markdown page under docs/ is listed in the nav of mkdocs.yml."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = _nav_pages(config["nav"])
    pages = {page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md")}
    # Not pages: what exclude_docs leaves out (generated includes, committed data).
    excluded = config["exclude_docs"].split()
    pages -= {page for page in pages if any(fnmatch.fnmatch(page, p) for p in excluded)}
    missing = sorted(pages - listed)
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"
    assert GENERATED_PAGES <= listed


def _nav_order(items) -> list[str]:
    """The nav's pages in the order a reader meets them."""
    pages = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_order(value) if isinstance(value, list) else [value]
    return pages


def test_landing_page_lists_every_page_in_nav_order():
    """The landing page's list ("The pages") links every other page of the nav, in nav order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    section = index.split("\n## The pages\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[[^\]]+\]\(([\w-]+\.md)\)", section, re.MULTILINE)
    assert listed == [page for page in _nav_order(config["nav"]) if page != "index.md"]


def test_every_public_module_is_in_the_api_reference():
    """Every public module with an ``__all__`` has a ``::: module`` entry in docs/api.md."""
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    entries = set(re.findall(r"^::: ([\w.]+)\s*$", api, re.MULTILINE))
    # toyvae itself is covered by the list of its exports, which docs/hooks.py generates.
    missing = [m.__name__ for m in _documented_modules()[1:] if m.__name__ not in entries]
    assert not missing, f"public modules missing from docs/api.md: {missing}"


def test_every_public_function_and_class_has_a_docstring():
    """Each function and class in a public ``__all__`` has a docstring of its own."""
    missing = sorted(name for name, obj in _public_callables() if not (obj.__doc__ or "").strip())
    assert not missing, f"public functions and classes without a docstring: {missing}"


def test_citations_become_links_to_their_documented_home():
    """The hook links `toyvae.X` to the module that defines X, and tests to their anchor."""
    hooks = _hooks()
    line = (
        "Computed by `toyvae.elbo`, checked by tests/test_model.py::test_x and `toyvae.gaussians`."
    )
    assert hooks._link_line(line, "") == (
        "Computed by [`toyvae.elbo`][toyvae.bounds.elbo], checked by "
        "[`tests/test_model.py::test_x`](tests.md#test_model--test_x) and "
        "[`toyvae.gaussians`][toyvae.gaussians]."
    )
    method = hooks._canonical("toyvae.LinearGaussian.log_evidence")
    assert method == "toyvae.model.LinearGaussian.log_evidence"
    assert (
        hooks._canonical("toyvae.LinearGaussian.data_dim") == "toyvae.model.LinearGaussian.data_dim"
    )
    # Already a link: left alone.
    assert hooks._link_line("[`toyvae.elbo`][toyvae.bounds.elbo]", "") == (
        "[`toyvae.elbo`][toyvae.bounds.elbo]"
    )


def test_exports_list_shows_a_constant_by_value_not_its_types_docstring():
    """The landing list of ``toyvae.__all__`` on the API page gives a constant's value."""
    listing = _hooks().exports_list()
    assert f"`{toyvae.ESTIMATORS!r}`" in listing
    assert "Built-in immutable sequence" not in listing  # tuple.__doc__, as inspect.getdoc gives


def test_docstring_maths_is_rewritten_for_katex():
    """reST ``.. math::`` blocks become $$ displays and :math: roles inline $ maths."""
    hooks = _hooks()
    text = "Intro :math:`x^2`.\n\n.. math::\n    a = b\n    + c\n\nAfter."
    assert hooks.rest_math_to_markdown(text) == "Intro $x^2$.\n\n$$\na = b\n+ c\n$$\n\nAfter."


def test_one_line_docstring_maths_is_rewritten_for_katex():
    """The one-line ``.. math:: a = b`` form becomes a $$ display too, indented or not."""
    hooks = _hooks()
    text = (
        "Fails when\n\n.. math:: |Z| = \\frac{a}{b}\n\n(then)\n    .. math:: a = b\n        + c\n"
    )
    assert hooks.rest_math_to_markdown(text) == (
        "Fails when\n\n$$\n|Z| = \\frac{a}{b}\n$$\n\n(then)\n    $$\n    a = b\n    + c\n    $$"
    )


# reST that must not reach a page as text: a maths directive, a role (:func:, :math:, …).
RAW_REST = re.compile(
    r"\.\. (?:math|note|warning)::|:(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|math):`"
)


# The same on a rendered page, where a role's `target` has become <code> (not read as text).
RAW_REST_TEXT = re.compile(
    r"\.\. (?:math|note|warning)::|:(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|math):"
)


def _docstrings():
    """(dotted name, docstring) of every public module, and of each public name's object."""
    for module in _documented_modules():
        yield module.__name__, inspect.getdoc(module) or ""
        for name in module.__all__:
            obj = getattr(module, name)
            doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
            if doc:
                yield f"{module.__name__}.{name}", doc
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") and getattr(value, "__doc__", None):
                        doc = inspect.getdoc(value) or ""
                        yield f"{module.__name__}.{name}.{member}", doc


def test_docstrings_leave_no_raw_rest_after_the_hook():
    """After docs/hooks.py's rewriting, no public docstring shows `.. math::` or a :role:."""
    hooks = _hooks()
    raw = [
        f"{name}: {match[0]}"
        for name, doc in _docstrings()
        for match in RAW_REST.finditer(hooks.rest_roles_to_code(hooks.rest_math_to_markdown(doc)))
    ]
    assert not raw, "reST left in docstrings after the hook:\n" + "\n".join(sorted(set(raw)))


def test_tests_page_has_an_anchor_for_every_test():
    """The generated tests page gives each test in tests/ an anchor that citations can use."""
    hooks = _hooks()
    page = hooks.tests_page()
    anchor = hooks.test_anchor("tests/test_site.py", "test_every_page_is_in_the_nav")
    assert f"{{: #{anchor} }}" in page


# -- the built site (marked `site`: CI runs `pytest -m site`) ------------------------------------


class _Page(HTMLParser):
    """Ids, links, resources and code-span citations of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []  # href of <a>
        self.resources: list[str] = []  # src of scripts and images, href of stylesheets
        self.citations: list[tuple[str, bool]] = []  # (text of <code>, inside an <a>?)
        self._open: list[str] = []
        self._code: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("script", "img") and attrs.get("src"):
            self.resources.append(attrs["src"])
        if tag == "link" and attrs.get("rel") == "stylesheet":
            self.resources.append(attrs["href"])
        if tag == "code" and "pre" not in self._open:
            self._code = []
        self._open.append(tag)

    def handle_endtag(self, tag):
        if tag == "code" and self._code is not None:
            self.citations.append(("".join(self._code), "a" in self._open))
            self._code = None
        while self._open and self._open.pop() != tag:
            pass

    def handle_data(self, data):
        if self._code is not None:
            self._code.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once by the README's command into a temporary folder."""
    out = tmp_path_factory.mktemp("site") / "site"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_docs.sh"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def _pages(site: Path) -> dict[Path, _Page]:
    """Every page of the site; not 404.html, whose root-absolute links are for a web server."""
    paths = sorted(site.rglob("*.html"))
    return {p: _parse(p) for p in paths if "vendor" not in p.parts and p.name != "404.html"}


@pytest.mark.site
def test_every_link_and_resource_resolves(site):
    """Every relative link, script, stylesheet and image exists, with its #anchor; none remote."""
    pages = _pages(site)
    bad = []
    for path, page in pages.items():
        for url in page.links + page.resources:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:
                if url in page.resources:
                    bad.append(f"{path.relative_to(site)}: remote resource {url}")
                continue  # a link out of the site (a citation, the theme's credit) is not loaded
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if not target.exists():
                bad.append(f"{path.relative_to(site)}: {url}: no such file")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    bad.append(f"{path.relative_to(site)}: {url}: no such anchor")
    assert not bad, "\n".join(bad)


@pytest.mark.site
def test_every_citation_on_a_page_is_a_link(site):
    """Every `toyvae.X` and tests/…::test code span outside code blocks is a working link."""
    cited = re.compile(r"^(toyvae(\.\w+)+|tests/[\w/]+\.py::\w+(::\w+)?)$")
    unlinked = [
        f"{path.relative_to(site)}: {text}"
        for path, page in _pages(site).items()
        if path.name != "api.html"  # the reference itself names the objects it documents
        for text, linked in page.citations
        if cited.match(text) and not linked
    ]
    assert not unlinked, "citations that are not links:\n" + "\n".join(unlinked)


@pytest.mark.site
def test_api_reference_documents_every_public_name(site):
    """Each name of every public ``__all__`` has an entry (an anchor) in the API reference."""
    ids = _parse(site / "api.html").ids
    hooks = _hooks()
    missing = [
        f"{module.__name__}.{name}"
        for module in _documented_modules()
        for name in module.__all__
        if hooks._canonical(f"{module.__name__}.{name}") not in ids
    ]
    assert not missing, f"public names without an entry in the API reference: {missing}"


class _Text(HTMLParser):
    """Prose a reader sees: outside <script>, <style>, <code> and KaTeX's MathML copy."""

    SKIP = frozenset({"script", "style", "annotation", "code"})

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skipping: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skipping.append(tag)

    def handle_endtag(self, tag):
        if self._skipping and self._skipping[-1] == tag:
            self._skipping.pop()

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def raw_rest(page_html: str) -> list[str]:
    """Each reST directive or role left in the prose of an HTML page, with some context."""
    parser = _Text()
    parser.feed(page_html)
    text = "".join(parser.parts)
    return [
        text[max(0, m.start() - 40) : m.end() + 40].replace("\n", " ")
        for m in RAW_REST_TEXT.finditer(text)
    ]


def test_raw_rest_check_flags_what_the_old_api_page_showed():
    """The page check flags `.. math::` and a :func: role as prose, not in code or maths."""
    old = (
        "<p>fails when</p><p>.. math:: |z| = \\frac{a}{b}</p>"
        "<p>see :func:<code>toyvae.elbo</code></p>"
    )
    assert len(raw_rest(old)) == 2
    fine = "<p>Use <code>.. math::</code> and <code>:func:`x`</code>.</p><script>':func:'</script>"
    assert raw_rest(fine) == []


@pytest.mark.site
def test_no_page_shows_raw_rest(site):
    """No page's text shows reST markup: a `.. math::` directive or a :func:/:class:/… role."""
    raw = [
        f"{path.relative_to(site)}: …{context}…"
        for path in _pages(site)
        if path.name != "tests.html"  # test docstrings, shown as literal text by design
        for context in raw_rest(path.read_text(encoding="utf-8"))
    ]
    assert not raw, "raw reST on the built pages:\n" + "\n".join(raw)


@pytest.mark.site
def test_every_page_renders_in_chromium(site):
    """Headless Chromium: all maths typeset by KaTeX, fonts loaded, no failed or remote request,
    no equation into its tag, no display or table scrolling at 1280 px, nothing out of the text
    column or wider than the viewport at 1280 and 390 px, every figure captioned with its
    smallest text at least 9 px on screen (scripts/check_site.mjs)."""
    node = shutil.which("node")
    assert node, "node not found: install Node.js, then `npm ci`"
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)  # one screenshot per page of this build, none stale
    result = subprocess.run(
        [node, str(ROOT / "scripts" / "check_site.mjs"), str(site), str(SCREENSHOTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    pages = {path.relative_to(site).as_posix() for path in _pages(site)}
    assert {r["page"] for r in summary["results"]} == pages
    assert sum(r["formulas"] for r in summary["results"]) > 0
    for width in (1280, 390):  # the top of every page at a desktop and a phone width
        assert len(list((SCREENSHOTS / str(width)).glob("*.png"))) == len(pages)
