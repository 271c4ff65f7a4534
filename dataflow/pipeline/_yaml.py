"""YAML with a location on every value, and ``${{ name }}`` placeholder substitution.

PyYAML's composer gives nodes with marks; :func:`read` turns them into :class:`Node` trees
(mappings keyed by the key's text, each value knowing where it and its key start). Scalars
are constructed as ``yaml.safe_load`` would. A plain (unquoted) scalar that held placeholders is
re-read after substitution, so ``replicas: ${{ n }}`` becomes the int 2, not the string "2".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
import yaml.constructor
import yaml.resolver

from dataflow.pipeline.diagnostics import Collector, Location

__all__ = ["PLACEHOLDER", "Node", "Scope", "read", "substitute"]

#: ``${{ name }}``: the name in group 1 (spaces around it allowed).
PLACEHOLDER = re.compile(r"\$\{\{(.*?)\}\}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}\Z")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_RESOLVER = yaml.resolver.Resolver()


@dataclasses.dataclass
class Node:
    """A YAML value with where it starts (and, in a mapping, where its key starts)."""

    value: Any  # dict[str, Node] | list[Node] | str | int | float | bool | None | ...
    loc: Location
    key_loc: Location | None = None
    plain: bool = False  # an unquoted scalar (re-resolved after substitution)

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.value, (dict, list))

    def to_python(self) -> Any:
        if isinstance(self.value, dict):
            return {k: v.to_python() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.to_python() for v in self.value]
        return self.value

    def kind(self) -> str:
        """The value's kind in words, for messages."""
        return describe(self.value)


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {value!r}".replace("True", "true").replace("False", "false")
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"a {type(value).__name__}"


def _loc(file: str, mark: Any) -> Location:
    return Location(file, mark.line + 1, mark.column + 1)


def read(path: Path, display: str, diags: Collector) -> Node | None:
    """Parse one YAML file; on a syntax error add a diagnostic and return None."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        diags.error(Location(display, 1, 1), f"cannot read the file: {exc}")
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = _loc(display, mark) if mark is not None else Location(display, 1, 1)
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        diags.error(loc, f"not valid YAML: {problem}")
        return None
    except yaml.YAMLError as exc:
        diags.error(Location(display, 1, 1), f"not valid YAML: {exc}")
        return None
    if root is None:
        diags.error(Location(display, 1, 1), "the file is empty")
        return None
    return _convert(root, display, diags)


def _convert(node: yaml.Node, file: str, diags: Collector) -> Node:
    loc = _loc(file, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        merged: dict[str, Node] = {}
        explicit: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in sources:
                    converted = _convert(source, file, diags)
                    if converted.is_map:
                        for k, v in converted.value.items():
                            merged.setdefault(k, v)
                    else:
                        diags.error(converted.loc, "a '<<' merge takes a mapping")
                continue
            key_loc = _loc(file, key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                diags.error(key_loc, "a mapping key must be a plain name, not a list or mapping")
                continue
            key = key_node.value
            if key in explicit:
                first = explicit[key].key_loc
                diags.error(key_loc, f"duplicate key {key!r} (first given at {first})")
                continue
            child = _convert(value_node, file, diags)
            child.key_loc = key_loc
            explicit[key] = child
        return Node({**merged, **explicit}, loc)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(item, file, diags) for item in node.value], loc)
    return Node(_scalar(node, loc, diags), loc, plain=node.style is None)


def _scalar(node: yaml.ScalarNode, loc: Location, diags: Collector) -> Any:
    construct = _CONSTRUCTOR.yaml_constructors.get(node.tag)
    if construct is None or node.tag is None:
        diags.error(loc, f"unknown YAML tag {node.tag!r}")
        return node.value
    try:
        return construct(_CONSTRUCTOR, node)
    except yaml.YAMLError as exc:
        diags.error(loc, f"cannot read the value {node.value!r}: {exc}")
        return node.value


def _reresolve(text: str) -> Any:
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, yaml.ScalarNode(tag, text))
    except (KeyError, yaml.YAMLError, ValueError):
        return text


# --------------------------------------------------------------------------- placeholders


class Scope:
    """Values for placeholders: one document's parameters, then the enclosing scope's."""

    def __init__(self, values: Mapping[str, str | None], what: str, parent: Scope | None = None):
        self.values = {k.casefold(): (k, v) for k, v in values.items()}
        self.what = what
        self.parent = parent

    def lookup(self, name: str) -> tuple[Scope, str | None] | None:
        scope: Scope | None = self
        while scope is not None:
            if name.casefold() in scope.values:
                return scope, scope.values[name.casefold()][1]
            scope = scope.parent
        return None

    def names(self) -> list[str]:
        seen: dict[str, str] = {}
        scope: Scope | None = self
        while scope is not None:
            for key, (name, _) in scope.values.items():
                seen.setdefault(key, name)
            scope = scope.parent
        return sorted(seen.values())


def substitute(
    node: Node,
    scope: Scope | None,
    diags: Collector,
    *,
    operator: str | None,
    field: str,
) -> Node:
    """A copy of ``node`` with every ``${{ name }}`` in its string values filled in."""
    if node.is_map:
        value = {
            k: substitute(v, scope, diags, operator=operator, field=_join(field, k))
            for k, v in node.value.items()
        }
        return dataclasses.replace(node, value=value)
    if node.is_list:
        items = [
            substitute(v, scope, diags, operator=operator, field=f"{field}[{i}]")
            for i, v in enumerate(node.value)
        ]
        return dataclasses.replace(node, value=items)
    if not isinstance(node.value, str) or "${{" not in node.value:
        return node

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if not _NAME.match(name):
            diags.error(
                node.loc,
                f"malformed placeholder {match.group(0)!r}: a parameter name is 1-255 "
                "letters, digits, '-' or '_'",
                operator=operator,
                field=field,
            )
            return match.group(0)
        found = scope.lookup(name) if scope is not None else None
        if found is None:
            known = ", ".join(scope.names()) if scope is not None else ""
            diags.error(
                node.loc,
                f"placeholder ${{{{ {name} }}}} has no value: {name!r} is not a parameter "
                f"({'parameters: ' + known if known else 'no parameters are declared'})",
                operator=operator,
                field=field,
            )
            return match.group(0)
        where, value = found
        if value is None:
            diags.error(
                node.loc,
                f"placeholder ${{{{ {name} }}}} has no value: parameter {name!r} of the "
                f"{where.what} has no default and no argument gave one",
                operator=operator,
                field=field,
            )
            return match.group(0)
        return value

    text = PLACEHOLDER.sub(fill, node.value)
    if "${{" in PLACEHOLDER.sub("", text):
        diags.error(
            node.loc, "unclosed placeholder: '${{' without '}}'", operator=operator, field=field
        )
    value = _reresolve(text) if node.plain else text
    return dataclasses.replace(node, value=value)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key
