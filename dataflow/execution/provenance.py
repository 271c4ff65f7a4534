"""Provenance: what made each job's results, assembled by the engine.

Per pipeline, once, when its executor is built (:func:`pipeline_record`): its name and a
SHA-256 of its definition (the resolved operators: stage or container, arguments after the
pipeline's parameters, inputs), and per stage its name, operator (``module:Class``), the
package and version that provides it, its parameters, and the model it uses, where one is
named by its arguments (a file or folder of the model repository: name, version and the
repository's hash; another model file: its name and SHA-256; Triton's ``model_name`` and
``model_version``; ``model: NAME`` that is no path: the name).

Per job (:class:`JobProvenance`, in the coordinator): the input's SOP Instance UIDs (read
from the job's folder on a thread of its own while the job runs; sorted, with a SHA-256 of
the sorted set), study and series UIDs; each stage's start and end (UTC), the device it ran
on (``cpu`` or ``cuda:N``) and the host; the output instances the stages noted
(``ctx.note_output``: SOP Instance UID, class, series and study); the job's outcome. At the
job's end it is written as ``OUTPUT_ROOT/JOB/provenance.json`` (``dataflow run``: next to
the job's outputs; ``dataflow serve``: ``STATE/jobs/JOB/``, where the job records index it).

A stage whose class sets ``provenance = True`` (the DICOM writers) gets the record so far as
``ctx.provenance`` (the upstream stages' records, the inputs, the pipeline): only those, so
the hop of every other stage costs nothing more. No patient identifier is read or kept: UIDs
only.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from dataflow import __version__

__all__ = [
    "FILE",
    "NOTES",
    "JobProvenance",
    "describe",
    "input_uids",
    "model_of",
    "parse_description",
    "pipeline_record",
    "read_provenance",
    "short_hash",
    "utc",
]

log = structlog.get_logger("dataflow.execution")

FILE = "provenance.json"
NOTES = ".provenance"  # JOB/.provenance/STAGE.json: the outputs a stage noted
VERSION = 1  # the record's format
_OURS = ("dataflow", "operators", "connectors")  # modules of the dataflow distribution
_MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".plan", ".engine", ".pb", ".tflite",
                   ".h5", ".keras", ".ckpt", ".safetensors", ".bin")  # fmt: skip
_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
#: what :func:`describe` writes (a DICOM writer's Contribution Description)
_DESCRIPTION = re.compile(
    r"dataflow pipeline (?P<pipeline>\S+) sha256:(?P<sha>[0-9a-f]+), job (?P<job>[^,;]+)"
    r"(?:, inputs sha256:(?P<inputs>[0-9a-f]+) \((?P<count>\d+) instances\))?"
    r"(?:; stages: (?P<stages>.*))?$"
)


def utc(seconds: float) -> str:
    """A Unix time as ISO 8601 UTC with microseconds (``2026-12-04T14:03:53.123456Z``)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def short_hash(digest: str | None) -> str:
    """The first 12 hex digits of a SHA-256 (what messages and DICOM show)."""
    return (digest or "")[:12]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, type):
        return f"{value.__module__}:{value.__qualname__}"
    return str(value)


def _digest(data: Any) -> str:
    text = json.dumps(_jsonable(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's SHA-256 (remembered per path, size and modification time)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _repository_record(path: Path) -> dict[str, Any] | None:
    """The ``.model.json`` of the model repository version ``path`` is (or is in)."""
    from dataflow.models import META

    for folder in (path, path.parent):
        meta = folder / META
        if meta.is_file():
            try:
                return json.loads(meta.read_text())
            except (OSError, ValueError):
                return None
    return None


def model_of(arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model a stage's (checked) arguments name, or None (see the module docstring)."""
    for key, value in arguments.items():
        if not isinstance(value, str) or not value or "model" not in key.lower():
            continue
        if key.lower() in ("model_version",):
            continue
        path = Path(value)
        if path.is_absolute() and path.exists():
            record = _repository_record(path)
            if record is not None:
                model = {"name": record.get("name"), "version": str(record.get("version")),
                         "sha256": record.get("sha256"), "file": path.name,
                         "source": "repository"}  # fmt: skip
                if path.is_file():
                    model["file_sha256"] = file_sha256(path)
                return model
            if path.is_file():
                return {"name": path.stem, "version": None, "sha256": file_sha256(path),
                        "file": path.name, "source": "file"}  # fmt: skip
            return {"name": path.name, "version": None, "sha256": None, "file": path.name,
                    "source": "folder"}  # fmt: skip
        if value.lower().endswith(_MODEL_SUFFIXES):
            continue  # a file that is not there: the stage says so when it loads it
        if key.lower() in ("model", "model_name"):
            version = arguments.get("model_version") or None
            source = "triton" if key.lower() == "model_name" else "named"
            return {"name": value, "version": None if version is None else str(version),
                    "sha256": None, "file": None, "source": source}  # fmt: skip
    return None


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module -> the distributions that install it (read once: it walks every
    installed package's metadata)."""
    try:
        return importlib.metadata.packages_distributions()
    except Exception:  # a broken installation: operators are still named
        return {}


def _operator(ref: Any) -> tuple[str, str | None, str | None]:
    """(``module:Name``, distribution, its version) of a stage reference."""
    if isinstance(ref, str):
        name = ref
        module = ref.partition(":")[0]
    else:
        module = getattr(ref, "__module__", "")
        name = f"{module}:{getattr(ref, '__qualname__', ref)}"
    top = module.split(".")[0]
    if top in _OURS:  # the bundled operators and connectors: dataflow's own version
        return name, "dataflow", __version__
    try:  # most distributions are named as their module; else the installed metadata says
        return name, top, importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        dists = _distributions().get(top) or []
    for dist in dists:
        try:
            return name, dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return name, None, None


def pipeline_record(
    name: str,
    stages: Sequence[Mapping[str, Any]],
    *,
    file: str | None = None,
) -> dict[str, Any]:
    """The static part of a pipeline's provenance. ``stages``: in order, each ``{"name",
    "stage_ref", "arguments", "inputs", "container"}`` (the executor's view of it)."""
    records = []
    for stage in stages:
        operator, package, version = _operator(stage["stage_ref"])
        parameters = _jsonable(stage.get("arguments") or {})
        record = {"name": stage["name"], "operator": operator, "package": package,
                  "version": version, "parameters": parameters}  # fmt: skip
        if version is None:  # a stage module of the pipeline's own: its code's hash
            source = getattr(sys.modules.get(operator.partition(":")[0]), "__file__", None)
            if source and Path(source).is_file():
                record["source_sha256"] = file_sha256(Path(source))
        if stage.get("container"):
            record["container"] = stage["container"]
        model = model_of(stage.get("arguments") or {})
        if model is not None:
            record["model"] = model
        records.append(record)
    definition = {
        "name": name,
        "operators": [
            {"name": s["name"], "stage": _jsonable(s["stage_ref"]),
             "arguments": _jsonable(s.get("arguments") or {}),
             "inputs": _jsonable(s.get("inputs") or {}),
             "container": s.get("container")}
            for s in stages
        ],
    }  # fmt: skip
    return {"name": name, "sha256": _digest(definition), "file": file,
            "dataflow": __version__, "stages": records}  # fmt: skip


def input_uids(payload: Path | None) -> dict[str, Any]:
    """The DICOM instances of a job's input folder (``payload/input`` for a job made through
    the API): sorted SOP Instance UIDs, a SHA-256 of them (one per line), the study and
    series UIDs, and how many files were not DICOM. No other element is read."""
    out: dict[str, Any] = {"sop_instance_uids": [], "sha256": None, "studies": [],
                           "series": [], "other_files": 0}  # fmt: skip
    if payload is None or not Path(payload).is_dir():
        return out
    import pydicom

    root = Path(payload)
    if (root / "input").is_dir():
        root = root / "input"
    tags = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
    sops, studies, series, other = set(), set(), set(), 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            try:
                with path.open("rb") as handle:
                    handle.seek(128)
                    if handle.read(4) != b"DICM":
                        other += 1
                        continue
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            except Exception:  # unreadable: counted, never fatal here
                other += 1
                continue
            if "SOPInstanceUID" in ds:
                sops.add(str(ds.SOPInstanceUID))
            if "StudyInstanceUID" in ds:
                studies.add(str(ds.StudyInstanceUID))
            if "SeriesInstanceUID" in ds:
                series.add(str(ds.SeriesInstanceUID))
    ordered = sorted(sops)
    out.update(
        sop_instance_uids=ordered,
        sha256=hashlib.sha256("".join(f"{u}\n" for u in ordered).encode()).hexdigest(),
        studies=sorted(studies),
        series=sorted(series),
        other_files=other,
    )
    return out


def _stage_names(provenance: Mapping[str, Any]) -> list[str]:
    names = [s.get("name") for s in provenance.get("stages", [])]
    own = (provenance.get("stage") or {}).get("name")
    return [str(n) for n in [*names, own] if n]


def describe(provenance: Mapping[str, Any] | None) -> str:
    """The Contribution Description (ST, at most 1024 characters)."""
    if not provenance:
        return f"dataflow {__version__}"
    pipeline = provenance.get("pipeline") or {}
    inputs = provenance.get("inputs") or {}
    text = (f"dataflow pipeline {pipeline.get('name')} sha256:"
            f"{str(pipeline.get('sha256') or '')[:12]}, job {provenance.get('job')}")  # fmt: skip
    if inputs.get("sha256"):
        count = len(inputs.get("sop_instance_uids") or [])
        text += f", inputs sha256:{inputs['sha256'][:12]} ({count} instances)"
    stages = "; stages: " + " > ".join(_stage_names(provenance))
    if len(text) + len(stages) > 1024:
        stages = stages[: 1024 - len(text) - 3] + "..."
    return text + stages


def parse_description(text: str) -> dict[str, Any] | None:
    """What :func:`describe` wrote: ``{"pipeline", "sha256", "job", "inputs_sha256",
    "inputs", "stages"}``; None for another description."""
    found = _DESCRIPTION.match(str(text or "").strip())
    if found is None:
        return None
    stages = found["stages"]
    return {
        "pipeline": found["pipeline"], "sha256": found["sha"], "job": found["job"],
        "inputs_sha256": found["inputs"],
        "inputs": int(found["count"]) if found["count"] else None,
        "stages": [s.strip() for s in stages.split(">")] if stages else [],
    }  # fmt: skip


def read_provenance(job_dir: Path) -> dict[str, Any] | None:
    """A job folder's ``provenance.json``, or None without one (or unreadable)."""
    try:
        return json.loads((Path(job_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None


class JobProvenance:
    """The coordinator's side: one record per job in flight, written at the job's end.

    ``pipeline``: :func:`pipeline_record`; ``devices``: stage -> the device per replica
    (GPU index or None); ``output_root``: the executor's (``JOB/provenance.json`` under it)."""

    def __init__(
        self,
        pipeline: Mapping[str, Any],
        devices: Mapping[str, Sequence[int | None]],
        output_root: Path,
    ) -> None:
        self.pipeline = dict(pipeline)
        self.static = {s["name"]: s for s in self.pipeline.get("stages", [])}
        self.head = {k: v for k, v in self.pipeline.items() if k != "stages"}
        self.devices = {name: list(d) for name, d in devices.items()}
        self.output_root = Path(output_root)
        self.host = socket.gethostname()
        self._inputs: dict[str, concurrent.futures.Future] = {}
        self._submitted: dict[str, float] = {}
        self._stages: dict[str, list[dict[str, Any]]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def begin(self, job: str, payload: str | Path | None, now: float) -> None:
        """A job was submitted: its input's UIDs are read on the side."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "provenance")
        self._submitted[job] = now
        self._stages[job] = []
        folder = None if payload is None else Path(payload)
        self._inputs[job] = self._pool.submit(input_uids, folder)

    def device(self, stage: str, replica: int) -> str:
        devices = self.devices.get(stage) or []
        index = devices[replica] if replica < len(devices) else None
        return "cpu" if index is None else f"cuda:{index}"

    def ran(self, job: str, stage: str, replica: int, start: float, end: float, ok: bool) -> None:
        """Stage ``stage`` (replica ``replica``) ran ``job`` from ``start`` to ``end``."""
        if job not in self._stages:
            return
        self._stages[job].append({
            **self.static.get(stage, {"name": stage}),
            "replica": replica, "device": self.device(stage, replica), "host": self.host,
            "start": utc(start), "end": utc(end), "ok": ok,
        })  # fmt: skip

    def _inputs_of(self, job: str) -> dict[str, Any]:
        future = self._inputs.get(job)
        if future is None:
            return input_uids(None)
        try:
            return future.result()
        except Exception as exc:  # a bug reading the folder: the record says so, the job goes on
            log.warning("provenance_inputs_unread", job=job, error=type(exc).__name__)
            return {**input_uids(None), "error": type(exc).__name__}

    def snapshot(self, job: str, stage: str) -> dict[str, Any]:
        """What ``ctx.provenance`` is for ``stage`` running ``job``: the record so far."""
        return {
            "version": VERSION, "job": job, "pipeline": self.head, "inputs": self._inputs_of(job),
            "stages": list(self._stages.get(job, [])), "stage": self.static.get(stage),
        }  # fmt: skip

    def finish(self, job: str, ok: bool, stage: str | None) -> dict[str, Any] | None:
        """The job's whole record, written as ``OUTPUT_ROOT/JOB/provenance.json`` (a failed
        job's: the stage it failed in; why, which may quote patient data, is the job
        record's, scrubbed)."""
        if job not in self._stages:
            return None
        record = {
            "version": VERSION, "job": job, "pipeline": self.head,
            "inputs": self._inputs_of(job),
            "stages": self._stages.pop(job), "outputs": self._notes(job),
            "submitted": utc(self._submitted.pop(job)), "ok": ok,
            **({} if ok else {"failed_stage": stage}),  # the reason: the job record's
        }  # fmt: skip
        self._inputs.pop(job, None)
        folder = self.output_root / job
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # one line: json's C encoder (indenting takes its Python one, ten times slower);
            # ``dataflow trace --json`` shows it indented
            (folder / FILE).write_text(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: the job's result stands without it
            log.warning("provenance_unwritten", job=job, error=str(exc))
        return record

    def _notes(self, job: str) -> list[dict[str, Any]]:
        folder = self.output_root / job / NOTES
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            try:
                out += json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def write_notes(job_dir: Path, stage: str, notes: Sequence[Mapping[str, Any]]) -> None:
    """A worker's side: the output instances ``stage`` noted for the job (``ctx.note_output``)."""
    folder = Path(job_dir) / NOTES
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps([dict(n) for n in notes], indent=1))
