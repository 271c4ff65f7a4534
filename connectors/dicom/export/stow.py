"""DICOMweb STOW-RS as a second kind of export destination (PS3.18 §10.5).

A task's files go to ``{url}/studies`` as they are stored (Part 10, never decoded), in
``multipart/related; type="application/dicom"`` requests of at most ``batch_files`` files
and ``batch_bytes`` bytes, streamed from disk. The response says what happened to each
instance:

- HTTP 200 or 202: an instance in its Failed SOP Sequence (0008,1198) is classified by its
  Failure Reason (0008,1197) as a C-STORE status would be
  (:func:`~connectors.dicom.export.transport.classify_status`: 0xA7xx and 0x0110 are
  retried, 0xA9xx, 0xCxxx and 0x0122 are refused for good); one the response lists in
  neither that sequence nor its Referenced SOP Sequence (0008,1199), when it has one, is
  refused as "not acknowledged"; the others are ``delivered``;
- HTTP 409 ("none stored"): the failed ones as above, the others retried;
- anything else (400, 401/403: credentials, 404: the URL, 413, 415, 429, 5xx, no
  connection, a time-out) fails the attempt (:class:`TransientExportError`): the outbox
  retries with its backoff and dead-letters the task at its deadline, with the HTTP status
  as the reason.

The standard library's ``http.client`` does the HTTP: a STOW-RS request is one streamed
POST, and the clients that know DICOMweb (dicomweb-client) re-encode pydicom datasets
instead of sending the stored bytes.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from ..net.association import Cancel
from .transport import (
    DestinationError,
    EchoResult,
    FileResult,
    TransientExportError,
    classify_status,
)

if TYPE_CHECKING:
    from .transport import FileInfo, Files, OnResult

__all__ = ["StowTransport", "WebDestination"]

log = structlog.get_logger("connectors.dicom.export.exporter")

FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
SOP_INSTANCE, FAILURE_REASON = "00081155", "00081197"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class WebDestination:
    """A DICOMweb service to STOW-RS to: ``url`` is its base (``.../dicom-web``)."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None  # a bearer token, instead of username and password
    tls_ca: str | None = None  # for https: the CA bundle (default: the system's)
    max_associations: int = 1  # requests at once (the exporter's cap per destination)
    batch_files: int = 50
    batch_bytes: int = 64 * 1024 * 1024
    timeout: float = 120.0
    transfer_syntax: str = "stored"

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DestinationError(
                f"destination {self.name!r}: url {self.url!r} must be http(s)://host[:port]/path"
            )
        if parts.username or parts.password:
            raise DestinationError(
                f"destination {self.name!r}: put credentials in username/password, not the url"
            )
        if self.token and (self.username or self.password):
            raise DestinationError(f"destination {self.name!r}: token or username, not both")
        if bool(self.username) != bool(self.password):
            raise DestinationError(f"destination {self.name!r}: username needs a password")
        if self.max_associations < 1 or self.batch_files < 1 or self.batch_bytes < 1:
            raise DestinationError(
                f"destination {self.name!r}: max-associations and batch sizes must be >= 1"
            )
        if self.transfer_syntax != "stored":
            raise DestinationError(
                f"destination {self.name!r}: a DICOMweb destination sends files as stored"
            )

    def describe(self) -> str:
        return f"{self.name} ({self.url})"

    def transport(self) -> StowTransport:
        """STOW-RS to this service (the exporter's :class:`~.transport.Transport`)."""
        return StowTransport(self)

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.tls_ca)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=self.timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
        return conn, parts.path.rstrip("/")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/dicom+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.username:
            pair = f"{self.username}:{self.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return headers


class _Tracked:
    """What :class:`Cancel` shuts down: the request's socket."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.socket = conn.sock


def _batches(destination: WebDestination, files: Sequence[tuple[int, FileInfo]]) -> Iterator:
    batch: list[tuple[int, FileInfo, int]] = []
    size = 0
    for index, info in files:
        try:
            nbytes = info.path.stat().st_size
        except OSError:
            nbytes = 0  # reported as unreadable when it is sent
        if batch and (
            len(batch) >= destination.batch_files or size + nbytes > destination.batch_bytes
        ):
            yield batch
            batch, size = [], 0
        batch.append((index, info, nbytes))
        size += nbytes
    if batch:
        yield batch


def _post(destination: WebDestination, batch, cancel: Cancel | None) -> tuple[int, bytes]:
    """POST one multipart request; (HTTP status, body). TransientExportError when there is no
    answer; OSError (with the file) when a file cannot be read."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + nbytes + 2 for _, _, nbytes in batch) + len(tail)
    conn, path = destination._connection()
    try:
        conn.putrequest("POST", f"{path}/studies")
        for key, value in destination._headers().items():
            conn.putheader(key, value)
        kind = f'multipart/related; type="application/dicom"; boundary={boundary}'
        conn.putheader("Content-Type", kind)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        if cancel is not None:
            cancel.track(_Tracked(conn))  # type: ignore[arg-type]
        for _, info, nbytes in batch:
            conn.send(head)
            with open(info.path, "rb") as file:
                sent = 0
                while chunk := file.read(CHUNK):
                    conn.send(chunk)
                    sent += len(chunk)
            if sent != nbytes:
                raise TransientExportError(f"{destination.describe()}: a file changed while sent")
            conn.send(b"\r\n")
        conn.send(tail)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise
        raise TransientExportError(
            f"{destination.describe()}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        conn.close()


def _outcomes(body: bytes) -> tuple[set[str] | None, dict[str, int]]:
    """(SOP Instance UIDs in the Referenced SOP Sequence, or None without one; SOP Instance
    UID -> Failure Reason from the Failed SOP Sequence) of a STOW-RS response body."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None, {}
    if isinstance(data, list):  # some servers send the dataset in a list
        data = data[0] if data else {}
    if not isinstance(data, dict):
        return None, {}

    def items(tag: str) -> list[dict]:
        found = data.get(tag)
        values = found.get("Value") if isinstance(found, dict) else None
        return [v for v in values or [] if isinstance(v, dict)]

    def uid(item: dict) -> str | None:
        values = (item.get(SOP_INSTANCE) or {}).get("Value") or [None]
        return str(values[0]) if values[0] is not None else None

    referenced = {u for u in map(uid, items(REFERENCED_SOP_SEQUENCE)) if u}
    failures = {}
    for item in items(FAILED_SOP_SEQUENCE):
        reason = (item.get(FAILURE_REASON) or {}).get("Value") or [0x0110]
        if uid(item) is not None:
            try:
                failures[uid(item)] = int(reason[0])
            except (TypeError, ValueError):
                failures[uid(item)] = 0x0110
    return (referenced if REFERENCED_SOP_SEQUENCE in data else None), failures  # type: ignore[return-value]


def _result(index: int, uid: str, status: int, referenced, failures) -> FileResult:
    """One instance's outcome in a 200, 202 or 409 response (see the module)."""
    if uid in failures:
        reason = failures[uid]
        outcome = classify_status(reason)
        outcome = "transient" if outcome == "delivered" else outcome  # a warning is no store
        return FileResult(index, outcome, reason, f"STOW-RS failure 0x{reason:04X}")
    if status == 409:  # "failed to store any instance"
        return FileResult(index, "transient", None, "HTTP 409 Conflict: not stored")
    if referenced is not None and uid not in referenced:
        return FileResult(index, "permanent", None, f"HTTP {status}: not acknowledged")
    return FileResult(index, "delivered", 0)


class StowTransport:
    """STOW-RS to one :class:`WebDestination`: each :meth:`send` posts the files in batches;
    :meth:`echo` is the web counterpart of C-ECHO."""

    def __init__(self, destination: WebDestination) -> None:
        self.destination = destination

    def send(self, files: Files, on_result: OnResult, cancel: Cancel | None = None) -> None:
        """STOW-RS ``files`` (index, info), calling ``on_result`` for each (the contract of
        :class:`~connectors.dicom.export.transport.Transport`)."""
        destination = self.destination
        for batch in _batches(destination, files):
            if cancel is not None and cancel.is_set():
                return
            try:
                status, body = _post(destination, batch, cancel)
            except (FileNotFoundError, PermissionError) as exc:
                for index, info, _ in batch:
                    if not info.path.is_file():
                        error = f"cannot send: {exc.strerror}"
                        on_result(FileResult(index, "permanent", None, error))
                continue  # the readable ones go again at the next attempt
            if status not in (200, 202, 409):
                reason = http.client.responses.get(status, "")
                raise TransientExportError(
                    f"{destination.describe()}: HTTP {status} {reason}".rstrip()
                )
            referenced, failures = _outcomes(body)
            for index, info, _ in batch:
                on_result(_result(index, info.sop_instance, status, referenced, failures))

    def echo(self) -> EchoResult:
        """A QIDO-RS query for one study; ok on HTTP 200/204."""
        destination = self.destination
        conn, path = destination._connection()
        try:
            conn.request("GET", f"{path}/studies?limit=1", headers=destination._headers())
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            error = f"{destination.describe()}: {type(exc).__name__}: {exc}"
            return EchoResult(False, None, error)
        finally:
            conn.close()
        if response.status in (200, 204):
            return EchoResult(True, response.status)
        return EchoResult(False, response.status, f"HTTP {response.status}")
