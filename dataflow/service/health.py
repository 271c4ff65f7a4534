"""What a running service says about itself: ``STATE/health.json`` and ``STATE/metrics.prom``.

The service rewrites both every few seconds and at each change (a job recorded or finished, a
result's delivery moving on), each by an atomic rename, so a reader never sees half a file:

- ``health.json``: when it was written, by which process; per pipeline, each stage's state
  (``ok``, ``starting``, ``degraded``, ``broken``, with the reason), the executor's counters and
  the jobs in flight at which stages; job counts; deliveries by destination and state; each
  connector's problems; and ``problems``, every one of those that needs an operator, in words.
- ``metrics.prom``: the same figures in Prometheus' text format, for node_exporter's textfile
  collector (``--collector.textfile.directory=STATE``) or any scraper that reads a file.

``STATE/service.lock`` is held (``flock``) by the running service for its whole life:
:func:`check` (``dataflow health``) tells a service that is not running, or whose health file
is older than it should be (hung, or killed), from one that runs with problems or without.

Optional parts are asked for with ``getattr``: an executor's ``health()`` and
``in_flight()``, a connector's ``health()`` (``{"problems": [...], "metrics": [...]}``).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

__all__ = [
    "HEALTH_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "HealthWriter",
    "ServiceLock",
    "check",
    "metric_families",
]

log = structlog.get_logger("dataflow.service")

HEALTH_FILE, METRICS_FILE, LOCK_FILE = "health.json", "metrics.prom", "service.lock"
#: executor counters exported as ``dataflow_<name>_total{pipeline}``
COUNTERS = {
    "worker_died": "worker processes that died (crash, kill, out of memory)",
    "worker_oom": "worker processes killed for exceeding their memory limit",
    "stage_broken": "times a stage became broken (its workers kept dying)",
    "stage_recovered": "times a broken or degraded stage recovered",
    "stage_timeouts": "jobs cut short by a stage time-out",
    "job_timeouts": "jobs cut short by the job time-out",
}
STAGE_STATES = ("ok", "starting", "degraded", "broken")


class ServiceLock:
    """``STATE/service.lock``, held exclusively while the service runs (one service per state
    folder); the file names the holder's pid."""

    def __init__(self, state: Path) -> None:
        self.path = state / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it
            self._fd = None

    @staticmethod
    def held(state: Path) -> bool:
        """Whether a process holds the lock of ``state`` (a service runs there)."""
        try:
            fd = os.open(state / LOCK_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @staticmethod
    def holder(state: Path) -> str:
        try:
            return (state / LOCK_FILE).read_text().strip() or "?"
        except OSError:
            return "?"


def problems_of(report: dict[str, Any]) -> list[str]:
    """What needs an operator, in words: stages broken or degraded, dead letters, connector
    problems."""
    out = []
    for pipeline, entry in report.get("pipelines", {}).items():
        for stage, health in entry.get("stages", {}).items():
            if health.get("state") in ("broken", "degraded"):
                reason = f": {health['reason']}" if health.get("reason") else ""
                out.append(f"pipeline {pipeline}: stage {stage} is {health['state']}{reason}")
        if entry.get("error"):
            out.append(f"pipeline {pipeline}: stopped by an error: {entry['error']}")
    dead: dict[str, int] = {}
    for row in report.get("deliveries", []):
        if row["state"] == "dead":
            dead[row["destination"]] = dead.get(row["destination"], 0) + row["count"]
    for destination, count in sorted(dead.items()):
        out.append(
            f"destination {destination}: {count} result(s) dead-lettered "
            f"(dataflow exports CONFIG --state dead)"
        )
    for name, entry in report.get("connectors", {}).items():
        out += [f"{name}: {problem}" for problem in entry.get("problems", [])]
    return out


def _labels(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    pairs = list(pairs)
    return [k for k, _ in pairs], [str(v) for _, v in pairs]


def metric_families(report: dict[str, Any]) -> list:
    """Prometheus metric families of a health report (:meth:`HealthWriter.report`)."""
    up = GaugeMetricFamily(
        "dataflow_up", "1 while dataflow serve runs, 0 once it stopped",
        value=float(report.get("status") != "stopped"),
    )  # fmt: skip
    written = GaugeMetricFamily(
        "dataflow_health_timestamp_seconds", "when these figures were taken", value=report["time"]
    )
    problems = GaugeMetricFamily(
        "dataflow_problems", "problems that need an operator (dataflow health)",
        value=len(report["problems"]),
    )  # fmt: skip
    counters = {
        name: CounterMetricFamily(f"dataflow_{name}", help_, labels=["pipeline"])
        for name, help_ in COUNTERS.items()
    }
    stages = GaugeMetricFamily(
        "dataflow_stage_state", "1 for the state each stage is in",
        labels=["pipeline", "stage", "state"],
    )  # fmt: skip
    live = GaugeMetricFamily(
        "dataflow_stage_workers_live", "workers of a stage alive and ready",
        labels=["pipeline", "stage"],
    )  # fmt: skip
    for pipeline, entry in report["pipelines"].items():
        values = entry.get("counters", {})
        for name, family in counters.items():
            family.add_metric([pipeline], float(values.get(name, 0)))
        for stage, health in entry.get("stages", {}).items():
            for state in STAGE_STATES:
                stages.add_metric([pipeline, stage, state], float(health.get("state") == state))
            if health.get("live") is not None:
                live.add_metric([pipeline, stage], float(health["live"]))
    jobs = GaugeMetricFamily(
        "dataflow_jobs", "job records by pipeline and state", labels=["pipeline", "state"]
    )
    for row in report["jobs"]:
        jobs.add_metric([row["pipeline"], row["state"]], float(row["count"]))
    exports = GaugeMetricFamily(
        "dataflow_exports", "registered results by destination and delivery state "
        "(pending, sent, dead)", labels=["destination", "state"],
    )  # fmt: skip
    dead = GaugeMetricFamily(
        "dataflow_dead_letters", "results dead-lettered per destination", labels=["destination"]
    )
    dead_counts: dict[str, float] = {}
    for row in report["deliveries"]:
        exports.add_metric([row["destination"], row["state"]], float(row["count"]))
        if row["state"] == "dead":
            dead_counts[row["destination"]] = dead_counts.get(row["destination"], 0) + row["count"]
    for destination, count in sorted(dead_counts.items()):
        dead.add_metric([destination], count)
    families = [up, written, problems, *counters.values(), stages, live, jobs, exports, dead]
    return families + _work_families(report) + _connector_families(report)


# per stage, from the coordinator's own figures (no worker process counts anything itself, so
# nothing is counted twice): name -> (kind, help, key in the stage's health entry)
_STAGE_FIGURES = {
    "dataflow_stage_items": (CounterMetricFamily, "jobs a stage finished", "done"),
    "dataflow_stage_failures": (CounterMetricFamily, "jobs that failed in a stage", "failed"),
    "dataflow_stage_busy_seconds": (CounterMetricFamily, "worker seconds a stage spent on jobs",
                                    "busy_seconds"),
    "dataflow_stage_workers_busy": (GaugeMetricFamily, "workers of a stage on a job now", "busy"),
    "dataflow_stage_queued": (GaugeMetricFamily, "jobs ready for a stage, waiting for a worker",
                              "queued"),
    "dataflow_stage_output_items": (GaugeMetricFamily, "a stage's outputs in the store, not yet "
                                    "taken by every consumer", "items_out"),
    "dataflow_stage_output_bytes": (GaugeMetricFamily, "bytes of a stage's outputs in the store, "
                                    "not yet taken by every consumer", "bytes_out"),
}  # fmt: skip
# the pipeline's shared-memory store: name -> (kind, help, key in its stats)
_STORE_FIGURES = {
    "dataflow_store_budget_bytes": (GaugeMetricFamily, "the store's budget", "budget"),
    "dataflow_store_used_bytes": (GaugeMetricFamily, "bytes of the budget in use", "used"),
    "dataflow_store_objects": (GaugeMetricFamily, "objects in the store", "objects"),
    "dataflow_store_waiting_creates": (GaugeMetricFamily, "creates waiting for room",
                                       "waiting_creates"),
    "dataflow_store_waiting_gets": (GaugeMetricFamily, "gets waiting for an object",
                                    "waiting_gets"),
    "dataflow_store_evictions": (CounterMetricFamily, "objects evicted to make room",
                                 "evicted_total"),
    "dataflow_store_created": (CounterMetricFamily, "objects created", "created_total"),
}  # fmt: skip


def _histogram(family: HistogramMetricFamily, labels: list[str], latency: dict) -> None:
    family.add_metric(labels, [(le, float(n)) for le, n in latency["buckets"]],
                      float(latency["sum"]))  # fmt: skip


def _work_families(report: dict[str, Any]) -> list:
    """Stages' figures and latency, each pipeline's store, jobs' latency."""
    stage = {name: kind(name, help_, labels=["pipeline", "stage"])
             for name, (kind, help_, _) in _STAGE_FIGURES.items()}  # fmt: skip
    store = {name: kind(name, help_, labels=["pipeline"])
             for name, (kind, help_, _) in _STORE_FIGURES.items()}  # fmt: skip
    stage_seconds = HistogramMetricFamily(
        "dataflow_stage_seconds", "a stage's seconds per job (dispatch to result)",
        labels=["pipeline", "stage"],
    )  # fmt: skip
    job_seconds = HistogramMetricFamily(
        "dataflow_job_seconds", "a job's seconds from admission to its end, by outcome",
        labels=["pipeline", "outcome"],
    )  # fmt: skip
    for pipeline, entry in report["pipelines"].items():
        for name, health in entry.get("stages", {}).items():
            for metric, (_, _, key) in _STAGE_FIGURES.items():
                if key in health:
                    stage[metric].add_metric([pipeline, name], float(health[key]))
            if health.get("latency"):
                _histogram(stage_seconds, [pipeline, name], health["latency"])
        stats = entry.get("store") or {}
        for metric, (_, _, key) in _STORE_FIGURES.items():
            if key in stats:
                store[metric].add_metric([pipeline], float(stats[key]))
    for row in report.get("job_latency", []):
        _histogram(job_seconds, [row["pipeline"], row["outcome"]], row)
    gpu = {name: GaugeMetricFamily(name, help_, labels=["gpu", "name", "uuid"])
           for name, help_ in _GPU_FIGURES.items()}  # fmt: skip
    for device in report.get("gpus", []):
        labels = [str(device["index"]), device["name"], device["uuid"]]
        gpu["dataflow_gpu_memory_used_bytes"].add_metric(labels, float(device["memory_used"]))
        gpu["dataflow_gpu_memory_total_bytes"].add_metric(labels, float(device["memory_total"]))
        gpu["dataflow_gpu_utilization_ratio"].add_metric(labels, float(device["utilization"]))
    return [*stage.values(), stage_seconds, *store.values(), job_seconds, *gpu.values()]


_GPU_FIGURES = {
    "dataflow_gpu_memory_used_bytes": "GPU memory in use (NVML)",
    "dataflow_gpu_memory_total_bytes": "GPU memory (NVML)",
    "dataflow_gpu_utilization_ratio": "share of time the GPU's compute engine was busy (NVML)",
}


def _connector_families(report: dict[str, Any]) -> list:
    """A connector's own metrics (``{"name", "help", "type", "labels", "value"}``), grouped
    by name; a name given twice with another type or help keeps the first."""
    families: dict[str, Any] = {}
    for name, entry in report["connectors"].items():
        for metric in entry.get("metrics", []):
            labels, values = _labels(sorted(dict(metric.get("labels") or {}).items()))
            key = str(metric["name"])
            family = families.get(key)
            if family is None:
                kind = CounterMetricFamily if metric.get("type") == "counter" else GaugeMetricFamily
                family = families[key] = kind(
                    key, str(metric.get("help") or f"reported by connector {name}"), labels=labels
                )
            try:
                family.add_metric(values, float(metric["value"]))
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("connector_metric_refused", connector=name, metric=key, error=str(exc))
    return list(families.values())


class _Families:
    """A prometheus_client collector over one report."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report

    def collect(self):
        yield from metric_families(self.report)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class HealthWriter:
    """A thread that writes ``health.json`` and ``metrics.prom`` every ``interval`` seconds
    and soon after :meth:`poke`. ``gather()`` returns the report's parts (pipelines, jobs,
    deliveries, connectors); problems, time and pid are added here."""

    def __init__(
        self, state: Path, gather: Callable[[], dict[str, Any]], *, interval: float = 2.0
    ) -> None:
        self.state, self.gather, self.interval = state, gather, interval
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._problems: list[str] = []  # as last logged
        self.started = time.time()

    def report(self) -> dict[str, Any]:
        report = {"time": time.time(), "pid": os.getpid(), "started": self.started,
                  "interval": self.interval, **self.gather()}  # fmt: skip
        report["problems"] = problems_of(report)
        report["status"] = "problems" if report["problems"] else "ok"
        return report

    def write(self, *, stopped: bool = False) -> dict[str, Any]:
        with self._write_lock:
            report = self.report()
            if stopped:
                report["status"] = "stopped"
            _write_json(self.state / HEALTH_FILE, report)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families(report))
            write_to_textfile(str(self.state / METRICS_FILE), registry)  # atomic: tmp + rename
        return report

    def poke(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._log_change(self.write()["problems"])
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop writing, after a last write that says the service stopped (its final
        figures, ``dataflow_up 0``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        try:
            self.write(stopped=True)
        except Exception:
            log.exception("health_not_written")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._log_change(self.write()["problems"])
            except Exception:
                log.exception("health_not_written")

    def _log_change(self, problems: list[str]) -> None:
        """``service_health`` when the problems change: at error level while there are any."""
        if problems != self._problems:
            (log.error if problems else log.info)("service_health", problems=problems)
            self._problems = problems


def read_previous(state: Path) -> dict[str, Any]:
    """The health file a previous run left (before this run overwrites it); {} if none."""
    try:
        return json.loads((state / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return {}


def check(state: Path, *, max_age: float) -> tuple[int, dict[str, Any], str]:
    """``(exit code, report, summary)`` for ``dataflow health``: 0 healthy, 1 problems, 2 not
    running (no process holds the service lock) or stale (the health file is older than
    ``max_age`` seconds: the service hangs)."""
    report = read_previous(state)
    if not ServiceLock.held(state):
        return 2, report, f"not running: no dataflow serve holds {state / LOCK_FILE}"
    if not report:
        return 2, report, f"starting or stale: {state / HEALTH_FILE} is missing or unreadable"
    age = time.time() - float(report.get("time", 0))
    if age > max_age:
        return (
            2,
            report,
            (
                f"stale: {state / HEALTH_FILE} was written {age:.0f} s ago (more than "
                f"{max_age:g} s; pid {ServiceLock.holder(state)} holds the lock but does not write)"
            ),
        )
    if report.get("problems"):
        return 1, report, f"{len(report['problems'])} problem(s)"
    return 0, report, "healthy"
