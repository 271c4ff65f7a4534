"""The receiver's C-STORE path straight off the socket: the ingest hot path.

pynetdicom receives a C-STORE in three threads: its DUL thread reads each PDU, decodes it into
objects and appends each fragment to the message (copies); the association thread hands the
complete message to the handler, which writes the bytes and fsyncs them only after the last
PDU arrived. That is about 7.5 ms of CPU per 525 kB instance here, on top of the fsync.

:class:`Intake` takes over an association that pynetdicom negotiated, in the association's
own thread, from the moment the A-ASSOCIATE-AC is sent. pynetdicom's DUL thread is parked
(:func:`fastnet.waker`) before the AC goes out, so it never reads a P-DATA PDU. For each
C-STORE-RQ, the dataset fragments are written to the spool's temp file as they arrive, then
the file is fsynced (or journaled) and handed to the same checks and commit as pynetdicom's path
(:class:`.store.StoreSteps`: ``answer``, ``checked_header``, ``below_reserve``, ``place``):
the promise is unchanged, Success only once the file and its record are durable. The
response goes out on the socket at once. It imports :mod:`.store`, never :mod:`.receiver`.

Whatever is not a C-STORE (a C-ECHO, an A-RELEASE-RQ, an A-ABORT, a context pynetdicom has to
refuse) is given back to pynetdicom unread (:func:`fastnet.push_back`) at a message boundary,
and pynetdicom serves the rest of the association as before. A protocol error in the middle
of a message aborts the association, as pynetdicom does; a partial file is removed.

Applies where :mod:`fastnet` is installed, over plain TCP (with TLS one SSL object would be
read by two threads) and with nobody bound to pynetdicom's PDU/data events. Otherwise
:meth:`Intake.prepare` returns None and pynetdicom serves the association.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

import structlog
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association

from ..net import compat, fastnet, pdu
from ..net.pdu import Status
from .journal import Staging
from .spool import PREAMBLE, file_meta_bytes, valid_uid
from .store import SpoolFile, StoreSteps

__all__ = ["Intake"]

log = structlog.get_logger("connectors.dicom")

PARK_TIMEOUT = 5.0
POLL = 0.5  # how often a read looks at the association and the receiver
MAX_COMMAND = 1024 * 1024  # a command set (or a PDU that is not P-DATA) beyond this: broken
CHUNK = 1024 * 1024  # dataset bytes read and written at a time
_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DATA_RECV, evt.EVT_DATA_SENT,
           evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)  # fmt: skip


class _GiveBack(Exception):
    """Stop here: pynetdicom serves the association from now on."""


class _Malformed(Exception):
    """A protocol error in the middle of a message: the association is aborted."""


class _Stop(Exception):
    """The association ended (closed, aborted, timed out, receiver stopping)."""


class _Instance(SpoolFile):
    """A C-STORE being received: its request and its temp file."""

    def __init__(self, steps: StoreSteps, fields: dict[int, bytes], context, called,
                 staged: Staging | None) -> None:  # fmt: skip
        super().__init__(steps, staged)
        self.msg_id = pdu.command_us(fields, pdu.MESSAGE_ID) or 0
        self.sop_class = pdu.command_ui(fields, pdu.AFFECTED_SOP_CLASS)
        self.sop_instance = pdu.command_ui(fields, pdu.AFFECTED_SOP_INSTANCE)
        self.context_id = context.context_id
        self.syntax = str(context.transfer_syntax[0])
        self.meta = b""
        if not (valid_uid(self.sop_class) and valid_uid(self.sop_instance)):
            self.refuse(Status.NOT_MATCHING, "the request's SOP Class or Instance UID is not a UID")
            return
        if called is not None and called.ignores(self.sop_class):
            self.refusal = (Status.SUCCESS, "ignored")  # acknowledged, read and dropped
            return
        self.meta = file_meta_bytes(self.sop_class, self.sop_instance, self.syntax,
                                    PYNETDICOM_IMPLEMENTATION_UID,
                                    PYNETDICOM_IMPLEMENTATION_VERSION)  # fmt: skip
        self.open(PREAMBLE + self.meta)

    def finish(self, assoc: Association) -> tuple[int, str, int | None]:
        """Checks, fsync and placement (for :meth:`StoreSteps.answer`)."""
        if self.refusal is not None:
            return (*self.refusal, None)
        called = self.steps.config.called(assoc.acceptor.ae_title)
        needed = len(PREAMBLE) + len(self.meta) + self.size
        try:
            if called is None:  # cannot happen: the ACSE rejected the association
                return Status.PROCESSING_FAILURE, "called AE title not configured", None
            if not self.sync():
                return (*self.refusal, None)  # type: ignore[misc]
            with self.reader() as file:
                offset = len(PREAMBLE) + len(self.meta)
                header = self.steps.checked_header(
                    file, self.syntax, offset, self.sop_class, self.sop_instance
                )
            path, self.path = self.path, None  # the committer owns it now (None: in memory)
            crc = self.crc if self.steps.journaled else None
            staged = self.staged if self.in_memory else None
            return self.steps.place(assoc, called, header, path, needed, crc, staged)
        finally:
            self.discard()  # anything not placed


class Intake:
    """Serves the C-STOREs of one association straight off its socket (see the module)."""

    def __init__(self, steps: StoreSteps, assoc: Association, sock: socket.socket) -> None:
        self.steps, self.assoc, self.sock = steps, assoc, sock
        self.dul = assoc.dul
        self.waker = fastnet.waker(self.dul)
        self.buffer = bytearray(256 * 1024)
        self.timeout = assoc.network_timeout
        self.nowait = sock.gettimeout() is None  # blocking: MSG_DONTWAIT reads without waiting
        self.staged = Staging() if steps.journaled else None  # reused instance to instance

    @classmethod
    def prepare(cls, steps: StoreSteps, assoc: Association) -> Intake | None:
        """Before the A-ASSOCIATE-AC is queued: park the DUL thread and return an Intake, or
        None where it does not apply (then nothing changed)."""
        sock = getattr(assoc.dul.socket, "socket", None)
        if not fastnet.installed() or type(sock) is not socket.socket:
            return None
        if any(assoc.get_handlers(event) for event in _EVENTS):
            return None
        intake = cls(steps, assoc, sock)
        intake.waker.hold_soon()  # it parks before it could read the first P-DATA
        return intake

    def run(self) -> None:
        """After pynetdicom's negotiation: serve C-STOREs until something is pynetdicom's."""
        try:
            if not self.assoc.is_established:
                return
            if not self.waker.wait_parked(PARK_TIMEOUT, self._ac_sent):
                return
            self._serve()
        except (_GiveBack, _Stop):
            pass
        except _Malformed as exc:
            log.warning("association_aborted", reason=f"protocol error: {exc}",
                        calling_ae=self.assoc.requestor.ae_title,
                        peer_host=self.assoc.requestor.address)  # fmt: skip
            self._abort()
        except Exception:
            log.exception("intake_failed", calling_ae=self.assoc.requestor.ae_title,
                          peer_host=self.assoc.requestor.address)  # fmt: skip
            self._abort()
        finally:
            self._release()
            if self.staged is not None:
                self.staged.close()

    # ------------------------------------------------------------------ the socket

    def _ac_sent(self) -> bool:
        dul = self.dul
        quiet = dul.to_provider_queue.empty() and dul.event_queue.empty()
        return quiet and dul.state_machine.current_state == "Sta6"

    def _release(self) -> None:
        compat.restart_idle_timer(self.dul)  # it could not see what we read
        self.waker.release()

    def _abort(self) -> None:
        self._release()
        if self.assoc.is_established:
            self.assoc.abort()

    def _ended(self) -> bool:
        a = self.assoc
        if self.steps.stopping or not a.is_established or a.is_aborted or compat.is_killed(a):
            return True
        return self.dul.state_machine.current_state != "Sta6"  # an A-ABORT went out, say

    def _read(self, n: int) -> memoryview:
        """Exactly ``n`` bytes (in :attr:`buffer`); :class:`_Stop` when the association ends
        (checked before every read), the connection breaks, or nothing arrives within the
        network timeout."""
        if len(self.buffer) < n:
            self.buffer = bytearray(n)
        view = memoryview(self.buffer)[:n]
        self._fill(view)
        return view

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (see :meth:`_read`)."""
        n = len(view)
        got = 0
        idle_until = None if self.timeout is None else time.monotonic() + self.timeout
        while got < n:
            if self._ended():
                raise _Stop
            try:
                count = None
                if self.nowait:  # what has arrived: one system call where it is there
                    with contextlib.suppress(BlockingIOError):
                        count = self.sock.recv_into(view[got:n], n - got, socket.MSG_DONTWAIT)
                if count is None:
                    if not select.select([self.sock], [], [], POLL)[0]:
                        if idle_until is not None and time.monotonic() > idle_until:
                            log.info("association_idle",
                                     calling_ae=self.assoc.requestor.ae_title,
                                     peer_host=self.assoc.requestor.address)  # fmt: skip
                            self._abort()
                            raise _Stop
                        continue
                    count = self.sock.recv_into(view[got:n], n - got)
            except (OSError, ValueError):  # reset by the peer, closed under us
                raise _Stop from None
            if not count:
                raise _Stop  # closed: the DUL thread sees it too once released
            got += count
            if idle_until is not None:
                idle_until = time.monotonic() + self.timeout

    def _send_response(self, item: _Instance, status: int, note: str) -> None:
        command = pdu.c_store_rsp(
            item.sop_class, item.sop_instance, item.msg_id, status, note or None
        )
        header = pdu.pdata_header(len(command), item.context_id, pdu.COMMAND | pdu.LAST)
        try:
            self.sock.sendall(header + command)
        except OSError:
            raise _Stop from None

    # ------------------------------------------------------------------ the messages

    def _serve(self) -> None:
        contexts = {cx.context_id: cx for cx in self.assoc.accepted_contexts}
        limit = fastnet.pdu_limit(self.assoc, pdu.P_DATA_TF)
        item: _Instance | None = None
        command = bytearray()
        pieces: list[bytes] = []  # the command's PDVs so far, to give back
        try:
            while True:
                header = bytes(self._read(pdu.PDU_HEADER))
                kind, left = pdu.parse_pdu_header(header)
                if kind == pdu.P_DATA_TF and left > limit:  # a claim: nothing allocated by it
                    fastnet.refused(self.assoc, kind, left, limit)
                    fastnet.stop_reading(self.dul)  # its DUL reads no more of it
                    raise _Malformed(f"a P-DATA-TF of {left} bytes, over the maximum {limit}")
                if kind != pdu.P_DATA_TF:  # A-RELEASE-RQ, A-ABORT...: pynetdicom's, body unread
                    if item is not None:
                        item.discard()
                        item = None
                    self._give_back(pieces, header)
                while left > 0:  # the PDVs of a P-DATA-TF, read one by one
                    if left < pdu.PDV_HEADER:
                        raise _Malformed("malformed P-DATA-TF")
                    head = bytes(self._read(pdu.PDV_HEADER))
                    size, context_id, control = pdu.parse_pdv_header(head)
                    if size < 2 or size - 2 > left - 6:
                        raise _Malformed("malformed PDV item")
                    left -= 4 + size
                    count = size - 2
                    if control & pdu.COMMAND:  # a command fragment
                        if item is not None:
                            raise _Malformed("a command inside a dataset")
                        if len(command) + count > MAX_COMMAND:
                            raise _Malformed(f"a command set over {MAX_COMMAND} bytes")
                        data = bytes(self._read(count))
                        command += data
                        pieces.append(head + data)
                        if control & pdu.LAST:
                            item = self._start(bytes(command), context_id, contexts, pieces, left)
                            command.clear()
                            pieces.clear()
                        continue
                    if item is None or context_id != item.context_id:
                        raise _Malformed("a dataset fragment without its C-STORE-RQ")
                    while count > 0:  # streamed to the file: memory stays bounded
                        n = min(count, CHUNK)
                        room = item.room(n)
                        if room is not None:  # read straight into the staging buffer
                            with room:
                                self._fill(room)
                                item.add(room, in_place=True)
                        else:
                            item.add(self._read(n))
                        count -= n
                    if control & pdu.LAST:
                        if self._ended():
                            raise _Stop  # aborted meanwhile: nothing is acknowledged
                        try:
                            status, note = self.steps.answer(
                                self.assoc, lambda it=item: it.finish(self.assoc)
                            )
                            if self._ended():  # an abort went out: no answer after it
                                item = None
                                raise _Stop
                            self._send_response(item, status, note)
                            item = None
                        finally:  # its folder file, once the answer is out (or cannot be)
                            self.steps.write_deferred(self.staged)
        finally:
            if item is not None:
                item.discard()  # never acknowledged: nothing half-written stays

    def _start(self, command: bytes, context_id: int, contexts: dict, pieces, left: int):
        """A complete command: a C-STORE-RQ we take, or everything given back to pynetdicom
        (with the ``left`` bytes still unread in the current P-DATA-TF)."""
        fields = pdu.parse_command(command)
        context = contexts.get(context_id)
        field = None if fields is None else pdu.command_us(fields, pdu.COMMAND_FIELD)
        kind = None if fields is None else pdu.command_us(fields, pdu.DATASET_TYPE)
        is_store, has_data = field == pdu.C_STORE_RQ, kind != pdu.NO_DATASET
        if not is_store or not has_data or context is None:
            self._give_back(pieces, rest=left)
        assert fields is not None and context is not None
        if pdu.command_ui(fields, pdu.AFFECTED_SOP_CLASS) != str(context.abstract_syntax):
            self._give_back(pieces, rest=left)  # pynetdicom answers a mismatched SOP class
        called = self.steps.config.called(self.assoc.acceptor.ae_title)
        return _Instance(self.steps, fields, context, called, self.staged)

    def _give_back(self, pieces: list[bytes], tail: bytes = b"", rest: int = 0) -> None:
        """Give the unserved PDVs back to pynetdicom as one P-DATA PDU whose length also
        covers the ``rest`` bytes of the current PDU still on the socket (the DUL reads them
        after what is given back), then ``tail``."""
        body = b"".join(pieces)
        data = (pdu.pdu_header(pdu.P_DATA_TF, len(body) + rest) + body if body else b"") + tail
        if data:
            fastnet.push_back(self.dul.socket, data)
        raise _GiveBack
