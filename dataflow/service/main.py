"""``dataflow serve``, ``jobs``, ``health`` and ``exports``: the service's process, its job
listing and retries, its health, its outbox."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from dataflow.errors import MissingFile
from dataflow.service.config import ServiceConfig, load_config
from dataflow.service.jobs import JobRecord, JobStore
from dataflow.service.service import Service, load_connector

__all__ = [
    "format_exports",
    "format_health",
    "format_job",
    "format_jobs",
    "format_retried",
    "open_admins",
    "open_jobs",
    "serve_forever",
    "state_folder",
]

log = structlog.get_logger("dataflow.service")


def serve_forever(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    on_started: Callable[[Service], None] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT; then stop: receivers first, then the jobs in
    flight get ``limits.shutdown-grace`` to finish and are cut short after it (resumed at the
    next start). A second signal cuts them short at once."""
    from dataflow.logs import configure_logging

    config = load_config(config_path, overrides)
    configure_logging(config.log_level, json=config.log_format == "json")
    stop = threading.Event()

    service = Service(config)

    def request_stop(signum, frame) -> None:
        if stop.is_set():
            log.warning("service_aborting", signal=signal.Signals(signum).name)
            service.abort()  # jobs in flight stay recorded as running: run again at start
            return
        log.info("service_stopping", signal=signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.start()
        if on_started is not None:
            on_started(service)
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def state_folder(target: str | Path) -> Path:
    """A service's state folder, from its configuration file or the folder itself."""
    path = Path(target)
    return load_config(path).state if path.is_file() else path


def open_jobs(target: str | Path) -> JobStore:
    """The job records of a service, from its configuration file or its state folder."""
    path = state_folder(target)
    db = path / "jobs.db"
    if not db.is_file():
        raise MissingFile(f"{target}: no job records ({db} does not exist)")
    return JobStore(db)


def _when(seconds: float | None) -> str:
    return "" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _exports_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``PACS: dead, WEB: sent``: each destination's worst state over the job's results."""
    order = {"dead": 0, "pending": 1, "sending": 2, "sent": 3}
    worst: dict[str, str] = {}
    for row in rows:
        now = worst.get(row["destination"])
        if now is None or order.get(row["state"], 1) < order.get(now, 1):
            worst[row["destination"]] = row["state"]
    return ", ".join(f"{d}: {state}" for d, state in sorted(worst.items()))


def format_jobs(
    jobs: Sequence[JobRecord],
    *,
    as_json: bool = False,
    deliveries: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """The listing of ``dataflow jobs``; ``deliveries``: per job, its results' export state
    per destination (a job whose result was dead-lettered shows ``export PACS: dead``)."""
    deliveries = deliveries or {}
    if as_json:
        return "\n".join(
            json.dumps({**job.as_dict(), "exports": list(deliveries.get(job.id, []))})
            for job in jobs
        )
    width = max([24, *(len(job.id) for job in jobs)])  # API jobs have 32-hex ids
    lines = [f"{'JOB':<{width}} {'PIPELINE':<18} {'STATE':<10} {'AE':<16} {'CREATED':<20} SECONDS"]
    for job in jobs:
        ae = str(job.source.get("called_ae", ""))
        seconds = "" if job.seconds is None else f"{job.seconds:.1f}"
        state = job.state
        exports = _exports_text(deliveries.get(job.id, []))
        created = _when(job.created)
        line = f"{job.id:<{width}} {job.pipeline:<18} {state:<10} {ae:<16} {created:<20} "
        line += seconds + (f"  export {exports}" if exports else "")
        if job.error:
            line += f"\n    {job.stage or '?'}: {job.error}"
        elif job.last_error:
            line += f"\n    retried after {job.last_error}"
        for row in deliveries.get(job.id, []):
            if row["state"] == "dead":
                line += f"\n    export {row['destination']} dead: {row['detail'] or '?'}"
        lines.append(line)
    return "\n".join(lines)


def format_job(job: JobRecord, deliveries: Sequence[Mapping[str, Any]]) -> str:
    """``dataflow jobs TARGET --show JOB_ID``: one job, its history, exports and details."""
    lines = [
        f"job       {job.id}",
        f"pipeline  {job.pipeline}",
        f"state     {job.state}" + (f" at {job.stage}" if job.stage else ""),
        f"payload   {job.payload}",
        f"created   {_when(job.created)}",
        f"started   {_when(job.started)}",
        f"finished  {_when(job.finished)}",
        f"attempts  {job.attempts}",
    ]
    if job.reaped is not None:
        lines.append(f"reaped    {_when(job.reaped)}")
    if job.error:
        lines.append(f"error     {job.error}")
    if job.last_error:
        lines.append(f"retried after: {job.last_error}")
    if job.history:
        lines.append("history:")
        lines += [f"  {_when(e['at'])}  attempt {e['attempt']}: {e['what']}" for e in job.history]
    if deliveries:
        lines.append("exports:")
        for row in deliveries:
            detail = f" ({row['detail']})" if row["detail"] else ""
            lines.append(
                f"  {row['destination']}: {row['state']}{detail}  task {row['task_id']}, "
                f"{_when(row['updated'])}"
            )
    if job.details:
        lines += ["details:", *("  " + line for line in job.details.splitlines())]
    return "\n".join(lines)


def format_retried(job: JobRecord, *, as_json: bool = False) -> str:
    """One line for a job put back to ``queued`` by ``dataflow jobs --retry``."""
    if as_json:
        return json.dumps(job.as_dict())
    tries = f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
    error = next(iter((job.last_error or "").splitlines()), "no error recorded")
    return f"{job.id} queued again ({job.pipeline}; {tries} so far, the last failed: {error})"


def format_health(code: int, report: Mapping[str, Any], summary: str) -> str:
    """``dataflow health``: the verdict, the problems, then each pipeline's stages."""
    lines = [summary]
    lines += [f"  problem: {problem}" for problem in report.get("problems", [])] if code < 2 else []
    if code == 2:
        return "\n".join(lines)
    for pipeline, entry in report.get("pipelines", {}).items():
        counters = entry.get("counters") or {}
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counters.items()) if v)
        lines.append(f"pipeline {pipeline}" + (f" ({shown})" if shown else ""))
        for stage, health in entry.get("stages", {}).items():
            reason = f": {health['reason']}" if health.get("reason") else ""
            workers = f" {health.get('live', '?')}/{health.get('workers', '?')} workers"
            lines.append(f"  {stage:<24} {health.get('state', '?')}{reason}{workers}")
    jobs: dict[str, int] = {}
    for row in report.get("jobs", []):
        jobs[row["state"]] = jobs.get(row["state"], 0) + row["count"]
    if jobs:
        lines.append("jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(jobs.items())))
    return "\n".join(lines)


def open_admins(config: ServiceConfig) -> dict[str, Any]:
    """Each configured connector's outbox administration (``Connector.admin``), by name."""
    admins = {}
    for name, section in config.connectors.items():
        admin = getattr(load_connector(name), "admin", None)
        if admin is not None:
            admins[name] = admin(section, config.state / name, config.path)
    return admins


def format_exports(rows: Sequence[Mapping[str, Any]], *, as_json: bool = False) -> str:
    """``dataflow exports``: the outbox's tasks, oldest first."""
    if as_json:
        return "\n".join(json.dumps(dict(row), default=str) for row in rows)
    lines = [
        f"{'TASK':<44} {'JOB':<24} {'DESTINATION':<14} {'STATE':<8} {'TRIES':>5} "
        f"{'FILES':>5} UPDATED"
    ]
    for row in rows:
        updated = row.get("updated")
        when = _when(updated) if isinstance(updated, (int, float)) else str(updated or "")
        lines.append(
            f"{row.get('task_id', ''):<44} {row.get('job_id') or '':<24} "
            f"{row.get('destination', ''):<14} {row.get('state', ''):<8} "
            f"{row.get('attempts', 0):>5} {row.get('instances', 0):>5} {when}"
        )
        if row.get("last_error") and row.get("state") != "sent":
            lines.append(f"    {row['last_error']}")
        if row.get("resend_requested"):
            lines.append("    re-send asked of the running service")
    return "\n".join(lines)
