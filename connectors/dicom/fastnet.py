"""pynetdicom's transport without its polling latency: a small, isolated patch.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever
nothing happened (no PDU arrived, no primitive to send), and the association thread sleeps
1 ms before each look at its DIMSE queue. Each C-STORE therefore waits up to a few
milliseconds between "the last PDU arrived", "the handler runs" and "the response goes out";
with a 1-process GIL and other associations, more. And ``AssociationSocket.recv`` reads a
PDU in 4096-byte ``recv`` calls appended to a ``bytearray``.

:func:`install` (idempotent; called when ``connectors.dicom.receiver`` or
``connectors.dicom.export`` is imported) changes three things in
pynetdicom's behaviour, leaving every decision of its state machines as it was, and adds
two hooks:

1. ``time.sleep`` as seen by ``pynetdicom.dul`` and ``pynetdicom.association`` becomes
   :func:`_sleep`. For the short polling sleeps (at most 10 ms) of a DUL thread it waits on
   an event set when a primitive is queued for sending or the DUL is told to stop;
   of an association thread, on an event set when a DIMSE message or an ACSE primitive is
   queued for it. Never longer than pynetdicom asked (1 ms); longer sleeps, and sleeps in
   any other thread, are plain ``time.sleep``. The loops re-check all their conditions after
   every wake-up, so waking early is always safe, and no signal is lost: it is given after
   the item is queued. (Waking the DUL on incoming data as well was tried: more, smaller
   reads and no gain, so the socket is still polled as pynetdicom does.)
2. ``AssociationSocket.recv(n)`` reads into one preallocated buffer with ``recv_into`` in
   chunks of up to 4 MiB (same result: the bytes read, fewer on EOF; same exceptions).

3. ``DIMSEServiceProvider.send_msg`` encodes a plain C-STORE response (Status, the two
   UIDs, no error comment or offending element, nobody bound to ``EVT_DIMSE_SENT``) directly
   into its one P-DATA (:func:`c_store_rsp_bytes`, the same bytes as pynetdicom's
   ``C_STORE_RSP.encode_msg``), instead of building and twice encoding a pydicom Dataset:
   1.4 ms of CPU per instance. Anything else goes through pynetdicom as before.

4. Two hooks for :mod:`connectors.dicom.direct` (the exporter's C-STORE path): a DUL
   thread can be parked in its idle wait (:func:`waker`, :meth:`_Waker.hold`), and bytes
   read off an ``AssociationSocket`` by someone else can be given back (:func:`push_back`):
   ``recv`` returns them first and ``ready`` is True while there are any.

And it sets pynetdicom's documented ``_config.LOG_HANDLER_LEVEL = "none"`` unless the
``pynetdicom`` logger is enabled for DEBUG: its standard handlers format a description of
every PDU and DIMSE message (and log an INFO line per C-STORE) on every association, a
fifth of the receiver's CPU per instance; the receiver logs its own events.

:func:`tune_malloc` (called by ``Receiver.start``) keeps freed memory in the process: glibc
maps every allocation of 128 KiB or more (each PDU, each reassembled dataset) afresh from
the kernel and unmaps it when freed, and first-touching fresh pages is slow on these VMs
(~0.4 GiB/s, machine notes). With the mmap threshold at 32 MiB and the trim threshold at
64 MiB, the receiver's CPU per 525 kB instance fell from about 10.7 to 7.7 ms. It keeps up
to 64 MiB of freed memory per malloc arena instead of returning it at once.

Socket buffer sizes are left alone on purpose: setting ``SO_RCVBUF`` turns off Linux's
autotuning, which here already grows a connection's buffer up to ``tcp_rmem``'s 32 MiB.

Only pynetdicom 3.0.x is patched (the loops were read there); with any other version, or
with ``DATAFLOW_DICOM_FASTNET=0`` in the environment, :func:`install` does nothing and
returns False. Tested in ``tests/unit/test_dicom_fastnet.py``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
import types
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

__all__ = [
    "c_store_rq_bytes",
    "c_store_rsp_bytes",
    "install",
    "installed",
    "push_back",
    "store_rsp_command",
    "tune_malloc",
    "waker",
]

RECV_CHUNK = 4 * 1024 * 1024

_real_sleep = time.sleep
_lock = threading.Lock()
_installed: list[bool] = []


def installed() -> bool:
    """Whether the patch is active in this process."""
    return bool(_installed and _installed[0])


def _notify_after(queue_obj: Any, notify) -> None:
    """Make ``queue_obj.put`` call ``notify()`` after queueing (instance attribute)."""
    put = queue_obj.put

    def put_and_notify(item, *args, **kwargs):
        put(item, *args, **kwargs)
        notify()

    queue_obj.put = put_and_notify


class _Waker:
    """What a DUL or association thread waits on instead of sleeping: an event set when
    one of its input queues grows (or, for a DUL, when it is told to stop).

    A DUL thread's waker can also be *held* (:meth:`hold`, for :mod:`.direct` and
    :mod:`.intake`): the thread then parks in its idle wait and in ``AssociationSocket.ready``
    (so it reads nothing) until :meth:`release`, except to send what is queued for it."""

    def __init__(self, thread: DULServiceProvider | Association) -> None:
        self.event = threading.Event()
        self._cond = threading.Condition()
        self.held = self.parked = False
        self._outgoing = None
        self._dul: DULServiceProvider | None = None
        if isinstance(thread, DULServiceProvider):
            self._outgoing = thread.to_provider_queue
            self._dul = thread
            _notify_after(thread.to_provider_queue, self.poke)
            kill = thread.kill_dul

            def kill_and_notify() -> None:
                kill()
                self.poke()

            thread.kill_dul = kill_and_notify  # type: ignore[method-assign]
        else:
            _notify_after(thread.dimse.msg_queue, self.event.set)
            _notify_after(thread.dul.to_user_queue, self.event.set)

    def poke(self) -> None:
        self.event.set()
        if self.held:
            with self._cond:
                self._cond.notify_all()

    def _sending(self) -> bool:
        """Something to do that parking must not delay: a primitive to send, the thread told
        to stop, or an association no longer established or being set up (rejected, aborted,
        released: the DUL's timers and state machine must run to close it)."""
        dul = self._dul
        if dul is None:
            return False
        if not self._outgoing.empty() or dul._kill_thread:  # type: ignore[union-attr]
            return True
        return dul.state_machine.current_state not in ("Sta3", "Sta6")

    def park(self) -> bool:
        """In the DUL thread: wait while held and nothing else is to be done (``_sending``);
        True if it did."""
        if not self.held:
            return False
        with self._cond:
            if not self.held or self._sending():
                return False
            self.parked = True
            self._cond.notify_all()
            while self.held and not self._sending():
                self._cond.wait(0.05)  # the state can change without a notification
            self.parked = False
            self._cond.notify_all()
        return True

    def wait(self, seconds: float) -> None:
        if self.park():
            return
        self.event.wait(seconds)
        self.event.clear()

    def hold(self, timeout: float, ready=None) -> bool:
        """Keep the thread parked until :meth:`release`; True once it is (and ``ready()``,
        checked while it is parked, is true). False, and released, after ``timeout``."""
        self.hold_soon()
        return self.wait_parked(timeout, ready)

    def hold_soon(self) -> None:
        """From now on the thread parks at its next wait or read (and stays parked)."""
        with self._cond:
            self.held = True
        self.event.set()

    def wait_parked(self, timeout: float, ready=None) -> bool:
        """After :meth:`hold_soon`: wait until the thread is parked (and ``ready()``)."""
        with self._cond:
            if self._cond.wait_for(lambda: self.parked and (ready is None or ready()), timeout):
                return True
        self.release()
        return False

    def release(self) -> None:
        with self._cond:
            self.held = False
            self._cond.notify_all()


def waker(thread: DULServiceProvider | Association) -> _Waker:
    """``thread``'s waker (made once)."""
    found = thread.__dict__.get("_fastnet_waker")
    if found is not None:
        return found
    with _lock:
        found = thread.__dict__.get("_fastnet_waker")
        if found is None:
            found = thread.__dict__["_fastnet_waker"] = _Waker(thread)
        return found


def _sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's loops: see the module's docstring."""
    me = threading.current_thread()
    if seconds > 0.01:  # a deliberate pause (e.g. after an abort), not a polling loop
        _real_sleep(seconds)
        return
    if isinstance(me, (DULServiceProvider, Association)):
        waker(me).wait(seconds)
        return
    _real_sleep(seconds)


def push_back(sock: AssociationSocket, data: bytes) -> None:
    """Put ``data`` (read off ``sock`` by someone else) back in front of what pynetdicom reads
    next: the DUL thread sees it as still unread (``ready`` is True until it is read)."""
    sock.__dict__["_fastnet_pushback"] = bytes(data) + sock.__dict__.get("_fastnet_pushback", b"")


_ready = AssociationSocket.ready.fget  # type: ignore[attr-defined]


def _ready_or_pushed_back(self: AssociationSocket) -> bool:
    dul = self.assoc.dul
    held = dul.__dict__.get("_fastnet_waker")
    if held is not None and held.held and threading.current_thread() is dul:
        held.park()
        if held.held:  # woken (or not parked) to send something: read nothing yet
            return False
    return bool(self.__dict__.get("_fastnet_pushback")) or _ready(self)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: up to ``nr_bytes`` (fewer only when the peer closed)."""
    sock = self.socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    pushed = self.__dict__.pop("_fastnet_pushback", b"")
    if pushed:
        nr_read = min(len(pushed), nr_bytes)
        view[:nr_read] = pushed[:nr_read]
        if pushed[nr_read:]:
            self.__dict__["_fastnet_pushback"] = pushed[nr_read:]
    try:
        while nr_read < nr_bytes:
            chunk = min(nr_bytes - nr_read, RECV_CHUNK)
            got = sock.recv_into(view[nr_read:], chunk)  # type: ignore[union-attr]
            if not got:
                break
            nr_read += got
    finally:
        view.release()
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("latin-1")  # a request's bytes as received (decoded as latin-1)
    return data + b"\0" if len(data) % 2 else data


def c_store_rsp_bytes(primitive: C_STORE) -> bytes | None:
    """The command set (Implicit VR Little Endian) of a plain C-STORE response, or None when
    the primitive carries more than Status, the two UIDs and the message ID."""
    p = primitive
    if p.ErrorComment is not None or p.OffendingElement is not None:
        return None
    sop_class, sop_instance, status = p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Status
    if sop_class is None or sop_instance is None or not isinstance(status, int):
        return None
    if not isinstance(p.MessageIDBeingRespondedTo, int):
        return None
    return store_rsp_command(sop_class, sop_instance, p.MessageIDBeingRespondedTo, status)


def store_rsp_command(
    sop_class: str, sop_instance: str, msg_id: int, status: int, comment: str | None = None
) -> bytes:
    """A C-STORE response's command set, with an Error Comment (0000,0902) if given (ASCII,
    at most 64 characters: LO)."""
    note = b""
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        note = _element(0x00000902, text + b" " if len(text) % 2 else text)
    body = b"".join((
        _element(0x00000002, _uid(sop_class)),
        _element(0x00000100, struct.pack("<H", 0x8001)),
        _element(0x00000120, struct.pack("<H", msg_id)),
        _element(0x00000800, struct.pack("<H", 0x0101)),
        _element(0x00000900, struct.pack("<H", status)),
        note,
        _element(0x00001000, _uid(sop_instance)),
    ))  # fmt: skip
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq_bytes(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE request whose dataset follows (pynetdicom's bytes), or
    None when it names a move originator (pynetdicom encodes those)."""
    p = primitive
    if p.MoveOriginatorApplicationEntityTitle or p.MoveOriginatorMessageID is not None:
        return None
    sop_class, sop_instance = p.AffectedSOPClassUID, p.AffectedSOPInstanceUID
    if sop_class is None or sop_instance is None or not isinstance(p.MessageID, int):
        return None
    body = b"".join((
        _element(0x00000002, _uid(sop_class)),
        _element(0x00000100, struct.pack("<H", 0x0001)),
        _element(0x00000110, struct.pack("<H", p.MessageID)),
        _element(0x00000700, struct.pack("<H", p.Priority)),
        _element(0x00000800, struct.pack("<H", 0x0001)),
        _element(0x00001000, _uid(sop_instance)),
    ))  # fmt: skip
    return _element(0x00000000, struct.pack("<I", len(body))) + body


_send_msg = DIMSEServiceProvider.send_msg


def _fast_send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
    """``send_msg`` with the fast path for plain C-STORE responses (see the docstring)."""
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None:
        encoded = c_store_rsp_bytes(primitive)
        limit = self.maximum_pdu_size
        fits = encoded is not None and (not limit or len(encoded) + 6 <= limit)
        if fits and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            pdata = P_DATA()
            pdata.presentation_data_value_list = [[context_id, b"\x03" + encoded]]
            self.dul.send_pdu(pdata)
            return
    _send_msg(self, primitive, context_id)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep freed blocks below 32 MiB in the heap (glibc ``mallopt``); False where there is
    no glibc, or with ``DATAFLOW_DICOM_FASTNET=0``."""
    if os.environ.get("DATAFLOW_DICOM_FASTNET", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def install() -> bool:
    """Patch pynetdicom 3.0.x in this process (idempotent); False if not applicable."""
    with _lock:
        if _installed:
            return _installed[0]
        ok = pynetdicom.__version__.startswith("3.0.")
        ok = ok and os.environ.get("DATAFLOW_DICOM_FASTNET", "1") != "0"
        ok = ok and pynetdicom.dul.time is time and pynetdicom.association.time is time
        if ok:
            shim = types.ModuleType("time", "time, with pynetdicom-aware sleep (fastnet)")
            shim.__dict__.update(time.__dict__)
            shim.sleep = _sleep  # type: ignore[attr-defined]
            pynetdicom.dul.time = shim  # type: ignore[attr-defined]
            pynetdicom.association.time = shim  # type: ignore[attr-defined]
            AssociationSocket.recv = _recv  # type: ignore[method-assign]
            AssociationSocket.ready = property(_ready_or_pushed_back)  # type: ignore[method-assign]
            DIMSEServiceProvider.send_msg = _fast_send_msg  # type: ignore[method-assign]
            if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
                _config.LOG_HANDLER_LEVEL = "none"
        _installed.append(ok)
        return ok
