"""C-FIND, C-GET and C-MOVE against one PACS (pynetdicom as SCU, Study Root); the same calls
on a DICOMweb source are QIDO-RS and WADO-RS (:mod:`connectors.dicom.query.web`).

The PACS is a :class:`~connectors.dicom.export.sender.Destination`, the settings of an export
destination (AE titles, host, port, TLS, time-outs); :func:`destination_from` builds one from the
mapping a stage is given (the keys of the service's ``dicom.destinations`` entries).

Every call makes its own association and is bounded: the destination's time-outs bound each
wait (connection, A-ASSOCIATE, each DIMSE message), and :class:`Retry` bounds the attempts.
Failures are exceptions that say what to do about them:

- :class:`PacsUnavailableError`: no association (refused, nothing listening, TLS, time-out), an
  association that broke off, or 0xA7xx (out of resources): retried ``Retry.attempts`` times,
  then raised naming ``AE@host:port``;
- :class:`NotFoundError`: the study (or series) is not on the PACS (its C-FIND matched nothing);
- :class:`RetrieveError`: a C-GET or C-MOVE that the PACS refused (0xA801 unknown move
  destination, 0xA900, 0xCxxx...) or that stored only part of what was asked: the counts of
  completed, failed and warning sub-operations are in the message and in ``result``; a partial
  retrieve is an error unless ``allow_partial``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dataflow.errors import DataflowError

from ..export.sender import Destination
from ..export.transport import DestinationError
from ..net.association import _AE, Cancel, _Peer

__all__ = [
    "MoveHere",
    "NotFoundError",
    "PacsUnavailableError",
    "QueryError",
    "RetrieveError",
    "RetrieveResult",
    "Retry",
    "c_find",
    "c_get",
    "c_move",
    "c_move_here",
    "destination_from",
    "move_from",
    "retrieve",
    "source_from",
]

log = structlog.get_logger("connectors.dicom.query")

Level = Literal["PATIENT", "STUDY", "SERIES"]
_LEVELS = ("PATIENT", "STUDY", "SERIES")
_PENDING = (0xFF00, 0xFF01)


class QueryError(DataflowError):
    """A query or retrieve failed; the message says which PACS and why."""


class PacsUnavailableError(QueryError):
    """The PACS could not be reached or let go (retryable)."""


class NotFoundError(QueryError):
    """What was asked for is not on the PACS."""


class RetrieveError(QueryError):
    """A C-GET/C-MOVE refused, or only partly done; ``result`` holds the counts."""

    def __init__(self, message: str, result: RetrieveResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Retry:
    """At most ``attempts`` tries for a PACS that is unavailable, ``delay`` seconds apart."""

    attempts: int = 3
    delay: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 100 or not 0 <= self.delay <= 3600:
            raise QueryError(
                f"retries: attempts {self.attempts} must be 1..100 and delay {self.delay} "
                "0..3600 seconds"
            )

    def run(self, what: str, call: Callable[[], Any], cancel: Cancel | None = None) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except PacsUnavailableError as exc:
                if attempt == self.attempts or (cancel is not None and cancel.is_set()):
                    raise PacsUnavailableError(
                        f"{exc} (gave up after {attempt} attempt{'s' * (attempt > 1)})"
                    ) from None
                log.warning("pacs_unavailable", what=what, attempt=attempt, error=str(exc))
                time.sleep(self.delay)
        raise AssertionError("unreachable")


@dataclass
class RetrieveResult:
    """The final C-GET/C-MOVE response: its status and sub-operation counts; for C-GET the
    files written (``files``)."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.failed or self.warning or self.status == 0xB000)

    def counts(self) -> str:
        return (
            f"{self.completed} completed, {self.failed} failed, {self.warning} with warnings "
            f"(status 0x{self.status:04X})"
        )


def destination_from(pacs: Mapping[str, Any] | Destination, name: str = "pacs") -> Destination:
    """A :class:`Destination` from a stage's ``pacs`` argument: ``ae``, ``host``, ``port``,
    ``calling-ae`` (default ``DATAFLOW``), ``tls`` (``cert``, ``key``, ``ca``: paths) and the
    time-outs ``connection-timeout``, ``acse-timeout``, ``dimse-timeout`` (seconds)."""
    if isinstance(pacs, Destination):
        return pacs
    if not isinstance(pacs, Mapping):
        raise QueryError(f"{name}: expected a mapping with ae, host and port, not {pacs!r}")
    known = {"ae", "host", "port", "calling-ae", "tls", "connection-timeout", "acse-timeout",
             "dimse-timeout"}  # fmt: skip
    unknown = sorted(set(pacs) - known)
    if unknown:
        raise QueryError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in ("ae", "host", "port") if k not in pacs]
    if missing:
        raise QueryError(f"{name}: {', '.join(map(repr, missing))} missing")
    tls = dict(pacs.get("tls") or {})
    try:
        return Destination(
            name=name,
            ae_title=str(pacs["ae"]),
            host=str(pacs["host"]),
            port=int(pacs["port"]),
            calling_ae_title=str(pacs.get("calling-ae", "DATAFLOW")),
            tls_cert=tls.get("cert"),
            tls_key=tls.get("key"),
            tls_ca=tls.get("ca"),
            connection_timeout=float(pacs.get("connection-timeout", 10)),
            acse_timeout=float(pacs.get("acse-timeout", 30)),
            dimse_timeout=float(pacs.get("dimse-timeout", 120)),
        )
    except (ValueError, DestinationError) as exc:
        raise QueryError(f"{name}: {exc}") from None


def source_from(pacs: Mapping[str, Any] | Any, name: str = "pacs") -> Any:
    """The PACS a stage's ``pacs`` argument (or an order's source) describes: a DICOMweb
    :class:`~connectors.dicom.query.web.WebSource` for ``protocol: dicomweb`` (or a ``url``),
    else a DIMSE :class:`Destination` (:func:`destination_from`; ``protocol: dimse``)."""
    from .web import WebSource, web_source_from

    if isinstance(pacs, (Destination, WebSource)):
        return pacs
    if not isinstance(pacs, Mapping):
        raise QueryError(f"{name}: expected a mapping (ae, host and port, or a url), not {pacs!r}")
    protocol = str(pacs.get("protocol", "dicomweb" if "url" in pacs else "dimse")).lower()
    if protocol == "dicomweb":
        return web_source_from(pacs, name)
    if protocol != "dimse":
        raise QueryError(f"{name}: protocol {pacs['protocol']!r} must be dimse or dicomweb")
    move_from(pacs, name)  # checked here too
    dimse = {k: v for k, v in pacs.items() if k != "protocol" and k not in _MOVE_KEYS}
    return destination_from(dimse, name)


_MOVE_KEYS = ("retrieve", "move-ae", "move-port", "move-host")


@dataclass(frozen=True)
class MoveHere:
    """Retrieve by C-MOVE to ourselves: for the move's duration a C-STORE SCP of our own, AE
    title ``ae`` on ``host:port``, takes the instances (the PACS must know that AE title at
    that address)."""

    ae: str
    port: int
    host: str = "0.0.0.0"


def move_from(pacs: Mapping[str, Any] | Any, name: str = "pacs") -> MoveHere | None:
    """How a ``pacs`` mapping wants studies retrieved: None for C-GET (``retrieve: get``, the
    default; and always for DICOMweb), a :class:`MoveHere` for ``retrieve: move`` with
    ``move-ae``, ``move-port`` and ``move-host`` (default all interfaces)."""
    if not isinstance(pacs, Mapping) or str(pacs.get("retrieve", "get")).lower() == "get":
        if isinstance(pacs, Mapping) and any(k in pacs for k in _MOVE_KEYS[1:]):
            raise QueryError(f"{name}: move-ae, move-port and move-host need retrieve: move")
        return None
    if str(pacs["retrieve"]).lower() != "move":
        raise QueryError(f"{name}: retrieve {pacs['retrieve']!r} must be get or move")
    ae = str(pacs.get("move-ae") or "").strip()
    if not ae or len(ae) > 16:
        raise QueryError(f"{name}: retrieve: move needs move-ae, our AE title (1-16 characters)")
    try:
        port = int(pacs.get("move-port"))
    except (TypeError, ValueError):
        raise QueryError(f"{name}: retrieve: move needs move-port, where we listen") from None
    if not 1 <= port <= 65535:
        raise QueryError(f"{name}: move-port {port} must be 1..65535")
    return MoveHere(ae=ae, port=port, host=str(pacs.get("move-host", "0.0.0.0")))


def _web(pacs: Any) -> bool:
    from .web import WebSource

    return isinstance(pacs, WebSource)


def _associate(
    pacs: Destination,
    contexts: Iterable[tuple[str, list[str]]],
    *,
    roles: list | None = None,
    handlers: list | None = None,
    cancel: Cancel | None = None,
):
    ae = _AE(pacs.calling_ae_title, cancel)
    ae.connection_timeout = pacs.connection_timeout
    ae.acse_timeout = pacs.acse_timeout
    ae.dimse_timeout = pacs.dimse_timeout
    ae.network_timeout = pacs.network_timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    peer = _Peer()
    context = pacs.ssl_context()
    try:
        assoc = ae.associate(
            pacs.host,
            pacs.port,
            ae_title=pacs.ae_title,
            max_pdu=pacs.max_pdu,
            ext_neg=roles or None,
            tls_args=(context, pacs.tls_server_name or pacs.host) if context else None,
            evt_handlers=[(evt.EVT_ACSE_RECV, peer.on_acse), *(handlers or [])],
        )
    except OSError as exc:  # TLS set-up, an unresolvable host
        raise PacsUnavailableError(f"{pacs.describe()}: {exc}") from None
    if not assoc.is_established:
        why = peer.reason or "no association (connection refused, nothing listening or time-out)"
        if peer.reason:  # a rejection is an answer: retrying the same request will not help
            raise QueryError(f"{pacs.describe()}: {why}")
        raise PacsUnavailableError(f"{pacs.describe()}: {why}")
    return assoc


def _status(status: Dataset) -> int | None:
    return int(status.Status) if "Status" in status else None


def _find_once(pacs: Destination, level: Level, keys: Mapping[str, Any]) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _associate(pacs, [(model, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])])
    matches: list[Dataset] = []
    try:
        for status, found in assoc.send_c_find(identifier, model):
            code = _status(status)
            if code is None:
                raise PacsUnavailableError(f"{pacs.describe()}: C-FIND got no response")
            if code in _PENDING:
                if found is not None:
                    matches.append(found)
                continue
            if code == 0x0000:
                return matches
            if code & 0xFF00 == 0xA700:
                raise PacsUnavailableError(f"{pacs.describe()}: C-FIND out of resources")
            raise QueryError(f"{pacs.describe()}: C-FIND {level} failed with 0x{code:04X}")
        raise PacsUnavailableError(f"{pacs.describe()}: C-FIND ended without a final status")
    finally:
        if assoc.is_established:
            assoc.release()


def c_find(
    pacs: Destination,
    level: Level,
    keys: Mapping[str, Any],
    *,
    retry: Retry = Retry(),
    cancel: Cancel | None = None,
) -> list[Dataset]:
    """The identifiers matching ``keys`` (keywords -> values; an empty value asks for that
    attribute back) at ``level`` (``PATIENT``, ``STUDY`` or ``SERIES``; Study Root)."""
    if level not in _LEVELS:
        raise QueryError(f"C-FIND level {level!r} must be one of {', '.join(_LEVELS)}")
    if _web(pacs):  # QIDO-RS
        from .web import qido

        return qido(pacs, level, keys, retry=retry, cancel=cancel)
    return retry.run(f"C-FIND {level}", lambda: _find_once(pacs, level, keys), cancel)


def _identifier(study_uid: str, series_uid: str | None) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    return identifier


def _what(study_uid: str, series_uid: str | None) -> str:
    return f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"


def _check_there(pacs, study_uid, series_uid, retry, cancel) -> list[str]:
    """:class:`NotFoundError` unless the PACS has the study (series); the SOP classes it says
    the study holds (SOPClassesInStudy, where it answers that)."""
    found = c_find(pacs, "STUDY", {"StudyInstanceUID": study_uid, "SOPClassesInStudy": ""},
                   retry=retry, cancel=cancel)  # fmt: skip
    if found and series_uid:
        found = c_find(pacs, "SERIES",
                       {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                       retry=retry, cancel=cancel)  # fmt: skip
    if not found:
        raise NotFoundError(f"{_what(study_uid, series_uid)} is not on {pacs.describe()}")
    classes = found[0].get("SOPClassesInStudy") or []
    return [str(c) for c in ([classes] if isinstance(classes, str) else classes) if str(c)]


def _storage_classes(in_study: list[str]) -> list[str]:
    """The storage SOP classes a C-GET proposes (with the SCP role): those the study holds
    first, then the standard ones, up to DICOM's 128 presentation contexts (one is the
    C-GET's own)."""
    classes = list(dict.fromkeys(in_study))
    classes += [str(c.abstract_syntax) for c in StoragePresentationContexts]
    return list(dict.fromkeys(classes))[:127]


def _sub_operations(
    pacs: Destination, operation: str, responses, result: RetrieveResult
) -> RetrieveResult:
    code: int | None = None
    for status, _ in responses:
        code = _status(status)
        if code is None:
            raise PacsUnavailableError(
                f"{pacs.describe()}: {operation} got no response (association aborted or "
                f"DIMSE time-out after {pacs.dimse_timeout} s)"
            )
        for attr, name in (("completed", "NumberOfCompletedSuboperations"),
                           ("failed", "NumberOfFailedSuboperations"),
                           ("warning", "NumberOfWarningSuboperations")):  # fmt: skip
            if name in status and status[name].value is not None:
                setattr(result, attr, int(status[name].value))
        if code not in _PENDING:
            break
    if code is None or code in _PENDING:
        raise PacsUnavailableError(f"{pacs.describe()}: {operation} ended without a final status")
    result.status = code
    return result


def _judge(pacs, operation, what, result: RetrieveResult, allow_partial: bool) -> RetrieveResult:
    code = result.status
    if code & 0xFF00 == 0xA700:
        raise PacsUnavailableError(
            f"{pacs.describe()}: {operation} of {what}: out of resources ({result.counts()})"
        )
    if code == 0xA801:
        raise RetrieveError(
            f"{pacs.describe()}: {operation} of {what}: the PACS does not know the move "
            "destination (add our AE title to its modalities)",
            result,
        )
    if code not in (0x0000, 0xB000):
        raise RetrieveError(
            f"{pacs.describe()}: {operation} of {what} failed: {result.counts()}", result
        )
    if result.completed == 0 and not result.warning:
        raise RetrieveError(
            f"{pacs.describe()}: {operation} of {what} retrieved nothing: {result.counts()}",
            result,
        )
    if result.partial and not allow_partial:
        raise RetrieveError(
            f"{pacs.describe()}: {operation} of {what} was partial: {result.counts()} "
            "(allow_partial: true accepts it)",
            result,
        )
    return result


class _Writer:
    """The C-STORE sub-operations of a C-GET: each instance written as received (its bytes,
    never decoded) to ``folder/<SOP Instance UID>.dcm``, fsynced, then renamed into place."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = []

    def on_store(self, event) -> int:
        try:
            uid = str(event.request.AffectedSOPInstanceUID)
            if not uid or "/" in uid or uid.startswith("."):
                return 0xC210  # cannot understand: not a usable UID
            path = self.folder / f"{uid}.dcm"
            part = path.with_suffix(".part")
            with open(part, "wb") as out:
                out.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(out, event.file_meta, enforce_standard=True)
                out.write(event.request.DataSet.getvalue())
                out.flush()
                os.fsync(out.fileno())
            part.replace(path)
        except OSError:
            return 0xA700  # out of resources: the disk
        if path not in self.files:
            self.files.append(path)
        return 0x0000


def _get_once(pacs, study_uid, series_uid, folder, classes, allow_partial, cancel):
    model = StudyRootQueryRetrieveInformationModelGet
    storage = _storage_classes(classes)
    contexts = [(model, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]
    contexts += [(uid, list(ALL_TRANSFER_SYNTAXES)) for uid in storage]
    writer = _Writer(folder)
    assoc = _associate(
        pacs,
        contexts,
        roles=[build_role(uid, scp_role=True) for uid in storage],
        handlers=[(evt.EVT_C_STORE, writer.on_store)],
        cancel=cancel,
    )
    what = _what(study_uid, series_uid)
    try:
        responses = assoc.send_c_get(_identifier(study_uid, series_uid), model)
        result = _sub_operations(pacs, "C-GET", responses, RetrieveResult(0))
    finally:
        if assoc.is_established:
            assoc.release()
    result.files = sorted(writer.files)
    return _judge(pacs, "C-GET", what, result, allow_partial)


def c_get(
    pacs: Destination,
    study_uid: str,
    folder: str | Path,
    *,
    series_uid: str | None = None,
    allow_partial: bool = False,
    retry: Retry = Retry(),
    cancel: Cancel | None = None,
) -> RetrieveResult:
    """C-GET a study (or one of its series) into ``folder``: the PACS sends each instance back
    on the same association and it is written as received. :class:`NotFoundError` when the
    PACS does not have it (a C-FIND first, which also asks for the SOP classes in the study:
    those are proposed first, so that a private or new one comes back too)."""
    if _web(pacs):  # WADO-RS
        from .web import wado

        return wado(pacs, study_uid, folder, series_uid=series_uid, retry=retry, cancel=cancel)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = _check_there(pacs, study_uid, series_uid, retry, cancel)
    return retry.run(
        "C-GET",
        lambda: _get_once(pacs, study_uid, series_uid, folder, classes, allow_partial, cancel),
        cancel,
    )


def _move_once(pacs, study_uid, series_uid, move_ae, allow_partial, cancel) -> RetrieveResult:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(pacs, [(model, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])], cancel=cancel)
    try:
        responses = assoc.send_c_move(_identifier(study_uid, series_uid), move_ae, model)
        result = _sub_operations(pacs, "C-MOVE", responses, RetrieveResult(0))
    finally:
        if assoc.is_established:
            assoc.release()
    return _judge(pacs, "C-MOVE", _what(study_uid, series_uid), result, allow_partial)


def c_move(
    pacs: Destination,
    study_uid: str,
    move_ae: str,
    *,
    series_uid: str | None = None,
    allow_partial: bool = False,
    retry: Retry = Retry(),
    cancel: Cancel | None = None,
) -> RetrieveResult:
    """C-MOVE a study (or series) to the AE title ``move_ae`` (one the PACS knows: usually our
    own receiver); the instances arrive there, not here. :class:`NotFoundError` as for
    :func:`c_get`."""
    if _web(pacs):
        raise QueryError(f"{pacs.describe()}: C-MOVE is DIMSE only (a DICOMweb source: C-GET "
                         "is WADO-RS)")  # fmt: skip
    if not move_ae or len(move_ae) > 16:
        raise QueryError(f"C-MOVE destination AE title {move_ae!r} must be 1-16 characters")
    _check_there(pacs, study_uid, series_uid, retry, cancel)
    return retry.run(
        "C-MOVE",
        lambda: _move_once(pacs, study_uid, series_uid, move_ae, allow_partial, cancel),
        cancel,
    )


def _move_here_once(pacs, study_uid, series_uid, folder, classes, move, allow_partial, cancel):
    writer = _Writer(folder)
    ae = AE(move.ae)
    ae.maximum_pdu_size = pacs.max_pdu
    ae.network_timeout = pacs.network_timeout
    ae.dimse_timeout = pacs.dimse_timeout
    for uid in _storage_classes(classes):
        ae.add_supported_context(uid, list(ALL_TRANSFER_SYNTAXES))
    try:
        server = ae.start_server((move.host, move.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, writer.on_store)])  # fmt: skip
    except OSError as exc:  # the port taken (another move now): retried
        raise PacsUnavailableError(
            f"{pacs.describe()}: cannot listen on {move.host}:{move.port} as {move.ae} for the "
            f"C-MOVE: {exc.strerror or exc}"
        ) from None
    try:
        result = _move_once(pacs, study_uid, series_uid, move.ae, allow_partial, cancel)
    finally:
        server.shutdown()
    result.files = sorted(writer.files)
    return result


def c_move_here(
    pacs: Destination,
    study_uid: str,
    folder: str | Path,
    move: MoveHere,
    *,
    series_uid: str | None = None,
    allow_partial: bool = False,
    retry: Retry = Retry(),
    cancel: Cancel | None = None,
) -> RetrieveResult:
    """C-MOVE a study (or series) to ourselves (:class:`MoveHere`) into ``folder``, each
    instance written as :func:`c_get` writes it; for a PACS that does not serve C-GET.
    :class:`NotFoundError` as for :func:`c_get`."""
    if _web(pacs):
        raise QueryError(f"{pacs.describe()}: C-MOVE is DIMSE only")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = _check_there(pacs, study_uid, series_uid, retry, cancel)
    return retry.run(
        "C-MOVE",
        lambda: _move_here_once(pacs, study_uid, series_uid, folder, classes, move,
                                allow_partial, cancel),
        cancel,
    )  # fmt: skip


def retrieve(
    pacs: Any,
    study_uid: str,
    folder: str | Path,
    *,
    move: MoveHere | None = None,
    series_uid: str | None = None,
    allow_partial: bool = False,
    retry: Retry = Retry(),
    cancel: Cancel | None = None,
) -> RetrieveResult:
    """A study (or series) into ``folder`` the way the source wants: :func:`c_move_here` with
    ``move``, else :func:`c_get` (WADO-RS on a DICOMweb source)."""
    if move is not None:
        return c_move_here(pacs, study_uid, folder, move, series_uid=series_uid,
                           allow_partial=allow_partial, retry=retry, cancel=cancel)  # fmt: skip
    return c_get(pacs, study_uid, folder, series_uid=series_uid, allow_partial=allow_partial,
                 retry=retry, cancel=cancel)  # fmt: skip
