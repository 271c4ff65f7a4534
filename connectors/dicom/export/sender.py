"""C-STORE and C-ECHO to one destination (pynetdicom as SCU).

For each SOP class of a batch two kinds of presentation context are proposed: one per stored
(compressed) transfer syntax, and one offering Explicit and Implicit VR Little Endian. A file
goes out as stored when the peer accepted its syntax; otherwise, when the peer accepted only
uncompressed, it is decompressed with pydicom first. A file sent as stored goes over
:class:`~connectors.dicom.export.direct.DirectStore` where it applies (plain TCP, ``fastnet`` on):
about twice pynetdicom's rate. Each response is classified:

- ``delivered``: Success (0x0000) or a Warning (0x0001, 0xBxxx);
- ``permanent``: the peer refuses that instance for good (0xA9xx, 0xCxxx, 0x01xx/0x02xx
  protocol errors, SOP class not accepted, undecodable file): recorded, not retried;
- ``transient``: anything else (0xA7xx out of resources, 0x0110 processing failure, no
  response); association failures raise :class:`TransientExportError` (retry later).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ..net.association import AssociationFailed, Cancel, associate, pause_reactor
from .direct import DirectStore, ProtocolSurprise
from .transport import (
    DestinationError,
    EchoResult,
    FileResult,
    TransientExportError,
    c_store_result,
)

if TYPE_CHECKING:
    from .transport import FileInfo, Files, OnResult

__all__ = [
    "UNCOMPRESSED",
    "Cancel",
    "Destination",
    "DimseTransport",
    "echo",
    "plan_contexts",
    "send_files",
]

log = structlog.get_logger("connectors.dicom.export.exporter")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # DICOM's limit on presentation contexts per association


@dataclass(frozen=True)
class Destination:
    """A DICOM peer to C-STORE to. ``transfer_syntax`` is ``"stored"`` (send as stored, with
    uncompressed fallbacks) or ``"uncompressed"`` (always propose uncompressed only)."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DATAFLOW"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    max_associations: int = 1
    transfer_syntax: Literal["stored", "uncompressed"] = "stored"
    max_pdu: int = 0  # what we accept from the peer; 0 = no limit
    connection_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0

    def __post_init__(self) -> None:
        titles = {"ae_title": self.ae_title, "calling_ae_title": self.calling_ae_title}
        for label, title in titles.items():
            if not title or len(title) > 16 or not title.isascii() or "\\" in title:
                raise DestinationError(
                    f"destination {self.name!r}: {label} {title!r} must be 1-16 ASCII characters"
                )
        if not 0 < self.port < 65536:
            raise DestinationError(f"destination {self.name!r}: port {self.port} is not 1-65535")
        if self.max_associations < 1:
            raise DestinationError(f"destination {self.name!r}: max_associations must be >= 1")
        if self.transfer_syntax not in ("stored", "uncompressed"):
            raise DestinationError(
                f"destination {self.name!r}: transfer_syntax {self.transfer_syntax!r} must be "
                "'stored' or 'uncompressed'"
            )
        if self.tls_key and not self.tls_cert:
            raise DestinationError(f"destination {self.name!r}: tls_key needs tls_cert")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context (peer verified against ``tls_ca``), or None without TLS."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def describe(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    def transport(self) -> DimseTransport:
        """C-STORE to this destination (the exporter's :class:`~.transport.Transport`)."""
        return DimseTransport(self)


class DimseTransport:
    """DIMSE C-STORE to one :class:`Destination`: each :meth:`send` is one association (one
    per group of presentation contexts); :meth:`echo` is C-ECHO."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination

    def send(self, files: Files, on_result: OnResult, cancel: Cancel | None = None) -> None:
        send_files(self.destination, files, on_result, cancel)

    def echo(self) -> EchoResult:
        return echo(self.destination)


def _associate(
    destination: Destination,
    contexts: Sequence[tuple[str, Sequence[str]]],
    cancel: Cancel | None = None,
):
    context = destination.ssl_context()
    try:
        return associate(
            destination.calling_ae_title,
            (destination.host, destination.port),
            destination.ae_title,
            contexts,
            timeouts={
                "connection_timeout": destination.connection_timeout,
                "acse_timeout": destination.acse_timeout,
                "dimse_timeout": destination.dimse_timeout,
                "network_timeout": destination.network_timeout,
            },
            max_pdu=destination.max_pdu,
            tls_args=(context, destination.tls_server_name or destination.host)
            if context
            else None,
            cancel=cancel,
        )
    except (OSError, ssl.SSLError, AssociationFailed) as exc:
        raise TransientExportError(f"{destination.describe()}: {exc}") from None


def echo(destination: Destination) -> EchoResult:
    """C-ECHO ``destination``: ok when it answered Success."""
    try:
        assoc = _associate(destination, [(Verification, [ExplicitVRLittleEndian])])
    except TransientExportError as exc:
        return EchoResult(False, None, str(exc))
    try:
        pause_reactor(assoc)
        status = assoc.send_c_echo()
    finally:
        pause_reactor(assoc)
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code == 0x0000:
        return EchoResult(True, code)
    return EchoResult(False, code, "no C-ECHO response" if code is None else f"status 0x{code:04X}")


def plan_contexts(
    files: Sequence[FileInfo], preference: str = "stored"
) -> list[list[tuple[str, list[str]]]]:
    """Presentation contexts for ``files``, packed into association-sized groups."""
    by_class: dict[str, list[tuple[str, list[str]]]] = {}
    for info in files:
        wanted = by_class.setdefault(info.sop_class, [(info.sop_class, list(UNCOMPRESSED))])
        ts = info.transfer_syntax
        fresh = all(ts not in syntaxes for _, syntaxes in wanted)
        if preference == "stored" and ts not in UNCOMPRESSED and fresh:
            wanted.insert(0, (info.sop_class, [ts]))
    groups: list[list[tuple[str, list[str]]]] = [[]]
    for contexts in by_class.values():
        if len(groups[-1]) + len(contexts) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(contexts[:MAX_CONTEXTS])
    return [group for group in groups if group]


def _scrub(message: str, info: FileInfo) -> str:
    """No file path or name in an error (names may hold UIDs; errors end up in logs)."""
    return message.replace(str(info.path), "<file>").replace(info.path.name, "<file>")


def _prepare(assoc, info: FileInfo, preference: str):
    """What to send: the file's path (as stored) or its dataset (decompressed, or to be
    converted between uncompressed syntaxes by pynetdicom); a string says why not."""
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == info.sop_class
    }
    if not accepted:
        return "SOP class not accepted by the peer"
    ts = UID(info.transfer_syntax)
    if info.transfer_syntax in accepted and (preference == "stored" or not ts.is_compressed):
        return info.path  # sent as stored: pynetdicom streams the file's bytes
    try:
        ds = dcmread(info.path)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        return _scrub(f"unreadable file: {type(exc).__name__}: {exc}", info)
    if not ts.is_compressed:
        return ds  # pynetdicom converts between uncompressed syntaxes
    if not accepted.intersection(UNCOMPRESSED):
        return f"peer accepted none of {ts.name} or uncompressed"
    try:
        ds.decompress(generate_instance_uid=False)  # lossless: the same instance
    except Exception as exc:  # no codec, corrupt fragments...
        return _scrub(f"cannot decompress {ts.name}: {type(exc).__name__}: {exc}", info)
    return ds


def _store(assoc, direct: DirectStore | None, prepared, info: FileInfo, msg_id: int) -> int | None:
    """One C-STORE: a file as stored over ``direct`` where it can, else by pynetdicom; the
    response's status, None without one."""
    if not assoc.is_established:
        return None
    if direct is not None and isinstance(prepared, Path):
        context_id = next(
            cx.context_id
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == info.sop_class
            and cx.transfer_syntax[0] == info.transfer_syntax
        )
        try:
            return direct.store(prepared, info.sop_class, info.sop_instance, context_id, msg_id)
        except ProtocolSurprise:
            pass  # nothing was sent: pynetdicom sends this one
    if direct is not None:
        direct.release()
    pause_reactor(assoc)
    status = assoc.send_c_store(prepared, msg_id=msg_id)
    return int(status.Status) if "Status" in status else None


def send_files(
    destination: Destination, files: Files, on_result: OnResult, cancel: Cancel | None = None
) -> None:
    """C-STORE ``files`` (index, info) to ``destination``, calling ``on_result`` after each.

    Raises :class:`TransientExportError` when no association could be made or it broke
    off; the files without a result then are left for the next attempt. ``cancel`` is
    checked before each file, and aborts the association when told to.
    """
    # A file sent as stored goes as its own bytes, read in PDU-sized chunks, never decoded
    # and re-encoded (about twice the rate). pynetdicom then needs an exactly matching context
    # for a path, which is the only case in which this module passes one. A process-wide
    # setting, made when the first send starts (not at import).
    _config.STORE_SEND_CHUNKED_DATASET = True
    infos = dict(files)
    for group in plan_contexts(list(infos.values()), destination.transfer_syntax):
        classes = {sop_class for sop_class, _ in group}
        if cancel is not None and cancel.is_set():
            return
        assoc = _associate(destination, group, cancel)
        direct = DirectStore.open(assoc)
        try:
            for index, info in files:
                if info.sop_class not in classes:
                    continue
                if cancel is not None and cancel.is_set():
                    return
                prepared = _prepare(assoc, info, destination.transfer_syntax)
                if isinstance(prepared, str):
                    on_result(FileResult(index, "permanent", None, prepared))
                    continue
                try:
                    code = _store(assoc, direct, prepared, info, index % 65535 + 1)
                except (ValueError, AttributeError, InvalidDicomError, OSError) as exc:
                    error = _scrub(f"cannot send: {exc}", info)
                    on_result(FileResult(index, "permanent", None, error))
                    continue
                on_result(c_store_result(index, code))
                if code is None and not assoc.is_established:
                    raise TransientExportError(
                        f"{destination.describe()}: association broke off during C-STORE"
                    )
        finally:
            if direct is not None:
                direct.release()
            if assoc.is_established:
                pause_reactor(assoc)
                assoc.release()
