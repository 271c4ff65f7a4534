"""The long-running service behind ``dataflow serve``: warm pipelines, connectors, job records.

- Every configured pipeline is loaded, placed and started once (a :class:`LocalExecutor`
  serving a :class:`JobFeed`, on its own thread) and stays warm.
- Connectors (``dataflow.connectors`` entry points: ``connectors.dicom`` registers ``dicom``)
  are started after the pipelines and stopped before them. A connector hands work in with
  :meth:`ServiceHost.submit` and takes registered results out through its ``export`` method
  for the agents it serves (``ClaraSCU`` for DICOM).
- Job records live in ``STATE/jobs.db`` (:mod:`dataflow.service.jobs`); a job is recorded
  before it runs, and its end before its results are exported, so a restart resumes: jobs
  that were queued or running run again, exports not yet handed over are handed over.
- A watcher thread takes ``queued`` jobs another process recorded while the service runs
  (``dataflow jobs --retry``): each is taken once, by a conditional update of its record.
- Limits (``limits:``, per pipeline ``pipelines.NAME.limits``): every stage and job has a
  time-out and every worker a memory limit by default. On :meth:`Service.stop` the jobs in
  flight get ``shutdown-grace`` seconds, then are cut short (they stay ``running``: resumed at
  the next start, with a history entry saying where they were). A job found ``running`` at
  start that no shutdown accounted for gets "service died while running"; one whose attempts
  cut short reached ``max-attempts`` is failed with its history instead of resumed.
- A failed job's details (the traceback) are kept with its record, scrubbed of patient data.
- ``STATE/health.json`` and ``STATE/metrics.prom`` (:mod:`dataflow.service.health`) say how
  the service is, every few seconds and at each change; ``STATE/service.lock`` is held while
  it runs (one service per state folder).
- With an ``api:`` section, a :class:`dataflow.platform.core.Platform` is built at start: it
  adds the pipelines registered through the API (:meth:`Service.add_pipeline` at run time,
  :meth:`Service.remove_pipeline`), starts its servers once the pipelines are warm and stops
  them first. Jobs it creates are ``pending`` until started (:meth:`Service.start_job`);
  :meth:`Service.cancel_job` cancels one. ``listeners`` hear every job's changes of state.

``dataflow/`` never imports ``connectors/``: connectors are found by entry point name.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from dataflow import models
from dataflow.errors import DataflowError
from dataflow.execution.latency import Latency
from dataflow.execution.local import JobFeed, JobResult, LocalExecutor
from dataflow.execution.state import PRIORITIES
from dataflow.hints import suggest
from dataflow.identifiers import identifiers_of
from dataflow.logs import scrub
from dataflow.machine import gpu_usage
from dataflow.registered import Registration, RegistrationError
from dataflow.service.config import SERVICE_KEYS, JobLimits, PipelineEntry, ServiceConfig
from dataflow.service.health import HealthWriter, ServiceLock, read_previous
from dataflow.service.jobs import JobRecord, JobStore

__all__ = ["Connector", "Service", "ServiceError", "ServiceHost", "load_connector"]

log = structlog.get_logger("dataflow.service")
ENTRY_POINTS = "dataflow.connectors"


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


class ServiceError(DataflowError):
    """The service cannot start or do what was asked (the message says what and why)."""


class Connector(Protocol):
    """What a connector is to the service (built by ``factory(section, host)``)."""

    agents: frozenset[str]  # register-results agents it exports for, e.g. {"ClaraSCU"}

    def start(self) -> None: ...

    def stop_intake(self) -> None:
        """Stop taking new work (the service then lets the pipelines finish)."""

    def stop(self) -> None:
        """Stop the rest (after the pipelines finished: exports of their last jobs are in)."""

    def export(self, task_dir: Path, task: Mapping[str, Any], job: JobRecord) -> None:
        """Take the registered result durably (return only once it survives a crash). May
        be called before ``start`` (results of jobs resumed at start) and from any thread."""

    # optional: def release(self, payload: Path, source: Mapping[str, Any]) -> None
    #   every job over ``payload`` (which this connector submitted) is finished and past its
    #   retention: the connector may remove it (the DICOM connector deletes the group).
    # optional: def http_routes(self) -> list
    #   Starlette routes the platform's REST app mounts (behind its tokens) when the service
    #   has an ``api``; called once the connector started (the DICOM connector's STOW-RS).


def load_connector(name: str) -> Callable[[dict[str, Any], ServiceHost], Connector]:
    """The factory registered under ``name`` in the ``dataflow.connectors`` entry points."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        guess = suggest(name, [*found, *SERVICE_KEYS])
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ServiceError(
            f"neither a service setting nor a connector "
            f"({hint}settings: {', '.join(sorted(SERVICE_KEYS))}; connectors: {known})"
        )
    return found[name].load()


class ServiceHost:
    """The service as a connector sees it."""

    def __init__(self, service: Service, name: str) -> None:
        self._service, self.name = service, name
        self.state_dir = service.config.state / name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = service.config.path
        self.log = log.bind(connector=name)

    @property
    def pipelines(self) -> tuple[str, ...]:
        return tuple(self._service.pipelines)

    def submit(
        self, pipeline: str, payload: Path, *, source: dict[str, Any], key: str | None = None
    ) -> JobRecord:
        """Record a job for ``pipeline`` over the folder ``payload`` and queue it; returns
        once the record is durable. The same ``key`` twice gives the same job."""
        source = {**source, "connector": self.name}  # whose payload: released to it later
        return self._service.submit(pipeline, payload, source=source, key=key)

    def export_progress(self, task_id: str, destination: str, state: str, detail: str = "") -> None:
        """A registered result's export to ``destination`` moved on (``pending``, ``sent``,
        ``dead``; ``detail``: why, for a dead letter). Thread-safe; ``dataflow jobs`` shows
        it with the job, and the metrics count it."""
        self._service.export_progress(task_id, destination, state, detail)


class Service:
    """Start with :meth:`start`, stop with :meth:`stop` (clean: jobs in flight finish)."""

    def __init__(self, config: ServiceConfig, *, startup_timeout: float = 600.0) -> None:
        self.config = config
        self.pipelines = dict(config.pipelines)  # + those registered through the API
        self.platform: Any = None  # dataflow.platform.core.Platform, with an api: section
        #: called with (job id, pipeline, new state) at each change of a job's state
        self.listeners: list[Callable[[str, str, str], None]] = []
        #: called with (task id, destination, new state) as a result's export moves on
        self.export_listeners: list[Callable[[str, str, str], None]] = []
        self.startup_timeout = startup_timeout
        self.jobs_dir = config.state / "jobs"
        self.jobs: JobStore | None = None
        self.feeds: dict[str, JobFeed] = {}
        self.executors: dict[str, LocalExecutor] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.connectors: dict[str, Connector] = {}
        self._agents: dict[str, Connector] = {}
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self.watch_interval = 1.0  # seconds between looks for jobs queued by another process
        self.health_interval = 2.0  # seconds between writes of health.json and metrics.prom
        self.health: HealthWriter | None = None
        self._lockfile = ServiceLock(config.state)
        self._stopping = threading.Event()
        self._ray_started = False  # this service connected to Ray (executor: {kind: ray})
        self._aborted = self._stopped = False
        self._cut_short: dict[str, list[str] | None] = {}  # job -> its stages when aborted
        #: pipelines (registered through the API) whose workers are stopped until a job comes;
        #: their jobs wait ``queued`` while their workers start
        self.dormant: set[str] = set()
        self.idle_stop: dict[str, float] = {}  # pipeline -> seconds idle before it sleeps
        self._waking: set[str] = set()
        self._last_busy: dict[str, float] = {}  # pipeline -> when it last took or ended a job
        self._feeding = threading.Lock()  # a job handed to a feed vs that feed closing
        #: (pipeline, "succeeded" | "failed") -> the jobs' seconds from admission to the end
        self._job_latency: dict[tuple[str, str], Latency] = {}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.config.state.mkdir(parents=True, exist_ok=True)
        if not self._lockfile.acquire():
            raise ServiceError(
                f"{self.config.state}: another dataflow serve (pid "
                f"{ServiceLock.holder(self.config.state)}) runs on this state folder"
            )
        try:
            self._start()
        except BaseException:
            self.stop(grace=0)
            raise

    def _start(self) -> None:
        previous = read_previous(self.config.state)  # before this run overwrites it
        self.jobs = JobStore(self.config.state / "jobs.db")
        # the model repository the API writes to; stages read models:/NAME/VERSION from it,
        # in this process (validation) and in the workers (which inherit the environment)
        os.environ[models.ENV] = str(self.config.state / "models")
        if self.config.api is not None:
            from dataflow.platform.core import Platform

            try:  # takes the REST port; adds the pipelines registered through the API
                self.platform = Platform(self)
            except DataflowError as exc:
                raise ServiceError(f"not started: {exc}; nothing was started") from None
        self._connect_executor()
        self._check()  # the whole configuration, before any worker process starts
        for name in self.dormant:  # checked, started at their first job
            self.executors.pop(name, None)
        log.info("pipelines_starting", pipelines=list(self.executors))
        ready = {name: self._launch(name, executor) for name, executor in self.executors.items()}
        deadline = time.monotonic() + self.startup_timeout
        for name, event in ready.items():
            self._wait_ready(name, event, deadline)
        self._resume(previous)
        self.resume_exports()
        for name, connector in self.connectors.items():
            connector.start()
            log.info("connector_started", connector=name)
        self.health = HealthWriter(self.config.state, self._gather, interval=self.health_interval)
        self.health.start()
        retention = self.config.retention
        if retention.succeeded is not None or retention.failed is not None:
            self._reaper = threading.Thread(target=self._reap_loop, name="retention", daemon=True)
            self._reaper.start()
        self._watcher = threading.Thread(target=self._watch_loop, name="job watcher", daemon=True)
        self._watcher.start()
        if self.platform is not None:
            self.platform.start()
        log.info("service_started", pipelines=list(self.executors), state=str(self.config.state))

    def _connect_executor(self) -> None:
        """With ``executor: {kind: ray}``: connect this process to the Ray cluster (or start
        a Ray runtime here, offering at least the CPUs the configured pipelines request:
        docs/ray.md) before any pipeline is built; every pipeline's actors run there, and
        the connection is shut down when the service stops."""
        chosen = self.config.executor
        if chosen.kind != "ray":
            return
        from dataflow.execution.rayexec import connect, cpus_requested

        cpus = None
        if chosen.address is None:
            cpus = sum(
                cpus_requested(e.file, e.params, e.replicas) for e in self.pipelines.values()
            )
        where = f"{self.config.path}: executor.address {chosen.address}"
        try:
            self._ray_started = connect(chosen.address, num_cpus=cpus, what=where)
        except DataflowError as exc:
            raise ServiceError(f"not started: {exc}; nothing was started") from None
        log.info("ray_connected", address=chosen.address or "a runtime started here")

    def _check(self) -> None:
        """Load and validate every pipeline (stages, arguments, the modules each stage needs)
        and place it, and build every connector from its section (nothing listens yet), all
        before anything is started: one :class:`ServiceError` lists every problem found."""
        problems: list[str] = []
        for name, entry in self.pipelines.items():
            try:
                executor = self._build(entry)
            except (DataflowError, OSError, KeyError, ValueError) as exc:
                problems.append(f"pipeline {name!r} ({entry.file}):\n{_indent(str(exc))}")
                continue
            self.executors[name] = executor
        for name, section in self.config.connectors.items():
            try:
                connector = load_connector(name)(section, ServiceHost(self, name))
            except (DataflowError, OSError, ValueError, TypeError, KeyError) as exc:
                where = f"{self.config.path}: " if self.config.path else ""
                what = str(exc) if str(exc).startswith(name) else f"section {name!r}: {exc}"
                problems.append(where + _indent(what).lstrip())
                continue
            self.connectors[name] = connector
            for agent in connector.agents:
                self._agents[agent.lower()] = connector
            offer = getattr(connector, "http_routes", None)  # duck-typed, as the API mounts them
            if self.config.api is None and offer is not None and offer():
                where = f"{self.config.path}: " if self.config.path else ""
                problems.append(
                    f"{where}section {name!r} serves HTTP routes (e.g. STOW-RS) on the API's "
                    "REST port, and there is no 'api' section: add one (api: {rest-port: "
                    "8080}) or turn them off"
                )
        if problems:
            log.error("service_refused", problems=len(problems))
            raise ServiceError(
                f"not started: {len(problems)} problem(s) in the configuration; nothing was "
                "started\n" + "\n".join(problems)
            )
        log.info("service_checked", pipelines=list(self.executors),
                 connectors=list(self.connectors))  # fmt: skip

    def _build(self, entry: PipelineEntry) -> LocalExecutor:
        """Load, validate and place a pipeline: its executor, not started."""
        from dataflow.run import build_executor

        _, executor = build_executor(
            entry.file, self.jobs_dir, params=entry.params, replicas=entry.replicas,
            log_format="json" if self.config.log_format == "json" else "console",
            stage_timeout=entry.limits.stage_timeout,
            job_timeout=entry.limits.job_timeout, memory_limit=entry.limits.worker_memory,
            executor=self.config.executor.kind, address=self.config.executor.address,
            placement=self.config.executor.placement,
        )  # fmt: skip
        executor.job_logs = True  # each operator's log per job, for the API (Clara's ReadLogs)
        return executor

    def _launch(self, name: str, executor: LocalExecutor) -> threading.Event:
        """Serve ``executor`` on its own thread; the event is set once its workers are ready."""
        ready = threading.Event()
        feed = self.feeds[name] = JobFeed()
        thread = threading.Thread(
            target=self._serve, args=(name, executor, feed, ready),
            name=f"pipeline {name}", daemon=True,
        )  # fmt: skip
        self.threads[name] = thread
        thread.start()
        return ready

    def _wait_ready(self, name: str, event: threading.Event, deadline: float) -> None:
        while not event.wait(0.2):
            if self._errors or not self.threads[name].is_alive():
                raise ServiceError(f"pipeline {name!r} failed to start: {self._errors}")
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"pipeline {name!r}: its workers were not ready after "
                    f"{self.startup_timeout:.0f} s (see worker_failed_to_start in the log)"
                )

    def add_pipeline(
        self, entry: PipelineEntry, *, lazy: bool = False, idle_stop: float | None = None
    ) -> None:
        """Load, place and start a pipeline while the service runs (registered through the
        API); returns once its workers are warm — or, ``lazy``, once it is checked: its
        workers start at its first job. ``idle_stop``: seconds without a job after which its
        workers stop until the next one. ServiceError (the pipeline's diagnostics) if it
        cannot be built or started; nothing is left running then."""
        with self._lock:
            if entry.name in self.pipelines or self._stopping.is_set():
                raise ServiceError(f"pipeline {entry.name!r} exists already, or the service "
                                   "is stopping")  # fmt: skip
            self.pipelines[entry.name] = entry
        if idle_stop:
            self.idle_stop[entry.name] = idle_stop
        self._last_busy[entry.name] = time.monotonic()
        try:
            executor = self._build(entry)
            if lazy:
                with self._feeding:
                    self.dormant.add(entry.name)
                log.info("pipeline_added", pipeline=entry.name, workers="at its first job")
                return
            self.executors[entry.name] = executor
            ready = self._launch(entry.name, executor)
            self._wait_ready(entry.name, ready, time.monotonic() + self.startup_timeout)
        except BaseException as exc:
            self._drop_pipeline(entry.name)
            if isinstance(exc, (DataflowError, OSError, KeyError, ValueError)):
                raise ServiceError(f"pipeline {entry.name!r} ({entry.file}):\n"
                                   f"{_indent(str(exc))}") from None  # fmt: skip
            raise
        log.info("pipeline_added", pipeline=entry.name)

    def remove_pipeline(self, name: str) -> None:
        """Stop a pipeline added with :meth:`add_pipeline` (its workers finish what they
        hold first); the caller checked that no job of it is in flight."""
        self._drop_pipeline(name)
        log.info("pipeline_removed", pipeline=name)

    def _drop_pipeline(self, name: str) -> None:
        with self._feeding:
            self.dormant.discard(name)
        self.idle_stop.pop(name, None)
        feed = self.feeds.pop(name, None)
        if feed is not None:
            feed.close()
        thread = self.threads.pop(name, None)
        if thread is not None:
            thread.join()
        self.executors.pop(name, None)
        self._errors.clear()  # a failed start of this pipeline is reported by add_pipeline
        with self._lock:
            self.pipelines.pop(name, None)

    def _wake(self, name: str) -> None:
        """Start a dormant pipeline's workers (on a thread of its own); its queued jobs are
        handed to it as soon as its feed exists."""
        with self._feeding:
            if name not in self.dormant or name in self._waking or self._stopping.is_set():
                return
            self._waking.add(name)
        threading.Thread(target=self._wake_up, args=(name,), name=f"wake {name}",
                         daemon=True).start()  # fmt: skip

    def _wake_up(self, name: str) -> None:
        log.info("pipeline_waking", pipeline=name)
        try:
            executor = self._build(self.pipelines[name])
        except Exception as exc:  # its definition or a model changed since: its jobs fail
            error = scrub(f"pipeline {name!r} could not be started: {exc}")
            log.error("pipeline_not_woken", pipeline=name, error=error)
            with self._feeding:
                self._waking.discard(name)
            for job in self.jobs.unfinished(("queued",)) if self.jobs is not None else ():
                if job.pipeline == name and self.jobs.finished(job.id, False, error=error):
                    self._emit(job.id, name, "failed")
            return
        with self._feeding:
            self._waking.discard(name)
            if name not in self.dormant or self._stopping.is_set():
                return  # removed (or the service stops) meanwhile
            self.executors[name] = executor
            self._launch(name, executor)
            self.dormant.discard(name)
            self._last_busy[name] = time.monotonic()
        self._take_unfinished(("queued",), "job_picked_up")

    def _sleep_idle(self) -> None:
        """Stop the workers of pipelines idle for longer than their ``idle_stop``; they
        start again at their next job."""
        now = time.monotonic()
        for name, seconds in list(self.idle_stop.items()):
            if name in self.dormant or now - self._last_busy.get(name, now) < seconds:
                continue
            if self.jobs is None or self.jobs.list(states=("queued", "running"),
                                                   pipelines=(name,), limit=1):  # fmt: skip
                continue
            with self._feeding:
                if name not in self.feeds or self.jobs.list(
                    states=("queued", "running"), pipelines=(name,), limit=1
                ):
                    continue
                self.dormant.add(name)
                feed, thread = self.feeds.pop(name), self.threads.pop(name, None)
                self.executors.pop(name, None)
            feed.close()
            if thread is not None:
                thread.join()
            log.info(
                "pipeline_idle_stopped", pipeline=name, idle_s=round(now - self._last_busy[name])
            )

    def _serve(self, name: str, executor: LocalExecutor, feed: JobFeed, ready) -> None:
        try:
            executor.serve(feed, lambda r: self._finished(name, r), on_ready=ready.set)
        except BaseException as exc:  # reported by start() or stop()
            self._errors.append(exc)
            log.error("pipeline_stopped_by_error", pipeline=name, error=repr(exc))

    def abort(self) -> None:
        """Stop the pipelines at once (from a signal handler, during or before :meth:`stop`):
        busy workers are killed; their jobs stay ``running`` and run again at the next start
        (:meth:`stop` adds to each record's history where it was cut short)."""
        if self._aborted:
            return
        self._aborted = True
        for name, executor in self.executors.items():
            in_flight = getattr(executor, "in_flight", None)
            try:
                stages = in_flight() if callable(in_flight) else None
            except Exception:  # the executor is stopping too: where is unknown
                stages = None
            if stages is None:
                self._cut_short[name] = None
            else:
                self._cut_short.update({job: list(at) for job, at in stages.items()})
        for feed in self.feeds.values():
            feed.abort()

    def stop(self, grace: float | None = None) -> None:
        """Connectors stop taking work, each pipeline finishes its jobs in flight (their
        results are handed to export) within ``grace`` seconds (``limits.shutdown-grace``),
        then those still in flight are cut short; then the connectors stop."""
        if self._stopped:
            return
        grace = self.config.limits.shutdown_grace if grace is None else grace
        self._stopping.set()
        for thread in (self._reaper, self._watcher):
            if thread is not None:
                thread.join(timeout=60)
        self._reaper = self._watcher = None
        if self.platform is not None:
            self.platform.stop()  # its servers take no more requests (after retention ran)
        connectors = list(reversed(list(self.connectors.items())))
        for step in ("stop_intake", "stop"):
            for name, connector in connectors:
                try:
                    getattr(connector, step, lambda: None)()
                except Exception as exc:
                    log.error("connector_stop_failed", connector=name, step=step,
                              error=repr(exc))  # fmt: skip
            if step == "stop_intake":
                self._stop_pipelines(grace)
        self.connectors.clear()
        if self._ray_started:  # after every pipeline's actors were stopped
            import ray

            ray.shutdown()
            self._ray_started = False
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self.jobs is not None:
            self.jobs.close()
            self.jobs = None
        self._lockfile.release()
        self._stopped = True
        log.info("service_stopped")

    def _stop_pipelines(self, grace: float) -> None:
        for feed in self.feeds.values():
            feed.close()
        deadline = time.monotonic() + grace
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads.values()):
            log.warning("shutdown_grace_passed", grace=grace)
            self.abort()
        for thread in self.threads.values():
            thread.join()
        self.threads.clear()
        if self._aborted and self.jobs is not None:
            self._note_cut_short()

    def _note_cut_short(self) -> None:
        """Each job an abort left ``running``: where it was, in its history (it resumes at
        the next start; an attempt cut short at a stage counts towards ``max-attempts``)."""
        assert self.jobs is not None
        for job in self.jobs.unfinished(("running",)):
            if job.pipeline in self._cut_short:  # that executor cannot say where its jobs are
                event, stages, what = "cut_short", None, "cut short by shutdown"
            elif self._cut_short.get(job.id):
                stages = self._cut_short[job.id]
                event, what = "cut_short", f"cut short by shutdown at stage {', '.join(stages)}"
            else:
                event, stages = "stopped_waiting", None
                what = "stopped by shutdown before it reached a stage"
            self.jobs.note(job.id, event, what, stage=stages[0] if stages else None)
            log.warning("job_cut_short", job_id=job.id, pipeline=job.pipeline,
                        attempt=job.attempts, what=what)  # fmt: skip

    def _resume(self, previous: dict[str, Any]) -> None:
        """Run again the jobs a stop or a crash left queued or running, except those whose
        attempts cut short reached ``max-attempts``: those fail, with their history."""
        assert self.jobs is not None
        seen = {}  # job -> the stages it was at, when the last health file was written
        for entry in previous.get("pipelines", {}).values():
            seen.update(entry.get("in_flight") or {})
        for job in self.jobs.unfinished(("queued", "running")):
            if job.state == "running" and not any(
                entry["attempt"] == job.attempts for entry in job.history
            ):  # no shutdown accounted for this attempt: the service died
                stages = seen.get(job.id)
                where = f" (last seen at stage {', '.join(stages)})" if stages else ""
                job = self.jobs.note(job.id, "service_died", f"service died while running{where}",
                                     stage=stages[0] if stages else None)  # fmt: skip
            cut = self.jobs.interrupted(job)
            limits = self._limits(job.pipeline)
            if len(cut) < limits.max_attempts:
                continue
            story = "; ".join(f"attempt {e['attempt']}: {e['what']}" for e in cut)
            error = f"not resumed: {len(cut)} attempts were cut short ({story})"
            if self.jobs.fail(job.id, error, was=(job.state,)):
                self.jobs.note(job.id, "not_resumed", error)
                log.error("job_not_resumed", job_id=job.id, pipeline=job.pipeline,
                          max_attempts=limits.max_attempts, error=error)  # fmt: skip
        self._take_unfinished(("queued", "running"), "job_resumed")

    def _limits(self, pipeline: str) -> JobLimits:
        entry = self.pipelines.get(pipeline)
        return entry.limits if entry is not None else self.config.limits

    def _watch_loop(self) -> None:
        """Take the jobs queued by another process (``dataflow jobs --retry``) while we run."""
        while not self._stopping.wait(self.watch_interval):
            try:
                self._take_unfinished(("queued",), "job_picked_up")
                self._sleep_idle()
            except Exception:
                log.exception("job_watch_failed")

    def _take_unfinished(self, states: tuple[str, ...], event: str) -> None:
        """Queue every job in one of ``states`` (oldest first) that nobody took meanwhile;
        one whose pipeline is no longer configured fails."""
        assert self.jobs is not None
        for job in self.jobs.unfinished(states):
            if job.pipeline not in self.feeds and job.pipeline not in self.dormant:
                self.jobs.finished(job.id, False, error=f"pipeline {job.pipeline!r} is no "
                                   "longer configured")  # fmt: skip
                continue
            if self._queue(job, was=states):
                log.info(event, job_id=job.id, pipeline=job.pipeline, was=job.state,
                         attempts=job.attempts)  # fmt: skip

    def resume_exports(self) -> int:
        """Hand over again every export recorded but not handed (at start), and those that
        found no connector for their agent when one serves it now (added to the file since).
        An export whose task folder is gone (retention, a hand) is marked ``missing``."""
        assert self.jobs is not None
        waiting = list(self.jobs.exports(state="new"))
        waiting += [
            e for e in self.jobs.exports(state="no-agent") if e["agent"].lower() in self._agents
        ]
        count = 0
        for export in waiting:
            task_dir = Path(export["task_dir"])
            if not Registration.present(task_dir):
                log.error("export_task_missing", job_id=export["job_id"], task=export["task_id"])
                self.jobs.export_state(export["task_id"], "missing")
                continue
            try:
                registration = Registration.read(task_dir)
            except RegistrationError as exc:  # stays 'new': read again at the next start
                log.error("export_task_invalid", job_id=export["job_id"], error=str(exc))
                continue
            self._hand(self.jobs.get(export["job_id"]), task_dir, registration)
            count += 1
        return count

    # ------------------------------------------------------------------ jobs

    def submit(
        self, pipeline: str, payload: Path, *, source: dict[str, Any], key: str | None
    ) -> JobRecord:
        if pipeline not in self.feeds and pipeline not in self.dormant:
            raise ServiceError(
                f"no pipeline {pipeline!r} in {self.config.path} "
                f"(configured: {', '.join(self.feeds)})"
            )
        assert self.jobs is not None
        job, created = self.jobs.create(pipeline, payload, source=source, key=key)
        if created:
            log.info("job_queued", job_id=job.id, pipeline=pipeline)
            self._emit(job.id, pipeline, "queued")
            self._queue(job)
            self._poke()
        return job

    def start_job(self, job_id: str) -> bool:
        """Queue a ``pending`` job (created through the API); False if it was not pending."""
        assert self.jobs is not None
        if not self.jobs.release(job_id):
            return False
        job = self.jobs.get(job_id)
        log.info("job_queued", job_id=job.id, pipeline=job.pipeline)
        self._emit(job.id, job.pipeline, "queued")
        if job.pipeline not in self.feeds and job.pipeline not in self.dormant:
            self._take_unfinished(("queued",), "job_picked_up")  # fails it, saying why
        else:
            self._queue(job)
        self._poke()
        return True

    def cancel_job(self, job_id: str, reason: str) -> str | None:
        """Cancel a job not ended yet; the state it had, or None if it had ended. A job its
        pipeline holds is failed there wherever it is (the workers busy with it are killed
        and restarted); when its result comes its outputs are removed and nothing of it is
        exported."""
        assert self.jobs is not None
        was = self.jobs.cancel(job_id, reason)
        if was is not None:
            job = self.jobs.get(job_id)
            feed = self.feeds.get(job.pipeline)
            if was == "running" and feed is not None:
                feed.cancel(job_id, reason)  # its stages stop: their workers are restarted
            log.info("job_cancelled", job_id=job_id, pipeline=job.pipeline, was=was)
            self._emit(job_id, job.pipeline, "cancelled")
            self._poke()
        return was

    def _emit(self, job_id: str, pipeline: str, state: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(job_id, pipeline, state)
            except Exception:
                log.exception("job_listener_failed", job_id=job_id)

    def _queue(self, job: JobRecord, *, was: tuple[str, ...] = ("queued",)) -> bool:
        """Hand the job to its pipeline, unless it is no longer in a state of ``was`` (taken
        already: by :meth:`submit` or by the watcher). Every attempt starts without outputs:
        those of an attempt that failed or was cut short are removed first. A job of a
        dormant pipeline stays queued and wakes it (False)."""
        assert self.jobs is not None
        with self._feeding:  # its feed cannot close meanwhile (idle stop)
            dormant = job.pipeline in self.dormant
            if not dormant:
                if not self.jobs.started(job.id, was=was):
                    return False
                self._remove_outputs(job)
                self._last_busy[job.pipeline] = time.monotonic()
                self._emit(job.id, job.pipeline, "running")
                priority = PRIORITIES.get(str(job.source.get("priority", "normal")), 2)
                self.feeds[job.pipeline].put(job.id, job.payload, priority)
        if dormant:  # it waits queued while its pipeline's workers start
            self._wake(job.pipeline)
            return False
        return True

    def _remove_outputs(self, job: JobRecord) -> None:
        outputs = self.jobs_dir / job.id
        if outputs.parent == self.jobs_dir and outputs.name == job.id:  # never elsewhere
            shutil.rmtree(outputs, ignore_errors=True)

    def _finished(self, pipeline: str, result: JobResult) -> None:
        from dataflow.run import write_result

        assert self.jobs is not None
        # The executor refuses a job id it has seen; this one is retired (its result is
        # reported) and the job records guard against duplicates, so the id may run again (a
        # retry), and the core forgets it (no set growing for the service's life). In the
        # pipeline's own thread, before the record says the job ended.
        self.executors[pipeline].core.forget(result.job)
        try:
            write_result(self.jobs_dir, result)
            if result.stages:  # when each stage ran it: the console's timeline
                folder = self.jobs_dir / result.job
                folder.mkdir(parents=True, exist_ok=True)
                (folder / ".timeline.json").write_text(json.dumps(result.stages))
        except OSError as exc:
            log.error("job_results_not_written", job_id=result.job, error=str(exc))
        if not result.ok and self._aborted:
            return  # cut short by the shutdown: stays running, resumed at the next start
        known = () if result.ok else identifiers_of(Path(self.jobs.get(result.job).payload))
        error = scrub(result.reason, known) if not result.ok else None
        if not self.jobs.finished(
            result.job,
            result.ok,
            stage=result.stage,
            error=error,
            details=scrub(result.details, known) if not result.ok else None,
        ):
            job = self.jobs.get(result.job)  # cancelled while it ran: its outputs go
            self._remove_outputs(job)
            log.info("cancelled_job_ended", job_id=job.id, pipeline=pipeline)
            return
        self._last_busy[pipeline] = time.monotonic()
        outcome = "succeeded" if result.ok else "failed"
        self._job_latency.setdefault((pipeline, outcome), Latency()).observe(result.seconds)
        self._emit(result.job, pipeline, outcome)
        self._poke()
        if not result.ok:
            log.error("job_finished", job_id=result.job, pipeline=pipeline, ok=False,
                      stage=result.stage, error=error,
                      seconds=round(result.seconds, 3))  # fmt: skip
            return
        log.info("job_finished", job_id=result.job, pipeline=pipeline, ok=True,
                 seconds=round(result.seconds, 3))  # fmt: skip
        job = self.jobs.get(result.job)
        for value in result.outputs.values():
            if isinstance(value, Path) and Registration.present(value):
                try:
                    task = Registration.read(value)
                except RegistrationError as exc:  # the job stands; its results go nowhere
                    log.error("export_task_invalid", job_id=job.id, error=str(exc))
                    continue
                self.jobs.add_export(task.task_id, job.id, task.agent, value)
                self._hand(job, value, task)

    def _hand(self, job: JobRecord, task_dir: Path, task: Registration) -> None:
        assert self.jobs is not None
        agent = task.agent
        connector = self._agents.get(agent.lower())
        if connector is None:
            log.warning("export_without_agent", job_id=job.id, agent=agent)
            self.jobs.export_state(task.task_id, "no-agent")
            return
        try:
            connector.export(task_dir, task.to_json(), job)
        except Exception as exc:  # stays 'new': handed again at the next start
            log.error("export_handover_failed", job_id=job.id, agent=agent, error=repr(exc))
            return
        self.jobs.export_state(task.task_id, "handed")

    def export_progress(self, task_id: str, destination: str, state: str, detail: str = "") -> None:
        """See :meth:`ServiceHost.export_progress`."""
        jobs = self.jobs
        if jobs is None:
            return  # stopped: the connector reports it again at the next start
        try:
            jobs.delivery(task_id, destination, state, scrub(detail) or "")
        except sqlite3.ProgrammingError:  # closed between the look and the write
            return
        for listener in list(self.export_listeners):
            try:
                listener(task_id, destination, state)
            except Exception:  # a listener's bug must not stop the export's bookkeeping
                log.exception("export_listener_failed", task=task_id)
        self._poke()

    # ------------------------------------------------------------------ health

    def _poke(self) -> None:
        if self.health is not None:
            self.health.poke()

    def _gather(self) -> dict[str, Any]:
        """The parts of ``health.json`` (:mod:`dataflow.service.health`)."""
        jobs = self.jobs
        if jobs is None:
            raise ServiceError("the service is stopping")
        pipelines: dict[str, Any] = {}
        for name, executor in self.executors.items():
            entry: dict[str, Any] = {"stages": {}, "counters": {}}
            for part in ("health", "in_flight"):
                method = getattr(executor, part, None)
                try:
                    value = method() if callable(method) else None
                except Exception as exc:  # not serving yet, or stopping
                    log.debug("executor_health_unknown", pipeline=name, error=repr(exc))
                    value = None
                if part == "health" and value is not None:
                    entry.update(value)
                elif part == "in_flight":
                    entry["in_flight"] = value
            thread = self.threads.get(name)
            if thread is not None and not thread.is_alive() and not self._stopping.is_set():
                entry["error"] = "its executor thread ended (see pipeline_stopped_by_error)"
            pipelines[name] = entry
        connectors = {}
        for name, connector in list(self.connectors.items()):
            method = getattr(connector, "health", None)
            try:
                value = method() if callable(method) else {}
            except Exception as exc:
                value = {"problems": [f"its health could not be read: {exc!r}"]}
            connectors[name] = {"problems": list(value.get("problems", [])),
                                "metrics": list(value.get("metrics", []))}  # fmt: skip
        return {
            "state": str(self.config.state),
            "pipelines": pipelines,
            "jobs": [{"pipeline": p, "state": s, "count": n}
                     for (p, s), n in sorted(jobs.pipeline_counts().items())],
            "deliveries": [{"destination": d, "state": s, "count": n}
                           for (d, s), n in sorted(jobs.delivery_counts().items())],
            "gpus": gpu_usage(),
            "job_latency": [{"pipeline": p, "outcome": o, **latency.snapshot()}
                            for (p, o), latency in sorted(self._job_latency.items())],
            "connectors": connectors,
        }  # fmt: skip

    # ------------------------------------------------------------------ retention

    def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.reap()
            except Exception:
                log.exception("retention_failed")
            self._stopping.wait(self.config.retention.interval)

    def reap(self, now: float | None = None) -> int:
        """Remove the outputs of finished jobs past their retention (``retention`` in the
        configuration), and hand each payload no job needs any more back to the connector
        that submitted it (``release``). Returns how many jobs were reaped."""
        assert self.jobs is not None
        retention = self.config.retention
        keep = {"succeeded": retention.succeeded, "failed": retention.failed}
        reaped = 0
        for job in self.jobs.due_for_reaping(time.time() if now is None else now, keep):
            if self._stopping.is_set() and now is None:
                break
            if not self.jobs.mark_reaped(job.id, job.state):
                continue  # retried meanwhile (dataflow jobs --retry): it needs its payload
            self._remove_outputs(job)  # after the record says so: a retry is refused now
            reaped += 1
            log.info("job_reaped", job_id=job.id, pipeline=job.pipeline, state=job.state)
            if not self.jobs.payload_in_use(job.payload):
                self._release(job)
        return reaped

    def _release(self, job: JobRecord) -> None:
        if job.source.get("connector") == "api" and self.platform is not None:
            self.platform.release(Path(job.payload))  # a payload uploaded through the API
            return
        connector = self.connectors.get(str(job.source.get("connector", "")))
        release = getattr(connector, "release", None)
        if release is None:
            return  # submitted by hand, or by a connector that keeps its payloads
        try:
            release(Path(job.payload), job.source)
        except Exception as exc:
            log.error("payload_release_failed", job_id=job.id, error=repr(exc))
