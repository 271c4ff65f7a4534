"""The platform's pipelines: those configured and those registered at run time (listed,
described, registered, replaced, removed), as a part of :class:`dataflow.platform.core.Platform`.

Registered pipelines are stored under ``STATE/platform/pipelines/NAME/pipeline.yaml`` and in
the registry; they start warm when registered and again at each start of the service (one
that no longer validates is listed ``not started`` with the reason until removed).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from dataflow.logs import scrub
from dataflow.platform.errors import (
    PIPELINE_DEFINITION,
    PIPELINE_INVALID_ID,
    PIPELINE_LOAD,
    PIPELINE_MISSING,
    PIPELINE_STORE,
    Conflict,
    Invalid,
    NotFound,
    PlatformError,
)
from dataflow.platform.names import HEX32, IN_FLIGHT, NAME_FORM, check_metadata, pipeline_id

__all__ = ["PipelineOps"]

log = structlog.get_logger("dataflow.platform")


class PipelineOps:
    """The pipeline methods of :class:`~dataflow.platform.core.Platform` (which provides
    ``service``, ``registry``, ``audit``, ``root``, ``jobs``, ``broken`` and the locks)."""

    service: Any
    registry: Any
    audit: Any
    root: Path
    broken: dict[str, str]

    def _name_of(self, pipeline: str) -> str:
        """A pipeline's name from its name or id; NotFound otherwise (Conflict for one
        registered earlier that could not be started)."""
        names = list(self.service.pipelines)
        if pipeline in names:
            return pipeline
        for name in names:
            if pipeline_id(name) == pipeline:
                return name
        broken = self._broken_name(pipeline)
        if broken is not None:
            raise Conflict(f"pipeline {broken!r} was not started: {self.broken[broken]}; remove it "
                           "and register it again", code=PIPELINE_LOAD)  # fmt: skip
        if not HEX32.match(pipeline or "") and not NAME_FORM.match(pipeline or ""):
            raise Invalid(f"pipeline id {pipeline!r} is neither a name nor 32 hex digits",
                          code=PIPELINE_INVALID_ID)  # fmt: skip
        raise NotFound(f"no pipeline {pipeline!r} (pipelines: {', '.join(names) or 'none'})",
                       code=PIPELINE_MISSING)  # fmt: skip

    def _registered(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.registry.pipelines()}

    def _summary(self, name: str) -> dict[str, Any]:
        entry = self.service.pipelines[name]
        registered = name in self._registered()
        state = "ready" if name in self.service.feeds else "starting"
        if name in self.service.dormant:
            state = "idle"  # its workers start at its next job
        return {
            "id": pipeline_id(name),
            "name": name,
            "source": "api" if registered else "configured",
            "file": str(entry.file),
            "state": state,
            "metadata": self.registry.metadata("pipeline", pipeline_id(name)),
        }

    def _broken_name(self, pipeline: str) -> str | None:
        for name in list(self.broken):
            if pipeline in (name, pipeline_id(name)):
                return name
        return None

    def list_pipelines(self) -> list[dict[str, Any]]:
        """Every pipeline served: configured ones, then those registered through the API,
        then those registered earlier that could not be started (``reason``)."""
        out = [self._summary(name) for name in list(self.service.pipelines)]
        for name, reason in list(self.broken.items()):
            key = pipeline_id(name)
            out.append({"id": key, "name": name, "source": "api",
                        "file": str(self.root / "pipelines" / name / "pipeline.yaml"),
                        "state": "not started", "reason": reason,
                        "metadata": self.registry.metadata("pipeline", key)})  # fmt: skip
        return out

    def describe_pipeline(self, pipeline: str) -> dict[str, Any]:
        """A pipeline's summary, its definition (``yaml``) and its operators in order, each
        with the operators it takes input from."""
        name = self._name_of(pipeline)
        entry = self.service.pipelines[name]
        out = self._summary(name)
        try:
            out["yaml"] = Path(entry.file).read_text()
        except OSError as exc:
            raise PlatformError(f"pipeline {name!r}: its definition cannot be read "
                                f"({exc.strerror})", code=PIPELINE_STORE) from None  # fmt: skip
        out["operators"] = [{"name": n, "after": after} for n, after in self._dag(name)]
        return out

    def diagnose_pipeline(
        self, pipeline: str | None = None, yaml_text: str | None = None
    ) -> dict[str, Any]:
        """What the validator says of a served pipeline's definition (with its params) or of
        a YAML text (checked in a scratch folder, registered nowhere): ``yaml``, ``ok``,
        ``name`` (the definition's, None if it has none) and ``diagnostics``, each with its
        ``severity``, ``line`` and ``column`` in that text (None: another file's),
        ``message``, ``operator`` and ``field``."""
        from dataflow.pipeline.validate import check_pipeline

        scratch = None
        if pipeline is not None:
            entry = self.service.pipelines[self._name_of(pipeline)]
            file, params = Path(entry.file), entry.params
        else:
            if not isinstance(yaml_text, str) or not yaml_text.strip():
                raise Invalid("the pipeline definition is empty", code=PIPELINE_DEFINITION)
            scratch = self.root / "pipelines" / f".check-{uuid.uuid4().hex}"
            scratch.mkdir(parents=True)
            file, params = scratch / "pipeline.yaml", {}
            file.write_text(yaml_text)
        try:
            text = file.read_text()
            report = check_pipeline(file, params)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        here = {str(file), file.name}
        found = [
            {"severity": d.severity, "message": scrub(d.message), "operator": d.operator,
             "field": d.field, "line": d.location.line if d.location.file in here else None,
             "column": d.location.column if d.location.file in here else None}
            for d in report.diagnostics
        ]  # fmt: skip
        graph = report.graph
        return {"yaml": text, "ok": report.ok, "diagnostics": found,
                "name": graph.spec.name if graph is not None else None}  # fmt: skip

    def _dag(self, name: str) -> list[tuple[str, list[str]]]:
        from dataflow.pipeline.load import load_pipeline

        entry = self.service.pipelines[name]
        spec = load_pipeline(entry.file, entry.params)
        out = []
        for op in spec.operators:
            after = sorted({i.source for i in op.inputs if getattr(i, "source", None)})
            out.append((op.name, after))
        return out

    def operators(self, name: str) -> tuple[str, ...]:
        """The operator names of a pipeline, in the order of its file."""
        if name not in self._operators:
            try:
                self._operators[name] = tuple(n for n, _ in self._dag(name))
            except Exception:  # a pipeline no longer served or readable: no operators known
                return ()
        return self._operators[name]

    def create_pipeline(
        self, yaml_text: str, name: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Validate a pipeline definition, store it, start its workers (returns once they
        are warm) and return its summary. ``name``: by default the definition's ``name:``.
        Invalid with the diagnostics (``pipeline.yaml:LINE:COL: error: ...``) if it does not
        validate; Conflict if a pipeline of that name exists."""
        meta = check_metadata(metadata, "pipeline")
        staging = self.root / "pipelines" / f".new-{uuid.uuid4().hex}"
        try:
            given = self._stage_definition(staging, yaml_text)
            name = name or given
            if not NAME_FORM.match(name or ""):
                raise Invalid(f"pipeline name {name!r}: letters, digits, '.', '_', '-' "
                              "(at most 128)", code=PIPELINE_DEFINITION)  # fmt: skip
            with self._lock:
                if name in self.service.pipelines:
                    raise Conflict(f"a pipeline named {name!r} exists already (id "
                                   f"{pipeline_id(name)})", code=PIPELINE_STORE)  # fmt: skip
                final = self.root / "pipelines" / name
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                file = final / "pipeline.yaml"
                try:
                    self.service.add_pipeline(self._entry(name, file), **self._lifetime())
                except Exception as exc:
                    shutil.rmtree(final, ignore_errors=True)
                    raise Invalid(f"pipeline {name!r} could not be started: {scrub(str(exc))}",
                                  code=PIPELINE_LOAD) from None  # fmt: skip
                self.registry.add_pipeline(name, pipeline_id(name), file)
                if meta:
                    self.registry.set_metadata("pipeline", pipeline_id(name), meta)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("pipeline_registered", pipeline=name, id=pipeline_id(name))
        self.audit.record("pipeline_added", pipeline=name, id=pipeline_id(name))
        return self._summary(name)

    def _stage_definition(self, staging: Path, yaml_text: str) -> str:
        """Write a definition into ``staging/pipeline.yaml`` and validate it; the name it
        gives. Invalid with the diagnostics (their file named ``pipeline.yaml``)."""
        from dataflow.pipeline.validate import check_pipeline

        if not isinstance(yaml_text, str) or not yaml_text.strip():
            raise Invalid("the pipeline definition is empty", code=PIPELINE_DEFINITION)
        staging.mkdir(parents=True)
        file = staging / "pipeline.yaml"
        file.write_text(yaml_text)
        report = check_pipeline(file)
        if not report.ok:
            text = report.format(notes=False).replace(str(file), "pipeline.yaml")
            raise Invalid(f"the pipeline definition does not validate:\n{text}",
                          code=PIPELINE_LOAD)  # fmt: skip
        assert report.graph is not None
        return report.graph.spec.name

    def update_pipeline(self, pipeline: str, yaml_text: str) -> dict[str, Any]:
        """Replace a registered pipeline's definition (Clara's Pipelines.Update): validated
        first (Invalid with the diagnostics, nothing changed); Conflict while any of its jobs
        is in flight; then its workers stop and the new ones start warm, with the same name,
        id and metadata. If the new workers cannot start, the old definition is served again."""
        with self._lock:
            name = self._registered_name(pipeline)
            staging = self.root / "pipelines" / f".new-{uuid.uuid4().hex}"
            final, old = self.root / "pipelines" / name, self.root / "pipelines" / f".old-{name}"
            try:
                self._stage_definition(staging, yaml_text)
                with self._closing_pipeline(name):
                    self._replace(name, staging, final, old)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)
        log.info("pipeline_updated", pipeline=name)
        self.audit.record("pipeline_updated", pipeline=name, id=pipeline_id(name))
        return self._summary(name)

    def _replace(self, name: str, staging: Path, final: Path, old: Path) -> None:
        self.service.remove_pipeline(name)
        self._operators.pop(name, None)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        try:
            self.service.add_pipeline(self._entry(name, final / "pipeline.yaml"),
                                      **self._lifetime())  # fmt: skip
        except Exception as exc:
            shutil.rmtree(final, ignore_errors=True)
            old.rename(final)
            self.service.add_pipeline(self._entry(name, final / "pipeline.yaml"),
                                      **self._lifetime())  # fmt: skip
            raise Invalid(f"pipeline {name!r}: the new definition could not be started (the "
                          f"old one is served again): {scrub(str(exc))}",
                          code=PIPELINE_LOAD) from None  # fmt: skip

    def _registered_name(self, pipeline: str) -> str:
        name = self._name_of(pipeline)
        if name not in self._registered():
            raise Invalid(f"pipeline {name!r} is configured in {self.service.config.path}: "
                          "change it there", code=PIPELINE_STORE)  # fmt: skip
        return name

    @contextlib.contextmanager
    def _closing_pipeline(self, name: str) -> Iterator[None]:
        """While removing or replacing ``name``: no job of it is created; Conflict naming
        the jobs of it in flight."""
        with self._creating:
            self._closing.add(name)
        try:
            self._refuse_busy(name)
            yield
        finally:
            self._closing.discard(name)

    def _refuse_busy(self, name: str) -> None:
        busy = self.jobs.list(states=IN_FLIGHT, pipelines=(name,), limit=1000)
        if busy:
            ids = ", ".join(job.id for job in busy[:20])
            more = f" and {len(busy) - 20} more" if len(busy) > 20 else ""
            raise Conflict(f"pipeline {name!r} has jobs in flight: {ids}{more}; cancel them "
                           "or wait", code=PIPELINE_STORE)  # fmt: skip

    def _lifetime(self) -> dict[str, Any]:
        """When a registered pipeline's workers start and stop (``api.start-pipelines``,
        ``api.idle-stop``)."""
        return {"lazy": self.config.start_pipelines == "first-job",
                "idle_stop": self.config.idle_stop}  # fmt: skip

    def _entry(self, name: str, file: Path):
        from dataflow.service.config import PipelineEntry

        return PipelineEntry(name, file, {}, {}, self.service.config.limits)

    def remove_pipeline(self, pipeline: str) -> None:
        """Stop and forget a pipeline registered through the API. Conflict, naming the jobs,
        while any of its jobs is pending, queued or running; Invalid for a configured one."""
        with self._lock:
            broken = self._broken_name(pipeline)
            if broken is not None:
                self._forget(broken)
                self.broken.pop(broken, None)
                log.info("pipeline_unregistered", pipeline=broken)
                self.audit.record("pipeline_removed", pipeline=broken, id=pipeline_id(broken))
                return
            name = self._registered_name(pipeline)
            with self._closing_pipeline(name):
                self._forget(name)
                self.service.remove_pipeline(name)
                self._operators.pop(name, None)
        log.info("pipeline_unregistered", pipeline=name)
        self.audit.record("pipeline_removed", pipeline=name, id=pipeline_id(name))

    def _forget(self, name: str) -> None:
        self.registry.remove_pipeline(name)
        self.registry.drop_metadata("pipeline", pipeline_id(name))
        shutil.rmtree(self.root / "pipelines" / name, ignore_errors=True)
