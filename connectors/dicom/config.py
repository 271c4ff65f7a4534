"""Configuration of the DICOM receiver, as plain dataclasses.

No file format is parsed here: ``dataflow serve``'s loader maps its YAML onto these classes
(:meth:`ReceiverConfig.from_dict` accepts the same field names as a nested dict, which is also
what ``python -m connectors.dicom.receive.receiver --config JSON`` reads). Every value is checked by
:meth:`ReceiverConfig.validate`, which raises :class:`~dataflow.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dataflow.errors import ConfigError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

__all__ = [
    "CalledAE",
    "Peer",
    "ReceiverConfig",
    "ReceiverConfigError",
    "TLSConfig",
]

GroupBy = Literal["study", "series"]
LatePolicy = Literal["new-job", "ignore", "rerun"]
DuplicatePolicy = Literal["overwrite", "keep-first", "reject"]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


ReceiverConfigError = ConfigError  # the old name, which tests still import


def _check_ae(value: str, where: str) -> str:
    stripped = value.strip() if isinstance(value, str) else value
    if not isinstance(stripped, str) or not _AE_TITLE.match(stripped):
        raise ConfigError(
            f"{where}: AE title {value!r} must be 1-16 printable characters without backslash"
        )
    return stripped


@dataclass
class CalledAE:
    """One AE title the receiver answers to, and what happens to what it receives.

    Fields:
        ae_title: the called AE title (1-16 characters), as Clara's ``aeTitle``.
        routes: pipeline names every completed group goes to (Clara's ``pipeline-<name>``
            settings); one job per pipeline per group is the service's business.
        group_by: ``"study"`` (Study Instance UID, Clara's default ``groupBy`` 0020,000D) or
            ``"series"`` (Series Instance UID).
        timeout: quiet seconds: a group completes once nothing arrived for it for this long
            (Clara's ``timeout``, whose minimum is 5; smaller values are allowed for tests).
        complete_on_release: also complete the groups an association touched when that
            association is released normally (not when it is aborted).
        late: what an instance arriving after its group completed does: ``"new-job"`` (it
            starts a new group holding the late instances only), ``"ignore"`` (it is stored,
            acknowledged and recorded in a group of state ``ignored`` that is never handed
            over) or ``"rerun"`` (a new group holding the completed group's instances plus the
            late ones, so the pipeline runs again on the whole).
        ignored_sop_classes: SOP Class UIDs whose instances are acknowledged (Success) and
            dropped: neither stored nor grouped (Clara's ``ignoredSopClasses``; e.g. the
            secondary captures or structured reports a modality sends along with images).
    """

    ae_title: str
    routes: list[str] = field(default_factory=list)
    group_by: GroupBy = "study"
    timeout: float = 5.0
    complete_on_release: bool = False
    late: LatePolicy = "new-job"
    ignored_sop_classes: list[str] = field(default_factory=list)

    def ignores(self, sop_class: str) -> bool:
        return sop_class in self.ignored_sop_classes


@dataclass
class Peer:
    """A calling AE title allowed to associate; ``host`` (an IP address), when given, must
    also match the peer's address (Orthanc's ``DicomCheckModalityHost``)."""

    ae_title: str
    host: str | None = None


@dataclass
class TLSConfig:
    """DICOM TLS (PS3.15 B.12: TLS 1.2 minimum). ``ca``, when given, makes client
    certificates required and verified against it."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass
class ReceiverConfig:
    """The whole receiver.

    Fields:
        spool: directory that holds the received files and ``receiver.sqlite``.
        host, port: where to listen (``port=0`` picks a free port, see ``Receiver.port``).
        called_aes: the AE titles answered to (at least one); any other called AE title is
            rejected ("called AE title not recognised").
        peers: the calling-AE allow-list; an association from a calling AE (or host) not in
            it is rejected ("calling AE title not recognised") unless ``allow_unknown_peers``.
        allow_unknown_peers: accept any calling AE (off by default).
        duplicates: a SOP Instance UID already in the open group: ``"overwrite"`` (the new
            copy replaces the stored one), ``"keep-first"`` (Success, the new copy is
            discarded) or ``"reject"`` (failure status 0x0111 Duplicate SOP Instance).
        max_associations: established associations per listener process; more are rejected
            (transient, "local limit exceeded"). Connections still negotiating do not count
            (``artim_timeout`` bounds how long they may take).
        reserved_associations: of ``max_associations``, the slots only calling AE titles in
            ``peers`` may take: a caller not in the list (``allow_unknown_peers``) is refused
            once ``max_associations - reserved_associations`` (at least 1) are in use.
        artim_timeout: seconds a connection has to complete its A-ASSOCIATE-RQ (TLS handshake
            included), counted from the connection (DICOM's ARTIM timer); then it is closed
            (``association_request_timeout``). A connection closed by the peer before its
            request is let go at once.
        min_free_bytes, min_free_percent: the disk reserve of the spool's file system. When
            writing an instance would leave less free space than either, C-STORE answers
            0xA700 Refused: Out of Resources and nothing is written.
        max_pdu_size: the maximum PDU length we receive (0 = unlimited); large PDUs are much
            cheaper for pure-Python pynetdicom than the 16 KiB default.
        max_instance_size: an encoded dataset larger than this (bytes) is refused with
            0xA701 (Out of Resources) and not written; 0 = no limit.
        tls: DICOM TLS on this listener, or ``None`` for plain TCP.
        network_timeout, acse_timeout, dimse_timeout: pynetdicom's timeouts in seconds.
        reuse_port: set SO_REUSEPORT on the listening socket so that several listener
            processes can share one port (each with its own pynetdicom server, all sharing
            the SQLite database in WAL mode).
        processes: listener processes on the port (1..64). With more than one, the
            :class:`~connectors.dicom.receive.receiver.Receiver` starts ``processes - 1`` worker
            processes itself (``python -m connectors.dicom.receive.receiver --worker``, SO_REUSEPORT
            implied), restarts one that dies and stops them with itself: pynetdicom is pure
            Python, one process serves its associations with one GIL.
        journal: one device flush per acknowledged instance (``True``, the default): each
            instance's bytes and record are appended to a preallocated journal whose one
            ``fdatasync`` (shared by the instances in flight) makes them durable; the group
            folder and the index are written behind it and replayed from it after a crash
            (:mod:`~connectors.dicom.receive.journal`). ``False``: the temp file's fsync,
            then the rename, folder fsyncs and SQLite commit (two flushes per instance).
    """

    spool: Path
    called_aes: list[CalledAE]
    host: str = "127.0.0.1"
    port: int = 104
    peers: list[Peer] = field(default_factory=list)
    allow_unknown_peers: bool = False
    duplicates: DuplicatePolicy = "overwrite"
    max_associations: int = 25
    reserved_associations: int = 2
    artim_timeout: float = 10.0
    min_free_bytes: int = 0
    min_free_percent: float = 0.0
    max_pdu_size: int = 4 * 1024 * 1024
    max_instance_size: int = 2 * 1024**3
    tls: TLSConfig | None = None
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    reuse_port: bool = False
    processes: int = 1
    journal: bool = True

    def validate(self) -> ReceiverConfig:
        """Check every field (stripping AE titles); return ``self``."""
        self.spool = Path(self.spool)
        if not self.called_aes:
            raise ConfigError("called_aes: at least one called AE title is needed")
        seen: set[str] = set()
        for i, called in enumerate(self.called_aes):
            where = f"called_aes[{i}]"
            called.ae_title = _check_ae(called.ae_title, where)
            if called.ae_title in seen:
                raise ConfigError(f"{where}: AE title {called.ae_title!r} appears twice")
            seen.add(called.ae_title)
            if called.group_by not in ("study", "series"):
                raise ConfigError(f"{where}.group_by must be 'study' or 'series'")
            if called.late not in ("new-job", "ignore", "rerun"):
                raise ConfigError(f"{where}.late must be new-job, ignore or rerun")
            if not called.timeout > 0:
                raise ConfigError(f"{where}.timeout must be > 0 seconds")
            if not all(isinstance(r, str) and r for r in called.routes):
                raise ConfigError(f"{where}.routes must be pipeline names")
            bad = [u for u in called.ignored_sop_classes if not _UID.match(str(u))]
            if bad:
                raise ConfigError(f"{where}.ignored_sop_classes: {bad} are not UIDs")
            called.ignored_sop_classes = [str(u) for u in called.ignored_sop_classes]
        for i, peer in enumerate(self.peers):
            peer.ae_title = _check_ae(peer.ae_title, f"peers[{i}]")
        if self.duplicates not in ("overwrite", "keep-first", "reject"):
            raise ConfigError("duplicates must be overwrite, keep-first or reject")
        if not 1 <= self.max_associations <= 1000:
            raise ConfigError("max_associations must be 1..1000")
        if not 0 <= self.reserved_associations <= 1000:
            raise ConfigError("reserved_associations must be 0..1000")
        if not 0 < self.artim_timeout <= 3600:
            raise ConfigError("artim_timeout must be > 0 and <= 3600 seconds")
        if self.min_free_bytes < 0 or not 0 <= self.min_free_percent < 100:
            raise ConfigError("min_free_bytes >= 0 and 0 <= min_free_percent < 100")
        if self.max_pdu_size != 0 and self.max_pdu_size < 4096:
            raise ConfigError("max_pdu_size must be 0 (unlimited) or >= 4096")
        if self.max_instance_size < 0:
            raise ConfigError("max_instance_size must be >= 0")
        if not isinstance(self.processes, int) or not 1 <= self.processes <= 64:
            raise ConfigError("processes must be 1..64")
        if not isinstance(self.journal, bool):
            raise ConfigError("journal must be true or false")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be 0..65535")
        return self

    def called(self, ae_title: str) -> CalledAE | None:
        """The configuration of a called AE title, or ``None``."""
        for called in self.called_aes:
            if called.ae_title == ae_title.strip():
                return called
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` reads back."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReceiverConfig:
        """Build (and validate) from a nested dict of the field names above."""
        data = dict(data)
        try:
            data["called_aes"] = [CalledAE(**c) for c in data.get("called_aes", [])]
            data["peers"] = [Peer(**p) for p in data.get("peers", [])]
            if data.get("tls"):
                tls = dict(data["tls"])
                data["tls"] = TLSConfig(
                    cert=Path(tls["cert"]),
                    key=Path(tls["key"]),
                    ca=Path(tls["ca"]) if tls.get("ca") else None,
                )
            data["spool"] = Path(data["spool"])
            config = cls(**data)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"receiver configuration: {exc}") from exc
        return config.validate()
