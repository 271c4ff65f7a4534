"""The durable outbox of export tasks: SQLite (WAL) plus the outbox's own copy of the files.

A task is a set of files for one destination, in one of four states::

    pending ──claim──▶ in-progress ──all delivered──▶ succeeded   (its files are removed)
       ▲                    │
       └──failed attempt────┤ (backoff: initial·factor^(n-1), capped, jittered)
                            └──deadline passed / max attempts / an instance refused──▶ dead

Each file has its own progress (``pending``, ``delivered``, ``failed``), so a retried task sends
only what was not yet accepted. ``enqueue`` returns only once the files are linked or copied
into the outbox folder, fsynced, and the rows committed with ``synchronous=FULL``; the job's own
folders may then be deleted. Dead tasks keep their files and reason until
:meth:`Outbox.requeue` or :meth:`Outbox.delete`: nothing is dropped silently.

One process owns an outbox: it holds an OS lock (``flock`` on ``outbox.lock``, which names its
pid) for as long as the :class:`Outbox` is open; the kernel releases it when the process dies,
however it dies. Only the owner recovers (on open, ``in-progress`` tasks, a crash or a stop
mid-send, become ``pending`` again; folders of enqueues that never committed go) and claims
tasks. Any other process that opens the outbox is a guest: it reads, and asks. Its
:meth:`Outbox.requeue` records a request (table ``requests``) that the owner carries out at its
next :meth:`Outbox.take_requests` (the exporter's loop polls it); when no process owns the
outbox, ``Outbox(root)`` takes the lock and acts at once. ``Outbox(root, owner=True)`` (the
service) waits for the lock and refuses to start as a guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dataflow.durable import link_or_copy, open_database
from dataflow.registered import Registration

from .transport import ExportError, FileInfo, FileResult, describe_file

__all__ = ["STATES", "FileRecord", "Outbox", "OutboxBusy", "RetryPolicy", "Task"]

STATES = ("pending", "in-progress", "succeeded", "dead")
INSERT_TASK = "INSERT INTO tasks VALUES (?, ?, ?, 'pending', 0, ?, '', ?, ?, ?)"
INSERT_FILE = "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, 'pending', NULL, '')"
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also the name of its folder

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_attempt REAL NOT NULL, last_error TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, deadline REAL NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (state, next_attempt);
CREATE TABLE IF NOT EXISTS files (
    task_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, sop_class TEXT NOT NULL,
    sop_instance TEXT NOT NULL, transfer_syntax TEXT NOT NULL, state TEXT NOT NULL,
    status INTEGER, error TEXT NOT NULL, PRIMARY KEY (task_id, idx));
CREATE TABLE IF NOT EXISTS requests (
    task_id TEXT PRIMARY KEY, action TEXT NOT NULL, pid INTEGER NOT NULL, created REAL NOT NULL);
"""
LOCK_FILE = "outbox.lock"


class OutboxBusy(ExportError):
    """Another process owns the outbox (``Outbox(root, owner=True)`` waited in vain, or a guest
    tried what only the owner may do)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap; a task dies after ``deadline`` seconds (from enqueue) or
    ``max_attempts`` failed attempts, whichever comes first."""

    initial_delay: float = 5.0
    factor: float = 2.0
    max_delay: float = 300.0
    deadline: float = 24 * 3600.0
    max_attempts: int | None = None
    jitter: float = 0.1  # ± fraction of the delay, so that many tasks do not retry in step

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...)."""
        base = min(self.max_delay, self.initial_delay * self.factor ** max(0, attempts - 1))
        if self.jitter and rng is not None:
            base *= 1 + self.jitter * (2 * rng.random() - 1)
        return max(0.0, base)


@dataclass(frozen=True)
class Task:
    id: str
    job_id: str
    destination: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str
    created: float
    updated: float
    deadline: float
    files: int
    delivered: int
    failed: int


@dataclass(frozen=True)
class FileRecord:
    index: int
    name: str
    sop_instance: str
    state: str  # pending | delivered | failed
    status: int | None
    error: str


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sources(source: str | Path | Iterable[str | Path]) -> list[tuple[Path, str]]:
    """(file, name inside the task) for a task folder (task.json + files/), a folder, a file or
    a list of files."""
    if isinstance(source, str | Path):
        path = Path(source)
        if Registration.present(path):
            return Registration.read(path).files(path)
        if path.is_dir():
            return [
                (p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*")) if p.is_file()
            ]
        return [(path, path.name)]
    files = [Path(p) for p in source]
    return [(p, f"{k:05d}_{p.name}") for k, p in enumerate(files)]


def _take_lock(path: Path, wait: float) -> int | None:
    """The descriptor of ``path`` locked (``flock``, exclusive) and holding our pid; None when
    another process holds it for ``wait`` seconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    end = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                return None
            time.sleep(0.05)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


class Outbox:
    """Export tasks in ``root/outbox.sqlite``, their files under ``root/tasks/<id>/``.

    ``owner``: None (the default) owns the outbox when no other process does, else opens it as
    a guest; True waits up to ``lock_timeout`` seconds for it, then raises :class:`OutboxBusy`;
    False is always a guest (reads and requests only)."""

    def __init__(
        self,
        root: str | Path,
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        owner: bool | None = None,
        lock_timeout: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.folder = self.root / "tasks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = None
        if owner is not False:
            self._lock_fd = _take_lock(self.root / LOCK_FILE, lock_timeout if owner else 0.0)
            if self._lock_fd is None and owner:
                raise OutboxBusy(
                    f"outbox {self.root} is owned by process {self.owner_pid()} "
                    f"(waited {lock_timeout:g} s for {LOCK_FILE})"
                )
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        self._lock = threading.RLock()
        try:
            self._db = open_database(self.root / "outbox.sqlite", full=False)
            self._db.executescript(SCHEMA)
            if self.owner:
                self.recover()
        except BaseException:
            if self._lock_fd is not None:  # not left held by an outbox that never opened
                os.close(self._lock_fd)
                self._lock_fd = None
            raise

    @property
    def owner(self) -> bool:
        """Whether this process owns the outbox (holds its lock)."""
        return self._lock_fd is not None

    def owner_pid(self) -> str:
        """The pid the lock file names (the owner's, or the last owner's); '?' if none."""
        try:
            return (self.root / LOCK_FILE).read_text().strip() or "?"
        except OSError:
            return "?"

    def _owner_only(self, what: str) -> None:
        if not self.owner:
            raise OutboxBusy(
                f"outbox {self.root}: only its owner (process {self.owner_pid()}) may {what}"
            )

    def _write(self, sql: str, args: tuple = (), *, full: bool = True) -> None:
        self._transaction([(sql, args)], full=full)

    def _transaction(self, statements: Iterable[tuple[str, tuple]], *, full: bool = True) -> None:
        """Run ``statements`` in one transaction; ``full``: synchronous=FULL for its commit."""
        with self._lock:
            self._db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def recover(self) -> int:
        """In-progress tasks become pending (due now); half-written folders go. Returns how
        many tasks were resumed. Only the owner recovers: elsewhere, a task in progress is
        being sent."""
        self._owner_only("recover it")
        with self._lock:
            known = {row[0] for row in self._rows("SELECT id FROM tasks")}
            for path in self.folder.iterdir():
                if path.name not in known:  # an enqueue that never committed
                    shutil.rmtree(path, ignore_errors=True)
            count = len(self._rows("SELECT id FROM tasks WHERE state='in-progress'"))
            self._write(
                "UPDATE tasks SET state='pending', next_attempt=?, updated=? "
                "WHERE state='in-progress'",
                (self.clock(), self.clock()),
            )
        return count

    def enqueue(
        self,
        source: str | Path | Iterable[str | Path],
        destination: str,
        *,
        job_id: str = "",
        task_id: str | None = None,
        deadline: float | None = None,
    ) -> Task:
        """Make a durable task of ``source``'s files for ``destination``; ``deadline`` in
        seconds from now overrides the policy's. Raises :class:`ExportError` on a file that is
        not DICOM (nothing is queued then)."""
        task_id = task_id or uuid.uuid4().hex
        if not TASK_ID.match(task_id) or task_id.endswith(".partial"):
            raise ExportError(f"task ID {task_id!r}: 1-128 letters, digits, '.', '_' or '-'")
        if self.get(task_id) is not None:
            raise ExportError(f"outbox task {task_id!r} exists already")
        sources = _sources(source)
        if not sources:
            raise ExportError(f"nothing to export for job {job_id!r}: no files")
        infos = [describe_file(path) for path, _ in sources]
        partial = self.folder / f"{task_id}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        rows = []
        for k, ((path, name), info) in enumerate(zip(sources, infos)):
            target = partial / name
            link_or_copy(path, target)
            _fsync(target)
            rows.append((task_id, k, name, info.sop_class, info.sop_instance, info.transfer_syntax))
        for directory in {partial / name for _, name in sources}:
            _fsync(directory.parent)
        final = self.folder / task_id
        os.replace(partial, final)
        _fsync(self.folder)
        now = self.clock()
        limit = now + (self.policy.deadline if deadline is None else deadline)
        task_row = (task_id, job_id, destination, now, now, now, limit)
        try:
            self._transaction([(INSERT_TASK, task_row), *((INSERT_FILE, row) for row in rows)])
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return self.get(task_id)  # type: ignore[return-value]

    def mark_dead(self, task_id: str, reason: str) -> None:
        """Dead-letter ``task_id`` now (e.g. its destination is not configured)."""
        self._write(
            "UPDATE tasks SET state='dead', last_error=?, updated=? WHERE id=?",
            (reason, self.clock(), task_id),
        )

    def claim(self, destination: str | None = None, exclude: Iterable[str] = ()) -> Task | None:
        """The next due pending task (of ``destination``, not in ``exclude``), now
        in-progress; None if there is none."""
        self._owner_only("claim its tasks")
        with self._lock:
            where = "state='pending' AND next_attempt<=?"
            args: tuple = (self.clock(),)
            if destination is not None:
                where, args = where + " AND destination=?", (*args, destination)
            if skip := list(exclude):
                where, args = f"{where} AND id NOT IN ({','.join('?' * len(skip))})", (*args, *skip)
            row = self._rows(
                f"SELECT id FROM tasks WHERE {where} ORDER BY next_attempt, created LIMIT 1", args
            )
            if not row:
                return None
            self._write(
                "UPDATE tasks SET state='in-progress', updated=? WHERE id=?",
                (self.clock(), row[0][0]),
            )
            return self.get(row[0][0])

    def pending_files(self, task_id: str) -> list[tuple[int, FileInfo]]:
        rows = self._rows(
            "SELECT idx, name, sop_class, sop_instance, transfer_syntax FROM files "
            "WHERE task_id=? AND state='pending' ORDER BY idx",
            (task_id,),
        )
        base = self.folder / task_id
        return [(idx, FileInfo(base / name, *rest)) for idx, name, *rest in rows]

    def record(self, task_id: str, result: FileResult) -> None:
        """One instance's outcome (delivered, refused for good, or to be retried)."""
        state = {"delivered": "delivered", "permanent": "failed"}.get(result.outcome, "pending")
        self._write(
            "UPDATE files SET state=?, status=?, error=? WHERE task_id=? AND idx=?",
            (state, result.status, result.error, task_id, result.index),
            full=False,  # losing this on power loss only resends an instance
        )

    def release(self, task_id: str) -> None:
        """Back to pending, due now, without counting an attempt (a stop interrupted it)."""
        self._write(
            "UPDATE tasks SET state='pending', next_attempt=?, updated=? WHERE id=?",
            (self.clock(), self.clock(), task_id),
        )

    def finish_attempt(self, task_id: str, error: str = "") -> Task:
        """Close an attempt: succeeded when every file is delivered; dead when instances were
        refused for good and nothing else is left, or the deadline / attempts ran out;
        otherwise pending again after the backoff."""
        with self._lock:
            task = self.get(task_id)
            if task is None:
                raise ExportError(f"no outbox task {task_id!r}")
            now, attempts = self.clock(), task.attempts + 1
            pending = task.files - task.delivered - task.failed
            policy = self.policy
            if pending == 0 and task.failed == 0:
                state, next_attempt, error = "succeeded", now, ""
            elif pending == 0:
                state, next_attempt, error = "dead", now, self._refusals(task)
            elif policy.max_attempts is not None and attempts >= policy.max_attempts:
                state, next_attempt = "dead", now
                error = f"gave up after {attempts} attempts: {error}"
            elif now >= task.deadline:
                state, next_attempt = "dead", now
                error = f"deadline passed after {attempts} attempts: {error}"
            else:
                state = "pending"
                next_attempt = min(now + policy.delay(attempts, self.rng), task.deadline)
            self._write(
                "UPDATE tasks SET state=?, attempts=?, next_attempt=?, last_error=?, updated=? "
                "WHERE id=?",
                (state, attempts, next_attempt, error, now, task_id),
            )
            if state == "succeeded":
                shutil.rmtree(self.folder / task_id, ignore_errors=True)
            return self.get(task_id)  # type: ignore[return-value]

    def _refusals(self, task: Task) -> str:
        rows = self._rows(
            "SELECT idx, error FROM files WHERE task_id=? AND state='failed' ORDER BY idx",
            (task.id,),
        )
        shown = "; ".join(f"file #{idx}: {error}" for idx, error in rows[:3])
        more = f" (+{len(rows) - 3} more)" if len(rows) > 3 else ""
        return f"{len(rows)} of {task.files} instance(s) refused: {shown}{more}"

    def get(self, task_id: str) -> Task | None:
        rows = self._select("WHERE t.id=?", (task_id,))
        return rows[0] if rows else None

    def tasks(self, state: str | None = None) -> list[Task]:
        if state is None:
            return self._select("", ())
        if state not in STATES:
            raise ExportError(f"unknown task state {state!r}: one of {', '.join(STATES)}")
        return self._select("WHERE t.state=?", (state,))

    def dead_letters(self) -> list[Task]:
        return self.tasks("dead")

    def files(self, task_id: str) -> list[FileRecord]:
        rows = self._rows(
            "SELECT idx, name, sop_instance, state, status, error FROM files WHERE task_id=? "
            "ORDER BY idx",
            (task_id,),
        )
        return [FileRecord(*row) for row in rows]

    def next_due(self) -> float | None:
        """When the earliest pending task is due (clock time), None if there is none."""
        rows = self._rows("SELECT MIN(next_attempt) FROM tasks WHERE state='pending'")
        return rows[0][0]

    def requeue(self, task_id: str, *, deadline: float | None = None) -> Task:
        """A dead task goes back to pending: attempts 0, refused files retried, new deadline.
        In a guest, the owner is asked to (:meth:`take_requests`): the task is returned as it
        is, still dead, and :meth:`requested` names it until the owner acts."""
        task = self.get(task_id)
        if task is None:
            raise ExportError(f"no outbox task {task_id!r}")
        if task.state != "dead":
            raise ExportError(f"only a dead task can be requeued: {task_id!r} is {task.state}")
        if not self.owner:
            self._write(
                "INSERT OR REPLACE INTO requests VALUES (?, 'requeue', ?, ?)",
                (task_id, os.getpid(), self.clock()),
            )
            return task
        return self._requeue(task_id, deadline)

    def requested(self) -> list[str]:
        """Task IDs whose re-send was asked for and not yet carried out."""
        return [row[0] for row in self._rows("SELECT task_id FROM requests ORDER BY created")]

    def take_requests(self) -> list[Task]:
        """The owner carries out what guests asked (each request once): the dead tasks named
        go back to pending. Returns them; a request for a task no longer dead is dropped."""
        self._owner_only("carry out requests")
        done = []
        for (task_id,) in self._rows("SELECT task_id FROM requests ORDER BY created"):
            task = self.get(task_id)
            if task is not None and task.state == "dead":
                done.append(self._requeue(task_id, None))
            self._write("DELETE FROM requests WHERE task_id=?", (task_id,))
        return done

    def _requeue(self, task_id: str, deadline: float | None) -> Task:
        now = self.clock()
        limit = now + (self.policy.deadline if deadline is None else deadline)
        self._transaction(
            [
                ("UPDATE files SET state='pending' WHERE task_id=? AND state='failed'", (task_id,)),
                (
                    "UPDATE tasks SET state='pending', attempts=0, next_attempt=?, deadline=?, "
                    "updated=? WHERE id=?",
                    (now, limit, now, task_id),
                ),
            ]
        )
        return self.get(task_id)  # type: ignore[return-value]

    def delete(self, task_id: str) -> None:
        """Forget a finished (succeeded or dead) task and its files."""
        task = self.get(task_id)
        if task is not None and task.state not in ("succeeded", "dead"):
            raise ExportError(f"task {task_id!r} is {task.state}: only finished tasks go")
        self._transaction(
            [
                ("DELETE FROM files WHERE task_id=?", (task_id,)),
                ("DELETE FROM tasks WHERE id=?", (task_id,)),
            ]
        )
        shutil.rmtree(self.folder / task_id, ignore_errors=True)

    def prune(self, older_than: float) -> int:
        """Forget succeeded tasks finished more than ``older_than`` seconds ago; how many."""
        limit = self.clock() - older_than
        old = "SELECT id FROM tasks WHERE state='succeeded' AND updated<?"
        count = len(self._rows(old, (limit,)))
        self._transaction(
            [
                (f"DELETE FROM files WHERE task_id IN ({old})", (limit,)),
                (f"DELETE FROM tasks WHERE id IN ({old})", (limit,)),
            ]
        )
        return count

    def summary(self) -> list[tuple[str, str, int, float]]:
        """``(destination, state, tasks, oldest created)`` for every destination and state."""
        return self._rows(
            "SELECT destination, state, COUNT(*), MIN(created) FROM tasks "
            "GROUP BY destination, state"
        )

    def _select(self, where: str, args: tuple) -> list[Task]:
        rows = self._rows(
            "SELECT t.id, t.job_id, t.destination, t.state, t.attempts, t.next_attempt, "
            "t.last_error, t.created, t.updated, t.deadline, COUNT(f.idx), "
            "COALESCE(SUM(f.state='delivered'), 0), COALESCE(SUM(f.state='failed'), 0) "
            f"FROM tasks t LEFT JOIN files f ON f.task_id=t.id {where} "
            "GROUP BY t.id ORDER BY t.created, t.id",
            args,
        )
        return [Task(*row) for row in rows]
