"""Requesting associations with pynetdicom, with fixes for four things it does not do well
for a long-running sender:

- **Cancelling**: :class:`Cancel` shuts down the sockets of a send in progress, so that even an
  association still waiting for an A-ASSOCIATE answer ends at once (a bounded stop).
- **Nagle's algorithm**: pynetdicom leaves it on, so the last, short PDU of a C-STORE waits
  for the peer's delayed ACK: about 7 ms per instance (80/s instead of 240/s into a dcmtk
  ``storescp`` on loopback). :class:`_Socket` sets ``TCP_NODELAY``, as ``storescu`` does.
- **Refused connections**: pynetdicom 3.0 calls ``shutdown`` before ``close`` on a socket that
  never connected; ``shutdown`` raises and the socket leaks (a ResourceWarning per attempt).
  :class:`_Socket` always closes it.
- **A race that loses C-STORE responses**: around each ``send_c_store`` pynetdicom pauses the
  association's reactor thread by clearing an event and waiting for a flag ``_is_paused``. That
  flag is still True for a moment after the reactor has left its wait, so under CPU contention
  the reactor takes the C-STORE-RSP off the queue ("Received unexpected C-STORE service
  message") and ``send_c_store`` waits for the DIMSE timeout. :class:`_Checkpoint` replaces the
  event and knows when the reactor really is parked; :func:`pause_reactor` waits for that
  before each request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket

from dataflow.errors import DataflowError

from . import compat

__all__ = ["AssociationFailed", "Cancel", "associate", "pause_reactor", "resume_reactor"]


class AssociationFailed(DataflowError):
    """No association: the message says why (rejected, aborted, no context accepted...)."""


class Cancel:
    """Stops a send: :meth:`request` between two instances, :meth:`abort` at once (its sockets
    are shut down, so that even a peer that never answers lets go)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._aborted = False
        self._sockets: list[AssociationSocket] = []
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def abort(self) -> None:
        self._event.set()
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def track(self, sock: AssociationSocket) -> None:
        with self._lock:
            self._sockets.append(sock)
            aborted = self._aborted
        if aborted:
            _shutdown(sock)


def _shutdown(sock: AssociationSocket) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]


class _Socket(compat.HookedSocket):
    def created(self, sock: socket.socket) -> socket.socket:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def shut_down(self) -> None:
        sock = self.socket
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            sock.close()  # type: ignore[union-attr]


class _AE(compat.HookedAE):
    def __init__(self, ae_title: str, cancel: Cancel | None) -> None:
        super().__init__(ae_title=ae_title)
        self._cancel = cancel

    def make_socket(self, assoc, address, tls_args) -> AssociationSocket:
        sock = _Socket(assoc, address=address)
        sock.tls_args = tls_args
        if self._cancel is not None:
            self._cancel.track(sock)
        return sock


class _Checkpoint:
    """A drop-in for the reactor's ``threading.Event`` that records when the reactor thread is
    blocked in :meth:`wait` (``parked``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self.parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._open:
                self.parked = True
                try:
                    self._cond.wait_for(lambda: self._open, timeout)
                finally:
                    self.parked = False
            return self._open


def pause_reactor(assoc: Association, timeout: float = 5.0) -> None:
    """Park ``assoc``'s reactor before a request (pynetdicom resumes it after the response)."""
    checkpoint = compat.reactor_checkpoint(assoc)
    if not isinstance(checkpoint, _Checkpoint):
        return
    checkpoint.clear()
    end = time.monotonic() + timeout
    while not checkpoint.parked and assoc.is_alive() and time.monotonic() < end:
        time.sleep(0.0001)


def resume_reactor(assoc: Association) -> None:
    """Let ``assoc``'s reactor go on after :func:`pause_reactor`."""
    compat.reactor_checkpoint(assoc).set()


class _Peer:
    """Collects what the peer said while associating (for the error message)."""

    def __init__(self) -> None:
        self.reason = ""

    def on_acse(self, event) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            self.reason = (
                f"association rejected ({primitive.result_str}, {primitive.source_str}: "
                f"{primitive.reason_str})"
            )


def associate(
    calling: str,
    address: tuple[str, int],
    called: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    timeouts: Mapping[str, float] | None = None,
    max_pdu: int = 0,
    tls_args=None,
    cancel: Cancel | None = None,
) -> Association:
    """An established association from ``calling`` to ``called`` at ``address`` proposing
    ``contexts`` (abstract syntax, transfer syntaxes); :class:`AssociationFailed` if none.
    ``timeouts``: AE attributes (``acse_timeout``, ``dimse_timeout``...)."""
    ae = _AE(calling, cancel)
    for name, value in (timeouts or {}).items():
        setattr(ae, name, value)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    peer = _Peer()
    assoc = ae.associate(
        address[0],
        address[1],
        ae_title=called,
        max_pdu=max_pdu,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_ACSE_RECV, peer.on_acse)],
    )
    if not assoc.is_established:
        why = peer.reason or (
            "association aborted or timed out (connection refused?)"
            if assoc.is_aborted
            else "no association (connection refused?)"
        )
        if not peer.reason and assoc.rejected_contexts and not assoc.accepted_contexts:
            why = "no presentation context accepted"
        raise AssociationFailed(why)
    if isinstance(compat.reactor_checkpoint(assoc), threading.Event):
        compat.set_reactor_checkpoint(assoc, _Checkpoint())
    return assoc
