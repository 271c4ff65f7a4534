"""pynetdicom's transport without its polling latency: a small, isolated patch.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever
nothing happened (no PDU arrived, no primitive to send), and the association thread sleeps
1 ms before each look at its DIMSE queue. Each C-STORE therefore waits up to a few
milliseconds between "the last PDU arrived", "the handler runs" and "the response goes out";
with a 1-process GIL and other associations, more. And ``AssociationSocket.recv`` reads a
PDU in 4096-byte ``recv`` calls appended to a ``bytearray``.

:func:`install` (idempotent; called when a receiver or an exporter starts, never at import)
changes three things in
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
2. ``AssociationSocket.recv(n)`` reads with ``recv_into`` into one buffer that grows with
   what arrives, at most 4 MiB ahead of it (:func:`read_exact`; same result: the bytes
   read, fewer on EOF or a reset).

3. ``DIMSEServiceProvider.send_msg`` encodes a plain C-STORE response (Status, the two
   UIDs, no error comment or offending element, nobody bound to ``EVT_DIMSE_SENT``) directly
   into its one P-DATA (:func:`c_store_rsp_bytes`, the same bytes as pynetdicom's
   ``C_STORE_RSP.encode_msg``), instead of building and twice encoding a pydicom Dataset:
   1.4 ms of CPU per instance. Anything else goes through pynetdicom as before.

4. Two hooks for :mod:`connectors.dicom.export.direct` (the exporter's C-STORE path): a DUL
   thread can be parked in its idle wait (:func:`waker`, :meth:`_Waker.hold`), and bytes
   read off an ``AssociationSocket`` by someone else can be given back (:func:`push_back`):
   ``recv`` returns them first and ``ready`` is True while there are any.

And, fast path or not, it turns pynetdicom's own logging down (:func:`.compat.quiet_logs`):
no identifiers (patient names and IDs) ever, and no description of every PDU and DIMSE
message (nor an INFO line per C-STORE) unless the ``pynetdicom`` logger is enabled for
DEBUG: those cost a fifth of the receiver's CPU per instance; the receiver logs its own events.

:func:`tune_malloc` (called by ``Receiver.start``) keeps freed memory in the process: glibc
maps every allocation of 128 KiB or more (each PDU, each reassembled dataset) afresh from
the kernel and unmaps it when freed, and first-touching fresh pages is slow on these VMs
(~0.4 GiB/s, machine notes). With the mmap threshold at 32 MiB and the trim threshold at
64 MiB, the receiver's CPU per 525 kB instance fell from about 10.7 to 7.7 ms. It keeps up
to 64 MiB of freed memory per malloc arena instead of returning it at once.

Socket buffer sizes are left alone on purpose: setting ``SO_RCVBUF`` turns off Linux's
autotuning, which here already grows a connection's buffer up to ``tcp_rmem``'s 32 MiB.

Only pynetdicom 3.0.x is patched (the loops were read there; pyproject pins it). Every
private name of pynetdicom used here is reached through :mod:`.compat`, whose :func:`.compat.check`
decides at start: with another version, an internal missing, or ``DATAFLOW_DICOM_FASTNET=0``
in the environment, :func:`install` patches nothing and returns False, :func:`why_off` says
why, :func:`start` logs it at WARNING (``dicom_fast_path_off``), and the receiver reports
``fast_path`` 0 in its stats (``dataflow_dicom_receiver_fast_path``). :func:`uninstall` undoes
it (tests run the same receivers with the fast path on and off). Tested in
``tests/unit/test_dicom_fastnet.py``.

**The PDU guard** (:func:`guard`, installed by :func:`install` and on its own by the receiver
and the exporter even with ``DATAFLOW_DICOM_FASTNET=0``: it is a bound, not a speed-up).
A PDU's length field is the peer's claim, so nothing is allocated by it:
``DULServiceProvider._read_pdu_data`` becomes :func:`_read_pdu_guarded`, which refuses a
PDU longer than :func:`pdu_limit` (the local maximum PDU length for a P-DATA-TF, 64 MiB
where that is 0 = unlimited; :data:`ASSOCIATE_MAX` for any PDU before the association is
established and for A-ASSOCIATE PDUs; 4 bytes for A-ASSOCIATE-RJ, A-RELEASE and A-ABORT)
with a ``pdu_refused`` warning naming the peer's address (never what it sent), then does
what pynetdicom does with an invalid PDU (A-ABORT, state machine event 19) and reads
nothing more from that connection. What it accepts is read with :func:`read_exact`: the
buffer grows with the bytes that actually arrive (never more than 4 MiB ahead of them), and
a read never waits past its deadline: the association's ARTIM deadline (``artim_deadline``
set by the receiver) before the association is established, the network timeout (counted
from the PDU's first byte) after; then the connection is shut down (``pdu_timeout``), so
that a peer sending part of a PDU and then nothing cannot hold a thread for ever.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import threading
import time
import types
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from . import compat, pdu

__all__ = [
    "ASSOCIATE_MAX",
    "c_store_rq_bytes",
    "c_store_rsp_bytes",
    "guard",
    "install",
    "installed",
    "pdu_limit",
    "push_back",
    "pushed_back",
    "read_exact",
    "refused",
    "refused_count",
    "start",
    "stop_reading",
    "tune_malloc",
    "uninstall",
    "waker",
    "why_off",
]

RECV_CHUNK = 4 * 1024 * 1024
ASSOCIATE_MAX = 256 * 1024  # any PDU before the association (an A-ASSOCIATE-RQ of 128
# contexts with many transfer syntaxes each is a few tens of KiB)
UNLIMITED_PDATA = 64 * 1024 * 1024  # a P-DATA-TF's bound where our maximum is 0 (unlimited)
FIXED_SIZE = {pdu.A_ASSOCIATE_RJ: 4, pdu.A_RELEASE_RQ: 4, pdu.A_RELEASE_RP: 4, pdu.A_ABORT: 4}
POLL = 0.5  # a blocked read looks at its deadline this often

log = structlog.get_logger("connectors.dicom")

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
        if not self._outgoing.empty() or compat.dul_stopping(dul):  # type: ignore[union-attr]
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
    found = compat.attached(thread, "waker")
    if found is not None:
        return found
    with _lock:
        found = compat.attached(thread, "waker")
        if found is None:
            found = _Waker(thread)
            compat.attach(thread, "waker", found)
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
    compat.attach(sock, "pushback", bytes(data) + compat.attached(sock, "pushback", b""))


def pushed_back(sock: AssociationSocket) -> bool:
    """Whether bytes given back with :func:`push_back` are still unread."""
    return bool(compat.attached(sock, "pushback"))


_ready = AssociationSocket.ready.fget  # type: ignore[attr-defined]


def _ready_or_pushed_back(self: AssociationSocket) -> bool:
    dul = self.assoc.dul
    held = compat.attached(dul, "waker")
    if held is not None and held.held and threading.current_thread() is dul:
        held.park()
        if held.held:  # woken (or not parked) to send something: read nothing yet
            return False
    return pushed_back(self) or _ready(self)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: up to ``nr_bytes`` (fewer only when the peer closed)."""
    return read_exact(self, nr_bytes)


def _raw(sock: AssociationSocket) -> socket.socket | None:
    raw = sock.socket
    return raw if raw is not None and raw.fileno() != -1 else None


def read_exact(sock: AssociationSocket, nr_bytes: int, deadline: float | None = None) -> bytearray:
    """``nr_bytes`` from ``sock`` (what was given back with :func:`push_back` first); fewer
    when the peer closed (or reset) or ``deadline`` (``time.monotonic()``) passed. The buffer grows
    with what arrives, at most :data:`RECV_CHUNK` ahead of it: a length claimed by the
    peer allocates nothing by itself."""
    buffer = bytearray(min(nr_bytes, RECV_CHUNK))
    nr_read = 0
    pushed = compat.detach(sock, "pushback", b"")
    if pushed:
        nr_read = min(len(pushed), nr_bytes)
        buffer[:nr_read] = pushed[:nr_read]
        if pushed[nr_read:]:
            compat.attach(sock, "pushback", pushed[nr_read:])
    raw = _raw(sock)
    while nr_read < nr_bytes and raw is not None:
        if nr_read == len(buffer):
            buffer.extend(bytes(min(nr_bytes - nr_read, RECV_CHUNK, len(buffer))))
        if deadline is not None and not _readable(raw, deadline):
            break
        with memoryview(buffer) as view:
            try:
                got = raw.recv_into(view[nr_read:], len(buffer) - nr_read)
            except (TimeoutError, BlockingIOError):
                continue  # the deadline decides
            except (OSError, ValueError):  # reset by the peer, closed under us: as EOF
                break
        if not got:
            break
        nr_read += got
    if nr_read < len(buffer):
        del buffer[nr_read:]
    return buffer


def _readable(raw: socket.socket, deadline: float) -> bool:
    """Wait until ``raw`` has something to read (True) or ``deadline`` passed (False)."""
    pending = getattr(raw, "pending", None)  # TLS: decrypted bytes select cannot see
    while not (pending is not None and pending()):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if select.select([raw], [], [], min(left, POLL))[0]:
                return True
        except (OSError, ValueError):
            return True  # closed under us: recv says so
    return True


def pdu_limit(assoc: Association, pdu_type: int) -> int:
    """The longest PDU of ``pdu_type`` this end reads on ``assoc`` (see the docstring)."""
    if pdu_type in FIXED_SIZE:
        return FIXED_SIZE[pdu_type]
    if pdu_type != pdu.P_DATA_TF or not assoc.is_established:
        return ASSOCIATE_MAX
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return local.maximum_length or UNLIMITED_PDATA


def _peer(assoc: Association) -> str:
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return str(remote.address)
    except Exception:  # not known yet
        return ""


_refusals = [0]  # PDUs refused for their length in this process (refused_count)


def refused_count() -> int:
    """How many PDUs this process refused for their length."""
    return _refusals[0]


def refused(assoc: Association, pdu_type: int, length: int, limit: int) -> None:
    """Log (and count) a PDU refused for its length (the peer's address, never its
    content)."""
    with _lock:
        _refusals[0] += 1
    log.warning("pdu_refused", peer_host=_peer(assoc), pdu_type=f"0x{pdu_type:02X}",
                length=length, limit=limit)  # fmt: skip


def _shut(sock: AssociationSocket) -> None:
    """Shut the connection down and close it (pynetdicom's own ``_shutdown_socket`` skips the
    close when the shutdown fails, as it does on a socket already shut down)."""
    raw = _raw(sock)
    if raw is not None:  # socket.socket's shutdown: an SSLSocket's would unwrap it
        try:
            socket.socket.shutdown(raw, socket.SHUT_RDWR)
        except OSError:
            pass
        raw.close()


def stop_reading(dul: DULServiceProvider) -> None:
    """After a refused PDU: the DUL thread reads nothing more from that connection."""
    compat.attach(dul, "pdu_refused", True)


def _read_pdu_guarded(self: DULServiceProvider) -> None:
    """``DULServiceProvider._read_pdu_data`` with every PDU bounded (see the docstring):
    the same events for the state machine, the same decoding."""
    sock = self.socket
    assoc = self.assoc
    if compat.attached(self, "pdu_refused"):  # nothing more is read after a refusal
        self.event_queue.put("Evt17")
        return
    artim = compat.attached(assoc, "artim_deadline")
    timeout = self.network_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    if artim is not None and not assoc.is_established:
        deadline = artim if deadline is None else min(deadline, artim)
    header = read_exact(sock, 6, deadline)
    if len(header) < 6:
        _timed_out(self, deadline, "header")
        self.event_queue.put("Evt17")
        return
    pdu_type, length = pdu.parse_pdu_header(header)
    if pdu_type not in pdu.PDU_TYPES:
        log.info("pdu_unknown", peer_host=_peer(assoc), pdu_type=f"0x{pdu_type:02X}")
        self.event_queue.put("Evt19")
        return
    limit = pdu_limit(assoc, pdu_type)
    if length > limit:
        refused(assoc, pdu_type, length, limit)
        stop_reading(self)
        self.event_queue.put("Evt19")  # A-ABORT, as for any invalid PDU
        return
    body = read_exact(sock, length, deadline)
    if len(body) != length:
        _timed_out(self, deadline, "body")
        self.event_queue.put("Evt17")
        return
    try:
        decoded, event = compat.decode_pdu(self, header + body)
    except Exception:
        log.info("pdu_undecodable", peer_host=_peer(assoc), pdu_type=f"0x{pdu_type:02X}")
        self.event_queue.put("Evt19")
        return
    compat.deliver_pdu(self, decoded, event)


def _timed_out(dul: DULServiceProvider, deadline: float | None, part: str) -> None:
    """A short read: if the deadline passed (rather than the peer closing), shut the
    connection down, and say so inside an association (before one, the receiver's ARTIM
    wait says ``association_request_timeout``)."""
    if deadline is not None and time.monotonic() >= deadline and _raw(dul.socket) is not None:
        if dul.assoc.is_established:
            log.info("pdu_timeout", peer_host=_peer(dul.assoc), part=part)
        _shut(dul.socket)


_guarded: list[bool] = []


def guard() -> bool:
    """Install the PDU guard (idempotent; pynetdicom 3.0.x only, whatever
    ``DATAFLOW_DICOM_FASTNET`` says); False if not applicable."""
    with _lock:
        if not _guarded:
            ok = pynetdicom.__version__.startswith(compat.SUPPORTED)
            if ok:
                compat.replace_pdu_reader(_read_pdu_guarded)
            _guarded.append(ok)
        return _guarded[0]


def c_store_rsp_bytes(primitive: C_STORE) -> bytes | None:
    """The command set (:func:`.pdu.c_store_rsp`) of a plain C-STORE response, or None when
    the primitive carries more than Status, the two UIDs and the message ID."""
    p = primitive
    if p.ErrorComment is not None or p.OffendingElement is not None:
        return None
    sop_class, sop_instance, status = p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Status
    if sop_class is None or sop_instance is None or not isinstance(status, int):
        return None
    if not isinstance(p.MessageIDBeingRespondedTo, int):
        return None
    return pdu.c_store_rsp(sop_class, sop_instance, p.MessageIDBeingRespondedTo, status)


def c_store_rq_bytes(primitive: C_STORE) -> bytes | None:
    """The command set (:func:`.pdu.c_store_rq`) of a C-STORE request whose dataset follows,
    or None when it names a move originator (pynetdicom encodes those)."""
    p = primitive
    if p.MoveOriginatorApplicationEntityTitle or p.MoveOriginatorMessageID is not None:
        return None
    sop_class, sop_instance = p.AffectedSOPClassUID, p.AffectedSOPInstanceUID
    if sop_class is None or sop_instance is None or not isinstance(p.MessageID, int):
        return None
    return pdu.c_store_rq(sop_class, sop_instance, p.MessageID, p.Priority)


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


_why_off: list[str] = []  # why install() left pynetdicom as it is, in words
_patched: dict[str, Any] = {}  # what install() replaced: (owner, name) -> the original


def why_off() -> str | None:
    """Why the fast path is off in this process (None: it is on, or not asked for yet)."""
    return _why_off[0] if _why_off else None


def _patch(owner: Any, name: str, value: Any) -> None:
    _patched.setdefault((owner, name), owner.__dict__[name])
    setattr(owner, name, value)


def install() -> bool:
    """Patch pynetdicom 3.0.x in this process (idempotent); False if not applicable, with
    the reason in :func:`why_off` (:func:`.compat.check`). The PDU guard (:func:`guard`) is
    installed in any case, and pynetdicom's own logging of identifiers and of every message
    is turned off (:func:`.compat.quiet_logs`). Called when a receiver or an exporter
    starts, never at import."""
    guard()
    with _lock:
        if _installed:
            return _installed[0]
        compat.quiet_logs()
        reason = compat.check()
        if reason is not None:
            _why_off.append(reason)
        ok = reason is None
        if ok:
            shim = types.ModuleType("time", "time, with pynetdicom-aware sleep (fastnet)")
            shim.__dict__.update(time.__dict__)
            shim.sleep = _sleep  # type: ignore[attr-defined]
            _patch(pynetdicom.dul, "time", shim)
            _patch(pynetdicom.association, "time", shim)
            _patch(AssociationSocket, "recv", _recv)
            _patch(AssociationSocket, "ready", property(_ready_or_pushed_back))
            _patch(DIMSEServiceProvider, "send_msg", _fast_send_msg)
        _installed.append(ok)
        return ok


def start(component: str) -> bool:
    """:func:`install`, at a receiver's or an exporter's start: when the fast path is off,
    say so at WARNING with the reason (once per start). Whether it is on."""
    on = install()
    if not on:
        log.warning("dicom_fast_path_off", component=component, reason=why_off(),
                    effect="about half the ingest rate")  # fmt: skip
    return on


def uninstall() -> None:
    """Undo :func:`install` (the PDU guard stays): the next :func:`install` decides again,
    from the environment then. For tests that run the same receiver with the fast path on
    and off in one process; nothing may be using pynetdicom meanwhile."""
    with _lock:
        for (owner, name), original in _patched.items():
            setattr(owner, name, original)
        _patched.clear()
        _installed.clear()
        _why_off.clear()
