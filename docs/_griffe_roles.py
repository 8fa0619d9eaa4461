"""Griffe extension used by the docs build (mkdocs.yml): Sphinx roles become cross-references.

It also drops the ``draw`` parameter from the signatures of ``@st.composite`` Hypothesis
strategies, which users call without it.

The numpydoc docstrings of tuckerman use Sphinx roles (:class:`~tuckerman.TuckerTensor`,
:func:`hosvd`, :meth:`check_point`), which mkdocstrings would print literally. This extension
rewrites each role into an *optional* mkdocs-autorefs reference: a link when the target is
rendered somewhere in the docs, plain code otherwise (never a build warning). Unqualified names
are looked up like Sphinx does: in the class, its parent class, its module, then the package.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.is_function and _is_composite(obj):
                # Hypothesis supplies ``draw``; users call the strategy without it
                parameters = obj.parameters
                if len(parameters) and parameters[0].name == "draw":
                    del parameters["draw"]
            docstring = obj.docstring
            if docstring is not None and ":`" in docstring.value:
                docstring.value = _ROLE.sub(lambda m, o=obj: _replace(pkg, o, m), docstring.value)


def _is_composite(func: Any) -> bool:
    return any(str(d.value).split(".")[-1] == "composite" for d in func.decorators)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _lookup(pkg: griffe.Module, path: str, depth: int = 0) -> Any:
    """The object at dotted ``path`` inside ``pkg`` (following aliases), or None."""
    parts = path.split(".")
    if parts[0] != pkg.name or depth > 10:
        return None
    obj: Any = pkg
    for part in parts[1:]:
        members = getattr(obj, "members", None)
        if members is None or part not in members:
            return None
        obj = members[part]
        if obj.is_alias:
            obj = _lookup(pkg, obj.target_path, depth + 1)
            if obj is None:
                return None
    return obj


def _public_path(pkg: griffe.Module, path: str) -> str:
    """Prefer the re-exported name (``tuckerman.hosvd``) over ``tuckerman._tucker.hosvd``."""
    for name, member in pkg.members.items():
        if member.is_alias and not name.startswith("_"):
            target = member.target_path
            if path == target or path.startswith(target + "."):
                return f"{pkg.name}.{name}{path[len(target) :]}"
    return path


def _candidates(obj: griffe.Object, name: str) -> list[str]:
    scopes = []
    if obj.is_class:
        scopes.append(obj.path)
    parent = obj.parent
    while parent is not None:
        scopes.append(parent.path)
        parent = parent.parent
    return [f"{scope}.{name}" for scope in scopes] + [name]


def _replace(pkg: griffe.Module, obj: griffe.Object, match: re.Match) -> str:
    short, name = match.group(1) == "~", match.group(2)
    target = name
    for candidate in _candidates(obj, name):
        found = _lookup(pkg, candidate)
        if found is not None:
            target = _public_path(pkg, found.path)
            break
    title = name.rsplit(".", 1)[-1] if short else name
    return (
        f'<autoref identifier="{html.escape(target)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )
