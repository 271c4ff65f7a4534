"""``dataflow models list|upload|describe|download|delete``: the model repository of a
running service (its REST API, found as the other client commands find it), or with
``--local`` the repository ``dataflow run`` reads (``DATAFLOW_MODELS``, else
``$XDG_DATA_HOME/dataflow/models``). A pipeline then names a model ``models:/NAME/VERSION``.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import typer

from dataflow import models
from dataflow.errors import MissingFile, UsageError
from dataflow.platform.client import API, AS_JSON, _chunks, _emit, _Session, _when

__all__ = ["models_app"]

models_app = typer.Typer(
    no_args_is_help=True,
    help="Models (ONNX files, Triton model folders) of a running service, or --local.",
)
LOCAL = typer.Option(False, "--local", help="The local repository (DATAFLOW_MODELS), no service.")


def _split(ref: str) -> tuple[str, str | None]:
    """NAME or NAME/VERSION (a leading models:/ is accepted); the version a whole number."""
    given = ref
    ref = ref[len(models.PREFIX) :] if models.is_reference(ref) else ref
    name, _, version = ref.strip("/").partition("/")
    if version and not version.isdigit():
        raise UsageError(f"{given!r}: the version must be a whole number (NAME/VERSION)")
    return name, version or None


def format_models(records: list[dict[str, Any]]) -> str:
    lines = [f"{'NAME':<24} {'VERSION':>7} {'TYPE':<7} {'SIZE':>12}  {'CREATED':<19}  ID"]
    for r in records:
        lines.append(f"{r['name']:<24} {r['version']:>7} {r['type']:<7} {r['size']:>12}  "
                     f"{_when(r['created']):<19}  {r['id']}")  # fmt: skip
    return "\n".join(lines)


def _local() -> models.ModelRepository:
    return models.ModelRepository(models.default_root())


@models_app.command("list")
def list_models(local: bool = LOCAL, api: str = API, as_json: bool = AS_JSON) -> None:
    """Every model version."""
    if local:
        records = _local().list()
    else:
        with _Session(api) as client:
            records = client.call("GET", "/api/v1/models")
    _emit(records, as_json, format_models(records))


@models_app.command("upload")
def upload(
    name: str = typer.Argument(..., help="The model's name (letters, digits, . _ -)."),
    path: Path = typer.Argument(..., help="An .onnx file, or a model folder (Triton's layout)."),
    version: int = typer.Option(None, "--version", "-v", help="Default: the next one."),
    local: bool = LOCAL,
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Add a model version; prints how a pipeline names it (models:/NAME/VERSION)."""
    if not path.exists():
        raise MissingFile(f"{path}: no such file or folder")
    archive = path.is_dir()
    with tempfile.TemporaryDirectory(prefix="dataflow-model-") as tmp:
        source = path
        if archive:  # a folder travels as one tar stream, unpacked whole on the other side
            source = Path(tmp) / "model.tar"
            with tarfile.open(source, "w") as tar:
                for item in sorted(path.rglob("*")):
                    if item.is_file() and not item.is_symlink():
                        tar.add(item, arcname=item.relative_to(path).as_posix())
        record = _send(name, version, source, path.name, archive, local, api)
    ref = f"models:/{record['name']}/{record['version']}"
    text = (f"model {record['name']} version {record['version']} ({record['type']}, "
            f"{record['size']} bytes): name it {ref}")  # fmt: skip
    _emit(record, as_json, text)


def _send(name, version, source: Path, filename, archive, local, api) -> dict[str, Any]:
    if local:
        with open(source, "rb") as handle:
            chunks = _chunks(handle)
            if archive:
                return _local().add_archive(name, version, chunks)
            return _local().add_file(name, version, filename, chunks)
    params = {"format": "tar"} if archive else {"file": filename}
    path = f"/api/v1/models/{name}" + (f"/{version}" if version else "")
    with _Session(api) as client, open(source, "rb") as handle:
        return client.call("PUT" if version else "POST", path, params=params,
                           content=_chunks(handle))  # fmt: skip


@models_app.command("describe")
def describe(
    ref: str = typer.Argument(..., help="NAME or NAME/VERSION (default: the highest)."),
    local: bool = LOCAL,
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """One model version's record."""
    name, version = _split(ref)
    if local:
        record = _local().get(name, int(version) if version else None)
    else:
        with _Session(api) as client:
            record = client.call("GET", f"/api/v1/models/{name}/{version or 'latest'}")
    lines = [f"{key:<9} {record[key]}" for key in ("name", "version", "id", "type", "size",
                                                    "files", "sha256")]  # fmt: skip
    lines.append(f"created   {_when(record['created'])}")
    if record.get("used_by") is not None:
        lines.append(f"used by   {', '.join(record['used_by']) or '-'}")
    _emit(record, as_json, "\n".join(lines))


@models_app.command("download")
def download(
    ref: str = typer.Argument(..., help="NAME or NAME/VERSION (default: the highest)."),
    output: Path = typer.Option(None, "--output", "-o", help="Default: the model's file name."),
    local: bool = LOCAL,
    api: str = API,
) -> None:
    """Save a model: its .onnx file, or a tar archive of its folder."""
    name, version = _split(ref)
    if local:
        repo = _local()
        record = repo.get(name, int(version) if version else None)
        source = repo.path(name, record["version"])
        tar = f"{name}-{record['version']}.tar"
        target = output or Path(source.name if source.is_file() else tar)
        if source.is_file():
            shutil.copyfile(source, target)
        else:
            with open(target, "wb") as out:
                for chunk in repo.archive(name, record["version"]):
                    out.write(chunk)
        typer.echo(str(target))
        return
    with _Session(api) as client:
        size = client.save(f"/api/v1/models/{name}/{version or 'latest'}/download", _named(output))
    typer.echo(f"{size[1]} ({size[0]} bytes)")


def _named(output: Path | None):
    """The file a model download goes to: ``output``, else the name the service gives."""

    def target(response) -> Path:
        found = re.search(r'filename="([^"/]+)"', response.headers.get("content-disposition", ""))
        return output or Path(found.group(1) if found else "model.bin")

    return target


@models_app.command("delete")
def delete(
    ref: str = typer.Argument(..., help="NAME/VERSION."),
    local: bool = LOCAL,
    api: str = API,
) -> None:
    """Delete a model version (refused while a pipeline of the service names it)."""
    name, version = _split(ref)
    if not version:
        raise UsageError(f"{ref!r}: name the version to delete, as NAME/VERSION")
    if local:
        _local().delete(name, int(version))
    else:
        with _Session(api) as client:
            client.call("DELETE", f"/api/v1/models/{name}/{version}")
    typer.echo(f"deleted model {name} version {version}")
