"""The servicers of Clara's gRPC API over :class:`~dataflow.platform.core.Platform`, and the
server ``dataflow serve`` starts (:func:`serve`). See docs/platform.md, "Clara's gRPC API"."""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog

from dataflow import __version__
from dataflow.logs import scrub
from dataflow.machine import gpu_usage
from dataflow.platform.audit import CALLER
from dataflow.platform.auth import grpc_role
from dataflow.platform.clara.gen.nvidia.clara.platform import (
    clara_pb2,
    clara_pb2_grpc,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    payloads_pb2,
    payloads_pb2_grpc,
    pipelines_pb2,
    pipelines_pb2_grpc,
)
from dataflow.platform.clara.gen.nvidia.clara.platform.node_monitor import (
    metrics_pb2,
    metrics_pb2_grpc,
)
from dataflow.platform.errors import (
    JOB_STORE,
    MODEL_INVALID_ID,
    MODEL_UNSUPPORTED,
    PAYLOAD_UPLOAD,
    PIPELINE_DEFINITION,
    PIPELINE_STORE,
    Conflict,
    Invalid,
    PlatformError,
)

__all__ = ["ClaraServer", "serve"]

log = structlog.get_logger("dataflow.platform")

EPOCH_0001 = 62135596800  # seconds from 0001-01-01 to 1970-01-01: Clara's Timestamp
CHUNK = 64 * 1024  # Clara's client uploads in 64 KiB chunks; downloads go back the same way
STATE = {
    "PENDING": jobs_pb2.JOB_STATE_PENDING,
    "RUNNING": jobs_pb2.JOB_STATE_RUNNING,
    "STOPPED": jobs_pb2.JOB_STATE_STOPPED,
}
STATUS = {
    "HEALTHY": jobs_pb2.JOB_STATUS_HEALTHY,
    "FAULTED": jobs_pb2.JOB_STATUS_FAULTED,
    "CANCELED": jobs_pb2.JOB_STATUS_CANCELED,
    "EVICTED": jobs_pb2.JOB_STATUS_EVICTED,
    "TERMINATED": jobs_pb2.JOB_STATUS_TERMINATED,
}
PRIORITY = {
    "lower": jobs_pb2.JOB_PRIORITY_LOWER,
    "normal": jobs_pb2.JOB_PRIORITY_NORMAL,
    "higher": jobs_pb2.JOB_PRIORITY_HIGHER,
    "immediate": jobs_pb2.JOB_PRIORITY_IMMEDIATE,
}
OPERATOR = {
    "PENDING": jobs_pb2.JOB_OPERATOR_STATUS_PENDING,
    "RUNNING": jobs_pb2.JOB_OPERATOR_STATUS_RUNNING,
    "COMPLETED": jobs_pb2.JOB_OPERATOR_STATUS_COMPLETED,
    "FAULTED": jobs_pb2.JOB_OPERATOR_STATUS_FAULTED,
}
#: Clara JobState -> our states
STATES_OF = {
    jobs_pb2.JOB_STATE_PENDING: ("pending", "queued"),
    jobs_pb2.JOB_STATE_RUNNING: ("running",),
    jobs_pb2.JOB_STATE_STOPPED: ("succeeded", "failed", "cancelled"),
}


def stamp(seconds: float | None) -> common_pb2.Timestamp | None:
    """Clara's Timestamp (seconds since 0001-01-01) of a Unix time; None for none."""
    return common_pb2.Timestamp(value=int(seconds) + EPOCH_0001) if seconds else None


def iso(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else ""


def unix(timestamp: common_pb2.Timestamp) -> float | None:
    return timestamp.value - EPOCH_0001 if timestamp.value else None


def header(code: int = 0, *messages: str) -> common_pb2.ResponseHeader:
    return common_pb2.ResponseHeader(code=code, messages=list(messages))


def _failure(exc: BaseException, default: int) -> common_pb2.ResponseHeader:
    if isinstance(exc, PlatformError):
        return header(exc.code or default, exc.message)
    log.exception("clara_call_failed", error=repr(exc))
    return header(default, scrub(f"internal error: {type(exc).__name__}: {exc}") or "")


#: the token of the call this thread serves (set by TokenGuard before the servicer runs)
_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("clara_who", default="anonymous")


def _caller(context: Any) -> None:
    """The audit log's caller for this call: its token's name (or anonymous) and peer."""
    CALLER.set((_WHO.get(), context.peer(), "grpc"))


class TokenGuard(grpc.ServerInterceptor):
    """Every call needs the ``authorization`` metadata (``Bearer <token>``) of a token whose
    role allows it (:func:`dataflow.platform.auth.grpc_role`): UNAUTHENTICATED or
    PERMISSION_DENIED otherwise, with the reason."""

    def __init__(self, auth: Any) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        needed = grpc_role(details.method)
        given = dict(details.invocation_metadata or ()).get("authorization")

        def guard(context: Any) -> None:
            try:
                token = self.auth.check(given, needed)
            except PlatformError as exc:
                code = (grpc.StatusCode.UNAUTHENTICATED if exc.status == 401
                        else grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
                context.abort(code, exc.message)
            _WHO.set(token.name)

        def guarded(behaviour: Callable) -> Callable:
            def run(request: Any, context: Any) -> Any:
                guard(context)
                return behaviour(request, context)

            return run

        changes = {kind: guarded(getattr(handler, kind))
                   for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                   if getattr(handler, kind) is not None}  # fmt: skip
        return handler._replace(**changes)


def answers(response: Any, default: int) -> Callable:
    """A servicer method whose PlatformError (or any failure) becomes ``response`` with a
    ResponseHeader holding Clara's code and the message; works for streamed answers too.
    The audit log's caller is the peer."""

    def wrap(method: Callable) -> Callable:
        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def streamed(self, request, context):
                _caller(context)
                try:
                    yield from method(self, request, context)
                except Exception as exc:
                    yield response(header=_failure(exc, default))

            return streamed

        @functools.wraps(method)
        def unary(self, request, context):
            _caller(context)
            try:
                return method(self, request, context)
            except Exception as exc:
                return response(header=_failure(exc, default))

        return unary

    return wrap


def _id(identifier: common_pb2.Identifier, what: str, code: int) -> str:
    value = identifier.value.strip()
    if not value:
        raise Invalid(f"{what}: no id given", code=code)
    return value


def _chunks(data: bytes | Iterable[bytes]) -> Iterator[bytes]:
    for piece in [data] if isinstance(data, bytes) else data:
        for start in range(0, len(piece), CHUNK):
            yield piece[start : start + CHUNK]


# ---------------------------------------------------------------------- Clara


class Clara(clara_pb2_grpc.ClaraServicer):
    def __init__(self, platform: Any) -> None:
        self.platform = platform

    @answers(clara_pb2.ClaraVersionResponse, -1)
    def Version(self, request, context):
        numbers = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
        major, minor, patch = [*numbers, 0, 0, 0][:3]
        version = common_pb2.Version(major=major, minor=minor, patch=patch, label="dataflow")
        return clara_pb2.ClaraVersionResponse(header=header(), version=version)

    @answers(clara_pb2.ClaraStopResponse, -1)
    def Stop(self, request, context):
        return clara_pb2.ClaraStopResponse(
            header=header(
                -1,
                "stopping the platform over the API is refused: stop dataflow serve with its "
                "service manager (SIGTERM: jobs in flight get their shutdown grace)",
            )
        )

    @answers(clara_pb2.ClaraUtilizationResponse, -1)
    def Utilization(self, request, context):
        while True:
            metrics = []
            for gpu in gpu_usage():
                used, total = gpu["memory_used"], gpu["memory_total"]
                metrics.append(
                    clara_pb2.ClaraUtilizationResponse.GpuUtilization(
                        node_id="localhost",
                        pcie_id=gpu["index"],
                        compute_utilization=gpu["utilization"] * 100.0,
                        memory_free=max(0, total - used),
                        memory_used=used,
                        memory_utilization=100.0 * used / total if total else 0.0,
                        timestamp=stamp(time.time()),
                    )
                )
            yield clara_pb2.ClaraUtilizationResponse(header=header(), gpu_metrics=metrics)
            if not request.watch or not context.is_active():
                return
            time.sleep(1.0)


# ---------------------------------------------------------------------- Pipelines


def _definition(requests: Iterable[Any]) -> tuple[str, Any]:
    """The YAML text of a client-streamed definition (chunks of one path concatenate), and
    the first request (its id and metadata)."""
    first, parts = None, {}
    for request in requests:
        first = first or request
        path = request.definition.path or "pipeline.yaml"
        parts[path] = parts.get(path, "") + request.definition.content
    if first is None or not "".join(parts.values()).strip():
        raise Invalid("the pipeline definition is empty", code=PIPELINE_DEFINITION)
    if len(parts) > 1:
        raise Invalid(
            f"a pipeline is one YAML file; got {len(parts)}: {', '.join(parts)}",
            code=PIPELINE_DEFINITION,
        )
    return next(iter(parts.values())), first


def _dag(operators: list[dict[str, Any]]) -> list[pipelines_pb2.PipelinesDetailsResponse]:
    """Clara's pipeline DAG: the roots, each with the operators that take its output next."""
    Node = pipelines_pb2.PipelinesDetailsResponse.PipelineDagNode
    after = {op["name"]: op["after"] for op in operators}

    def node(name: str, seen: frozenset) -> Any:
        nexts = [n for n, before in after.items() if name in before and n not in seen]
        return Node(name=name, next=[node(n, seen | {n}) for n in nexts])

    return [node(name, frozenset({name})) for name, before in after.items() if not before]


class Pipelines(pipelines_pb2_grpc.PipelinesServicer):
    def __init__(self, platform: Any) -> None:
        self.platform = platform

    @answers(pipelines_pb2.PipelinesCreateResponse, PIPELINE_STORE)
    def Create(self, request_iterator, context):
        text, first = _definition(request_iterator)
        metadata = dict(first.metadata)
        try:
            made = self.platform.create_pipeline(text, None, metadata or None)
        except Conflict:
            # a script creating its pipeline at every run: the same definition is the same
            # pipeline (Clara made a second one); another one under that name is refused
            made = self._same(text)
        return pipelines_pb2.PipelinesCreateResponse(
            header=header(), pipeline_id=common_pb2.Identifier(value=made["id"])
        )

    def _same(self, text: str) -> dict[str, Any]:
        import yaml

        name = (yaml.safe_load(text) or {}).get("name")
        existing = self.platform.describe_pipeline(str(name))
        if existing["yaml"] != text:
            raise Conflict(
                f"a pipeline named {name!r} exists (id {existing['id']}) with another "
                "definition: update it, or give this one another name",
                code=PIPELINE_STORE,
            )
        return existing

    @answers(pipelines_pb2.PipelinesDetailsResponse, PIPELINE_STORE)
    def Details(self, request, context):
        described = self.platform.describe_pipeline(
            _id(request.pipeline_id, "pipeline", PIPELINE_STORE)
        )
        yield pipelines_pb2.PipelinesDetailsResponse(
            header=header(),
            pipeline_id=common_pb2.Identifier(value=described["id"]),
            name=described["name"],
            definition=pipelines_pb2.PipelineDefinitionFile(
                path="pipeline.yaml", content=described["yaml"]
            ),
            dag=_dag(described["operators"]),
            metadata=described["metadata"],
        )

    @answers(pipelines_pb2.PipelinesListResponse, PIPELINE_STORE)
    def List(self, request, context):
        Details = pipelines_pb2.PipelinesListResponse.PipelineDetails
        for pipeline in self.platform.list_pipelines():
            yield pipelines_pb2.PipelinesListResponse(
                header=header(),
                details=Details(
                    pipeline_id=common_pb2.Identifier(value=pipeline["id"]),
                    name=pipeline["name"],
                    metadata=pipeline["metadata"],
                ),
            )

    @answers(pipelines_pb2.PipelinesRemoveResponse, PIPELINE_STORE)
    def Remove(self, request, context):
        self.platform.remove_pipeline(_id(request.pipeline_id, "pipeline", PIPELINE_STORE))
        return pipelines_pb2.PipelinesRemoveResponse(header=header())

    @answers(pipelines_pb2.PipelinesUpdateResponse, PIPELINE_STORE)
    def Update(self, request_iterator, context):
        text, first = _definition(request_iterator)
        self.platform.update_pipeline(_id(first.pipeline_id, "pipeline", PIPELINE_STORE), text)
        return pipelines_pb2.PipelinesUpdateResponse(header=header())

    @answers(pipelines_pb2.PipelinesAddMetadataResponse, PIPELINE_STORE)
    def AddMetadata(self, request, context):
        key = _id(request.pipeline_id, "pipeline", PIPELINE_STORE)
        meta = self.platform.add_metadata("pipeline", key, dict(request.metadata))
        return pipelines_pb2.PipelinesAddMetadataResponse(
            header=header(), pipeline_id=request.pipeline_id, metadata=meta
        )

    @answers(pipelines_pb2.PipelinesRemoveMetadataResponse, PIPELINE_STORE)
    def RemoveMetadata(self, request, context):
        key = _id(request.pipeline_id, "pipeline", PIPELINE_STORE)
        meta = self.platform.remove_metadata("pipeline", key, list(request.keys))
        return pipelines_pb2.PipelinesRemoveMetadataResponse(
            header=header(), pipeline_id=request.pipeline_id, metadata=meta
        )


# ---------------------------------------------------------------------- Jobs


class Jobs(jobs_pb2_grpc.JobsServicer):
    def __init__(self, platform: Any) -> None:
        self.platform = platform

    @answers(jobs_pb2.JobsCreateResponse, JOB_STORE)
    def Create(self, request, context):
        priority = {v: k for k, v in PRIORITY.items()}.get(request.priority, "normal")
        job_id, payload_id = self.platform.create_job(
            _id(request.pipeline_id, "pipeline", PIPELINE_STORE),
            request.name or None,
            priority,
            dict(request.metadata) or None,
            [p.value for p in request.input_payloads],
        )
        return jobs_pb2.JobsCreateResponse(
            header=header(),
            job_id=common_pb2.Identifier(value=job_id),
            payload_id=common_pb2.Identifier(value=payload_id),
        )

    @answers(jobs_pb2.JobsStartResponse, JOB_STORE)
    def Start(self, request, context):
        status = self.platform.start_job(_id(request.job_id, "job", JOB_STORE))
        return jobs_pb2.JobsStartResponse(
            header=header(),
            state=STATE.get(status["clara_state"], 0),
            status=STATUS.get(status["clara_status"], 0),
            priority=PRIORITY.get(status["priority"], 0),
        )

    @answers(jobs_pb2.JobsStatusResponse, JOB_STORE)
    def Status(self, request, context):
        status = self.platform.job_status(_id(request.job_id, "job", JOB_STORE))
        Details = jobs_pb2.JobsStatusResponse.JobOperatorDetails
        Node = jobs_pb2.JobsStatusResponse.JobDagNode
        operators = [
            Details(name=op["name"], status=OPERATOR.get(op["status"], 0))
            for op in status["operators"]
        ]
        dag = []
        try:
            described = self.platform.describe_pipeline(status["pipeline"])
            dag = [
                Node(name=op["name"], input_dependencies=[Node(name=a) for a in op["after"]])
                for op in described["operators"]
            ]
        except PlatformError:
            pass  # the pipeline was removed since: the job's status stands without its DAG
        return jobs_pb2.JobsStatusResponse(
            header=header(),
            job_id=common_pb2.Identifier(value=status["id"]),
            pipeline_id=common_pb2.Identifier(value=status["pipeline_id"]),
            payload_id=common_pb2.Identifier(value=status["payload_id"] or ""),
            state=STATE.get(status["clara_state"], 0),
            status=STATUS.get(status["clara_status"], 0),
            name=status["name"],
            priority=PRIORITY.get(status["priority"], 0),
            created=stamp(status["created"]),
            started=stamp(status["started"]),
            stopped=stamp(status["finished"]),
            operator_details=operators,
            metadata=status["metadata"],
            dag=dag,
            messages=status["messages"],
            timestamp_created=iso(status["created"]),
            timestamp_started=iso(status["started"]),
            timestamp_stopped=iso(status["finished"]),
        )

    @answers(jobs_pb2.JobsListResponse, JOB_STORE)
    def List(self, request, context):
        f = request.filter
        states = sorted({s for state in f.has_state for s in STATES_OF.get(state, ())})
        statuses = {name for name, value in STATUS.items() if value in set(f.has_status)}
        jobs = self.platform.list_jobs(
            states=states,
            pipelines=[p.value for p in f.pipeline_id],
            created_after=unix(f.created_after),
            finished_before=unix(f.completed_before),
            limit=10000,
        )
        Details = jobs_pb2.JobsListResponse.JobDetails
        for job in jobs:
            if statuses and job["clara_status"] not in statuses:
                continue
            yield jobs_pb2.JobsListResponse(
                header=header(),
                job_details=Details(
                    job_id=common_pb2.Identifier(value=job["id"]),
                    payload_id=common_pb2.Identifier(value=job["payload_id"] or ""),
                    pipeline_id=common_pb2.Identifier(value=job["pipeline_id"]),
                    job_name=job["name"],
                    state=STATE.get(job["clara_state"], 0),
                    status=STATUS.get(job["clara_status"], 0),
                    priority=PRIORITY.get(job["priority"], 0),
                    created=stamp(job["created"]),
                    started=stamp(job["started"]),
                    stopped=stamp(job["finished"]),
                    timestamp_created=iso(job["created"]),
                    timestamp_started=iso(job["started"]),
                    timestamp_stopped=iso(job["finished"]),
                ),
            )

    @answers(jobs_pb2.JobsCancelResponse, JOB_STORE)
    def Cancel(self, request, context):
        status = self.platform.cancel_job(_id(request.job_id, "job", JOB_STORE), request.reason)
        return jobs_pb2.JobsCancelResponse(
            header=header(),
            job_id=common_pb2.Identifier(value=status["id"]),
            job_state=STATE.get(status["clara_state"], 0),
            job_status=STATUS.get(status["clara_status"], 0),
        )

    @answers(jobs_pb2.JobsReadLogsResponse, JOB_STORE)
    def ReadLogs(self, request, context):
        job_id = _id(request.job_id, "job", JOB_STORE)
        lines = self.platform.job_logs(job_id, request.operator_name or None)
        for start in range(0, max(len(lines), 1), 500):
            yield jobs_pb2.JobsReadLogsResponse(
                header=header(),
                job_id=request.job_id,
                operator_name=request.operator_name,
                logs=lines[start : start + 500],
            )

    @answers(jobs_pb2.JobsAddMetadataResponse, JOB_STORE)
    def AddMetadata(self, request, context):
        meta = self.platform.add_metadata(
            "job", _id(request.job_id, "job", JOB_STORE), dict(request.metadata)
        )
        return jobs_pb2.JobsAddMetadataResponse(
            header=header(), job_id=request.job_id, metadata=meta
        )

    @answers(jobs_pb2.JobsRemoveMetadataResponse, JOB_STORE)
    def RemoveMetadata(self, request, context):
        meta = self.platform.remove_metadata(
            "job", _id(request.job_id, "job", JOB_STORE), list(request.keys)
        )
        return jobs_pb2.JobsRemoveMetadataResponse(
            header=header(), job_id=request.job_id, metadata=meta
        )


# ---------------------------------------------------------------------- Payloads


def _file(entry: dict[str, Any]) -> payloads_pb2.PayloadFileDetails:
    return payloads_pb2.PayloadFileDetails(
        name=entry["name"], size=entry["size"], mode=entry["mode"]
    )


class Payloads(payloads_pb2_grpc.PayloadsServicer):
    def __init__(self, platform: Any) -> None:
        self.platform = platform

    @answers(payloads_pb2.PayloadsCreateResponse, PAYLOAD_UPLOAD)
    def Create(self, request, context):
        payload_id = self.platform.create_payload(dict(request.metadata) or None)
        return payloads_pb2.PayloadsCreateResponse(
            header=header(),
            payload_id=common_pb2.Identifier(value=payload_id),
            type=payloads_pb2.PAYLOAD_TYPE_REUSABLE,
        )

    @answers(payloads_pb2.PayloadsUploadResponse, PAYLOAD_UPLOAD)
    def Upload(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise Invalid("an upload with no message", code=PAYLOAD_UPLOAD)
        payload_id = _id(first.payload_id, "payload", PAYLOAD_UPLOAD)
        name = first.details.name
        if name.startswith("/") and not name.startswith("/input/"):
            name = name.lstrip("/")  # Clara's names start with '/': uploads go to the input

        def data() -> Iterator[bytes]:
            if first.data:
                yield first.data
            for request in request_iterator:
                if request.data:
                    yield request.data

        done = self.platform.upload(payload_id, name, data())
        return payloads_pb2.PayloadsUploadResponse(header=header(), details=_file(done))

    @answers(payloads_pb2.PayloadsDetailsResponse, PAYLOAD_UPLOAD)
    def Details(self, request, context):
        details = self.platform.payload_details(_id(request.payload_id, "payload", PAYLOAD_UPLOAD))
        kind = (
            payloads_pb2.PAYLOAD_TYPE_PIPELINE
            if details["type"] == "PIPELINE"
            else payloads_pb2.PAYLOAD_TYPE_REUSABLE
        )
        common = {
            "header": header(),
            "payload_id": request.payload_id,
            "type": kind,
            "job_id": common_pb2.Identifier(value=details["job_id"] or ""),
            "metadata": details["metadata"],
        }
        if not details["files"]:
            yield payloads_pb2.PayloadsDetailsResponse(**common)
        for entry in details["files"]:
            yield payloads_pb2.PayloadsDetailsResponse(file=_file(entry), **common)

    @answers(payloads_pb2.PayloadsDownloadResponse, PAYLOAD_UPLOAD)
    def Download(self, request, context):
        payload_id = _id(request.payload_id, "payload", PAYLOAD_UPLOAD)
        size, chunks = self.platform.download(payload_id, request.name)
        details = payloads_pb2.PayloadFileDetails(name=request.name, size=size, mode=0o644)
        sent = False
        for chunk in _chunks(chunks):
            yield payloads_pb2.PayloadsDownloadResponse(
                header=header(), details=details, data=chunk
            )
            sent = True
        if not sent:  # an empty file: its details all the same
            yield payloads_pb2.PayloadsDownloadResponse(header=header(), details=details)

    @answers(payloads_pb2.PayloadsRemoveResponse, PAYLOAD_UPLOAD)
    def Remove(self, request, context):
        payload_id = _id(request.payload_id, "payload", PAYLOAD_UPLOAD)
        name = (
            request.name
            if request.name.startswith("/input/")
            else "/input/" + request.name.lstrip("/")
        )
        self.platform.remove_file(payload_id, name)
        return payloads_pb2.PayloadsRemoveResponse(header=header())

    @answers(payloads_pb2.PayloadsDeleteResponse, PAYLOAD_UPLOAD)
    def Delete(self, request, context):
        self.platform.delete_payload(_id(request.payload_id, "payload", PAYLOAD_UPLOAD))
        return payloads_pb2.PayloadsDeleteResponse(header=header())

    @answers(payloads_pb2.PayloadsAddMetadataResponse, PAYLOAD_UPLOAD)
    def AddMetadata(self, request, context):
        meta = self.platform.add_metadata(
            "payload", _id(request.payload_id, "payload", PAYLOAD_UPLOAD), dict(request.metadata)
        )
        return payloads_pb2.PayloadsAddMetadataResponse(
            header=header(), payload_id=request.payload_id, metadata=meta
        )

    @answers(payloads_pb2.PayloadsRemoveMetadataResponse, PAYLOAD_UPLOAD)
    def RemoveMetadata(self, request, context):
        meta = self.platform.remove_metadata(
            "payload", _id(request.payload_id, "payload", PAYLOAD_UPLOAD), list(request.keys)
        )
        return payloads_pb2.PayloadsRemoveMetadataResponse(
            header=header(), payload_id=request.payload_id, metadata=meta
        )


# ---------------------------------------------------------------------- Models

_NO_CATALOGS = (
    "model catalogs and instances are not part of dataflow: a pipeline names its "
    "model by name and version (models:/NAME/VERSION) and loads it itself"
)


def _model(record: dict[str, Any]) -> models_pb2.ModelDetails:
    metadata = {
        **record.get("metadata", {}),
        "version": str(record["version"]),
        "format": record["type"],
        "sha256": record["sha256"],
    }
    return models_pb2.ModelDetails(
        model_id=common_pb2.Identifier(value=record["id"]),
        name=record["name"],
        type=models_pb2.MODEL_TYPE_UNKNOWN,
        metadata=metadata,
    )


class Models(models_pb2_grpc.ModelsServicer):
    """Clara's model repository over ours (dataflow.models): list, upload (a model file, or a
    tar of a model folder; as the next version of its name), download, delete, metadata.
    Catalogs and instances have no counterpart: those calls answer an error."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform

    def _record(self, identifier: common_pb2.Identifier) -> dict[str, Any]:
        return self.platform.model_by_id(_id(identifier, "model", MODEL_INVALID_ID))

    @answers(models_pb2.ModelsListModelsResponse, MODEL_INVALID_ID)
    def ListModels(self, request, context):
        yield models_pb2.ModelsListModelsResponse(
            header=header(), models=[_model(r) for r in self.platform.list_models()]
        )

    @answers(models_pb2.ModelsUploadModelResponse, MODEL_INVALID_ID)
    def UploadModel(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.details.name:
            raise Invalid(
                "a model upload names its model in its first message's details",
                code=MODEL_INVALID_ID,
            )
        rest = (request.data for request in request_iterator)
        start = first.data[:512]  # Clara's client sends 64 KiB chunks: the tar header is here
        archive = start[:2] == b"\x1f\x8b" or start[257:262] == b"ustar"
        meta = dict(first.details.metadata)
        version = meta.pop("version", None)
        record = self.platform.upload_model(
            first.details.name,
            version,
            _prepend(first.data, rest),
            filename=meta.pop("file", None),
            archive=archive,
            metadata=meta or None,
        )
        return models_pb2.ModelsUploadModelResponse(header=header(), details=_model(record))

    @answers(models_pb2.ModelsDownloadModelResponse, MODEL_INVALID_ID)
    def DownloadModel(self, request, context):
        record = self._record(request.model_id)
        _, _, _, chunks = self.platform.download_model(record["name"], record["version"])
        details = _model(record)
        for chunk in _chunks(chunks):
            yield models_pb2.ModelsDownloadModelResponse(
                header=header(), details=details, data=chunk
            )

    @answers(models_pb2.ModelsDeleteModelResponse, MODEL_INVALID_ID)
    def DeleteModel(self, request, context):
        record = self._record(request.model_id)
        self.platform.delete_model(record["name"], record["version"])
        return models_pb2.ModelsDeleteModelResponse(header=header(), model_id=request.model_id)

    @answers(models_pb2.ModelsAddMetadataResponse, MODEL_INVALID_ID)
    def AddMetadata(self, request, context):
        record = self._record(request.model_id)
        values = {**record.get("metadata", {}), **dict(request.metadata)}
        record = self.platform.set_model_metadata(record["name"], record["version"], values)
        return models_pb2.ModelsAddMetadataResponse(
            header=header(), model_id=request.model_id, metadata=record["metadata"]
        )

    @answers(models_pb2.ModelsRemoveMetadataResponse, MODEL_INVALID_ID)
    def RemoveMetadata(self, request, context):
        record = self._record(request.model_id)
        values = {k: v for k, v in record.get("metadata", {}).items() if k not in request.keys}
        record = self.platform.set_model_metadata(record["name"], record["version"], values)
        return models_pb2.ModelsRemoveMetadataResponse(
            header=header(), model_id=request.model_id, metadata=record["metadata"]
        )

    def _refuse(response: Any, streamed: bool = False) -> Callable:
        def refused(self, request, context):
            return response(header=header(MODEL_UNSUPPORTED, _NO_CATALOGS))

        def refused_stream(self, request, context):
            yield response(header=header(MODEL_UNSUPPORTED, _NO_CATALOGS))

        return refused_stream if streamed else refused

    CreateCatalog = _refuse(models_pb2.ModelsCreateCatalogResponse)
    CreateInstance = _refuse(models_pb2.ModelsCreateInstanceResponse)
    DeleteCatalog = _refuse(models_pb2.ModelsDeleteCatalogResponse)
    DeleteInstance = _refuse(models_pb2.ModelsDeleteInstanceResponse)
    ListCatalogs = _refuse(models_pb2.ModelsListCatalogsResponse, streamed=True)
    ListInstances = _refuse(models_pb2.ModelsListInstancesResponse, streamed=True)
    ReadCatalog = _refuse(models_pb2.ModelsReadCatalogResponse, streamed=True)
    ReadInstance = _refuse(models_pb2.ModelsReadInstanceResponse, streamed=True)
    UpdateCatalog = _refuse(models_pb2.ModelsUpdateCatalogResponse)
    UpdateInstance = _refuse(models_pb2.ModelsUpdateInstanceResponse)


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    for chunk in rest:
        if chunk:
            yield chunk


# ---------------------------------------------------------------------- Monitor


class Monitor(metrics_pb2_grpc.MonitorServicer):
    def __init__(self, platform: Any) -> None:
        self.platform = platform

    @answers(metrics_pb2.MonitorGpuMetricsResponse, -1)
    def GpuMetrics(self, request, context):
        details = []
        for gpu in gpu_usage():
            used, total = gpu["memory_used"], gpu["memory_total"]
            data = metrics_pb2.GpuDetails.GpuMetrics(
                memory_utilization=100.0 * used / total if total else 0.0,
                gpu_utilization=gpu["utilization"] * 100.0,
                free_gpu_memory=total - used,
                used_gpu_memory=used,
            )
            details.append(
                metrics_pb2.GpuDetails(
                    device_id=gpu["index"], data=data, timestamp=stamp(time.time())
                )
            )
        yield metrics_pb2.MonitorGpuMetricsResponse(header=header(), gpu_details=details)


# ---------------------------------------------------------------------- the server


class ClaraServer:
    """A ``grpc.server`` on a bounded thread pool serving the six services; ``port``: the
    port it listens on."""

    def __init__(self, platform: Any, host: str, port: int, *, workers: int = 16) -> None:
        auth = getattr(platform, "auth", None)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clara-grpc"),
            interceptors=[TokenGuard(auth)] if auth is not None else None,
            maximum_concurrent_rpcs=workers * 8,  # beyond: RESOURCE_EXHAUSTED, not a queue
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        clara_pb2_grpc.add_ClaraServicer_to_server(Clara(platform), self.server)
        pipelines_pb2_grpc.add_PipelinesServicer_to_server(Pipelines(platform), self.server)
        jobs_pb2_grpc.add_JobsServicer_to_server(Jobs(platform), self.server)
        payloads_pb2_grpc.add_PayloadsServicer_to_server(Payloads(platform), self.server)
        models_pb2_grpc.add_ModelsServicer_to_server(Models(platform), self.server)
        metrics_pb2_grpc.add_MonitorServicer_to_server(Monitor(platform), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = platform.config.tls
        try:
            if tls:  # the REST port's certificate and key
                credentials = grpc.ssl_server_credentials(
                    [(tls[1].read_bytes(), tls[0].read_bytes())]
                )
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PlatformError(f"api.grpc-port: cannot listen on {address} ({exc})") from None
        if not self.port:
            raise PlatformError(f"api.grpc-port: cannot listen on {address} (in use?)")
        self.server.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop: calls in progress get ``grace`` seconds, then are cancelled."""
        self.server.stop(grace).wait(grace + 5.0)


def serve(platform: Any, host: str, port: int) -> ClaraServer:
    """Serve Clara's gRPC API on ``host:port`` (0: a free port; ``.port`` says which)."""
    server = ClaraServer(platform, host, port)
    log.info("clara_grpc_listening", host=host, port=server.port)
    return server
