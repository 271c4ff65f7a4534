"""``dataflow serve`` and ``dataflow jobs``: the service's process, its job listing and retries."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from dataflow.service.config import load_config
from dataflow.service.jobs import JobRecord, JobStore
from dataflow.service.service import Service

__all__ = ["format_jobs", "format_retried", "open_jobs", "serve_forever"]

log = structlog.get_logger("dataflow.service")


def serve_forever(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    on_started: Callable[[Service], None] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT; then stop cleanly: receivers first, then the
    jobs in flight finish. A second signal stops the pipelines at once (busy workers killed;
    their jobs run again at the next start)."""
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


def open_jobs(target: str | Path) -> JobStore:
    """The job records of a service, from its configuration file or its state folder."""
    path = Path(target)
    if path.is_file():
        path = load_config(path).state
    db = path / "jobs.db"
    if not db.is_file():
        raise FileNotFoundError(f"{target}: no job records ({db} does not exist)")
    return JobStore(db)


def format_jobs(jobs: Sequence[JobRecord], *, as_json: bool = False) -> str:
    if as_json:
        return "\n".join(json.dumps(job.as_dict()) for job in jobs)
    lines = [f"{'JOB':<24} {'PIPELINE':<18} {'STATE':<10} {'AE':<16} {'CREATED':<20} SECONDS"]
    for job in jobs:
        ae = str(job.source.get("called_ae", ""))
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created))
        seconds = "" if job.seconds is None else f"{job.seconds:.1f}"
        line = f"{job.id:<24} {job.pipeline:<18} {job.state:<10} {ae:<16} {created:<20} {seconds}"
        if job.error:
            line += f"\n    {job.stage or '?'}: {job.error}"
        elif job.last_error:
            line += f"\n    retried after {job.last_error}"
        lines.append(line)
    return "\n".join(lines)


def format_retried(job: JobRecord, *, as_json: bool = False) -> str:
    """One line for a job put back to ``queued`` by ``dataflow jobs --retry``."""
    if as_json:
        return json.dumps(job.as_dict())
    tries = f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
    error = next(iter((job.last_error or "").splitlines()), "no error recorded")
    return f"{job.id} queued again ({job.pipeline}; {tries} so far, the last failed: {error})"
