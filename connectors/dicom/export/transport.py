"""The seam between the exporter and the wire: what a transport is, and what travels over it.

The :class:`~connectors.dicom.export.exporter.Exporter` knows one method of a transport::

    transport.send(files, on_result, cancel)

``files`` are ``(index, FileInfo)`` pairs (the outbox's pending files of one task);
``on_result`` is called once per file that got an answer, as soon as it has one, so that the
outbox records each outcome durably while the rest are still on their way (a stop or a crash
mid-send loses none); a file left without a result is simply sent again at the next attempt.
``send`` raises :class:`TransientExportError` when the peer cannot be reached or lets go
(the exporter retries with backoff), returns early when ``cancel`` is set (checked between
files), and lets go at once when ``cancel`` aborts it. Outcomes:

- ``delivered``: stored (a C-STORE Success or Warning, a STOW-RS instance acknowledged);
- ``permanent``: refused for good (:func:`classify_status`): recorded, never sent again;
- ``transient``: not stored this time: sent again at the next attempt.

Transports: DIMSE C-STORE (:class:`~connectors.dicom.export.sender.DimseTransport`, built by a
:class:`~connectors.dicom.export.sender.Destination`), DICOMweb STOW-RS
(:class:`~connectors.dicom.export.stow.StowTransport`, built by a
:class:`~connectors.dicom.export.stow.WebDestination`), and the in-memory test double
:class:`~connectors.dicom.export.memory.MemoryTransport`. Verification (C-ECHO, its QIDO-RS
counterpart) is a second, optional capability: :class:`Verifier`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from dataflow.errors import DataflowError

if TYPE_CHECKING:
    from ..net.association import Cancel

__all__ = [
    "DestinationError",
    "EchoResult",
    "Endpoint",
    "ExportError",
    "FileInfo",
    "FileResult",
    "Files",
    "OnResult",
    "Outcome",
    "TransientExportError",
    "Transport",
    "Verifier",
    "c_store_result",
    "classify_status",
    "describe_file",
]


class ExportError(DataflowError):
    """Export could not do what was asked (a file, a destination, a task)."""


class DestinationError(ExportError, ValueError):
    """A destination is configured wrongly."""


class TransientExportError(ExportError):
    """The destination could not be reached or dropped the association: retry later."""


Outcome = Literal["delivered", "permanent", "transient"]


@dataclass(frozen=True)
class FileInfo:
    """What the sender needs to know of a file, read once from its file meta."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


@dataclass(frozen=True)
class FileResult:
    """The outcome of one C-STORE: ``outcome`` is delivered, permanent or transient."""

    index: int
    outcome: Outcome
    status: int | None = None
    error: str = ""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None = None
    error: str = ""


Files = Sequence[tuple[int, FileInfo]]
OnResult = Callable[[FileResult], None]


@runtime_checkable
class Transport(Protocol):
    """Sends files to one destination (see the module for the contract)."""

    def send(self, files: Files, on_result: OnResult, cancel: Cancel | None = None) -> None: ...


@runtime_checkable
class Verifier(Protocol):
    """A transport that can check that its peer answers (``dataflow`` ``echo``)."""

    def echo(self) -> EchoResult: ...


class Endpoint(Protocol):
    """A configured destination, as the exporter sees it: its ``name``, how many attempts
    may run at once, and the transport it builds (once, when the exporter is made)."""

    @property
    def name(self) -> str: ...

    @property
    def max_associations(self) -> int: ...

    def describe(self) -> str: ...

    def transport(self) -> Transport: ...


def describe_file(path: str | Path) -> FileInfo:
    """Read ``path``'s file meta; :class:`ExportError` if it is not a DICOM file."""
    path = Path(path)
    try:
        meta = read_file_meta_info(path)
        return FileInfo(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
    except (OSError, AttributeError, ValueError, EOFError, InvalidDicomError) as exc:
        raise ExportError(f"{path.name}: not a DICOM file with file meta ({exc})") from None


def classify_status(status: int) -> Outcome:
    """Map a C-STORE response status (or a STOW-RS Failure Reason) to what the outbox does
    with the instance."""
    if status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "delivered"
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF:
        return "permanent"
    if status in (0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0x0212):
        return "permanent"
    return "transient"  # 0xA7xx, 0x0110, 0x0213 and anything unknown: bounded by the deadline


def c_store_result(index: int, status: int | None) -> FileResult:
    """File ``index``'s outcome from its C-STORE response ``status`` (None: no response)."""
    if status is None:
        return FileResult(index, "transient", None, "no C-STORE response")
    outcome = classify_status(status)
    error = "" if outcome == "delivered" else f"C-STORE status 0x{status:04X}"
    return FileResult(index, outcome, status, error)
