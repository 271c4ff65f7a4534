"""Pipeline YAML -> :class:`PipelineSpec`: schema checks, imports, placeholders.

:func:`load_pipeline` reads a Clara pipeline definition (api-version 0.4.0 and 0.5.0; 0.3.x
and 0.6.0 documents load too), resolves ``import`` entries relative to the importing file,
fills ``${{ name }}`` placeholders from the arguments and parameter defaults, and checks the
shape of every field. Every error found is collected; if there is any, it raises
:class:`PipelineError` listing them all, each as ``FILE:LINE:COL: error: operator 'x' field
'y': message``. Warnings (unknown keys) and notes (Clara fields accepted but not acted on)
travel in ``PipelineSpec.diagnostics``.

What needs Python stage classes or the whole graph (ports, ``from`` links, cycles, types of
connected ports) is checked later by :func:`dataflow.pipeline.validate`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflow.pipeline._fields import NAME_PATTERN, join, locations, text
from dataflow.pipeline._operators import STAGE_REF_PATTERN, OperatorReader
from dataflow.pipeline._yaml import Node, Scope, read, substitute
from dataflow.pipeline.diagnostics import PipelineError
from dataflow.pipeline.spec import OperatorSpec, PipelineSpec

__all__ = ["NAME_PATTERN", "STAGE_REF_PATTERN", "load_pipeline"]

_PIPELINE_FIELDS = {
    "api-version", "name", "description", "parameters", "variables", "operators", "timeout",
}  # fmt: skip
_PIPELINE_IGNORED = {
    "orchestrator": "accepted and ignored: dataflow is its own orchestrator",
    "pull-secrets": "accepted and ignored: dataflow pulls no images",
    "services": "accepted and ignored: pipeline services (deprecated in Clara 0.7.1) are not run",
}
_IMPORT_FIELDS = {"path", "args"}


def load_pipeline(
    path: str | os.PathLike[str], args: Mapping[str, str] | None = None
) -> PipelineSpec:
    """Load the pipeline file at ``path`` with ``args`` for its parameters.

    Raises :class:`PipelineError` (every error, ``FILE:LINE:COL:`` first) if the file cannot
    be used.
    """
    loader = _Loader()
    spec = loader.load(Path(path), str(path), dict(args or {}))
    if spec is None or loader.diags.has_errors:
        raise PipelineError(loader.diags)
    return spec


class _Loader(OperatorReader):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[Path, str]] = []  # files being loaded (resolved, display)

    def load(self, path: Path, display: str, args: dict[str, Any]) -> PipelineSpec | None:
        root = read(path, display, self.diags)
        if root is None:
            return None
        if not root.is_map:
            self.diags.error(
                root.loc,
                f"a pipeline file holds a mapping (api-version, name, operators); "
                f"got {root.kind()}",
            )
            return None
        self.stack.append((path.resolve(), display))
        fields = root.value
        self.check_keys(root, _PIPELINE_FIELDS, _PIPELINE_IGNORED, operator=None, prefix="")
        api_version = self.api_version(root)
        declared = self.parameters(fields.get("parameters"), None, operator=None, prefix="")
        args_loc = fields["parameters"].key_loc if "parameters" in fields else root.loc
        values = self.apply_args(
            declared, args, args_loc, "this pipeline", operator=None, field="parameters"
        )
        scope = Scope(values, "pipeline")
        sub = {
            key: substitute(node, scope, self.diags, operator=None, field=key)
            for key, node in fields.items()
            if key not in ("parameters", "operators")
        }
        name = self.name(sub.get("name"), root.loc, operator=None, field="name", what="a pipeline")
        description = self.string(sub.get("description"), operator=None, field="description")
        variables = self.variables(sub.get("variables"), operator=None, field="variables")
        timeout = self.timeout(sub.get("timeout"), None)
        operators = self.operator_list(fields.get("operators"), root, scope, variables, "")
        self.check_duplicates(operators)
        self.stack.pop()
        return PipelineSpec(
            name=name or "",
            path=display,
            api_version=api_version,
            description=description or "",
            parameters=values,
            variables=variables,
            operators=tuple(operators),
            timeout=timeout,
            location=root.loc,
            locations=locations(root),
            diagnostics=tuple(d for d in self.diags if d.severity != "error"),
        )

    def operator_list(
        self,
        node: Node | None,
        parent: Node,
        scope: Scope | None,
        variables: dict[str, str],
        prefix: str,
    ) -> list[OperatorSpec]:
        field = join(prefix, "operators")
        if node is None:
            self.diags.error(parent.loc, "a pipeline needs 'operators' (a list)", field=field)
            return []
        if not node.is_list or not node.value:
            self.diags.error(
                node.loc, f"must be a non-empty list of operators; got {node.kind()}", field=field
            )
            return []
        operators: list[OperatorSpec] = []
        for index, entry in enumerate(node.value):
            where = f"{field}[{index}]"
            if not entry.is_map:
                self.diags.error(
                    entry.loc,
                    f"must be an operator definition or an import (a mapping); got {entry.kind()}",
                    field=where,
                )
            elif "import" in entry.value:
                operators.extend(self.import_(entry, scope, variables, where))
            else:
                op = self.operator(entry, scope, variables, where)
                if op is not None:
                    operators.append(op)
        return operators

    def import_(
        self, entry: Node, scope: Scope | None, variables: dict[str, str], where: str
    ) -> list[OperatorSpec]:
        for key, child in entry.value.items():
            if key != "import":
                self.diags.warning(
                    child.key_loc or child.loc,
                    f"unknown key {key!r} beside 'import' is ignored",
                    field=where,
                )
        field = f"{where}.import"
        spec = substitute(entry.value["import"], scope, self.diags, operator=None, field=field)
        if isinstance(spec.value, str):
            path_node, args_node = spec, None
        elif spec.is_map:
            self.check_keys(spec, _IMPORT_FIELDS, {}, operator=None, prefix=field, closed=True)
            path_node, args_node = spec.value.get("path"), spec.value.get("args")
        else:
            self.diags.error(
                spec.loc, "must be {path: FILE, args: {...}} or a file name", field=field
            )
            return []
        if path_node is None or not isinstance(path_node.value, str) or not path_node.value:
            loc = spec.loc if path_node is None else path_node.loc
            self.diags.error(
                loc, "an import needs 'path': the file to import", field=f"{field}.path"
            )
            return []
        args = self.import_args(args_node, f"{field}.args")
        importer = self.stack[-1][1]
        display = os.path.normpath(os.path.join(os.path.dirname(importer), path_node.value))
        path = Path(self.stack[-1][0]).parent / path_node.value
        resolved = path.resolve()
        chain = [d for p, d in self.stack]
        if any(p == resolved for p, _ in self.stack):
            start = next(i for i, (p, _) in enumerate(self.stack) if p == resolved)
            cycle = " -> ".join([*chain[start:], display])
            self.diags.error(path_node.loc, f"import cycle: {cycle}", field=f"{field}.path")
            return []
        if not path.is_file():
            self.diags.error(
                path_node.loc,
                f"cannot import {path_node.value!r}: no file {display}",
                field=f"{field}.path",
            )
            return []
        root = read(path, display, self.diags)
        if root is None:
            return []
        args_loc = args_node.loc if args_node is not None else path_node.loc
        self.stack.append((resolved, display))
        try:
            if root.is_map and "operators" in root.value:  # a pipeline document
                self.check_keys(root, _PIPELINE_FIELDS, _PIPELINE_IGNORED, operator=None, prefix="")
                fields = root.value
                declared = self.parameters(fields.get("parameters"), None, operator=None, prefix="")
                values = self.apply_args(
                    declared, args, args_loc, display, operator=None, field=f"{field}.args"
                )
                inner = Scope(values, f"imported file {display}")
                sub = (
                    substitute(
                        fields["variables"], inner, self.diags, operator=None, field="variables"
                    )
                    if "variables" in fields
                    else None
                )
                merged = {**variables, **self.variables(sub, operator=None, field="variables")}
                return self.operator_list(fields["operators"], root, inner, merged, "")
            if root.is_map:  # one operator document
                overrides = (args, args_loc, f"{field}.args", display)
                op = self.operator(root, None, variables, "", overrides=overrides)
                return [op] if op is not None else []
            if root.is_list:  # a bare list of operators
                if args:
                    self.diags.error(
                        args_loc,
                        f"{display} is a list of operators and declares no parameters",
                        field=f"{field}.args",
                    )
                wrapper = Node({"operators": root}, root.loc)
                return self.operator_list(root, wrapper, Scope({}, display), variables, "")
            self.diags.error(
                root.loc,
                f"an imported file holds an operator, a list of operators "
                f"or a pipeline; got {root.kind()}",
            )
            return []
        finally:
            self.stack.pop()

    def import_args(self, node: Node | None, field: str) -> dict[str, str]:
        if node is None or node.value is None:
            return {}
        if not node.is_map:
            self.diags.error(
                node.loc, f"must be a mapping of parameter values; got {node.kind()}", field=field
            )
            return {}
        args = {}
        for key, child in node.value.items():
            if not child.is_scalar:
                self.diags.error(
                    child.loc,
                    f"a parameter value is a string; got {child.kind()}",
                    field=join(field, key),
                )
                continue
            args[key] = text(child.value)
        return args

    def check_duplicates(self, operators: list[OperatorSpec]) -> None:
        seen: dict[str, OperatorSpec] = {}
        for op in operators:
            first = seen.setdefault(op.name.casefold(), op)
            if first is not op:
                self.diags.error(
                    op.at("name"),
                    f"the name is already used by operator "
                    f"{first.name!r} at {first.at('name')} (names are "
                    "case-insensitive)",
                    operator=op.name,
                    field="name",
                )
