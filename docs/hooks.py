"""MkDocs hooks for the toyvae site: citations become links, and the site needs no network.

- Prose citations of functions (`` `toyvae.elbo` ``) become cross-references to their entry in
  the API reference (resolved by mkdocs-autorefs; an unknown name fails the strict build), and
  citations of tests (``tests/…/test_x.py::test_name``) become links to a generated page,
  ``tests.md``, that lists every test with its one-line docstring.
- KaTeX and the iframe-worker shim are copied from ``node_modules/`` (installed by ``npm ci``,
  pinned in package-lock.json) into ``site/vendor/``: no third-party file is committed, and no
  page asks a CDN for anything.
- Nav entries for pages that do not exist (yet) are dropped, so the nav can list planned pages.
- :class:`DocstringMath`, a griffe extension, turns reST maths in docstrings (``.. math::``
  blocks, ``:math:`…``` roles) into ``$$…$$`` and ``$…$`` for KaTeX, reST cross-reference
  roles into code, and a closing paragraph after a numpydoc section into a Notes section.

Used by mkdocs.yml (``hooks:`` and the mkdocstrings ``extensions:``); not a page of the site.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import sys
from pathlib import Path

from griffe import Extension
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.toyvae")

ROOT = Path(__file__).resolve().parent.parent
TESTS_PAGE = "tests.md"  # generated: not a file in docs/

# The same citation patterns as tests/test_docs.py, which checks that the cited things exist.
NAME = re.compile(r"(?<!\[)`(toyvae(?:\.\w+)+)`(?!\])")
TEST = re.compile(r"(?<![\[\w/])(`?)(tests/[\w/]+\.py)::(\w+(?:::\w+)?)\1(?![\]\w])")
FENCE = re.compile(r"^\s*(```|~~~)")

# Third-party files the pages load, from node_modules/ to site/vendor/.
VENDOR = {
    "katex": ("katex/dist", ["katex.min.js", "katex.min.css", "fonts/*"]),
    "iframe-worker": ("iframe-worker/shim", ["index.js"]),
}


# -- nav: drop planned pages that do not exist yet -----------------------------------------------


def _prune(items, docs_dir: Path, dropped: list[str]):
    kept = []
    for item in items:
        title, value = next(iter(item.items())) if isinstance(item, dict) else (None, item)
        if isinstance(value, list):
            value = _prune(value, docs_dir, dropped)
            if value:
                kept.append({title: value})
        elif value == TESTS_PAGE or (docs_dir / value).is_file():
            kept.append(item)
        else:
            dropped.append(value)
    return kept


def on_config(config):
    dropped: list[str] = []
    config.nav = _prune(config.nav or [], Path(config.docs_dir), dropped)
    if dropped:
        log.info("pages listed in the nav but not written yet: %s", ", ".join(dropped))
    return config


# -- files: the generated tests page and the vendored JavaScript and fonts ----------------------


def test_anchor(path: str, name: str) -> str:
    """The id of a test on the tests page: ``tests/a/test_b.py::test_c`` -> ``a-test_b--test_c``."""
    stem = path.removeprefix("tests/").removesuffix(".py").replace("/", "-")
    return f"{stem}--{name.replace('::', '--')}"


def _escape(text: str) -> str:
    """Docstring text as literal Markdown (no emphasis, links, maths or HTML)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return re.sub(r"([\\`*_\[\]$])", r"\\\1", text)


def _tests(tree: ast.Module):
    """(name, line, docstring) of each test function, and of each test method as Class::name."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test"):
                yield node.name, node.lineno, ast.get_docstring(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                is_function = isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                if is_function and item.name.startswith("test"):
                    yield f"{node.name}::{item.name}", item.lineno, ast.get_docstring(item)


def tests_page() -> str:
    """Markdown of the page that lists every test, with an anchor per test for citations."""
    lines = [
        "# The tests",
        "",
        "Every test of the suite, by file, with the property it checks (its docstring). The",
        "derivation pages link here when they cite a test. Run one with",
        "`pytest 'tests/FILE.py::NAME'`.",
    ]
    for file in sorted((ROOT / "tests").rglob("test_*.py")):
        path = file.relative_to(ROOT).as_posix()
        tree = ast.parse(file.read_text(encoding="utf-8"))
        summary = (ast.get_docstring(tree) or "").strip().split("\n\n")[0].replace("\n", " ")
        tests = list(_tests(tree))
        if not tests:
            continue
        lines += ["", f"## {path}", "", _escape(summary)]
        for name, line, docstring in tests:
            first = (docstring or "(no docstring)").strip().split("\n\n")[0].replace("\n", " ")
            lines += [
                "",
                f"`{name}` (line {line}): {_escape(first)}",
                f"{{: #{test_anchor(path, name)} }}",
            ]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, TESTS_PAGE, content=tests_page()))
    modules = ROOT / "node_modules"
    for package, (folder, patterns) in VENDOR.items():
        source = modules / folder
        if not source.is_dir():
            raise PluginError(f"{source} is missing: run `npm ci` in {ROOT} (see package.json)")
        for pattern in patterns:
            for path in sorted(source.glob(pattern)):
                name = "shim.js" if package == "iframe-worker" else path.relative_to(source)
                uri = f"vendor/{package}/{Path(name).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


# -- pages: citations become links ---------------------------------------------------------------


def _canonical(name: str) -> str:
    """Where the cited object is documented: ``toyvae.elbo`` -> ``toyvae.bounds.elbo``."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    path = parts[0]
    for part in parts[1:]:
        parent, obj = obj, getattr(obj, part, None)
        if obj is None and inspect.ismodule(parent):  # a submodule the package does not import
            try:
                obj = importlib.import_module(f"{parent.__name__}.{part}")
            except ImportError:
                obj = None
        if obj is None:
            return name  # not an attribute: left for autorefs (and tests/test_docs.py) to report
        if inspect.ismodule(obj):
            path = obj.__name__
        elif inspect.isclass(obj) or inspect.isfunction(obj):  # a method too, via its class
            module = obj.__module__
            public = not any(p.startswith("_") for p in module.split("."))
            path = f"{module}.{obj.__qualname__}" if public else f"{path}.{part}"
        elif inspect.ismodule(parent):  # a constant: documented in the submodule defining it
            path = _constant_home(parent, part, obj) or f"{path}.{part}"
        else:  # a property or a class attribute: documented under its class
            path = f"{path}.{part}"
    return path


def _constant_home(package, name: str, obj) -> str | None:
    """The public submodule of ``package`` that exports ``obj`` as ``name``, if any.

    A constant carries no ``__module__``, so a package's re-export is traced to the submodule
    whose ``__all__`` holds the same object.
    """
    for module in list(sys.modules.values()):
        module_name = getattr(module, "__name__", "")
        if not module_name.startswith(package.__name__ + ".") or "._" in module_name:
            continue
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is obj:
            return f"{module_name}.{name}"
    return None


def _link_line(line: str, up: str) -> str:
    line = NAME.sub(lambda m: f"[`{m[1]}`][{_canonical(m[1])}]", line)
    return TEST.sub(
        lambda m: f"[`{m[2]}::{m[3]}`]({up}{TESTS_PAGE}#{test_anchor(m[2], m[3])})", line
    )


EXPORTS = "<!-- toyvae-exports -->"


def exports_list() -> str:
    """A Markdown list of ``toyvae.__all__``: each name, linked to its entry, and its summary."""
    toyvae = importlib.import_module("toyvae")
    lines = []
    for name in toyvae.__all__:
        obj = getattr(toyvae, name)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj):
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            doc = rest_roles_to_code(rest_math_to_markdown(doc))
        else:  # a constant: getdoc would give its type's docstring ("Built-in immutable sequence.")
            doc = f"`{obj!r}`"
        lines.append(f"- [`toyvae.{name}`][{_canonical(f'toyvae.{name}')}]: {doc}")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == TESTS_PAGE:
        return markdown
    markdown = markdown.replace(EXPORTS, exports_list())
    up = "../" * page.file.src_uri.count("/")
    lines, inside = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            inside = not inside
        elif not inside and not line.lstrip().startswith("#"):
            line = _link_line(line, up)
        lines.append(line)
    return "\n".join(lines)


# -- docstrings: reST maths and roles to Markdown, trailing prose into Notes --------------------

MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)+)", re.M
)
# The one-line form, ``.. math:: a = b``, with optional continuation lines indented deeper.
MATH_LINE = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]+(?P<first>\S.*)\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n)*)",
    re.M,
)
MATH_ROLE = re.compile(r":math:`([^`]+)`")
# :func:`toyvae.elbo`, :class:`~toyvae.model.LinearGaussian` (the tilde shows the last part).
PY_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")
SECTION_RULE = re.compile(r"^-{3,}\s*$")
# A numpydoc item line: `name`, `name : type`, `a, b : type`, `*args`, or a bare return type.
ITEM = re.compile(r"^\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*(?:\s*:.*)?$")


def _display(match: re.Match) -> str:
    indent = match["indent"]
    body = [line.strip() for line in match["body"].rstrip().split("\n")]
    tex = "\n".join(f"{indent}{line}" for line in body if line)
    return f"{indent}$$\n{tex}\n{indent}$$\n\n"


def _display_line(match: re.Match) -> str:
    indent = match["indent"]
    body = [match["first"].strip()] + [line.strip() for line in match["body"].split("\n")]
    tex = "\n".join(f"{indent}{line}" for line in body if line)
    return f"{indent}$$\n{tex}\n{indent}$$\n"


def rest_math_to_markdown(text: str) -> str:
    """``.. math::`` blocks (and the one-line form) to ``$$ … $$``, ``:math:`x``` to ``$x$``."""
    text = MATH_LINE.sub(_display_line, MATH_BLOCK.sub(_display, text + "\n"))
    return MATH_ROLE.sub(r"$\1$", text).rstrip("\n")


def rest_roles_to_code(text: str) -> str:
    """``:func:`a.b``` to ```a.b```, and ``:class:`~a.B``` to ```B```."""
    return PY_ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


def trailing_prose_to_notes(text: str) -> str:
    """Prose after the items of a numpydoc section goes under a ``Notes`` heading.

    numpydoc reads every unindented line of a section as an item, so a closing paragraph
    after ``Parameters`` would be parsed as parameters named by its first words. A paragraph
    is prose when its first line is not an item line and is not followed by an indented
    description.
    """
    lines = text.split("\n")
    out: list[str] = []
    in_section = False
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if SECTION_RULE.match(following) and line.strip():
            in_section = line.strip() not in ("Notes", "Examples", "References")
        elif (
            in_section
            and line
            and not line[0].isspace()
            and not SECTION_RULE.match(line)
            and i > 0
            and not lines[i - 1].strip()
            and not ITEM.match(line)
            and not following[:1].isspace()
        ):
            out += ["Notes", "-----"]
            in_section = False
        out.append(line)
    return "\n".join(out)


class DocstringMath(Extension):
    """Griffe extension: docstrings in reST idiom, rewritten for Markdown, KaTeX and numpydoc."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            value = rest_roles_to_code(rest_math_to_markdown(obj.docstring.value))
            obj.docstring.value = trailing_prose_to_notes(value)
