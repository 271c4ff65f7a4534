"""The platform's models: the service's model repository (:mod:`dataflow.models`, in
``STATE/models``) over the API, as a part of :class:`dataflow.platform.core.Platform`, and its
REST routes (:func:`add_routes`)::

    GET    /api/v1/models                              every model version
    POST   /api/v1/models/{name}?file=model.onnx       upload as the next version (raw body)
    PUT    /api/v1/models/{name}/{version}?file=...    upload as that version
           (``?format=tar``: the body is a tar archive, gzip allowed, of a model folder —
           a Triton model's files)
    GET    /api/v1/models/{name}/{version}             its record ("latest": the highest)
    GET    /api/v1/models/{name}/{version}/download    the .onnx file, or a tar of the folder
    DELETE /api/v1/models/{name}/{version}             refused while a pipeline names it

A pipeline names a model ``models:/NAME/VERSION`` (or ``models:/NAME``, the highest version)
where a stage takes a path; the service's workers find the repository through
``DATAFLOW_MODELS``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
import structlog
from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse

from dataflow.models import ModelError, ModelRepository, check_name, check_version
from dataflow.platform.errors import (
    MODEL_DELETE,
    MODEL_INVALID_ID,
    MODEL_MISSING,
    MODEL_UPLOAD,
    Conflict,
    Invalid,
    NotFound,
    PlatformError,
    Refused,
)
from dataflow.platform.names import check_metadata
from dataflow.platform.payloads import body_chunks, read_chunks

__all__ = ["ModelOps", "add_routes"]

log = structlog.get_logger("dataflow.platform")


def _platform_error(exc: ModelError, code: int = MODEL_UPLOAD) -> PlatformError:
    if exc.kind == "missing":
        return NotFound(str(exc), code=MODEL_MISSING)
    if exc.kind in ("exists", "in-use"):
        return Conflict(str(exc), code=MODEL_DELETE if exc.kind == "in-use" else code)
    if exc.kind == "too-large":
        return Refused(str(exc), code=code, status=413)
    return Invalid(str(exc), code=code)


def _version(version: str | int | None) -> int | None:
    """A version from the API (None, "" or "latest": the highest)."""
    if version in (None, "", "latest"):
        return None
    try:
        return check_version(version)
    except ModelError as exc:
        raise Invalid(str(exc), code=MODEL_INVALID_ID) from None


class ModelOps:
    """The model methods of :class:`~dataflow.platform.core.Platform` (which provides
    ``service``, ``audit``, ``config`` and ``state``)."""

    service: Any
    audit: Any
    config: Any
    state: Path

    @property
    def models(self) -> ModelRepository:
        return ModelRepository(self.state / "models")

    def list_models(self) -> list[dict[str, Any]]:
        return self.models.list()

    def model_details(self, name: str, version: str | int | None = None) -> dict[str, Any]:
        try:
            return self.models.get(name, _version(version))
        except ModelError as exc:
            raise _platform_error(exc) from None

    def model_by_id(self, model_id: str) -> dict[str, Any]:
        try:
            return self.models.by_id(model_id)
        except ModelError as exc:
            raise _platform_error(exc) from None

    def upload_model(
        self,
        name: str,
        version: str | int | None,
        chunks: Iterable[bytes],
        *,
        filename: str | None = None,
        archive: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Store a model version from ``chunks``: one file (``filename``, default
        ``model.onnx``) or a tar ``archive`` of a model folder. At most ``api.max-upload``
        bytes; nothing is visible until it is whole."""
        meta = check_metadata(metadata, "model")
        limit = self.config.max_upload
        try:
            if archive:
                record = self.models.add_archive(
                    name, _version(version), chunks, limit=limit, metadata=meta
                )
            else:
                record = self.models.add_file(
                    name,
                    _version(version),
                    filename or "model.onnx",
                    chunks,
                    limit=limit,
                    metadata=meta,
                )
        except ModelError as exc:
            raise _platform_error(exc) from None
        log.info("model_added", model=record["name"], version=record["version"],
                 type=record["type"], bytes=record["size"])  # fmt: skip
        self.audit.record("model_added", model=record["name"], version=record["version"],
                          id=record["id"], bytes=record["size"])  # fmt: skip
        return record

    def download_model(
        self, name: str, version: str | int | None = None
    ) -> tuple[dict[str, Any], str, int | None, Iterator[bytes]]:
        """(record, file name, size or None for a tar stream, chunks)."""
        record = self.model_details(name, version)
        path = self.models.path(record["name"], record["version"])
        if path.is_file():
            return record, path.name, path.stat().st_size, read_chunks(path)
        tar = f"{record['name']}-{record['version']}.tar"
        return record, tar, None, iter(self.models.archive(record["name"], record["version"]))

    def model_users(self, name: str, version: int) -> list[str]:
        """The pipelines (configured or registered) whose definition names this version:
        ``models:/NAME/VERSION``, or ``models:/NAME`` while it is the highest."""
        highest = self.models.get(name)["version"] == version
        exact = re.compile(rf"models:/{re.escape(name)}/0*{version}(?![0-9])")
        latest = re.compile(rf"models:/{re.escape(name)}/?(?![\w./-])")
        users = []
        for pipeline, entry in sorted(self.service.pipelines.items()):
            try:
                text = Path(entry.file).read_text()
            except OSError:
                continue
            if exact.search(text) or (highest and latest.search(text)):
                users.append(pipeline)
        return users

    def delete_model(self, name: str, version: str | int) -> dict[str, Any]:
        """Delete a model version; Conflict, naming them, while pipelines name it."""
        if _version(version) is None:
            raise Invalid(f"model {name!r}: name the version to delete (1, 2, ...)",
                          code=MODEL_INVALID_ID)  # fmt: skip
        record = self.model_details(name, version)
        users = self.model_users(record["name"], record["version"])
        if users:
            raise Conflict(f"model {record['name']!r} version {record['version']} is named by "
                           f"pipeline(s) {', '.join(users)}: remove or update them first",
                           code=MODEL_DELETE)  # fmt: skip
        try:
            self.models.delete(record["name"], record["version"])
        except ModelError as exc:
            raise _platform_error(exc, MODEL_DELETE) from None
        log.info("model_deleted", model=record["name"], version=record["version"])
        self.audit.record("model_deleted", model=record["name"], version=record["version"],
                          id=record["id"])  # fmt: skip
        return record

    def set_model_metadata(self, name: str, version: int, values: dict[str, str]) -> dict:
        try:
            return self.models.set_metadata(name, version, values)
        except ModelError as exc:
            raise _platform_error(exc) from None


def add_routes(app: Any, platform: Any, prefix: str, figures: Any) -> None:
    """The model routes (see the module docstring) on the FastAPI ``app``."""

    @app.get(f"{prefix}/models", tags=["models"])
    def list_models() -> list[dict[str, Any]]:
        """Every model version of the service's repository (name, version, id, type, size,
        sha256, created, metadata)."""
        return platform.list_models()

    async def receive(request: Request, name: str, version: str | None, file: str | None,
                      archive: bool) -> dict[str, Any]:  # fmt: skip
        try:  # checked before the body is read
            check_name(name)
        except ModelError as exc:
            raise _platform_error(exc) from None
        _version(version)
        chunks = body_chunks(request, figures.bytes.labels("upload"))
        return await anyio.to_thread.run_sync(
            lambda: platform.upload_model(name, version, chunks, filename=file, archive=archive)
        )

    FILE = Query(None, description="The model file's name (default model.onnx).")
    FORMAT = Query("file", pattern="^(file|tar)$", description="file, or tar: a model folder.")

    @app.post(f"{prefix}/models/{{name}}", tags=["models"], status_code=201)
    async def upload_next(name: str, request: Request, file: str | None = FILE,
                          format: str = FORMAT) -> dict[str, Any]:  # fmt: skip
        """Upload a model as the next version of ``name`` (the raw body)."""
        return await receive(request, name, None, file, format == "tar")

    @app.put(f"{prefix}/models/{{name}}/{{version}}", tags=["models"], status_code=201)
    async def upload_version(
        name: str, version: str, request: Request, file: str | None = FILE, format: str = FORMAT
    ) -> dict[str, Any]:
        """Upload a model as ``version`` (409 if it exists)."""
        return await receive(request, name, version, file, format == "tar")

    @app.get(f"{prefix}/models/{{name}}/{{version}}", tags=["models"])
    def model_details(name: str, version: str) -> dict[str, Any]:
        """One version's record (``latest``: the highest)."""
        record = platform.model_details(name, version)
        return {**record, "used_by": platform.model_users(record["name"], record["version"])}

    @app.get(f"{prefix}/models/{{name}}/{{version}}/download", tags=["models"])
    def download_model(name: str, version: str) -> StreamingResponse:
        """The model's one .onnx file, or a tar archive of its folder."""
        record, filename, size, chunks = platform.download_model(name, version)

        def counted():
            for chunk in chunks:
                figures.bytes.labels("download").inc(len(chunk))
                yield chunk

        headers = {"Content-Disposition": f'attachment; filename="{filename}"',
                   "X-Model-Version": str(record["version"])}  # fmt: skip
        if size is not None:
            headers["Content-Length"] = str(size)
        return StreamingResponse(counted(), media_type="application/octet-stream",
                                 headers=headers)  # fmt: skip

    @app.delete(f"{prefix}/models/{{name}}/{{version}}", tags=["models"], status_code=204)
    def delete_model(name: str, version: str) -> Response:
        platform.delete_model(name, version)
        return Response(status_code=204)
