"""The pipeline as a DAG: operators (with their resolved ports), edges, topological order.

An edge ``(source, output) -> (target, input)`` exists for every input entry with a ``from``;
inputs without ``from`` take the job's input. Fan-out (one output, many consumers) and fan-in
(one operator, many upstreams) are both plain edges. The order is Kahn's algorithm, ties
broken by the order of definition, so it is stable.

Everything here is plain data and pure functions: :func:`connect` and
:func:`topological_order` are tested on hand-built nodes.
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
from collections.abc import Iterable, Sequence
from typing import Any

from dataflow.pipeline.diagnostics import Collector, Location
from dataflow.pipeline.spec import InputSpec, OperatorSpec, PipelineSpec, Requests
from dataflow.stage import PRIMITIVES, Port, Stage

__all__ = ["Edge", "Graph", "OperatorNode", "compatible", "connect", "topological_order"]


@dataclasses.dataclass(frozen=True)
class Edge:
    """Output ``output`` of operator ``source`` feeds input ``input`` of operator ``target``.

    ``output`` is None for an operator's single unnamed output (Clara 0.4.0 style).
    ``input`` is the target's input key (see :attr:`OperatorNode.inputs`).
    """

    source: str
    output: str | None
    target: str
    input: str
    location: Location = dataclasses.field(compare=False)
    field: str = dataclasses.field(default="input", compare=False)


@dataclasses.dataclass(frozen=True)
class OperatorNode:
    """One operator, its ports resolved.

    ``inputs`` maps input keys to ports: for a Python stage the key is the input port name;
    for a container it is the input's ``path`` (else ``name``). ``outputs`` maps output names
    (None: a single unnamed output) to ports. A port of None is an untyped disk directory.
    ``arguments`` are the stage's constructor arguments, converted by ``check_parameters``.
    ``requests`` are the YAML's, falling back on the stage class's ``requests``.
    """

    spec: OperatorSpec
    inputs: dict[str, Port | None]
    input_specs: dict[str, InputSpec]
    outputs: dict[str | None, Port | None]
    stage_class: type[Stage] | None = None
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    requests: Requests = dataclasses.field(default_factory=Requests)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclasses.dataclass(frozen=True)
class Graph:
    """A validated pipeline: ``nodes`` in topological order, ``edges``, ``job_inputs``."""

    spec: PipelineSpec
    nodes: dict[str, OperatorNode]  # name -> node, in topological order
    edges: tuple[Edge, ...]
    job_inputs: tuple[tuple[str, str], ...]  # (operator, input key) fed by the job's input

    @property
    def order(self) -> tuple[str, ...]:
        """Operator names, each after every operator it depends on."""
        return tuple(self.nodes)

    def node(self, name: str) -> OperatorNode:
        """The node named ``name`` (case-insensitive); KeyError if none."""
        for key, node in self.nodes.items():
            if key.casefold() == name.casefold():
                return node
        raise KeyError(f"pipeline {self.spec.name!r} has no operator {name!r}")

    def upstream(self, name: str) -> tuple[Edge, ...]:
        """Edges into operator ``name``."""
        target = self.node(name).name
        return tuple(e for e in self.edges if e.target == target)

    def downstream(self, name: str) -> tuple[Edge, ...]:
        """Edges out of operator ``name``."""
        source = self.node(name).name
        return tuple(e for e in self.edges if e.source == source)

    @property
    def results(self) -> tuple[tuple[str, str | None], ...]:
        """(operator, output) pairs that no operator consumes: the job's results."""
        used = {(e.source, e.output) for e in self.edges}
        return tuple(
            (name, output)
            for name, node in self.nodes.items()
            for output in node.outputs
            if (name, output) not in used
        )


# --------------------------------------------------------------------------- type rules


def describe(port: Port | None) -> str:
    return "an untyped disk directory" if port is None else port.describe()


def _as_array(port: Port) -> Port:
    """Clara's equivalences: string = array<uint8>[-1], a primitive T = array<T>[1]."""
    if port.type == "string":
        return Port("array", element_type="uint8", shape=(-1,))
    if port.type in PRIMITIVES.values():
        return Port("array", element_type=port.type, shape=(1,))
    return port


def compatible(inp: Port | None, out: Port | None) -> tuple[str | None, str | None]:
    """(why ``out`` cannot feed ``inp`` or None, a note when only a Clara equivalence fits).

    None is an untyped disk directory (Clara 0.4.0): it connects to itself and to streams.
    """
    if inp is None and out is None:
        return None, None
    if inp is None:
        if out is not None and out.type == "stream":
            return None, None
        return f"{describe(out)} lives in shared memory; an untyped input is a disk directory", None
    if out is None:
        if inp.type == "stream":
            return None, None
        return f"an untyped output is a disk directory; it cannot feed {inp.describe()}", None
    problem = inp.accepts(out)
    if problem is None:
        return None, None
    if (
        inp.type != "stream"
        and out.type != "stream"
        and _as_array(inp).accepts(_as_array(out)) is None
    ):
        note = f"{out.describe()} feeds {inp.describe()} by Clara's type equivalence"
        return None, note
    return problem, None


# --------------------------------------------------------------------------- edges


def connect(
    nodes: Sequence[OperatorNode], diags: Collector, unresolved: Iterable[str] = ()
) -> tuple[list[Edge], list[tuple[str, str]]]:
    """Edges and job inputs of ``nodes``; bad ``from``/``name`` links and type mismatches go
    to ``diags``. Ports of operators in ``unresolved`` (stage not importable) are unknown,
    so links to them are not type-checked."""
    unknown = set(unresolved)
    by_key = {node.name.casefold(): node for node in nodes}
    edges: list[Edge] = []
    job_inputs: list[tuple[str, str]] = []
    for node in nodes:
        op = node.spec
        for key, inp in node.input_specs.items():
            index = op.inputs.index(inp)
            field = f"input[{index}]"
            if inp.source is None:
                job_inputs.append((node.name, key))
                continue
            up = by_key.get(inp.source.casefold())
            if up is None:
                close = difflib.get_close_matches(inp.source, [n.name for n in nodes], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(n.name for n in nodes)
                diags.error(
                    inp.at("from"),
                    f"no operator named {inp.source!r}{hint}; operators: {known}",
                    operator=op.name,
                    field=f"{field}.from",
                )
                continue
            if up.name in unknown:
                edges.append(Edge(up.name, inp.name, node.name, key, inp.at("from"), field))
                continue
            output = _pick_output(node, inp, up, field, diags)
            if output is False:
                continue
            assert not isinstance(output, bool)
            if node.name not in unknown:
                problem, note = compatible(node.inputs.get(key), up.outputs[output])
                where = f"input {key!r}"
                source = (
                    f"operator {up.name!r} output {output!r}"
                    if output
                    else (f"operator {up.name!r}")
                )
                loc = inp.at("type") if "type" in inp.locations else inp.at("from")
                if problem is not None:
                    diags.error(
                        loc,
                        f"{source} ({describe(up.outputs[output])}) cannot feed {where} "
                        f"({describe(node.inputs.get(key))}): {problem}",
                        operator=op.name,
                        field=field,
                    )
                elif note is not None:
                    diags.note(loc, note, operator=op.name, field=field)
            edges.append(Edge(up.name, output, node.name, key, inp.at("from"), f"{field}.from"))
    return edges, job_inputs


def _pick_output(
    node: OperatorNode, inp: InputSpec, up: OperatorNode, field: str, diags: Collector
) -> str | bool | None:
    """The upstream output an input binds, or False (reported) when there is none."""
    outputs = list(up.outputs)
    named = [o for o in outputs if o is not None]
    if inp.name is None:
        if len(outputs) == 1:
            return outputs[0]
        problem = (
            f"operator {up.name!r} has no outputs"
            if not outputs
            else f"operator {up.name!r} has several outputs ({', '.join(named)}): say which "
            "with 'name'"
        )
        diags.error(inp.at("from"), problem, operator=node.name, field=f"{field}.from")
        return False
    for output in named:
        if output.casefold() == inp.name.casefold():
            return output
    if not outputs:
        their = "it has no outputs"
    elif not named:
        their = "its only output has no name; leave 'name' out to bind it"
    else:
        their = f"its outputs: {', '.join(named)}"
    hint = ""
    if node.kind == "stage" and inp.port is None and len(named) == 1:
        hint = f"; to feed its output {named[0]!r} into port {inp.name!r}, write "
        hint += f"'name: {named[0]}' and 'port: {inp.name}'"
    diags.error(
        inp.at("name"),
        f"operator {up.name!r} has no output {inp.name!r} ({their}){hint}",
        operator=node.name,
        field=f"{field}.name",
    )
    return False


# --------------------------------------------------------------------------- order


def topological_order(
    names: Sequence[str], edges: Iterable[Edge]
) -> tuple[list[str], list[str] | None]:
    """(order, cycle): Kahn's algorithm over ``edges``, ties broken by position in ``names``.

    When the graph has a cycle, ``order`` holds the operators that can run and ``cycle`` the
    operators of one cycle in edge order (``["a", "b"]`` for a -> b -> a); else it is None.
    """
    index = {name: i for i, name in enumerate(names)}
    preds: dict[str, set[str]] = {name: set() for name in names}
    succs: dict[str, set[str]] = {name: set() for name in names}
    for edge in edges:
        preds[edge.target].add(edge.source)
        succs[edge.source].add(edge.target)
    waiting = {name: len(preds[name]) for name in names}
    ready = [(index[name], name) for name in names if waiting[name] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for nxt in succs[name]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (index[nxt], nxt))
    if len(order) == len(names):
        return order, None
    done = set(order)
    left = [name for name in names if name not in done]
    # Every operator left waits on another one left: walk back until a name repeats.
    path: list[str] = []
    seen: dict[str, int] = {}
    name = left[0]
    while name not in seen:
        seen[name] = len(path)
        path.append(name)
        name = min((p for p in preds[name] if p not in done), key=index.__getitem__)
    cycle = path[seen[name] :][::-1]
    first = min(range(len(cycle)), key=lambda i: index[cycle[i]])
    return order, cycle[first:] + cycle[:first]
