"""The executor's pure core: events in, actions out. No processes, no I/O, no clock of its own.

The process layer (``local.py``) — or an in-process runner (``dataflow.testing``), or later a
Ray executor — feeds :class:`Core` what happened (a job submitted, a worker ready, a job done or
failed at a stage, a worker dead, time passing) and carries out the actions it returns
(dispatch a job to a worker, start or kill a worker, discard values nobody needs any more,
report a job's result). Everything here is unit-tested on hand-built graphs.

Rules:

- Each stage has ``replicas`` workers; a worker runs one job at a time.
- A job becomes ready at a stage when every input port has its value (fan-in joins per job);
  an output feeds every consumer (fan-out). Ready jobs run in submission order, IMMEDIATE
  jobs before any other.
- Priorities (Clara's: ``LOWER`` 1, ``NORMAL`` 2, the default, ``HIGHER`` 3, ``IMMEDIATE`` 4;
  :meth:`Core.submit`): of the jobs waiting to be admitted, IMMEDIATE ones are taken first
  (oldest first); HIGHER, NORMAL and LOWER share the admissions 4:2:1 among the classes that
  wait (smooth weighted round robin, oldest first within a class), so none starves.
- Backpressure: a stage gets no new job while any of its output edges holds ``edge_items``
  values (or ``edge_bytes`` bytes) that the consumer has not finished with — counting the jobs
  the stage is running now. At most ``max_jobs`` jobs are in flight; the rest wait.
- Results are reported in submission order, whatever order replicas finish in (a batch run
  lists them as its inputs came); with ``ordered=False`` (a long-running service, where a
  slow study must not hold back the results of the fast ones after it) as each is known.
- A job's timeout counts from its first dispatch, waits between stages included (waiting to be
  admitted is not counted). A stage without a timeout of its own takes ``Limits.stage_timeout``.
- A failure (exception, worker death, stage timeout, job timeout, cancellation) fails that job
  only; its values are discarded; the worker (restarted if it died) takes the next job. No job
  is ever retried here: a job that kills its worker fails (the caller decides about retries).
- Self-healing. A worker that dies is restarted at once the first time; each further death in
  a row waits ``restart_backoff`` seconds, doubling, at most ``restart_backoff_max``. A death
  counts "in a row" until the worker finishes a job (done or failed) or stays up (ready)
  for ``healthy_after`` seconds. When every worker of a stage is down and has died more than
  ``max_restarts`` times in a row, the stage is *broken*: the jobs in flight that still need it
  fail, and so does every job admitted while it is broken (fast, with the reason: work is
  refused rather than hoarded). Its workers keep being restarted after their backoff; the
  first that becomes ready again *recovers* the stage (``StageRecovered``) and jobs flow again.
  Nothing needs a restart of the process.
- The stall watchdog (``Stalled``) reports jobs in flight with no progress (a job done or
  failed at a stage, a worker ready) for ``stall_seconds``; time while a worker is starting is
  not counted (start-up is not a stall: the quiet period begins once no worker is starting).
- A worker that cannot start at all (the stage cannot be constructed, or ``prepare`` raised:
  ``fatal``) is not a crash to retry quickly: its stage is broken at once with that reason (if
  no other replica is up), and the worker is tried again only every ``restart_backoff_max``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "IMMEDIATE",
    "PRIORITIES",
    "Action",
    "Core",
    "Discard",
    "Dispatch",
    "Graph",
    "JobFailed",
    "JobSucceeded",
    "KillWorker",
    "Limits",
    "StageBroken",
    "StageNode",
    "StageRecovered",
    "Stalled",
    "StartWorker",
    "Value",
]

JOB_INPUT = None  # an input bound to the job's own input (no ``from``)


@dataclasses.dataclass(frozen=True)
class StageNode:
    name: str
    #: input port -> (upstream stage, upstream output port), or None for the job's input
    inputs: Mapping[str, tuple[str, str] | None]
    outputs: tuple[str, ...]
    replicas: int = 1
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class Graph:
    stages: Mapping[str, StageNode]  # in topological order

    def consumers(self, stage: str, port: str) -> list[tuple[str, str]]:
        return [
            (node.name, inport)
            for node in self.stages.values()
            for inport, source in node.inputs.items()
            if source == (stage, port)
        ]

    def leaves(self) -> list[tuple[str, str]]:
        """Outputs nobody consumes: the pipeline's results."""
        return [
            (node.name, port)
            for node in self.stages.values()
            for port in node.outputs
            if not self.consumers(node.name, port)
        ]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_jobs: int = 8
    edge_items: int = 4
    edge_bytes: int = 1 << 30
    #: deaths in a row a worker may have before its stage counts as broken
    max_restarts: int = 3
    #: wait before the second restart in a row (the first is at once); doubles each time
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    #: a worker up (ready) this long has its deaths in a row forgotten
    healthy_after: float = 60.0
    stall_seconds: float = 30.0
    job_timeout: float | None = None
    #: the timeout of a stage that sets none (None: no timeout)
    stage_timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class Value:
    """A value flowing on an edge: an opaque reference (a store object ID, a path, a number)."""

    ref: Any
    nbytes: int = 0


# ----------------------------------------------------------------------------- actions


class Action:
    """Something the process layer must do."""


@dataclasses.dataclass(frozen=True)
class Dispatch(Action):
    worker: str
    job: str
    stage: str
    inputs: Mapping[str, Value]
    timeout: float | None


@dataclasses.dataclass(frozen=True)
class StartWorker(Action):
    worker: str
    stage: str
    replica: int


@dataclasses.dataclass(frozen=True)
class KillWorker(Action):
    worker: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Discard(Action):
    """These values are needed by nobody any more (free the store objects)."""

    values: tuple[Value, ...]


@dataclasses.dataclass(frozen=True)
class JobSucceeded(Action):
    job: str
    outputs: Mapping[tuple[str, str], Value]  # leaf outputs; the caller discards them


@dataclasses.dataclass(frozen=True)
class JobFailed(Action):
    job: str
    stage: str | None
    reason: str
    details: str = ""  # e.g. the stage's traceback


@dataclasses.dataclass(frozen=True)
class Stalled(Action):
    report: str


@dataclasses.dataclass(frozen=True)
class StageBroken(Action):
    """No worker of ``stage`` can run now; its next try is in ``retry_in`` seconds."""

    stage: str
    reason: str
    retry_in: float


@dataclasses.dataclass(frozen=True)
class StageRecovered(Action):
    """A worker of a broken stage is ready again: jobs are accepted again."""

    stage: str


# ------------------------------------------------------------------------------- state

IMMEDIATE = 4  # Clara's JobPriority IMMEDIATE: before any other job
SHARES = {3: 4, 2: 2, 1: 1}  # HIGHER, NORMAL, LOWER: admissions per round among those waiting
PRIORITIES = {"lower": 1, "normal": 2, "higher": 3, "immediate": IMMEDIATE}
_BEFORE_ALL = 1 << 62  # subtracted from an IMMEDIATE job's place in the ready queues


@dataclasses.dataclass(eq=False)
class _Job:
    id: str
    seq: int
    payload: Value | None
    admitted_at: float | None = None
    started_at: float | None = None  # first dispatch: the job timeout counts from here
    values: dict[tuple[str, str], Value] = dataclasses.field(default_factory=dict)
    waiting: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # stage -> ports
    done: set[str] = dataclasses.field(default_factory=set)  # stages finished
    running: set[str] = dataclasses.field(default_factory=set)  # stages running it now
    failed: JobFailed | None = None
    priority: int = 2  # Clara's JobPriority: 1 lower, 2 normal, 3 higher, 4 immediate


class _Backlog:
    """Jobs submitted and not admitted yet: one FIFO queue per priority and an index by ID,
    so that taking the next job and finding one cost the same with ten jobs waiting or ten
    thousand (``dataflow run`` over an archive submits every job at once). Iterating gives
    them in submission order."""

    def __init__(self) -> None:
        self._queues: dict[int, collections.deque[_Job]] = {
            level: collections.deque() for level in (IMMEDIATE, *SHARES)
        }
        self._by_id: dict[str, _Job] = {}  # the jobs still waiting; a queue may hold removed ones

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[_Job]:
        return iter(sorted(self._by_id.values(), key=lambda job: job.seq))

    def __contains__(self, job: object) -> bool:
        return isinstance(job, _Job) and self._by_id.get(job.id) is job

    def append(self, job: _Job) -> None:
        self._queues[job.priority].append(job)
        self._by_id[job.id] = job

    def get(self, job_id: str) -> _Job | None:
        return self._by_id.get(job_id)

    def remove(self, job: _Job) -> None:
        """Out of the backlog (cancelled or failed); its queue drops it when it comes up."""
        if job in self:
            del self._by_id[job.id]

    def levels(self) -> list[int]:
        """The priorities with a job waiting, lowest first."""
        return [level for level in sorted(self._queues) if self._front(level) is not None]

    def pop(self, level: int) -> _Job:
        """The oldest job waiting at ``level`` (one of :meth:`levels`), taken out."""
        job = self._front(level)
        assert job is not None, f"no job waiting at priority {level}"
        self._queues[level].popleft()
        del self._by_id[job.id]
        return job

    def _front(self, level: int) -> _Job | None:
        queue = self._queues[level]
        while queue and self._by_id.get(queue[0].id) is not queue[0]:
            queue.popleft()  # removed while it waited
        return queue[0] if queue else None


@dataclasses.dataclass(eq=False)
class _Worker:
    id: str
    stage: str
    replica: int
    state: str = "starting"  # starting | idle | busy | waiting (to be restarted at restart_at)
    job: _Job | None = None
    deadline: float | None = None
    started_at: float = 0.0
    failures_in_a_row: int = 0
    cannot_start: bool = False  # its last start failed for good (construction, prepare)
    up_since: float | None = None  # ready since (None while starting or waiting)
    restart_at: float | None = None
    restarts: int = 0  # deaths since the start (each followed by a restart)
    last_death: str | None = None

    @property
    def up(self) -> bool:
        return self.state in ("idle", "busy")


class Core:
    COUNTERS = ("worker_died", "stage_broken", "stage_recovered", "stage_timeouts", "job_timeouts")

    def __init__(self, graph: Graph, limits: Limits | None = None, *, ordered: bool = True) -> None:
        self.graph = graph
        self.limits = limits or Limits()
        self.ordered = ordered
        self.workers: dict[str, _Worker] = {}
        self.jobs: dict[str, _Job] = {}
        self.backlog = _Backlog()  # submitted, not admitted
        self._credit: dict[int, int] = dict.fromkeys(SHARES, 0)  # the round robin's state
        self.submitted: set[str] = set()  # every job ID seen, to refuse duplicates in O(1)
        self.ready: dict[str, list[tuple[int, str]]] = {s: [] for s in graph.stages}  # heaps
        self.broken: dict[str, str] = {}  # stage -> reason
        self.broken_details: dict[str, str] = {}  # stage -> e.g. the traceback of its start
        self.results: dict[int, Action] = {}  # seq -> result waiting to be reported in order
        self.next_report = 0
        self._seq = itertools.count()
        self.last_progress = 0.0
        self.consumers = {
            (node.name, port): graph.consumers(node.name, port)
            for node in graph.stages.values()
            for port in node.outputs
        }
        self.leaves = set(graph.leaves())
        # values on each edge not yet consumed: (stage, port) -> {job: nbytes}
        self.on_edge: dict[tuple[str, str], dict[str, int]] = {}
        self.peak_on_edge: dict[tuple[str, str], int] = {}  # high-water marks, for reports
        #: monotonic counts since the start (health checks and metrics)
        self.counters: dict[str, int] = dict.fromkeys(self.COUNTERS, 0)

    # ---------------------------------------------------------------------- events

    def start(self, now: float) -> list[Action]:
        """Start every worker."""
        self.last_progress = now
        actions: list[Action] = []
        for node in self.graph.stages.values():
            for replica in range(node.replicas):
                wid = f"{node.name}#{replica}"
                self.workers[wid] = _Worker(wid, node.name, replica, started_at=now)
                actions.append(StartWorker(wid, node.name, replica))
        return actions

    def submit(
        self, job_id: str, payload: Value | None, now: float, priority: int = 2
    ) -> list[Action]:
        """A new job (``priority``: see the module docstring; any other value is NORMAL)."""
        if job_id in self.submitted:
            raise ValueError(f"job {job_id!r} was already submitted")
        self.submitted.add(job_id)
        if not self.jobs and not self.backlog:
            self.last_progress = now  # idle until now (a service): not a stall
        priority = priority if priority in (*SHARES, IMMEDIATE) else 2
        self.backlog.append(_Job(job_id, next(self._seq), payload, priority=priority))
        return self._admit(now) + self._schedule(now)

    def worker_ready(self, worker: str, now: float) -> list[Action]:
        w = self.workers[worker]
        w.state, w.up_since, w.restart_at = "idle", now, None
        w.cannot_start = False
        self.last_progress = max(self.last_progress, now)  # a worker came up: progress
        actions: list[Action] = []
        self.broken_details.pop(w.stage, None)
        if self.broken.pop(w.stage, None) is not None:
            self.counters["stage_recovered"] += 1
            actions.append(StageRecovered(w.stage))
        return actions + self._schedule(now)

    def job_done(
        self, worker: str, job_id: str, outputs: Mapping[str, Value], now: float
    ) -> list[Action]:
        w = self.workers[worker]
        job = self._finish_dispatch(w, job_id)
        w.failures_in_a_row = 0
        self.last_progress = now
        if job is None or job.failed is not None:  # the job failed elsewhere meanwhile
            return [Discard(tuple(outputs.values())), *self._schedule(now)]
        actions: list[Action] = []
        stage = self.graph.stages[w.stage]
        job.done.add(stage.name)
        for port in stage.outputs:
            value = outputs.get(port)
            if value is None:
                continue
            key = (stage.name, port)
            job.values[key] = value
            consumers = self.consumers[key]
            if consumers:
                edge = self.on_edge.setdefault(key, {})
                edge[job.id] = value.nbytes
                self.peak_on_edge[key] = max(self.peak_on_edge.get(key, 0), len(edge))
            for consumer, inport in consumers:
                waiting = job.waiting.get(consumer)
                if waiting is not None:
                    waiting.discard(inport)
                    if not waiting:
                        self._make_ready(job, consumer)
        # Dispatch the next hops before freeing what was consumed: the process layer carries
        # actions out in order, and a store delete must not delay the next stage.
        discards = self._consume_inputs(job, stage)
        if len(job.done) == len(self.graph.stages):
            actions += self._complete(job, now)
        return actions + self._schedule(now) + discards

    def job_failed(
        self, worker: str, job_id: str, reason: str, details: str, now: float
    ) -> list[Action]:
        w = self.workers[worker]
        job = self._finish_dispatch(w, job_id)
        w.failures_in_a_row = 0  # the worker itself is fine: the stage code raised
        self.last_progress = now
        actions = self._fail(job, w.stage, reason, details, now) if job else []
        return actions + self._schedule(now)

    def worker_died(
        self, worker: str, reason: str, now: float, *, fatal: bool = False, details: str = ""
    ) -> list[Action]:
        """``worker`` exited (or was found dead). ``fatal``: it reported that it cannot start
        (the stage cannot be constructed, ``prepare`` raised) — a deterministic failure;
        ``details`` (its traceback) go with the failures of the jobs its stage refuses."""
        w = self.workers[worker]
        fatal = fatal and not w.up  # a worker that was serving crashed: not a start failure
        actions: list[Action] = []
        job, w.job = w.job, None
        if job is not None:
            job.running.discard(w.stage)
            actions += self._fail(job, w.stage, f"worker {worker} died: {reason}", "", now)
        self.counters["worker_died"] += 1
        w.failures_in_a_row += 1  # the real count: a fatal start is not four deaths
        w.cannot_start = fatal
        w.restarts += 1
        w.last_death = reason
        w.deadline = w.up_since = None
        delay = self._backoff(w, fatal)
        if delay > 0:
            w.state, w.restart_at = "waiting", now + delay
        else:
            w.state, w.started_at = "starting", now
            actions.append(StartWorker(w.id, w.stage, w.replica))
        if w.stage not in self.broken and self._stage_down(w.stage):
            if fatal:
                why = f"stage {w.stage!r} is broken: it cannot start: {reason}"
            else:
                why = (
                    f"stage {w.stage!r} is broken: its worker died {w.failures_in_a_row} "
                    f"times in a row (last: {reason})"
                )
            self.broken[w.stage] = why
            self.broken_details[w.stage] = details
            self.counters["stage_broken"] += 1
            actions.append(StageBroken(w.stage, why, delay))
            actions += self._fail_stage_jobs(w.stage, now)
        return actions + self._schedule(now)

    def cancel(self, job_id: str, reason: str, now: float) -> list[Action]:
        """Fail a job wherever it is (running stages are killed and restarted)."""
        job = self.jobs.get(job_id) or self.backlog.get(job_id)
        if job is None or job.failed is not None:
            return []
        return self._fail(job, None, reason, "", now) + self._schedule(now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: stage and job timeouts, and the watchdog."""
        actions: list[Action] = []
        for w in self.workers.values():
            if w.state == "waiting" and w.restart_at is not None and now >= w.restart_at:
                w.state, w.restart_at, w.started_at = "starting", None, now
                actions.append(StartWorker(w.id, w.stage, w.replica))
            elif w.up and w.failures_in_a_row and self._healthy_at(w) <= now:
                w.failures_in_a_row = 0  # it stayed up: its past deaths are forgiven
            if w.state == "busy" and w.deadline is not None and now >= w.deadline:
                job = w.job
                timeout = self._stage_timeout(w.stage)
                reason = f"stage {w.stage!r} timed out after {timeout:g} s"
                self.counters["stage_timeouts"] += 1
                actions += self._kill(w, reason, now)
                if job is not None:
                    actions += self._fail(job, w.stage, reason, "", now)
        if self.limits.job_timeout is not None:
            for job in list(self.jobs.values()):
                started = job.started_at
                if (
                    job.failed is None
                    and started is not None
                    and (now - started >= self.limits.job_timeout)
                ):
                    reason = f"job timed out after {self.limits.job_timeout:g} s"
                    self.counters["job_timeouts"] += 1
                    actions += self._fail(job, None, reason, "", now)
        if self._starting():
            self.last_progress = now  # start-up is not a stall: the quiet period begins after
        elif self.jobs and now - self.last_progress >= self.limits.stall_seconds:
            actions.append(Stalled(self.stall_report(now)))
            self.last_progress = now  # report again only after another quiet period
        return actions + self._schedule(now)

    # ------------------------------------------------------------------- queries

    def idle(self) -> bool:
        """No job in flight or waiting, and every result reported."""
        return not self.jobs and not self.backlog and not self.results

    def next_deadline(self) -> float | None:
        times = [w.deadline for w in self.workers.values() if w.deadline is not None]
        times += [w.restart_at for w in self.workers.values() if w.restart_at is not None]
        times += [
            self._healthy_at(w) for w in self.workers.values() if w.up and w.failures_in_a_row
        ]
        if self.limits.job_timeout is not None:
            times += [
                j.started_at + self.limits.job_timeout
                for j in self.jobs.values()
                if j.started_at is not None
            ]
        if self.jobs:  # while a worker starts, each tick moves this on
            times.append(self.last_progress + self.limits.stall_seconds)
        return min(times, default=None)

    def _starting(self) -> bool:
        """A worker is starting (importing, compiling, loading a model): the pipeline is
        busy getting ready, not stalled. A start that fails is reported by its worker
        (``fatal``); one that hangs by the caller's start-up deadline."""
        return any(w.state == "starting" for w in self.workers.values())

    def health(self, now: float) -> dict[str, dict[str, Any]]:
        """Per stage: ``state`` (``ok``: every worker up; ``starting``: first start under way;
        ``degraded``: some worker down or waiting to restart, jobs still accepted; ``broken``:
        jobs refused until a worker is up again), ``reason``, ``workers``, ``live`` (up now),
        ``restarts`` (deaths since the start), ``busy`` (workers on a job now), ``queued``
        (jobs ready for it, waiting for a worker), ``items_out`` and ``bytes_out`` (its
        outputs in the store, not yet taken by every consumer)."""
        by_stage: dict[str, list[_Worker]] = {name: [] for name in self.graph.stages}
        for w in self.workers.values():
            by_stage[w.stage].append(w)
        items_out = dict.fromkeys(self.graph.stages, 0)
        bytes_out = dict.fromkeys(self.graph.stages, 0)
        for (stage, _), edge in self.on_edge.items():
            if edge:
                items_out[stage] += len(edge)
                bytes_out[stage] += sum(edge.values())
        report: dict[str, dict[str, Any]] = {}
        for name, workers in by_stage.items():
            live = sum(w.up for w in workers)
            down = [w for w in workers if not w.up]
            retry = min((w.restart_at for w in down if w.restart_at is not None), default=None)
            later = "" if retry is None else f"; next try in {max(0.0, retry - now):.0f} s"
            reason: str | None = None
            if name in self.broken:
                state, reason = "broken", self.broken[name] + later
            elif not down:
                state = "ok"
            elif all(w.state == "starting" and not w.restarts for w in down):
                state = "starting"
            else:
                state = "degraded"
                w = next(w for w in down if w.last_death is not None)
                reason = f"worker {w.id} died: {w.last_death}{later}"
            report[name] = {
                "state": state,
                "reason": reason,
                "workers": len(workers),
                "live": live,
                "restarts": sum(w.restarts for w in workers),
                "busy": sum(w.state == "busy" for w in workers),
                "queued": len(self.ready.get(name, ())),
                "items_out": items_out[name],
                "bytes_out": bytes_out[name],
            }
        return report

    def stall_report(self, now: float) -> str:
        quiet = now - self.last_progress
        lines = [f"no progress for {quiet:.0f} s with {len(self.jobs)} job(s) in flight:"]
        for w in self.workers.values():
            if w.state == "busy":
                lines.append(
                    f"  worker {w.id} busy with job {w.job.id!r} for {now - w.started_at:.0f} s"
                )
            elif w.state == "starting":
                lines.append(f"  worker {w.id} starting")
            elif w.state == "waiting":
                lines.append(
                    f"  worker {w.id} restarts in {w.restart_at - now:.0f} s "
                    f"(last death: {w.last_death})"
                )
        for stage, heap in self.ready.items():
            if heap:
                blocked = self._blocked_by(stage)
                why = f" (held back: {blocked})" if blocked else ""
                lines.append(f"  stage {stage!r}: {len(heap)} job(s) ready, none running{why}")
        for job in self.jobs.values():
            for stage, ports in job.waiting.items():
                if ports and stage not in job.done:
                    lines.append(
                        f"  job {job.id!r} at {stage!r} waits for input(s) {sorted(ports)}"
                    )
        return "\n".join(lines)

    # ------------------------------------------------------------------- helpers

    def _admit(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self.backlog and len(self.jobs) < self.limits.max_jobs:
            job = self._next_admitted()
            job.admitted_at = now
            self.jobs[job.id] = job
            for node in self.graph.stages.values():
                if node.name in self.broken:
                    details = self.broken_details.get(node.name, "")
                    actions += self._fail(job, node.name, self.broken[node.name], details, now)
                    break
                job.waiting[node.name] = {p for p, src in node.inputs.items() if src is not None}
                if not job.waiting[node.name]:
                    self._make_ready(job, node.name)
        return actions

    def _next_admitted(self) -> _Job:
        """Take the next job of the backlog by priority (module docstring)."""
        waiting = self.backlog.levels()
        if IMMEDIATE in waiting:
            return self.backlog.pop(IMMEDIATE)
        if len(waiting) > 1:
            for level in waiting:
                self._credit[level] += SHARES[level]
            chosen = max(waiting, key=lambda level: (self._credit[level], level))
            self._credit[chosen] -= sum(SHARES[level] for level in waiting)
        else:
            chosen = waiting[0]
        return self.backlog.pop(chosen)

    def _make_ready(self, job: _Job, stage: str) -> None:
        first = job.seq - _BEFORE_ALL if job.priority == IMMEDIATE else job.seq
        heapq.heappush(self.ready[stage], (first, job.id))

    def _blocked_by(self, stage: str) -> str | None:
        node = self.graph.stages[stage]
        running = sum(1 for w in self.workers.values() if w.stage == stage and w.state == "busy")
        for port in node.outputs:
            edge = self.on_edge.get((stage, port))
            if not self.consumers[(stage, port)]:
                continue
            items = len(edge or ()) + running
            nbytes = sum((edge or {}).values())
            if items >= self.limits.edge_items:
                return f"edge {stage}.{port} holds {items} item(s) (limit {self.limits.edge_items})"
            if nbytes >= self.limits.edge_bytes:
                return f"edge {stage}.{port} holds {nbytes} bytes (limit {self.limits.edge_bytes})"
        return None

    def _schedule(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for stage, heap in self.ready.items():
            while heap:
                idle = next(
                    (w for w in self.workers.values() if w.stage == stage and w.state == "idle"),
                    None,
                )
                if idle is None or self._blocked_by(stage):
                    break
                _, job_id = heapq.heappop(heap)
                job = self.jobs.get(job_id)
                if job is None or job.failed is not None:
                    continue
                node = self.graph.stages[stage]
                inputs = {
                    port: (job.payload if src is None else job.values[src])
                    for port, src in node.inputs.items()
                }
                idle.state, idle.job, idle.started_at = "busy", job, now
                if job.started_at is None:
                    job.started_at = now
                timeout = self._stage_timeout(stage)
                idle.deadline = None if timeout is None else now + timeout
                job.running.add(stage)
                actions.append(Dispatch(idle.id, job.id, stage, inputs, timeout))
        return actions

    def _stage_timeout(self, stage: str) -> float | None:
        own = self.graph.stages[stage].timeout
        return own if own is not None else self.limits.stage_timeout

    def _backoff(self, w: _Worker, fatal: bool) -> float:
        """Seconds before a worker that just died is started again."""
        if fatal:
            return self.limits.restart_backoff_max
        if w.failures_in_a_row <= 1:
            return 0.0
        delay = self.limits.restart_backoff * 2.0 ** min(w.failures_in_a_row - 2, 60)
        return min(self.limits.restart_backoff_max, delay)

    def _healthy_at(self, w: _Worker) -> float:
        return (w.up_since if w.up_since is not None else 0.0) + self.limits.healthy_after

    def _stage_down(self, stage: str) -> bool:
        """No worker of ``stage`` is up, and each could not start (a deterministic failure) or
        has died more than max_restarts in a row."""
        return all(
            not w.up and (w.cannot_start or w.failures_in_a_row > self.limits.max_restarts)
            for w in self.workers.values()
            if w.stage == stage
        )

    def _finish_dispatch(self, w: _Worker, job_id: str) -> _Job | None:
        job = w.job
        if job is None or job.id != job_id:
            raise ValueError(f"worker {w.id} reported job {job_id!r} it was not running")
        w.state, w.job, w.deadline = "idle", None, None
        job.running.discard(w.stage)
        return self.jobs.get(job_id)

    def _consume_inputs(self, job: _Job, stage: StageNode) -> list[Action]:
        """The stage finished with its inputs: discard values no other consumer still needs."""
        free = []
        for src in stage.inputs.values():
            if src is None:
                continue
            pending = [c for c, _ in self.consumers[src] if c not in job.done]
            if not pending and src in job.values:
                self.on_edge.get(src, {}).pop(job.id, None)
                free.append(job.values.pop(src))
        return [Discard(tuple(free))] if free else []

    def _complete(self, job: _Job, now: float) -> list[Action]:
        outputs = {key: job.values.pop(key) for key in self.leaves if key in job.values}
        self._retire(job)
        return self._report(job, JobSucceeded(job.id, outputs)) + self._admit(now)

    def _fail(
        self, job: _Job, stage: str | None, reason: str, details: str, now: float
    ) -> list[Action]:
        if job.failed is not None:
            return []
        job.failed = JobFailed(job.id, stage, reason, details)
        actions: list[Action] = []
        self.backlog.remove(job)
        for w in self.workers.values():  # stop its other running stages
            if w.job is job and w.state == "busy":
                actions += self._kill(w, f"job {job.id!r} failed: {reason}", now)
        values = tuple(job.values.values())
        job.values.clear()
        for edge in self.on_edge.values():
            edge.pop(job.id, None)
        if values:
            actions.append(Discard(values))
        self._retire(job)
        return actions + self._report(job, job.failed) + self._admit(now)

    def _fail_stage_jobs(self, stage: str, now: float) -> list[Action]:
        actions: list[Action] = []
        for job in list(self.jobs.values()):
            if stage not in job.done:
                actions += self._fail(
                    job, stage, self.broken[stage], self.broken_details[stage], now
                )
        return actions

    def _kill(self, w: _Worker, reason: str, now: float) -> list[Action]:
        job, w.job = w.job, None
        if job is not None:
            job.running.discard(w.stage)
        w.state, w.deadline, w.started_at, w.up_since = "starting", None, now, None
        return [KillWorker(w.id, reason), StartWorker(w.id, w.stage, w.replica)]

    def forget(self, job_id: str) -> None:
        """Let ``job_id`` be submitted again once it is retired (a long-running service that
        retries a failed job, its own records refusing real duplicates). Without this an id
        is refused for the core's life; a job still in flight stays refused."""
        if job_id not in self.jobs:
            self.submitted.discard(job_id)

    def _retire(self, job: _Job) -> None:
        self.jobs.pop(job.id, None)

    def _report(self, job: _Job, result: Action) -> list[Action]:
        if not self.ordered:
            return [result]
        self.results[job.seq] = result
        out: list[Action] = []
        while self.next_report in self.results:
            out.append(self.results.pop(self.next_report))
            self.next_report += 1
        return out


def linear_graph(names: Iterable[str], replicas: int = 1) -> Graph:
    """A chain ``a -> b -> c`` with one port ``out``/``in`` per hop (tests and benchmarks)."""
    stages: dict[str, StageNode] = {}
    previous = None
    for name in names:
        inputs = {"in": None if previous is None else (previous, "out")}
        stages[name] = StageNode(name, inputs, ("out",), replicas=replicas)
        previous = name
    return Graph(stages)
