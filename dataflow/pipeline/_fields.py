"""Reading the fields every document shares: names, strings, numbers, variables, parameters.

:class:`FieldReader` turns located YAML values into Python values and reports what is wrong
with them (internal to :mod:`dataflow.pipeline.load`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dataflow.hints import suggest
from dataflow.pipeline._yaml import Node, Scope, substitute
from dataflow.pipeline.diagnostics import Collector, Location

__all__ = ["NAME_PATTERN", "FieldReader", "suggest"]

#: Clara names: 1-255 Latin letters, digits, '-' or '_'; compared case-insensitively.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,255}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VERSION = re.compile(r"0\.[3-7]\.\d+\Z")


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def text(value: Any) -> str:
    """A YAML scalar as the string Clara would have read."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def locations(node: Node) -> dict[str, Location]:
    """Field -> where its value starts."""
    return {key: child.loc for key, child in node.value.items()} if node.is_map else {}


def _describe_name(node: Node) -> str:
    return repr(node.value) if isinstance(node.value, str) else node.kind()


class FieldReader:
    """Reads located YAML values into Python values; what is wrong goes to ``diags``."""

    def __init__(self) -> None:
        self.diags = Collector()

    def is_mapping(self, node: Node, op: str | None, field: str, what: str) -> bool:
        """Whether ``node`` is a mapping; if not, an error saying it must be one ``what``
        (e.g. "of environment variables")."""
        if not node.is_map:
            self.diags.error(
                node.loc, f"must be a mapping {what}; got {node.kind()}", operator=op, field=field
            )
        return node.is_map

    def number(
        self,
        node: Node | None,
        op: str | None,
        field: str,
        kind: type,
        *,
        minimum: float,
        what: str,
        strict: bool = False,
    ) -> Any:
        if node is None or node.value is None:
            return None
        value = node.value
        if isinstance(value, str):  # a quoted placeholder: Clara's parameters are strings
            try:
                value = float(value) if kind is float else int(value.strip())
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int and isinstance(value, float):
            ok = value.is_integer()
        if ok:
            ok = value > minimum if strict else value >= minimum
        if not ok:
            self.diags.error(
                node.loc, f"must be {what}; got {node.kind()}", operator=op, field=field
            )
            return None
        return kind(value)

    def name(
        self, node: Node | None, parent: Location, *, operator: str | None, field: str, what: str
    ) -> str | None:
        if node is None:
            self.diags.error(parent, f"{what} needs a 'name'", operator=operator, field=field)
            return None
        value = node.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a name such as 2 or 001 is still a name
        if not isinstance(value, str) or not NAME_PATTERN.match(value):
            self.diags.error(
                node.loc,
                f"{_describe_name(node)} is not a valid name: 1-255 "
                "Latin letters, digits, '-' or '_'",
                operator=operator,
                field=field,
            )
            return None
        return value

    def string(self, node: Node | None, *, operator: str | None, field: str) -> str | None:
        if node is None or node.value is None:
            return None
        if isinstance(node.value, (dict, list)):
            self.diags.error(
                node.loc, f"must be a string; got {node.kind()}", operator=operator, field=field
            )
            return None
        return text(node.value)

    def variables(self, node: Node | None, *, operator: str | None, field: str) -> dict[str, str]:
        if node is None or node.value is None:
            return {}
        if not self.is_mapping(node, operator, field, "of environment variables"):
            return {}
        out = {}
        for key, child in node.value.items():
            where = f"{field}.{key}"
            if not key or "=" in key or "\0" in key:
                self.diags.error(
                    child.key_loc or child.loc,
                    f"{key!r} cannot be an environment variable name",
                    operator=operator,
                    field=where,
                )
                continue
            if not _ENV_NAME.match(key):
                self.diags.warning(
                    child.key_loc or child.loc,
                    f"{key!r} is not a portable environment variable name (letters, digits, '_')",
                    operator=operator,
                    field=where,
                )
            if not child.is_scalar:
                self.diags.error(
                    child.loc,
                    f"an environment variable is a string; got {child.kind()}",
                    operator=operator,
                    field=where,
                )
                continue
            out[key] = text(child.value)
        return out

    def parameters(
        self, node: Node | None, outer: Scope | None, *, operator: str | None, prefix: str
    ) -> dict[str, str | None]:
        """A document's ``parameters``: name -> default (None: no default, an argument is
        required). Defaults may use the enclosing scope's placeholders."""
        field = join(prefix, "parameters")
        if node is None or node.value is None:
            return {}
        if not self.is_mapping(node, operator, field, "of name: default"):
            return {}
        out: dict[str, str | None] = {}
        seen: dict[str, str] = {}
        for key, child in node.value.items():
            where = f"{field}.{key}"
            if not NAME_PATTERN.match(key):
                self.diags.error(
                    child.key_loc or child.loc,
                    f"{key!r} is not a valid parameter "
                    "name: 1-255 Latin letters, digits, '-' or '_'",
                    operator=operator,
                    field=where,
                )
                continue
            if key.casefold() in seen:
                self.diags.error(
                    child.key_loc or child.loc,
                    f"parameter {key!r} is declared "
                    f"twice (also as {seen[key.casefold()]!r}; names are "
                    "case-insensitive)",
                    operator=operator,
                    field=where,
                )
                continue
            seen[key.casefold()] = key
            if not child.is_scalar:
                self.diags.error(
                    child.loc,
                    f"a parameter's default is a string; got {child.kind()}",
                    operator=operator,
                    field=where,
                )
                continue
            if outer is not None:
                child = substitute(child, outer, self.diags, operator=operator, field=where)
            out[key] = None if child.value is None else text(child.value)
        return out

    def apply_args(
        self,
        declared: dict[str, str | None],
        args: Mapping[str, Any],
        loc: Location,
        what: str,
        *,
        operator: str | None,
        field: str,
    ) -> dict[str, str | None]:
        """Parameter values: arguments over defaults. Arguments that name no parameter are
        rejected, as Clara did."""
        values = dict(declared)
        by_key = {k.casefold(): k for k in declared}
        for name, value in args.items():
            key = by_key.get(str(name).casefold())
            if key is None:
                known = ", ".join(declared) if declared else "it declares none"
                self.diags.error(
                    loc,
                    f"argument {name!r} is not a parameter of {what} (parameters: {known})",
                    operator=operator,
                    field=field,
                )
                continue
            values[key] = text(value)
        return values

    def api_version(self, node: Node) -> str | None:
        child = node.value.get("api-version")
        if child is None:
            return None
        version = text(child.value)
        if not _VERSION.match(version):
            self.diags.warning(
                child.loc,
                f"unknown api-version {version!r}; dataflow reads Clara 0.3.x to 0.6.x documents",
                field="api-version",
            )
        elif version.startswith("0.3."):
            self.diags.note(
                child.loc,
                f"api-version {version} is deprecated since Clara 0.5.0; read as 0.4.0",
                field="api-version",
            )
        return version

    def check_keys(
        self,
        node: Node,
        known: set[str],
        ignored: Mapping[str, str],
        *,
        operator: str | None,
        prefix: str,
        closed: bool = False,
    ) -> None:
        """Report keys of ``node`` outside ``known``: notes for ``ignored`` ones (Clara fields
        accepted and not acted on); errors in a ``closed`` mapping (a port, a container,
        requests: nothing else can be meant) and for a near miss of a known key anywhere
        (``elemnt-type``, with "did you mean"); warnings otherwise (another tool's field)."""
        names = sorted(known | set(ignored))
        for key, child in node.value.items():
            loc = child.key_loc or child.loc
            field = join(prefix, key)
            if key in ignored:
                self.diags.note(loc, ignored[key], operator=operator, field=field)
            elif key not in known:
                guess = suggest(key, names)
                if closed or guess:
                    hint = f"did you mean {guess!r}? " if guess else ""
                    self.diags.error(
                        loc,
                        f"unknown key {key!r} ({hint}known: {', '.join(names)})",
                        operator=operator,
                        field=field,
                    )
                else:
                    self.diags.warning(
                        loc,
                        f"unknown key {key!r} is ignored (known: {', '.join(names)})",
                        operator=operator,
                        field=field,
                    )
