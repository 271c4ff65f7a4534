"""The model repository: models kept by name and version, named by pipelines instead of paths.

A repository is a folder, one sub-folder per model version::

    ROOT/<name>/<version>/model.onnx          an ONNX model (the embedded backend)
    ROOT/<name>/<version>/config.pbtxt ...    a Triton model folder (its files as uploaded)
    ROOT/<name>/<version>/.model.json         id, name, version, type, size, created, sha256

A stage argument ``models:/NAME/VERSION`` (or ``models:/NAME``: its highest version) — the
form MLflow users know — is resolved by :func:`resolve` to the version's folder, or to its one
``.onnx`` file. ``dataflow serve`` keeps its repository in ``STATE/models`` and exports it to
its workers as ``DATAFLOW_MODELS``; ``dataflow run`` and ``dataflow models`` without a
service use ``DATAFLOW_MODELS`` if set, else ``$XDG_DATA_HOME/dataflow/models``.

A version is written into a hidden folder first and renamed into place whole: a reader sees a
complete model or none. Names: letters, digits, ``.``, ``_``, ``-`` (at most 64, not starting
with ``.``); versions: positive integers (Triton's rule).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from dataflow.errors import DataflowError

__all__ = ["PREFIX", "ModelError", "ModelRepository", "default_root", "is_reference", "resolve"]

PREFIX = "models:/"
ENV = "DATAFLOW_MODELS"
META = ".model.json"
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")


class ModelError(DataflowError):
    """A model that cannot be stored, found or read; ``kind``: ``invalid``, ``missing``,
    ``exists`` or ``in-use`` (the platform maps them to its errors)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def default_root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "dataflow" / "models"


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_reference(ref: str) -> tuple[str, int | None]:
    """``models:/NAME[/VERSION]`` -> (name, version or None)."""
    parts = ref[len(PREFIX) :].strip("/").split("/")
    if len(parts) > 2 or not parts[0]:
        raise ModelError(f"model reference {ref!r}: expected models:/NAME or models:/NAME/VERSION")
    name = check_name(parts[0])
    version = check_version(parts[1]) if len(parts) == 2 else None
    return name, version


def resolve(ref: str, root: Path | None = None) -> Path:
    """The path a ``models:/NAME[/VERSION]`` reference stands for: the version's ``.onnx``
    file when it holds exactly one at its top, else its folder."""
    return ModelRepository(root or default_root()).path(*parse_reference(ref))


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelError(f"model name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-' "
                         "(not starting with '.')")  # fmt: skip
    return name


def check_version(version: Any) -> int:
    text = str(version)
    if isinstance(version, bool) or not text.isdigit() or int(text) < 1:
        raise ModelError(f"model version {version!r}: a positive integer (1, 2, ...)")
    return int(text)


class ModelRepository:
    """The models under ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ reading

    def list(self) -> list[dict[str, Any]]:
        """Every model version's record, by name then version."""
        out = []
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            for version in self._versions(folder.name):
                record = self._record(folder.name, version)
                if record is not None:
                    out.append(record)
        return out

    def _versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isdigit() and (p / META).is_file())  # fmt: skip

    def _record(self, name: str, version: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / name / str(version) / META).read_text())
        except (OSError, ValueError):
            return None

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """A version's record (``version`` None: the highest); ModelError ``missing``."""
        name = check_name(name)
        versions = self._versions(name)
        if version is None:
            if not versions:
                raise ModelError(f"no model {name!r} in {self.root}", "missing")
            version = versions[-1]
        version = check_version(version)
        record = self._record(name, version) if version in versions else None
        if record is None:
            have = ", ".join(map(str, versions)) or "none"
            raise ModelError(f"no model {name!r} version {version} in {self.root} (versions: "
                             f"{have})", "missing")  # fmt: skip
        return record

    def by_id(self, model_id: str) -> dict[str, Any]:
        for record in self.list():
            if record["id"] == model_id:
                return record
        raise ModelError(f"no model with id {model_id!r}", "missing")

    def folder(self, name: str, version: int | None = None) -> Path:
        record = self.get(name, version)
        return self.root / record["name"] / str(record["version"])

    def path(self, name: str, version: int | None = None) -> Path:
        """What a stage is given: the one top-level ``.onnx`` file, else the folder."""
        folder = self.folder(name, version)
        onnx = [p for p in folder.iterdir() if p.suffix == ".onnx" and p.is_file()]
        return onnx[0] if len(onnx) == 1 else folder

    def files(self, name: str, version: int | None = None) -> list[Path]:
        folder = self.folder(name, version)
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META)

    def archive(self, name: str, version: int | None = None) -> Iterable[bytes]:
        """A version's files as an uncompressed tar stream (paths relative to the folder)."""
        folder = self.folder(name, version)
        buffer = _Chunks()
        with tarfile.open(fileobj=buffer, mode="w|") as tar:
            for path in self.files(name, version):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
                yield from buffer.take()
        yield from buffer.take()

    # ------------------------------------------------------------------ writing

    def next_version(self, name: str) -> int:
        versions = self._versions(check_name(name))
        return versions[-1] + 1 if versions else 1

    def add_file(
        self, name: str, version: int | None, filename: str, chunks: Iterable[bytes],
        *, limit: int = 1 << 40, metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Store one model file (an ``.onnx``) as ``name``/``version`` (None: the next)."""
        rel = _member_name(filename)
        if len(rel.parts) != 1:
            raise ModelError(f"model file name {filename!r}: a file name, not a path")
        return self._add(name, version, lambda staging: _write(staging / rel.name, chunks, limit),
                         metadata)  # fmt: skip

    def add_archive(
        self, name: str, version: int | None, chunks: Iterable[bytes],
        *, limit: int = 1 << 40, metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Store a tar archive (gzip allowed) of a model folder (a Triton model's files)."""

        def unpack(staging: Path) -> None:
            archive = staging.parent / f"{staging.name}.tar"
            try:
                _write(archive, chunks, limit)
                _extract(archive, staging)
            finally:
                archive.unlink(missing_ok=True)

        return self._add(name, version, unpack, metadata)

    def _add(self, name: str, version: int | None, fill, metadata) -> dict[str, Any]:
        name = check_name(name)
        version = self.next_version(name) if version is None else check_version(version)
        target = self.root / name / str(version)
        if (target / META).is_file():
            raise ModelError(f"model {name!r} version {version} exists: delete it first, or "
                             "upload as a new version", "exists")  # fmt: skip
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            fill(staging)
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            if not files:
                raise ModelError(f"model {name!r}: the upload holds no file")
            digest, size = hashlib.sha256(), 0
            for path in files:
                digest.update(path.relative_to(staging).as_posix().encode() + b"\0")
                with open(path, "rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                        size += len(block)
            tops = [p.name for p in staging.iterdir()]
            onnx = sum(t.endswith(".onnx") for t in tops) == 1
            kind = "triton" if "config.pbtxt" in tops else "onnx" if onnx else "folder"
            record = {"id": uuid.uuid4().hex, "name": name, "version": version, "type": kind,
                      "size": size, "files": len(files), "sha256": digest.hexdigest(),
                      "created": time.time(), "metadata": dict(metadata or {})}  # fmt: skip
            (staging / META).write_text(json.dumps(record, indent=1))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, target)  # whole, or not at all
            except OSError:
                if target.exists():
                    raise ModelError(f"model {name!r} version {version} exists", "exists") from None
                raise
            return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def set_metadata(self, name: str, version: int, metadata: dict[str, str]) -> dict[str, Any]:
        record = self.get(name, version)
        record["metadata"] = dict(metadata)
        path = self.root / name / str(record["version"]) / META
        temp = path.with_name(META + ".tmp")
        temp.write_text(json.dumps(record, indent=1))
        os.replace(temp, path)
        return record

    def delete(self, name: str, version: int) -> dict[str, Any]:
        record = self.get(name, version)
        folder = self.root / record["name"] / str(record["version"])
        trash = self.root / ".staging" / f"deleted-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, trash)  # gone at once for readers, then removed
        shutil.rmtree(trash, ignore_errors=True)
        try:
            (self.root / record["name"]).rmdir()
        except OSError:
            pass
        return record


# ---------------------------------------------------------------------- helpers


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out as they come (a streamed tar)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> list[bytes]:
        parts, self._parts = self._parts, []
        return [b"".join(parts)] if parts else []


def _member_name(name: str) -> PurePosixPath:
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ModelError(f"model file name {name!r}: not a file name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ModelError(f"model file name {name!r}: must stay inside the model's folder")
    parts = [p for p in path.parts if p != "."]
    if not parts or parts[0] == META:
        raise ModelError(f"model file name {name!r}: not a file name")
    return PurePosixPath(*parts)


def _write(target: Path, chunks: Iterable[bytes], limit: int) -> int:
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ModelError(f"model upload over the limit of {limit} bytes", "too-large")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def _extract(archive: Path, into: Path) -> None:
    """Regular files and folders only, every name inside ``into``."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                rel = _member_name(member.name)
                if member.isdir():
                    (into / rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ModelError(f"model archive member {member.name!r}: links and special "
                                     "files are refused")  # fmt: skip
                _write(into / rel, _read(tar.extractfile(member)), 1 << 40)
    except tarfile.TarError as exc:
        raise ModelError(f"the model archive cannot be read as tar ({exc})") from None
    except FileExistsError as exc:
        raise ModelError(f"model archive: {Path(exc.filename).name!r} appears twice") from None


def _read(handle: Any) -> Iterable[bytes]:
    while block := handle.read(1 << 20):
        yield block
