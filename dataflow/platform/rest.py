"""The REST API of ``dataflow serve`` (FastAPI, served by uvicorn on a thread of the service).

Every route calls :class:`dataflow.platform.core.Platform`; a
:class:`~dataflow.platform.errors.PlatformError` becomes its HTTP status with a JSON body
``{"error": KIND, "message": ..., "code": CLARA_CODE}``. Blocking work runs on Starlette's
bounded thread pool; uploads stream to disk as they arrive, downloads stream from disk.
The routes are listed in docs/platform.md and served as OpenAPI at ``/openapi.json`` (a
docs page at ``/docs``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, Field

from dataflow import __version__
from dataflow.platform.audit import CALLER
from dataflow.platform.auth import CONSOLE_OPEN, COOKIE, OPEN_PATHS, Forbidden, rest_role
from dataflow.platform.console import add_console
from dataflow.platform.core import Platform
from dataflow.platform.errors import Invalid, PlatformError
from dataflow.platform.modelstore import add_routes as add_model_routes
from dataflow.platform.payloads import body_chunks
from dataflow.platform.trace import add_routes as add_trace_routes

__all__ = ["RestServer", "add_connector_routes", "build_app", "listen", "serve"]

PREFIX = "/api/v1"


class Order(BaseModel):
    study: str = Field(description="The Study Instance UID to fetch.")
    source: str = Field(description="The PACS to fetch it from: a name of dicom.sources.")
    series: str | None = Field(None, description="One series of the study only.")


class JobCreate(BaseModel):
    pipeline: str = Field(description="The pipeline's name or 32-hex id.")
    name: str | None = Field(None, description="A name for people (default: PIPELINE-xxxxxxxx).")
    priority: str = Field("normal", description="lower, normal, higher or immediate.")
    metadata: dict[str, str] | None = None
    input_payloads: list[str] = Field(
        default_factory=list, description="Payloads of no job whose files are copied in."
    )
    order: Order | None = Field(
        None,
        description="Run the pipeline on a study from a PACS: the job is started at once "
        "and its first stage fetches the study (input/order.json).",
    )


class PipelineCreate(BaseModel):
    definition: str = Field(description="The pipeline's YAML text.")
    name: str | None = Field(None, description="Default: the definition's name.")
    metadata: dict[str, str] | None = None


class PipelineUpdate(BaseModel):
    definition: str = Field(description="The pipeline's new YAML text.")


class Cancel(BaseModel):
    reason: str = ""


def _kind(collection: str) -> str:
    kinds = {"pipelines": "pipeline", "jobs": "job", "payloads": "payload"}
    if collection not in kinds:
        raise Invalid(f"metadata of {collection!r}: of pipelines, jobs or payloads")
    return kinds[collection]


def _download(size: int, chunks: Any, name: str, figures: ApiMetrics) -> StreamingResponse:
    filename = name.rsplit("/", 1)[-1].replace('"', "")

    def counted():
        for chunk in chunks:
            figures.bytes.labels("download").inc(len(chunk))
            yield chunk

    return StreamingResponse(
        counted(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size),
                 "Content-Disposition": f'attachment; filename="{filename}"'},
    )  # fmt: skip


class ApiMetrics:
    """The API's own figures, in this process (prometheus-client): requests by method, route
    and status, their latency, bytes uploaded and downloaded, event streams open."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dataflow_api_requests",
            "REST requests answered",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.seconds = Histogram("dataflow_api_request_seconds", "REST request latency",
                                 ("method", "route"), registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1, 2.5, 10))  # fmt: skip
        self.bytes = Counter("dataflow_api_payload_bytes", "payload bytes through the API",
                             ("direction",), registry=self.registry)  # fmt: skip
        self.streams = Gauge("dataflow_api_event_streams", "server-sent event streams open",
                             registry=self.registry)  # fmt: skip

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _Measure:
    """Pure ASGI middleware counting each request in :class:`ApiMetrics` (a streamed body
    passes through untouched)."""

    def __init__(self, app: Any, figures: ApiMetrics) -> None:
        self.app, self.figures = app, figures

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), [500]
        peer = scope.get("client") or ("?", 0)
        CALLER.set(("anonymous", str(peer[0]), "rest"))  # for the audit log

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # a template: no ids
            method = scope.get("method", "?")
            self.figures.requests.labels(method, route, str(status[0])).inc()
            self.figures.seconds.labels(method, route).observe(time.perf_counter() - began)


class _Guard:
    """Pure ASGI middleware: every HTTP call but /healthz and /readyz needs a token whose role
    allows it (:mod:`dataflow.platform.auth`); refused with 401 or 403 and a JSON body. The
    audit log's "who" becomes the token's name, and the token is the request's
    ``state.token`` (the console shows what its role allows).

    A browser signed in on the console's login page sends the token as the ``dataflow_token``
    cookie (HttpOnly, SameSite=Strict) instead of a header; a call that changes something
    with that cookie must come from the console's own origin (its ``Origin`` header, when
    there is one, names this host). A console page asked for without a token redirects to the
    login page instead of answering 401."""

    def __init__(self, app: Any, auth: Any) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(CONSOLE_OPEN):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        method = scope.get("method", "GET")
        cookie = "" if given else console_cookie(headers.get(b"cookie", b"").decode("latin-1"))
        try:
            if cookie:
                given = f"Bearer {cookie}"
                if method not in ("GET", "HEAD", "OPTIONS") and not same_origin(headers):
                    raise Forbidden("a change asked with the console's cookie must come from "
                                    "the console's own pages")  # fmt: skip
            token = self.auth.check(given, rest_role(method, path))
        except PlatformError as exc:
            if exc.status == 401 and method == "GET" and (path == "/" or path.startswith(
                    "/console/")):  # fmt: skip
                target = path + (f"?{scope['query_string'].decode('latin-1')}"
                                 if scope.get("query_string") else "")  # fmt: skip
                response: Response = RedirectResponse(
                    f"/console/login?{urlencode({'next': target})}", status_code=303
                )
            else:
                body = {"error": exc.kind, "message": exc.message, "code": exc.code}
                response = JSONResponse(body, status_code=exc.status,
                                        headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        peer = scope.get("client") or ("?", 0)
        CALLER.set((token.name, str(peer[0]), "rest"))
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


def console_cookie(header: str) -> str:
    """The console's token from a ``Cookie`` header, or ""."""
    jar = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return ""
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else ""


def same_origin(headers: dict[bytes, bytes]) -> bool:
    """Whether a browser's request comes from this host's pages: its ``Origin`` (when it
    sends one) names the host it asked."""
    origin = headers.get(b"origin")
    if origin is None:
        return True  # not sent by a browser's cross-site request (SameSite keeps the cookie)
    return urlsplit(origin.decode("latin-1")).netloc == headers.get(b"host", b"").decode("latin-1")


def build_app(platform: Platform) -> FastAPI:
    """The FastAPI application over ``platform``."""
    figures = ApiMetrics()
    app = FastAPI(
        title="dataflow platform API",
        version=__version__,
        description="Pipelines, jobs and payloads of a running dataflow serve (docs/platform.md).",
    )

    if platform.auth is not None:
        app.add_middleware(_Guard, auth=platform.auth)
    app.add_middleware(_Measure, figures=figures)  # outermost: counts refusals too

    @app.exception_handler(PlatformError)
    async def platform_error(request: Request, exc: PlatformError) -> JSONResponse:
        body = {"error": exc.kind, "message": exc.message, "code": exc.code}
        return JSONResponse(body, status_code=exc.status)

    # ------------------------------------------------------------------ health

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The API answers (the process is alive)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Every pipeline's workers are serving: 200, else 503 with the pipelines that are not."""
        service = platform.service
        waiting = [
            name for name in list(service.pipelines)
            if name not in service.feeds or not service.threads.get(name, threading).is_alive()
        ]  # fmt: skip
        if waiting or service.jobs is None:
            return JSONResponse({"status": "not ready", "pipelines": waiting}, status_code=503)
        return JSONResponse({"status": "ready", "pipelines": list(service.pipelines)})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """The service's Prometheus metrics (``STATE/metrics.prom``: pipelines, stages, jobs,
        exports, DICOM) and the API's own (``dataflow_api_*``), in the text format."""
        path = platform.state / "metrics.prom"
        try:
            text = path.read_text()
        except OSError:
            text = ""
        text += figures.text()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(f"{PREFIX}/health", tags=["health"])
    def health() -> dict[str, Any]:
        """The service at a glance: verdict (0 healthy, 1 problems, 2 stale), problems, each
        pipeline's stages and the jobs in flight with the stage each is at."""
        return platform.health()

    # ------------------------------------------------------------------ pipelines

    @app.get(f"{PREFIX}/pipelines", tags=["pipelines"])
    def list_pipelines() -> list[dict[str, Any]]:
        return platform.list_pipelines()

    @app.post(f"{PREFIX}/pipelines", tags=["pipelines"], status_code=201)
    def create_pipeline(body: PipelineCreate) -> dict[str, Any]:
        """Register a pipeline (validated; its workers start before this returns)."""
        return platform.create_pipeline(body.definition, body.name, body.metadata)

    @app.get(f"{PREFIX}/pipelines/{{pipeline}}", tags=["pipelines"])
    def describe_pipeline(pipeline: str) -> dict[str, Any]:
        return platform.describe_pipeline(pipeline)

    @app.put(f"{PREFIX}/pipelines/{{pipeline}}", tags=["pipelines"])
    def update_pipeline(pipeline: str, body: PipelineUpdate) -> dict[str, Any]:
        """Replace a registered pipeline's definition (no job of it in flight)."""
        return platform.update_pipeline(pipeline, body.definition)

    @app.delete(f"{PREFIX}/pipelines/{{pipeline}}", tags=["pipelines"], status_code=204)
    def remove_pipeline(pipeline: str) -> Response:
        platform.remove_pipeline(pipeline)
        return Response(status_code=204)

    # ------------------------------------------------------------------ jobs

    @app.post(f"{PREFIX}/jobs", tags=["jobs"], status_code=201)
    def create_job(body: JobCreate) -> dict[str, Any]:
        """A pending job and its empty payload: upload files, then start it. With an
        ``order``, the job holds ``input/order.json`` and is started at once."""
        order = body.order.model_dump(exclude_none=True) if body.order is not None else None
        job_id, payload_id = platform.create_job(body.pipeline, body.name, body.priority,
                                                 body.metadata, body.input_payloads,
                                                 order=order)  # fmt: skip
        if order is None:
            return {"job_id": job_id, "payload_id": payload_id}
        state = platform.start_job(job_id)["state"]
        return {"job_id": job_id, "payload_id": payload_id, "state": state}

    @app.get(f"{PREFIX}/jobs", tags=["jobs"])
    def list_jobs(
        state: list[str] = Query(default=[]),
        pipeline: list[str] = Query(default=[]),
        created_after: float | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        called_ae: str | None = Query(None, description="Only jobs received by this AE title."),
        find: str | None = Query(
            None,
            description="An accession number, a study/series/instance UID, a job id "
            "(8 characters or more), name or payload id.",
        ),
    ) -> list[dict[str, Any]]:
        """Jobs from DICOM and the API, newest first; state and pipeline repeatable."""
        return platform.list_jobs(states=state, pipelines=pipeline, created_after=created_after,
                                  finished_before=finished_before, limit=limit,
                                  called_ae=called_ae, find=find)  # fmt: skip

    @app.get(f"{PREFIX}/jobs/{{job_id}}", tags=["jobs"])
    def job_status(job_id: str) -> dict[str, Any]:
        return platform.job_status(job_id)

    @app.post(f"{PREFIX}/jobs/{{job_id}}/start", tags=["jobs"])
    def start_job(job_id: str) -> dict[str, Any]:
        return platform.start_job(job_id)

    @app.post(f"{PREFIX}/jobs/{{job_id}}/cancel", tags=["jobs"])
    def cancel_job(job_id: str, body: Cancel | None = None) -> dict[str, Any]:
        return platform.cancel_job(job_id, body.reason if body else "")

    @app.post(f"{PREFIX}/jobs/{{job_id}}/retry", tags=["jobs"])
    def retry_job(job_id: str) -> dict[str, Any]:
        return platform.retry_job(job_id)

    @app.get(f"{PREFIX}/jobs/{{job_id}}/logs", tags=["jobs"])
    def job_logs(job_id: str, operator: str | None = None) -> dict[str, Any]:
        return {"job_id": job_id, "operator": operator,
                "logs": platform.job_logs(job_id, operator)}  # fmt: skip

    @app.get(f"{PREFIX}/jobs/{{job_id}}/files", tags=["jobs"])
    def job_files(job_id: str) -> list[dict[str, Any]]:
        """A job's files (also of jobs from DICOM): /input/..., /operators/OP/..."""
        return platform.job_files(job_id)

    @app.get(f"{PREFIX}/jobs/{{job_id}}/files/{{name:path}}", tags=["jobs"])
    def job_file(job_id: str, name: str) -> StreamingResponse:
        size, chunks = platform.download_job_file(job_id, "/" + name)
        return _download(size, chunks, name, figures)

    @app.get(f"{PREFIX}/jobs/{{job_id}}/outputs.zip", tags=["jobs"])
    def job_outputs(job_id: str) -> StreamingResponse:
        """Every file the job's operators wrote, as one ZIP (streamed; the console's download
        button)."""
        chunks = platform.job_outputs_zip(job_id)

        def counted():
            for chunk in chunks:
                figures.bytes.labels("download").inc(len(chunk))
                yield chunk

        disposition = f'attachment; filename="job-{job_id}-outputs.zip"'
        return StreamingResponse(counted(), media_type="application/zip",
                                 headers={"Content-Disposition": disposition})  # fmt: skip

    # ------------------------------------------------------------------ payloads

    @app.post(f"{PREFIX}/payloads", tags=["payloads"], status_code=201)
    def create_payload(metadata: dict[str, str] | None = Body(default=None)) -> dict[str, str]:
        """A payload of no job (Clara's reusable payload)."""
        return {"payload_id": platform.create_payload(metadata)}

    @app.get(f"{PREFIX}/payloads/{{payload_id}}", tags=["payloads"])
    def payload_details(payload_id: str) -> dict[str, Any]:
        return platform.payload_details(payload_id)

    @app.delete(f"{PREFIX}/payloads/{{payload_id}}", tags=["payloads"], status_code=204)
    def delete_payload(payload_id: str) -> Response:
        platform.delete_payload(payload_id)
        return Response(status_code=204)

    @app.get(f"{PREFIX}/payloads/{{payload_id}}/files", tags=["payloads"])
    def payload_files(payload_id: str) -> list[dict[str, Any]]:
        return platform.payload_files(payload_id)

    @app.put(f"{PREFIX}/payloads/{{payload_id}}/files/{{name:path}}", tags=["payloads"],
             status_code=201)  # fmt: skip
    async def upload(payload_id: str, name: str, request: Request) -> dict[str, Any]:
        """Upload one file: the raw request body, streamed to disk, under ``input/``
        (``PUT .../files/input/series1/1.dcm``); visible once complete."""
        if not name.startswith("input/"):
            raise Invalid(f"payload file {name!r}: files are uploaded under input/ "
                          "(e.g. input/series1/slice001.dcm)")  # fmt: skip
        chunks = body_chunks(request, figures.bytes.labels("upload"))
        return await anyio.to_thread.run_sync(
            platform.upload, payload_id, name[len("input/") :], chunks
        )

    @app.delete(f"{PREFIX}/payloads/{{payload_id}}/files/{{name:path}}", tags=["payloads"],
                status_code=204)  # fmt: skip
    def remove_file(payload_id: str, name: str) -> Response:
        """Remove one uploaded file (``input/...``) before its job starts or after it ended."""
        platform.remove_file(payload_id, "/" + name)
        return Response(status_code=204)

    @app.get(f"{PREFIX}/payloads/{{payload_id}}/files/{{name:path}}", tags=["payloads"])
    def download(payload_id: str, name: str) -> StreamingResponse:
        size, chunks = platform.download(payload_id, "/" + name)
        return _download(size, chunks, name, figures)

    @app.get(f"{PREFIX}/audit", tags=["health"])
    def audit(limit: int = Query(100, ge=1, le=10000)) -> list[dict[str, Any]]:
        """The last entries of the audit log (every change: who, when, from where, what)."""
        return platform.audit.tail(limit)

    # ------------------------------------------------------------------ DICOM exports

    @app.get(f"{PREFIX}/dicom/studies", tags=["dicom"])
    def dicom_studies(
        state: str | None = Query(None, description="pending, complete, dispatched, ignored "
                                  "or reclaimed"),
        limit: int = Query(200, ge=1, le=10000),
    ) -> list[dict[str, Any]]:  # fmt: skip
        """What the DICOM receivers hold, newest first: each group (study or series) with
        who sent it, its state, instance count and the jobs made of it."""
        return platform.dicom_studies(state, limit)

    @app.get(f"{PREFIX}/dicom/associations", tags=["dicom"])
    def dicom_associations(limit: int = Query(100, ge=1, le=10000)) -> list[dict[str, Any]]:
        """The receivers' last associations, newest first: calling and called AE titles,
        peer, outcome (released, aborted, rejected and why), instances stored and failed."""
        return platform.dicom_associations(limit)

    @app.get(f"{PREFIX}/exports", tags=["dicom"])
    def exports(state: str | None = None) -> list[dict[str, Any]]:
        """The export outbox: results waiting, sent and dead-lettered, per destination."""
        return platform.exports(state)

    @app.post(f"{PREFIX}/exports/{{task_id}}/resend", tags=["dicom"])
    def resend(task_id: str) -> dict[str, str]:
        """Send a dead letter again."""
        return {"task_id": task_id, "message": platform.resend_export(task_id)}

    # ------------------------------------------------------------------ metadata

    @app.get(f"{PREFIX}/{{collection}}/{{item}}/metadata", tags=["metadata"])
    def metadata(collection: str, item: str) -> dict[str, str]:
        return platform.metadata(_kind(collection), item)

    @app.post(f"{PREFIX}/{{collection}}/{{item}}/metadata", tags=["metadata"])
    def add_metadata(collection: str, item: str, values: dict[str, str]) -> dict[str, str]:
        """Add or replace entries (Clara's limits: key 128 B, value 256 B, 4 MiB in all)."""
        return platform.add_metadata(_kind(collection), item, values)

    @app.delete(f"{PREFIX}/{{collection}}/{{item}}/metadata", tags=["metadata"])
    def remove_metadata(
        collection: str, item: str, key: list[str] = Query(default=[])
    ) -> dict[str, str]:
        return platform.remove_metadata(_kind(collection), item, key)

    add_model_routes(app, platform, PREFIX, figures)
    add_trace_routes(app, platform, PREFIX)
    add_connector_routes(app, platform)
    add_console(app, platform)  # the pages at / (dataflow.platform.console)

    # ------------------------------------------------------------------ events

    @app.get(f"{PREFIX}/events", tags=["jobs"])
    async def events(request: Request) -> StreamingResponse:
        """Server-sent events: one ``job`` event per change of a job's state (JSON: job_id,
        pipeline, state, at), one ``export`` event per step of a result's export (task_id,
        destination, state, at), a comment every 15 s to keep the connection open."""
        subscription = platform.subscribe()
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        # woken by the publishing thread: no thread is held per open stream, and a client
        # that goes away ends its stream at once (Starlette cancels it)
        subscription.on_event(lambda: loop.call_soon_threadsafe(wake.set))

        async def stream():
            figures.streams.inc()
            try:
                yield ": connected\n\n"
                while True:
                    wake.clear()
                    event = subscription.poll()
                    if event is None:
                        with anyio.move_on_after(15.0) as quiet:
                            await wake.wait()
                        if quiet.cancelled_caught:
                            yield ": keep-alive\n\n"
                    elif event.get("event") == "closed":
                        return
                    else:
                        kind = event.get("event", "job")  # shared by every stream: read only
                        data = json.dumps({k: v for k, v in event.items() if k != "event"})
                        yield f"event: {kind}\ndata: {data}\n\n"
            finally:
                figures.streams.dec()
                subscription.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    return app


def add_connector_routes(app: FastAPI, platform: Platform) -> None:
    """The HTTP routes connectors offer (their optional ``http_routes()``: Starlette routes,
    such as the DICOM connector's STOW-RS), mounted as they are: behind the same tokens and
    measured like every route. A path the API already serves is refused, naming both."""
    taken = {getattr(route, "path", None): "the API" for route in app.router.routes}
    for name, connector in list(platform.service.connectors.items()):
        offer = getattr(connector, "http_routes", None)  # duck-typed: dataflow knows none
        for route in offer() if offer is not None else []:
            path = getattr(route, "path", None)
            if path in taken:
                raise PlatformError(f"connector {name!r}: the route {path} is already served "
                                    f"by {taken[path]}")  # fmt: skip
            taken[path] = f"connector {name!r}"
            app.router.routes.append(route)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port) and listening: taken at the service's
    start, before any worker starts, so that a port in use refuses the start at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PlatformError(
            f"api.rest-port: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    if sock.family in (socket.AF_INET, socket.AF_INET6):  # inherited by each connection:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed ACKs
    sock.listen(128)
    return sock


class RestServer:
    """uvicorn serving the app on a thread, on ``sock`` (see :func:`listen`); ``port``: the
    port it listens on."""

    def __init__(self, platform: Platform, sock: socket.socket) -> None:
        import uvicorn

        self.sock = sock
        self.port = sock.getsockname()[1]
        tls = platform.config.tls  # (certificate chain, key) files: https
        config = uvicorn.Config(build_app(platform), log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5,
                                ssl_certfile=str(tls[0]) if tls else None,
                                ssl_keyfile=str(tls[1]) if tls else None)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="rest api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PlatformError(f"the REST API did not start on port {self.port}")
            time.sleep(0.01)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(platform: Platform, sock: socket.socket) -> RestServer:
    """Serve the REST API on ``sock`` (from :func:`listen`)."""
    return RestServer(platform, sock)
