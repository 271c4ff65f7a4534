"""The steps of one received C-STORE, shared by the receiver's two paths.

pynetdicom's path (``Receiver._on_store``, the dataset reassembled in memory) and the direct
path (:mod:`.intake`, the dataset streamed to a temp file off the socket) both call one
:class:`StoreSteps`: :meth:`~StoreSteps.answer` runs a store and counts and logs its outcome;
:meth:`~StoreSteps.checked_header` (the dataset's UIDs are the request's),
:meth:`~StoreSteps.below_reserve` (the disk reserve) and :meth:`~StoreSteps.place` (the
commit: the group commit journals the file (:mod:`.journal`; or, with ``journal: false``,
takes it fsynced), moves it into its group folder and records it, several associations'
instances per transaction and flush, each durable before its Success goes back).

It knows the configuration, the spool and the committer; not pynetdicom's server, nor the
receiver (so :mod:`.intake` imports this module, never :mod:`.receiver`).
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from ..config import CalledAE, ReceiverConfig
from ..net.pdu import Status
from .groups import GroupStore, Placement
from .journal import Journal, ReserveReached, Staging, crc32
from .spool import (
    PREAMBLE,
    BadInstance,
    Header,
    file_meta_bytes,
    free_bytes,
    parse_header,
    write_temp,
)

__all__ = ["IGNORED", "RECHECK_FREE", "SpoolFile", "StoreSteps"]

log = structlog.get_logger("connectors.dicom")

IGNORED = "ignored: its SOP class is in ignored_sop_classes"  # Success, nothing stored

Outcome = tuple[int, str, int | None]  # status, note, group (None: nothing stored)
RECHECK_FREE = 16 * 1024 * 1024  # bytes written between two reads of the free space


class _Waiter:
    """One writer of :class:`_Committer`: its item and outcome, and the lock it sleeps on
    (held until someone wakes it: at most one wake-up pending)."""

    __slots__ = ("_lock", "_woken", "done", "error", "item", "taken")

    def __init__(self, item: Placement) -> None:
        self.item = item
        self.taken = False  # in a batch under way
        self.done = False  # answered: ``error`` None, or what the batch raised
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()
        self._woken = False

    def wake(self) -> None:
        """(Under the committer's lock.)"""
        if not self._woken:
            self._woken = True
            self._lock.release()

    def sleep(self, cv: threading.Condition) -> None:
        """Until :meth:`wake` (``cv`` held on entry and on return, released meanwhile)."""
        cv.release()
        try:
            self._lock.acquire()
        finally:
            cv.acquire()
        self._woken = False


class _Committer:
    """Moves temp files into place and records them, many per transaction: fsynced files
    whose rename and record are flushed by the commit, or with a :class:`.Journal`, files
    whose bytes and record one ``fdatasync`` of the journal makes durable.

    Group commit without a thread of its own: the first writer to arrive while no commit
    runs leads, taking every queued item into one transaction and one flush in its own
    thread; writers that arrive meanwhile wait and ride along in the next batch, which one
    of them leads. One association thus pays no hand-over between threads.

    Each writer sleeps on a lock of its own (:class:`_Waiter`) and is woken only when it has
    something to do: its batch is answered, or it is first in the queue when the commit
    becomes free. (A shared condition woke every writer at each step, and each woken thread
    took the GIL only to go back to sleep: a quarter of the association threads' GIL time
    with four associations.)"""

    def __init__(self, store: GroupStore, journal: Journal | None = None) -> None:
        self._store = store
        self._journal = journal
        self._cv = threading.Condition()  # guards the state below; stop() waits on it
        self._queue: list[_Waiter] = []  # not taken into a batch yet
        self._leading = False  # a batch is being committed (its flush may still run after)
        self._running = 0  # batches not yet answered
        self._stopping = False

    def start(self) -> None:
        pass

    def submit(self, item: Placement) -> None:
        """Record ``item`` durably (sets its status); raises what the transaction raised."""
        me = _Waiter(item)
        with self._cv:
            if self._stopping:
                raise RuntimeError("receiver stopping")
            self._queue.append(me)
            while not me.done and (self._leading or me.taken):
                me.sleep(self._cv)
            if me.done:  # a leader took it along
                if me.error is not None:
                    raise me.error
                return
            self._leading = True
            self._running += 1
            batch, self._queue = self._queue, []
            for waiter in batch:
                waiter.taken = True
        error: BaseException | None = None
        led = [True]

        def appended() -> None:  # committed: the next batch may go while this one flushes
            with self._cv:
                led[0] = self._leading = False
                self._wake_next()

        try:
            self._store.place([waiter.item for waiter in batch], self._journal, appended)
        except BaseException as exc:
            error = exc
        with self._cv:
            for waiter in batch:
                waiter.done, waiter.error = True, error
                if waiter is not me:
                    waiter.wake()
            if led[0]:
                self._leading = False
                self._wake_next()
            self._running -= 1
            if self._stopping:
                self._cv.notify_all()
        if error is not None:
            raise error

    def _wake_next(self) -> None:
        """The commit is free: the first queued writer leads the next batch (if any)."""
        if self._queue:
            self._queue[0].wake()

    def written(self, segment: str, ok: bool) -> None:
        """A deferred folder file (:meth:`StoreSteps.write_deferred`) is written (or not:
        its journal segment is then kept for the next start's replay)."""
        assert self._journal is not None
        self._journal.release(segment, ok)

    def stop(self) -> None:
        """Refuse new items, let the commit under way end, and close the journal."""
        with self._cv:
            self._stopping = True
            self._cv.wait_for(lambda: not self._running and not self._queue, timeout=30)
        if self._journal is not None:
            self._journal.close()  # a checkpoint of everything: the journal is removed


def _remove(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _fresh_tally() -> dict[str, Any]:
    return {"stored": 0, "failed": 0, "groups": set()}


class StoreSteps:
    """The C-STORE steps of one receiver (see the module). ``stopping()`` says whether the
    receiver is stopping (a direct read then ends)."""

    def __init__(
        self, config: ReceiverConfig, store: GroupStore, stopping: Callable[[], bool]
    ) -> None:
        self.config = config
        self.spool = Path(config.spool)
        self.incoming = self.spool / ".incoming"
        self._store = store
        self._stopping = stopping
        self._committer: _Committer | None = None
        self._tallies: dict[int, dict[str, Any]] = {}

    def start(self) -> None:
        journal = None
        if self.config.journal:
            journal = Journal(self.spool, self._keeps_reserve)
        self._committer = _Committer(self._store, journal)
        self._committer.start()

    def _keeps_reserve(self, nbytes: int) -> bool:
        return not self.below_reserve(nbytes, free_bytes(self.spool))

    @property
    def journaled(self) -> bool:
        """Whether instances go through the journal (no fsync of their temp files)."""
        return bool(self.config.journal)

    def stop(self) -> None:
        """Finish the commits under way; any later :meth:`place` fails."""
        if self._committer is not None:
            self._committer.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping()

    # -- per association ---------------------------------------------------------------------

    def tally(self, assoc) -> dict[str, Any]:
        """The association's figures so far: ``stored``, ``failed``, ``ignored``, ``groups``
        (and ``started``, set by the receiver)."""
        return self._tallies.setdefault(id(assoc), _fresh_tally())

    def close(self, assoc) -> dict[str, Any]:
        """The association's figures, forgotten here (it was released or aborted)."""
        return self._tallies.pop(id(assoc), _fresh_tally())

    # -- one C-STORE -------------------------------------------------------------------------

    def answer(self, assoc, store: Callable[[], Outcome]) -> tuple[int, str]:
        """Run ``store`` (one C-STORE: status, note, group), count and log its outcome; the
        status and note to answer."""
        stats = self.tally(assoc)
        calling, host = assoc.requestor.ae_title, assoc.requestor.address
        try:
            status, note, group_id = store()
        except BadInstance as exc:
            status, note, group_id = exc.status, str(exc), None
        except Exception as exc:
            log.exception("store_failed", calling_ae=calling, peer_host=host)
            status, note, group_id = Status.PROCESSING_FAILURE, type(exc).__name__, None
        if status == Status.SUCCESS and group_id is None:  # its SOP class is ignored: dropped
            stats["ignored"] = stats.get("ignored", 0) + 1
            return Status.SUCCESS, ""
        if status == Status.SUCCESS:
            stats["stored"] += 1
            stats["groups"].add(group_id)
            if note:
                log.info("store_note", calling_ae=calling, peer_host=host, note=note)
            return Status.SUCCESS, ""
        stats["failed"] += 1
        log.warning("store_refused", calling_ae=calling, peer_host=host,
                    status=f"0x{status:04X}", reason=note)  # fmt: skip
        return status, note

    def store_dataset(
        self, assoc, called: CalledAE | None, sop_class: str, sop_instance: str, syntax: str,
        stream,
    ) -> Outcome:  # fmt: skip
        """pynetdicom's path: the request's dataset, whole in ``stream`` (a BytesIO), checked,
        written after a file meta header, fsynced and placed."""
        if called is None:  # cannot happen: the ACSE rejected the association
            return Status.PROCESSING_FAILURE, "called AE title not configured", None
        if called.ignores(sop_class):
            return Status.SUCCESS, IGNORED, None
        size = stream.getbuffer().nbytes
        limit = self.config.max_instance_size
        if limit and size > limit:
            return Status.TOO_LARGE, f"instance larger than {limit} bytes", None
        header = self.checked_header(stream, syntax, 0, sop_class, sop_instance)
        meta = file_meta_bytes(
            header.sop_class_uid, header.sop_instance_uid, syntax,
            PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
        )  # fmt: skip
        needed = size + len(meta) + len(PREAMBLE)
        if self.below_reserve(needed, free_bytes(self.spool)):
            return Status.OUT_OF_RESOURCES, "disk reserve reached", None
        view = stream.getbuffer()
        crc = None
        try:
            temp = write_temp(self.incoming, (PREAMBLE, meta, view), sync=not self.journaled)
            if self.journaled:
                crc = crc32(view, crc32(meta, crc32(PREAMBLE)))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Status.OUT_OF_RESOURCES, "no space left", None
            raise
        finally:
            view.release()
        return self.place(assoc, called, header, temp, needed, crc)

    @staticmethod
    def checked_header(fp, syntax: str, offset: int, sop_class: str, sop_instance: str) -> Header:
        """The dataset's UIDs (at ``offset`` in ``fp``); :class:`BadInstance` if they are
        missing or not the request's."""
        header = parse_header(fp, syntax, offset)
        if header.sop_class_uid != sop_class:
            raise BadInstance(Status.NOT_MATCHING, "SOPClassUID differs from the request's")
        if header.sop_instance_uid != sop_instance:
            raise BadInstance(Status.NOT_MATCHING, "SOPInstanceUID differs from the request's")
        return header

    def reserve(self, total: int) -> float:
        """The bytes kept free on a file system of ``total`` bytes (``min_free_bytes`` or
        ``min_free_percent``, the larger)."""
        return max(self.config.min_free_bytes, total * self.config.min_free_percent / 100)

    def below_reserve(self, needed: int, free: tuple[int, int]) -> bool:
        """Whether storing ``needed`` bytes would go below the disk reserve, ``free`` being
        :func:`free_bytes` of the spool (available, total)."""
        available, total = free
        return available - needed < self.reserve(total)

    def place(
        self, assoc, called: CalledAE, header: Header, temp: Path | None, needed: int,
        crc: int | None = None, staged: Staging | None = None,
    ) -> Outcome:  # fmt: skip
        """Hand the ``temp`` file (fsynced, or journaled: ``crc`` is its CRC-32) to the
        committer: status, note and group once it and its record are durable. A full disk
        (the journal could not preallocate) is Out of Resources, as for the temp file.

        With ``temp`` None, the instance is in ``staged`` (journaled): its record is written
        from there and its folder file only created; :meth:`write_deferred` writes it after
        the acknowledgement has gone out."""
        log.debug("instance_received", sop_instance_uid=header.sop_instance_uid,
                  study_instance_uid=header.study_uid, size=needed)  # fmt: skip
        item = Placement(header, temp, needed, called, assoc.requestor.ae_title,
                         assoc.requestor.address, crc=crc, staged=staged)  # fmt: skip
        assert self._committer is not None and (temp is not None or staged is not None)
        try:
            self._committer.submit(item)
        except BaseException as exc:
            _remove(temp)  # not acknowledged (stopping, a full disk, the commit failed)
            if item.fd is not None:  # committed, then its flush failed: kept for the replay
                os.close(item.fd)
                item.fd = None
                self._committer.written(item.segment, False)  # type: ignore[arg-type]
            if isinstance(exc, ReserveReached):
                return Status.OUT_OF_RESOURCES, "disk reserve reached", None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Status.OUT_OF_RESOURCES, "no space left", None
            raise
        if item.fd is not None:
            assert staged is not None
            staged.deferred = item
        return item.status, item.note, item.group_id

    def write_deferred(self, staged: Staging | None) -> None:
        """Write the folder file of the instance :meth:`place` committed from ``staged``
        (if any), once its acknowledgement has gone out. Its record in the journal is
        durable already: the journal keeps it until this is done, and where the write fails
        (the file system full meanwhile, say), keeps it until the next start replays it."""
        item = None if staged is None else staged.deferred
        if item is None:
            return
        assert staged is not None and item.fd is not None and item.segment is not None
        staged.deferred = None
        written = False
        try:
            staged.write_file(item.fd, item.direct)
            written = True
        except OSError as exc:
            log.error("spool_write_failed", group=item.group_id, kept_for="journal replay",
                      error=os.strerror(exc.errno or 0))  # fmt: skip
        finally:
            os.close(item.fd)
            item.fd = None
            assert self._committer is not None
            self._committer.written(item.segment, written)


class SpoolFile:
    """An instance being written to the spool's ``.incoming`` as it arrives (the direct
    C-STORE path, :mod:`.intake`, and STOW-RS, :mod:`.stow`): the size limit and the disk
    reserve checked as it grows, refused (``refusal``: status and note, the file removed) at
    the first breach; :meth:`sync` fsyncs it before anything is placed (with the journal,
    it only closes it: ``crc``, the CRC-32 of its bytes kept as they are written, goes with
    it to the journal's record instead).

    Given a ``staged`` buffer (journaled only), the bytes are kept there instead, and no
    temp file is made: the journal writes the record from memory, the header check reads
    them there, and the folder file is written from there after the acknowledgement
    (:meth:`StoreSteps.write_deferred`). Only an instance that outgrows the buffer goes to
    a temp file (what the buffer held first, then the rest)."""

    def __init__(self, steps: StoreSteps, staged: Staging | None = None) -> None:
        self.steps = steps
        self.size = 0  # bytes given to add()
        self.head = 0  # bytes written by open() before them
        self.refusal: tuple[int, str] | None = None
        self.limit = steps.config.max_instance_size
        self.free = free_bytes(steps.spool)
        self._checked_at = 0  # bytes written when the free space was last read
        self.path: Path | None = None
        self.fd: int | None = None
        self.crc = 0
        self.staged = staged if steps.journaled else None
        if self.staged is not None:
            self.staged.reset()

    def open(self, head: bytes = b"") -> None:
        """Create the temp file and write ``head`` (a preamble and file meta header), unless
        the disk reserve refuses it."""
        if self.steps.below_reserve(len(head), self.free):
            self.refuse(Status.OUT_OF_RESOURCES, "disk reserve reached")
            return
        self.head = len(head)
        try:
            if self.staged is None:
                self._create()
            self._write(head)
        except OSError as exc:
            self._failed(exc)

    def _create(self) -> None:
        self.path = self.steps.incoming / f"{uuid.uuid4().hex}.part"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def _failed(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.refuse(Status.OUT_OF_RESOURCES, "no space left")
        else:
            log.error("spool_write_failed", error=os.strerror(exc.errno or 0))
            self.refuse(
                Status.PROCESSING_FAILURE,
                f"cannot write to the spool ({errno.errorcode.get(exc.errno or 0)})",
            )

    def _write(self, data, in_place: bool = False) -> None:
        if self.steps.journaled:
            self.crc = crc32(data, self.crc)
        if in_place:  # already where the staging buffer's next bytes go
            self.staged.grow(len(data))  # type: ignore[union-attr]
            return
        if self.fd is None and self.staged is not None:
            self.staged.add(data)
            if not self.staged.overflow:
                return
            self._create()  # too large for the buffer: to a temp file, what it holds first
            held = self.staged.data(0, self.staged.size)
            while held:
                held = held[os.write(self.fd, held) :]  # type: ignore[arg-type]
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]  # type: ignore[arg-type]

    @property
    def in_memory(self) -> bool:
        """Whether the staging buffer holds the whole instance (there is no temp file)."""
        return self.staged is not None and not self.staged.overflow

    def reader(self):
        """The file's bytes to read (:meth:`sync` first): from the staging buffer where it
        holds them, else the temp file."""
        if self.in_memory:
            return self.staged.file()  # type: ignore[union-attr]
        assert self.path is not None
        return open(self.path, "rb")

    def room(self, n: int) -> memoryview | None:
        """Where the next ``n`` bytes can be read in place (then :meth:`add` them with
        ``in_place``): the staging buffer, while it holds the whole instance and nothing was
        refused; None otherwise (read them elsewhere and :meth:`add` them)."""
        if self.refusal is not None or self.fd is not None or self.staged is None:
            return None
        return self.staged.room(n)

    def add(self, fragment, in_place: bool = False) -> None:
        """Append ``fragment`` (read and dropped once refused); ``in_place``: it is the
        :meth:`room` given for it, filled."""
        self.size += len(fragment)
        if self.refusal is not None:
            return
        if self.limit and self.size > self.limit:
            self.refuse(Status.TOO_LARGE, f"instance larger than {self.limit} bytes")
            return
        if self.size - self._checked_at >= RECHECK_FREE:  # others write to the disk too
            self.free, self._checked_at = free_bytes(self.steps.spool), self.size
        needed = self.size - self._checked_at  # since the free space was read
        if not self._checked_at:
            needed += self.head
        if self.steps.below_reserve(needed, self.free):
            self.refuse(Status.OUT_OF_RESOURCES, "disk reserve reached")
            return
        try:
            self._write(fragment, in_place)
        except OSError as exc:
            self._failed(exc)

    def sync(self) -> bool:
        """fsync and close the file: False (and refused) if that failed or it was refused."""
        if self.refusal is not None:
            return False
        if self.fd is None:
            return self.in_memory
        try:
            if not self.steps.journaled:
                os.fsync(self.fd)
        except OSError as exc:
            self._failed(exc)
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def refuse(self, status: int, note: str) -> None:
        self.refusal = (status, note)
        self.discard()

    def discard(self) -> None:
        """Close and remove the file (whatever was not handed to the committer)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
