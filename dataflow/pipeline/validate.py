"""Validate a loaded pipeline: stages, ports, links, cycles, and what this machine can run.

:func:`validate` never raises for a bad pipeline: it returns a :class:`Report` of errors,
warnings and notes, with the validated :class:`Graph` when there is no error.
:func:`check_pipeline` loads and validates a file (what ``dataflow validate FILE`` prints);
:func:`load_graph` is the executor's one call: load, validate, raise on errors.

A module a Python stage needs (``Stage.requires``) and this machine lacks is an error naming
what installs it (``pip install 'dataflow[onnx]'``): the stage's workers could not start.
Warnings are for what this machine cannot run while the file stays valid: a container image
with neither docker nor podman on PATH; more GPUs requested by one operator than available.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflow.machine import Machine
from dataflow.pipeline import images
from dataflow.pipeline.diagnostics import Collector, PipelineError, Report
from dataflow.pipeline.graph import Graph, OperatorNode, connect, topological_order
from dataflow.pipeline.load import load_pipeline
from dataflow.pipeline.requirements import RequirementError, missing_message
from dataflow.pipeline.requirements import missing as missing_requirements
from dataflow.pipeline.spec import InputSpec, OperatorSpec, PipelineSpec, Requests
from dataflow.pipeline.stages import (
    StageImportError,
    bind_stage_ports,
    container_ports,
    import_stage,
    stage_search_path,
)
from dataflow.stage import ParameterError, Port, Stage, checking_pipeline

__all__ = [
    "GPUS_ENV",
    "check_pipeline",
    "load_graph",
    "validate",
]

#: The GPUs declared for this machine when the caller does not say (the scheduler's syntax).
GPUS_ENV = "DATAFLOW_GPUS"


def validate(
    spec: PipelineSpec, *, gpus_available: int | None = None, machine: Machine | None = None
) -> Report:
    """Check ``spec`` as a whole; the report starts with the notes and warnings of loading.

    ``machine``: what the machine it will run on offers (GPUs, a container engine); None:
    :meth:`dataflow.machine.Machine.detect` finds it (the validator never looks itself).
    ``gpus_available``: that many GPUs instead of the machine's.
    """
    machine = machine if machine is not None else Machine.detect()
    if gpus_available is not None:
        machine = dataclasses.replace(machine, gpus=gpus_available, gpu_source="")
    diags = Collector(spec.diagnostics)
    unresolved: set[str] = set()
    search = stage_search_path(spec.path)
    nodes = [_node(op, diags, unresolved, search) for op in spec.operators]
    edges, job_inputs = connect(nodes, diags, unresolved)
    order, cycle = topological_order([n.name for n in nodes], edges)
    if cycle is not None:
        closing = next(e for e in edges if e.source == cycle[-1] and e.target == cycle[0])
        diags.error(
            closing.location,
            f"operators {' -> '.join([*cycle, cycle[0]])} form a cycle",
            operator=cycle[0],
            field=closing.field,
        )
    _environment(nodes, diags, machine)
    graph = None
    if not diags.has_errors:
        by_name = {n.name: n for n in nodes}
        graph = Graph(
            spec, {name: by_name[name] for name in order}, tuple(edges), tuple(job_inputs)
        )
    return Report(list(diags), graph)


def check_pipeline(
    path: str | os.PathLike[str],
    args: Mapping[str, str] | None = None,
    *,
    gpus_available: int | None = None,
    machine: Machine | None = None,
) -> Report:
    """Load and validate the file at ``path``; loading errors come back in the report."""
    try:
        spec = load_pipeline(path, args)
    except PipelineError as exc:
        return Report(list(exc.diagnostics))
    return validate(spec, gpus_available=gpus_available, machine=machine)


def load_graph(
    path: str | os.PathLike[str],
    args: Mapping[str, str] | None = None,
    *,
    gpus_available: int | None = None,
) -> Graph:
    """Load and validate ``path``; the graph, or :class:`PipelineError` listing every error."""
    report = check_pipeline(path, args, gpus_available=gpus_available)
    report.raise_for_errors()
    assert report.graph is not None
    return report.graph


# --------------------------------------------------------------------------- nodes


def _node(
    op: OperatorSpec, diags: Collector, unresolved: set[str], search: list[str]
) -> OperatorNode:
    if op.stage is None:
        inputs, specs, outputs = container_ports(op)
        _check_container_inputs(op, diags)
        return OperatorNode(op, inputs, specs, outputs, requests=op.requests)
    try:
        cls = import_stage(op.stage, search)
    except StageImportError as exc:
        diags.error(op.at("stage"), str(exc), operator=op.name, field="stage")
        unresolved.add(op.name)
        specs = {inp.port_name or f"input[{i}]": inp for i, inp in enumerate(op.inputs)}
        unknown_in: dict[str, Port | None] = dict.fromkeys(specs)
        unknown_out: dict[str | None, Port | None] = {o.name: None for o in op.outputs}
        return OperatorNode(op, unknown_in, specs, unknown_out, requests=op.requests)
    folder = Path(op.at("stage").file).resolve().parent  # for the stage's file parameters
    try:
        with checking_pipeline(folder):
            arguments = cls.check_parameters(op.arguments, f"stage {op.stage}")
    except (ParameterError, TypeError, ValueError) as exc:
        loc = op.at("arguments") if "arguments" in op.locations else op.at("stage")
        diags.error(loc, str(exc), operator=op.name, field="arguments")
        arguments = dict(op.arguments)
    _check_requirements(op, cls, arguments, diags)
    inputs, specs, outputs = bind_stage_ports(op, cls, diags)
    return OperatorNode(
        op,
        dict(inputs),
        specs,
        outputs,
        stage_class=cls,
        arguments=arguments,
        requests=_requests(op.requests, cls),
    )


def _check_requirements(
    op: OperatorSpec, cls: type[Stage], arguments: Mapping[str, Any], diags: Collector
) -> None:
    """A module the stage needs and this machine lacks is an error naming what installs it:
    its workers would fail at start, and every job routed to them."""
    try:
        absent = missing_requirements(cls, arguments)
    except (RequirementError, TypeError, ValueError, KeyError) as exc:
        diags.error(op.at("stage"), str(exc), operator=op.name, field="stage")
        return
    if absent:
        diags.error(
            op.at("stage"),
            f"{op.stage} {missing_message(absent)}",
            operator=op.name,
            field="stage",
        )


def _check_container_inputs(op: OperatorSpec, diags: Collector) -> None:
    seen: dict[str, InputSpec] = {}
    for index, inp in enumerate(op.inputs):
        key = inp.path or inp.name or f"input[{index}]"
        if key in seen:
            what = "path" if inp.path else "name"
            diags.error(
                inp.at(what),
                f"two inputs use {what} {key!r} (the other at {seen[key].at(what)})",
                operator=op.name,
                field=f"input[{index}].{what}",
            )
        seen.setdefault(key, inp)


def _requests(given: Requests, cls: type[Stage]) -> Requests:
    base = dict(getattr(cls, "requests", None) or {})
    return Requests(
        cpu=given.cpu if given.cpu is not None else base.get("cpu"),
        gpu=given.gpu if given.gpu is not None else base.get("gpu"),
        memory=given.memory if given.memory is not None else base.get("memory"),
        resources={**dict(base.get("resources") or {}), **given.resources},
        location=given.location,
        locations=given.locations,
    )


# --------------------------------------------------------------------------- environment


def _check_bundled(op: OperatorSpec, image: images.Image, diags: Collector) -> None:
    """A Clara image a bundled stage does (``dataflow.pipeline.images``): a note saying so,
    an error if that stage cannot be imported or lacks a module it needs."""
    where = {"operator": op.name, "field": "container.image"}
    loc = op.container.at("image")
    try:
        cls = import_stage(image.stage, [])
        absent = missing_requirements(cls, {})
    except (StageImportError, RequirementError) as exc:
        diags.error(loc, f"image {op.container.reference!r} ({image.source}): {exc}", **where)
        return
    if absent:
        message = (
            f"image {op.container.reference!r} {image.describe()}, which {missing_message(absent)}"
        )
        diags.error(loc, message, **where)
        return
    diags.note(loc, f"image {op.container.reference!r} {image.describe()}", **where)


def _environment(nodes: list[OperatorNode], diags: Collector, machine: Machine) -> None:
    available, how = machine.gpus, machine.gpu_source
    runtime, no_runtime = machine.engine, machine.no_engine
    for node in nodes:
        op = node.spec
        known = images.lookup(op.container) if op.stage is None else None
        if known is not None and known.stage is not None:
            _check_bundled(op, known, diags)
        elif op.container is not None and op.container.image and runtime is None:
            if known is not None:
                instead = known.describe()
            elif op.container.command:
                instead = "its command runs as a local subprocess instead"
            else:
                instead = "it has no command to run without one"
            diags.warning(
                op.container.at("image"),
                f"cannot run image {op.container.reference!r} here ({no_runtime}); {instead}",
                operator=op.name,
                field="container.image",
            )
        per_worker = int(node.requests.gpu or 0)
        if known is not None and known.stage is not None and not known.gpu:
            per_worker = 0  # the image asked for a GPU; the stage doing its job needs none
        needed = per_worker * op.replicas
        if needed > available:
            if op.requests.gpu is not None:
                loc, field = op.requests.at("gpu"), "requests.gpu"
            else:  # from the stage class
                loc, field = op.at("stage"), "requests.gpu"
            replicas = (
                f" ({per_worker} per worker x {op.replicas} replicas)" if op.replicas > 1 else ""
            )
            diags.warning(
                loc,
                f"needs {needed} GPU(s){replicas} but "
                f"{available} {'is' if available == 1 else 'are'} available"
                f"{f' ({how})' if how else ''}; it cannot start on this machine",
                operator=op.name,
                field=field,
            )
