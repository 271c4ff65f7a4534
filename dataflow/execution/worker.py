"""A stage worker: one process that runs one replica of one stage for the whole run.

It connects to the run's store, builds the stage (constructor arguments from the pipeline),
calls ``prepare`` once, then runs each job the coordinator sends it and answers with the
job's outputs (store object IDs, small values or paths) or the failure. ``cleanup`` runs when
the coordinator says stop. SIGINT is ignored: on Ctrl-C the coordinator stops the workers.

Messages on the worker's pipe (pickled tuples):

- coordinator -> worker: ``("job", job_id, job_name, inputs, timeout)`` (and the job's
  provenance so far as a sixth item, for a stage that ``wants_provenance``), ``("stop",)``
- worker -> coordinator: ``("ready",)``, ``("done", job_id, outputs)``,
  ``("failed", job_id, reason, traceback)``, ``("fatal", reason, traceback)`` (then exits)

A value on an edge is a reference (:mod:`dataflow.execution.refs`): ``ObjRef(id, kind)`` for a
store object (arrays, Arrow), ``ValRef(value)`` for a string or a primitive, ``PathRef(dir)``
for a stream; on the pipe, as plain tuples (``refs.to_wire``).

Memory limit (``WorkerSpec.memory_limit``, bytes): once ``prepare`` has run, the worker's
address space is measured and ``RLIMIT_AS`` set to it plus the limit, so an allocation beyond
fails at once (``MemoryError``) instead of spending the host's memory; the job fails with
"out of memory: stage 'x' is limited to N MiB (requests.memory)" and the worker takes the next
job. The store's arena, the code and the model ``prepare`` loaded are in the measured
footprint; glibc's malloc arenas are capped at 2 so that threads do not reserve address space
by the 64 MiB. A worker with a GPU is not limited this way (CUDA reserves far more address
space than it uses); its stage still sees the limit as ``ctx.memory_limit``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import importlib
import os
import resource
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.errors import DataflowError
from dataflow.execution.binding import job_log_path, job_scope, run_job
from dataflow.execution.refs import ObjRef, PathRef, Ref, ValRef, from_wire, to_wire
from dataflow.logs import job_note
from dataflow.stage import Port, Stage, StageContext

__all__ = ["WorkerSpec", "limit_address_space", "mib", "resolve_stage", "worker_main"]

MIB = 1 << 20
_M_ARENA_MAX = -8  # glibc's mallopt parameter


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    worker: str  # "stage#replica"
    stage: str
    replica: int
    stage_ref: Any  # "package.module:Name" or the Stage class itself
    arguments: Mapping[str, Any]
    store_address: str
    owner_id: int  # the coordinator's store client ID: outputs are handed to it
    output_root: str  # job directories for stream outputs live under it
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    device: int | None = None
    log_format: str = "console"
    log_level: str = "WARNING"
    memory_limit: int | None = None  # bytes beyond the prepared worker's footprint
    memory_source: str = "requests.memory"
    job_logs: bool = False  # keep each job's log: OUTPUT_ROOT/<job>/.logs/<stage>.log


def resolve_stage(ref: Any) -> type[Stage]:
    """A Stage class from ``"package.module:Name"`` (or the class itself)."""
    if isinstance(ref, type) and issubclass(ref, Stage):
        return ref
    module_name, _, attr = str(ref).partition(":")
    if not attr:
        raise DataflowError(f"stage {ref!r} must be written 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataflowError(f"cannot import stage module {module_name!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise DataflowError(f"module {module_name!r} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        raise DataflowError(f"{ref!r} is not a Stage class (nor a @function_stage function)")
    return obj


class _Job:
    """What one job needs while it runs in this worker: its allocations, the input views it
    holds, and its edges to the store (:class:`dataflow.execution.binding.Edges`)."""

    def __init__(self, worker: Worker, job_id: str, job_name: str) -> None:
        self.worker = worker
        self.id, self.name = job_id, job_name
        self.allocations: dict[int, Any] = {}  # id(array) -> WritableObject
        self.views: list[Any] = []

    def allocate(self, port: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        spec = self.worker.instance.outputs.get(port)
        if spec is None or spec.type != "array":
            raise DataflowError(
                f"stage {self.worker.spec.stage!r} has no array output {port!r} to allocate"
            )
        obj = self.worker.client.create(shape, dtype or spec.element_type, timeout=None)
        self.allocations[id(obj.array)] = obj
        return obj.array

    def output_dir(self, port: str) -> Path:
        path = Path(self.worker.spec.output_root) / self.name / self.worker.spec.stage / port
        path.mkdir(parents=True, exist_ok=True)
        return path

    # The job's edges (dataflow.execution.binding.Edges): inputs from the store, outputs
    # published into it.

    def read(self, port: str, ref: Ref, spec: Port) -> tuple[Any, Mapping[str, Any] | None]:
        if isinstance(ref, PathRef):
            return Path(ref.path), None
        if isinstance(ref, ValRef):
            return ref.value, None
        view = self.worker.client.get(ref.id, timeout=30)
        self.views.append(view)
        if view.kind == "tensor":
            value = view.array
        elif view.kind == "arrow":
            value = view.to_arrow()
        elif view.kind == "cuda":
            value = view.device_array()
        else:
            value = bytes(view.buffer) if spec.type == "string" else view
        return value, view.metadata

    def write(self, port: str, value: Any, spec: Port) -> tuple[Ref, int]:
        """(the reference downstream gets, the bytes it stands for)."""
        if spec.type == "array":
            array, meta = value.array, value.metadata
            obj = self.allocations.pop(id(array), None)
            if obj is None:  # a plain NumPy array: copy it into the store
                obj = self.worker.client.create(array.shape, array.dtype, timeout=None)
                obj.array[...] = array
            obj.seal(transfer_to=self.worker.spec.owner_id, metadata=meta)
            return ObjRef(obj.id, "tensor"), array.nbytes
        if spec.type == "stream":
            return PathRef(str(value)), 0
        return ValRef(value), len(value) if isinstance(value, str) else 8

    def close(self) -> None:
        """Objects allocated and not published are aborted; input views let go."""
        for obj in self.allocations.values():
            if not obj.sealed:
                obj.abort()
        self.views.clear()


class Worker:
    def __init__(self, spec: WorkerSpec, conn) -> None:
        from dataflow.store import connect

        self.spec = spec
        self.conn = conn
        self.client = connect(spec.store_address, name=f"worker {spec.worker}")
        self.stage_cls = resolve_stage(spec.stage_ref)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"dataflow-{spec.stage}-"))
        self.job: _Job | None = None
        self.provenance: dict[str, Any] | None = None  # the job's so far (wants_provenance)
        self.ctx = StageContext(
            stage=spec.stage,
            replica=spec.replica,
            device=spec.device,
            scratch_dir=self.scratch,
            allocator=lambda port, shape, dtype: self.job.allocate(port, shape, dtype),
            memory_limit=spec.memory_limit,
            output_dirs=lambda port: self.job.output_dir(port),
        )
        self.instance = self.stage_cls(**spec.arguments)

    def run(self) -> None:
        self.instance.prepare(self.ctx)
        if self.spec.memory_limit is not None and self.spec.device is None:
            limit_address_space(self.spec.memory_limit)
        self.conn.send(("ready",))
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "stop":
                    break
                job_id, job_name, wired, timeout = message[1:5]
                self.provenance = message[5] if len(message) > 5 else None
                inputs = {port: from_wire(ref) for port, ref in wired.items()}
                self.conn.send(self.run_job(job_id, job_name, inputs, timeout))
        finally:
            try:
                self.instance.cleanup(self.ctx)
            finally:
                shutil.rmtree(self.scratch, ignore_errors=True)
                self.client.close()

    def run_job(self, job_id: str, job_name: str, inputs: Mapping[str, Ref], timeout) -> tuple:
        payload = next((Path(v.path) for v in inputs.values() if type(v) is PathRef), None)
        if payload is None and not self.spec.job_logs:  # the common case, on every hop
            return self._run_job(job_id, job_name, inputs, None, timeout)  # no frame more
        log = job_log_path(self.spec.output_root, job_name, self.spec.stage, self.spec.job_logs)
        with job_scope(payload, log):
            outcome = self._run_job(job_id, job_name, inputs, payload, timeout)
            if log is not None and outcome[0] == "failed":  # in the operator's log too
                job_note(f"job failed: {outcome[2]}\n{outcome[3]}")
            return outcome

    def _run_job(self, job_id, job_name, inputs, payload, timeout) -> tuple:
        job = self.job = _Job(self, job_id, job_name)
        try:
            _, published = run_job(
                self.instance, self.ctx, job, inputs, job_id=job_id, job_name=job_name,
                payload_dir=payload, timeout=timeout, provenance=self.provenance,
            )  # fmt: skip
            if self.ctx.outputs_noted:  # the instances it wrote: for the job's provenance
                from dataflow.execution.provenance import write_notes

                job_dir = Path(self.spec.output_root) / job_name
                write_notes(job_dir, self.spec.stage, self.ctx.outputs_noted)
            return ("done", job_id, {p: (to_wire(r), n) for p, (r, n) in published.items()})
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if self.spec.memory_limit is not None and _out_of_memory(exc):
                reason = (
                    f"out of memory: stage {self.spec.stage!r} is limited to "
                    f"{mib(self.spec.memory_limit)} ({self.spec.memory_source}); {reason}"
                )
            return ("failed", job_id, reason, traceback.format_exc())
        finally:
            job.close()
            self.job = None


def mib(nbytes: int) -> str:
    """``512 MiB``, ``1.5 MiB``: a byte count for messages."""
    value = nbytes / MIB
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"


def limit_address_space(limit: int) -> int:
    """Let this process map at most ``limit`` bytes more than it has mapped now (RLIMIT_AS,
    never raised above a limit already in force); the soft limit set. glibc's malloc arenas
    are capped first: each thread's arena would otherwise reserve 64 MiB of address space."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: nothing to cap
        pass
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = mapped + limit
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            wanted = min(wanted, bound)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    return wanted


def _out_of_memory(exc: BaseException | None) -> bool:
    """The failure (or one it came from) is an allocation refused."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def worker_main(spec: WorkerSpec, conn, sys_path: list[str], inherit: Any = None) -> None:
    """Entry point of a worker process (``multiprocessing`` target). ``inherit``: the worker
    was forked from the fork server and takes the coordinator's environment, folder and
    output from it (``forkserver.after_fork``)."""
    # The coordinator stops us: a Ctrl-C in a terminal, or systemd's SIGTERM to every process
    # of the service at once, must not kill a job it lets finish within its shutdown grace.
    # Were the coordinator killed, the pipe to it breaks and we exit; SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if inherit is not None:
        from dataflow.execution.forkserver import after_fork

        after_fork(inherit)
    os.environ.update(spec.env)  # CUDA_VISIBLE_DEVICES before any CUDA library loads
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    from dataflow.logs import configure_logging

    configure_logging(spec.log_level, json=spec.log_format == "json", job_logs=spec.job_logs)
    try:
        worker = Worker(spec, conn)
    except BaseException as exc:
        conn.send(("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        sys.exit(1)
    try:
        worker.run()
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away: nothing to report to
    except BaseException as exc:
        try:
            conn.send(("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass
        sys.exit(1)
