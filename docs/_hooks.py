"""mkdocs hooks (``hooks:`` in mkdocs.yml): what the docs build needs beyond mkdocs' own checks.

1. **API pages for the installed layout.** setuptools installs ``backends/`` and ``integrations/``
   as ``tuckerman.backends`` and ``tuckerman.integrations`` (``[tool.setuptools.package-dir]`` in
   pyproject.toml), a layout that the API generator (griffe) cannot see in the source tree. The
   hook builds that layout from copies of the Python files in a temporary folder and points
   mkdocstrings at it, so ``::: tuckerman.integrations.torch`` works from a plain checkout.
2. **Formulas offline.** MathJax is served from the built site: its files are copied from the
   ``django-static-mathjax`` package (PyPI; MathJax 3.2.2, Apache-2.0, no dependencies; the
   ``docs`` extra) into ``javascripts/vendor/mathjax/``. No page loads anything from the network.
3. **Checks that fail the build** (``PluginError``, strict or not), after every page is rendered:

   - every snippet include rendered: no snippet marker is left in a page (a marker that a
     formatter reformatted, e.g. ``--8 < --"file"``, is not recognised by pymdownx.snippets and
     would show as text), and none is malformed in the sources;
   - every formula renders: each one that arithmatex marked is parsed by the same MathJax under
     Node.js, with undefined macros as errors; no TeX delimiter is left outside a formula or code;
     a page with formulas loads the vendored MathJax;
   - nothing is loaded from the network: no script, stylesheet, image or font with an absolute
     ``http(s)`` address;
   - every public name has an API entry: each name in the ``__all__`` of each public module
     (no underscore in its path) has an anchor in some page.

   Without Node.js the formula check cannot run; the hook then logs a warning, which fails a
   ``--strict`` build (tox -e docs, CI) and lets ``mkdocs serve`` go on.
"""

from __future__ import annotations

import atexit
import html
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.tuckerman")

MATHJAX_DEST = "javascripts/vendor/mathjax"
# MathJax's TeX-to-HTML build, and what it loads on demand (TeX extensions, fonts, menu,
# accessibility); TeX input only: the docs have no MathML, which MathJax would typeset twice
MATHJAX_PARTS = ("tex-chtml.js", "input", "output/chtml", "ui", "a11y", "sre")
MATHJAX_ENTRY = f"{MATHJAX_DEST}/{MATHJAX_PARTS[0]}"
CHECK_TEX = Path(__file__).with_name("_check_tex.js")

# a snippet marker as pymdownx.snippets reads it, and anything that looks like a damaged one
SNIPPET_OK = re.compile(r'^\s*--8<-- "[^"]+"\s*$')
SNIPPET_LIKE = re.compile(r"-\s*-\s*8\s*<\s*-\s*-")
SNIPPET_SECTION = re.compile(r"--8<-- \[(?:start|end):")
FORMULA = re.compile(
    r'<(span|div) class="arithmatex">(.*?)</\1>', flags=re.DOTALL
)  # arithmatex "generic" output: \(..\) inline, \[..\] display
UNRENDERED = re.compile(r"<(pre|code|script|style|textarea)\b.*?</\1>", flags=re.DOTALL)
STRAY_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")
REMOTE = re.compile(
    r"<(?:script|img|source|iframe)\b[^>]*\bsrc=\"(https?:)?//[^\"]+\""
    r"|<link\b[^>]*\bhref=\"(https?:)?//[^\"]+\"[^>]*>"
    r"|url\(\s*['\"]?(https?:)?//[^)]+\)|@import\s+['\"](https?:)?//",
)
ANCHOR = re.compile(r'\bid="([^"]+)"')


class _State:
    shadow: Path | None = None
    mathjax: Path | None = None
    problems: list[str] = []
    formulas: list[dict[str, Any]] = []
    anchors: set[str] = set()


def _copy_sources(source: Path, target: Path) -> None:
    """The Python files of a package folder (griffe resolves links, so they are copies)."""

    def others(folder: str, names: list[str]) -> list[str]:
        return [
            n for n in names if not (n.endswith((".py", ".pyi")) or (Path(folder) / n).is_dir())
        ]

    shutil.copytree(source, target, ignore=others, dirs_exist_ok=True)


def _shadow_tree(root: Path) -> Path:
    """The installed package layout, as copies of the source files in a temporary folder."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    shadow = Path(tempfile.mkdtemp(prefix="tuckerman-docs-"))
    atexit.register(shutil.rmtree, shadow, ignore_errors=True)
    # parents first, so that a mapped subpackage lands inside its parent's folder
    for name, source in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        target = shadow.joinpath(*name.split("."))
        if target.exists():
            raise PluginError(f"{name}: {target.name} exists in the parent package as well")
        _copy_sources((root / source).resolve(), target)
    return shadow


def _mathjax_dir() -> Path:
    spec = importlib.util.find_spec("mathjax")
    es5 = None
    if spec is not None and spec.submodule_search_locations:
        es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if es5 is None or not (es5 / MATHJAX_PARTS[0]).is_file():
        raise PluginError(
            "MathJax not found: the docs serve it from the django-static-mathjax package; "
            "install the docs extra: pip install -e '.[docs]'"
        )
    return es5


@event_priority(100)  # before mkdocstrings reads its handler options
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    root = Path(config.config_file_path).parent
    _State.shadow = _shadow_tree(root)
    python = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python["paths"] = [str(_State.shadow)]
    _State.mathjax = _mathjax_dir()
    if MATHJAX_ENTRY not in [str(script) for script in config.extra_javascript]:
        raise PluginError(f"mkdocs.yml: extra_javascript must list {MATHJAX_ENTRY}")
    _State.problems, _State.formulas, _State.anchors = [], [], set()
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the vendored MathJax files (and MathJax's licence) to the site."""
    es5 = _State.mathjax
    assert es5 is not None
    dest_dir = str(Path(config.site_dir) / MATHJAX_DEST)

    def add(src_dir: Path, path: str) -> None:
        files.append(File(path, src_dir=str(src_dir), dest_dir=dest_dir, use_directory_urls=False))

    add(es5.parent, "LICENSE")
    add(es5, MATHJAX_PARTS[0])
    for part in MATHJAX_PARTS[1:]:
        for source in sorted((es5 / part).rglob("*")):
            if source.is_file():
                add(es5, source.relative_to(es5).as_posix())
    return files


def _text(content: str) -> str:
    """The text of an HTML fragment (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", content))


def on_page_markdown(markdown: str, page: Page, **kwargs: Any) -> str:
    for number, line in enumerate(markdown.splitlines(), start=1):
        if SNIPPET_LIKE.search(line) and not SNIPPET_OK.match(line):
            if SNIPPET_SECTION.search(line):
                continue  # a section marker quoted in prose
            _State.problems.append(
                f"{page.file.src_path}:{number}: malformed snippet include {line.strip()!r} "
                '(write it as --8<-- "path:section"; ruff format rewrites it as Python unless '
                "the block is between <!-- fmt: off --> and <!-- fmt: on -->)"
            )
    return markdown


def on_page_content(content: str, page: Page, **kwargs: Any) -> str:
    where = page.file.src_path
    if SNIPPET_LIKE.search(_text(content)):
        _State.problems.append(f"{where}: a snippet include was not expanded")
    match = STRAY_TEX.search(_text(UNRENDERED.sub("", FORMULA.sub("", content))))
    if match:
        _State.problems.append(f"{where}: TeX delimiter {match.group()!r} outside a formula")
    for match in FORMULA.finditer(content):
        tex = html.unescape(match.group(2)).strip()
        display = tex.startswith("\\[")
        if not (tex[:2] in ("\\(", "\\[") and tex[-2:] in ("\\)", "\\]")):
            _State.problems.append(f"{where}: formula without delimiters: {tex[:60]!r}")
            continue
        _State.formulas.append({"page": where, "tex": tex[2:-2], "display": display})
    _State.anchors.update(ANCHOR.findall(content))
    return content


def on_post_page(output: str, page: Page, **kwargs: Any) -> str:
    where = page.file.src_path
    for match in REMOTE.finditer(output):
        _State.problems.append(f"{where}: loads from the network: {match.group()[:100]}")
    if 'class="arithmatex"' in output and MATHJAX_ENTRY.split("/")[-1] not in output:
        _State.problems.append(f"{where}: has formulas but does not load {MATHJAX_ENTRY}")
    return output


def _check_formulas() -> None:
    formulas = _State.formulas
    node = shutil.which("node")
    if node is None:
        log.warning("Node.js not found: the %d formulas were not checked", len(formulas))
        return
    run = subprocess.run(
        [node, str(CHECK_TEX), str(_State.mathjax)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise PluginError(f"the formula check failed to run: {run.stderr.strip()[-2000:]}")
    for error in json.loads(run.stdout):
        formula = formulas[error["index"]]
        _State.problems.append(
            f"{formula['page']}: formula {formula['tex'][:80]!r} does not render: "
            f"{error['message']}"
        )
    log.info("docs checks: %d formulas parsed by MathJax", len(formulas))


def _check_api_coverage() -> None:
    import griffe

    package = griffe.load(
        "tuckerman",
        search_paths=[str(_State.shadow)],
        try_relative_path=False,  # not ./tuckerman of the checkout: it lacks the integrations
        resolve_aliases=False,
    )
    missing = []
    modules = [package]
    while modules:
        module = modules.pop()
        modules.extend(
            m for name, m in module.modules.items() if not name.startswith("_") and not m.is_alias
        )
        for name in sorted(str(export) for export in module.exports or ()):
            member = module.members.get(name)
            if member is not None and member.is_module:
                continue
            paths = {f"{module.path}.{name}"}
            if isinstance(member, griffe.Alias):
                paths.add(member.target_path)
            if not paths & _State.anchors:
                missing.append(f"{module.path}.{name}")
    for path in missing:
        _State.problems.append(f"public name {path} has no API entry in any page")


def on_post_build(config: MkDocsConfig) -> None:
    _check_formulas()
    _check_api_coverage()
    if _State.problems:
        listing = "\n  ".join(_State.problems)
        raise PluginError(f"docs checks failed ({len(_State.problems)}):\n  {listing}")
    log.info("docs checks: snippet includes, formulas, offline assets and API coverage pass")
