"""From a validated pipeline graph and a placement to what the executor runs (``StageDef``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from dataflow.errors import UsageError
from dataflow.execution.local import StageDef
from dataflow.execution.provenance import pipeline_record
from dataflow.pipeline import Graph, OperatorNode, images
from dataflow.scheduler import Inventory, PlacementError, Plan, ReplicaRequest, place

__all__ = ["plan_pipeline", "stage_defs"]

COMMAND_STAGE = "dataflow.execution.command:CommandStage"
MIB = 1 << 20


def _port_names(node: OperatorNode) -> tuple[dict[str, str], dict[str | None, str]]:
    """Executor port names for a node's input keys and output names.

    Python stages keep their ports' names. A container's inputs are keyed by path in the graph;
    they are named by their ``name``, else the path's last part (``/input`` -> ``input``); an
    unnamed single output is ``output``.
    """
    if node.kind == "stage":
        return {k: k for k in node.inputs}, {k: k for k in node.outputs if k is not None}
    inputs = {}
    for key, spec in node.input_specs.items():
        base = spec.name or os.path.basename(str(spec.path or key).rstrip("/")) or "input"
        name, n = base, 2
        while name in inputs.values():
            name, n = f"{base}{n}", n + 1
        inputs[key] = name
    outputs = {}
    for key in node.outputs:
        outputs[key] = key if key is not None else "output"
    return inputs, outputs


def replica_requests(graph: Graph) -> list[ReplicaRequest]:
    requests = []
    for node in graph.nodes.values():
        r = node.requests
        bundled = images.bundled(node.spec.container) if node.kind == "container" else None
        if bundled is not None and not bundled.gpu:  # the image's GPU, not its stand-in's
            r = dataclasses.replace(r, gpu=0)
        for replica in range(node.spec.replicas):
            requests.append(
                ReplicaRequest(
                    stage=node.name,
                    replica=replica,
                    cpu=float(r.cpu) if r.cpu is not None else 1.0,
                    gpu=int(r.gpu or 0),
                    memory_mb=int(r.memory) if r.memory is not None else 512,
                )
            )
    return requests


def plan_pipeline(
    graph: Graph, inventory: Inventory | None = None, replicas: Mapping[str, int] | None = None
) -> tuple[Graph, Plan]:
    """Apply replica overrides and place every replica (PlacementError if impossible)."""
    if replicas:
        graph = _with_replicas(graph, replicas)
    _refuse_unrunnable(graph)
    inventory = inventory or Inventory.detect()
    return graph, place(replica_requests(graph), inventory)


def _refuse_unrunnable(graph: Graph) -> None:
    """A container operator with an image but no command needs a container engine: a valid
    pipeline (``validate`` warns) that this machine cannot run; refuse before anything starts.
    So is an image the image table (``dataflow.pipeline.images``) knows cannot be had here,
    with the table's reason; an image a bundled stage does runs without an engine."""
    from dataflow.machine import container_engine

    reasons = {}
    for node in graph.nodes.values():
        container = node.spec.container
        if node.kind != "container" or container is None or images.bundled(container):
            continue
        known = images.lookup(container)
        if known is not None:
            reasons[node.name] = known.describe()
        elif not container.command:
            reasons[node.name] = "no command to run"
    if reasons and container_engine() is None:
        names = "; ".join(
            f"operator {name!r} (image {container.reference!r}, {container.at('image')}): {why}"
            for name, why in reasons.items()
            if (container := graph.nodes[name].spec.container)
        )
        message = (
            f"cannot run here: {names}; no docker or podman daemon answers (set "
            "DATAFLOW_CONTAINER_ENGINE, or give the operator a command)"
        )
        raise PlacementError(message, [message])


def _with_replicas(graph: Graph, replicas: Mapping[str, int]) -> Graph:
    nodes = dict(graph.nodes)
    for name, count in replicas.items():
        if name not in graph.nodes:
            raise UsageError(
                f"--replicas {name}={count}: pipeline {graph.spec.name!r} has no operator {name!r}"
            )
        if count < 1:
            raise UsageError(f"--replicas {name}={count}: must be at least 1")
        node = graph.node(name)
        spec = dataclasses.replace(node.spec, replicas=count)
        nodes[node.name] = dataclasses.replace(node, spec=spec)
    return dataclasses.replace(graph, nodes=nodes)


def stage_defs(graph: Graph, plan: Plan, *, memory_limit: int | None = None) -> list[StageDef]:
    """One StageDef per operator, with each replica's CUDA_VISIBLE_DEVICES from the plan.
    A worker's memory limit is its operator's ``requests.memory`` (MiB), else ``memory_limit``
    (bytes: the service's ``worker-memory``), else none."""
    names = {name: _port_names(node) for name, node in graph.nodes.items()}
    defs = []
    described = []  # each stage as its provenance names it
    for name, node in graph.nodes.items():
        in_names, out_names = names[name]
        inputs: dict[str, tuple[str, str] | None] = {}
        for key in node.inputs:
            inputs[in_names[key]] = None
        for edge in graph.upstream(name):
            inputs[in_names[edge.input]] = (edge.source, names[edge.source][1][edge.output])
        outputs = tuple(out_names.values())
        if node.kind == "stage":
            ref, arguments = node.stage_class, dict(node.arguments)
        else:
            ref, arguments = COMMAND_STAGE, _command_arguments(node, in_names, out_names)
            bundled = images.bundled(node.spec.container)  # a Clara image done by a stage
            if bundled is not None:
                ref = bundled.stage
                arguments["ports"] = images.port_types(node, in_names, out_names)
        assignments = [plan.assignment(name, r) for r in range(node.spec.replicas)]
        if node.requests.memory is not None:
            limit, source = int(node.requests.memory) * MIB, "requests.memory"
        else:
            limit, source = memory_limit, "worker-memory"
        container = node.spec.container if node.kind == "container" else None
        described.append({
            "name": name, "stage_ref": ref, "arguments": arguments, "inputs": inputs,
            "container": f"{container.image}:{container.tag or 'latest'}" if container else None,
        })  # fmt: skip
        cls = node.stage_class if node.kind == "stage" else None
        defs.append(
            StageDef(
                name=name,
                stage_ref=ref,
                inputs=inputs,
                outputs=outputs,
                arguments=arguments,
                replicas=node.spec.replicas,
                timeout=node.spec.timeout,
                env=[{**_thread_env(a.cpu), **node.spec.variables, **a.env} for a in assignments],
                devices=[a.gpus[0] if a.gpus else None for a in assignments],
                memory_limit=limit,
                memory_source=source,
                wants_provenance=bool(getattr(cls, "wants_provenance", False)),
            )
        )
    pipeline = pipeline_record(graph.spec.name, described, file=graph.spec.path)
    return [dataclasses.replace(d, pipeline=pipeline) for d in defs]


def _command_arguments(node: OperatorNode, in_names, out_names) -> dict:
    container = node.spec.container
    out_specs = {o.name: o for o in node.spec.outputs}
    return {
        "command": list(container.command) if container else [],
        "inputs": {in_names[k]: s.path for k, s in node.input_specs.items()},
        "outputs": {
            out_names[k]: (out_specs.get(k).path if out_specs.get(k) else None)
            for k in node.outputs
        },
        "input_types": {
            in_names[k]: p.element_type for k, p in node.inputs.items() if p is not None
        },
        "output_types": {
            out_names[k]: p.element_type for k, p in node.outputs.items() if p is not None
        },
        "variables": dict(node.spec.variables),
        "image": container.image if container else None,
        "tag": (container.tag or "latest") if container else "latest",
    }


def _thread_env(cpu: float) -> dict[str, str]:
    """Size the worker's thread pools (Numba, OpenMP/BLAS) to its CPU request, so that every
    worker does not start one thread per core of the machine."""
    threads = str(max(1, int(cpu)))
    return {"NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
