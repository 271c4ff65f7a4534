"""The platform's payloads: made with a job or alone, files uploaded, listed, downloaded and
removed, as a part of :class:`dataflow.platform.core.Platform` (file-level rules:
:mod:`dataflow.platform.payloads`)."""

from __future__ import annotations

import shutil
import threading
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from dataflow.platform import payloads as files
from dataflow.platform.errors import (
    PAYLOAD_DELETE,
    PAYLOAD_INVALID_ID,
    PAYLOAD_MISSING,
    Conflict,
    Invalid,
    NotFound,
)
from dataflow.platform.names import HEX32, IN_FLIGHT, check_metadata

__all__ = ["PayloadOps"]

log = structlog.get_logger("dataflow.platform")


class _Chunks:
    """A write-only file that a ZIP is streamed into (no ``tell``: zipfile then writes each
    entry's sizes after it), emptied by :meth:`take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class PayloadOps:
    """The payload methods of :class:`~dataflow.platform.core.Platform` (which provides
    ``service``, ``registry``, ``audit``, ``config``, ``payload_root`` and ``_sizes``)."""

    service: Any
    registry: Any
    audit: Any
    config: Any
    payload_root: Path
    _sizes: dict[str, int]
    _sizes_lock: threading.Lock

    def create_payload(self, metadata: Mapping[str, str] | None = None) -> str:
        """A payload of no job (Clara's reusable payload): its id."""
        meta = check_metadata(metadata, "payload")
        payload_id = uuid.uuid4().hex
        (self.payload_root / payload_id / "input").mkdir(parents=True)
        self.registry.add_payload(payload_id, None)
        if meta:
            self.registry.set_metadata("payload", payload_id, meta)
        self.audit.record("payload_created", payload=payload_id, metadata_keys=sorted(meta))
        return payload_id

    def _payload(self, payload_id: str) -> dict[str, Any]:
        if not isinstance(payload_id, str) or not HEX32.match(payload_id):
            raise Invalid(f"payload id {payload_id!r} is malformed (32 hex digits)",
                          code=PAYLOAD_INVALID_ID)  # fmt: skip
        row = self.registry.payload(payload_id)
        if row is None or not (self.payload_root / payload_id).is_dir():
            raise NotFound(f"no payload {payload_id!r}", code=PAYLOAD_MISSING)
        return row

    def _folders(self, payload_id: str) -> tuple[Path, Path | None]:
        row = self._payload(payload_id)
        outputs = self.service.jobs_dir / row["job_id"] if row["job_id"] else None
        return self.payload_root / payload_id / "input", outputs

    def upload(self, payload_id: str, name: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Write one file into a payload's ``input/`` from ``chunks`` (atomic: see
        :func:`dataflow.platform.payloads.write_file`); its details. Conflict once its job
        has started; Refused over ``api.max-upload`` or ``api.disk-reserve``."""
        row = self._payload(payload_id)
        rel = files.check_name(name)
        if row["job_id"]:
            job = self.jobs.get(row["job_id"])
            if job.state != "pending":
                raise Conflict(
                    f"payload {payload_id}: its job {job.id} is {job.state}: files "
                    "are uploaded before the job starts",
                    code=PAYLOAD_DELETE,
                )
        folder = self.payload_root / payload_id
        target = files.resolve(folder / "input", rel)
        old = target.stat().st_size if target.is_file() else 0  # replaced: its bytes come back
        size = files.write_file(folder / "input", folder / ".partial", rel, chunks,
                                room=self.config.max_upload - self._used(payload_id) + old,
                                reserve=self.config.disk_reserve)  # fmt: skip
        self._count(payload_id, size - old)
        self.audit.record("payload_file_uploaded", payload=payload_id, bytes=size)
        return {"name": f"/input/{rel.as_posix()}", "size": size, "mode": 0o644}

    def _used(self, payload_id: str) -> int:
        """Bytes in a payload's ``input/`` (counted once, then kept up to date)."""
        with self._sizes_lock:
            if payload_id not in self._sizes:
                inputs = self.payload_root / payload_id / "input"
                self._sizes[payload_id] = sum(
                    p.stat().st_size for p in inputs.rglob("*") if p.is_file()
                )
            return self._sizes[payload_id]

    def _count(self, payload_id: str, change: int | None) -> None:
        """A payload's bytes changed by ``change`` (None: it is gone)."""
        with self._sizes_lock:
            if change is None:
                self._sizes.pop(payload_id, None)
            elif payload_id in self._sizes:
                self._sizes[payload_id] += change

    def payload_files(self, payload_id: str) -> list[dict[str, Any]]:
        """The payload's files: ``/input/...``, then each operator's ``/operators/OP/...``
        (and ``/output/results.json``) once its job wrote them."""
        inputs, outputs = self._folders(payload_id)
        return files.list_files(inputs, outputs)

    def job_files(self, job_id: str) -> list[dict[str, Any]]:
        """The same listing by job, for jobs from DICOM too (their study as ``/input/``)."""
        job = self._job(job_id)
        return files.list_files(Path(job.payload), self.service.jobs_dir / job.id)

    def download(self, payload_id: str, name: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of one listed file of a payload; NotFound if there is none."""
        inputs, outputs = self._folders(payload_id)
        path, size = files.open_file(inputs, outputs, name)
        return size, files.read_chunks(path)

    def download_job_file(self, job_id: str, name: str) -> tuple[int, Iterator[bytes]]:
        job = self._job(job_id)
        path, size = files.open_file(Path(job.payload), self.service.jobs_dir / job.id, name)
        return size, files.read_chunks(path)

    def job_outputs_zip(self, job_id: str) -> Iterator[bytes]:
        """A ZIP of every file the job's operators wrote (``operators/OP/...``), streamed as
        it is made (no archive on disk); Invalid or NotFound for the job at once."""
        job = self._job(job_id)
        names = [f["name"] for f in self.job_files(job.id) if f["name"].startswith("/operators/")]

        def chunks() -> Iterator[bytes]:
            sink = _Chunks()
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
                for name in names:
                    size, parts = self.download_job_file(job.id, name)
                    with archive.open(name.lstrip("/"), "w", force_zip64=size >= 2**31) as entry:
                        for part in parts:
                            entry.write(part)
                            yield sink.take()
            yield sink.take()

        return chunks()

    def payload_details(self, payload_id: str) -> dict[str, Any]:
        row = self._payload(payload_id)
        return {"id": payload_id, "job_id": row["job_id"], "created": row["created"],
                "type": "PIPELINE" if row["job_id"] else "REUSABLE",
                "metadata": self.registry.metadata("payload", payload_id),
                "files": self.payload_files(payload_id)}  # fmt: skip

    def remove_file(self, payload_id: str, name: str) -> None:
        """Remove one uploaded file (``/input/...``) of a payload (Clara's Payloads.Remove);
        Conflict while its job is queued or running; NotFound if there is no such file."""
        row = self._payload(payload_id)
        if row["job_id"]:
            job = self.jobs.get(row["job_id"])
            if job.state in ("queued", "running"):
                raise Conflict(f"payload {payload_id}: its job {job.id} is {job.state}",
                               code=PAYLOAD_DELETE)  # fmt: skip
        inputs = self.payload_root / payload_id / "input"
        path, size = files.open_file(inputs, None, name if name.startswith("/") else f"/{name}")
        path.unlink()
        self._count(payload_id, -size)
        log.info("payload_file_removed", payload_id=payload_id)
        self.audit.record("payload_file_removed", payload=payload_id, bytes=size)

    def release(self, payload: Path) -> None:
        """Retention reaped the last job over ``payload`` (a payload's ``input`` folder):
        the payload goes, as a connector's payloads do."""
        folder = Path(payload).parent
        if folder.parent == self.payload_root and HEX32.match(folder.name):
            self.registry.remove_payload(folder.name)
            shutil.rmtree(folder, ignore_errors=True)
            self._count(folder.name, None)
            log.info("payload_released", payload_id=folder.name)

    def delete_payload(self, payload_id: str) -> None:
        """Remove a payload and its files; Conflict while its job is pending, queued or
        running (the job's record stays; its outputs stay until retention)."""
        row = self._payload(payload_id)
        if row["job_id"]:
            job = self.jobs.get(row["job_id"])
            if job.state in IN_FLIGHT:
                raise Conflict(f"payload {payload_id}: its job {job.id} is {job.state}: cancel "
                               "it or wait for it to end", code=PAYLOAD_DELETE)  # fmt: skip
        self.registry.remove_payload(payload_id)
        shutil.rmtree(self.payload_root / payload_id, ignore_errors=True)
        self._count(payload_id, None)
        log.info("payload_deleted", payload_id=payload_id)
        self.audit.record("payload_deleted", payload=payload_id)
