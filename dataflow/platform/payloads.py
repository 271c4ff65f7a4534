"""Payload files on disk: safe names, atomic uploads, listings and chunked downloads.

A payload made through the API lives in ``STATE/payloads/<id>/``: its files under ``input/``
(the job's input folder), uploads in progress under ``.partial/`` (never visible in
``input/``: a file appears there whole, by one rename, or not at all). A job's outputs stay in
its output folder (``STATE/jobs/<job>/``); listings map them into the payload's name space::

    /input/<path>                  a file of the job's input
    /operators/<operator>/<path>   a file an operator wrote
    /output/<name>                 a file of the job's own (results.json)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from dataflow.platform.errors import (
    PAYLOAD_MISSING_FILE,
    PAYLOAD_UPLOAD,
    Invalid,
    NotFound,
    Refused,
)

__all__ = ["CHUNK", "body_chunks", "check_name", "list_files", "open_file", "read_chunks",
           "resolve", "write_file"]  # fmt: skip

CHUNK = 1024 * 1024


def check_name(name: str) -> PurePosixPath:
    """A file name inside a payload (``dir/file.dcm``; a leading ``/input/`` is accepted);
    :class:`Invalid` for an empty name, an absolute one, ``..``, NUL or a backslash."""
    if not isinstance(name, str) or not name.strip():
        raise Invalid("a payload file needs a name (e.g. series1/1.dcm)", code=PAYLOAD_UPLOAD)
    if "\x00" in name:
        raise Invalid(f"payload file name {name!r}: contains a NUL character", code=PAYLOAD_UPLOAD)
    if "\\" in name:
        raise Invalid(f"payload file name {name!r}: use '/' between folders, not '\\'",
                      code=PAYLOAD_UPLOAD)  # fmt: skip
    if name.startswith("/input/"):
        name = name[len("/input/") :]
    path = PurePosixPath(name)
    if path.is_absolute():
        raise Invalid(f"payload file name {name!r}: an absolute path; give it relative to the "
                      "payload's input folder", code=PAYLOAD_UPLOAD)  # fmt: skip
    if any(part == ".." for part in path.parts):
        raise Invalid(f"payload file name {name!r}: '..' would leave the payload",
                      code=PAYLOAD_UPLOAD)  # fmt: skip
    parts = [part for part in path.parts if part != "."]
    if not parts:
        raise Invalid(f"payload file name {name!r}: names no file", code=PAYLOAD_UPLOAD)
    return PurePosixPath(*parts)


def resolve(root: Path, name: PurePosixPath) -> Path:
    """``root/name``, refused (:class:`Invalid`) if a symbolic link on the way leads out of
    ``root``, or the name is a folder."""
    target = root.joinpath(*name.parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    if os.path.commonpath([real_root, real]) != real_root:
        raise Invalid(f"payload file name {str(name)!r}: a symbolic link leads out of the payload",
                      code=PAYLOAD_UPLOAD)  # fmt: skip
    if os.path.isdir(real):
        raise Invalid(f"payload file name {str(name)!r} is a folder", code=PAYLOAD_UPLOAD)
    return target


def write_file(
    root: Path,
    partial: Path,
    name: PurePosixPath,
    chunks: Iterable[bytes],
    *,
    room: int,
    reserve: int,
) -> int:
    """Write ``chunks`` to ``root/name`` atomically: into ``partial`` first, renamed into
    place once complete (replacing a file of that name). At most ``room`` bytes, and the
    disk keeps ``reserve`` bytes free; over either, or if ``chunks`` raises (the client went
    away), the partial file is removed and nothing else changed. Returns the size."""
    target = resolve(root, name)
    partial.mkdir(parents=True, exist_ok=True)
    temp = partial / f"{uuid.uuid4().hex}.part"
    size = 0
    try:
        with open(temp, "xb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > room:
                    raise Refused(f"payload file {str(name)!r}: the payload would exceed its limit "
                                  f"({room} bytes left of api.max-upload)", code=PAYLOAD_UPLOAD,
                                  status=413)  # fmt: skip
                if shutil.disk_usage(partial).free - len(chunk) < reserve:
                    raise Refused(f"payload file {str(name)!r}: the disk would have less than "
                                  f"api.disk-reserve ({reserve} bytes) free",
                                  code=PAYLOAD_UPLOAD, status=507)  # fmt: skip
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        target = resolve(root, name)  # again: the folders may have changed meanwhile
        target.parent.mkdir(parents=True, exist_ok=True)
        resolve(root, name)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return size


def _walk(folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            yield f"{prefix}{rel}", path


def list_files(inputs: Path | None, outputs: Path | None) -> list[dict]:
    """Every file of a job's payload: ``{"name", "size", "mode"}``, inputs first."""
    files = [] if inputs is None else list(_walk(inputs, "/input/"))
    if outputs is not None and outputs.is_dir():
        for entry in sorted(outputs.iterdir()):
            if entry.name.startswith("."):  # .logs: the operators' logs (Jobs.ReadLogs)
                continue
            if entry.is_dir() and not entry.is_symlink():
                files += _walk(entry, f"/operators/{entry.name}/")
            elif entry.is_file() and not entry.is_symlink():
                files.append((f"/output/{entry.name}", entry))
    out = []
    for name, path in files:
        stat = path.stat()
        out.append({"name": name, "size": stat.st_size, "mode": stat.st_mode & 0o777})
    return out


def open_file(inputs: Path | None, outputs: Path | None, name: str) -> tuple[Path, int]:
    """The file a listed ``name`` stands for, and its size; :class:`NotFound` otherwise."""
    if "\x00" in name or ".." in PurePosixPath(name).parts:
        raise Invalid(f"payload file {name!r}: not a file name of this payload",
                      code=PAYLOAD_MISSING_FILE)  # fmt: skip
    for prefix, root in (("/input/", inputs), ("/operators/", outputs), ("/output/", outputs)):
        if name.startswith(prefix) and root is not None:
            path = root / name[len(prefix) :]
            real_root = os.path.realpath(root)
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) == real_root and os.path.isfile(real):
                return path, os.path.getsize(real)
    raise NotFound(f"payload file {name!r}: no such file (names start with /input/, "
                   "/operators/ or /output/)", code=PAYLOAD_MISSING_FILE)  # fmt: skip


def read_chunks(path: Path, size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def body_chunks(request: Any, counter: Any) -> Iterator[bytes]:
    """An HTTP request's body (Starlette's ``request.stream()``) as chunks, for a worker
    thread (each is fetched from the event loop as the writer wants it); ``counter``: a
    prometheus counter the bytes are added to."""
    import anyio.from_thread

    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = anyio.from_thread.run(stream.__anext__)
        except StopAsyncIteration:
            return
        if chunk:
            counter.inc(len(chunk))
            yield chunk
