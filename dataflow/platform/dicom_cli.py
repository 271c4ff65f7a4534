"""``dataflow dicom studies|associations``: what the DICOM receivers of a running service hold
and who called them (its REST API, found as the other client commands find it)."""

from __future__ import annotations

from typing import Any

import typer

from dataflow.platform.client import API, AS_JSON, _emit, _Session, _when

__all__ = ["dicom_app"]

dicom_app = typer.Typer(
    no_args_is_help=True, help="The DICOM side of a running service: studies, associations."
)


def format_studies(studies: list[dict[str, Any]]) -> str:
    lines = [f"{'RECEIVER':<10} {'GROUP':>6} {'CALLING':<16} {'CALLED':<16} {'STATE':<10} "
             f"{'INST':>5}  {'LAST ARRIVAL':<19}  JOBS"]  # fmt: skip
    for s in studies:
        jobs = ", ".join(f"{j['pipeline']}:{j['state']}" for j in s["jobs"]) or "-"
        lines.append(f"{s['receiver']:<10} {s['group']:>6} {s['calling_ae']:<16} "
                     f"{s['called_ae']:<16} {s['state']:<10} {s['instances']:>5}  "
                     f"{_when(s['last_arrival']):<19}  {jobs}")  # fmt: skip
    return "\n".join(lines)


def format_associations(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ENDED':<19}  {'RECEIVER':<10} {'CALLING':<16} {'CALLED':<16} {'PEER':<15} "
             f"{'OUTCOME':<9} {'STORED':>6} {'FAILED':>6}  REASON"]  # fmt: skip
    for a in rows:
        lines.append(f"{_when(a['ended']):<19}  {a['receiver']:<10} {a['calling_ae']:<16} "
                     f"{a['called_ae']:<16} {a['peer_host']:<15} {a['outcome']:<9} "
                     f"{a['stored']:>6} {a['failed']:>6}  {a['reason']}")  # fmt: skip
    return "\n".join(lines)


@dicom_app.command("studies")
def studies(
    state: str = typer.Option(None, help="pending, complete, dispatched, ignored, reclaimed."),
    limit: int = typer.Option(50, help="At most this many, newest first."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """Studies (or series) received, their state and the jobs made of them."""
    params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
    with _Session(api) as client:
        rows = client.call("GET", "/api/v1/dicom/studies", params=params)
    _emit(rows, as_json, format_studies(rows))


@dicom_app.command("associations")
def associations(
    limit: int = typer.Option(50, help="At most this many, newest first."),
    api: str = API,
    as_json: bool = AS_JSON,
) -> None:
    """The receivers' last associations: who called, from where, how it ended."""
    with _Session(api) as client:
        rows = client.call("GET", "/api/v1/dicom/associations", params={"limit": limit})
    _emit(rows, as_json, format_associations(rows))
