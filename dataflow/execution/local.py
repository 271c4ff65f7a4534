"""The local executor: the process layer around the pure core (``state.Core``).

The coordinator (this process) owns the run's store, one worker process per stage replica
(``spawn``), and one pipe to each. It turns what happens — messages, worker deaths, time — into
core events, and carries out the core's actions: dispatch a job to a worker, start or kill a
worker, discard values (delete store objects), report results. Data never passes through the
coordinator: workers exchange store object IDs, and the coordinator holds each in-flight
object's reference (handed over at seal) until every consumer is done with it.

A worker that dies is logged (``worker_died``, at error level, with its stage and reason) and
handed to the core, which restarts it with a backoff and marks its stage broken and recovered
(``stage_broken`` at error, ``stage_recovered`` at info; the rules are in ``state``). A worker
killed by SIGKILL while the memory cgroup's ``oom_kill`` count rose is reported as killed by the
kernel's out-of-memory killer. :meth:`LocalExecutor.health` and :meth:`LocalExecutor.in_flight`
are snapshots the run loop refreshes, safe to read from any thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from dataflow.execution import forkserver, state
from dataflow.execution.latency import Latency
from dataflow.execution.provenance import JobProvenance
from dataflow.execution.refs import ObjRef, PathRef, Ref, from_wire, to_wire
from dataflow.execution.worker import WorkerSpec, mib, worker_main
from dataflow.machine import oom_kills
from dataflow.progress import ProgressEvent, StartupProgress, log_event
from dataflow.store import Store

__all__ = ["JobFeed", "JobResult", "LocalExecutor", "StageDef"]

log = structlog.get_logger("dataflow.execution")


@dataclasses.dataclass(frozen=True)
class StageDef:
    """A stage as the executor runs it (built from a pipeline definition)."""

    name: str
    stage_ref: Any  # "package.module:Name" or a Stage class
    inputs: Mapping[str, tuple[str, str] | None]  # port -> (stage, output) or the job's input
    outputs: tuple[str, ...]
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    replicas: int = 1
    timeout: float | None = None
    env: Sequence[Mapping[str, str]] = ()  # per replica (CUDA_VISIBLE_DEVICES...), optional
    devices: Sequence[int | None] = ()  # per replica
    #: bytes a job may allocate in a worker beyond its footprint once prepared (None: no limit)
    memory_limit: int | None = None
    memory_source: str = "requests.memory"  # where the limit comes from, for messages
    #: its class reads ``ctx.provenance``: each dispatch carries the job's record so far
    wants_provenance: bool = False
    #: the pipeline's provenance (``provenance.pipeline_record``; the same for every stage)
    pipeline: Mapping[str, Any] | None = None


@dataclasses.dataclass
class JobResult:
    job: str
    ok: bool
    outputs: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    stage: str | None = None
    reason: str = ""
    details: str = ""
    seconds: float = 0.0
    #: when each stage ran the job: ``{"stage", "start", "end", "ok"}`` (Unix times), in order
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: what made it (``JOB/provenance.json``: :mod:`dataflow.execution.provenance`), when the
    #: stages were built with their pipeline's record
    provenance: dict[str, Any] | None = None


class _Proc:
    def __init__(self, process: mp.Process, conn) -> None:
        self.process = process
        self.conn = conn
        self.ready = False


class JobFeed:
    """Jobs handed to a serving executor (:meth:`LocalExecutor.serve`) from any thread.

    ``put(job_id, payload_dir)`` queues a job and wakes the executor; ``cancel(job_id,
    reason)`` fails a job put earlier wherever it is (its busy workers are killed and
    restarted; its result says ``reason``); ``close()`` asks it to finish the jobs it has and
    return; ``abort()`` to return at once (busy workers are killed, their jobs get no
    result). The executor waits on ``fileno()`` with its workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[str, str | Path | None, int]] = collections.deque()
        self._cancels: collections.deque[tuple[str, str]] = collections.deque()
        self._closed = False
        self.aborted = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def put(self, job_id: str, payload: str | Path | None, priority: int = 2) -> None:
        """Queue a job (``priority``: Clara's, see :mod:`dataflow.execution.state`)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"job {job_id!r}: the executor is stopping")
            self._items.append((job_id, payload, priority))
        self._wake()

    def cancel(self, job_id: str, reason: str) -> None:
        with self._lock:
            self._cancels.append((job_id, reason))
        self._wake()

    def take_cancels(self) -> list[tuple[str, str]]:
        with self._lock:
            items = list(self._cancels)
            self._cancels.clear()
        return items

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()

    def abort(self) -> None:
        self.aborted = True
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self) -> list[tuple[str, str | Path | None, int]]:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def fileno(self) -> int:
        return self._read

    def _wake(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def __del__(self) -> None:
        for fd in (getattr(self, "_read", None), getattr(self, "_write", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class LocalExecutor:
    """Runs jobs through stages as warm worker processes on this machine.

    ``run(jobs)`` takes ``(job_id, payload_dir)`` pairs and returns one :class:`JobResult`
    per job, in order; ``on_result`` is called as each result is known (in order). A leaf
    output (one no stage consumes) is in ``JobResult.outputs`` as ``(array, metadata)`` for a
    tensor, a string or number, or a path. With ``on_result``, arrays are zero-copy views
    valid during the call only, and the returned results keep no outputs (a long run must not
    hold every job's results in memory); without it, the returned results hold copies.
    """

    def __init__(
        self,
        stages: Sequence[StageDef],
        *,
        output_root: str | Path,
        limits: state.Limits | None = None,
        store_budget: int | str = "1GiB",
        log_format: str = "console",
        log_level: str = "WARNING",
        extra_sys_path: Sequence[str] = (),
        on_progress: Callable[[ProgressEvent, StartupProgress], None] | None = None,
        progress_context: Mapping[str, Any] | None = None,
    ) -> None:
        self.stages = {s.name: s for s in stages}
        #: start-up events (``dataflow.progress``) go here; None: logged, with progress_context
        self.on_progress = on_progress
        self.progress_context = dict(progress_context or {})
        self.startup = StartupProgress({s.name: s.replicas for s in stages})
        self.graph = state.Graph(
            {
                s.name: state.StageNode(
                    s.name, dict(s.inputs), tuple(s.outputs), s.replicas, s.timeout
                )
                for s in stages
            }
        )
        self.limits = limits or state.Limits()
        self.output_root = Path(output_root)
        self.store_budget = store_budget
        self.log_format, self.log_level = log_format, log_level
        self.sys_path = [*extra_sys_path, *sys.path]
        self.procs: dict[str, _Proc] = {}
        self.counters: dict[str, int] = {"worker_oom": 0}
        self._oom_kills = 0  # the memory cgroups' oom_kill count when last read
        self._health: dict[str, Any] = self._snapshot_health(None)
        self._in_flight: dict[str, list[str]] = {}
        self.stage_seconds: dict[str, float] = {s: 0.0 for s in self.stages}
        self.stage_jobs: dict[str, int] = {s: 0 for s in self.stages}
        self.stage_failed: dict[str, int] = {s: 0 for s in self.stages}
        self.stage_latency: dict[str, Latency] = {s: Latency() for s in self.stages}
        self._store_stats: dict[str, Any] = {}
        self._store_read = 0.0  # when _store_stats was taken (monotonic)
        #: worker -> (job, when it was dispatched: monotonic, and wall for the timeline)
        self._dispatched: dict[str, tuple[str, float, float]] = {}
        self._timeline: dict[str, list[dict[str, Any]]] = {}  # job -> its stages' runs
        pipeline = next((s.pipeline for s in stages if s.pipeline is not None), None)
        self.provenance = (
            None if pipeline is None else
            JobProvenance(pipeline, {s.name: s.devices for s in stages}, self.output_root)
        )  # fmt: skip
        self.store: Store | None = None
        #: keep each job's log per stage (``OUTPUT_ROOT/<job>/.logs/<stage>.log``): the service
        self.job_logs = False
        #: the stages' modules, imported once in the fork server its workers are forked from
        self._preload = sorted(
            {
                s.stage_ref.partition(":")[0]
                for s in stages
                if isinstance(s.stage_ref, str) and not any(d is not None for d in s.devices)
            }
        )
        forkserver.want(self._preload)

    # ----------------------------------------------------------------------- run

    def run(
        self,
        jobs: Iterable[tuple[str, str | Path | None]],
        on_result: Callable[[JobResult], None] | None = None,
    ) -> list[JobResult]:
        results: list[JobResult] = []
        started: dict[str, float] = {}
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with self._running(ordered=True, interrupted_by=(KeyboardInterrupt,)):
                for job_id, payload in jobs:
                    self._submit(job_id, payload, 2, results, started, on_result)
                while not self.core.idle():
                    self._step(results, started, on_result)
                    self._refresh()
        except KeyboardInterrupt:
            log.warning("run_interrupted", jobs_done=len(results))
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return results

    def serve(
        self,
        feed: JobFeed,
        on_result: Callable[[JobResult], None],
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Keep the workers warm and stream every job put into ``feed`` through them until
        ``feed.close()`` and the jobs in flight are done. ``on_ready`` is called once every
        worker has started and run ``prepare`` (jobs put before are queued meanwhile).
        ``on_result`` is called in this thread as each result is known (outputs are zero-copy
        views, valid during the call).
        Signals are left to the caller; an exception (KeyboardInterrupt) stops at once."""
        results: list[JobResult] = []
        started: dict[str, float] = {}
        # results each as it is known; any exception stops at once
        with self._running(ordered=False, interrupted_by=(BaseException,)) as running:
            while True:
                if on_ready is not None and self._settled():
                    on_ready()  # every worker has run prepare (or failed to: see health())
                    on_ready = None
                closing = feed.closed  # before take(): nothing is put after close()
                for job_id, payload, priority in feed.take():
                    self._submit(job_id, payload, priority, results, started, on_result)
                for job_id, reason in feed.take_cancels():
                    actions = self.core.cancel(job_id, reason, time.monotonic())
                    self._do(actions, results, started, on_result)
                if (closing and self.core.idle()) or feed.aborted:
                    running.interrupted = feed.aborted
                    break
                self._refresh()  # before waiting: in_flight() shows the stages just dispatched
                self._step(results, started, on_result, wake=feed)
                results.clear()
                self._refresh()  # and what the step changed, before on_ready is called

    @contextlib.contextmanager
    def _running(self, *, ordered: bool, interrupted_by: tuple[type[BaseException], ...]):
        """What ``run`` and ``serve`` share: the output folder, a store, the scheduling core
        (``ordered``: results in submission order), the workers started; at the end every
        worker stopped and the store with them — at once (busy workers killed) after one of
        ``interrupted_by`` or when the caller sets ``.interrupted`` on what this yields."""
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.store = Store.start(budget=self.store_budget, name="coordinator")
        self.core = state.Core(self.graph, self.limits, ordered=ordered)
        self._oom_kills = oom_kills()
        self.startup = StartupProgress({s.name: s.replicas for s in self.stages.values()})
        self._leaders: dict[str, str] = {}  # stage code -> the worker starting it first
        self._deferred: dict[str, list[tuple[str, str, int]]] = {}
        self._warmed: set[str] = set()
        running = types.SimpleNamespace(interrupted=False)
        try:
            self._do(self.core.start(time.monotonic()))
            yield running
        except interrupted_by:
            running.interrupted = True
            raise
        finally:
            self._shutdown(interrupted=running.interrupted)

    def _submit(self, job_id, payload, priority, results, started, on_result) -> None:
        started[job_id] = time.monotonic()
        if self.provenance is not None:
            self.provenance.begin(job_id, payload, time.time())
        value = state.Value(PathRef(str(payload)), 0) if payload else None  # a Path is true
        self._do(
            self.core.submit(job_id, value, time.monotonic(), priority),
            results, started, on_result,
        )  # fmt: skip

    def _step(self, results, started, on_result, wake: JobFeed | None = None) -> None:
        now = time.monotonic()
        deadline = self.core.next_deadline()
        timeout = 0.5 if deadline is None else min(0.5, max(0.0, deadline - now))
        waitables: dict[Any, tuple[str, str]] = {}
        if wake is not None:
            waitables[wake.fileno()] = ("", "wake")
        for wid, proc in self.procs.items():
            waitables[proc.conn] = (wid, "conn")
            waitables[proc.process.sentinel] = (wid, "exit")
        for ready in mpc.wait(list(waitables), timeout):
            wid, what = waitables[ready]
            if what == "wake":
                continue
            proc = self.procs.get(wid)
            if proc is None or (what == "conn" and proc.conn is not ready):
                continue
            if what == "conn":
                try:
                    message = proc.conn.recv()
                except (EOFError, OSError):
                    continue  # the exit sentinel reports it
                self._on_message(wid, message, results, started, on_result)
            elif proc.process.sentinel is ready and not proc.process.is_alive():
                proc.process.join()
                self._release(wid, warmed=False)
                reason = self._death_reason(wid, proc.process.exitcode)
                self._drop(wid)
                actions = self.core.worker_died(wid, reason, time.monotonic())
                self._log_death("worker_died", wid, reason)
                self._do(actions, results, started, on_result)
        self._do(self.core.tick(time.monotonic()), results, started, on_result)

    def _death_reason(self, wid: str, code: int | None) -> str:
        reason = _exit_reason(code)
        if code != -signal.SIGKILL:
            return reason
        kills, self._oom_kills = self._oom_kills, oom_kills()
        if self._oom_kills <= kills:
            return reason
        self.counters["worker_oom"] += 1
        stage = self.stages[self.core.workers[wid].stage]
        limit = (
            f"; stage {stage.name!r} is limited to {mib(stage.memory_limit)} "
            f"({stage.memory_source})"
            if stage.memory_limit is not None
            else ""
        )
        return f"out of memory: killed by the kernel's OOM killer ({reason}){limit}"

    def _log_death(self, event: str, wid: str, reason: str) -> None:
        w = self.core.workers[wid]
        restart_in = 0.0 if w.restart_at is None else w.restart_at - time.monotonic()
        log.error(
            event, worker=wid, stage=w.stage, reason=reason, deaths_in_a_row=w.failures_in_a_row,
            restart_in=round(max(0.0, restart_in), 1),
        )  # fmt: skip

    def _settled(self) -> bool:
        """Every worker has either come up or failed and waits for its restart."""
        return all(w.up or w.state == "waiting" for w in self.core.workers.values())

    def health(self) -> dict[str, Any]:
        """Each stage's state and the counters since the start (any thread, any time):
        ``{"stages": {name: {"state", "reason", "workers", "live", "restarts"}},
        "counters": {"worker_died", "worker_oom", "stage_broken", "stage_recovered",
        "stage_timeouts", "job_timeouts"}}`` (states: :meth:`state.Core.health`)."""
        return self._health

    def in_flight(self) -> dict[str, list[str]]:
        """Job id -> the stages running it now, for every job admitted and not finished (an
        empty list: between stages). A snapshot: safe from any thread."""
        return self._in_flight

    def _refresh(self) -> None:
        core = self.core
        self._in_flight = {job.id: sorted(job.running) for job in core.jobs.values()}
        self._health = self._snapshot_health(core)

    def _snapshot_health(self, core: state.Core | None) -> dict[str, Any]:
        if core is None:
            stages = {
                s.name: {
                    "state": "starting", "reason": None, "workers": s.replicas, "live": 0,
                    "restarts": 0,
                }
                for s in self.stages.values()
            }  # fmt: skip
            counters: dict[str, int] = dict.fromkeys(state.Core.COUNTERS, 0)
        else:
            stages, counters = core.health(time.monotonic()), dict(core.counters)
            for name, figures in stages.items():
                figures.update(done=self.stage_jobs[name], failed=self.stage_failed[name],
                               busy_seconds=self.stage_seconds[name],
                               latency=self.stage_latency[name].snapshot())  # fmt: skip
        counters["worker_oom"] = self.counters["worker_oom"]
        store = self._read_store() if core is not None else {}
        return {"stages": stages, "counters": counters, "store": store}

    def _read_store(self) -> dict[str, Any]:
        """The store's figures (budget, used, objects, evictions, waits...), read at most once
        a second, on the executor's thread (the coordinator's store connection is its own)."""
        now = time.monotonic()
        if self.store is not None and now - self._store_read >= 1.0:
            self._store_read = now
            try:
                self._store_stats = self.store.stats()
            except Exception as exc:  # stopping: keep the last figures
                log.debug("store_stats_unread", error=repr(exc))
        return self._store_stats

    def _on_message(self, wid, message, results, started, on_result) -> None:
        now = time.monotonic()
        kind = message[0]
        if kind == "ready":
            self.procs[wid].ready = True
            self._release(wid)
            self._progress(self.startup.worker_ready(self.core.workers[wid].stage))
            self._do(self.core.worker_ready(wid, now), results, started, on_result)
        elif kind == "done":
            _, job_id, outputs = message
            stage = self.core.workers[wid].stage
            seconds = self._ran(wid, stage, now, ok=True)
            self.stage_jobs[stage] += 1
            self.stage_seconds[stage] += seconds
            self.stage_latency[stage].observe(seconds)
            values = {
                port: state.Value(from_wire(ref), nbytes) for port, (ref, nbytes) in outputs.items()
            }
            self._do(self.core.job_done(wid, job_id, values, now), results, started, on_result)
        elif kind == "failed":
            _, job_id, reason, details = message
            self._ran(wid, self.core.workers[wid].stage, now, ok=False)
            self._do(
                self.core.job_failed(wid, job_id, reason, details, now), results, started, on_result
            )
        elif kind == "fatal":
            _, reason, details = message
            self._release(wid, warmed=False)
            self.counters["fatal"] = self.counters.get("fatal", 0) + 1
            proc = self._drop(wid)
            if proc is not None:
                proc.process.join(5)
            if self.core.workers[wid].up:  # it was serving: a crash (SystemExit in a job...)
                actions = self.core.worker_died(wid, reason, now)
                self._log_death("worker_died", wid, reason)
            else:
                actions = self.core.worker_died(
                    wid, f"failed to start: {reason}", now, fatal=True, details=details
                )
                self._log_death("worker_failed_to_start", wid, reason)
                self._progress(self.startup.worker_failed(self.core.workers[wid].stage))
            self._do(actions, results, started, on_result)

    # ------------------------------------------------------------------- actions

    def _do(self, actions, results=None, started=None, on_result=None) -> None:
        for action in actions:
            if isinstance(action, state.Dispatch):
                proc = self.procs[action.worker]
                inputs = {port: to_wire(value.ref) for port, value in action.inputs.items()}
                self._dispatched[action.worker] = (action.job, time.monotonic(), time.time())
                job_name = action.job
                message = ("job", action.job, job_name, inputs, action.timeout)
                if self.provenance is not None and self.stages[action.stage].wants_provenance:
                    message += (self.provenance.snapshot(action.job, action.stage),)
                proc.conn.send(message)
            elif isinstance(action, state.StartWorker):
                self._start_or_defer(action.worker, action.stage, action.replica)
            elif isinstance(action, state.KillWorker):
                log.warning("worker_killed", worker=action.worker, reason=action.reason)
                proc = self._drop(action.worker)
                if proc is not None:
                    proc.process.kill()
                    proc.process.join()
            elif isinstance(action, state.Discard):
                self._discard(action.values)
            elif isinstance(action, (state.JobSucceeded, state.JobFailed)):
                if isinstance(action, state.JobFailed) and action.stage in self.stage_failed:
                    self.stage_failed[action.stage] += 1  # raised, died, timed out, refused
                result = self._result(action, started, copy=on_result is None)
                if on_result is not None:
                    on_result(result)  # sees zero-copy views of the results...
                    result.outputs = {}  # ...which go now: a long run must not pile them up
                if isinstance(action, state.JobSucceeded):
                    self._discard(tuple(action.outputs.values()))
                results.append(result)
            elif isinstance(action, state.Stalled):
                log.warning("pipeline_stalled", report=action.report)
            elif isinstance(action, state.StageBroken):
                log.error(
                    "stage_broken", stage=action.stage, reason=action.reason,
                    retry_in=round(action.retry_in, 1),
                )  # fmt: skip
            elif isinstance(action, state.StageRecovered):
                log.info("stage_recovered", stage=action.stage)

    def _ran(self, wid: str, stage: str, now: float, *, ok: bool) -> float:
        """A worker finished (or failed) its job: that stage's run goes to the job's timeline;
        its seconds."""
        job, dispatched, began = self._dispatched.pop(wid, (None, now, 0.0))
        if job is not None:
            end = time.time()
            self._timeline.setdefault(job, []).append(
                {"stage": stage, "start": began, "end": end, "ok": ok}
            )
            if self.provenance is not None:
                self.provenance.ran(job, stage, self.core.workers[wid].replica, began, end, ok)
        return now - dispatched

    def _result(self, action, started, copy: bool) -> JobResult:
        seconds = time.monotonic() - started.pop(action.job, time.monotonic())
        stages = self._timeline.pop(action.job, [])
        failed = isinstance(action, state.JobFailed)
        record = None
        if self.provenance is not None:
            record = self.provenance.finish(action.job, not failed, getattr(action, "stage", None))
        if failed:
            return JobResult(
                action.job, False, stage=action.stage, reason=action.reason,
                details=action.details, seconds=seconds, stages=stages, provenance=record,
            )  # fmt: skip
        outputs = {key: self._materialize(value.ref, copy) for key, value in action.outputs.items()}
        return JobResult(action.job, True, outputs=outputs, seconds=seconds, stages=stages,
                         provenance=record)  # fmt: skip

    def _materialize(self, ref: Ref, copy: bool) -> Any:
        if isinstance(ref, ObjRef):
            view = self.store.get(ref.id)
            if view.kind == "tensor":
                return (view.array.copy() if copy else view.array, view.metadata)
            if view.kind == "arrow":
                return (view.to_arrow(), view.metadata)
            return (bytes(view.buffer), view.metadata)
        if isinstance(ref, PathRef):
            return Path(ref.path)
        return ref.value

    def _discard(self, values: Iterable[state.Value]) -> None:
        ids = [v.ref.id for v in values if isinstance(v.ref, ObjRef)]
        if ids:  # one way: the coordinator never waits on the store for this (one per hop)
            self.store.discard(ids)

    def _progress(self, events: list[ProgressEvent]) -> None:
        for event in events:
            if self.on_progress is not None:
                self.on_progress(event, self.startup)
            else:
                log_event(event, log, **self.progress_context)

    def _code_key(self, stage_name: str, replica: int) -> str:
        stage = self.stages[stage_name]
        device = stage.devices[replica] if replica < len(stage.devices) else None
        ref = stage.stage_ref
        name = ref if isinstance(ref, str) else f"{ref.__module__}:{ref.__qualname__}"
        return f"{name}@{'gpu' if device is not None else 'cpu'}"

    def _start_or_defer(self, wid: str, stage_name: str, replica: int) -> None:
        """Start a worker; but while another worker of the same stage code (several
        ``Threshold`` stages, a stage's replicas) starts for the first time, wait for it: it
        compiles the Numba kernels and writes them to the on-disk cache, which the others then
        load in a fraction of the time, instead of each compiling them again at once."""
        key = self._code_key(stage_name, replica)
        leader = self._leaders.get(key)
        if key not in self._warmed and leader is not None and leader != wid:
            self._deferred.setdefault(key, []).append((wid, stage_name, replica))
            return
        if key not in self._warmed:
            self._leaders[key] = wid
        self._start_worker(wid, stage_name, replica)

    def _release(self, wid: str, warmed: bool = True) -> None:
        """``wid`` came up (or failed to): start the workers waiting for it."""
        for key, leader in list(self._leaders.items()):
            if leader != wid:
                continue
            del self._leaders[key]
            if warmed:
                self._warmed.add(key)
            waiting = self._deferred.pop(key, [])
            if not warmed and waiting:  # the next one leads: it may fail for its own reason
                first, *waiting = waiting
                self._leaders[key] = first[0]
                self._deferred[key] = waiting
                self._start_worker(*first)
                continue
            for args in waiting:
                self._start_worker(*args)

    def _start_worker(self, wid: str, stage_name: str, replica: int) -> None:
        self._progress(self.startup.worker_starting(stage_name))
        stage = self.stages[stage_name]
        env = dict(stage.env[replica]) if replica < len(stage.env) else {}
        device = stage.devices[replica] if replica < len(stage.devices) else None
        spec = WorkerSpec(
            worker=wid, stage=stage_name, replica=replica, stage_ref=stage.stage_ref,
            arguments=dict(stage.arguments), store_address=self.store.address,
            owner_id=self.store.client_id, output_root=str(self.output_root), env=env,
            device=device, log_format=self.log_format, log_level=self.log_level,
            memory_limit=stage.memory_limit, memory_source=stage.memory_source,
            job_logs=self.job_logs,
        )  # fmt: skip
        ctx = forkserver.context_for(env, device, self._preload)
        forked = ctx.get_start_method() == "forkserver"
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=worker_main,
            args=(spec, child, self.sys_path, forkserver.Inherit.now(env) if forked else None),
            name=f"dataflow {wid}", daemon=True,
        )  # fmt: skip
        process.start()
        child.close()
        self.procs[wid] = _Proc(process, parent)

    def _drop(self, wid: str) -> _Proc | None:
        proc = self.procs.pop(wid, None)
        if proc is not None:
            proc.conn.close()
        self._dispatched.pop(wid, None)
        return proc

    def _shutdown(self, interrupted: bool = False) -> None:
        """Stop every worker (``cleanup`` runs in idle ones), then the store. Interrupted: busy
        workers are killed at once rather than waited for."""
        if self.store is None:
            return
        core = getattr(self, "core", None)
        for wid, proc in self.procs.items():
            busy = core is not None and wid in core.workers and core.workers[wid].state == "busy"
            if interrupted and busy:
                proc.process.kill()
                continue
            try:
                proc.conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join()
            proc.conn.close()
        self.procs.clear()
        self.store.stop()
        self.store = None
        if self.provenance is not None:
            self.provenance.close()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


def stage_env_for(devices: Sequence[Sequence[int]]) -> list[dict[str, str]]:
    """CUDA_VISIBLE_DEVICES per replica from assigned GPU indices ("" hides all GPUs)."""
    return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, d))} for d in devices]
