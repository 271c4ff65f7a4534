"""``dataflow jobs order PIPELINE --study UID --from SOURCE``: "run pipeline P on study S from
PACS X" through a running service's API (``POST /api/v1/jobs`` with an ``order``). The source
is a name of the service's ``dicom.sources``; the pipeline's first stage fetches the study
(``operators.dicom.priors:FetchStudy``, docs/dicom.md "Orders")."""

from __future__ import annotations

import json

import typer

from dataflow.platform.client import API, AS_JSON, _emit, _Session, _wait, format_status, jobs_app

__all__ = ["order"]


@jobs_app.command("order")
def order(
    pipeline: str = typer.Argument(..., help="Pipeline name or id."),
    study: str = typer.Option(..., "--study", help="The Study Instance UID to fetch."),
    source: str = typer.Option(..., "--from", help="The PACS: a name of dicom.sources."),
    series: str = typer.Option(None, "--series", help="One series of the study only."),
    name: str = typer.Option(None, help="A name for people."),
    priority: str = typer.Option("normal", help="lower, normal, higher or immediate."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job ends."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Run PIPELINE on study --study from the PACS --from: the job starts at once and its
    first stage fetches the study. Exit 1 if (with --wait) it failed or was cancelled."""
    body = {"pipeline": pipeline, "name": name, "priority": priority,
            "order": {"study": study, "source": source, "series": series}}  # fmt: skip
    with _Session(api) as client:
        created = client.call("POST", "/api/v1/jobs", json=body)
        job_id = created["job_id"]
        if not wait:
            _emit(created, as_json, f"job {job_id} {created['state']} (study from {source})")
            return
        if not as_json:
            typer.echo(f"job {job_id} {created['state']} (study from {source})")
        status = _wait(client, job_id)
        typer.echo(json.dumps(status, indent=1) if as_json else format_status(status))
        if status["state"] in ("failed", "cancelled"):
            raise typer.Exit(1)
