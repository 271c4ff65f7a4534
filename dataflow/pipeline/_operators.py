"""Reading one operator definition: container or stage, input/output, requests, extras.

Clara's types table is applied here to container I/O (what ``stream``, ``array``, ``string``
and primitives need and take); a Python stage's I/O is compared with its class later, in
:mod:`dataflow.pipeline.stages`. Internal to :mod:`dataflow.pipeline.load`.
"""

from __future__ import annotations

import re
from typing import Any

from dataflow.pipeline._fields import FieldReader, join, locations, text
from dataflow.pipeline._yaml import Node, Scope, substitute
from dataflow.pipeline.diagnostics import Location
from dataflow.pipeline.spec import ContainerSpec, InputSpec, OperatorSpec, OutputSpec, Requests
from dataflow.stage import PORT_TYPES, PRIMITIVES, PortError

__all__ = ["STAGE_REF_PATTERN", "OperatorReader"]

#: A Python stage's import path, ``package.module:ClassName``.
STAGE_REF_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")

_OPERATOR_FIELDS = {
    "api-version",
    "name",
    "description",
    "container",
    "stage",
    "arguments",
    "input",
    "output",
    "requests",
    "variables",
    "parameters",
    "replicas",
    "timeout",
}
_OPERATOR_IGNORED = {
    "services": "accepted and not run: Clara services are deprecated since 0.7.1; start the "
    "service (e.g. Triton) yourself and pass its address in 'variables'",
    "models": "accepted and not loaded: dataflow has no model repository; a stage loads its "
    "model in prepare()",
}
_CONTAINER_FIELDS = {"image", "tag", "command", "variables"}
_INPUT_FIELDS = {"from", "name", "port", "path", "type", "element-type", "shape"}
_OUTPUT_FIELDS = {"name", "path", "type", "element-type", "shape"}
_REQUEST_FIELDS = {"cpu", "gpu", "memory", "resources"}
#: Custom resource names (Ray's): letters, digits and ``_ - . :`` (``node:10.0.0.5`` pins to a
#: node by address); Ray's own kinds are asked for by ``cpu``, ``gpu`` and ``memory``.
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}\Z")
_RAY_KINDS = {"cpu": "cpu", "gpu": "gpu", "memory": "memory", "object_store_memory": None}


class OperatorReader(FieldReader):
    """Reads one operator entry (or imported operator document) into an OperatorSpec."""

    def operator(
        self,
        node: Node,
        outer: Scope | None,
        variables: dict[str, str],
        where: str,
        overrides: tuple[dict[str, str], Location, str, str] | None = None,
    ) -> OperatorSpec | None:
        fields = node.value
        raw_name = fields.get("name")
        label = raw_name.value if raw_name is not None and isinstance(raw_name.value, str) else None
        what = f"operator {label!r}" if label else (where or "the imported operator")
        declared = self.parameters(fields.get("parameters"), outer, operator=label, prefix="")
        if overrides is not None:
            args, args_loc, field, file = overrides  # an imported operator document
            origin = f"the imported file {file}"
            declared = self.apply_args(declared, args, args_loc, origin, operator=None, field=field)
        scope = Scope(declared, what, outer) if declared else outer
        name_node = (
            substitute(raw_name, scope, self.diags, operator=label, field="name")
            if (raw_name is not None)
            else None
        )
        name = self.name(
            name_node, node.loc, operator=None, field=join(where, "name"), what="an operator"
        )
        op = name or label
        self.check_keys(node, _OPERATOR_FIELDS, _OPERATOR_IGNORED, operator=op, prefix="")
        sub = {
            key: substitute(child, scope, self.diags, operator=op, field=key)
            for key, child in fields.items()
            if key not in ("parameters", "name")
        }
        stage = self.stage_ref(sub.get("stage"), op)
        container = self.container(sub.get("container"), op)
        is_stage = stage is not None or ("stage" in sub and "container" not in sub)
        if "stage" in sub and "container" in sub:
            self.diags.error(
                sub["container"].key_loc or node.loc,
                "an operator has either 'stage' (a Python stage) or 'container', not both",
                operator=op,
                field="container",
            )
        elif "stage" not in sub and "container" not in sub:
            self.diags.error(
                node.loc,
                "an operator needs 'stage' (a Python stage, "
                "'package.module:ClassName') or 'container'",
                operator=op,
                field="stage",
            )
        arguments = self.arguments(sub.get("arguments"), op, is_stage)
        inputs = self.io_list(sub.get("input"), "input", op, is_stage)
        outputs = self.io_list(sub.get("output"), "output", op, is_stage)
        self.check_outputs(outputs, op)
        container_vars = container[1] if container else {}
        own_vars = self.variables(sub.get("variables"), operator=op, field="variables")
        for key in ("services", "models"):
            if key in sub and not sub[key].is_list:
                self.diags.error(
                    sub[key].loc, f"must be a list; got {sub[key].kind()}", operator=op, field=key
                )
        models = tuple(self.model_names(sub.get("models"), op))
        if name is None:
            return None
        return OperatorSpec(
            name=name,
            description=self.string(sub.get("description"), operator=op, field="description") or "",
            stage=stage,
            arguments=arguments,
            container=container[0] if container else None,
            inputs=tuple(i for i in inputs if isinstance(i, InputSpec)),
            outputs=tuple(o for o in outputs if isinstance(o, OutputSpec)),
            requests=self.requests(sub.get("requests"), op),
            variables={**variables, **container_vars, **own_vars},
            parameters=declared,
            replicas=self.replicas(sub.get("replicas"), op),
            timeout=self.timeout(sub.get("timeout"), op),
            services=tuple(sub["services"].to_python())
            if "services" in sub and sub["services"].is_list
            else (),
            models=models,
            api_version=self.api_version(node),
            location=node.loc,
            locations=locations(node),
        )

    def stage_ref(self, node: Node | None, op: str | None) -> str | None:
        if node is None:
            return None
        if not isinstance(node.value, str) or not STAGE_REF_PATTERN.match(node.value.strip()):
            self.diags.error(
                node.loc,
                f"must be a Python import path 'package.module:ClassName'; got {node.kind()}",
                operator=op,
                field="stage",
            )
            return None
        return node.value.strip()

    def container(
        self, node: Node | None, op: str | None
    ) -> tuple[ContainerSpec, dict[str, str]] | None:
        if node is None:
            return None
        if not self.is_mapping(node, op, "container", "(image, tag, command)"):
            return None
        self.check_keys(node, _CONTAINER_FIELDS, {}, operator=op, prefix="container", closed=True)
        fields = node.value
        image = self.string(fields.get("image"), operator=op, field="container.image")
        tag_node = fields.get("tag")
        tag = None
        if tag_node is not None:
            if tag_node.is_scalar and tag_node.value is not None:
                tag = text(tag_node.value)
                self.diags.note(
                    tag_node.loc,
                    f"accepted, not checked: dataflow pulls no images (image {image or '?'}:{tag})",
                    operator=op,
                    field="container.tag",
                )
            else:
                self.diags.error(
                    tag_node.loc,
                    f"must be a string; got {tag_node.kind()}",
                    operator=op,
                    field="container.tag",
                )
        command: list[str] = []
        command_node = fields.get("command")
        if command_node is not None:
            if command_node.is_list and all(
                c.is_scalar and c.value is not None for c in command_node.value
            ):
                command = [text(c.value) for c in command_node.value]
            else:
                self.diags.error(
                    command_node.loc,
                    f"must be a list of strings (Clara's command array); got {command_node.kind()}",
                    operator=op,
                    field="container.command",
                )
        if image is None and command_node is None:
            self.diags.error(
                node.loc,
                "a container needs an 'image' or a 'command'",
                operator=op,
                field="container.image",
            )
        variables: dict[str, str] = {}
        if "variables" in fields:
            variables = self.variables(
                fields["variables"], operator=op, field="container.variables"
            )
            self.diags.note(
                fields["variables"].key_loc or node.loc,
                "Clara reads 'variables' at operator level; merged into the operator's variables",
                operator=op,
                field="container.variables",
            )
        spec = ContainerSpec(
            image=image,
            tag=tag,
            command=tuple(command),
            location=node.loc,
            locations=locations(node),
        )
        return spec, variables

    def arguments(self, node: Node | None, op: str | None, is_stage: bool) -> dict[str, Any]:
        if node is None or node.value is None:
            return {}
        if not is_stage:
            self.diags.error(
                node.key_loc or node.loc,
                "'arguments' are a Python stage's "
                "constructor arguments; a container takes 'command'",
                operator=op,
                field="arguments",
            )
            return {}
        if not self.is_mapping(node, op, "arguments", "of the stage's parameters"):
            return {}
        return {key: child.to_python() for key, child in node.value.items()}

    def io_list(
        self, node: Node | None, kind: str, op: str | None, is_stage: bool
    ) -> list[InputSpec | OutputSpec | None]:
        if node is None or node.value is None:
            return []
        if not node.is_list:
            self.diags.error(
                node.loc,
                f"must be a list of {kind} entries; got {node.kind()}",
                operator=op,
                field=kind,
            )
            return []
        return [self.io(entry, kind, i, op, is_stage) for i, entry in enumerate(node.value)]

    def io(
        self, node: Node, kind: str, index: int, op: str | None, is_stage: bool
    ) -> InputSpec | OutputSpec | None:
        where = f"{kind}[{index}]"
        if not node.is_map:
            self.diags.error(
                node.loc,
                f"an {kind} entry is a mapping (from, name, path, type, ...); got {node.kind()}",
                operator=op,
                field=where,
            )
            return None
        self.check_keys(
            node,
            _INPUT_FIELDS if kind == "input" else _OUTPUT_FIELDS,
            {},
            operator=op,
            prefix=where,
            closed=True,
        )
        fields = node.value
        errors_before = self.diags.error_count()
        values: dict[str, Any] = {}
        for key in ("from", "name"):
            if key in fields:
                values[key] = self.name(
                    fields[key], node.loc, operator=op, field=f"{where}.{key}", what=key
                )
        for key in ("path", "port") if kind == "input" else ("path",):
            if key in fields:
                values[key] = self.string(fields[key], operator=op, field=f"{where}.{key}")
        if "port" in fields and not is_stage:
            self.diags.error(
                fields["port"].key_loc or node.loc,
                "'port' names a Python stage's input port; a container input has none",
                operator=op,
                field=f"{where}.port",
            )
        type_ = self.port_type(fields.get("type"), op, f"{where}.type")
        element_type = self.string(
            fields.get("element-type"), operator=op, field=f"{where}.element-type"
        )
        if element_type is not None and element_type.lower() in PRIMITIVES:
            element_type = PRIMITIVES[element_type.lower()]
        shape = self.shape(fields.get("shape"), op, f"{where}.shape")
        self.medium(node, kind, where, op, is_stage, type_)
        cls = InputSpec if kind == "input" else OutputSpec
        extra = (
            {"source": values.get("from"), "port": values.get("port")} if kind == "input" else {}
        )
        spec = cls(
            name=values.get("name"),
            path=values.get("path"),
            type=type_,
            element_type=element_type,
            shape=shape,
            location=node.loc,
            locations=locations(node),
            **extra,
        )
        if type_ is not None and not is_stage and self.diags.error_count() == errors_before:
            try:
                spec.declared_port()
            except (PortError, ValueError) as exc:
                self.diags.error(spec.at("type"), str(exc), operator=op, field=f"{where}.type")
        return spec

    def medium(
        self, node: Node, kind: str, where: str, op: str | None, is_stage: bool, type_: str | None
    ) -> None:
        """Clara's types table: which of element-type, shape and path each type needs.

        A Python stage takes what is left out from its class, and has no use for a path.
        """
        given = {key for key, child in node.value.items() if child.value is not None}

        def bad(key: str, message: str) -> None:
            child = node.value.get(key)
            loc = (child.key_loc or child.loc) if child is not None else node.loc
            self.diags.error(loc, message, operator=op, field=f"{where}.{key}")

        needs = not is_stage  # a container needs every field its type needs
        if type_ is None:
            for key in ("element-type", "shape"):
                if key in given and needs:
                    bad(key, f"'{key}' needs a 'type' (array or stream)")
            if "path" not in given and needs:
                bad(
                    "path",
                    f"an untyped {kind} (Clara 0.4.0) is a disk directory and needs a 'path'",
                )
        elif type_ == "stream":
            if "shape" in given:
                bad("shape", "a stream (files on disk) has no shape")
            if "element-type" not in given and needs:
                bad("element-type", "a stream needs an 'element-type' label (e.g. dicom)")
            if "path" not in given and needs:
                bad("path", "a stream (files on disk) needs a 'path'")
        elif type_ == "array":
            if "element-type" not in given and needs:
                bad("element-type", "an array needs an 'element-type' (e.g. float32)")
            if "shape" not in given and needs:
                bad("shape", "an array needs a 'shape' (-1 for a dynamic dimension)")
            if "path" in given and needs:
                bad("path", "an array lives in shared memory and takes no 'path'")
        else:
            for key in ("element-type", "shape"):
                if key in given:
                    bad(key, f"a {type_} takes no '{key}'")
            if "path" in given and needs:
                bad("path", f"a {type_} lives in shared memory and takes no 'path'")

    def check_outputs(self, outputs: list[Any], op: str | None) -> None:
        specs = [o for o in outputs if isinstance(o, OutputSpec)]
        seen: dict[str, OutputSpec] = {}
        for index, out in enumerate(specs):
            if out.name is None:
                if len(specs) > 1:
                    self.diags.error(
                        out.location,
                        "an operator with several outputs must name each one ('name')",
                        operator=op,
                        field=f"output[{index}].name",
                    )
                continue
            key = out.name.casefold()
            if key in seen:
                self.diags.error(
                    out.at("name"),
                    f"output {out.name!r} is declared twice (first "
                    f"at {seen[key].at('name')}; names are case-insensitive)",
                    operator=op,
                    field=f"output[{index}].name",
                )
            else:
                seen[key] = out

    def port_type(self, node: Node | None, op: str | None, field: str) -> str | None:
        if node is None:
            return None
        value = node.value
        if isinstance(value, str) and value.lower() in PORT_TYPES:
            return PRIMITIVES.get(value.lower(), value.lower())
        self.diags.error(
            node.loc,
            f"must be one of array, string, stream or a primitive "
            f"(uint8 ... float64, u8 ... f64); got {node.kind()}",
            operator=op,
            field=field,
        )
        return None

    def shape(self, node: Node | None, op: str | None, field: str) -> tuple[int, ...] | None:
        if node is None:
            return None
        dims = node.value if node.is_list else None
        if not dims or not all(
            d.is_scalar
            and isinstance(d.value, int)
            and not isinstance(d.value, bool)
            and d.value >= -1
            for d in dims
        ):
            shown = node.to_python()
            self.diags.error(
                node.loc,
                "must be a list of dimensions, each a positive integer or "
                f"-1 (or 0) for a dynamic one; got {shown!r}",
                operator=op,
                field=field,
            )
            return None
        return tuple(-1 if d.value == 0 else d.value for d in dims)

    def requests(self, node: Node | None, op: str | None) -> Requests:
        if node is None or node.value is None:
            return Requests()
        if not self.is_mapping(node, op, "requests", "(cpu, gpu, memory)"):
            return Requests()
        self.check_keys(node, _REQUEST_FIELDS, {}, operator=op, prefix="requests", closed=True)
        fields = node.value
        cpu = self.number(
            fields.get("cpu"),
            op,
            "requests.cpu",
            float,
            minimum=0,
            strict=True,
            what="a number of CPU cores greater than 0",
        )
        gpu = self.number(
            fields.get("gpu"),
            op,
            "requests.gpu",
            int,
            minimum=0,
            what="a whole number of GPUs (0 or more)",
        )
        memory = self.number(
            fields.get("memory"),
            op,
            "requests.memory",
            int,
            minimum=0,
            strict=True,
            what="a number of megabytes greater than 0",
        )
        return Requests(
            cpu=cpu, gpu=gpu, memory=memory, resources=self.resources(fields.get("resources"), op),
            location=node.loc, locations=locations(node),
        )  # fmt: skip

    def resources(self, node: Node | None, op: str | None) -> dict[str, float]:
        """``requests.resources``: custom resource name -> amount per replica (Ray's rule:
        a fraction of one, or a whole number)."""
        if node is None or node.value is None:
            return {}
        if not self.is_mapping(node, op, "requests.resources", "of custom resource name: amount"):
            return {}
        found: dict[str, float] = {}
        for key, child in node.value.items():
            field = f"requests.resources.{key}"
            why = None
            if str(key).casefold() in _RAY_KINDS:
                ours = _RAY_KINDS[str(key).casefold()]
                why = f"ask for it with requests.{ours}" if ours else "not asked for per stage"
                why = f"is Ray's own kind: {why}"
            elif not _RESOURCE_NAME.match(str(key)):
                why = "is not a resource name (letters, digits, '_', '-', '.', ':')"
            if why is not None:
                self.diags.error(child.loc, f"{str(key)!r} {why}", operator=op, field=field)
                continue
            amount = self.number(
                child, op, field, float, minimum=0, strict=True,
                what="an amount greater than 0 (a fraction of 1, or a whole number)",
            )  # fmt: skip
            if amount is None:
                continue
            if amount > 1 and not amount.is_integer():
                self.diags.error(
                    child.loc,
                    f"must be a fraction of 1 or a whole number (Ray's rule); got {amount:g}",
                    operator=op,
                    field=field,
                )
                continue
            found[str(key)] = amount
        return found

    def replicas(self, node: Node | None, op: str | None) -> int:
        value = self.number(
            node, op, "replicas", int, minimum=1, what="a whole number of workers, 1 or more"
        )
        return 1 if value is None else value

    def timeout(self, node: Node | None, op: str | None) -> float | None:
        return self.number(
            node,
            op,
            "timeout",
            float,
            minimum=0,
            strict=True,
            what="a number of seconds greater than 0",
        )

    def model_names(self, node: Node | None, op: str | None) -> list[str]:
        if node is None or not node.is_list:
            return []
        names = []
        for index, entry in enumerate(node.value):
            value = entry.value.get("name") if entry.is_map else entry
            if value is None or not isinstance(value.value, str):
                self.diags.error(
                    entry.loc,
                    "a model entry is {name: MODEL}",
                    operator=op,
                    field=f"models[{index}]",
                )
                continue
            names.append(value.value)
        return names
