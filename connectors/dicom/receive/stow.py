"""STOW-RS in: studies over HTTP on the service's REST port, stored as the receiver stores C-STOREs.

``POST /dicom-web/studies``, ``POST /dicom-web/studies/{study}`` and the same under an AE title,
``/dicom-web/{ae}/studies[/{study}]`` (or the ``X-Called-AE`` header): a ``multipart/related;
type="application/dicom"`` body whose parts are DICOM Part 10 files (PS3.18 10.5). The
connector offers these routes to the platform (``DicomConnector.http_routes``), which mounts
them on its REST app behind the API's tokens: ``dataflow/`` never imports this module.

A request is served by one receiver (``dicom.stow.receiver``) through its own
:class:`~.store.StoreSteps`, as if it were an association calling the AE title: each part is
written to the spool's ``.incoming`` as it arrives (:class:`~.store.SpoolFile`: the instance
size limit and the disk reserve checked as it grows) and fsynced when it ends; once the whole
body is in, each instance's UIDs are checked (:func:`~.spool.parse_header`) and it is placed by
the committer (``StoreSteps.answer`` and ``place``: moved into its group folder, recorded,
durable) before the response names it in the ReferencedSOPSequence. The same AE title's
grouping, routes, duplicates and late policies apply, so a study over STOW-RS becomes the same
jobs as over C-STORE. The request then goes into the receiver's association history (outcome
``stow``), and its groups complete at once where the AE title has ``complete-on-release``.

Nothing is placed before the body has ended within ``max-request-size``: a body over it is
answered 413 and a body cut short (or not a well-formed multipart) 400, with every part written
so far removed. The response (``application/dicom+json``, PS3.18 I.1): ReferencedSOPSequence
(0008,1199) for the instances stored and FailedSOPSequence (0008,1198) with a FailureReason
(0008,1197) for the others; 200 all stored, 202 some, 409 none (400 where no part was even
DICOM). A part that is not ``application/dicom`` or not a Part 10 file fails alone (0xC000).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any, BinaryIO

import anyio.to_thread
import structlog

from dataflow.platform.payloads import body_chunks

from ..config import CalledAE
from ..net.pdu import Status
from .spool import BadInstance, parse_header, valid_uid
from .store import IGNORED, Outcome, SpoolFile, StoreSteps

__all__ = ["HEADER", "PATHS", "Stow", "StowConfig", "WebRequest", "part10_meta", "read_multipart"]

log = structlog.get_logger("connectors.dicom")

#: the routes, relative to the REST app's root
PATHS = (
    "/dicom-web/studies",
    "/dicom-web/studies/{study}",
    "/dicom-web/{ae}/studies",
    "/dicom-web/{ae}/studies/{study}",
)
HEADER = "X-Called-AE"  # the called AE title of /dicom-web/studies (default: stow.ae-title)
CALLING_AE = "STOW-RS"  # the calling AE title of a request (the history, groups, job source)
MAX_PART_HEADERS = 16 * 1024  # bytes of one part's headers
DRAIN = 64 * 1024 * 1024  # bytes of a refused body read (and dropped) before the answer
MEDIA = "application/dicom+json"


@dataclass(frozen=True)
class StowConfig:
    """``dicom.stow``: which receiver stores the requests, the called AE title of the URLs
    that name none, and the largest request body in bytes (0: no limit)."""

    receiver: str
    ae_title: str
    max_request_size: int


class _Party:
    def __init__(self, ae_title: str, address: str) -> None:
        self.ae_title, self.address = ae_title, address


class WebRequest:
    """A STOW-RS request as :class:`StoreSteps` and the receiver see an association: who
    calls (``requestor``: :data:`CALLING_AE` from the client's address) and which AE title
    it calls (``acceptor``)."""

    def __init__(self, called_ae: str, peer_host: str) -> None:
        self.requestor = _Party(CALLING_AE, peer_host)
        self.acceptor = _Party(called_ae, "")


class Malformed(Exception):
    """The body is not a well-formed multipart (the message says where)."""


class _TooLarge(Exception):
    pass


# ------------------------------------------------------------------ multipart, incrementally


def read_multipart(chunks: Iterable[bytes], boundary: str) -> Iterator[tuple[str, Any]]:
    """The events of a multipart body read chunk by chunk (RFC 2046): ``("part", headers)``
    (names in lower case), ``("data", bytes)`` (any number, in order), ``("end", None)`` per
    part. Memory stays bounded by the chunk size plus the delimiter; :class:`Malformed` when
    the body breaks the grammar or ends before its closing delimiter."""
    delimiter = b"--" + boundary.encode("latin-1")
    marker = b"\r\n" + delimiter
    buffer = bytearray(b"\r\n")  # the first delimiter may open the body
    state = "preamble"
    source = iter(chunks)

    def more() -> bool:
        chunk = next(source, None)
        if chunk is None:
            return False
        buffer.extend(chunk)
        return True

    while True:
        if state == "preamble":
            at = buffer.find(marker)
            if at < 0:
                del buffer[: max(0, len(buffer) - len(marker))]
                if not more():
                    raise Malformed("no multipart boundary in the body")
                continue
            del buffer[: at + len(marker)]
            state = "delimiter"
        elif state == "delimiter":  # after a delimiter: "--" (the end) or padding and CRLF
            if buffer.startswith(b"--"):
                return
            end = buffer.find(b"\r\n")
            if end < 0 or len(buffer) < 2:
                if len(buffer) > 1024 or not more():
                    raise Malformed("the body ends after a boundary without its closing '--'")
                continue
            if buffer[:end].strip(b" \t"):
                raise Malformed("text after a boundary delimiter")
            del buffer[: end + 2]
            state = "headers"
        elif state == "headers":
            end = 0 if buffer.startswith(b"\r\n") else buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_PART_HEADERS:
                    raise Malformed(f"a part's headers are longer than {MAX_PART_HEADERS} bytes")
                if not more():
                    raise Malformed("the body ends in a part's headers")
                continue
            headers = {}
            for line in bytes(buffer[:end]).decode("latin-1").split("\r\n") if end else ():
                name, colon, value = line.partition(":")
                if not colon:
                    raise Malformed("a part's header line without ':'")
                headers[name.strip().lower()] = value.strip()
            del buffer[: end + (2 if end == 0 else 4)]
            yield "part", headers
            state = "body"
        else:  # a part's bytes, up to the next delimiter
            at = buffer.find(marker)
            if at >= 0:
                if at:
                    yield "data", bytes(buffer[:at])
                del buffer[: at + len(marker)]
                yield "end", None
                state = "delimiter"
                continue
            keep = len(marker) - 1  # a delimiter may start in these
            if len(buffer) > keep:
                yield "data", bytes(buffer[: len(buffer) - keep])
                del buffer[: len(buffer) - keep]
            if not more():
                raise Malformed("the body ends inside a part (no closing boundary)")


# ------------------------------------------------------------------ one part


_META_LONG = frozenset({b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"})
_META_MAX = 64 * 1024  # bytes of file meta information


def part10_meta(fp: BinaryIO) -> tuple[str, str, str, int]:
    """A Part 10 file's Media Storage SOP Class and Instance UIDs, Transfer Syntax UID and
    where its dataset starts; :class:`BadInstance` (0xC000) when it is not one."""

    def bad(what: str) -> BadInstance:
        return BadInstance(Status.CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {what}")

    fp.seek(0)
    if fp.read(132)[128:] != b"DICM":
        raise bad("no 'DICM' after the 128-byte preamble")
    values: dict[int, bytes] = {}
    pos = 132
    while True:
        raw = fp.read(8)
        if len(raw) < 8:
            raise bad("the file meta information is cut short")
        group, element = struct.unpack_from("<HH", raw)
        if group != 2:
            break
        vr = raw[4:6]
        if vr in _META_LONG:
            length, pos = struct.unpack("<I", fp.read(4).ljust(4, b"\xff"))[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", raw, 6)[0], pos + 8
        if pos + length > 132 + _META_MAX:
            raise bad("the file meta information is too long")
        values[element] = fp.read(length)
        pos += length
        fp.seek(pos)
    text = [values.get(e, b"").decode("ascii", "replace").rstrip("\0 ") for e in (2, 3, 0x10)]
    if not text[2]:
        raise bad("no Transfer Syntax UID in the file meta information")
    return text[0], text[1], text[2], pos


class _Part(SpoolFile):
    """One part of a request, written to the spool as it arrives."""

    def __init__(self, steps: StoreSteps, headers: dict[str, str]) -> None:
        super().__init__(steps)
        self.sop_class = self.sop_instance = ""
        media = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if media != "application/dicom":
            self.refusal = (Status.CANNOT_UNDERSTAND, f"a part of type {media!r}, not "
                            "application/dicom")  # fmt: skip
            return
        self.open()

    def finish(self, request: WebRequest, called: CalledAE, study: str | None) -> Outcome:
        """The instance's checks and its placement (for :meth:`StoreSteps.answer`)."""
        try:
            if self.refusal is not None or self.path is None:
                return (*(self.refusal or (Status.PROCESSING_FAILURE, "not written")), None)
            with open(self.path, "rb") as fp:
                self.sop_class, self.sop_instance, syntax, offset = part10_meta(fp)
                header = parse_header(fp, syntax, offset)
            if header.sop_class_uid != self.sop_class:
                raise BadInstance(Status.NOT_MATCHING, "SOPClassUID differs from the file meta's")
            if header.sop_instance_uid != self.sop_instance:
                raise BadInstance(
                    Status.NOT_MATCHING, "SOPInstanceUID differs from the file meta's"
                )
            if study is not None and header.study_uid != study:
                raise BadInstance(Status.NOT_MATCHING, "StudyInstanceUID is not the URL's study")
            if called.ignores(header.sop_class_uid):
                return Status.SUCCESS, IGNORED, None
            path, self.path = self.path, None  # the committer owns it now
            crc = self.crc if self.steps.journaled else None
            return self.steps.place(request, called, header, path, self.size, crc)
        finally:
            self.discard()  # anything not placed


# ------------------------------------------------------------------ the requests


class _Refused(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _uid_item(sop_class: str, sop_instance: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


class _Uncounted:
    def inc(self, amount: float) -> None:
        pass


class Stow:
    """The STOW-RS service of one receiver (see the module); ``receiver``: a
    :class:`~.receiver.Receiver` (its ``config``, ``steps``, ``stopping`` and
    ``request_answered``)."""

    def __init__(self, receiver: Any, config: StowConfig) -> None:
        self.receiver, self.config = receiver, config

    def routes(self) -> list:
        """Starlette routes (POST) for the platform's REST app."""
        from starlette.routing import Route

        return [Route(path, self.endpoint, methods=["POST"]) for path in PATHS]

    async def endpoint(self, request) -> Any:
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse

        try:
            called, study, boundary = self._check(
                request.path_params, request.headers.get(HEADER), request.headers
            )
        except _Refused as exc:
            log.info("stow_refused", status=exc.status, reason=exc.message)
            return JSONResponse({"error": exc.kind, "message": exc.message},
                                status_code=exc.status)  # fmt: skip
        peer = request.client.host if request.client else "?"
        chunks = body_chunks(request, _Uncounted())
        length = request.headers.get("content-length")
        try:
            status, body = await anyio.to_thread.run_sync(
                self.receive, called, study, boundary, chunks, peer, length
            )
        except ClientDisconnect:
            log.info("stow_request_cut", called_ae=called.ae_title, peer_host=peer)
            status, body = 400, {"error": "invalid", "message": "the request body was cut"}
        media = MEDIA if status in (200, 202, 409) or "00081198" in body else None
        return JSONResponse(body, status_code=status, media_type=media)

    def _check(self, params, header: str | None, headers) -> tuple[CalledAE, str | None, str]:
        """The called AE title, the study of the URL and the body's boundary, or
        :class:`_Refused` (404, 400, 415, 503)."""
        ae = params.get("ae")
        if ae is not None and header is not None and header.strip() != ae:
            raise _Refused(400, "invalid", f"the URL names the AE title {ae!r} and the "
                           f"{HEADER} header {header.strip()!r}")  # fmt: skip
        title = ae or (header.strip() if header else self.config.ae_title)
        called = self.receiver.config.called(title)
        if called is None:
            known = ", ".join(c.ae_title for c in self.receiver.config.called_aes)
            raise _Refused(404, "not_found", f"no AE title {title!r} here (dicom.ae-titles: "
                           f"{known})")  # fmt: skip
        study = params.get("study")
        if study is not None and not valid_uid(study):
            raise _Refused(400, "invalid", "the study in the URL is not a UID")
        message = Message()
        message["content-type"] = headers.get("content-type", "")
        media = message.get_content_type()
        kind = (message.get_param("type") or "application/dicom").lower()
        if media != "multipart/related" or kind != "application/dicom":
            given = headers.get("content-type", "none")
            raise _Refused(415, "unsupported_media_type", f"Content-Type {given!r}: STOW-RS "
                           'here takes multipart/related; type="application/dicom"')  # fmt: skip
        boundary = message.get_param("boundary")
        if not isinstance(boundary, str) or not 0 < len(boundary) <= 256:
            raise _Refused(400, "invalid", "the multipart/related Content-Type has no boundary")
        if self.receiver.stopping:
            raise _Refused(503, "unavailable", "the receiver is stopping: send again later")
        return called, study, boundary

    def receive(
        self, called: CalledAE, study: str | None, boundary: str, chunks: Iterator[bytes],
        peer: str, length: str | None,
    ) -> tuple[int, dict]:  # fmt: skip
        """Read the body, store its instances and say what became of each: the HTTP status
        and the JSON body (blocking: on a worker thread)."""
        limit = self.config.max_request_size
        if limit and length is not None and length.isdigit() and int(length) > limit:
            return self._too_large(chunks, called, peer)
        steps: StoreSteps = self.receiver.steps
        parts: list[_Part] = []
        try:
            part = None
            for event, value in read_multipart(_bounded(chunks, limit), boundary):
                if event == "part":
                    part = _Part(steps, value)
                    parts.append(part)
                elif event == "data":
                    part.add(value)  # type: ignore[union-attr]
                else:
                    part.sync()  # type: ignore[union-attr]
            if not parts:
                raise Malformed("the body has no part")
        except _TooLarge:
            for part in parts:
                part.discard()
            return self._too_large(chunks, called, peer)
        except Malformed as exc:
            for part in parts:
                part.discard()
            log.info("stow_refused", called_ae=called.ae_title, peer_host=peer, status=400,
                     reason=str(exc))  # fmt: skip
            return 400, {"error": "invalid", "message": f"the multipart body: {exc}"}
        except BaseException:
            for part in parts:
                part.discard()
            raise
        request = WebRequest(called.ae_title, peer)
        referenced, failed = [], []
        try:
            for part in parts:
                status, _ = steps.answer(request, lambda p=part: p.finish(request, called, study))
                item = _uid_item(part.sop_class, part.sop_instance)
                if status == Status.SUCCESS:
                    referenced.append({**item, "00081190": {"vr": "UR"}})
                else:
                    failed.append({**item, "00081197": {"vr": "US", "Value": [status]}})
        finally:
            for part in parts:
                part.discard()
            self.receiver.request_answered(request)
        body: dict[str, Any] = {"00081190": {"vr": "UR"}}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        if not failed:
            return 200, body
        if referenced:
            return 202, body
        understood = any(f["00081197"]["Value"][0] != Status.CANNOT_UNDERSTAND for f in failed)
        return (409 if understood else 400), body

    def _too_large(self, chunks: Iterator[bytes], called: CalledAE, peer: str) -> tuple[int, dict]:
        """413: nothing was placed; up to :data:`DRAIN` more bytes are read so that the
        client, still sending, gets the answer."""
        drained = 0
        for chunk in chunks:
            drained += len(chunk)
            if drained > DRAIN:
                break
        limit = self.config.max_request_size
        log.info("stow_refused", called_ae=called.ae_title, peer_host=peer, status=413,
                 reason=f"body over {limit} bytes")  # fmt: skip
        message = f"the body is over dicom.stow.max-request-size ({limit} bytes): none stored"
        return 413, {"error": "too_large", "message": message}


def _bounded(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if limit and total > limit:
            raise _TooLarge
        yield chunk
