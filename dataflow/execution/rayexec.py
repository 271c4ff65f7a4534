"""The Ray executor: the same scheduling core (``state.Core``) as the local executor, with each
stage replica a Ray actor instead of a worker process.

The coordinator (this process, Ray's driver) turns what Ray reports — an actor ready, a job's
call returned or its actor dead — into core events, and carries out the core's actions: a
``Dispatch`` is one actor call (:meth:`StageActor.run`), a ``StartWorker`` creates an actor, a
``KillWorker`` kills one. It awaits the calls with ``ray.wait``. Backpressure, ordering, stage
and job timeouts are the core's, as with the local executor.

What travels on an edge:

- an array output goes into our shared-memory store on the producer's node
  (:mod:`dataflow.execution.raystore`: a :class:`~dataflow.execution.raystore.ShmRef`), read
  zero copy by the stages on that node and copied through Ray's object store to a reader on
  another node; the node's store owns it, so it outlives the actor that made it, and it is
  freed when the core discards its value. With ``shm=False`` (or on a node that joined after
  the run started) it is a return value of the producing call instead, in Ray's object store,
  owned by the coordinator (:class:`ArrayRef`). Its metadata travels beside it;
- a stream output is a folder path (:class:`~dataflow.execution.refs.PathRef`): every node must
  see the same ``output_root`` (one machine, or a shared file system);
- a string or a number travels inline (:class:`~dataflow.execution.refs.ValRef`).

Resources: each actor asks Ray for its stage's ``requests`` (CPU, GPU, memory) and any custom
resources (:class:`RayResources`); a pipeline that cannot fit the cluster's nodes is refused
before any actor starts (:func:`check_fits`, a ``PlacementError``).

Faults: an actor is created with ``max_restarts`` and ``max_task_retries`` from
``Limits.max_restarts``: Ray restarts an actor that dies (``prepare`` runs again) and retries the
call it was running; only when Ray gives up does the core hear of the death (the job fails,
the worker is started again after the core's backoff). Each job ends with exactly one
result or one failure: a retried call's first attempt returns nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import structlog

from dataflow.execution import state
from dataflow.execution.latency import Latency
from dataflow.execution.local import JobFeed, JobResult, StageDef
from dataflow.execution.provenance import JobProvenance
from dataflow.execution.raystore import ActorData, LostInput, NodeStores, ShmRef, fetch
from dataflow.execution.refs import PathRef, ValRef
from dataflow.hints import suggest
from dataflow.scheduler import PlacementError, ReplicaRequest, SchedulerError
from dataflow.units import plural

__all__ = [
    "PLACEMENTS",
    "ArrayRef",
    "RayExecutor",
    "RayNode",
    "RayPlan",
    "RayResources",
    "Reservation",
    "StageActor",
    "address_problem",
    "check_fits",
    "connect",
    "cpus_requested",
    "placement_problem",
    "plan_on_ray",
    "resources_of",
]

log = structlog.get_logger("dataflow.execution")

MIB = 1 << 20
#: seconds a serving executor waits on Ray at most before it looks at its feed again
SERVE_POLL = 0.05


class ArrayRef(NamedTuple):
    """An array on an edge: its Ray object (owned by the coordinator) and its metadata."""

    ref: Any  # ray.ObjectRef
    metadata: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RayResources:
    """What one replica of a stage asks Ray for (``memory`` in bytes; ``custom``: resources a
    node was started with, e.g. ``{"scanner-room": 1}``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int = 512 * MIB
    custom: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def wanted(self) -> dict[str, float]:
        """Ray's resource names -> amounts (the zero ones left out)."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": float(self.memory)}
        wanted.update(self.custom)
        return {name: amount for name, amount in wanted.items() if amount}


def resources_of(requests: Iterable[ReplicaRequest], graph: Any = None) -> dict[str, RayResources]:
    """Per stage, the Ray resources of its replicas' requests (``dataflow.execution.build.
    replica_requests``: Clara's defaults where the pipeline gives none), with the custom
    ``requests.resources`` of ``graph``'s operators."""
    nodes = graph.nodes if graph is not None else {}
    return {
        r.stage: RayResources(
            num_cpus=r.cpu,
            num_gpus=r.gpu,
            memory=r.memory_mb * MIB,
            custom=dict(nodes[r.stage].requests.resources) if r.stage in nodes else {},
        )
        for r in requests
    }


def connect(address: str | None, num_cpus: float | None = None, *, what: str = "") -> bool:
    """Connect this process to Ray: to ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or
    without one to a Ray runtime started here on 127.0.0.1 (which Ray 2.60 rewrites to the
    host's outward address where there is a default route: docs/ray.md), without a
    dashboard, that offers
    ``num_cpus`` CPUs if more than the machine has (the local executor's rule: on one machine
    CPU requests are soft, replicas share cores). Returns whether this call started or
    connected (the caller then shuts it down); False when this process was connected already
    (then ``address`` is not checked). ``SchedulerError`` naming ``what`` (default
    ``--address ADDRESS``) when no cluster answers there: a ``HOST:PORT`` where nothing
    listens is refused at once (Ray itself would keep trying for minutes)."""
    import ray

    if ray.is_initialized():
        return False
    with _own_sigterm():
        return _connect(address, num_cpus, what)


@contextlib.contextmanager
def _own_sigterm():
    """Keep this process's SIGTERM handler: ``ray.init`` in the main thread replaces it by
    one that exits at once, which would take a clean stop from ``dataflow serve``."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _connect(address: str | None, num_cpus: float | None, what: str) -> bool:
    import ray

    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,  # a stage's prints stay in Ray's logs, not on our stderr
        "configure_logging": False,
    }
    if address is None:
        cpus = os.cpu_count() or 1
        if num_cpus is not None and num_cpus > cpus:
            log.warning(
                "ray_cpus_shared", requested=num_cpus, cpus=cpus,
                note="replicas will share cores (slower, not wrong)",
            )  # fmt: skip
            cpus = math.ceil(num_cpus)
        # "local": a runtime of our own, even where a `ray start` on this machine left its
        # address in /tmp/ray (ray.init would join that cluster, or fail if it is gone)
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, **options)
        return True
    what = what or f"--address {address}"
    unreachable = _unreachable(address)
    if unreachable:
        raise SchedulerError(f"{what}: no Ray cluster to connect to ({unreachable})")
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SchedulerError(f"{what}: no Ray cluster to connect to ({_first_line(exc)})") from None
    return True


def address_problem(address: str) -> str | None:
    """Why ``address`` is not one ``ray.init`` takes (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``), or None."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in rest:
        return "expected auto, HOST:PORT (the head's GCS port) or ray://HOST:PORT (Ray Client)"
    return None


def _unreachable(address: str) -> str | None:
    """Why nothing can answer at ``address`` (its form, or a TCP connection refused or not
    answered within 5 s), or None; ``auto`` is left to Ray."""
    problem = address_problem(address)
    if problem or address == "auto":
        return problem
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        return f"nothing answers at {host}:{port}: {exc.strerror or exc}"
    return None


def _fmt(amount: float) -> str:
    return f"{amount:g}"


def _describe(resources: Mapping[str, float]) -> str:
    parts = []
    for name, amount in sorted(resources.items()):
        if name == "memory":
            parts.append(f"{amount / MIB:.0f} MiB memory")
        elif name in ("CPU", "GPU"):
            parts.append(f"{_fmt(amount)} {name}")
        elif not name.startswith(("node:", "object_store_memory", "accelerator_type")):
            parts.append(f"{_fmt(amount)} {name!r}")
    return ", ".join(parts) or "nothing"


def check_fits(
    replicas: Sequence[tuple[str, int, RayResources]], nodes: Sequence[Mapping[str, float]]
) -> list[tuple[str, int, RayResources, int]]:
    """Refuse (``PlacementError``, every reason) a set of ``(stage, replica, resources)`` that
    cannot all be placed at once on ``nodes`` (each node's total resources, as Ray reports
    them): the replicas pinned by a custom resource first, then the largest, each on the first
    node it fits (a greedy check: it may refuse a set a cleverer packing would place). Returns
    that placement, ``(stage, replica, resources, node index)`` in the order placed. Pure."""
    free = [dict(node) for node in nodes]
    problems = []
    placed = []

    def key(item: tuple[str, int, RayResources]) -> tuple:
        res = item[2]
        return (-len(res.custom), -res.num_gpus, -res.num_cpus, -res.memory, item[:2])

    order = sorted(replicas, key=key)
    for stage, replica, resources in order:
        wanted = resources.wanted()
        index = next(
            (
                i
                for i, n in enumerate(free)
                if all(n.get(k, 0.0) + 1e-9 >= v for k, v in wanted.items())
            ),
            None,
        )
        if index is None:
            whole = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in wanted.items())]
            why = "taken by the replicas above" if whole else "no node has as much"
            problems.append(
                f"stage {stage!r} replica {replica} asks for {_describe(wanted)}: {why}"
            )
            continue
        for k, v in wanted.items():
            free[index][k] -= v
        placed.append((stage, replica, resources, index))
    if problems:
        has = "; ".join(f"node {i}: {_describe(n)}" for i, n in enumerate(nodes)) or "no node"
        head = (
            f"cannot place {plural(len(replicas), 'replica')} on the Ray cluster "
            f"({plural(len(nodes), 'node')}: {has}):"
        )
        raise PlacementError("\n  - ".join([head, *problems]), problems)
    return placed


@dataclasses.dataclass(frozen=True)
class RayNode:
    """A live node of the cluster: Ray's node id, its IP address, its total resources."""

    node_id: str
    ip: str
    resources: Mapping[str, float]


def cluster_nodes() -> list[RayNode]:
    """The live nodes of the connected cluster (in Ray's order)."""
    import ray

    return [
        RayNode(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n["Resources"]))
        for n in ray.nodes()
        if n.get("Alive")
    ]


#: ``placement`` (the CLI's ``--placement``, the service's ``executor.placement``) -> the
#: strategy of the Ray placement group that reserves every replica's resources at once
PLACEMENTS = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict-pack": "STRICT_PACK",
    "strict-spread": "STRICT_SPREAD",
}


def placement_problem(placement: str) -> str | None:
    """Why ``placement`` is not one of :data:`PLACEMENTS` (None if it is)."""
    if placement in PLACEMENTS:
        return None
    close = suggest(placement, tuple(PLACEMENTS))
    hint = f"; did you mean {close!r}?" if close else ""
    return f"expected {', '.join(PLACEMENTS)} (a Ray placement group's strategy){hint}"


class Reservation:
    """A Ray placement group holding one bundle per replica (its stage's resources), all
    reserved together with one strategy before any actor starts; each replica's actor (and
    its restarts) goes into its own bundle. Ray moves the bundles of a node that dies to
    another node that can hold them."""

    def __init__(
        self,
        replicas: Sequence[tuple[str, int, RayResources]],
        placement: str,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.placement = placement
        self.strategy = PLACEMENTS[placement]
        self.index = {(stage, replica): i for i, (stage, replica, _) in enumerate(replicas)}
        # a bundle may not be empty: a replica asking for nothing holds 1 MiB of memory
        bundles = [res.wanted() or {"memory": float(MIB)} for _, _, res in replicas]
        self.group = placement_group(bundles, strategy=self.strategy)
        ready, waited = self.group.ready(), False
        while not ray.wait([ready], timeout=0.5)[0]:
            state = self.scheduling_state()
            if state == "INFEASIBLE":
                self.release()
                raise PlacementError(
                    f"cannot reserve {plural(len(replicas), 'replica')} together on the Ray "
                    f"cluster with placement {placement} ({self.strategy}): no set of its "
                    f"nodes can hold them ({'; '.join(_describe(b) for b in bundles)})",
                    [f"placement {placement}: infeasible on the cluster's nodes"],
                )
            if not waited and on_wait is not None:
                on_wait(f"waiting for the Ray cluster to reserve room ({state})")
                waited = True

    def scheduling_state(self) -> str:
        from ray.util.placement_group import placement_group_table

        return placement_group_table(self.group).get("stats", {}).get("scheduling_state", "?")

    def nodes(self) -> dict[tuple[str, int], str]:
        """Each replica's node id, as Ray reserved its bundle."""
        from ray.util.placement_group import placement_group_table

        where = placement_group_table(self.group).get("bundles_to_node_id", {})
        return {key: where.get(i, "") for key, i in self.index.items()}

    def strategy_for(self, stage: str, replica: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.index[(stage, replica)]
        )

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(self.group)


@dataclasses.dataclass(frozen=True)
class RayPlan:
    """Where each replica would go on the cluster (``dataflow plan --executor ray``): the
    placement :func:`check_fits` found, which Ray's own scheduler need not follow (it places
    each actor when it is created), but which proves that the pipeline fits."""

    where: str  # the cluster, in words
    nodes: Sequence[RayNode]
    placed: Sequence[tuple[str, int, RayResources, int]]
    placement: str | None = None  # the placement group's, when Ray reserved the nodes

    def format(self) -> str:
        rows = [("stage", "replica", "node", "cpu", "gpus", "memory", "custom")]
        for stage, replica, res, index in sorted(self.placed, key=lambda p: p[3]):
            custom = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(res.custom.items()))
            memory = f"{res.memory // MIB} MiB"
            cpu, gpu = _fmt(res.num_cpus), _fmt(res.num_gpus)
            rows.append((stage, str(replica), str(index), cpu, gpu, memory, custom or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(f"on {self.where}: {plural(len(self.nodes), 'node')}")
        for i, node in enumerate(self.nodes):
            used: dict[str, float] = {}
            for _, _, res, index in self.placed:
                if index == i:
                    for k, v in res.wanted().items():
                        used[k] = used.get(k, 0.0) + v
            cpu = f"{_fmt(used.get('CPU', 0.0))} of {_fmt(node.resources.get('CPU', 0.0))} CPU"
            lines.append(
                f"  node {i}: {node.node_id[:12]} at {node.ip}: {_describe(node.resources)}"
                f"; requested here: {cpu}, {used.get('memory', 0.0) / MIB:.0f} MiB memory"
            )
        if self.placement is not None:
            lines.append(
                f"Ray reserved these nodes for every replica at once (a placement group, "
                f"placement {self.placement}: {PLACEMENTS[self.placement]}), as dataflow run "
                "does before it starts; then it released them"
            )
        else:
            lines.append(
                "Ray's scheduler places each actor as it is created: this is one placement "
                "that fits (the check dataflow run makes before it starts)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the actor


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """What a stage actor is built from (plain values: unpickled before ``sys.path`` is set)."""

    worker: str
    stage: str
    replica: int
    stage_ref: str  # "package.module:Name"
    arguments: Mapping[str, Any]
    outputs: tuple[str, ...]
    output_root: str
    env: Mapping[str, str]
    sys_path: Sequence[str]
    job_logs: bool = False  # keep each job's log: OUTPUT_ROOT/<job>/.logs/<stage>.log
    log_level: str = "WARNING"
    store_prefix: str | None = None  # the executor's node stores' (None: Ray's object store)


class _RayEdges:
    """One job's :class:`dataflow.execution.binding.Edges` in an actor: array inputs read from
    our node store (:class:`ShmRef`: zero copy on its node, else fetched) or Ray's object
    store (read-only, zero copy on the same node); array outputs published into the node's
    store, or (without one) kept to be returned as the call's return objects."""

    def __init__(self, actor: StageActor) -> None:
        self.actor = actor
        self.arrays: dict[str, np.ndarray] = {}

    def read(self, port: str, ref: Any, spec: Any) -> tuple[Any, Mapping[str, Any] | None]:
        import ray

        if isinstance(ref, PathRef):
            return Path(ref.path), None
        if isinstance(ref, ValRef):
            return ref.value, None
        from ray.exceptions import RayActorError

        if isinstance(ref, ShmRef):
            data = self.actor.data
            value = data.read(ref) if data else fetch({}, self.actor.spec.store_prefix, ref)
        else:
            try:
                value = ray.get(ref.ref)
            except RayActorError as exc:  # being fetched from a node store that went
                raise LostInput(f"input {port!r}: {_first_line(exc)}") from None
        spec.check_value(value, f"input {port!r}")
        return value, dict(ref.metadata)

    def write(self, port: str, value: Any, spec: Any) -> tuple[str, Any, int]:
        if spec.type == "array":
            meta, nbytes = dict(value.metadata), int(value.array.nbytes)
            stored = (
                port in self.actor.keep
                and self.actor.data is not None
                and self.actor.data.publish(value.array, meta)
            )
            if stored:
                return ("shm", (*stored, meta), nbytes)
            array = value.array
            if self.actor.data is not None and not _owns_memory(array):
                array = np.array(array)  # a view of the node store (an input passed on)
            self.arrays[port] = array
            return ("array", meta, nbytes)
        if spec.type == "stream":
            return ("path", str(value), 0)
        return ("value", value, len(value) if isinstance(value, str) else 8)


def _owns_memory(array: np.ndarray) -> bool:
    """Whether NumPy owns ``array``'s memory (itself or through the arrays it views), as
    opposed to shared memory that outlives the job only while a view of it is held."""
    while isinstance(array, np.ndarray):
        if array.flags.owndata:
            return True
        array = array.base
    return False


class StageActor:
    """One replica of one stage (made a Ray actor by the executor): built and prepared once in
    ``__init__`` (again when Ray restarts it), then one job per :meth:`run` call."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.error: tuple[str, str] | None = None
        self.data: ActorData | None = None
        self.keep: frozenset[str] = frozenset()  # the running job's outputs to keep here
        self.provenance: Mapping[str, Any] | None = None  # the running job's so far
        self.job_name = ""
        self.scratch = Path(tempfile.mkdtemp(prefix=f"dataflow-{spec.stage}-"))
        try:
            os.environ.update(spec.env)
            sys.path[:0] = [p for p in spec.sys_path if p not in sys.path]
            from dataflow.logs import configure_logging

            # what the stage logs goes to Ray's log files on its node: scrubbed, as locally
            configure_logging(spec.log_level, json=True, job_logs=spec.job_logs)
            from dataflow.execution.worker import resolve_stage
            from dataflow.stage import StageContext

            cls = resolve_stage(spec.stage_ref)
            import ray

            self.data = ActorData.attach(spec.store_prefix)
            gpus = ray.get_gpu_ids()
            self.ctx = StageContext(
                stage=spec.stage,
                replica=spec.replica,
                device=int(gpus[0]) if gpus else None,
                scratch_dir=self.scratch,
                allocator=self._allocate,
                output_dirs=self._output_dir,
            )
            self.instance = cls(**spec.arguments)
            self.instance.prepare(self.ctx)
        except Exception as exc:  # reported by ready(): the stage cannot start
            self.error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def _allocate(self, port: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        from dataflow.tensors import dtype_of

        spec = self.instance.outputs.get(port)
        if spec is None or spec.type != "array":
            raise ValueError(f"stage {self.spec.stage!r} has no array output {port!r}")
        dtype = dtype_of(dtype or spec.element_type)
        if self.data is None or port not in self.keep:
            # not kept in the node store: the array goes back as the call's return object,
            # which Ray copies only after run() returned, when end_job() has already given
            # a store allocation back (another actor could be writing there by then)
            return np.empty(shape, dtype=dtype)
        return self.data.allocate(shape, dtype)

    def _output_dir(self, port: str) -> Path:
        path = Path(self.spec.output_root) / self.job_name / self.spec.stage / port
        path.mkdir(parents=True, exist_ok=True)
        return path

    def ready(self) -> dict[str, Any] | tuple[str, str]:
        """Once prepared, where this actor is (``node``: the Ray id of its node; ``device``:
        its GPU, or None); else (reason, traceback) of the failed start."""
        import ray

        if self.error is not None:
            return self.error
        return {"node": ray.get_runtime_context().get_node_id(), "device": self.ctx.device}

    def run(
        self,
        job_id: str,
        job_name: str,
        inputs: Mapping[str, Any],
        timeout,
        keep: Sequence[str] = (),
        provenance: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run one job: ``(outcome, *arrays)``, one array (or None) per output port in the
        stage's order; ``outcome`` is ``("done", {port: (kind, value or metadata, nbytes)})``
        or ``("failed", reason, traceback)``. ``keep``: the array outputs to publish in this
        node's store (every reader is on this node); the others are return objects.
        ``provenance``: the job's record so far, for a stage that ``wants_provenance``."""
        from dataflow.execution.binding import job_log_path, job_scope
        from dataflow.logs import job_note

        self.keep, self.provenance, self.job_name = frozenset(keep), provenance, job_name
        payload = next((Path(v.path) for v in inputs.values() if isinstance(v, PathRef)), None)
        log = job_log_path(self.spec.output_root, job_name, self.spec.stage, self.spec.job_logs)
        with job_scope(payload, log):  # as a local worker's job (worker.Worker.run_job)
            outcome = self._run(job_id, job_name, inputs, payload, timeout)
            if log is not None and outcome[0][0] == "failed":
                job_note(f"job failed: {outcome[0][1]}\n{outcome[0][2]}")
            return outcome

    def _run(self, job_id, job_name, inputs, payload, timeout) -> tuple:
        from dataflow.execution.binding import run_job

        edges = _RayEdges(self)
        try:
            _, published = run_job(
                self.instance, self.ctx, edges, inputs, job_id=job_id, job_name=job_name,
                payload_dir=payload, timeout=timeout, provenance=self.provenance,
            )  # fmt: skip
            if self.ctx.outputs_noted:  # the instances it wrote: for the job's provenance
                from dataflow.execution.provenance import write_notes

                job_dir = Path(self.spec.output_root) / job_name
                write_notes(job_dir, self.spec.stage, self.ctx.outputs_noted)
        except Exception as exc:
            failed = ("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return failed, *([None] * len(self.spec.outputs))
        finally:
            if self.data is not None:
                self.data.end_job()
        arrays = [edges.arrays.get(port) for port in self.spec.outputs]
        return ("done", published), *arrays

    def stop(self) -> None:
        try:
            if self.error is None:
                self.instance.cleanup(self.ctx)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


# --------------------------------------------------------------------------- the executor


@dataclasses.dataclass
class _Call:
    kind: str  # "start" | "job"
    worker: str
    handle: Any  # the actor the call went to (a replaced actor's calls are ignored)
    job: str | None = None
    arrays: Sequence[Any] = ()  # the call's array return objects, one per output port
    args: tuple = ()  # a job call's arguments, to call again
    returns: int = 1
    attempt: int = 0  # calls again after the actor was unavailable


class RayExecutor:
    """Runs jobs through stages as Ray actors. ``run(jobs, on_result)`` is
    :meth:`dataflow.execution.local.LocalExecutor.run`'s contract: one :class:`JobResult` per
    job, in order; a leaf array output is ``(array, metadata)`` (a copy without ``on_result``;
    with it, a read-only view of Ray's object store valid during the call).

    ``resources``: per stage, what each replica asks Ray for (default :class:`RayResources`).
    ``address``: the cluster (None: a local runtime on loopback, or the one this process is
    connected to already). The pipeline is checked against the cluster's nodes on
    construction (``PlacementError``); a runtime this executor started is shut down when a
    run ends (or at once on a refusal). ``placement``: every replica reserved at once in a
    placement group of that strategy (:data:`PLACEMENTS`). ``shm``: arrays between stages in
    our store on each node (``store_budget`` each; the default, unless the environment says
    ``DATAFLOW_RAY_ARRAYS=ray``), else in Ray's object store."""

    def __init__(
        self,
        stages: Sequence[StageDef],
        *,
        output_root: str | Path,
        limits: state.Limits | None = None,
        resources: Mapping[str, RayResources] | None = None,
        address: str | None = None,
        extra_sys_path: Sequence[str] = (),
        placement: str | None = None,
        shm: bool | None = None,
        store_budget: int | str = "1GiB",
    ) -> None:
        from dataflow.units import parse_bytes

        if shm is None:  # for comparisons: DATAFLOW_RAY_ARRAYS=ray, Ray's object store only
            shm = os.environ.get("DATAFLOW_RAY_ARRAYS", "store") != "ray"
        self.stages = {s.name: s for s in stages}
        #: our store on each node for the arrays (None: Ray's object store; see the module)
        self.stores = NodeStores(parse_bytes(store_budget)) if shm else None
        nodes = [state.StageNode(s.name, dict(s.inputs), tuple(s.outputs), s.replicas, s.timeout)
                 for s in stages]  # fmt: skip
        self.graph = state.Graph({node.name: node for node in nodes})
        self.limits = limits or state.Limits()
        self.output_root = Path(output_root)
        self.resources = {name: (resources or {}).get(name, RayResources()) for name in self.stages}
        self.sys_path = [*extra_sys_path, *sys.path]
        self.stage_seconds: dict[str, float] = dict.fromkeys(self.stages, 0.0)
        self.stage_jobs: dict[str, int] = dict.fromkeys(self.stages, 0)
        self.stage_failed: dict[str, int] = dict.fromkeys(self.stages, 0)
        self.stage_latency: dict[str, Latency] = {name: Latency() for name in self.stages}
        #: keep each job's log per stage (``OUTPUT_ROOT/<job>/.logs/<stage>.log``, on the
        #: file system the nodes share): the service sets it, for the API's logs
        self.job_logs = False
        self._health: dict[str, Any] = self._snapshot_health(None)
        self._in_flight: dict[str, list[str]] = {}
        self._payloads: dict[str, tuple[Any, int]] = {}  # job -> (payload, priority) till it ends
        self._node_of: dict[str, str] = {}  # worker -> its actor's node, as it said when ready
        self._readers: dict[tuple[str, str], set[str]] = {
            (s.name, port): {n.name for n in nodes if (s.name, port) in n.inputs.values()}
            for s in stages
            for port in s.outputs
        }  # (stage, output port) -> the stages reading it
        self._retried: dict[str, int] = {}  # job -> times run again (a lost input)
        self.runs_again = 0  # jobs run again because an array was lost with its node
        pipeline = next((s.pipeline for s in stages if s.pipeline is not None), None)
        #: each job's record of what made it (``JOB/provenance.json``), as locally
        self.provenance = (
            None if pipeline is None else JobProvenance(pipeline, {}, self.output_root)
        )
        self.actors: dict[str, Any] = {}  # worker -> its actor handle
        self._calls: dict[Any, _Call] = {}  # the first return object of each call in flight
        self._later: list[tuple[float, _Call]] = []  # calls to make again, when
        self._dispatched: dict[str, tuple[str, float, float]] = {}
        self._timeline: dict[str, list[dict[str, Any]]] = {}
        self.reservation: Reservation | None = None
        self.on_progress: Callable[[str], None] | None = None
        self.started_ray = connect(address)
        try:
            import ray

            self._actor_class = ray.remote(StageActor)
            replicas = [
                (s.name, r, self.resources[s.name])
                for s in self.stages.values()
                for r in range(s.replicas)
            ]
            check_fits(replicas, [node.resources for node in cluster_nodes()])
            if placement is not None:
                self.reservation = Reservation(replicas, placement, self._waiting)
        except BaseException:
            self.close()
            raise

    def _waiting(self, message: str) -> None:
        log.info("ray_placement_waiting", detail=message)
        if self.on_progress is not None:
            self.on_progress(message)

    def close(self) -> None:
        """Release the placement group, and shut down the Ray runtime if this executor
        started (or connected to) it."""
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    # ----------------------------------------------------------------------- run

    def run(
        self,
        jobs: Iterable[tuple[str, str | Path | None]],
        on_result: Callable[[JobResult], None] | None = None,
    ) -> list[JobResult]:
        results: list[JobResult] = []
        started: dict[str, float] = {}
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.core = state.Core(self.graph, self.limits, ordered=True)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            self._start_stores()
            self._do(self.core.start(time.monotonic()))
            order: dict[str, int] = {}
            for job_id, payload in jobs:
                started[job_id] = time.monotonic()
                order[job_id] = len(order)
                actions = self._submit(job_id, payload, 2)
                self._do(actions, results, started, on_result)
            while not self.core.idle():
                self._step(results, started, on_result)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            self._shutdown()
        return sorted(results, key=lambda r: order[r.job])  # a job run again came last

    def _submit(self, job_id: str, payload: Any, priority: int) -> list[state.Action]:
        self._payloads[job_id] = (payload, priority)
        if self.provenance is not None:
            self.provenance.begin(job_id, payload, time.time())
        value = state.Value(PathRef(str(payload)), 0) if payload else None
        return self.core.submit(job_id, value, time.monotonic(), priority)

    def serve(
        self,
        feed: JobFeed,
        on_result: Callable[[JobResult], None],
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`dataflow.execution.local.LocalExecutor.serve`'s contract on Ray (``dataflow
        serve``): the actors stay warm and every job put into ``feed`` streams through them
        until ``feed.close()`` and the jobs in flight are done (``feed.abort()``: at once,
        every actor killed). ``on_ready`` once every actor has run ``prepare`` (or failed
        to: see :meth:`health`); ``on_result`` in this thread as each result is known,
        arrays as read-only views of Ray's object store valid during the call."""
        results: list[JobResult] = []
        started: dict[str, float] = {}
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.core = state.Core(self.graph, self.limits, ordered=False)
        try:
            self._start_stores()
            self._do(self.core.start(time.monotonic()))
            while True:
                if on_ready is not None and all(
                    w.up or w.state == "waiting" for w in self.core.workers.values()
                ):
                    on_ready()
                    on_ready = None
                closing = feed.closed  # before take(): nothing is put after close()
                for job_id, payload, priority in feed.take():
                    started[job_id] = time.monotonic()
                    actions = self._submit(job_id, payload, priority)
                    self._do(actions, results, started, on_result)
                for job_id, reason in feed.take_cancels():
                    actions = self.core.cancel(job_id, reason, time.monotonic())
                    self._do(actions, results, started, on_result)
                if (closing and self.core.idle()) or feed.aborted:
                    break
                self._refresh()  # before waiting: in_flight() shows the stages just dispatched
                self._step(results, started, on_result, wake=feed)
                results.clear()
                self._refresh()
        finally:
            self._shutdown()

    def _start_stores(self) -> None:
        if self.stores is not None and not self.stores.handles:
            self.stores.start(node.node_id for node in cluster_nodes())

    def health(self) -> dict[str, Any]:
        """Each stage's state and the counters, as the local executor's ``health()`` (a
        snapshot the serving loop refreshes: any thread, any time); no ``store`` figures
        (arrays are in Ray's object store)."""
        return self._health

    def in_flight(self) -> dict[str, list[str]]:
        """Job id -> the stages running it now (a snapshot: any thread)."""
        return self._in_flight

    def _refresh(self) -> None:
        self._in_flight = {job.id: sorted(job.running) for job in self.core.jobs.values()}
        self._health = self._snapshot_health(self.core)

    def _snapshot_health(self, core: state.Core | None) -> dict[str, Any]:
        if core is None:
            stages = {
                name: {"state": "starting", "reason": None, "workers": s.replicas, "live": 0,
                       "restarts": 0}
                for name, s in self.stages.items()
            }  # fmt: skip
            return {"stages": stages, "counters": dict.fromkeys(state.Core.COUNTERS, 0)}
        stages = core.health(time.monotonic())
        for name, figures in stages.items():
            figures.update(done=self.stage_jobs[name], failed=self.stage_failed[name],
                           busy_seconds=self.stage_seconds[name],
                           latency=self.stage_latency[name].snapshot())  # fmt: skip
        return {"stages": stages, "counters": dict(core.counters)}

    def _step(self, results, started, on_result, wake: JobFeed | None = None) -> None:
        now = time.monotonic()
        deadline = self.core.next_deadline()
        timeout = 0.5 if deadline is None else min(0.5, max(0.0, deadline - now))
        if wake is not None and self._calls:
            # Ray cannot wait on the feed beside its objects: a job put while calls are in
            # flight waits this long at most
            timeout = min(timeout, SERVE_POLL)
        for when, call in list(self._later):
            if when <= now:
                self._later.remove((when, call))
                self._call(call)
            else:
                timeout = min(timeout, when - now)
        due = self.stores.due() if self.stores is not None else None
        if due is not None:
            if due <= 0:
                self.stores.flush()
            else:
                timeout = min(timeout, due)
        if self._calls:
            import ray

            pending = list(self._calls)
            ready, rest = ray.wait(pending, num_returns=1, timeout=timeout)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                call = self._calls.pop(ref, None)  # None: dropped with its actor just now
                if call is not None:
                    self._on_return(ref, call, results, started, on_result)
        elif wake is not None:
            select.select([wake.fileno()], [], [], timeout)
        else:
            time.sleep(timeout)
        self._do(self.core.tick(time.monotonic()), results, started, on_result)

    def _on_return(self, ref, call: _Call, results, started, on_result) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        if self.actors.get(call.worker) is not call.handle:
            return  # a call to an actor killed since (its worker was restarted)
        wid, now = call.worker, time.monotonic()
        try:
            outcome = ray.get(ref)
        except ActorUnavailableError as exc:  # e.g. its node went: Ray may restart it
            if call.attempt < self.limits.max_restarts:
                delay = self.limits.restart_backoff * 2.0**call.attempt
                delay = min(self.limits.restart_backoff_max, delay)
                log.warning(
                    "actor_unavailable", worker=wid, job=call.job, retry_in=delay,
                    reason=_first_line(exc),
                )  # fmt: skip
                self._later.append(
                    (now + delay, dataclasses.replace(call, attempt=call.attempt + 1))
                )
                return
            actions = self._died(wid, exc, now)
        except RayActorError as exc:
            actions = self._died(wid, exc, now)
        else:
            if call.kind == "start":
                if isinstance(outcome, dict):
                    self._node_of[wid] = outcome["node"]
                    self._device(wid, outcome["device"])
                    actions = self.core.worker_ready(wid, now)
                else:
                    reason, details = outcome
                    log.error("worker_failed_to_start", worker=wid, reason=reason)
                    self._drop(wid)
                    actions = self.core.worker_died(
                        wid, f"failed to start: {reason}", now, fatal=True, details=details
                    )
            else:
                stage = self.core.workers[wid].stage
                self._ran(wid, stage, now, ok=outcome[0] == "done")
                if outcome[0] == "done":
                    values = self._values(stage, outcome[1], call.arrays)
                    actions = self.core.job_done(wid, call.job, values, now)
                else:
                    actions = self.core.job_failed(wid, call.job, outcome[1], outcome[2], now)
        self._do(actions, results, started, on_result)

    def _died(self, wid: str, exc: BaseException, now: float) -> list[state.Action]:
        """Ray gave up on ``wid``'s actor: the core hears of the death."""
        reason = f"actor died: {_first_line(exc)}"
        log.error("worker_died", worker=wid, stage=self.core.workers[wid].stage, reason=reason)
        self._drop(wid)
        return self.core.worker_died(wid, reason, now)

    def _values(self, stage: str, published, arrays) -> dict[str, state.Value]:
        ports = self.stages[stage].outputs
        values = {}
        for port, (kind, value, nbytes) in published.items():
            if kind == "shm":
                ref = ShmRef(*value)
            elif kind == "array":
                ref = ArrayRef(arrays[ports.index(port)], value)
            elif kind == "path":
                ref = PathRef(value)
            else:
                ref = ValRef(value)
            values[port] = state.Value(ref, nbytes)
        return values

    def _ran(self, wid: str, stage: str, now: float, *, ok: bool) -> None:
        job, dispatched, began = self._dispatched.pop(wid, (None, now, 0.0))
        if job is not None:
            end = time.time()
            self._timeline.setdefault(job, []).append(
                {"stage": stage, "start": began, "end": end, "ok": ok}
            )
            if self.provenance is not None:
                replica = self.core.workers[wid].replica
                self.provenance.ran(job, stage, replica, began, end, ok)
            if ok:
                self.stage_jobs[stage] += 1
                self.stage_seconds[stage] += now - dispatched
                self.stage_latency[stage].observe(now - dispatched)

    # ------------------------------------------------------------------- actions

    def _do(self, actions, results=None, started=None, on_result=None) -> None:
        for action in actions:
            if isinstance(action, state.Dispatch):
                self._dispatch(action)
            elif isinstance(action, state.StartWorker):
                self._start(action.worker, action.stage, action.replica)
            elif isinstance(action, state.KillWorker):
                log.warning("worker_killed", worker=action.worker, reason=action.reason)
                self._drop(action.worker)
            elif isinstance(action, state.Discard):
                self._discard(action.values)
            elif isinstance(action, (state.JobSucceeded, state.JobFailed)):
                try:
                    result = self._result(action, started, copy=on_result is None)
                except LostInput as exc:  # a leaf array on a node that died
                    self._discard(action.outputs.values())
                    action = state.JobFailed(action.job, "", f"{LostInput.__name__}: {exc}", "")
                    result = self._result(action, started, copy=False)
                if not result.ok and self._again(result, results, started, on_result):
                    continue
                self._payloads.pop(action.job, None)
                self._retried.pop(action.job, None)
                if isinstance(action, state.JobFailed) and action.stage in self.stage_failed:
                    self.stage_failed[action.stage] += 1  # raised, died, timed out, refused
                if on_result is not None:
                    on_result(result)
                    result.outputs = {}
                if isinstance(action, state.JobSucceeded):
                    self._discard(action.outputs.values())
                results.append(result)
            elif isinstance(action, state.Stalled):
                log.warning("pipeline_stalled", report=action.report)
            elif isinstance(action, state.StageBroken):
                log.error("stage_broken", stage=action.stage, reason=action.reason)
            elif isinstance(action, state.StageRecovered):
                log.info("stage_recovered", stage=action.stage)

    def _again(self, result: JobResult, results, started, on_result) -> bool:
        """Whether ``result``, a failure because an array the job needed was in the store
        of a node that died, is retried: the job submitted again from its payload, at most
        ``Limits.max_restarts`` times."""
        tries = self._retried.get(result.job, 0)
        if not (result.reason or "").startswith(LostInput.__name__) or (
            tries >= self.limits.max_restarts or result.job not in self._payloads
        ):
            return False
        self._retried[result.job] = tries + 1
        self.runs_again += 1
        log.warning("job_run_again", job=result.job, stage=result.stage, reason=result.reason)
        started.setdefault(result.job, time.monotonic() - result.seconds)
        self.core.forget(result.job)
        self._do(self._submit(result.job, *self._payloads[result.job]), results, started,
                 on_result)  # fmt: skip
        return True

    def _discard(self, values: Iterable[state.Value]) -> None:
        """Values nobody needs any more: those in our node stores freed (one way); those in
        Ray's object store go with the core's last reference to them."""
        if self.stores is not None:
            self.stores.discard((v.ref, v.nbytes) for v in values if isinstance(v.ref, ShmRef))

    def _dispatch(self, action: state.Dispatch) -> None:
        inputs = {port: value.ref for port, value in action.inputs.items()}
        if self.stores is not None:  # an array in another node's store: on its way already
            node = self._node_of.get(action.worker)
            for port, ref in inputs.items():
                if isinstance(ref, ShmRef) and ref.node != node:
                    moving = self.stores.towards(ref, node)
                    inputs[port] = ref if moving is ref else ArrayRef(moving, ref.metadata)
        self._dispatched[action.worker] = (action.job, time.monotonic(), time.time())
        so_far = None
        if self.provenance is not None and self.stages[action.stage].wants_provenance:
            so_far = self.provenance.snapshot(action.job, action.stage)
        args = (action.job, action.job, inputs, action.timeout, self._kept(action), so_far)
        n = 1 + len(self.stages[action.stage].outputs)
        handle = self.actors[action.worker]
        self._call(_Call("job", action.worker, handle, action.job, args=args, returns=n))

    def _device(self, wid: str, device: int | None) -> None:
        """The GPU Ray gave ``wid``'s actor (None: the CPU), for the jobs' provenance."""
        if self.provenance is not None:
            worker = self.core.workers[wid]
            devices = self.provenance.devices.setdefault(worker.stage, [])
            devices += [None] * (worker.replica + 1 - len(devices))
            devices[worker.replica] = device

    def _kept(self, action: state.Dispatch) -> tuple[str, ...]:
        """The outputs of this call to keep in our store on the worker's node: those whose
        every reader (each replica of each consuming stage, or the coordinator for a leaf) is
        on that node, as far as the actors said when ready. The rest go through Ray's object
        store, which moves them to the readers' nodes itself."""
        node = self._node_of.get(action.worker)
        if self.stores is None or node is None:
            return ()
        kept = []
        for port in self.stages[action.stage].outputs:
            readers = self._readers[(action.stage, port)]
            if not readers:
                local = node == self.stores.here
            else:
                local = all(
                    self._node_of.get(w.id) == node
                    for w in self.core.workers.values()
                    if w.stage in readers
                )
            if local:
                kept.append(port)
        return tuple(kept)

    def _call(self, call: _Call) -> None:
        """Make (or make again) ``call``; its first return object is awaited."""
        if self.actors.get(call.worker) is not call.handle:
            return  # its actor was killed meanwhile
        if call.kind == "start":
            self._calls[call.handle.ready.remote()] = call
            return
        refs = call.handle.run.options(num_returns=call.returns).remote(*call.args)
        refs = list(refs) if call.returns > 1 else [refs]
        self._calls[refs[0]] = dataclasses.replace(call, arrays=refs[1:])

    def _start(self, wid: str, stage_name: str, replica: int) -> None:
        stage = self.stages[stage_name]
        ref = stage.stage_ref
        if not isinstance(ref, str):
            ref = f"{ref.__module__}:{ref.__qualname__}"
        env = dict(stage.env[replica]) if replica < len(stage.env) else {}
        env = {k: v for k, v in env.items() if not k.startswith("CUDA_")}  # Ray sets these
        spec = ActorSpec(
            worker=wid, stage=stage_name, replica=replica, stage_ref=ref,
            arguments=dict(stage.arguments), outputs=tuple(stage.outputs),
            output_root=str(self.output_root), env=env, sys_path=self.sys_path,
            job_logs=self.job_logs, store_prefix=self.stores and self.stores.prefix,
        )  # fmt: skip
        res = self.resources[stage_name]
        where = self.reservation and self.reservation.strategy_for(stage_name, replica)
        handle = self._actor_class.options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, memory=res.memory or None,
            resources=dict(res.custom) or None, max_restarts=self.limits.max_restarts,
            max_task_retries=self.limits.max_restarts, scheduling_strategy=where or None,
        ).remote(spec)  # fmt: skip
        self.actors[wid] = handle
        self._call(_Call("start", wid, handle))

    def _drop(self, wid: str) -> None:
        import ray

        handle = self.actors.pop(wid, None)
        self._dispatched.pop(wid, None)
        self._node_of.pop(wid, None)
        for ref, call in list(self._calls.items()):
            if call.worker == wid:
                del self._calls[ref]
        self._later = [(when, call) for when, call in self._later if call.worker != wid]
        if handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)

    def _result(self, action, started, copy: bool) -> JobResult:
        import ray

        seconds = time.monotonic() - started.pop(action.job, time.monotonic())
        stages = self._timeline.pop(action.job, [])
        if isinstance(action, state.JobFailed):
            failure = {"stage": action.stage, "reason": action.reason, "details": action.details}
            record = self._finish(action.job, False, action.stage)
            return JobResult(action.job, False, seconds=seconds, stages=stages,
                             provenance=record, **failure)  # fmt: skip
        outputs: dict[tuple[str, str], Any] = {}
        for key, value in action.outputs.items():
            ref = value.ref
            if isinstance(ref, ArrayRef | ShmRef):
                array = self.stores.read(ref) if isinstance(ref, ShmRef) else ray.get(ref.ref)
                outputs[key] = (array.copy() if copy else array, dict(ref.metadata))
            elif isinstance(ref, PathRef):
                outputs[key] = Path(ref.path)
            else:
                outputs[key] = ref.value
        record = self._finish(action.job, True, None)
        return JobResult(action.job, True, outputs=outputs, seconds=seconds, stages=stages,
                         provenance=record)  # fmt: skip

    def _finish(self, job: str, ok: bool, stage: str | None) -> dict[str, Any] | None:
        """The job's provenance record (``JOB/provenance.json``), as the local executor's."""
        return None if self.provenance is None else self.provenance.finish(job, ok, stage)

    def _shutdown(self) -> None:
        """``cleanup`` in every idle actor (10 s at most), then every actor killed; the Ray
        runtime shut down if this executor started it."""
        import ray

        core = getattr(self, "core", None)
        idle = [
            handle.stop.remote()
            for wid, handle in self.actors.items()
            if core is not None and wid in core.workers and core.workers[wid].state == "idle"
        ]
        if idle:
            with contextlib.suppress(Exception):
                ray.wait(idle, num_returns=len(idle), timeout=10)
        for wid in list(self.actors):
            self._drop(wid)
        self._calls.clear()
        self._later.clear()
        if self.stores is not None:
            self.stores.stop()
        if self.provenance is not None:
            self.provenance.close()
        self.close()


def _interrupt(signum, frame) -> None:
    """SIGTERM stops a run as Ctrl-C does: actors killed, a runtime we started shut down."""
    raise KeyboardInterrupt(f"signal {signum}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ray_graph(graph: Any, replicas: Mapping[str, int] | None) -> tuple[Any, Any, list]:
    """The graph with ``replicas`` applied, its (machine-free) plan and its replica
    requests: Ray places the actors and check_fits refuses what its nodes cannot hold, so
    the plan is only the replicas (and its refusals of containers this machine cannot
    run)."""
    from dataflow.execution.build import plan_pipeline, replica_requests
    from dataflow.machine import Gpu, Inventory

    anywhere = Inventory(
        cpus=1 << 20, memory_mb=1 << 40, gpus=tuple(Gpu(i, "Ray", 1 << 20) for i in range(64))
    )
    graph, plan = plan_pipeline(graph, anywhere, replicas=replicas)
    return graph, plan, replica_requests(graph)


def cpus_requested(
    path: str | Path, params: Mapping[str, str], replicas: Mapping[str, int]
) -> float:
    """The CPUs a pipeline file's replicas request on Ray (0 if it cannot be loaded: its
    build reports why)."""
    from dataflow.errors import DataflowError
    from dataflow.pipeline import load_graph

    try:
        _, _, requests = _ray_graph(load_graph(str(path), dict(params)), replicas)
    except (DataflowError, OSError, KeyError, ValueError):
        return 0.0
    return sum(r.cpu for r in requests)


def plan_on_ray(
    graph: Any,
    *,
    address: str | None = None,
    replicas: Mapping[str, int] | None = None,
    placement: str | None = None,
) -> tuple[Any, RayPlan]:
    """``dataflow plan --executor ray``: (the graph with ``replicas`` applied, where each
    replica would go on the cluster at ``address``), or PlacementError as ``dataflow run``
    would refuse it. Without ``address``, the Ray runtime ``dataflow run`` would start is
    started (on loopback) to ask it, then shut down. With ``placement``, Ray itself reserves
    the replicas' placement group (then releases it): the nodes shown are Ray's."""
    import ray

    graph, _, requests = _ray_graph(graph, replicas)
    resources = resources_of(requests, graph)
    replicas_ = [(r.stage, r.replica, resources[r.stage]) for r in requests]
    started = connect(address, num_cpus=sum(r.cpu for r in requests))
    try:
        nodes = cluster_nodes()
        placed = check_fits(replicas_, [node.resources for node in nodes])
        if placement is not None:
            reservation = Reservation(replicas_, placement)
            try:
                on = reservation.nodes()
            finally:
                reservation.release()
            index = {node.node_id: i for i, node in enumerate(nodes)}
            placed = [(s, r, res, index.get(on[(s, r)], -1)) for s, r, res, _ in placed]
    finally:
        if started:
            ray.shutdown()
    position = {(r.stage, r.replica): i for i, r in enumerate(requests)}
    placed.sort(key=lambda p: position[p[:2]])  # the pipeline's order
    where = (
        f"the Ray cluster at {address}"
        if address
        else "a Ray runtime started here on 127.0.0.1 (as dataflow run starts one)"
    )
    return graph, RayPlan(where, nodes, placed, placement)


def build_ray_executor(
    graph: Any,
    output_root: Path,
    *,
    address: str | None = None,
    replicas: Mapping[str, int] | None = None,
    limits: state.Limits | None = None,
    memory_limit: int | None = None,
    extra_sys_path: Sequence[str] = (),
    placement: str | None = None,
    store_budget: int | str = "1GiB",
) -> tuple[Any, RayExecutor]:
    """A validated pipeline graph's executor on Ray (``dataflow run --executor ray``):
    (the graph with ``replicas`` applied, the executor). Connects to ``address`` (None: a
    local runtime on loopback, shut down when the run ends; a process connected already
    keeps its connection) and refuses (PlacementError) what the cluster's nodes cannot
    hold, before any actor starts."""
    from dataflow.execution.build import stage_defs

    graph, plan, requests = _ray_graph(graph, replicas)
    started = connect(address, num_cpus=sum(r.cpu for r in requests))
    try:
        executor = RayExecutor(
            stage_defs(graph, plan, memory_limit=memory_limit), output_root=output_root,
            limits=limits, resources=resources_of(requests, graph), extra_sys_path=extra_sys_path,
            placement=placement, store_budget=store_budget,
        )  # fmt: skip
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    executor.started_ray = started
    return graph, executor
