"""C-STORE of files as stored, straight over an association's socket: the exporter's hot path.

pynetdicom sends a C-STORE through three threads: the caller encodes the command set with
pydicom and queues one P-DATA primitive per fragment; the DUL thread turns each into a PDU
object, encodes it (two copies of the fragment) and writes it; the response is read by the
DUL thread, decoded into a pydicom Dataset and a primitive, and queued back to the caller.
Into a dcmtk ``storescp`` on loopback that is about 4 ms per 525 kB instance where dcmtk's
``storescu`` takes 2.

:class:`DirectStore` does the same exchange itself on an association that pynetdicom
negotiated. For a run of C-STOREs it parks the association's DUL thread (in its idle wait,
:func:`fastnet.waker`), writes each request's command set and the file's bytes (read into
one buffer, never decoded) as P-DATA PDUs, and reads each response PDU itself. Anything it
does not expect (an A-ABORT, an A-RELEASE-RQ, a response it cannot parse) is given back to
pynetdicom unread (:func:`fastnet.push_back`): the DUL thread resumes and pynetdicom's state
machine acts on it. pynetdicom's DIMSE layer keeps no record of outstanding requests, and
P-DATA leaves its state machine in Sta6, so nothing there notices the exchanges.

It applies only where :mod:`fastnet` is installed (pynetdicom 3.0, not turned off), over
plain TCP (with TLS one SSL object would be written and read by two threads), and with
nobody bound to pynetdicom's sent/received events. :meth:`DirectStore.open` returns None
otherwise, and the sender uses pynetdicom's ``send_c_store``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from pathlib import Path

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from ..net import compat, fastnet, pdu
from ..net.association import pause_reactor, resume_reactor

__all__ = ["DirectStore", "ProtocolSurprise"]

SEND_PDU = 4 * 1024 * 1024  # the largest P-DATA we send to a peer that sets no limit
PARK_TIMEOUT = 5.0
MAX_RESPONSE = 1024 * 1024
COMMAND_LAST = pdu.COMMAND | pdu.LAST  # a command set in one fragment
_EVENTS = (
    evt.EVT_DIMSE_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_DATA_RECV,
)


class ProtocolSurprise(Exception):
    """The peer sent something other than the response: given back to pynetdicom."""


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a Part 10 file: after the File Meta group, whose length
    (0002,0000) is its first element; pydicom's parse where that element is missing."""
    with open(path, "rb") as file:
        head = file.read(144)
    if (
        len(head) == 144
        and head[128:132] == b"DICM"
        and head[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    ):
        return 144 + struct.unpack("<I", head[140:144])[0]
    return split_dataset(path)[1]


class DirectStore:
    """Owns the socket of an established association for C-STOREs of files as stored."""

    def __init__(self, assoc: Association, sock: socket.socket) -> None:
        self.assoc, self.sock = assoc, sock
        self.dul = assoc.dul
        self.held = False
        self.timeout = assoc.dimse_timeout
        self.max_pdu = assoc.dimse.maximum_pdu_size or SEND_PDU  # what the peer receives
        self.buffer = bytearray()

    @classmethod
    def open(cls, assoc: Association) -> DirectStore | None:
        """A DirectStore for ``assoc``, or None where it does not apply (see the module)."""
        sock = getattr(assoc.dul.socket, "socket", None)
        if not fastnet.installed() or type(sock) is not socket.socket or not assoc.is_established:
            return None
        if any(assoc.get_handlers(event) for event in _EVENTS):
            return None
        return cls(assoc, sock)

    # ---------------------------------------------------------------- the DUL thread

    def hold(self) -> bool:
        """Park pynetdicom's reactors (before the first C-STORE of a run)."""
        if self.held:
            return True
        pause_reactor(self.assoc)  # the association's thread; its checkpoint opens in release
        if not self.dul.to_provider_queue.empty() or not self.dul.event_queue.empty():
            resume_reactor(self.assoc)
            return False
        self.held = fastnet.waker(self.dul).hold(PARK_TIMEOUT)
        if not self.held:
            resume_reactor(self.assoc)
        return self.held

    def release(self) -> None:
        """Give the socket back to pynetdicom (before anything else uses the association)."""
        if not self.held:
            return
        self.held = False
        compat.restart_idle_timer(self.dul)  # it could not see the responses we read
        fastnet.waker(self.dul).release()
        resume_reactor(self.assoc)

    # ---------------------------------------------------------------- one C-STORE

    def store(
        self, path: Path, sop_class: str, sop_instance: str, context_id: int, msg_id: int
    ) -> int | None:
        """C-STORE the file at ``path`` (its dataset as stored, in the accepted context
        ``context_id``); the response's status, or None when there was none (the association
        is then aborted or handed back broken, as pynetdicom would leave it).
        :class:`OSError` if the file cannot be read (nothing was sent then)."""
        if not self.hold():
            raise ProtocolSurprise("pynetdicom's DUL thread is busy")
        primitive = C_STORE()
        primitive.MessageID, primitive.Priority = msg_id, 2
        primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = sop_class, sop_instance
        command = fastnet.c_store_rq_bytes(primitive)
        fragment = self.max_pdu - 6
        if command is None or len(command) > fragment:
            raise ProtocolSurprise("the command set does not fit in one PDU")
        offset = dataset_offset(path)
        with open(path, "rb") as file:
            remaining = file.seek(0, 2) - file.seek(offset)
            size = min(fragment, remaining)
            first = file.read(size)
            if len(first) != size:
                raise OSError(f"{path.name} shrank while being read")
            try:
                self.sock.settimeout(self.timeout)
                header = pdu.pdata_header(len(command), context_id, COMMAND_LAST)
                self.sock.sendall(header + command)
                self._send_dataset(file, first, remaining, fragment, context_id)
                return self._response(msg_id, context_id)
            except (OSError, ProtocolSurprise):
                self._give_up()
                return None
            finally:
                with contextlib.suppress(OSError):  # closed if the association was aborted
                    self.sock.settimeout(None)

    def _send_dataset(self, file, first: bytes, remaining: int, fragment: int, cx: int) -> None:
        remaining -= len(first)
        last = pdu.LAST if remaining <= 0 else 0
        self.sock.sendall(pdu.pdata_header(len(first), cx, last) + first)
        if remaining <= 0:
            return
        if len(self.buffer) < 12 + fragment:
            self.buffer = bytearray(12 + min(fragment, remaining))
        view = memoryview(self.buffer)
        try:
            while remaining > 0:
                size = min(fragment, remaining)
                remaining -= size
                view[:12] = pdu.pdata_header(size, cx, pdu.LAST if remaining <= 0 else 0)
                if file.readinto(view[12 : 12 + size]) != size:
                    raise OSError("the file shrank while being sent")  # the PDU is cut off
                self.sock.sendall(view[: 12 + size])
        finally:
            view.release()

    def _read(self, n: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("no C-STORE response within the DIMSE timeout")
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the peer closed the connection")
            data += chunk
        return bytes(data)

    def _response(self, msg_id: int, context_id: int) -> int:
        """Read PDUs until the response's command set is complete; what does not belong to
        it goes back to pynetdicom (:class:`ProtocolSurprise`)."""
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else 1e9)
        command = b""
        while True:
            header = self._read(pdu.PDU_HEADER, deadline)
            kind, length = pdu.parse_pdu_header(header)
            if length > MAX_RESPONSE:  # no C-STORE response is that long: a broken peer
                raise ProtocolSurprise(f"a PDU of {length} bytes instead of a response")
            body = self._read(length, deadline)
            last = self._command_fragments(body, context_id)
            if kind != pdu.P_DATA_TF or last is None:
                fastnet.push_back(self.dul.socket, header + body)
                raise ProtocolSurprise(f"PDU type 0x{kind:02X} instead of a C-STORE response")
            command += b"".join(part for part, _ in last)
            if last and last[-1][1]:
                break
        status = pdu.c_store_rsp_status(command, msg_id)
        if status is None:
            raise ProtocolSurprise("a response that is not this C-STORE's")
        return status

    @staticmethod
    def _command_fragments(body: bytes, context_id: int) -> list[tuple[bytes, bool]] | None:
        """The command fragments (data, last) in a P-DATA-TF body; None if it holds other."""
        pdvs = pdu.split_pdvs(body)
        if pdvs is None or any(cx != context_id or not c & pdu.COMMAND for cx, c, _ in pdvs):
            return None
        return [(bytes(data), bool(control & pdu.LAST)) for _, control, data in pdvs]

    def _give_up(self) -> None:
        """After a failed exchange: pynetdicom takes over and ends the association (what it
        has been given back, an A-ABORT for instance, or our abort after a timeout)."""
        pushed_back = fastnet.pushed_back(self.dul.socket)
        self.release()
        if not pushed_back and self.assoc.is_established:
            self.assoc.abort()
            return
        end = time.monotonic() + PARK_TIMEOUT
        while fastnet.pushed_back(self.dul.socket) and time.monotonic() < end:
            time.sleep(0.001)  # pynetdicom reads what we gave back
        if self.assoc.is_established:
            self.assoc.abort()  # the exchange is broken off mid-message: no way to go on
