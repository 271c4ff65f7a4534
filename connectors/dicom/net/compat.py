"""pynetdicom's private surface, in one place: every access to a private attribute or method
of pynetdicom by the DICOM connectors goes through a named function or hook class here.

Why: the network layer's fixes (:mod:`.fastnet`, :mod:`.association`, the receiver's ACSE and
request handler, :mod:`..receive.intake`, :mod:`..export.direct`) lean on pynetdicom 3.0's
internals. Named here, an upgrade is checked in one file: :func:`check` looks, when a receiver
or an exporter starts, for every internal the fast path needs, and says what is missing; the
fast path is then off (``dicom_fast_path_off`` at WARNING with the reason, ``fast_path`` 0 in
the receiver's stats and ``dataflow_dicom_receiver_fast_path`` 0 in its metrics) while the
rest runs on pynetdicom's public behaviour. ``tests/unit/test_dicom_fastnet.py`` fails if a
private pynetdicom name is used anywhere else in ``connectors/dicom``.

Values we hang on pynetdicom's objects (a receiver on its AE, a waker on a DUL thread...)
go through :func:`attach` / :func:`attached`, under names of ours.

:func:`quiet_logs` (at a receiver's or an exporter's start, never at import) turns off
pynetdicom's own logging of C-FIND/C-GET/C-MOVE identifiers (patient names and IDs:
``_config.LOG_REQUEST_IDENTIFIERS`` / ``LOG_RESPONSE_IDENTIFIERS``, documented settings),
and its per-message handlers unless its logger is enabled for DEBUG.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom import _config
from pynetdicom.acse import ACSE
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler

__all__ = [
    "SUPPORTED",
    "AcceptorACSE",
    "HookedAE",
    "HookedHandler",
    "HookedSocket",
    "attach",
    "attached",
    "check",
    "copy_context",
    "decode_pdu",
    "deliver_pdu",
    "dul_stopping",
    "is_killed",
    "quiet_logs",
    "reactor_checkpoint",
    "register_server",
    "replace_pdu_reader",
    "restart_idle_timer",
    "set_reactor_checkpoint",
]

SUPPORTED = "3.0."  # the pynetdicom the internals below were read in (pinned in pyproject)
_PREFIX = "_dataflow_"

# (what, owner, name): each internal we use, for check() to find
_INTERNALS = [
    ("ACSE._negotiate_as_acceptor", ACSE, "_negotiate_as_acceptor"),
    ("AE._create_socket", ApplicationEntity, "_create_socket"),
    ("AssociationSocket._create_socket", AssociationSocket, "_create_socket"),
    ("AssociationSocket._shutdown_socket", AssociationSocket, "_shutdown_socket"),
    ("RequestHandler._create_association", RequestHandler, "_create_association"),
    ("DULServiceProvider._read_pdu_data", DULServiceProvider, "_read_pdu_data"),
    ("DULServiceProvider._decode_pdu", DULServiceProvider, "_decode_pdu"),
]
_INSTANCE_INTERNALS = {  # set in __init__: looked for in the source of the constructor
    Association: ("_kill", "_reactor_checkpoint"),
    DULServiceProvider: ("_kill_thread", "_idle_timer", "_recv_pdu"),
    ApplicationEntity: ("_servers",),
    PresentationContext: ("_transfer_syntax",),
}


def check() -> str | None:
    """Why the fast path cannot be on in this process, in words; None if it can: pynetdicom
    3.0.x, ``DATAFLOW_DICOM_FASTNET`` not 0, its ``time`` modules still its own, and every
    internal the patches use present."""
    version = pynetdicom.__version__
    if not version.startswith(SUPPORTED):
        return (f"pynetdicom {version} is not the {SUPPORTED}x the patch was written and tested "
                "for (pinned in pyproject; docs/dicom.md)")  # fmt: skip
    if os.environ.get("DATAFLOW_DICOM_FASTNET", "1") == "0":
        return "DATAFLOW_DICOM_FASTNET=0 in the environment"
    if pynetdicom.dul.time is not time or pynetdicom.association.time is not time:
        return "pynetdicom's time module was replaced by someone else"
    missing = [what for what, owner, name in _INTERNALS if not hasattr(owner, name)]
    for owner, names in _INSTANCE_INTERNALS.items():
        source = owner.__init__.__code__.co_names
        missing += [f"{owner.__name__}.{name}" for name in names if name not in source]
    if missing:
        return f"pynetdicom {version} lacks {', '.join(missing)}"
    return None


def quiet_logs() -> None:
    """pynetdicom logs no identifiers (C-FIND/GET/MOVE datasets: patient names, IDs), and
    no description of every PDU and message unless its logger is enabled for DEBUG."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        _config.LOG_HANDLER_LEVEL = "none"


# -- our values on pynetdicom's objects -------------------------------------------------------


def attach(obj: Any, name: str, value: Any) -> None:
    """Keep ``value`` on ``obj`` (a pynetdicom object) under our ``name``."""
    obj.__dict__[_PREFIX + name] = value


def attached(obj: Any, name: str, default: Any = None) -> Any:
    """What :func:`attach` kept on ``obj`` under ``name`` (``default`` if nothing)."""
    return obj.__dict__.get(_PREFIX + name, default)


def detach(obj: Any, name: str, default: Any = None) -> Any:
    """Remove and return what :func:`attach` kept on ``obj`` under ``name``."""
    return obj.__dict__.pop(_PREFIX + name, default)


# -- an association and its threads ----------------------------------------------------------


def is_killed(assoc: Association) -> bool:
    """Whether the association's thread was told to end (``Association.kill``)."""
    return bool(assoc._kill)


def reactor_checkpoint(assoc: Association) -> Any:
    """The event the association's reactor waits on between DIMSE messages (pynetdicom
    clears it around ``send_c_store`` to pause the reactor)."""
    return assoc._reactor_checkpoint


def set_reactor_checkpoint(assoc: Association, checkpoint: Any) -> None:
    """Replace that event (:class:`.association._Checkpoint` knows when the reactor waits)."""
    assoc._reactor_checkpoint = checkpoint


def dul_stopping(dul: DULServiceProvider) -> bool:
    """Whether the DUL thread was told to stop."""
    return bool(dul._kill_thread)


def restart_idle_timer(dul: DULServiceProvider) -> None:
    """Restart the DUL's network idle timer (after bytes it did not read itself)."""
    dul._idle_timer.restart()


def replace_pdu_reader(reader) -> None:
    """Make ``reader(dul)`` what every DUL thread calls to read the next PDU off its socket
    (``DULServiceProvider._read_pdu_data``)."""
    DULServiceProvider._read_pdu_data = reader  # type: ignore[method-assign]


def decode_pdu(dul: DULServiceProvider, data: bytes | bytearray) -> tuple[Any, str]:
    """pynetdicom's decoding of a whole PDU: (the PDU object, its state machine event)."""
    return dul._decode_pdu(data)  # type: ignore[arg-type]


def deliver_pdu(dul: DULServiceProvider, pdu: Any, event: str) -> None:
    """Hand a decoded PDU and its event to the DUL's state machine, as its reader does."""
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


# -- servers and presentation contexts --------------------------------------------------------


def register_server(ae: ApplicationEntity, server: Any) -> None:
    """Count ``server`` among the AE's servers (so that ``ae.shutdown()`` stops it)."""
    ae._servers.append(server)


def copy_context(context: PresentationContext) -> PresentationContext:
    """A presentation context with its own list of the same (immutable) transfer syntax UIDs:
    what a ``deepcopy`` gives, without re-creating and re-validating every UID."""
    clone = object.__new__(type(context))
    clone.__dict__.update(context.__dict__)
    clone._transfer_syntax = list(context._transfer_syntax)
    return clone


# -- hooks: pynetdicom's private methods, overridden once, as named methods -------------------


class HookedSocket(AssociationSocket):
    """An ``AssociationSocket`` whose socket creation and shutdown are public hooks."""

    def _create_socket(self, address) -> socket.socket:
        return self.created(super()._create_socket(address))

    def _shutdown_socket(self) -> None:
        self.shut_down()

    def created(self, sock: socket.socket) -> socket.socket:
        """The new (unconnected) socket: configure it, return it."""
        return sock

    def shut_down(self) -> None:
        """Shut the connection down and close it (pynetdicom's own, by default)."""
        super()._shutdown_socket()


class HookedAE(ApplicationEntity):
    """An AE that makes the sockets of the associations it requests with :meth:`make_socket`."""

    def _create_socket(self, assoc, address, tls_args) -> AssociationSocket:
        return self.make_socket(assoc, address, tls_args)

    def make_socket(self, assoc, address, tls_args) -> AssociationSocket:
        return super()._create_socket(assoc, address, tls_args)


class AcceptorACSE(ACSE):
    """An ACSE whose acceptor side runs :meth:`negotiate` (by default pynetdicom's own
    negotiation, :meth:`negotiate_as_pynetdicom`)."""

    def _negotiate_as_acceptor(self) -> None:
        self.negotiate()

    def negotiate(self) -> None:
        self.negotiate_as_pynetdicom()

    def negotiate_as_pynetdicom(self) -> None:
        super()._negotiate_as_acceptor()


class HookedHandler(RequestHandler):
    """A server's request handler that passes each association it creates (not started
    yet) to :meth:`association_created`."""

    def _create_association(self) -> Association:
        return self.association_created(super()._create_association())

    def association_created(self, assoc: Association) -> Association:
        return assoc
