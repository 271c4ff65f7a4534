"""The console's pipelines pages: the list, each pipeline's graph drawn, its YAML with the
validator's diagnostics beside the lines they name, and the upload of a new definition (an
admin's), shown back with its diagnostics when it does not validate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dataflow.platform.console.svg import pipeline_graph
from dataflow.platform.errors import PlatformError

__all__ = ["add_pipeline_pages", "annotated"]

MAX_DEFINITION = 1024 * 1024  # an uploaded definition: a YAML file, not an archive


def annotated(yaml_text: str, diagnostics: list[dict[str, Any]]) -> dict[str, Any]:
    """The definition's lines, each with the diagnostics that name it (most serious first),
    and those that name no line of it."""
    order = {"error": 0, "warning": 1, "note": 2}
    by_line: dict[int, list[dict[str, Any]]] = {}
    elsewhere = []
    lines = yaml_text.splitlines() or [""]
    for d in sorted(diagnostics, key=lambda d: order.get(d["severity"], 3)):
        line = d.get("line")
        if isinstance(line, int) and 1 <= line <= len(lines):
            by_line.setdefault(line, []).append(d)
        else:
            elsewhere.append(d)
    rows = [{"n": n, "text": text, "diagnostics": by_line.get(n, [])}
            for n, text in enumerate(lines, start=1)]  # fmt: skip
    counts = {s: sum(d["severity"] == s for d in diagnostics) for s in order}
    return {"lines": rows, "elsewhere": elsewhere, "counts": counts}


def add_pipeline_pages(app: FastAPI, platform: Any, page: Callable[..., HTMLResponse]) -> None:
    """``/console/pipelines`` (list and upload) and ``/console/pipelines/NAME``."""

    def states(name: str, health: dict[str, Any] | None = None) -> dict[str, str]:
        """Each stage's state now (ok, degraded, broken...), as the health report says."""
        report = health if health is not None else platform.health()
        stages = report.get("pipelines", {}).get(name, {}).get("stages", {})
        return {stage: info.get("state", "") for stage, info in stages.items()}

    def listing(request: Request, status: int = 200, **upload: Any) -> HTMLResponse:
        rows, health = [], platform.health()
        for item in platform.list_pipelines():
            try:
                operators = platform.describe_pipeline(item["name"])["operators"]
                graph = pipeline_graph(operators, states(item["name"], health), item["name"])
            except PlatformError:  # not started: its reason is shown instead
                graph = None
            rows.append({**item, "graph": graph})
        return page("pipelines.html", request, status=status, pipelines=rows, **upload)

    @app.get("/console/pipelines", response_class=HTMLResponse, include_in_schema=False)
    def pipelines(request: Request) -> HTMLResponse:
        return listing(request)

    @app.post("/console/pipelines", response_class=HTMLResponse, include_in_schema=False)
    async def upload(request: Request) -> Response:
        async with request.form() as form:  # closed: an uploaded file's temporary goes
            given, text = form.get("file"), str(form.get("definition") or "")
            name = str(form.get("name") or "").strip() or None
            data = b""
            if given is not None and not isinstance(given, str) and given.filename:
                data = await given.read(MAX_DEFINITION + 1)
                if not data:
                    data = b" "  # an empty file: said below as nothing given
        # validating and starting a pipeline's workers blocks: off the event loop
        return await anyio.to_thread.run_sync(register, request, text, data, name)

    def register(request: Request, text: str, data: bytes, name: str | None) -> Response:
        if len(data) > MAX_DEFINITION:
            too_big = f"The file is larger than {MAX_DEFINITION // 1024} KiB: not a definition."
            return listing(request, 413, upload_error=too_big)
        if data:
            text = data.decode("utf-8", errors="replace")
        if not text.strip():
            return listing(request, 422, upload_error="Choose a YAML file or paste a definition.")
        try:
            checked = platform.diagnose_pipeline(yaml_text=text)
            if not checked["ok"]:
                return listing(request, 422, upload_error="The definition does not validate: "
                               "nothing was registered.", checked=annotated(text,
                               checked["diagnostics"]))  # fmt: skip
            made = platform.create_pipeline(text, name=name)
        except PlatformError as exc:
            return listing(request, exc.status, upload_error=exc.message)
        return RedirectResponse(f"/console/pipelines/{made['name']}", status_code=303)

    @app.get("/console/pipelines/{name}", response_class=HTMLResponse, include_in_schema=False)
    def pipeline(request: Request, name: str) -> HTMLResponse:
        try:
            described = platform.describe_pipeline(name)
            checked = platform.diagnose_pipeline(described["name"])
        except PlatformError as exc:
            return page("missing.html", request, status=exc.status, message=exc.message)
        graph = pipeline_graph(described["operators"], states(described["name"]),
                               title=described["name"])  # fmt: skip
        return page(
            "pipeline.html",
            request,
            pipeline=described,
            graph=graph,
            checked=annotated(checked["yaml"], checked["diagnostics"]),
        )
