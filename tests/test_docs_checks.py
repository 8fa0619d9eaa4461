"""The docs build's checks (docs/_hooks.py) catch what they are meant to catch.

Each check gets the HTML that Python-Markdown renders, with the docs' own extensions, from a page
that has one defect: a snippet include mangled the way a code formatter mangles it, a formula
that does not parse, a TeX delimiter outside a formula, a script from the network, a public name
without an API entry. The whole site passing the same checks is `tox -e docs` (mkdocs build).
Needs the docs extra (mkdocs, pymdown-extensions, griffe); the formula check needs Node.js.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("mkdocs")
markdown = pytest.importorskip("markdown")
pytest.importorskip("pymdownx")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_hooks"] = module
    spec.loader.exec_module(module)
    module._State.problems, module._State.formulas, module._State.anchors = [], [], set()
    yield module
    del sys.modules["docs_hooks"]


def _page(name="page.md"):
    return SimpleNamespace(file=SimpleNamespace(src_path=name))


def _render(source: str) -> str:
    md = markdown.Markdown(
        extensions=["pymdownx.arithmatex", "pymdownx.snippets", "pymdownx.superfences"],
        extension_configs={
            "pymdownx.arithmatex": {"generic": True},
            "pymdownx.snippets": {"base_path": [str(ROOT)], "check_paths": True},
        },
    )
    return md.convert(source)


def _run_page(hooks, source: str) -> list[str]:
    page = _page()
    hooks.on_page_markdown(source, page)
    hooks.on_page_content(_render(source), page)
    return hooks._State.problems


GOOD = """
Some text with \\(x^2\\) and a display

\\[
f(X) = \\tfrac12 \\|X - A\\|_F^2
\\]

```python
--8<-- "examples/rank_discovery.py:data"
```
"""


def test_a_good_page_passes(hooks):
    assert _run_page(hooks, GOOD) == []
    assert [f["display"] for f in hooks._State.formulas] == [False, True]
    assert "make_tensor" in _render(GOOD)  # the include was expanded


def test_a_mangled_include_fails(hooks):
    # what ruff format makes of the marker when it formats the block as Python
    problems = _run_page(hooks, '```python\n--8 < --"examples/rank_discovery.py:data"\n```\n')
    assert any("malformed snippet include" in p for p in problems)
    assert any("was not expanded" in p for p in problems)


def test_stray_tex_fails(hooks):
    # an escaped delimiter that arithmatex does not take: it would show as raw TeX
    problems = _run_page(hooks, "A formula \\\\(x^2\\\\) that markdown escaped.\n")
    assert any("TeX delimiter" in p for p in problems), problems
    # TeX inside code is fine
    hooks._State.problems.clear()
    assert _run_page(hooks, "Write `\\(x\\)` for inline math.\n") == []


def test_remote_assets_fail(hooks):
    page = _page()
    html = '<html><head><script src="https://cdn.example.org/mathjax.js"></script></head></html>'
    hooks.on_post_page(html, page)
    assert any("loads from the network" in p for p in hooks._State.problems)
    hooks._State.problems.clear()
    ok = '<a href="https://example.org">a link is fine</a><script src="../js/x.js"></script>'
    hooks.on_post_page(ok, page)
    assert hooks._State.problems == []
    hooks.on_post_page('<span class="arithmatex">\\(x\\)</span>', page)
    assert any("does not load" in p for p in hooks._State.problems)


@pytest.mark.skipif(
    shutil.which("node") is None, reason="the formula check runs MathJax on Node.js"
)
def test_formulas_that_do_not_render_fail(hooks):
    hooks._State.mathjax = hooks._mathjax_dir()
    source = (
        "Good \\(\\operatorname{orth}[U, K]\\), bad \\(\\frac{a}{b\\), \\(\\undefinedmacro x\\)\n"
    )
    assert _run_page(hooks, source) == []
    hooks._check_formulas()
    problems = hooks._State.problems
    assert len(problems) == 2, problems
    assert "Extra open brace" in problems[0] or "Missing close brace" in problems[0]
    assert "Undefined control sequence \\undefinedmacro" in problems[1]


def test_api_coverage_names_what_is_missing(hooks):
    hooks._State.shadow = hooks._shadow_tree(ROOT)
    # the integrations are found where setuptools installs them
    assert (hooks._State.shadow / "tuckerman" / "integrations" / "torch" / "__init__.py").is_file()
    hooks._State.anchors = {"tuckerman.TuckerTensor"}
    hooks._check_api_coverage()
    missing = {p.split()[2] for p in hooks._State.problems}
    assert "tuckerman.TuckerTensor" not in missing
    for name in (
        "tuckerman.FixedRankTucker",
        "tuckerman.integrations.torch.TDLRT",
        "tuckerman.integrations.torch.TrainConfig",
        "tuckerman.integrations.jax.TDLRT",
        "tuckerman.integrations.geoopt.TuckerManifold",
    ):
        assert name in missing
