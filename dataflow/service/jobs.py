"""Job records of the service, in an embedded SQLite database (``STATE/jobs.db``).

A job is one run of one pipeline over one payload folder (a completed DICOM group). States::

    queued -> running -> succeeded | failed

A job created through the platform API (:mod:`dataflow.platform`) starts ``pending`` (created,
not started: its files are uploaded first) and becomes ``queued`` when it is started
(:meth:`JobStore.release`); a ``pending``, ``queued`` or ``running`` job may be ``cancelled``
(:meth:`JobStore.cancel`): the service takes no ``pending`` or ``cancelled`` job, and the end
of a cancelled job's run does not change its state (:meth:`JobStore.finished`).

plus, per registered result of a succeeded job, an *export* row handed to the connector that
serves its agent (``handed``), or ``no-agent`` when no connector does (handed at a later start
if one does then), or ``missing`` when its task folder was gone by then. Every transition is
committed (WAL, ``synchronous=FULL``) before it is acted on, so a restart knows exactly what
to do: ``queued`` and ``running`` jobs run again; exports not yet ``handed`` are handed again
(connectors deduplicate by task id). ``reaped`` records when retention removed a finished
job's outputs (the record itself stays).

A ``failed`` job can be put back to ``queued`` (:meth:`JobStore.retry`, ``dataflow jobs
--retry``, from another process while the service runs); ``last_error`` keeps what it failed
with. Taking a queued job is one conditional update (:meth:`JobStore.started`), so a job
queued by two threads or processes at once runs once.

A job's record keeps the ``details`` of its failure (the traceback, scrubbed of patient data
by the service) and its ``history``: one entry per attempt that did not end by itself (cut
short by a shutdown, the service died while it ran, not resumed, retried by hand), each
``{"attempt", "at", "event", "stage", "what"}``. :meth:`JobStore.interrupted` counts the
attempts cut short since the last retry by hand: the service fails a job at start rather than
resume it once that count reaches ``max-attempts``.

*Deliveries* are where each registered result stands per destination, as the connector that
exports it reports (``pending``, ``sent``, ``dead``; :meth:`JobStore.delivery`): ``dataflow
jobs`` shows them, so a job whose result was dead-lettered does not look simply succeeded.

*Provenance* (:mod:`dataflow.execution.provenance`): when a job ends, the record the engine
wrote as ``JOBS/JOB/provenance.json`` (``JOBS``: the ``jobs`` folder next to ``jobs.db``) is
kept with it, and indexed: each output SOP Instance UID and each input study, series and
SOP Instance UID -> the jobs (:meth:`JobStore.provenance`, :meth:`JobStore.trace`; what
``dataflow trace`` asks). The record outlives retention's removal of the job's folder.

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

from dataflow.durable import open_database
from dataflow.errors import DataflowError

__all__ = ["JOB_STATES", "JobNotFound", "JobRecord", "JobStore", "RetryRefused"]

JOB_STATES = ("queued", "running", "succeeded", "failed", "pending", "cancelled")

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
    reaped REAL,
    last_error TEXT,
    details TEXT,
    history TEXT
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
CREATE TABLE IF NOT EXISTS deliveries (
    task_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    job_id TEXT,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (task_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id);
CREATE TABLE IF NOT EXISTS provenance (
    job_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS traced (
    uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (uid, kind, job_id)
);
CREATE INDEX IF NOT EXISTS traced_job ON traced (job_id);
"""
#: what a UID is to a job, in the ``traced`` index: an output instance, or an input's
TRACED = ("output", "study", "series", "instance")
#: history events that count as an attempt cut short (towards ``max-attempts``)
INTERRUPTED = ("cut_short", "service_died")


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
    last_error: str | None = None  # "STAGE: ERROR" of the failed attempt last retried
    details: str | None = None  # a failure's traceback, scrubbed of patient data
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": self.seconds}


class JobNotFound(DataflowError, KeyError):
    """No job has this id (the message names it and the records' file)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RetryRefused(DataflowError):
    """A job cannot be retried (the message names the job and says why)."""


class JobStore:
    """Thread-safe access to ``jobs.db`` (one connection, one lock: commits are short)."""

    def __init__(self, path: str | Path, jobs_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        #: the jobs' folders (``JOB/provenance.json``): the service's ``STATE/jobs``
        self.jobs_dir = Path(jobs_dir) if jobs_dir is not None else self.path.parent / "jobs"
        self._db = open_database(self.path)
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        # a jobs.db from before retention, retries, details: added in the schema's order
        added = (("reaped", "REAL"), ("last_error", "TEXT"), ("details", "TEXT"),
                 ("history", "TEXT"))  # fmt: skip
        for column, kind in added:
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
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
        self,
        pipeline: str,
        payload: str | Path,
        *,
        source: dict | None = None,
        key: str | None,
        job_id: str | None = None,
        state: str = "queued",
    ) -> tuple[JobRecord, bool]:
        """A new ``queued`` job (``pending``: created by the platform API, not started yet),
        or the existing one with this ``key``: (job, created). ``job_id``: the platform's
        32-hex ids; by default ``YYYYmmdd-HHMMSS-xxxxxxxx``."""
        if state not in ("queued", "pending"):
            raise ValueError(f"a job is created queued or pending, not {state!r}")
        if key is not None:
            existing = self._rows("SELECT * FROM jobs WHERE key = ?", (key,))
            if existing:
                return existing[0], False
        job_id = job_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._write(
            "INSERT INTO jobs (id, key, pipeline, payload, source, state, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, key, pipeline, str(payload), json.dumps(source or {}), state, time.time()),
        )
        return self.get(job_id), True

    def by_key(self, key: str) -> JobRecord | None:
        """The job a connector made with this key (see :meth:`create`), if any."""
        rows = self._rows("SELECT * FROM jobs WHERE key = ?", (key,))
        return rows[0] if rows else None

    def get(self, job_id: str) -> JobRecord:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r} in {self.path}")
        return rows[0]

    def started(self, job_id: str, *, was: tuple[str, ...] = ("queued",)) -> bool:
        """Mark a job ``running`` (one attempt more) if its state is one of ``was``; returns
        whether it was. Of two takers of one queued job (the thread that submitted it and the
        service's watcher, or two processes), only one gets it."""
        cursor = self._write(
            "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1"
            f" WHERE id = ? AND state IN ({', '.join('?' * len(was))})",
            (time.time(), job_id, *was),
        )
        return cursor.rowcount == 1

    def finished(
        self,
        job_id: str,
        ok: bool,
        *,
        stage: str | None = None,
        error: str | None = None,
        details: str | None = None,
    ) -> bool:
        """Record a job's end; False (nothing changed) if it was cancelled meanwhile."""
        cursor = self._write(
            "UPDATE jobs SET state = ?, finished = ?, stage = ?, error = ?, details = ?"
            " WHERE id = ? AND state != 'cancelled'",
            ("succeeded" if ok else "failed", time.time(), stage, error, details or None, job_id),
        )
        if cursor.rowcount == 1:
            self.keep_provenance(job_id)
        return cursor.rowcount == 1

    def release(self, job_id: str) -> bool:
        """A ``pending`` job becomes ``queued`` (started by the platform API); False if it was
        not pending (started already, or cancelled)."""
        cursor = self._write(
            "UPDATE jobs SET state = 'queued' WHERE id = ? AND state = 'pending'", (job_id,)
        )
        return cursor.rowcount == 1

    def cancel(self, job_id: str, reason: str) -> str | None:
        """Cancel a ``pending``, ``queued`` or ``running`` job; the state it had, or None if
        it had ended already (or does not exist)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in ("pending", "queued", "running"):
                return None
            cursor = self._db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, error = ? "
                "WHERE id = ? AND state = ?",
                (time.time(), reason, job_id, row[0]),
            )
        return row[0] if cursor.rowcount == 1 else None

    def note(self, job_id: str, event: str, what: str, *, stage: str | None = None) -> JobRecord:
        """Add a history entry for the job's current attempt (see the module docstring)."""
        with self._lock:
            row = self._db.execute(
                "SELECT attempts, history FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r} in {self.path}")
            history = json.loads(row[1] or "[]")
            history.append(
                {"attempt": row[0], "at": time.time(), "event": event, "stage": stage,
                 "what": what}
            )  # fmt: skip
            self._db.execute(
                "UPDATE jobs SET history = ? WHERE id = ?", (json.dumps(history), job_id)
            )
        return self.get(job_id)

    @staticmethod
    def interrupted(job: JobRecord) -> list[dict[str, Any]]:
        """The job's attempts cut short (shutdown, the service died) since it was last
        retried by hand, oldest first."""
        out: list[dict[str, Any]] = []
        for entry in job.history:
            if entry.get("event") == "retried":
                out.clear()
            elif entry.get("event") in INTERRUPTED:
                out.append(entry)
        return out

    def fail(self, job_id: str, error: str, *, was: tuple[str, ...]) -> bool:
        """Fail a job that is still in one of ``was`` (a job not resumed); whether it was."""
        cursor = self._write(
            "UPDATE jobs SET state = 'failed', finished = ?, error = ?"
            f" WHERE id = ? AND state IN ({', '.join('?' * len(was))})",
            (time.time(), error, job_id, *was),
        )
        return cursor.rowcount == 1

    def unfinished(self, states: tuple[str, ...] = ("queued", "running")) -> list[JobRecord]:
        """Jobs to run (again), oldest first: at start, queued or running when the service
        stopped; while it runs, ``("queued",)``: those recorded by another process (a retry)."""
        return self._rows(
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))}) ORDER BY created",
            states,
        )

    def retry(self, job_id: str) -> JobRecord:
        """Put a failed job back to ``queued``: a running service picks it up within seconds,
        a stopped one at its next start. Its stage, error, start and end are cleared,
        ``attempts`` is kept and ``last_error`` keeps what it failed with. Refused
        (:class:`RetryRefused`, saying why) for an unknown job, one that is not ``failed``,
        one whose outputs retention removed (``reaped``: its study may be gone too) and one
        whose payload folder no longer exists."""
        try:
            job = self.get(job_id)
        except KeyError as exc:
            raise RetryRefused(exc.args[0]) from None
        if job.state != "failed":
            raise RetryRefused(f"job {job_id} is {job.state}: only a failed job can be retried")
        if job.reaped is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.reaped))
            raise RetryRefused(
                f"job {job_id}: retention removed its outputs at {when} (its study may be gone "
                "too): re-send the study"
            )
        if not Path(job.payload).is_dir():
            raise RetryRefused(
                f"job {job_id}: its payload folder {job.payload} no longer exists: re-send the "
                "study"
            )
        error = f"{job.stage}: {job.error}" if job.stage else job.error
        cursor = self._write(
            "UPDATE jobs SET state = 'queued', started = NULL, finished = NULL, stage = NULL,"
            " error = NULL, details = NULL, last_error = ?"
            " WHERE id = ? AND state = 'failed' AND reaped IS NULL",
            (error, job_id),
        )
        if cursor.rowcount != 1:  # retried or reaped meanwhile, by another process
            raise RetryRefused(f"job {job_id} changed while it was retried: try again")
        return self.note(job_id, "retried", f"retried by hand after: {error}")

    def list(
        self,
        *,
        state: str | None = None,
        limit: int = 100,
        states: tuple[str, ...] = (),
        pipelines: tuple[str, ...] = (),
        created_after: float | None = None,
        finished_before: float | None = None,
    ) -> list[JobRecord]:
        """Jobs, newest first: in ``state`` (or any of ``states``), of any of ``pipelines``,
        created after, finished before (seconds since the epoch)."""
        where, args = [], []
        states = (*states, state) if state is not None else states
        for column, values in (("state", states), ("pipeline", pipelines)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args += list(values)
        if created_after is not None:
            where.append("created > ?")
            args.append(created_after)
        if finished_before is not None:
            where.append("finished IS NOT NULL AND finished < ?")
            args.append(finished_before)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._rows(sql + " ORDER BY created DESC LIMIT ?", (*args, limit))

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

    def mark_reaped(self, job_id: str, state: str) -> bool:
        """Record that retention removes the job's outputs, if it is still ``state`` and not
        reaped; returns whether it was (a job retried meanwhile is not reaped)."""
        cursor = self._write(
            "UPDATE jobs SET reaped = ? WHERE id = ? AND state = ? AND reaped IS NULL",
            (time.time(), job_id, state),
        )
        return cursor.rowcount == 1

    def payload_in_use(self, payload: str) -> bool:
        """Whether a job over ``payload`` is not reaped yet (it still needs its input)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs WHERE payload = ? AND reaped IS NULL LIMIT 1", (payload,)
            ).fetchone()
        return row is not None

    # ----------------------------------------------------------- provenance

    def keep_provenance(self, job_id: str, record: dict[str, Any] | None = None) -> bool:
        """Keep the job's provenance (``record``, else its folder's ``provenance.json``) and
        index it, replacing what an earlier attempt left; False when there is none."""
        if record is None:
            try:
                record = json.loads((self.jobs_dir / job_id / "provenance.json").read_text())
            except (OSError, ValueError):
                return False
        inputs = record.get("inputs") or {}
        rows = [(o["sop_instance_uid"], "output", job_id)
                for o in record.get("outputs") or () if o.get("sop_instance_uid")]  # fmt: skip
        for kind, key in (("study", "studies"), ("series", "series"),
                          ("instance", "sop_instance_uids")):  # fmt: skip
            rows += [(str(uid), kind, job_id) for uid in inputs.get(key) or ()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one transaction: index and record together
            try:
                self._db.execute("DELETE FROM traced WHERE job_id = ?", (job_id,))
                self._db.execute(
                    "INSERT INTO provenance (job_id, record, updated) VALUES (?, ?, ?) ON CONFLICT"
                    " (job_id) DO UPDATE SET record = excluded.record, updated = excluded.updated",
                    (job_id, json.dumps(record), time.time()),
                )
                self._db.executemany("INSERT OR IGNORE INTO traced (uid, kind, job_id) "
                                     "VALUES (?, ?, ?)", rows)  # fmt: skip
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return True

    def provenance(self, job_id: str) -> dict[str, Any] | None:
        """The job's provenance record, or None (not ended yet, or from before provenance)."""
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM provenance WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def trace(self, uid: str) -> list[tuple[str, str]]:
        """``(job id, kind)`` for each job that made ``uid`` (kind ``output``) or took it in
        (``study``, ``series``, ``instance``), oldest job first; a job id itself gives
        ``(uid, "job")`` when it has provenance."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.job_id, t.kind FROM traced t JOIN jobs j ON j.id = t.job_id"
                " WHERE t.uid = ? ORDER BY j.created, t.kind",
                (uid,),
            ).fetchall()
            if (
                not rows
                and self._db.execute("SELECT 1 FROM provenance WHERE job_id = ?", (uid,)).fetchone()
            ):
                rows = [(uid, "job")]
        return [(job, kind) for job, kind in rows]

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

    def delivery(self, task_id: str, destination: str, state: str, detail: str = "") -> None:
        """Where a registered result stands at one destination (``pending``, ``sent``,
        ``dead``), as its connector reports it. ``task_id`` is the registration's task id
        (or the connector's ``TASKID-DESTINATION``): the job is found through its export."""
        with self._lock:
            job = None
            for candidate in (task_id, task_id.removesuffix(f"-{destination}")):
                row = self._db.execute(
                    "SELECT job_id FROM exports WHERE task_id = ?", (candidate,)
                ).fetchone()
                if row is not None:
                    job, task_id = row[0], candidate
                    break
            self._db.execute(
                "INSERT INTO deliveries (task_id, destination, job_id, state, detail, updated)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, destination) DO UPDATE SET"
                " state = excluded.state, detail = excluded.detail, updated = excluded.updated",
                (task_id, destination, job, state, detail, time.time()),
            )

    def deliveries(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every delivery (of one job), by task and destination."""
        sql = "SELECT task_id, destination, job_id, state, detail, updated FROM deliveries"
        args: tuple = ()
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", (job_id,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY task_id, destination", args).fetchall()
        keys = ("task_id", "destination", "job_id", "state", "detail", "updated")
        return [dict(zip(keys, row)) for row in rows]

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """``{(destination, state): count}`` over every delivery."""
        return self._counts("deliveries", "destination")

    def pipeline_counts(self) -> dict[tuple[str, str], int]:
        """``{(pipeline, state): count}`` over every job."""
        return self._counts("jobs", "pipeline")

    def _counts(self, table: str, column: str) -> dict[tuple[str, str], int]:
        sql = f"SELECT {column}, state, COUNT(*) FROM {table} GROUP BY {column}, state"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return {(key, state): n for key, state, n in rows}

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
     stage, error, reaped, last_error, details, history) = row  # fmt: skip
    return JobRecord(
        job_id, key, pipeline, payload, json.loads(source), state, created, started, finished,
        attempts, stage, error, reaped, last_error, details, json.loads(history or "[]"),
    )  # fmt: skip
