"""Job records of the service, in an embedded SQLite database (``STATE/jobs.db``).

A job is one run of one pipeline over one payload folder (a completed DICOM group). States::

    queued -> running -> succeeded | failed

plus, per registered result of a succeeded job, an *export* row handed to the connector that
serves its agent (``handed``), or ``no-agent`` when no connector does. Every transition is
committed (WAL, ``synchronous=FULL``) before it is acted on, so a restart knows exactly what
to do: ``queued`` and ``running`` jobs run again; exports not yet ``handed`` are handed again
(connectors deduplicate by task id). ``reaped`` records when retention removed a finished
job's outputs (the record itself stays).

``key`` makes submission idempotent: a source that hands the same work twice (a receiver
restarted between recording a job and marking its group dispatched) gets the same job back.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["JOB_STATES", "JobRecord", "JobStore"]

JOB_STATES = ("queued", "running", "succeeded", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT UNIQUE,
    pipeline TEXT NOT NULL,
    payload TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    stage TEXT,
    error TEXT,
    reaped REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS exports (
    task_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    agent TEXT NOT NULL,
    task_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: str
    key: str | None
    pipeline: str
    payload: str
    source: dict[str, Any]
    state: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    stage: str | None
    error: str | None
    reaped: float | None = None  # when retention removed its outputs

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": self.seconds}


class JobStore:
    """Thread-safe access to ``jobs.db`` (one connection, one lock: commits are short)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "reaped" not in columns:  # a jobs.db from before retention
            self._db.execute("ALTER TABLE jobs ADD COLUMN reaped REAL")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple = ()) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_record(row) for row in rows]

    # ----------------------------------------------------------------- jobs

    def create(
        self, pipeline: str, payload: str | Path, *, source: dict | None = None, key: str | None
    ) -> tuple[JobRecord, bool]:
        """A new ``queued`` job, or the existing one with this ``key``: (job, created)."""
        if key is not None:
            existing = self._rows("SELECT * FROM jobs WHERE key = ?", (key,))
            if existing:
                return existing[0], False
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._write(
            "INSERT INTO jobs (id, key, pipeline, payload, source, state, created) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
            (job_id, key, pipeline, str(payload), json.dumps(source or {}), time.time()),
        )
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise KeyError(f"no job {job_id!r} in {self.path}")
        return rows[0]

    def started(self, job_id: str) -> None:
        self._write(
            "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
            (time.time(), job_id),
        )

    def finished(
        self, job_id: str, ok: bool, *, stage: str | None = None, error: str | None = None
    ) -> None:
        self._write(
            "UPDATE jobs SET state = ?, finished = ?, stage = ?, error = ? WHERE id = ?",
            ("succeeded" if ok else "failed", time.time(), stage, error, job_id),
        )

    def unfinished(self) -> list[JobRecord]:
        """Jobs to run (again) at start: queued, or running when the service stopped."""
        return self._rows(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
        )

    def list(self, *, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        if state is not None:
            return self._rows(
                "SELECT * FROM jobs WHERE state = ? ORDER BY created DESC LIMIT ?", (state, limit)
            )
        return self._rows("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict(rows)

    # ------------------------------------------------------------ retention

    def due_for_reaping(self, now: float, keep: dict[str, float | None]) -> list[JobRecord]:
        """Finished jobs not reaped yet, finished longer ago than ``keep[state]`` (None:
        kept for ever), none of whose registered results still waits to be handed over."""
        due = []
        for state, seconds in keep.items():
            if seconds is None:
                continue
            due += self._rows(
                "SELECT * FROM jobs WHERE state = ? AND reaped IS NULL AND finished <= ?"
                " AND NOT EXISTS (SELECT 1 FROM exports e WHERE e.job_id = jobs.id"
                " AND e.state = 'new') ORDER BY finished",
                (state, now - seconds),
            )
        return due

    def mark_reaped(self, job_id: str) -> None:
        self._write("UPDATE jobs SET reaped = ? WHERE id = ?", (time.time(), job_id))

    def payload_in_use(self, payload: str) -> bool:
        """Whether a job over ``payload`` is not reaped yet (it still needs its input)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs WHERE payload = ? AND reaped IS NULL LIMIT 1", (payload,)
            ).fetchone()
        return row is not None

    # -------------------------------------------------------------- exports

    def add_export(self, task_id: str, job_id: str, agent: str, task_dir: Path) -> None:
        self._write(
            "INSERT OR IGNORE INTO exports (task_id, job_id, agent, task_dir, state, updated) "
            "VALUES (?, ?, ?, ?, 'new', ?)",
            (task_id, job_id, agent, str(task_dir), time.time()),
        )

    def export_state(self, task_id: str, state: str) -> None:
        self._write(
            "UPDATE exports SET state = ?, updated = ? WHERE task_id = ?",
            (state, time.time(), task_id),
        )

    def exports(self, *, state: str | None = None) -> Iterator[dict[str, Any]]:
        sql = "SELECT task_id, job_id, agent, task_dir, state, updated FROM exports"
        with self._lock:
            rows = (
                self._db.execute(sql + " WHERE state = ?", (state,)).fetchall()
                if state
                else self._db.execute(sql).fetchall()
            )
        keys = ("task_id", "job_id", "agent", "task_dir", "state", "updated")
        for row in rows:
            yield dict(zip(keys, row))


def _record(row: tuple) -> JobRecord:
    (job_id, key, pipeline, payload, source, state, created, started, finished, attempts,
     stage, error, reaped) = row  # fmt: skip
    return JobRecord(
        job_id, key, pipeline, payload, json.loads(source), state, created, started, finished,
        attempts, stage, error, reaped,
    )  # fmt: skip
