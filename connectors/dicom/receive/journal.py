"""The ingest journal: one device flush per acknowledged instance (or per group of instances in
flight across associations).

Without it (``journal: false``) an instance costs two flushes before its Success: the temp
file's fsync, then the commit's rename, folder fsyncs and SQLite commit. With it, the
commit appends one *record* per instance to an append-only, preallocated segment file
(``<spool>/.journal/<id>/<seq>.seg``): the instance's metadata (its group, its path in the
spool, its UIDs) and its bytes, copied in the kernel from the temp file (``copy_file_range``).
One ``fdatasync`` of the segment makes every record appended since the last one durable, its
bytes and its record together; the instances of other associations that queued meanwhile
ride along (group commit). The temp file is renamed into its group folder and the SQLite
index updated in the same transaction, but neither is flushed on the acknowledgement's path.

Checkpoints (a thread of this journal) make the folder files and the index durable with one
``syncfs`` of the spool's file system, off the acknowledgement's path, and then reclaim the
segments they cover (kept as spares, so that later appends overwrite blocks already written
and a ``fdatasync`` needs no metadata change: on ext4 it then costs half of one into blocks
only preallocated, which the file system must still mark written). The same thread
writes one spare's zeros as soon as the journal starts, and again whenever the last spare
is taken, so that even the first segment of a process, and a burst that outruns the
checkpoints, append into written blocks. A segment is closed when full; the closed ones
and the open one are checkpointed after :data:`IDLE` quiet seconds, or at once when
:data:`BACKLOG` full segments wait (so that a burst is not slowed by a ``syncfs`` of the
folder files competing with the journal for the disk); closing the journal (a clean stop)
checkpoints all of it and
removes its folder.

After a crash, :func:`recover` replays every journal no live process holds
(:meth:`.groups.GroupStore.restore`): each whole record puts its instance back into its folder
and the index (its group made again with the same id if the index lost it), idempotently;
replay stops at the first record that is not whole (a torn append was never acknowledged), and
an index row that names a segment still present but has no whole record there (an instance
written to the index but never acknowledged) is removed with its file.

An instance the direct C-STORE path (:mod:`.intake`) received comes with its bytes in
memory (a :class:`Staging`, page-aligned, with a block in front for the record's header and
metadata): its record is written from there in one ``O_DIRECT`` write, the device reading
the bytes where they lie, so neither a copy into the page cache nor its write-back costs the
CPU or the acknowledgement anything, and the ``fdatasync`` after it only flushes the
device's cache. Other instances (pynetdicom's path, STOW-RS, one larger than a staging
buffer, a file system without ``O_DIRECT``) are copied from their temp file as before.

Formats (little-endian). A segment starts with a block (4096 bytes) whose first 64 bytes
are its header: ``DFJSEG02``, its sequence number (u64), the journal's 16-byte id, a CRC-32
of those; records follow, each starting on a block: a 32-byte header (``DFJR``, the
segment's sequence number u64, the metadata's length u32, the data's length u64, the data's
CRC-32, the CRC-32 of these 24 bytes and the metadata), the metadata (JSON), zeros to the
next block, the data (the instance's Part-10 file bytes), and whatever fills its last block.
A ``DFJSEG01`` segment (written before 2026-12-05, replayed after an upgrade) has its first
record at byte 64 and its records back to back, without the padding.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import json
import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dataflow.durable import fsync_dir

try:  # ISA-L's CRC-32 is zlib's, 16 times faster here (0.006 ms for a 525 kB slice, not 0.1)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32

__all__ = [
    "BLOCK",
    "JOURNAL_DIR",
    "Journal",
    "Record",
    "Staging",
    "copy_range",
    "crc32",
    "create_file",
    "read_segment",
    "recover",
    "sync_filesystem",
]

log = structlog.get_logger("connectors.dicom")

JOURNAL_DIR = ".journal"
SEGMENT = 64 * 1024 * 1024  # preallocated bytes of a segment (a larger record gets its own)
SPARES = 2  # reclaimed segments kept for reuse
IDLE = 1.0  # seconds without an append after which the journal is checkpointed
BACKLOG = 4  # full segments that wait for the idle checkpoint (then one is taken at once)
HOLD_WAIT = 10.0  # seconds a checkpoint waits for the folder files still being written
BLOCK = 4096  # records start and end on a block: written with O_DIRECT where they can be
_OLD_MAGIC, _SEG_MAGIC, _REC_MAGIC = b"DFJSEG01", b"DFJSEG02", b"DFJR"
_SEG_HEAD = struct.Struct("<8sQ16sI")  # magic, seq, journal id, crc
SEG_HEADER = BLOCK  # the header, then zeros to the first record
_OLD_HEADER = 64  # where a DFJSEG01 segment's first record is
_REC_HEAD = struct.Struct("<4sQIQI")  # magic, seq, meta length, data length, data crc
REC_HEADER = _REC_HEAD.size + 4  # + the crc of the header and the metadata
_COPY = 1 << 20
_ZEROS = bytes(_COPY)


def sync_filesystem(path: Path) -> None:
    """Make everything written to the file system holding ``path`` durable: ``syncfs`` (one
    call, whatever the number of files), ``sync`` where there is none."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def copy_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> None:
    """``count`` bytes from ``src`` to ``dst`` at those offsets, in the kernel if it can."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, 1 << 30), src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(count, _COPY), src_offset), dst_offset)
        if n <= 0:
            raise OSError(errno.EIO, "the temp file ended early")
        count, src_offset, dst_offset = count - n, src_offset + n, dst_offset + n


def allocate(fd: int, size: int, written: bool = False) -> None:
    """Give the file ``fd`` its ``size`` bytes on the disk: preallocated blocks
    (``posix_fallocate``), or ``written`` ones (zeros written and flushed: a later
    ``fdatasync`` of data written over them changes no metadata). OSError (ENOSPC) if the
    disk cannot hold them."""
    if not written:
        os.posix_fallocate(fd, 0, size)
        return
    at = 0
    while at < size:
        at += os.pwrite(fd, _ZEROS[: min(_COPY, size - at)], at)
    os.fdatasync(fd)


def _aligned(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# bytes a staging buffer holds (address space; memory as used): an image slice fits, a large
# multi-frame instance goes to a temp file, so an association holds at most this in memory
STAGE = 16 * 1024 * 1024
_KEEP = 4 * 1024 * 1024  # what a staging buffer keeps in memory after a larger instance


class Staging:
    """One association's buffer for the bytes of the instance it receives: page-aligned
    memory with :data:`BLOCK` bytes in front for the record's header and metadata, so that
    :meth:`Journal.append` writes the record in one ``O_DIRECT`` write. Reused from one
    instance to the next; an instance beyond ``capacity`` is not staged (``overflow``)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity = capacity or STAGE
        self._map = mmap.mmap(-1, BLOCK + _aligned(capacity))
        self.size = 0
        self.overflow = False
        self._peak = 0
        self.deferred: Any = None  # the Placement whose folder file is still to be written

    def reset(self) -> None:
        """A new instance: empty again (the memory of a large previous one given back)."""
        if self._peak > _KEEP:
            self._map.madvise(mmap.MADV_DONTNEED, BLOCK + _KEEP)
        self.size, self.overflow, self._peak = 0, False, 0

    def add(self, data) -> None:
        n = len(data)
        if self.overflow or self.size + n > self.capacity:
            self.overflow = True
            return
        at = BLOCK + self.size
        self._map[at : at + n] = data
        self.grow(n)

    def room(self, n: int) -> memoryview | None:
        """Where the next ``n`` bytes go, to be filled in place (then :meth:`grow`): a
        socket read straight into the buffer, no copy; None if they would not fit."""
        if self.overflow or self.size + n > self.capacity:
            return None
        return memoryview(self._map)[BLOCK + self.size : BLOCK + self.size + n]

    def grow(self, n: int) -> None:
        """The ``n`` bytes after the instance's so far were written in place (:meth:`room`)."""
        self.size += n
        self._peak = max(self._peak, self.size)

    def data(self, start: int, end: int) -> memoryview:
        """The instance's bytes ``start`` to ``end`` (page-aligned where ``start`` is)."""
        return memoryview(self._map)[BLOCK + start : BLOCK + end]

    def file(self) -> io.BufferedReader:
        """The instance's bytes as a read-only file (without copying them)."""
        return io.BufferedReader(_MemoryFile(self.data(0, self.size)))

    def record(self, head: bytes) -> memoryview | None:
        """The record to write: ``head`` (header and metadata) in the front block, then the
        data, padded to a block; None if it cannot be written from here."""
        if self.overflow or len(head) > BLOCK:
            return None
        self._map[: len(head)] = head
        self._map[len(head) : BLOCK] = bytes(BLOCK - len(head))
        return memoryview(self._map)[: BLOCK + _aligned(self.size)]

    def write_file(self, fd: int, direct: bool) -> None:
        """Write the instance's bytes into ``fd``, a new empty file. With ``direct`` (opened
        by :func:`create_file` with ``O_DIRECT``) in whole blocks, the last one padded with
        zeros, then cut to the size: the device reads them here, and the page cache is
        neither filled nor written back (a fresh page costs more than the copy on the VMs
        we measured); buffered where the file system refuses such a write."""
        size = self.size
        if direct:
            end = _aligned(size)
            self._map[BLOCK + size : BLOCK + end] = bytes(end - size)
            try:
                _write_all(fd, self.data(0, end), 0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))
            else:
                os.ftruncate(fd, size)
                return
        _write_all(fd, self.data(0, size), 0)
        if direct:
            os.ftruncate(fd, size)  # whatever a refused direct write left beyond the end

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view still held somewhere: the memory goes with it
            pass


def create_file(path: str | Path) -> tuple[int, bool]:
    """Create ``path`` (truncated) for :meth:`Staging.write_file`: its fd, and whether it
    is open with ``O_DIRECT`` (not where the file system refuses it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o640), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o640), False


def _writev_all(fd: int, views: list, offset: int) -> None:
    """``views`` one after the other from ``offset``: one ``pwritev`` where it writes them
    all, then whatever it left, view by view."""
    done = os.pwritev(fd, views, offset) if len(views) > 1 else 0
    for view in views:
        if done >= len(view):
            done -= len(view)
        else:
            _write_all(fd, memoryview(view)[done:], offset + done)
            done = 0
        offset += len(view)


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _MemoryFile(io.RawIOBase):
    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()  # the staging buffer may be closed or reused after this
        super().close()


class ReserveReached(OSError):
    """A segment would take the spool below its disk reserve (ENOSPC)."""


@dataclass
class _Segment:
    seq: int
    path: Path
    fd: int
    size: int
    direct: int = -1  # the same file opened with O_DIRECT (-1: the file system refused it)
    end: int = SEG_HEADER  # where the next record goes
    synced: int = SEG_HEADER


class Journal:
    """This process's journal in ``spool`` (made at the first append, removed by
    :meth:`close`). ``reserve_ok(nbytes)`` says whether preallocating ``nbytes`` more keeps
    the disk reserve; appends come from one commit at a time (under :meth:`__enter__`)."""

    def __init__(self, spool: Path, reserve_ok: Callable[[int], bool] | None = None,
                 segment_size: int = SEGMENT, idle: float = IDLE,
                 backlog: int = BACKLOG) -> None:  # fmt: skip
        self.spool = Path(spool)
        self.id = uuid.uuid4()
        self.folder = self.spool / JOURNAL_DIR / self.id.hex
        self._reserve_ok = reserve_ok or (lambda n: True)
        self._segment_size = segment_size
        self._idle = idle
        self._backlog = backlog
        self._lock = threading.Lock()  # appends, against rotation
        self._sync_lock = threading.Lock()  # fdatasync, against a segment's fd closing
        self._cv = threading.Condition()
        self._current: _Segment | None = None
        self._closed: list[_Segment] = []  # full segments awaiting a checkpoint
        self._spares: list[Path] = []
        self._seq = 0
        self._lock_fd: int | None = None
        self._last_append = 0.0
        self._stopping = False
        self._want_spare = True  # the thread writes a spare first thing
        self._written = 0  # spares written
        self._holds: dict[str, int] = {}  # segment -> folder files still to be written
        self._draining = 0  # checkpoints waiting for held segments (release wakes them)
        self._queued: list[tuple[_Segment, int, memoryview]] = []  # for write_queued()
        self._failed: set[str] = set()  # segments with a folder file that was not written
        self._left: list[_Segment] = []  # those: kept for the next start's replay
        self.checkpoints = 0
        # the checkpoint thread, from the start (its folder is made at the first append)
        self._thread = threading.Thread(target=self._checkpoints, name="dicom-journal",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    # ------------------------------------------------------------------ appending

    def append(self, meta: dict[str, Any], source: Path | None, size: int, crc: int,
               staged: Staging | None = None) -> tuple[str, int]:  # fmt: skip
        """Append a record: ``meta`` and the ``size`` bytes of ``source`` (whose CRC-32 is
        ``crc``), written from ``staged`` where it holds them (``source`` None: only
        there). Returns (segment id, offset) for :meth:`sync` and :meth:`undo`. Raises
        OSError (ENOSPC where a new segment cannot be preallocated); nothing half-written
        stays valid."""
        body = json.dumps(meta, separators=(",", ":")).encode()
        start = _aligned(REC_HEADER + len(body))  # of the data, in the record
        total = _aligned(start + size)
        segment = self._room(total)
        head = _REC_HEAD.pack(_REC_MAGIC, segment.seq, len(body), size, crc)
        head += struct.pack("<I", crc32(body, crc32(head)))
        at = segment.end
        record = None
        if staged is not None and staged.size == size:
            record = staged.record(head + body)
        if record is not None and segment.direct >= 0:
            self._queued.append((segment, at, record))  # written by write_queued()
        elif record is not None:
            _write_all(segment.fd, record, at)
        elif source is None:  # metadata too long for the front block: two writes
            assert staged is not None and staged.size == size
            _write_all(segment.fd, staged.data(0, size), at + start)
            os.pwrite(segment.fd, head + body, at)
        else:
            fd = os.open(source, os.O_RDONLY)
            try:
                copy_range(fd, segment.fd, size, 0, at + start)
            finally:
                os.close(fd)
            os.pwrite(segment.fd, head + body, at)
        segment.end = at + total
        self._last_append = time.monotonic()
        if at == SEG_HEADER:
            with self._cv:
                self._cv.notify()  # the checkpoint thread starts timing the idle wait
        return self._name(segment), at

    def write_queued(self) -> None:
        """Write the records :meth:`append` queued (those written with ``O_DIRECT`` from a
        staging buffer): a batch's records lie back to back, so one ``pwritev`` (one request
        to the device) writes them all, not one write and one wait per record. Before the
        batch commits (under :meth:`__enter__`); a record is not whole until this is done."""
        queued, self._queued = self._queued, []
        runs: list[list] = []  # [segment, start, end, records] of records back to back
        for segment, at, record in queued:
            if runs and runs[-1][0] is segment and runs[-1][2] == at:
                runs[-1][2] = at + len(record)
                runs[-1][3].append(record)
            else:
                runs.append([segment, at, at + len(record), [record]])
        for segment, start, _, records in runs:
            _writev_all(segment.direct, records, start)

    def hold(self, name: str) -> None:
        """A folder file whose record is in segment ``name`` is still to be written: the
        segment is not reclaimed until :meth:`release`."""
        with self._cv:
            self._holds[name] = self._holds.get(name, 0) + 1

    def release(self, name: str, written: bool) -> None:
        """That folder file is written; or not (``written`` False): its segment is then kept
        until this journal is replayed, at the next start."""
        with self._cv:
            left = self._holds[name] - 1
            if left:
                self._holds[name] = left
            else:
                del self._holds[name]
            if not written:
                self._failed.add(name)
            if not left and self._draining:  # a checkpoint waits for this segment's files
                self._cv.notify_all()

    def undo(self, marks: list[tuple[str, int]]) -> None:
        """Void records appended by a transaction that was rolled back (their headers zeroed,
        the append position back to the first): replay never sees them."""
        self._queued = []  # theirs: never written
        for name, at in sorted(marks, key=lambda m: m[1], reverse=True):
            for segment in [self._current, *self._closed]:
                if segment is not None and self._name(segment) == name and at < segment.end:
                    os.pwrite(segment.fd, bytes(REC_HEADER), at)
                    if segment is self._current:
                        with self._sync_lock:
                            segment.end, segment.synced = at, min(segment.synced, at)

    def position(self) -> tuple[_Segment | None, int]:
        """Where the records appended so far end (for :meth:`sync`, under the lock)."""
        segment = self._current
        return segment, segment.end if segment is not None else 0

    def sync(self, upto: tuple[_Segment | None, int] | None = None) -> None:
        """Make the records appended up to ``upto`` (:meth:`position`; default: now)
        durable: one ``fdatasync``, unless one that covers them has already returned (a
        segment closed meanwhile was synced as it closed). Needs no lock: the next batch
        appends while this one syncs, and one ``fdatasync`` covers both where it can."""
        segment, end = self.position() if upto is None else upto
        if segment is None:
            return
        with self._sync_lock:
            if segment.synced >= end or segment.fd < 0:
                return
            reached = segment.end  # whole records only: end moves after a record is written
            os.fdatasync(segment.fd)
            segment.synced = max(segment.synced, reached)

    def _name(self, segment: _Segment) -> str:
        return f"{self.id.hex}:{segment.seq}"

    def __enter__(self) -> Journal:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _room(self, total: int) -> _Segment:
        segment = self._current
        if segment is not None and segment.end + total <= segment.size:
            return segment
        if segment is not None:
            self.write_queued()  # its records whole before it is flushed and closed
            self._close_current()
        self._current = self._open_segment(total)
        return self._current

    def _close_current(self) -> None:
        segment = self._current
        self._current = None
        if segment is None:
            return
        if segment.end > SEG_HEADER:
            with self._sync_lock:  # its records are acknowledged with this batch
                if segment.synced < segment.end:
                    os.fdatasync(segment.fd)
                    segment.synced = segment.end
            with self._cv:
                self._closed.append(segment)
                self._cv.notify()
        else:
            self._spare(segment)

    def _open_segment(self, total: int) -> _Segment:
        need = max(self._segment_size, SEG_HEADER + total)
        spare = next((p for p in self._spares if p.stat().st_size >= need), None)
        if spare is None and not self._reserve_ok(need):
            need = SEG_HEADER + total  # just this record, if that keeps the reserve
            if not self._reserve_ok(need):
                raise ReserveReached(errno.ENOSPC, "disk reserve reached")
        if self._lock_fd is None:
            self._start()
        self._seq += 1
        seq = self._seq
        path = self.folder / f"{seq}.seg"
        if spare is not None:
            self._spares.remove(spare)
            os.rename(spare, path)
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                allocate(fd, need)
                fsync_dir(self.folder)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            size = need
        head = _SEG_HEAD.pack(_SEG_MAGIC, seq, self.id.bytes, 0)[:-4]
        head += struct.pack("<I", crc32(head))
        os.pwrite(fd, head.ljust(SEG_HEADER, b"\0"), 0)
        try:
            direct = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError:  # tmpfs before Linux 6.6, say: staged records go through the cache
            direct = -1
        return _Segment(seq, path, fd, size, direct)

    def _start(self) -> None:
        new = self.folder.with_name(self.folder.name + ".new")  # locked before it is seen
        new.mkdir(parents=True)
        fd = os.open(new / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: recover() skips it
        self._lock_fd = fd
        os.rename(new, self.folder)
        fsync_dir(self.folder)
        fsync_dir(self.folder.parent)

    # ------------------------------------------------------------------ checkpoints

    def _close_fds(self, segment: _Segment) -> None:
        with self._sync_lock:  # against a sync() of it
            os.close(segment.fd)
            if segment.direct >= 0:
                os.close(segment.direct)
            segment.fd = segment.direct = -1

    def _spare(self, segment: _Segment) -> None:
        os.pwrite(segment.fd, bytes(SEG_HEADER), 0)  # not a segment now: replay skips it
        self._close_fds(segment)
        if len(self._spares) < SPARES and segment.size == self._segment_size:
            spare = self.folder / f"spare-{segment.seq}"
            os.rename(segment.path, spare)
            self._spares.append(spare)
        else:
            segment.path.unlink(missing_ok=True)

    def _prepare_spare(self) -> None:
        """Write a spare segment's zeros and flush them (:func:`allocate`), off the
        acknowledgement's path, unless that would take the disk reserve or spares exist."""
        size = self._segment_size
        with self._lock:
            if self._spares or self._stopping or not self._reserve_ok(size):
                return
            if self._lock_fd is None:
                self._start()
            self._written += 1
            path = self.folder / f"spare-w{self._written}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            allocate(fd, size, written=True)
        except OSError as exc:  # a full disk: segments are preallocated when needed
            log.info("journal_spare_not_written", error=os.strerror(exc.errno or 0))
            path.unlink(missing_ok=True)
            return
        finally:
            os.close(fd)
        with self._lock:
            if self._stopping:
                path.unlink(missing_ok=True)
            else:
                self._spares.append(path)

    def _checkpoints(self) -> None:
        while True:
            with self._cv:
                want, self._want_spare = self._want_spare, False
            if want:
                try:
                    self._prepare_spare()
                except Exception:
                    log.exception("journal_spare_failed")
            with self._cv:
                while (
                    len(self._closed) < self._backlog
                    and not self._stopping
                    and not self._want_spare
                ):
                    wait = None
                    if (
                        self._current is not None and self._current.end > SEG_HEADER
                    ) or self._closed:
                        wait = max(0.0, self._last_append + self._idle - time.monotonic())
                    if wait == 0.0:
                        break
                    self._cv.wait(wait)
                if self._stopping:
                    return
                if self._want_spare:
                    continue
                full = len(self._closed) >= self._backlog
            try:
                self.checkpoint(rotate=not full)
            except Exception:
                log.exception("journal_checkpoint_failed")
                with self._cv:
                    self._cv.wait(1.0)

    def checkpoint(self, rotate: bool = True) -> None:
        """Make the folder files and the index of every closed segment durable (one
        ``syncfs``), then reclaim those segments; ``rotate`` closes the open one first."""
        if rotate:
            with self._lock:
                self.sync()
                self._close_current()
        with self._cv:
            closed, self._closed = self._closed, []
            names = [self._name(s) for s in closed]
            self._draining += 1
            try:
                self._cv.wait_for(lambda: not any(n in self._holds for n in names), HOLD_WAIT)
            finally:
                self._draining -= 1
        if not closed:
            return
        sync_filesystem(self.spool)
        with self._lock:
            for segment, name in zip(closed, names, strict=True):
                with self._cv:
                    if name in self._holds:  # still being written: the next checkpoint
                        self._closed.append(segment)
                        continue
                if name in self._failed:
                    self._leave(segment)
                else:
                    self._spare(segment)
        self.checkpoints += 1

    def _leave(self, segment: _Segment) -> None:
        self._close_fds(segment)
        self._left.append(segment)

    def close(self) -> None:
        """Checkpoint everything and remove this journal (a clean stop)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=60)
        if self._lock_fd is None:
            return
        self.checkpoint()
        for spare in self._spares:
            spare.unlink(missing_ok=True)
        for segment in self._closed:  # folder files still not written after HOLD_WAIT
            self._leave(segment)
        if self._left:  # unlocked, not removed: replayed by the next start
            log.warning("journal_left_for_replay", journal=self.id.hex,
                        segments=len(self._left))  # fmt: skip
            os.close(self._lock_fd)
            self._lock_fd = None
            return
        (self.folder / "lock").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        self.folder.rmdir()
        fsync_dir(self.folder.parent)


# ---------------------------------------------------------------------- replay


@dataclass
class Record:
    """A whole record of a segment: its metadata, and where its data lies."""

    segment: str  # "<journal id>:<seq>"
    meta: dict[str, Any]
    path: Path  # the segment file
    offset: int  # of the data
    size: int
    crc: int


def read_segment(path: Path) -> tuple[int, bytes, list[Record]] | None:
    """(seq, journal id, whole records) of a segment file; None if it is not one (a spare, a
    torn header). Reading stops at the first record that is not whole."""
    with open(path, "rb") as fp:
        head = fp.read(SEG_HEADER)
        if len(head) < _SEG_HEAD.size:
            return None
        magic, seq, jid, crc = _SEG_HEAD.unpack_from(head)
        if magic not in (_SEG_MAGIC, _OLD_MAGIC) or crc32(head[: _SEG_HEAD.size - 4]) != crc:
            return None
        align = _aligned if magic == _SEG_MAGIC else (lambda n: n)  # DFJSEG01: back to back
        records: list[Record] = []
        at = SEG_HEADER if magic == _SEG_MAGIC else _OLD_HEADER
        end = os.fstat(fp.fileno()).st_size
        while at + REC_HEADER <= end:
            fp.seek(at)
            raw = fp.read(REC_HEADER)
            magic, rseq, meta_len, size, data_crc = _REC_HEAD.unpack_from(raw)
            start = at + align(REC_HEADER + meta_len)  # of the data
            if magic != _REC_MAGIC or rseq != seq or start + size > end:
                break
            body = fp.read(meta_len)
            (head_crc,) = struct.unpack_from("<I", raw, _REC_HEAD.size)
            if crc32(body, crc32(raw[: _REC_HEAD.size])) != head_crc:
                break
            if _crc_of(fp, start, size) != data_crc:
                break
            try:
                meta = json.loads(body)
            except ValueError:
                break
            records.append(Record(f"{uuid.UUID(bytes=jid).hex}:{seq}", meta, path, start,
                                  size, data_crc))  # fmt: skip
            at = align(start + size)
    return seq, jid, records


def _crc_of(fp, offset: int, size: int) -> int:
    fp.seek(offset)
    crc = 0
    while size > 0:
        chunk = fp.read(min(size, _COPY))
        if not chunk:
            return -1
        crc, size = crc32(chunk, crc), size - len(chunk)
    return crc


def _orphans(root: Path) -> Iterator[tuple[Path, int]]:
    """The journal folders no live process holds, each with its lock (held by the caller
    until it is done)."""
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            fd = os.open(folder / "lock", os.O_RDWR)
        except FileNotFoundError:  # removed meanwhile, or made by hand: not a journal
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if folder.name.endswith(".new"):  # its process died while making it: empty
            (folder / "lock").unlink()
            folder.rmdir()
            os.close(fd)
            continue
        yield folder, fd


def recover(spool: Path, store) -> int:
    """Replay every journal in ``spool`` no live process holds into ``store`` (a
    :class:`~.groups.GroupStore`), make the result durable, and remove those journals.
    Returns the number of records replayed."""
    root = Path(spool) / JOURNAL_DIR
    replayed = 0
    for folder, fd in _orphans(root):
        try:
            segments = []
            for path in sorted(folder.glob("*.seg")) + sorted(folder.glob("spare-*")):
                found = read_segment(path)
                if found is not None:
                    segments.append(found)
            segments.sort(key=lambda s: s[0])
            ids = [f"{folder.name}:{seq}" for seq, _, _ in segments]
            records = [r for _, _, rs in segments for r in rs]
            for record in records:
                store.restore(record)
            dropped = store.drop_unjournaled(ids, records)
            replayed += len(records)
            sync_filesystem(Path(spool))
            for path in folder.iterdir():
                if path.name != "lock":
                    path.unlink()
            (folder / "lock").unlink()
            folder.rmdir()
            log.info("journal_replayed", journal=folder.name, records=len(records),
                     segments=len(segments), dropped=dropped)  # fmt: skip
        finally:
            os.close(fd)
    if root.is_dir():
        fsync_dir(root)
    return replayed
