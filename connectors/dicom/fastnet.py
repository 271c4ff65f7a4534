"""pynetdicom's transport without its polling latency: a small, isolated patch.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever
nothing happened (no PDU arrived, no primitive to send), and the association thread sleeps
1 ms before each look at its DIMSE queue. Each C-STORE therefore waits up to a few
milliseconds between "the last PDU arrived", "the handler runs" and "the response goes out";
with a 1-process GIL and other associations, more. And ``AssociationSocket.recv`` reads a
PDU in 4096-byte ``recv`` calls appended to a ``bytearray``.

:func:`install` (idempotent; called when ``connectors.dicom.receiver`` is imported, so in
``dataflow serve`` it also applies to the exporter's associations) changes two things,
leaving every decision of pynetdicom's state machines as it was:

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

Socket buffer sizes are left alone on purpose: setting ``SO_RCVBUF`` turns off Linux's
autotuning, which here already grows a connection's buffer up to ``tcp_rmem``'s 32 MiB.

Only pynetdicom 3.0.x is patched (the loops were read there); with any other version, or
with ``DATAFLOW_DICOM_FASTNET=0`` in the environment, :func:`install` does nothing and
returns False. Tested in ``tests/unit/test_dicom_fastnet.py``.
"""

from __future__ import annotations

import os
import threading
import time
import types
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

__all__ = ["install", "installed"]

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
    one of its input queues grows (or, for a DUL, when it is told to stop)."""

    def __init__(self, thread: DULServiceProvider | Association) -> None:
        self.event = threading.Event()
        if isinstance(thread, DULServiceProvider):
            _notify_after(thread.to_provider_queue, self.event.set)
            kill = thread.kill_dul

            def kill_and_notify() -> None:
                kill()
                self.event.set()

            thread.kill_dul = kill_and_notify  # type: ignore[method-assign]
        else:
            _notify_after(thread.dimse.msg_queue, self.event.set)
            _notify_after(thread.dul.to_user_queue, self.event.set)

    def wait(self, seconds: float) -> None:
        self.event.wait(seconds)
        self.event.clear()


def _sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's loops: see the module's docstring."""
    me = threading.current_thread()
    if seconds > 0.01:  # a deliberate pause (e.g. after an abort), not a polling loop
        _real_sleep(seconds)
        return
    if isinstance(me, (DULServiceProvider, Association)):
        waker = me.__dict__.get("_fastnet_waker")
        if waker is None:
            waker = me.__dict__["_fastnet_waker"] = _Waker(me)
        waker.wait(seconds)
        return
    _real_sleep(seconds)


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: up to ``nr_bytes`` (fewer only when the peer closed)."""
    sock = self.socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
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
        _installed.append(ok)
        return ok
