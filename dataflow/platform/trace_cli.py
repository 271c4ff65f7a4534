"""``dataflow trace TARGET``: what made a result (:mod:`dataflow.platform.trace`).

``TARGET`` is a UID asked of a running service (``GET /api/v1/trace/{uid}``, ``--api`` as
the other commands), or, offline, a DICOM file (its Contributing Equipment Sequence and the
job folder's ``provenance.json``), a ``dataflow run`` output folder (every job in it) or, with
``--in FOLDER``, a UID looked up in such a folder."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import typer

from dataflow.platform.client import API, AS_JSON, _Session

__all__ = ["trace"]


def trace(
    target: str = typer.Argument(
        ...,
        help="An output SOP Instance UID, input study/series/instance UID or job id; or "
        "a DICOM file or a dataflow run output folder (offline).",
    ),
    folder: Path = typer.Option(
        None, "--in", help="Look the UID up in this dataflow run output folder (offline)."
    ),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """The jobs that made TARGET or took it in: inputs (and their hash), pipeline (and its
    hash), each stage with operator, version, parameters, model, device and times."""
    from dataflow.platform.trace import format_trace, trace_file, trace_folder

    path = Path(target)
    if folder is not None:
        answer = trace_folder(folder, target)
    elif path.is_file():
        answer = trace_file(path)
    elif path.is_dir():
        answer = trace_folder(path)
    else:
        with _Session(api) as client:
            answer = client.call("GET", f"/api/v1/trace/{quote(target, safe='')}")
    typer.echo(json.dumps(answer, indent=1) if as_json else format_trace(answer))
