"""Durable groups: the SQLite database (WAL, ``synchronous=FULL``) of received instances and
the groups (future jobs) they belong to.

A group is the set of instances of one Study (or Series) Instance UID sent to one called AE
title. States::

    pending ──(quiet timeout, or release)──> complete ──(mark_dispatched)──> dispatched
    ignored   (late instances under the ``ignore`` policy: stored, never handed over)

Each group has its own folder ``<spool>/<called-ae>/<key>.g<id>/<series>/<sop>.dcm`` (every
component sanitised by :mod:`connectors.dicom.receive.spool`), so a late instance under
``new-job`` or ``rerun`` never lands in a folder a pipeline may be reading. Files are moved
into a group folder inside the same ``BEGIN IMMEDIATE`` transaction that records them, so
completion (also a transaction) can never race with an instance half-placed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dataflow.durable import fsync_dir, open_database

from ..config import CalledAE
from ..net.pdu import Status
from .journal import copy_range as _copy_range
from .journal import crc32, create_file, sync_filesystem
from .spool import Header, ae_component, uid_component

if TYPE_CHECKING:
    from .journal import Journal, Record, Staging

__all__ = ["Group", "GroupStore", "Placement"]

log = structlog.get_logger("connectors.dicom")

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    called_ae TEXT NOT NULL, calling_ae TEXT NOT NULL, peer_host TEXT NOT NULL,
    kind TEXT NOT NULL, uid TEXT NOT NULL, routes TEXT NOT NULL, folder TEXT NOT NULL,
    state TEXT NOT NULL, late_of INTEGER, timeout REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    first_arrival REAL NOT NULL, last_arrival REAL NOT NULL,
    completed_at REAL, dispatched_at REAL
);
CREATE INDEX IF NOT EXISTS groups_key ON groups (called_ae, kind, uid, state);
CREATE INDEX IF NOT EXISTS groups_state ON groups (state);
CREATE TABLE IF NOT EXISTS instances (
    group_id INTEGER NOT NULL REFERENCES groups (id),
    sop_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL, received REAL NOT NULL, journal TEXT,
    PRIMARY KEY (group_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    called_ae TEXT NOT NULL, calling_ae TEXT NOT NULL, peer_host TEXT NOT NULL,
    outcome TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL, ended REAL NOT NULL,
    stored INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    ignored INTEGER NOT NULL DEFAULT 0
);
"""

#: associations kept in a spool's history (the oldest go first)
ASSOCIATIONS_KEPT = 10_000

STATES = ("pending", "complete", "dispatched", "ignored", "reclaimed")
_INSTANCE_COLUMNS = ("group_id, sop_uid, sop_class, study_uid, series_uid, path, size, calling_ae,"
                     " received, journal")  # fmt: skip
_TEN = ", ".join("?" * 10)
_GROUP_COLUMNS = ("id", "called_ae", "calling_ae", "peer_host", "kind", "uid", "routes", "folder",
                  "state", "late_of", "timeout", "first_arrival")  # fmt: skip


@dataclass(frozen=True)
class Group:
    """A group as handed to the service: ``folder`` holds its files (``<series>/<sop>.dcm``)."""

    id: int
    called_ae: str
    calling_ae: str
    peer_host: str
    kind: str  # "study" or "series"
    uid: str  # the Study or Series Instance UID
    routes: tuple[str, ...]
    folder: Path
    state: str
    instances: int
    first_arrival: float
    last_arrival: float
    late_of: int | None = None


@dataclass
class Placement:
    """One fsynced temp file waiting to be recorded; ``status`` and ``group_id`` are the
    result (0x0000 Success, 0x0111 duplicate rejected)."""

    header: Header
    temp: Path | None  # None: the bytes are only in ``staged`` (their file comes later)
    size: int
    called: CalledAE
    calling_ae: str
    peer_host: str
    status: int = -1
    group_id: int | None = None
    note: str = ""
    crc: int | None = None  # CRC-32 of the temp file's bytes (the journal's record needs it)
    staged: Staging | None = None  # the same bytes in memory, for the journal to write
    fd: int | None = None  # its folder file, created empty, to be written from ``staged``
    direct: bool = False  # ``fd`` is open with O_DIRECT
    segment: str | None = None  # the journal segment that holds its record


class GroupStore:
    """The database of one spool. Thread-safe (one connection behind a lock); several
    processes may open the same spool (SQLite WAL, ``BEGIN IMMEDIATE`` serialises writers)."""

    def __init__(self, spool: Path, duplicates: str = "overwrite") -> None:
        self.spool = Path(spool)
        self.duplicates = duplicates
        self._root = str(self.spool)  # paths as text on the journal's path (pathlib is slow)
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = open_database(self.spool / "receiver.sqlite", timeout=60.0)
        lock = self.spool / "receiver.sqlite-lock"
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        with self._writing():
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(instances)")}
            if "journal" not in columns:  # a spool from before the journal
                self._db.execute("ALTER TABLE instances ADD COLUMN journal TEXT")
            self._db.execute("CREATE INDEX IF NOT EXISTS instances_journal ON instances"
                             " (journal) WHERE journal IS NOT NULL")  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)

    @contextlib.contextmanager
    def _writing(self):
        """Hold the spool's write lock: this store's lock, then ``flock`` on
        ``receiver.sqlite-lock`` against the other processes of the spool. Every write transaction
        takes it first, so SQLite's own lock is never contended: its busy handler sleeps
        1-100 ms per retry, while a process waiting in ``flock`` runs the moment the lock is
        free. Not re-entrant across methods (none of them nests)."""
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- placing instances ------------------------------------------------------------------

    def place(
        self, batch: list[Placement], journal: Journal | None = None,
        appended: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Move each fsynced temp file into its group folder and record it, all in one
        transaction; the touched directories are fsynced before the commit. Sets each item's
        ``status``/``group_id``. On failure nothing of the batch stays recorded or placed.

        A copy that replaces a recorded one (``duplicates: overwrite``, also from another
        series) is placed under a name of its own (:meth:`_free_name`): the record switches
        to it at the commit, and the replaced file is removed only after the commit. Until
        then the acknowledged copy stays where its record says; a crash in between leaves a
        file no record names, which :meth:`sweep_pending` removes at the next start.

        With ``journal`` (:mod:`.journal`), each placed instance is also appended to it (its
        record and bytes) and the transaction commits without a flush; the journal's one
        ``fdatasync`` then makes the batch durable, and the replaced files are removed after
        it. Only a rerun group's hard links get their folders fsynced before the commit.
        ``appended`` is called once the batch is committed and appended, before its flush
        (the next batch may start then)."""
        if journal is not None:
            self._place_journaled(batch, journal, appended)
            return
        dirs: set[Path] = set()
        placed: list[Path] = []
        replaced: list[Path] = []
        now = time.time()
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    self._place_one(item, now, dirs, placed, replaced)
                for directory in sorted(dirs):
                    fsync_dir(directory)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                for path in placed:
                    path.unlink(missing_ok=True)
                raise
            finally:
                for item in batch:
                    item.temp.unlink(missing_ok=True)  # consumed, or refused
            for path in replaced:  # committed: no record names them any more
                path.unlink(missing_ok=True)

    def _place_journaled(self, batch: list[Placement], journal: Journal, appended) -> None:
        dirs: set[Path] = set()  # the folders of a rerun group's hard links
        placed: list[Path] = []
        replaced: list[Path] = []
        marks: list[tuple[str, int]] = []
        now = time.time()
        with journal:
            with self._writing():
                self._db.execute("PRAGMA synchronous=NORMAL")  # the journal is the flush
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for item in batch:
                        self._place_one(item, now, dirs, placed, replaced, journal, marks)
                    journal.write_queued()  # the batch's records, one request to the device
                    for directory in sorted(dirs):
                        fsync_dir(directory)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    journal.undo(marks)
                    for item in batch:
                        if item.fd is not None:  # a folder file never to be written
                            os.close(item.fd)
                            item.fd = None
                            journal.release(item.segment, True)  # type: ignore[arg-type]
                    for path in placed:
                        Path(path).unlink(missing_ok=True)
                    raise
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
                    for item in batch:
                        if item.temp is not None:
                            item.temp.unlink(missing_ok=True)  # consumed, or refused
            upto = journal.position()
        if appended is not None:
            appended()
        journal.sync(upto)  # the one flush: outside every lock (the next batch goes on)
        if any(i.status != Status.SUCCESS or i.note == "duplicate kept first" for i in batch):
            # kept first or rejected on the strength of a copy that may be another process's
            # (its record not synced yet): everything of the spool is made durable first
            sync_filesystem(self.spool)
        for path in replaced:  # durable: no record names them any more
            path.unlink(missing_ok=True)

    def _mkdirs(self, path: Path, dirs: set[Path]) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            dirs.add(directory.parent)
        dirs.add(missing[0] if missing else path)

    def _new_group(self, item: Placement, key: str, state: str, late_of: int | None, now: float):
        called = item.called
        cur = self._db.execute(
            "INSERT INTO groups (called_ae, calling_ae, peer_host, kind, uid, routes, folder,"
            " state, late_of, timeout, first_arrival, last_arrival)"
            " VALUES (?, ?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?)",
            (called.ae_title, item.calling_ae, item.peer_host, called.group_by, key,
             json.dumps(list(called.routes)), state, late_of, called.timeout, now, now),
        )  # fmt: skip
        group_id = int(cur.lastrowid)
        folder = f"{ae_component(called.ae_title)}/{uid_component(key)}.g{group_id}"
        self._db.execute("UPDATE groups SET folder = ? WHERE id = ?", (folder, group_id))
        return group_id, folder

    def _open_group(self, item: Placement, now: float, dirs: set[Path], placed: list[Path]):
        called = item.called
        key = item.header.study_uid if called.group_by == "study" else item.header.series_uid
        row = self._db.execute(
            "SELECT id, folder FROM groups WHERE called_ae = ? AND kind = ? AND uid = ?"
            " AND state IN ('pending', 'ignored') ORDER BY id DESC LIMIT 1",
            (called.ae_title, called.group_by, key),
        ).fetchone()
        if row is not None:
            return row
        prev = self._db.execute(
            "SELECT id FROM groups WHERE called_ae = ? AND kind = ? AND uid = ?"
            " AND state IN ('complete', 'dispatched', 'reclaimed') ORDER BY id DESC LIMIT 1",
            (called.ae_title, called.group_by, key),
        ).fetchone()
        late_of = prev[0] if prev else None
        state = "ignored" if late_of is not None and called.late == "ignore" else "pending"
        group_id, folder = self._new_group(item, key, state, late_of, now)
        if late_of is not None:
            log.info("late_instance", called_ae=called.ae_title, policy=called.late,
                     group=group_id, late_of=late_of)  # fmt: skip
        if late_of is not None and called.late == "rerun":
            self._copy_instances(late_of, group_id, folder, now, dirs, placed)
        return group_id, folder

    def _copy_instances(self, source: int, group_id: int, folder: str, now, dirs, placed):
        rows = self._db.execute(
            "SELECT sop_uid, sop_class, study_uid, series_uid, path, size, calling_ae"
            " FROM instances WHERE group_id = ?",
            (source,),
        ).fetchall()
        count = 0
        for sop, sop_class, study, series, path, size, calling in rows:
            rel = f"{folder}/{uid_component(series)}/{uid_component(sop)}.dcm"
            target = self.spool / rel
            self._mkdirs(target.parent, dirs)
            try:
                os.link(self.spool / path, target)
            except FileNotFoundError:
                log.warning("rerun_file_missing", group=group_id, source_group=source)
                continue
            placed.append(target)
            self._db.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_TEN})",
                (group_id, sop, sop_class, study, series, rel, size, calling, now, None),
            )
            count += 1
        self._db.execute("UPDATE groups SET instances = ? WHERE id = ?", (count, group_id))

    def _place_one(self, item: Placement, now: float, dirs, placed, replaced, journal=None,
                   marks=None) -> None:  # fmt: skip
        h = item.header
        links: set[Path] = set()
        group_id, folder = self._open_group(item, now, links if journal else dirs, placed)
        if journal is not None and links:  # a rerun group's links: fsynced before the commit
            dirs |= links
        item.group_id = group_id
        existing = self._db.execute(
            "SELECT path FROM instances WHERE group_id = ? AND sop_uid = ?",
            (group_id, h.sop_instance_uid),
        ).fetchone()
        if existing and self.duplicates == "keep-first":
            item.status, item.note = Status.SUCCESS, "duplicate kept first"
            return
        if existing and self.duplicates == "reject":
            item.status, item.note = Status.DUPLICATE, "duplicate SOP Instance UID"
            return
        series = f"{folder}/{uid_component(h.series_uid)}"
        rel = self._free_name(series, uid_component(h.sop_instance_uid), existing)
        segment = None
        if journal is None:
            target: Path | str = self.spool / rel
            self._mkdirs(target.parent, dirs)  # type: ignore[union-attr]
        else:
            target = self._series_made(series, rel)  # the journal's record holds its folders
            segment = self._journal(item, journal, group_id, rel, now, marks)
        if item.temp is not None:
            os.replace(item.temp, target)  # a free name: never over an acknowledged copy
        else:  # made here, so that the next free name sees it; written after the answer
            item.fd, item.direct = create_file(target)
            assert journal is not None and segment is not None
            item.segment = segment
            journal.hold(segment)
        placed.append(target)  # type: ignore[arg-type]
        if journal is None:
            dirs.add(target.parent)  # type: ignore[union-attr]
        if existing:
            replaced.append(self.spool / existing[0])
        values = (h.sop_class_uid, h.study_uid, h.series_uid, rel, item.size, item.calling_ae)
        self._db.execute(
            f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_TEN})",
            (group_id, h.sop_instance_uid, *values, now, segment),
        )
        self._db.execute(
            "UPDATE groups SET instances = instances + ?, last_arrival = ? WHERE id = ?",
            (0 if existing else 1, now, group_id),
        )
        item.status, item.note = Status.SUCCESS, "duplicate overwritten" if existing else ""

    def _journal(self, item: Placement, journal: Journal, group_id: int, rel: str, now: float,
                 marks: list) -> str:  # fmt: skip
        """Append ``item``'s record to ``journal``: its group's row (to make it again with
        the same id if the index lost it), its own row's values, and its bytes."""
        h = item.header
        group = self._db.execute(
            f"SELECT {', '.join(_GROUP_COLUMNS)} FROM groups WHERE id = ?", (group_id,)
        ).fetchone()
        meta = {"group": dict(zip(_GROUP_COLUMNS, group, strict=True)),
                "sop": h.sop_instance_uid, "class": h.sop_class_uid, "study": h.study_uid,
                "series": h.series_uid, "path": rel, "size": item.size,
                "calling": item.calling_ae, "received": now}  # fmt: skip
        crc = item.crc
        if crc is None:
            assert item.temp is not None
            with open(item.temp, "rb") as fp:
                crc = 0
                while chunk := fp.read(1 << 20):
                    crc = crc32(chunk, crc)
        segment, at = journal.append(meta, item.temp, item.size, crc, item.staged)
        marks.append((segment, at))
        return segment

    def restore(self, record: Record) -> None:
        """Put a journal record's instance back (replay after a crash, :mod:`.journal`):
        its group made again with the same id if the index lost it, its file written from
        the journal unless already whole, its row; idempotent. A record of a reclaimed group,
        or one a newer copy of the same instance replaced, changes nothing."""
        m, g = record.meta, record.meta["group"]
        target = self.spool / m["path"]
        stale: Path | None = None
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT state FROM groups WHERE id = ?", (g["id"],)
                ).fetchone()
                if row is None:
                    self._db.execute(
                        f"INSERT INTO groups ({', '.join(_GROUP_COLUMNS)}, last_arrival)"
                        f" VALUES ({', '.join('?' * (len(_GROUP_COLUMNS) + 1))})",
                        (*(g[c] for c in _GROUP_COLUMNS), m["received"]),
                    )
                if row is not None and row[0] == "reclaimed":
                    self._db.execute("COMMIT")
                    return
                existing = self._db.execute(
                    "SELECT path, received FROM instances WHERE group_id = ? AND sop_uid = ?",
                    (g["id"], m["sop"]),
                ).fetchone()
                if existing and existing[0] != m["path"] and existing[1] > m["received"]:
                    stale = target  # a newer copy replaced this one (at the same time: the
                    # later record, replayed after, wins, as it did when it was written)
                else:
                    _write_back(record, target)
                    if existing and existing[0] != m["path"]:
                        stale = self.spool / existing[0]
                    self._db.execute(
                        f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_TEN})",
                        (g["id"], m["sop"], m["class"], m["study"], m["series"], m["path"],
                         m["size"], m["calling"], m["received"], record.segment),
                    )  # fmt: skip
                    self._recount(g["id"], m["received"])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if stale is not None:
            stale.unlink(missing_ok=True)

    def drop_unjournaled(self, segments: list[str], records: list[Record]) -> int:
        """Remove the rows (and files) that name one of these journal ``segments`` but have
        no whole record there: written to the index, never acknowledged. Returns how many."""
        keep = {(r.meta["group"]["id"], r.meta["sop"], r.meta["path"]) for r in records}
        gone: list[Path] = []
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for segment in segments:
                    rows = self._db.execute(
                        "SELECT group_id, sop_uid, path FROM instances WHERE journal = ?",
                        (segment,),
                    ).fetchall()
                    for group_id, sop, path in rows:
                        if (group_id, sop, path) in keep:
                            continue
                        self._db.execute(
                            "DELETE FROM instances WHERE group_id = ? AND sop_uid = ?",
                            (group_id, sop),
                        )
                        self._recount(group_id, None)
                        gone.append(self.spool / path)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for path in gone:
            path.unlink(missing_ok=True)
        return len(gone)

    def _recount(self, group_id: int, arrival: float | None) -> None:
        self._db.execute(
            "UPDATE groups SET instances = (SELECT COUNT(*) FROM instances WHERE group_id = ?),"
            " last_arrival = max(last_arrival, COALESCE(?, last_arrival)) WHERE id = ?",
            (group_id, arrival, group_id),
        )

    def _series_made(self, series: str, rel: str) -> str:
        """The path of ``rel`` (in the folder ``series``, made if missing), as text; its
        folders are not fsynced (the journal's records hold them)."""
        if not os.path.isdir(f"{self._root}/{series}"):
            self._mkdirs(self.spool / series, set())
        return f"{self._root}/{rel}"

    def _free_name(self, series: str, sop: str, existing) -> str:
        """``<series>/<sop>.dcm``, or for a copy replacing a recorded one, the first of
        ``<sop>.dcm``, ``<sop>.v1.dcm``, ``<sop>.v2.dcm``... that is neither the recorded file
        nor on disk ("v" is in no UID and no hashed component: no other instance's name)."""
        rel, version = f"{series}/{sop}.dcm", 0
        while existing and (rel == existing[0] or (self.spool / rel).exists()):
            version += 1
            rel = f"{series}/{sop}.v{version}.dcm"
        return rel

    # -- completion and hand-over -----------------------------------------------------------

    def complete_due(self, now: float, not_before: float) -> list[int]:
        """Complete the pending groups quiet for their timeout (the quiet time counting from
        ``not_before`` at the earliest: the service's start); returns their ids. A group
        with a folder file still being written (:meth:`_files_written`) stays pending."""
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id FROM groups WHERE state = 'pending'"
                    " AND max(last_arrival, ?) + timeout <= ?",
                    (not_before, now),
                ).fetchall()
                ids = [r[0] for r in rows if self._files_written(r[0])]
                self._db.executemany(
                    "UPDATE groups SET state = 'complete', completed_at = ? WHERE id = ?",
                    [(now, i) for i in ids],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def _files_written(self, group_id: int) -> bool:
        """Whether every folder file of the group has its recorded size. With the journal, an
        instance is acknowledged before its file is written (from memory, just after the
        answer); if that write fails, the file stays short until the next start's replay
        writes it. A group is not handed over with such a file. A missing file does not hold
        the group (no write is pending for it: the commit creates the file)."""
        rows = self._db.execute(
            "SELECT path, size FROM instances WHERE group_id = ?", (group_id,)
        ).fetchall()
        for path, size in rows:
            try:
                if os.stat(f"{self._root}/{path}").st_size != size:
                    return False
            except FileNotFoundError:
                continue
        return True

    def next_due(self, not_before: float) -> float | None:
        """When the first pending group falls due (:meth:`complete_due`'s rule), as a
        ``time.time()``; None without pending groups."""
        with self._writing():
            row = self._db.execute(
                "SELECT min(max(last_arrival, ?) + timeout) FROM groups WHERE state = 'pending'",
                (not_before,),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def complete(self, group_ids: list[int]) -> list[int]:
        """Complete these groups now if still pending (association released) and their
        folder files are written (:meth:`_files_written`; else the quiet time completes them)."""
        done = []
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for group_id in filter(self._files_written, group_ids):
                    cur = self._db.execute(
                        "UPDATE groups SET state = 'complete', completed_at = ?"
                        " WHERE id = ? AND state = 'pending'",
                        (time.time(), group_id),
                    )
                    done += [group_id] if cur.rowcount else []
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return done

    def mark_dispatched(self, group_id: int) -> bool:
        """The service recorded its jobs: the group is never handed over again."""
        with self._writing():
            cur = self._db.execute(
                "UPDATE groups SET state = 'dispatched', dispatched_at = ?"
                " WHERE id = ? AND state = 'complete'",
                (time.time(), group_id),
            )
        return cur.rowcount == 1

    def record_association(
        self, *, called_ae: str, calling_ae: str, peer_host: str, outcome: str, reason: str = "",
        started: float, ended: float, stored: int = 0, failed: int = 0, ignored: int = 0,
    ) -> None:  # fmt: skip
        """One association's story, at its end (``released``, ``aborted``) or refusal
        (``rejected``, with the reason); the history keeps the last ASSOCIATIONS_KEPT."""
        with self._writing():
            cur = self._db.execute(
                "INSERT INTO associations (called_ae, calling_ae, peer_host, outcome, reason,"
                " started, ended, stored, failed, ignored) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (called_ae, calling_ae, peer_host, outcome, reason, started, ended, stored,
                 failed, ignored),
            )  # fmt: skip
            if cur.lastrowid % 100 == 0:
                self._db.execute("DELETE FROM associations WHERE id <= ?",
                                 (cur.lastrowid - ASSOCIATIONS_KEPT,))  # fmt: skip

    def figures(self) -> dict[str, dict[str, int]]:
        """What the spool's database says, whichever listener process of the spool wrote it:
        groups by state, instances received by group state (a group keeps its count after
        its files are reclaimed), associations in the kept history by outcome, and the
        instances they stored, failed and ignored."""
        with self._lock:
            groups = self._db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(instances), 0) FROM groups GROUP BY state"
            ).fetchall()
            calls = self._db.execute(
                "SELECT outcome, COUNT(*), COALESCE(SUM(stored), 0), COALESCE(SUM(failed), 0),"
                " COALESCE(SUM(ignored), 0) FROM associations GROUP BY outcome"
            ).fetchall()
        return {
            "groups": {state: n for state, n, _ in groups},
            "instances": {state: total for state, _, total in groups},
            "associations": {outcome: n for outcome, n, *_ in calls},
            "stored": {"stored": sum(r[2] for r in calls), "failed": sum(r[3] for r in calls),
                       "ignored": sum(r[4] for r in calls)},
        }  # fmt: skip

    def associations(self, limit: int = 100) -> list[dict]:
        """The last ``limit`` associations, newest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, called_ae, calling_ae, peer_host, outcome, reason, started, ended,"
                " stored, failed, ignored FROM associations ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def groups(self, state: str | None = None) -> list[Group]:
        """Every group (or those in ``state``), oldest first."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        query = (
            "SELECT id, called_ae, calling_ae, peer_host, kind, uid, routes, folder, state,"
            " instances, first_arrival, last_arrival, late_of FROM groups"
        )
        with self._lock:
            if state is None:
                rows = self._db.execute(query + " ORDER BY id").fetchall()
            else:
                rows = self._db.execute(query + " WHERE state = ? ORDER BY id", (state,))
                rows = rows.fetchall()
        return [Group(*r[:6], tuple(json.loads(r[6])), self.spool / r[7], *r[8:]) for r in rows]

    def instances(self, group_id: int) -> list[tuple[str, Path]]:
        """(SOP Instance UID, file) of a group's instances."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid, path FROM instances WHERE group_id = ? ORDER BY path",
                (group_id,),
            ).fetchall()
        return [(sop, self.spool / path) for sop, path in rows]

    def reclaim(self, group_id: int) -> bool:
        """The service needs a dispatched group no more (retention): it becomes ``reclaimed``,
        its instance records go, then its folder. False (nothing done) if not dispatched."""
        with self._writing():
            row = self._db.execute(
                "SELECT folder FROM groups WHERE id = ? AND state = 'dispatched'", (group_id,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("UPDATE groups SET state = 'reclaimed' WHERE id = ?", (group_id,))
                self._db.execute("DELETE FROM instances WHERE group_id = ?", (group_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._remove_folder(row[0])
        return True

    def _remove_folder(self, folder: str) -> None:
        path = (self.spool / folder).resolve()
        if path.parent.parent == self.spool.resolve():  # <spool>/<called-ae>/<group>: no other
            shutil.rmtree(path, ignore_errors=True)

    def sweep_pending(self) -> int:
        """After a crash: remove files in open group folders that were never recorded (moved
        in, then the process died before the commit: never acknowledged), and the folders of
        reclaimed groups that are still there. Returns how many files were removed."""
        removed = 0
        for group in self.groups("reclaimed"):
            if group.folder.is_dir():
                self._remove_folder(str(group.folder.relative_to(self.spool)))
        for group in self.groups("pending") + self.groups("ignored"):
            known = {path for _, path in self.instances(group.id)}
            if not group.folder.is_dir():
                continue
            for path in group.folder.glob("*/*"):
                if path not in known:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _write_back(record: Record, target: Path) -> None:
    """Make ``target`` hold the record's bytes: left alone when it already does (same size,
    same CRC-32), else written in place (a rerun group's hard links see it too)."""
    if target.is_file() and target.stat().st_size == record.size:
        crc = 0
        with open(target, "rb") as fp:
            while chunk := fp.read(1 << 20):
                crc = crc32(chunk, crc)
        if crc == record.crc:
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        with open(record.path, "rb") as source:
            _copy_range(source.fileno(), fd, record.size, record.offset, 0)
        os.ftruncate(fd, record.size)
    finally:
        os.close(fd)
