"""Python stages named in a pipeline: import them by path, bind their ports to the YAML.

Stage modules are looked for next to the pipeline file, in the current folder, then on
``sys.path`` (PYTHONPATH, installed packages).

``stage: package.module:ClassName`` names a :class:`~dataflow.stage.Stage` subclass; a
``module:function`` decorated with ``@function_stage`` is the same thing (the decorator returns a
subclass). The YAML ``input`` entries bind the class's input ports (every one must be bound);
``type``/``element-type``/``shape`` may be left out (taken from the class) and must agree with
it when given. All the class's outputs are available downstream, listed in the YAML or not.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from dataflow.errors import DataflowError
from dataflow.pipeline.diagnostics import Collector
from dataflow.pipeline.spec import InputSpec, OperatorSpec, OutputSpec
from dataflow.stage import PRIMITIVES, Port, Stage

__all__ = [
    "StageImportError",
    "bind_stage_ports",
    "container_ports",
    "import_stage",
    "stage_search_path",
]


class StageImportError(DataflowError):
    """A ``stage:`` import path does not lead to a Stage subclass."""


def stage_search_path(pipeline_path: str | os.PathLike[str]) -> list[str]:
    """Where stage modules are looked for before ``sys.path``: the pipeline file's folder,
    then the current folder (as ``dataflow run`` gives its workers)."""
    return [str(Path(pipeline_path).resolve().parent), str(Path.cwd())]


@contextlib.contextmanager
def _on_sys_path(folders: Sequence[str]) -> Iterator[None]:
    added = [f for f in dict.fromkeys(folders) if f not in sys.path]
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def import_stage(ref: str, search_path: Sequence[str] = ()) -> type[Stage]:
    """The Stage subclass at ``package.module:ClassName`` (imports the module).

    ``search_path``: folders to look in before ``sys.path``, only while importing (see
    :func:`stage_search_path`). Raises :class:`StageImportError` saying what is wrong: the
    module cannot be imported, the attribute is missing, or it is not a Stage.
    """
    module_name, _, attribute = ref.partition(":")
    if not module_name or not attribute:
        raise StageImportError(f"{ref!r} is not an import path 'package.module:ClassName'")
    try:
        with _on_sys_path(search_path):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            where = (
                "looked next to the pipeline file, in the current folder and on PYTHONPATH"
                if search_path
                else "is the package installed, or its folder on PYTHONPATH?"
            )
            raise StageImportError(
                f"cannot import module {module_name!r}: there is no module {missing!r} ({where})"
            ) from None
        if missing:  # the module imports another that is not installed
            raise StageImportError(
                f"importing module {module_name!r} failed: it imports {missing!r}, which is "
                "not installed here (install it; a stage declares such a module in `requires` "
                "and imports it lazily, so that validation names what installs it)"
            ) from exc
        raise StageImportError(f"importing module {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the module's own code failed while importing
        raise StageImportError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    path = module_name
    for part in attribute.split("."):
        if not hasattr(obj, part):
            stages = sorted(
                name
                for name, value in vars(obj).items()
                if isinstance(value, type) and issubclass(value, Stage) and value is not Stage
            )
            hint = f" (stages there: {', '.join(stages)})" if stages else ""
            raise StageImportError(f"{path!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        path = f"{path}:{part}" if path == module_name else f"{path}.{part}"
    if isinstance(obj, type) and issubclass(obj, Stage):
        if obj is Stage:
            raise StageImportError(f"{ref!r} is the Stage base class itself, not a stage")
        return obj
    if inspect.isfunction(obj):
        raise StageImportError(
            f"{ref!r} is a plain function, not a Stage: decorate it with "
            "@dataflow.stage.stage(inputs=..., outputs=...)"
        )
    raise StageImportError(f"{ref!r} is {_a(type(obj).__name__)}, not a Stage subclass")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def container_ports(
    op: OperatorSpec,
) -> tuple[dict[str, Port | None], dict[str, InputSpec], dict[str | None, Port | None]]:
    """A container operator's ports as its YAML declares them (None: untyped disk directory).

    Inputs are keyed by ``path`` (their mount point), else ``name``, else ``input[i]``.
    """
    inputs: dict[str, Port | None] = {}
    specs: dict[str, InputSpec] = {}
    for index, inp in enumerate(op.inputs):
        key = inp.path or inp.name or f"input[{index}]"
        inputs[key] = inp.declared_port()
        specs[key] = inp
    outputs = {out.name: out.declared_port() for out in op.outputs}
    return inputs, specs, outputs


def bind_stage_ports(
    op: OperatorSpec, cls: type[Stage], diags: Collector
) -> tuple[dict[str, Port], dict[str, InputSpec], dict[str | None, Port | None]]:
    """Match the YAML's input/output entries with ``cls``'s ports; report what disagrees.

    Returns (input port -> Port, input port -> its YAML entry, output port -> Port).
    """
    class_inputs = _ports(cls, "inputs", op, diags)
    class_outputs = _ports(cls, "outputs", op, diags)
    in_by_key = {name.casefold(): name for name in class_inputs}
    out_by_key = {name.casefold(): name for name in class_outputs}
    inputs: dict[str, Port] = {}
    specs: dict[str, InputSpec] = {}
    for index, inp in enumerate(op.inputs):
        field = f"input[{index}]"
        wanted = inp.port_name
        if wanted is None:
            diags.error(
                inp.location,
                f"a Python stage's input names the port it binds ('name', or 'port' when the "
                f"upstream output has another name); {op.stage} has inputs "
                f"{_list(class_inputs)}",
                operator=op.name,
                field=f"{field}.name",
            )
            continue
        port_name = in_by_key.get(wanted.casefold())
        if port_name is None:
            key = "port" if inp.port else "name"
            hint = ""
            if not inp.port and inp.source is not None:
                hint = (
                    " (to bind upstream output "
                    f"{wanted!r} to another port, add 'port: <input port>')"
                )
            diags.error(
                inp.at(key),
                f"{op.stage} has no input port {wanted!r} (its inputs: "
                f"{_list(class_inputs)}){hint}",
                operator=op.name,
                field=f"{field}.{key}",
            )
            continue
        if port_name in specs:
            diags.error(
                inp.location,
                f"input port {port_name!r} is bound twice (first at {specs[port_name].location})",
                operator=op.name,
                field=field,
            )
            continue
        _agree(inp, class_inputs[port_name], f"input port {port_name!r}", op, field, diags)
        inputs[port_name] = class_inputs[port_name]
        specs[port_name] = inp
    for name, port in class_inputs.items():
        if name not in inputs:
            diags.error(
                op.at("input"),
                f"input port {name!r} ({port.describe()}) of {op.stage} is not bound: add an "
                f"input with 'name: {name}' (and 'from: <operator>', or no 'from' for the "
                "job's input)",
                operator=op.name,
                field="input",
            )
    for index, out in enumerate(op.outputs):
        field = f"output[{index}]"
        if out.name is None:
            if len(class_outputs) != 1:
                diags.error(
                    out.location,
                    f"name the output: {op.stage} has outputs {_list(class_outputs)}",
                    operator=op.name,
                    field=f"{field}.name",
                )
                continue
            port_name = next(iter(class_outputs))
        else:
            port_name = out_by_key.get(out.name.casefold())
            if port_name is None:
                diags.error(
                    out.at("name"),
                    f"{op.stage} has no output port {out.name!r} (its outputs: "
                    f"{_list(class_outputs)})",
                    operator=op.name,
                    field=f"{field}.name",
                )
                continue
        _agree(out, class_outputs[port_name], f"output port {port_name!r}", op, field, diags)
    for index, inp in enumerate(op.inputs):
        _unused_path(inp, op, f"input[{index}]", diags)
    for index, out in enumerate(op.outputs):
        _unused_path(out, op, f"output[{index}]", diags)
    return inputs, specs, dict(class_outputs)


def _ports(cls: type[Stage], which: str, op: OperatorSpec, diags: Collector) -> dict[str, Port]:
    ports = getattr(cls, which, {})
    if not isinstance(ports, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Port) for k, v in ports.items()
    ):
        diags.error(
            op.at("stage"),
            f"{op.stage}.{which} must map port names to Port objects; got {ports!r}",
            operator=op.name,
            field="stage",
        )
        return {}
    return dict(ports)


def _agree(
    spec: InputSpec | OutputSpec,
    port: Port,
    what: str,
    op: OperatorSpec,
    field: str,
    diags: Collector,
) -> None:
    """The YAML's type fields, where given, must say what the class's port says."""
    checks = [
        ("type", spec.type, port.type),
        ("element-type", _element(spec.element_type), port.element_type),
        ("shape", spec.shape, port.shape),
    ]
    for key, given, declared in checks:
        if given is None or given == declared:
            continue
        shown = list(given) if isinstance(given, tuple) else given
        diags.error(
            spec.at(key),
            f"{key} {shown!r} does not agree with the stage's {what}, {port.describe()}",
            operator=op.name,
            field=f"{field}.{key}",
        )
        return


def _element(element_type: str | None) -> str | None:
    if element_type is None:
        return None
    return PRIMITIVES.get(element_type.lower(), element_type)


def _unused_path(spec: InputSpec | OutputSpec, op: OperatorSpec, field: str, diags: Collector):
    if spec.path is not None:
        diags.note(
            spec.at("path"),
            "not used: a Python stage gets stream ports as directories chosen by the runtime",
            operator=op.name,
            field=f"{field}.path",
        )


def _list(ports: Mapping[str, Port]) -> str:
    return ", ".join(ports) if ports else "none"
