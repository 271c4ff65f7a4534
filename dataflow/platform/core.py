"""The platform core: pipelines, jobs, payloads and metadata of a running service, for the
REST API (:mod:`dataflow.platform.rest`) and the Clara-compatible gRPC API alike.

One :class:`Platform` per :class:`~dataflow.service.service.Service` (built by it when the
service file has an ``api:`` section). Thread-safe; no HTTP or gRPC in it: every method
takes and returns plain values and raises a :class:`~dataflow.platform.errors.PlatformError`
(NotFound, Invalid, Conflict, Refused) whose ``status`` is the HTTP status and ``code``
Clara's error code.

Ids. Pipelines: 32 hex digits derived from the name (stable across restarts, the same for
configured and registered pipelines). Jobs created here: 32 hex digits (Clara's form); jobs
from DICOM keep their ``YYYYmmdd-HHMMSS-xxxxxxxx`` ids: both are one list in ``jobs.db``
with one set of states. Payloads: 32 hex digits; a job created here has one
(``STATE/payloads/<id>/input/`` is its input folder).

Job life (Clara's state / status in brackets)::

    create_job -> pending [PENDING]  --start_job-->  queued [PENDING] -> running [RUNNING]
      -> succeeded [STOPPED/HEALTHY] | failed [STOPPED/FAULTED]
    cancel_job: pending | queued | running -> cancelled [STOPPED/CANCELED]

A running job that is cancelled is failed in its pipeline wherever it is (the workers busy
with it are killed and restarted); its outputs are removed and nothing of it is exported.

Events: :meth:`Platform.subscribe` gives a :class:`Subscription` that receives every change
of a job's state (``{"job_id", "pipeline", "state", "at"}``), from DICOM and API jobs alike.

Servers: :meth:`Platform.start` (called by the service once its pipelines are warm) starts the
REST server and, when ``api.grpc-port`` is set and ``dataflow.platform.clara`` provides
``serve(platform, host, port)`` (returning an object with ``port`` and ``stop()``), the gRPC
server; the ports taken are written to ``STATE/api.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from dataflow.logs import scrub
from dataflow.platform import payloads as files
from dataflow.platform.audit import AuditLog
from dataflow.platform.auth import Authenticator
from dataflow.platform.errors import (
    JOB_CANCEL,
    JOB_INVALID_ID,
    JOB_INVALID_NAME,
    JOB_MISSING,
    JOB_START,
    PAYLOAD_INVALID_ID,
    PIPELINE_STORE,
    Conflict,
    Invalid,
    NotFound,
)
from dataflow.platform.events import Subscription
from dataflow.platform.finding import JobFinder
from dataflow.platform.modelstore import ModelOps
from dataflow.platform.names import (
    CLARA_STATE,
    JOB_ID_FORM,
    NAME_FORM,
    PRIORITIES,
    check_metadata,
    pipeline_id,
)
from dataflow.platform.pipelines import PipelineOps
from dataflow.platform.registry import Registry
from dataflow.platform.storage import PayloadOps

__all__ = [
    "CLARA_STATE",
    "PRIORITIES",
    "Platform",
    "Subscription",
    "check_metadata",
    "pipeline_id",
]

log = structlog.get_logger("dataflow.platform")


def _grpc_server() -> Any:
    """``serve(platform, host, port)`` of the Clara-compatible gRPC package, if installed:
    ``dataflow.platform.clara`` (or ``dataflow.platform.grpc``)."""
    import importlib

    for name in ("dataflow.platform.clara", "dataflow.platform.grpc"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # not there: no gRPC
            raise  # there, but something it imports is missing: say so
        serve = getattr(module, "serve", None)
        if serve is not None:
            return serve
    return None


#: how many of the newest jobs a search or an AE title filter looks through
SEARCHED = 5000

#: the file an ordered job's input holds (operators.dicom.priors:FetchStudy reads it)
ORDER_FILE = "order.json"
UID_FORM = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Platform(PipelineOps, PayloadOps, ModelOps):
    """See the module docstring. ``service``: the service it belongs to (not yet started: the
    platform adds the pipelines registered earlier to its list before they are built)."""

    def __init__(self, service: Any) -> None:
        from dataflow.platform.rest import listen

        self.service = service
        self.config = service.config.api
        # the port is taken now, before any worker starts: in use, the start is refused
        self._rest_socket: Any = listen(self.config.host, self.config.rest_port)
        self.state = Path(service.config.state)
        self.root = self.state / "platform"
        self.payload_root = self.state / "payloads"
        self.payload_root.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(self.root / "platform.db")
        self.audit = AuditLog(self.root / "audit.log")
        #: checks every call's token (api.tokens), or None: loopback without credentials
        self.auth = Authenticator(self.state) if self.config.tokens else None
        self._lock = threading.RLock()  # pipelines added and removed one at a time
        self._listeners = threading.Lock()  # the subscribers (never held while waiting)
        self._creating = threading.Lock()  # a job created vs its pipeline being removed
        self._closing: set[str] = set()  # pipelines being removed or replaced: no new jobs
        self._sizes: dict[str, int] = {}  # payload -> bytes in its input/ (max-upload)
        self._sizes_lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._servers: list[Any] = []
        self._operators: dict[str, tuple[str, ...]] = {}
        self.finder = JobFinder()  # jobs by accession number or UID (their inputs' headers)
        self.urls: dict[str, str] = {}
        self.broken: dict[str, str] = {}  # registered pipelines that no longer validate: why
        service.listeners.append(self._publish)
        service.export_listeners.append(self._publish_export)
        self._restore()

    def _restore(self) -> None:
        """Add the pipelines registered earlier to the service's list. One that no longer
        validates (a stage module gone) is not started, and does not stop the service: it is
        listed as ``not started`` with the reason, until removed."""
        from dataflow.pipeline.validate import check_pipeline

        for row in self.registry.pipelines():
            name, file = row["name"], Path(row["file"])
            if name in self.service.pipelines:
                continue
            if not file.is_file():
                self.broken[name] = f"its definition {file} is gone"
            else:
                report = check_pipeline(file)
                if not report.ok:
                    self.broken[name] = scrub(report.format(notes=False)) or "invalid"
            if name in self.broken:
                log.error("registered_pipeline_not_started", pipeline=name,
                          reason=self.broken[name])  # fmt: skip
                continue
            self.service.pipelines[name] = self._entry(name, file)
            lifetime = self._lifetime()
            if lifetime["lazy"]:  # checked with the others, started at its first job
                self.service.dormant.add(name)
            if lifetime["idle_stop"]:
                self.service.idle_stop[name] = lifetime["idle_stop"]

    # ------------------------------------------------------------------ servers

    def start(self) -> None:
        """Start the REST server (and gRPC, see the module docstring); write ``api.json``."""
        from dataflow.platform.rest import serve as serve_rest

        host = self.config.host
        rest = serve_rest(self, self._rest_socket)
        self._rest_socket = None
        self._servers.append(rest)
        scheme = "https" if self.config.tls else "http"
        self.urls["rest"] = f"{scheme}://{host}:{rest.port}"
        if self.config.grpc_port is not None:
            serve_grpc = _grpc_server()
            if serve_grpc is not None:
                server = serve_grpc(self, host, self.config.grpc_port)
                self._servers.append(server)
                self.urls["grpc"] = f"{host}:{server.port}"
        (self.state / "api.json").write_text(json.dumps(self.urls, indent=2) + "\n")
        log.info("api_listening", **self.urls)

    def stop(self) -> None:
        """End the event streams, then stop the servers (requests in progress are ended)."""
        with self._listeners:
            for subscription in self._subscribers:
                subscription.put({"event": "closed"})
            self._subscribers.clear()
        for server in reversed(self._servers):
            try:
                server.stop()
            except Exception:
                log.exception("api_server_stop_failed")
        self._servers.clear()
        if self._rest_socket is not None:  # the service stopped before it was served
            self._rest_socket.close()
            self._rest_socket = None
        (self.state / "api.json").unlink(missing_ok=True)
        self.registry.close()
        self.audit.close()

    @property
    def jobs(self):  # the service's JobStore
        store = self.service.jobs
        if store is None:
            raise Conflict("the service is stopping", status=503)
        return store

    # ------------------------------------------------------------------ jobs

    def _job(self, job_id: str):
        if not isinstance(job_id, str) or not JOB_ID_FORM.match(job_id):
            raise Invalid(f"job id {job_id!r} is malformed (32 hex digits, or "
                          "YYYYmmdd-HHMMSS-xxxxxxxx for a job from DICOM)",
                          code=JOB_INVALID_ID)  # fmt: skip
        try:
            return self.jobs.get(job_id)
        except KeyError:
            raise NotFound(f"no job {job_id!r}", code=JOB_MISSING) from None

    def create_job(
        self,
        pipeline: str,
        name: str | None = None,
        priority: str = "normal",
        metadata: Mapping[str, str] | None = None,
        input_payloads: Iterable[str] = (),
        order: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """A new ``pending`` job of ``pipeline`` (name or id) and its payload: (job id,
        payload id). Upload its files, then :meth:`start_job`. ``input_payloads``: payloads
        of no job (Clara's reusable payloads) whose files are copied into its ``input/``, in
        order; Invalid if two hold the same name (nothing is created then). ``order``: "run
        the pipeline on study ``study`` (optionally one ``series``) from ``source``", written
        as ``input/order.json`` (see :meth:`_order`) for the pipeline's first stage to fetch."""
        pipeline = self._name_of(pipeline)
        ordered = self._order(order) if order is not None else None
        sources = self._reusable(list(input_payloads))
        priority = str(priority).lower()
        if priority not in PRIORITIES:
            raise Invalid(f"priority {priority!r}: one of {', '.join(PRIORITIES)}",
                          code=JOB_INVALID_NAME)  # fmt: skip
        if name is not None and not NAME_FORM.match(name):
            raise Invalid(f"job name {name!r}: letters, digits, '.', '_', '-' (at most 128)",
                          code=JOB_INVALID_NAME)  # fmt: skip
        meta = check_metadata(metadata, "job")
        job_id, payload_id = uuid.uuid4().hex, uuid.uuid4().hex
        inputs = self.payload_root / payload_id / "input"
        inputs.mkdir(parents=True)
        for rel, path in sources:
            (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, inputs / rel)
        if ordered is not None:
            (inputs / ORDER_FILE).write_text(json.dumps(ordered, indent=1) + "\n")
        name = name or f"{pipeline}-{job_id[:8]}"
        source = {"connector": "api", "name": name, "priority": priority, "payload_id": payload_id}
        if ordered is not None:
            source["order_source"] = ordered["source"]
        with self._creating:
            if pipeline in self._closing:
                shutil.rmtree(inputs.parent, ignore_errors=True)
                raise Conflict(f"pipeline {pipeline!r} is being removed or replaced: try again",
                               code=PIPELINE_STORE)  # fmt: skip
            self.registry.add_payload(payload_id, job_id)
            self.registry.add_job(job_id, name, priority, payload_id)
            if meta:
                self.registry.set_metadata("job", job_id, meta)
            self.jobs.create(pipeline, inputs, source=source, key=None, job_id=job_id,
                             state="pending")  # fmt: skip
        log.info("job_created", job_id=job_id, pipeline=pipeline, priority=priority)
        self.audit.record("job_created", job=job_id, pipeline=pipeline, payload=payload_id,
                          priority=priority, metadata_keys=sorted(meta))  # fmt: skip
        self._publish(job_id, pipeline, "pending")
        return job_id, payload_id

    def order_sources(self) -> dict[str, dict[str, Any]]:
        """The sources an order may name: the connectors' ``order_sources()`` (duck-typed: the
        DICOM connector's ``dicom.sources``), name -> settings."""
        out: dict[str, dict[str, Any]] = {}
        for _, connector in self.service.connectors.items():
            method = getattr(connector, "order_sources", None)
            if callable(method):
                out.update(method())
        return out

    def _order(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """An order checked: ``study`` (a UID), ``series`` (optional UID), ``source`` (a name
        of :meth:`order_sources`); what ``order.json`` holds: those and the source's
        settings as ``pacs``. Invalid naming the value that is wrong."""
        if not isinstance(order, Mapping):
            raise Invalid("order: expected {study, source[, series]}")
        unknown = sorted(set(order) - {"study", "series", "source"})
        if unknown:
            raise Invalid(f"order: unknown key(s) {unknown}; known: series, source, study")
        out: dict[str, Any] = {}
        for key in ("study", "series"):
            value = order.get(key)
            if value is None and key == "series":
                continue
            text = str(value or "").strip()
            if len(text) > 64 or not UID_FORM.match(text):
                raise Invalid(f"order: {key} {value!r} is not a DICOM UID (digits and dots, at "
                              "most 64)")  # fmt: skip
            out[key] = text
        name = str(order.get("source") or "").strip()
        known = self.order_sources()
        if name not in known:
            names = ", ".join(sorted(known)) or "none: the service has no dicom.sources"
            raise Invalid(f"order: source {name!r} is not a source of this service ({names})")
        return {**out, "source": name, "pacs": known[name]}

    def _reusable(self, payload_ids: list[str]) -> list[tuple[str, Path]]:
        """(name, file) of every file of the given payloads of no job, checked for
        collisions."""
        out: dict[str, tuple[str, Path]] = {}
        for payload_id in payload_ids:
            if self._payload(payload_id)["job_id"]:
                raise Invalid(f"payload {payload_id} belongs to a job: only a payload of no job "
                              "is an input payload", code=PAYLOAD_INVALID_ID)  # fmt: skip
            inputs = self.payload_root / payload_id / "input"
            for entry in files.list_files(inputs, None):
                rel = entry["name"].removeprefix("/input/")
                if rel in out:
                    raise Invalid(f"input payloads {out[rel][0]} and {payload_id} both hold "
                                  f"{rel!r}", code=PAYLOAD_INVALID_ID)  # fmt: skip
                out[rel] = (payload_id, inputs / rel)
        return [(rel, path) for rel, (_, path) in out.items()]

    def start_job(self, job_id: str) -> dict[str, Any]:
        """Queue a pending job; Conflict if it was started (or cancelled) already."""
        job = self._job(job_id)
        if not self.service.start_job(job.id):
            job = self.jobs.get(job.id)
            raise Conflict(f"job {job.id} is {job.state}: a job is started once", code=JOB_START)
        self.audit.record("job_started", job=job.id, pipeline=job.pipeline)
        return self.job_status(job.id)

    def job_record(self, job_id: str) -> Any:
        """A job's record as the service keeps it (:class:`dataflow.service.jobs.JobRecord`:
        its payload folder, source, times); Invalid or NotFound as :meth:`job_status`."""
        return self._job(job_id)

    def job_status(self, job_id: str) -> dict[str, Any]:
        """A job: its ids, state (ours and Clara's state/status), priority, timestamps
        (seconds since the epoch), messages, and each operator's status."""
        job = self._job(job_id)
        extra = self.registry.job(job.id) or {}
        state, status = CLARA_STATE.get(job.state, ("UNKNOWN", "UNKNOWN"))
        messages = []
        if job.error:
            messages.append(f"{job.stage}: {job.error}" if job.stage else job.error)
        messages += [entry["what"] for entry in job.history]
        return {
            "id": job.id,
            "name": extra.get("name") or job.source.get("name") or job.id,
            "pipeline": job.pipeline,
            "pipeline_id": pipeline_id(job.pipeline),
            "payload_id": extra.get("payload_id"),
            "state": job.state,
            "clara_state": state,
            "clara_status": status,
            "priority": extra.get("priority", "normal"),
            "source": job.source.get("connector", "api"),
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "attempts": job.attempts,
            "messages": messages,
            "operators": self._operator_details(job),
            "metadata": self.registry.metadata("job", job.id),
            "exports": self.jobs.deliveries(job.id),
        }

    def _operator_details(self, job) -> list[dict[str, Any]]:
        """Each operator's status (Clara's JobOperatorStatus): PENDING, RUNNING, COMPLETED,
        FAULTED; from the executor while the job runs, else from its record and outputs."""
        executor = self.service.executors.get(job.pipeline)
        running: list[str] = []
        if job.state == "running" and executor is not None:
            try:
                running = list((executor.in_flight() or {}).get(job.id, []))
            except Exception:
                running = []
        outputs = self.service.jobs_dir / job.id
        out = []
        for name in self.operators(job.pipeline):
            if job.state == "succeeded":
                status = "COMPLETED"
            elif job.state == "failed" and name == job.stage:
                status = "FAULTED"
            elif name in running:
                status = "RUNNING"
            elif job.state in ("running", "failed") and (outputs / name).exists():
                status = "COMPLETED"
            else:
                status = "PENDING"
            out.append({"name": name, "status": status})
        return out

    def list_jobs(
        self,
        *,
        states: Iterable[str] = (),
        pipelines: Iterable[str] = (),
        created_after: float | None = None,
        finished_before: float | None = None,
        limit: int = 100,
        called_ae: str | None = None,
        find: str | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs from DICOM and the API, newest first (summaries: no operators). ``called_ae``:
        only those received by that AE title; ``find``: only those that an accession number,
        a UID, a job id, name or payload id names (:mod:`dataflow.platform.finding`; the
        newest :data:`SEARCHED` jobs are searched)."""
        from dataflow.service.jobs import JOB_STATES

        states = tuple(states)
        for state in states:
            if state not in JOB_STATES:
                raise Invalid(f"job state {state!r}: one of {', '.join(JOB_STATES)}")
        names = tuple(self._name_of(p) for p in pipelines)
        if not 1 <= int(limit) <= 10000:
            raise Invalid(f"limit {limit!r}: from 1 to 10000")
        narrowed = bool(called_ae or (find and find.strip()))
        records = self.jobs.list(states=states, pipelines=names, created_after=created_after,
                                 finished_before=finished_before,
                                 limit=SEARCHED if narrowed else int(limit))  # fmt: skip
        if called_ae:
            records = [job for job in records if job.source.get("called_ae") == called_ae]
        if find and find.strip():
            records = [job for job in records if self.finder.matches(job, find)]
        records = records[: int(limit)]
        out = []
        for job in records:
            state, status = CLARA_STATE.get(job.state, ("UNKNOWN", "UNKNOWN"))
            out.append({
                "id": job.id, "name": job.source.get("name") or job.id, "pipeline": job.pipeline,
                "pipeline_id": pipeline_id(job.pipeline), "state": job.state,
                "clara_state": state, "clara_status": status,
                "priority": job.source.get("priority", "normal"),
                "payload_id": job.source.get("payload_id"),
                "source": job.source.get("connector", "api"), "created": job.created,
                "called_ae": job.source.get("called_ae"),
                "calling_ae": job.source.get("calling_ae"),
                "started": job.started, "finished": job.finished,
                "error": f"{job.stage}: {job.error}" if job.stage and job.error else job.error,
            })  # fmt: skip
        return out

    def cancel_job(self, job_id: str, reason: str = "") -> dict[str, Any]:
        """Cancel a job: pending or queued, it never runs; running, see the module docstring.
        Conflict if it had ended."""
        job = self._job(job_id)
        why = scrub(reason.strip()) if reason and reason.strip() else "cancelled by request"
        was = self.service.cancel_job(job.id, f"cancelled: {why}"[:1000])
        if was is None:
            job = self.jobs.get(job.id)
            raise Conflict(f"job {job.id} is {job.state}: it cannot be cancelled",
                           code=JOB_CANCEL)  # fmt: skip
        self.audit.record("job_cancelled", job=job.id, pipeline=job.pipeline, was=was)
        return self.job_status(job.id)

    def retry_job(self, job_id: str) -> dict[str, Any]:
        """Queue a failed job again (as ``dataflow jobs --retry``): Conflict saying why not."""
        from dataflow.service.jobs import RetryRefused

        job = self._job(job_id)
        try:
            self.jobs.retry(job.id)
        except RetryRefused as exc:
            raise Conflict(str(exc), code=JOB_START) from None
        self.audit.record("job_retried", job=job.id, pipeline=job.pipeline)
        self._publish(job.id, job.pipeline, "queued")
        self.service._take_unfinished(("queued",), "job_picked_up")
        return self.job_status(job.id)

    def job_logs(self, job_id: str, operator: str | None = None) -> list[str]:
        """What is recorded of a job (its history, error and the failure's traceback,
        scrubbed), then what its operators logged and printed while they ran it (each line
        ``[operator] ...``; kept in ``STATE/jobs/<job>/.logs/<operator>.log``, scrubbed), of
        one operator if given."""
        job = self._job(job_id)
        if operator is not None and operator not in self.operators(job.pipeline):
            raise NotFound(f"job {job.id}: pipeline {job.pipeline!r} has no operator "
                           f"{operator!r}", code=JOB_MISSING)  # fmt: skip
        when = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))  # noqa: E731
        lines = [f"{when(job.created)} created ({job.pipeline})"]
        if job.started:
            lines.append(f"{when(job.started)} started (attempt {job.attempts})")
        for entry in job.history:
            if operator is None or entry.get("stage") in (None, operator):
                lines.append(f"{when(entry['at'])} attempt {entry['attempt']}: {entry['what']}")
        if job.error and (operator is None or job.stage == operator):
            stage = f"{job.stage}: " if job.stage else ""
            lines.append(f"{when(job.finished or job.created)} {job.state}: {stage}{job.error}")
            lines += (job.details or "").splitlines()
        elif job.finished:
            lines.append(f"{when(job.finished)} {job.state}")
        folder = self.service.jobs_dir / job.id / ".logs"
        for name in [operator] if operator is not None else self.operators(job.pipeline):
            try:
                text = (folder / f"{name}.log").read_text(errors="replace")
            except OSError:
                continue
            lines += [f"[{name}] {line}" for line in text.splitlines()]
        return lines

    # ------------------------------------------------------------------ health

    def health(self, max_age: float = 30.0) -> dict[str, Any]:
        """What ``dataflow health`` says: ``verdict`` (0 healthy, 1 problems, 2 stale),
        ``summary``, ``problems`` and, per pipeline, each stage's state and the jobs in
        flight with the stages they are at (``STATE/health.json``)."""
        from dataflow.service.health import check

        code, report, summary = check(self.state, max_age=max_age)
        return {"verdict": code, "summary": summary, **report}

    # ------------------------------------------------------------------ DICOM exports

    def _admins(self) -> dict[str, Any]:
        from dataflow.service.main import open_admins

        return open_admins(self.service.config)

    def exports(self, state: str | None = None) -> list[dict[str, Any]]:
        """The export outbox of every connector that has one (the DICOM connector): each
        task's job, destination, state (pending, sending, sent, dead), attempts, last error."""
        from dataflow.errors import DataflowError

        try:
            return [row for admin in self._admins().values() for row in admin.exports(state)]
        except DataflowError as exc:  # an unknown state
            raise Invalid(str(exc)) from None

    def resend_export(self, task_id: str) -> str:
        """Send a dead letter again (as ``dataflow exports --resend``): what happens, in
        words; NotFound or Conflict saying why not."""
        from dataflow.errors import DataflowError

        reasons = []
        for admin in self._admins().values():
            try:
                message = admin.resend(task_id)
                self.audit.record("dead_letter_resent", task=task_id)
                return message
            except DataflowError as exc:
                reasons.append(str(exc))
        if not reasons:
            raise NotFound(f"no export task {task_id!r}: no connector has an outbox")
        error = NotFound if all(r.startswith("no export task") for r in reasons) else Conflict
        raise error("; ".join(reasons))

    # ------------------------------------------------------------------ metadata

    def _item(self, kind: str, item: str) -> str:
        if kind == "pipeline":
            return pipeline_id(self._name_of(item))
        if kind == "job":
            return self._job(item).id
        if kind == "payload":
            self._payload(item)
            return item
        raise Invalid(f"metadata of {kind!r}: of a pipeline, job or payload")

    # ------------------------------------------------------------------ DICOM side

    def dicom_connectors(self) -> list[tuple[str, Any]]:
        """The connectors that hold received studies (duck-typed: dataflow knows no DICOM)."""
        return [(name, c) for name, c in self.service.connectors.items()
                if callable(getattr(c, "studies", None))]  # fmt: skip

    def dicom_routing(self) -> dict[str, list[dict[str, Any]]]:
        """The DICOM receivers with their AE titles and routes, and the destinations (the
        connectors' ``routing()``, duck-typed), for the console."""
        out: dict[str, list[dict[str, Any]]] = {"receivers": [], "destinations": []}
        for _, connector in self.service.connectors.items():
            routing = getattr(connector, "routing", None)
            if callable(routing):
                for key, rows in routing().items():
                    out.setdefault(key, []).extend(rows)
        return out

    def disks(self) -> list[dict[str, Any]]:
        """The file systems the service writes to, each with bytes ``free`` and ``total``, the
        ``reserve`` kept free and whether it is ``below`` it: the state folder (API uploads
        are refused below ``api.disk-reserve``) and each DICOM receiver's spool."""
        usage = shutil.disk_usage(self.state)
        reserve = self.config.disk_reserve
        out = [{"what": "state folder (API uploads)", "path": str(self.state),
                "free": usage.free, "total": usage.total, "reserve": reserve,
                "below": usage.free < reserve}]  # fmt: skip
        for _, connector in self.service.connectors.items():
            disks = getattr(connector, "disks", None)  # duck-typed: the DICOM connector's
            if callable(disks):
                out += [{"what": f"DICOM receiver {d['receiver']}", **d} for d in disks()]
        return out

    def dicom_studies(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """What the DICOM receivers hold, newest first: each group (a study or series) with
        its state and the jobs made of it."""
        out = []
        for name, connector in self.dicom_connectors():
            try:
                studies = connector.studies(state)
            except ValueError as exc:
                raise Invalid(f"state {state!r}: {exc}") from None
            for study in studies:
                keys = study.pop("job_keys", [])
                jobs = [self.jobs.by_key(key) for key in keys]
                study["jobs"] = [{"id": j.id, "pipeline": j.pipeline, "state": j.state}
                                 for j in jobs if j is not None]  # fmt: skip
                out.append({"connector": name, **study})
        out.sort(key=lambda study: study.get("last_arrival", 0), reverse=True)
        return out[:limit]

    def dicom_associations(self, limit: int = 100) -> list[dict[str, Any]]:
        """The receivers' last associations, newest first."""
        out = []
        for name, connector in self.dicom_connectors():
            method = getattr(connector, "associations", None)
            if callable(method):
                out += [{"connector": name, **row} for row in method(limit)]
        out.sort(key=lambda row: row.get("ended", 0), reverse=True)
        return out[:limit]

    def metadata(self, kind: str, item: str) -> dict[str, str]:
        return self.registry.metadata(kind, self._item(kind, item))

    def add_metadata(self, kind: str, item: str, values: Mapping[str, str]) -> dict[str, str]:
        """Add or replace entries of the metadata of a ``pipeline``, ``job`` or ``payload``;
        the whole map after. Invalid over Clara's limits (nothing changed then)."""
        key = self._item(kind, item)
        meta = check_metadata(values, kind, self.registry.metadata(kind, key))
        self.registry.set_metadata(kind, key, meta)
        self.audit.record("metadata_added", kind=kind, id=key, keys=sorted(meta))
        return self.registry.metadata(kind, key)

    def remove_metadata(self, kind: str, item: str, keys: Iterable[str]) -> dict[str, str]:
        key = self._item(kind, item)
        keys = [str(k) for k in keys]
        self.registry.remove_metadata(kind, key, keys)
        self.audit.record("metadata_removed", kind=kind, id=key, keys=sorted(keys))
        return self.registry.metadata(kind, key)

    # ------------------------------------------------------------------ events

    def subscribe(self, size: int = 1000) -> Subscription:
        """Every job's changes of state from now on (see :class:`Subscription`)."""
        subscription = Subscription(self, size)
        with self._listeners:
            self._subscribers.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._listeners:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def _publish(self, job_id: str, pipeline: str, state: str) -> None:
        self._send({"job_id": job_id, "pipeline": pipeline, "state": state, "at": time.time()})

    def _publish_export(self, task_id: str, destination: str, state: str) -> None:
        self._send({"event": "export", "task_id": task_id, "destination": destination,
                    "state": state, "at": time.time()})  # fmt: skip

    def _send(self, event: dict[str, Any]) -> None:
        with self._listeners:
            subscribers = list(self._subscribers)
        for subscription in subscribers:
            subscription.put(event)
