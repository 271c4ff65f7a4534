"""The CLI as a client of a running ``dataflow serve`` (its REST API): ``dataflow jobs
create|start|status|list|cancel|retry|logs|download`` and ``dataflow pipelines
list|describe|create|update|remove`` and ``dataflow payloads create|files|upload|download|delete``.

The service is found at ``--api``, else ``DATAFLOW_API``, else the ``api:`` of the client file
``$XDG_CONFIG_HOME/dataflow/client.yaml`` (``~/.config/...``; as ``clara config`` kept its
target), else ``http://127.0.0.1:8080``; its token (``api: {tokens: true}``) in
``DATAFLOW_TOKEN`` or the file's ``token:``, and a CA file to trust for https in
``DATAFLOW_CA`` or ``ca:``.
Tables for people, ``--json`` for scripts. ``dataflow jobs CONFIG`` (a state folder's job
records, without a running service) stays: any first argument that is not one of these verbs
is read as ``dataflow jobs records CONFIG ...``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from dataflow.errors import DataflowError, MissingFile, UsageError

__all__ = ["ApiClient", "ApiError", "jobs_app", "payloads_app", "pipelines_app"]

DEFAULT_API = "http://127.0.0.1:8080"
ENDED = ("succeeded", "failed", "cancelled")


def client_file() -> Path:
    home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(home) / "dataflow" / "client.yaml"


def configured(key: str = "api", default: str | None = DEFAULT_API) -> str | None:
    """``api`` (the service's URL), ``token`` or ``ca`` (a CA file to trust for https) of
    the client file, or ``default``; ApiError if the file is malformed."""
    import yaml

    path = client_file()
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, yaml.YAMLError) as exc:
        raise ApiError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k, ""), str) for k in ("api", "token", "ca")
    ):
        raise ApiError(f"{path}: expected a mapping with api: URL (e.g. {DEFAULT_API}), and "
                       "token: and ca: if the service needs them")  # fmt: skip
    return data.get(key, default)


def configured_api() -> str:
    return configured("api") or DEFAULT_API


class ApiError(DataflowError):
    """The service refused (``status`` >= 400, its message) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """A few lines over httpx: each method one call of the REST API (docs/platform.md)."""

    def __init__(self, base: str | None = None, timeout: float = 300.0) -> None:
        import httpx

        self.base = (base or os.environ.get("DATAFLOW_API") or configured_api()).rstrip("/")
        token = os.environ.get("DATAFLOW_TOKEN") or configured("token", None)
        ca = os.environ.get("DATAFLOW_CA") or configured("ca", None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: Any = True
        if ca:
            import ssl

            verify = ssl.create_default_context(cafile=ca)  # the service's own CA
        self._http = httpx.Client(base_url=self.base, timeout=timeout, headers=headers,
                                  verify=verify)  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"no dataflow API at {self.base} ({exc.__class__.__name__}): is dataflow serve "
                "running with an api: section? (set DATAFLOW_API or --api)"
            ) from None
        return self._check(response)

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            raise ApiError(str(message), response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def upload(self, payload_id: str, name: str, path: Path) -> Any:
        with open(path, "rb") as handle:
            return self.call("PUT", f"/api/v1/payloads/{payload_id}/files/input/{name}",
                             content=_chunks(handle))  # fmt: skip

    def download(self, job_id: str, name: str, target: Path, *, of: str = "jobs") -> int:
        """Stream one listed file of a job (``of="payloads"``: of a payload) into ``target``
        (written whole or not at all)."""
        return self.save(f"/api/v1/{of}/{job_id}/files{name}", lambda response: target)[0]

    def save(self, path: str, target: Callable[[Any], Path]) -> tuple[int, Path]:
        """Stream ``GET path`` into the file ``target(response)`` names (from its headers, if
        need be), written whole or not at all: (bytes, the file)."""
        import httpx

        partial = None
        size = 0
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                file = target(response)
                file.parent.mkdir(parents=True, exist_ok=True)
                partial = file.with_name(f".{file.name}.part")
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
            partial.replace(file)
        except httpx.TransportError as exc:
            raise ApiError(f"{self.base}: the download of {path} broke off ({exc})") from None
        finally:
            if partial is not None:
                partial.unlink(missing_ok=True)
        return size, file


def _chunks(handle: Any, size: int = 1024 * 1024) -> Iterator[bytes]:
    while chunk := handle.read(size):
        yield chunk


# --------------------------------------------------------------------- the command groups


class JobsGroup(TyperGroup):
    """``dataflow jobs VERB ...``, or ``dataflow jobs CONFIG ...`` for the state folder's
    records (the command ``records``) as before the API existed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["records", *args]
        return super().parse_args(ctx, args)


jobs_app = typer.Typer(
    cls=JobsGroup,
    no_args_is_help=True,
    help="Jobs of a running service (its API at DATAFLOW_API), or `dataflow jobs CONFIG`: the "
    "job records of a state folder.",
)
pipelines_app = typer.Typer(no_args_is_help=True, help="Pipelines of a running service.")
payloads_app = typer.Typer(no_args_is_help=True, help="Payloads (job files) of a running service.")

API = typer.Option(None, "--api", envvar="DATAFLOW_API",
                   help=f"The service's REST API (default {DEFAULT_API}).")  # fmt: skip
AS_JSON = typer.Option(False, "--json", help="JSON for scripts.")


class _Session:
    """``with _Session(api) as client``: a client closed at the end; its ApiError goes on to
    the CLI's one error boundary (dataflow.cli)."""

    def __init__(self, api: str | None) -> None:
        self.client = ApiClient(api)

    def __enter__(self) -> ApiClient:
        return self.client

    def __exit__(self, kind, exc, tb) -> None:
        self.client.close()


def _when(seconds: float | None) -> str:
    return "" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _emit(value: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(value, indent=1) if as_json else text)


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"job       {status['id']}  ({status['name']})",
        f"pipeline  {status['pipeline']}",
        f"state     {status['state']}  (Clara: {status['clara_state']}/{status['clara_status']})",
        f"priority  {status['priority']}",
        f"payload   {status.get('payload_id') or '-'}",
        f"created   {_when(status['created'])}",
        f"started   {_when(status['started'])}",
        f"finished  {_when(status['finished'])}",
    ]
    if status.get("operators"):
        lines.append("operators:")
        lines += [f"  {op['name']:<28} {op['status']}" for op in status["operators"]]
    lines += [f"  {message}" for message in status.get("messages", [])]
    return "\n".join(lines)


def format_job_list(jobs: list[dict[str, Any]]) -> str:
    lines = [f"{'JOB':<33} {'PIPELINE':<18} {'STATE':<10} {'PRIORITY':<9} {'FROM':<6} CREATED"]
    for job in jobs:
        line = f"{job['id']:<33} {job['pipeline']:<18} {job['state']:<10} {job['priority']:<9}"
        lines.append(f"{line} {job['source']:<6} {_when(job['created'])}")
        if job.get("error"):
            lines.append(f"    {job['error']}")
    return "\n".join(lines)


def _input_files(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise MissingFile(f"--input {path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    if not found:
        raise MissingFile(f"--input {path}: the folder holds no files")
    return [(p.relative_to(path).as_posix(), p) for p in found]


def _transfer(label: str, items: list, size: Callable, do: Callable) -> list:
    """``do(item)`` for each item, with a progress bar (bytes, from ``size(item)``) on stderr
    when it is a terminal; the results."""
    progress = task = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(label, total=sum(size(item) for item in items))
    out = []
    try:
        for item in items:
            out.append(do(item))
            if progress is not None:
                progress.advance(task, size(item))
    finally:
        if progress is not None:
            progress.stop()
    return out


def _wait(client: ApiClient, job_id: str) -> dict[str, Any]:
    """Poll the job every half second until it ends (Ctrl-C stops waiting, not the job)."""
    while True:
        status = client.call("GET", f"/api/v1/jobs/{job_id}")
        if status["state"] in ENDED:
            return status
        time.sleep(0.5)


@jobs_app.command("create")
def create(
    pipeline: str = typer.Option(..., "--pipeline", "-p", help="Pipeline name or id."),
    input_: Path = typer.Option(None, "--input", "-i", help="A file or folder to upload."),
    name: str = typer.Option(None, help="A name for people."),
    priority: str = typer.Option("normal", help="lower, normal, higher or immediate."),
    metadata: list[str] = typer.Option(None, "--metadata", "-m", help="KEY=VALUE (repeatable)."),
    start: bool = typer.Option(False, "--start", help="Start it once its files are uploaded."),
    wait: bool = typer.Option(False, "--wait", help="With --start: wait until it ends."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Create a job (and its payload), upload --input into it, --start it, --wait for it.
    Exit 1 if it failed or was cancelled."""
    meta = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata {item!r}: expected KEY=VALUE")
        meta[key] = value
    files = _input_files(input_) if input_ is not None else []
    with _Session(api) as client:
        body = {"pipeline": pipeline, "name": name, "priority": priority, "metadata": meta}
        created = client.call("POST", "/api/v1/jobs", json=body)
        job_id, payload_id = created["job_id"], created["payload_id"]
        _transfer("upload", files, lambda item: item[1].stat().st_size,
                  lambda item: client.upload(payload_id, *item))  # fmt: skip
        if not as_json:
            typer.echo(f"job {job_id} created (payload {payload_id}, {len(files)} file(s))")
        if not start:
            if as_json:
                typer.echo(json.dumps({**created, "files": len(files)}))
            return
        status = client.call("POST", f"/api/v1/jobs/{job_id}/start")
        if not as_json:
            typer.echo(f"job {job_id} started")
        if wait:
            status = _wait(client, job_id)
        _emit(status, as_json, format_status(status) if wait else "")
        if status["state"] in ("failed", "cancelled"):
            raise typer.Exit(1)


@jobs_app.command("start")
def start_job(job_id: str, api: str = API, as_json: bool = AS_JSON) -> None:
    """Start a created job."""
    with _Session(api) as client:
        status = client.call("POST", f"/api/v1/jobs/{job_id}/start")
        _emit(status, as_json, f"job {job_id} {status['state']}")


@jobs_app.command("status")
def status(job_id: str, api: str = API, as_json: bool = AS_JSON) -> None:
    """A job's state, timestamps, operators and messages."""
    with _Session(api) as client:
        value = client.call("GET", f"/api/v1/jobs/{job_id}")
        _emit(value, as_json, format_status(value))


@jobs_app.command("list")
def list_jobs(
    state: list[str] = typer.Option(None, help="Only these states (repeatable)."),
    pipeline: list[str] = typer.Option(None, help="Only these pipelines (repeatable)."),
    limit: int = typer.Option(50, min=1, max=10000),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Jobs from DICOM and the API, newest first."""
    params = {"state": state or [], "pipeline": pipeline or [], "limit": limit}
    with _Session(api) as client:
        jobs = client.call("GET", "/api/v1/jobs", params=params)
        _emit(jobs, as_json, format_job_list(jobs))


@jobs_app.command("cancel")
def cancel(
    job_id: str, reason: str = typer.Option("", help="Why (kept with the job)."),
    api: str = API, as_json: bool = AS_JSON,
) -> None:  # fmt: skip
    """Cancel a job: created or queued, it never runs; running, its outputs are discarded."""
    with _Session(api) as client:
        value = client.call("POST", f"/api/v1/jobs/{job_id}/cancel", json={"reason": reason})
        _emit(value, as_json, f"job {job_id} {value['state']}")


@jobs_app.command("retry")
def retry(job_id: str, api: str = API, as_json: bool = AS_JSON) -> None:
    """Queue a failed job again."""
    with _Session(api) as client:
        value = client.call("POST", f"/api/v1/jobs/{job_id}/retry")
        _emit(value, as_json, f"job {job_id} {value['state']}")


@jobs_app.command("logs")
def logs(
    job_id: str, operator: str = typer.Option(None, help="Only this operator."),
    api: str = API, as_json: bool = AS_JSON,
) -> None:  # fmt: skip
    """What is recorded of a job: its attempts, error and traceback."""
    with _Session(api) as client:
        params = {"operator": operator} if operator else {}
        value = client.call("GET", f"/api/v1/jobs/{job_id}/logs", params=params)
        _emit(value, as_json, "\n".join(value["logs"]))


@jobs_app.command("download")
def download(
    job_id: str,
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder to write into."),
    only: str = typer.Option(
        "/operators/", help="Files whose name starts with this (/ for all, /input/ ...)."
    ),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Download a job's files (by default its operators' outputs) into OUTPUT/JOB_ID/,
    keeping their names (operators/OP/...)."""
    with _Session(api) as client:
        _fetch_all(client, "jobs", job_id, output, only, as_json)


@pipelines_app.command("list")
def pipelines_list(api: str = API, as_json: bool = AS_JSON) -> None:
    """Every pipeline the service serves."""
    with _Session(api) as client:
        rows = client.call("GET", "/api/v1/pipelines")
        lines = [f"{'PIPELINE':<24} {'ID':<33} {'FROM':<11} STATE"]
        lines += [f"{p['name']:<24} {p['id']:<33} {p['source']:<11} {p['state']}" for p in rows]
        _emit(rows, as_json, "\n".join(lines))


@pipelines_app.command("describe")
def pipelines_describe(pipeline: str, api: str = API, as_json: bool = AS_JSON) -> None:
    """A pipeline's operators and definition."""
    with _Session(api) as client:
        value = client.call("GET", f"/api/v1/pipelines/{pipeline}")
        ops = [f"  {op['name']} <- {', '.join(op['after']) or 'job input'}"
               for op in value["operators"]]  # fmt: skip
        text = "\n".join([f"pipeline {value['name']} ({value['id']}, {value['source']})", *ops])
        _emit(value, as_json, text)


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as exc:
        raise UsageError(f"{file}: {exc.strerror}") from None


@pipelines_app.command("create")
def pipelines_create(
    file: Path = typer.Argument(..., help="Pipeline YAML file."),
    name: str = typer.Option(None, help="Default: the file's name: field."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Register a pipeline with the running service (validated; its workers start warm)."""
    definition = _read(file)
    with _Session(api) as client:
        value = client.call("POST", "/api/v1/pipelines",
                            json={"definition": definition, "name": name})  # fmt: skip
        _emit(value, as_json, f"pipeline {value['name']} registered (id {value['id']})")


@pipelines_app.command("update")
def pipelines_update(
    pipeline: str,
    file: Path = typer.Argument(..., help="The new pipeline YAML file."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Replace a registered pipeline's definition (refused while jobs of it are in flight)."""
    definition = _read(file)
    with _Session(api) as client:
        value = client.call("PUT", f"/api/v1/pipelines/{pipeline}", json={"definition": definition})
        _emit(value, as_json, f"pipeline {value['name']} updated (id {value['id']})")


@pipelines_app.command("remove")
def pipelines_remove(pipeline: str, api: str = API) -> None:
    """Remove a pipeline registered through the API (refused while jobs of it are in flight)."""
    with _Session(api) as client:
        client.call("DELETE", f"/api/v1/pipelines/{pipeline}")
        typer.echo(f"pipeline {pipeline} removed")


def _fetch_all(
    client: ApiClient, of: str, item: str, output: Path, only: str, as_json: bool
) -> None:
    """Download every listed file of a job or payload whose name starts with ``only`` into
    ``output/ITEM/`` (names kept: ``input/...``, ``operators/OP/...``)."""
    listed = client.call("GET", f"/api/v1/{of}/{item}/files")
    chosen = [f for f in listed if f["name"].startswith(only)]
    if not chosen:
        raise MissingFile(f"{of[:-1]} {item} has no file under {only}")
    target = output / item

    def one(entry: dict[str, Any]) -> dict[str, Any]:
        path = target / entry["name"].lstrip("/")
        size = client.download(item, entry["name"], path, of=of)
        return {"name": entry["name"], "path": str(path), "size": size}

    written = _transfer("download", chosen, lambda entry: entry["size"], one)
    _emit(written, as_json, "\n".join(f"{w['path']}  {w['size']} bytes" for w in written))


@payloads_app.command("create")
def payloads_create(api: str = API, as_json: bool = AS_JSON) -> None:
    """A payload of no job (Clara's reusable payload)."""
    with _Session(api) as client:
        value = client.call("POST", "/api/v1/payloads")
        _emit(value, as_json, value["payload_id"])


@payloads_app.command("files")
def payloads_files(payload_id: str, api: str = API, as_json: bool = AS_JSON) -> None:
    """A payload's files: /input/..., /operators/OP/... once its job wrote them."""
    with _Session(api) as client:
        rows = client.call("GET", f"/api/v1/payloads/{payload_id}/files")
        _emit(rows, as_json, "\n".join(f"{r['size']:>12}  {r['name']}" for r in rows))


@payloads_app.command("upload")
def payloads_upload(
    payload_id: str,
    input_: Path = typer.Argument(..., metavar="FILE_OR_FOLDER"),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Upload a file, or every file of a folder (names relative to it), into input/."""
    files = _input_files(input_)
    with _Session(api) as client:
        done = _transfer("upload", files, lambda item: item[1].stat().st_size,
                         lambda item: client.upload(payload_id, *item))  # fmt: skip
        _emit(done, as_json, f"{len(done)} file(s) uploaded into payload {payload_id}")


@payloads_app.command("download")
def payloads_download(
    payload_id: str,
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder to write into."),
    only: str = typer.Option("/", help="Files whose name starts with this (/operators/ ...)."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Download a payload's files into OUTPUT/PAYLOAD_ID/."""
    with _Session(api) as client:
        _fetch_all(client, "payloads", payload_id, output, only, as_json)


@payloads_app.command("delete")
def payloads_delete(payload_id: str, api: str = API) -> None:
    """Delete a payload and its files (refused while its job is pending, queued or running)."""
    with _Session(api) as client:
        client.call("DELETE", f"/api/v1/payloads/{payload_id}")
        typer.echo(f"payload {payload_id} deleted")
