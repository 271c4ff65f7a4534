"""The in-memory transport: the exporter's test double, no network and no PACS.

A :class:`MemoryTransport` is a destination and its transport in one (pass it to the
:class:`~connectors.dicom.export.exporter.Exporter` where a
:class:`~connectors.dicom.export.sender.Destination` would go). It keeps what it was sent, and
it can be told how to misbehave, in the ways a real peer does::

    pacs = MemoryTransport("pacs")
    pacs.refuse(2)                         # the next two attempts get no association
    pacs.respond(uid, 0xA700, 0x0000)      # that instance: out of resources, then stored
    pacs.hang(until="abort")               # the next attempt never answers
    exporter = Exporter(outbox, [pacs])
    ...
    pacs.delivered                         # the FileInfo of each instance stored, in order

Statuses are classified as a C-STORE response's (:func:`~.transport.classify_status`), with the
DIMSE transport's error texts, so what the outbox records is what a PACS would have caused.
A test that uses it says so: it is a fake, for the exporter's own logic (retries, backoff,
dead letters, stop); the transports themselves are tested against real peers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from .transport import EchoResult, TransientExportError, c_store_result

if TYPE_CHECKING:
    from ..net.association import Cancel
    from .transport import FileInfo, FileResult, Files, OnResult

__all__ = ["MemoryTransport"]

POLL = 0.01  # how often a hang looks at a cancel request (Cancel offers no wait)


class _Line:
    """Stands for the association's socket: what :meth:`Cancel.abort` shuts down."""

    def __init__(self) -> None:
        self.cut = threading.Event()
        self.socket = self

    def shutdown(self, how: int) -> None:
        self.cut.set()


class MemoryTransport:
    """An in-memory destination called ``name`` (see the module)."""

    def __init__(self, name: str = "memory", *, max_associations: int = 1) -> None:
        self.name = name
        self.max_associations = max_associations
        self.calls: list[list[int]] = []  # the file indices given to each send, refused or not
        self.results: list[FileResult] = []  # every answer given, in order
        self.delivered: list[FileInfo] = []  # the instances stored, in order
        self.hanging = threading.Event()  # set while a send hangs (tests wait on it)
        self._lock = threading.Lock()
        self._refusals: list[str] = []
        self._statuses: dict[str, list[int | None]] = {}
        self._hangs: list[tuple[int, str]] = []

    # -- the Endpoint ----------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.name} (in memory)"

    def transport(self) -> MemoryTransport:
        return self

    # -- the script ------------------------------------------------------------------------
    def refuse(self, times: int = 1, reason: str = "association rejected") -> None:
        """The next ``times`` sends get no association (:class:`TransientExportError`)."""
        with self._lock:
            self._refusals += [reason] * times

    def respond(self, sop_instance: str, *statuses: int | None) -> None:
        """The next C-STOREs of ``sop_instance`` answer ``statuses`` in turn (None: no
        response); Success after them."""
        with self._lock:
            self._statuses.setdefault(sop_instance, []).extend(statuses)

    def respond_all(self, sop_instances: Iterable[str], *statuses: int | None) -> None:
        for uid in sop_instances:
            self.respond(uid, *statuses)

    def hang(self, *, after: int = 0, until: Literal["request", "abort"] = "abort") -> None:
        """The next send stops answering after ``after`` files, until its cancel is requested
        (a stop between two files) or aborted (the association's socket shut down; the send
        then raises :class:`TransientExportError`, as a broken association does)."""
        with self._lock:
            self._hangs.append((after, until))

    # -- the Transport ---------------------------------------------------------------------
    def send(self, files: Files, on_result: OnResult, cancel: Cancel | None = None) -> None:
        with self._lock:
            self.calls.append([index for index, _ in files])
            refusal = self._refusals.pop(0) if self._refusals else None
            hang = self._hangs.pop(0) if self._hangs else None
        if refusal is not None:
            raise TransientExportError(f"{self.describe()}: {refusal}")
        for count, (index, info) in enumerate(files):
            if hang is not None and count == hang[0]:
                self._hang(cancel, hang[1])
            if cancel is not None and cancel.is_set():
                return
            result = self._answer(index, info)
            with self._lock:
                self.results.append(result)
                if result.outcome == "delivered":
                    self.delivered.append(info)
            on_result(result)

    def echo(self) -> EchoResult:
        with self._lock:
            refusal = self._refusals[0] if self._refusals else None
        if refusal is not None:
            return EchoResult(False, None, f"{self.describe()}: {refusal}")
        return EchoResult(True, 0x0000)

    def _answer(self, index: int, info: FileInfo) -> FileResult:
        with self._lock:
            queued = self._statuses.get(info.sop_instance)
            status = queued.pop(0) if queued else 0x0000
        return c_store_result(index, status)

    def _hang(self, cancel: Cancel | None, until: str) -> None:
        line = _Line()
        if cancel is not None:
            cancel.track(line)  # type: ignore[arg-type]
        self.hanging.set()
        try:
            while not line.cut.wait(POLL):
                if until == "request" and cancel is not None and cancel.is_set():
                    return
        finally:
            self.hanging.clear()
        raise TransientExportError(f"{self.describe()}: association aborted")
