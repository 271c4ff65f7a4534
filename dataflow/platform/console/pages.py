"""The console's routes (see the package docstring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from dataflow import __version__
from dataflow.identifiers import read_header
from dataflow.platform.audit import CALLER
from dataflow.platform.auth import COOKIE, ROLES
from dataflow.platform.console.pipelines import add_pipeline_pages
from dataflow.platform.console.svg import job_series, pipeline_graph, time_chart
from dataflow.platform.errors import PlatformError

__all__ = ["add_console"]

HERE = Path(__file__).resolve().parent
log = structlog.get_logger("dataflow.platform")
ENDED = ("succeeded", "failed", "cancelled")
#: the jobs page's "since" choices: seconds back, and how the page names them
SINCE_LABELS = (("3600", "the last hour"), ("21600", "the last 6 hours"),
                ("86400", "the last 24 hours"), ("604800", "the last 7 days"))  # fmt: skip
#: what a role allowed by api.patient-details sees of a job's patient (DICOM keywords)
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
WAITING_TOO_LONG = 900.0  # seconds a job may wait to start before the overview says so
CHART_HOURS = 6  # the overview's charts: the last hours, in half-hour buckets
SINCE = {key: float(key) for key, _ in SINCE_LABELS}


def when(seconds: float | None) -> str:
    """A time as people read it: today's as 14:03:07, older ones with their date."""
    if not seconds:
        return "–"
    local = time.localtime(seconds)
    today = time.localtime().tm_yday == local.tm_yday and time.localtime().tm_year == local.tm_year
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M", local)


def took(start: float | None, end: float | None) -> str:
    """From ``start`` to ``end`` (or now), as :func:`duration` says it; "–" without a start."""
    if not start:
        return "–"
    return duration((end or time.time()) - start)


def duration(seconds: float) -> str:
    """A duration as people read it: 850 ms, 12.3 s, 4 min 05 s, 2 h 10 min."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def gantt(path: Path, operators: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A job's timeline for the page: one row per operator (in the pipeline's order), its
    runs as bars in per cent of the job's span, with their durations; None without one."""
    import json

    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not runs:
        return None
    start = min(r["start"] for r in runs)
    span = max(max(r["end"] for r in runs) - start, 1e-6)
    rows = []
    for op in operators:
        bars = [
            {
                "left": 100.0 * (r["start"] - start) / span,
                "width": max(100.0 * (r["end"] - r["start"]) / span, 0.3),
                "took": took(r["start"], r["end"]),
                "ok": r["ok"],
            }
            for r in runs
            if r["stage"] == op["name"]
        ]
        rows.append({"name": op["name"], "bars": bars})
    return {"rows": rows, "span": took(start, start + span)}


def overdue(
    jobs: list[dict[str, Any]],
    timeouts: dict[str, float | None],
    now: float,
    waiting: float = WAITING_TOO_LONG,
) -> list[str]:
    """Jobs that need a look, in words: running for more than half their pipeline's
    job-timeout (``timeouts``: pipeline -> seconds, None: no limit; the service fails the
    job at the whole of it), or waiting to start for longer than ``waiting`` seconds."""
    out = []
    for job in jobs:
        if job["state"] == "running" and job.get("started"):
            limit = timeouts.get(job["pipeline"])
            if limit and now - job["started"] > limit / 2:
                out.append(f"job {job['name']} ({job['pipeline']}) has been running for "
                           f"{took(job['started'], now)}; its job-timeout is "
                           f"{duration(limit)}")  # fmt: skip
        elif job["state"] in ("pending", "queued") and now - job["created"] > waiting:
            out.append(f"job {job['name']} ({job['pipeline']}) has been {job['state']} for "
                       f"{took(job['created'], now)}")  # fmt: skip
    return out


def open_associations(health: dict[str, Any]) -> int | None:
    """DICOM associations holding a receiver's slot now, from the connectors' figures in the
    health report (None without a DICOM receiver)."""
    found = [
        metric["value"]
        for connector in health.get("connectors", {}).values()
        for metric in connector.get("metrics", [])
        if metric.get("name") == "dataflow_dicom_receiver_associations"
    ]
    return int(sum(found)) if found else None


def inside(target: str | None) -> str:
    """Where to go after signing in: a path of this console, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/console/"
    return target


def add_console(app: FastAPI, platform: Any) -> None:
    """The console's pages on ``app`` (``/``, ``/console/...``) and its static files."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    env.filters.update(when=when, size=size)
    env.tests["outputs"] = lambda name: name.startswith("/operators/")  # an operator wrote it
    env.globals.update(took=took, version=__version__)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    def viewer(request: Request) -> tuple[str | None, str]:
        """Who looks (their token's name) and their role: without ``api.tokens`` (loopback
        only) nobody signs in and every button is there."""
        if platform.auth is None:
            return None, "admin"
        token = getattr(request.state, "token", None)
        return (token.name, token.role) if token is not None else (None, "read")

    def page(name: str, request: Request, status: int = 200, **values: Any) -> HTMLResponse:
        who, role = viewer(request)
        html = env.get_template(name).render(
            request=request,
            page=name.split(".")[0],
            who=who,
            role=role,
            can=lambda needed: ROLES.index(role) >= ROLES.index(needed),
            signing_in=platform.auth is not None,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    @app.get("/console/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = Query("/console/")) -> Response:
        if platform.auth is None:
            return RedirectResponse("/console/", status_code=303)
        return page("login.html", request, next=inside(next), error=None)

    @app.post("/console/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request) -> Response:
        async with request.form() as form:
            secret, target = str(form.get("token") or "").strip(), inside(str(form.get("next")))
        if platform.auth is None:
            return RedirectResponse(target, status_code=303)
        token = platform.auth.tokens.verify(secret) if secret else None
        if token is None:
            log.info("console_sign_in_refused", peer=request.client.host if request.client else "?")
            return page("login.html", request, status=401, next=target,
                        error="That token is unknown or revoked.")  # fmt: skip
        CALLER.set((token.name, request.client.host if request.client else "?", "console"))
        platform.audit.record("console_signed_in", role=token.role)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/",
                            secure=platform.config.tls is not None)  # fmt: skip
        return response

    @app.post("/console/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    add_pipeline_pages(app, platform, page)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    @app.get("/console/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> HTMLResponse:
        health = platform.health()
        counts: dict[str, int] = {}
        for row in health.get("jobs", []):
            counts[row["state"]] = counts.get(row["state"], 0) + row["count"]
        waiting = platform.dicom_studies("pending", limit=50) if platform.dicom_connectors() else []
        backlog: dict[str, dict[str, int]] = {}
        for row in health.get("deliveries", []):
            backlog.setdefault(row["destination"], {})[row["state"]] = row["count"]
        pipelines = []
        for item in platform.list_pipelines():
            entry = health.get("pipelines", {}).get(item["name"], {})
            stages = entry.get("stages", {})
            pipelines.append(
                {
                    **item,
                    "stages": stages,
                    "store": entry.get("store") or {},
                    "done": list(stages.values())[-1].get("done", 0) if stages else 0,
                }
            )
        now = time.time()
        start = now - CHART_HOURS * 3600
        recent_jobs = platform.list_jobs(created_after=start - 3600, limit=10000)
        series = job_series(recent_jobs, start, now, buckets=CHART_HOURS * 2)
        span = f"the last {CHART_HOURS} hours"
        titles = (f"Jobs created, by state now ({span})", f"Jobs ended, per pipeline ({span})",
                  f"Latency from created to ended, 95th percentile ({span})")  # fmt: skip
        charts = [
            time_chart(series["states"], start, now, "jobs", titles[0]),
            time_chart(series["throughput"], start, now, "jobs", titles[1]),
            time_chart(series["latency"], start, now, "s", titles[2], "lines"),
        ]
        timeouts = {name: entry.limits.job_timeout
                    for name, entry in list(platform.service.pipelines.items())}  # fmt: skip
        in_flight = platform.list_jobs(states=("pending", "queued", "running"), limit=1000)
        return page(
            "overview.html",
            request,
            charts=charts,
            overdue=overdue(in_flight, timeouts, now),
            disks=platform.disks(),
            open_associations=open_associations(health),
            health=health,
            counts=counts,
            waiting=waiting,
            backlog=backlog,
            pipelines=pipelines,
            recent=platform.list_jobs(states=("failed",), limit=10),
        )

    def job_filters(request: Request) -> dict[str, str]:
        """The jobs page's filters from its query: state, pipeline, called AE title, since
        (seconds back) and find (an accession number, a UID, a job id)."""
        keys = ("state", "pipeline", "called_ae", "since", "find")
        return {k: request.query_params.get(k, "").strip() for k in keys}

    def job_rows(filters: dict[str, str]) -> list[dict[str, Any]]:
        since = SINCE.get(filters["since"])
        return platform.list_jobs(
            states=(filters["state"],) if filters["state"] else (),
            pipelines=(filters["pipeline"],) if filters["pipeline"] else (),
            created_after=time.time() - since if since else None,
            called_ae=filters["called_ae"] or None,
            find=filters["find"] or None,
            limit=200,
        )

    @app.get("/console/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs(request: Request) -> HTMLResponse:
        filters = job_filters(request)
        try:
            rows, error = job_rows(filters), None
        except PlatformError as exc:
            rows, error = [], exc.message
        titles = {s["called_ae"] for s in platform.dicom_studies(limit=1000)}
        return page(
            "jobs.html",
            request,
            jobs=rows,
            filters=filters,
            query=urlencode({k: v for k, v in filters.items() if v}),
            error=error,
            pipelines=[p["name"] for p in platform.list_pipelines()],
            titles=sorted(titles | ({filters["called_ae"]} - {""})),
            spans=SINCE_LABELS,
            states=("pending", "queued", "running", "succeeded", "failed", "cancelled"),
        )

    @app.get("/console/fragments/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs_fragment(request: Request) -> HTMLResponse:
        try:
            rows = job_rows(job_filters(request))
        except PlatformError:
            rows = []
        return page("jobs_rows.html", request, jobs=rows)

    @app.get("/console/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job(request: Request, job_id: str) -> HTMLResponse:
        try:
            status = platform.job_status(job_id)
        except PlatformError as exc:
            return page("missing.html", request, status=exc.status, message=exc.message)
        try:
            described = platform.describe_pipeline(status["pipeline"])
            after = {op["name"]: op["after"] for op in described["operators"]}
        except PlatformError:
            after = {}
        graph = pipeline_graph(
            [
                {"name": op["name"], "after": after.get(op["name"], [])}
                for op in status["operators"]
            ],
            {op["name"]: str(op["status"]).lower() for op in status["operators"]},
            title=status["pipeline"],
        )
        timeline = gantt(
            platform.service.jobs_dir / status["id"] / ".timeline.json", status["operators"]
        )
        preview = preview_of(status["id"]) if status["state"] == "succeeded" else None
        shown = preview.shown if preview is not None else []
        return page(
            "job.html",
            request,
            patient=patient_of(request, status["id"]),
            job=status,
            after=after,
            graph=graph,
            slices=len(shown),
            timeline=timeline,
            legend=preview.colours() if preview is not None else [],
            logs=platform.job_logs(status["id"]),
            files=platform.job_files(status["id"]),
            ended=status["state"] in ENDED,
        )

    def patient_of(request: Request, job_id: str) -> dict[str, str] | None:
        """The patient of a job's input (name, ID, birth date, accession number) when the
        service file allows the viewer's role to see them (``api.patient-details``), else
        None. Each showing is written to the audit log (who, which job)."""
        needed = platform.config.patient_details
        if not needed or ROLES.index(viewer(request)[1]) < ROLES.index(needed):
            return None
        found = read_header(Path(platform.job_record(job_id).payload), PATIENT_KEYS)
        platform.audit.record("patient_details_shown", job=job_id)
        if "PatientName" in found:  # DOE^JANE^^^ -> DOE, JANE
            family, _, rest = found["PatientName"].partition("^")
            given = " ".join(part for part in rest.split("^") if part)
            found["PatientName"] = f"{family}, {given}" if given else family
        birth = found.get("PatientBirthDate", "")
        if len(birth) == 8 and birth.isdigit():
            found["PatientBirthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
        return found

    previews: dict[tuple[str, float | None], Any] = {}  # a few, by job and its end

    def preview_of(job_id: str) -> Any:
        from dataflow.platform.console.preview import find_preview

        record = platform.job_record(job_id)
        key = (record.id, record.finished)
        if key not in previews:
            if len(previews) >= 8:
                previews.pop(next(iter(previews)))
            try:
                previews[key] = find_preview(
                    platform.job_files(record.id),
                    Path(record.payload),
                    platform.service.jobs_dir / record.id,
                )
            except Exception as exc:  # a file that cannot be drawn: the page stands without
                log.warning("preview_failed", job_id=record.id, error=repr(exc))
                previews[key] = None
        return previews[key]

    @app.get("/console/jobs/{job_id}/preview/{index}.png", include_in_schema=False)
    def preview_png(job_id: str, index: int, overlay: bool = Query(True)) -> Response:
        try:
            preview = preview_of(job_id)
        except PlatformError as exc:
            return Response(status_code=exc.status)
        slices = preview.shown if preview is not None else []
        if not 0 <= index < len(slices):
            return Response(status_code=404)
        png = preview.png(slices[index], overlay)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get("/console/dicom", response_class=HTMLResponse, include_in_schema=False)
    def dicom(request: Request) -> HTMLResponse:
        return page(
            "dicom.html",
            request,
            studies=platform.dicom_studies(limit=100),
            associations=platform.dicom_associations(limit=100),
            routing=platform.dicom_routing(),
            connected=bool(platform.dicom_connectors()),
        )

    @app.get("/console/exports", response_class=HTMLResponse, include_in_schema=False)
    def exports(request: Request) -> HTMLResponse:
        return page("exports.html", request, tasks=platform.exports())

    @app.get("/console/fragments/exports", response_class=HTMLResponse, include_in_schema=False)
    def exports_fragment(request: Request) -> HTMLResponse:
        return page("exports_rows.html", request, tasks=platform.exports())

    @app.get("/console/models", response_class=HTMLResponse, include_in_schema=False)
    def models(request: Request) -> HTMLResponse:
        records = [
            {**m, "used_by": platform.model_users(m["name"], m["version"])}
            for m in platform.list_models()
        ]
        return page("models.html", request, models=records)
