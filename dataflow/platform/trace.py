"""``dataflow trace``: what made a result, from any of its UIDs (docs/provenance.md).

A UID is looked up as an output SOP Instance UID (the jobs that wrote it), an input study,
series or SOP Instance UID (the jobs that took it in), or a job id; the answer lists each job
with its state, its provenance record (:mod:`dataflow.execution.provenance`: the inputs and
their hash, the pipeline and its hash, the chain of stages with operator, version,
parameters, model, device and times, the outputs) and, in a service, where its results were
delivered. Three places answer:

- a running service, through the API: ``GET /api/v1/trace/{uid}`` (:func:`add_routes`; the
  job records' index, :meth:`dataflow.service.jobs.JobStore.trace`);
- a ``dataflow run`` output folder, offline: its ``JOB/provenance.json`` files
  (:func:`trace_folder`);
- a DICOM file, offline: its Contributing Equipment Sequence and, for a SEG, its algorithm
  identification, with the ``provenance.json`` of the job folder it sits in when there is
  one (:func:`trace_file`).

An unknown UID is a :class:`NotFound` naming it (404 through the API).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dataflow.execution.provenance import FILE, parse_description, read_provenance, short_hash
from dataflow.platform.errors import NotFound

__all__ = ["add_routes", "format_trace", "trace_file", "trace_folder", "trace_jobs"]

#: how far up from a DICOM file a job's provenance.json is looked for
_UP = 5
PROCESSING_EQUIPMENT = "109102"  # DCM, PS3.16 CID 7005: what dataflow's writers add
#: Clara's code for "no such job" is the nearest there is: a UID that matches none
TRACE_MISSING = -0x2001


def _not_found(uid: str, where: str) -> NotFound:
    return NotFound(f"no job made or took in {uid!r} ({where}): it is no output SOP Instance "
                    "UID, input study, series or SOP Instance UID or job id known there",
                    code=TRACE_MISSING)  # fmt: skip


def _matches(record: Mapping[str, Any], uid: str) -> list[str]:
    """How ``uid`` relates to the job of ``record``: output, study, series, instance, job."""
    kinds = []
    if any(o.get("sop_instance_uid") == uid for o in record.get("outputs") or ()):
        kinds.append("output")
    inputs = record.get("inputs") or {}
    for kind, key in (("study", "studies"), ("series", "series"),
                      ("instance", "sop_instance_uids")):  # fmt: skip
        if uid in (inputs.get(key) or ()):
            kinds.append(kind)
    if record.get("job") == uid:
        kinds.append("job")
    return kinds


def trace_jobs(jobs: Any, uid: str) -> dict[str, Any]:
    """From a service's job records (:class:`dataflow.service.jobs.JobStore`)."""
    found: dict[str, list[str]] = {}
    for job_id, kind in jobs.trace(uid):
        found.setdefault(job_id, []).append(kind)
    if not found:
        raise _not_found(uid, "the service's job records")
    out = []
    for job_id, kinds in found.items():
        record = jobs.get(job_id)
        out.append({
            "id": job_id, "as": kinds, "pipeline": record.pipeline, "state": record.state,
            "created": record.created, "started": record.started, "finished": record.finished,
            "provenance": jobs.provenance(job_id),
            "deliveries": [{k: d[k] for k in ("destination", "state", "updated")}
                           for d in jobs.deliveries(job_id)],
        })  # fmt: skip
    return {"uid": uid, "jobs": out}


def _records(folder: Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    """Every job's provenance in a ``dataflow run`` output folder (or a job's folder)."""
    for path in [folder / FILE, *sorted(folder.glob(f"*/{FILE}"))]:
        record = read_provenance(path.parent)
        if record is not None:
            yield path.parent, record


def _job(folder: Path, record: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    return {"id": record.get("job"), "as": kinds, "pipeline": (record.get("pipeline") or {})
            .get("name"), "state": "succeeded" if record.get("ok") else "failed",
            "folder": str(folder), "provenance": record}  # fmt: skip


def trace_folder(folder: str | Path, uid: str | None = None) -> dict[str, Any]:
    """From a ``dataflow run`` output folder: the jobs ``uid`` belongs to (every job of
    the folder when ``uid`` is None)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotFound(f"{folder}: not a folder")
    out = []
    for where, record in _records(root):
        kinds = ["job"] if uid is None else _matches(record, uid)
        if kinds:
            out.append(_job(where, record, kinds))
    if not out:
        if uid is None:
            raise NotFound(f"{folder}: holds no {FILE} (not a dataflow run output folder, or "
                           "from a version without provenance)")  # fmt: skip
        raise _not_found(uid, f"the provenance.json files under {folder}")
    return {"uid": uid, "jobs": out}


def _dicom(path: Path) -> dict[str, Any]:
    """What a DICOM file says of its making: its UIDs, dataflow's Contributing Equipment
    items (parsed), a SEG's algorithms, the instances and series it references."""
    import pydicom

    from dataflow.errors import MissingFile

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise MissingFile(f"{path}: not a DICOM file dataflow can read ({exc})") from None
    contributions = []
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = next(iter(item.get("PurposeOfReferenceCodeSequence", [])), None)
        if (
            str(item.get("Manufacturer", "")) != "dataflow"
            or purpose is None
            or (str(purpose.get("CodeValue", "")) != PROCESSING_EQUIPMENT)
        ):
            continue  # the source's acquisition equipment, copied by the writer
        contributions.append({
            "software_versions": [str(v) for v in _values(item.get("SoftwareVersions"))],
            "datetime": str(item.get("ContributionDateTime", "")),
            "description": str(item.get("ContributionDescription", "")),
            "purpose": f"{purpose.CodingSchemeDesignator} {purpose.CodeValue} "
                       f"{purpose.CodeMeaning}",
            **(parse_description(str(item.get("ContributionDescription", ""))) or {}),
        })  # fmt: skip
    algorithms = []
    for segment in ds.get("SegmentSequence", []):
        for algo in segment.get("SegmentationAlgorithmIdentificationSequence", []):
            algorithms.append({
                "segment": int(segment.SegmentNumber), "label": str(segment.SegmentLabel),
                "type": str(segment.get("SegmentAlgorithmType", "")),
                "name": str(algo.get("AlgorithmName", "")),
                "version": str(algo.get("AlgorithmVersion", "")),
                "parameters": str(algo.get("AlgorithmParameters", "")),
            })  # fmt: skip
    referenced = set()
    for series in ds.get("ReferencedSeriesSequence", []):
        for instance in series.get("ReferencedInstanceSequence", []):
            referenced.add(str(instance.ReferencedSOPInstanceUID))
    for source in ds.get("SourceImageSequence", []):
        referenced.add(str(source.ReferencedSOPInstanceUID))
    return {
        "file": str(path), "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class": getattr(ds.get("SOPClassUID"), "name", str(ds.get("SOPClassUID", ""))),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "contributions": contributions, "algorithms": algorithms,
        "referenced_instances": sorted(referenced),
    }  # fmt: skip


def _values(value: Any) -> list[Any]:
    """A DICOM value of any multiplicity as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def trace_file(path: str | Path) -> dict[str, Any]:
    """From a DICOM file: what it says (:func:`_dicom`), and the job whose provenance.json
    (in the job folder the file sits in, as ``dataflow run`` and ``dataflow serve`` leave
    it) lists it as an output."""
    path = Path(path)
    dicom = _dicom(path)
    uid = dicom["sop_instance_uid"]
    jobs = []
    for folder in list(path.resolve().parents)[:_UP]:
        record = read_provenance(folder)
        if record is not None and "output" in _matches(record, uid):
            jobs.append(_job(folder, record, ["output"]))
            break
    if not jobs and not dicom["contributions"]:
        raise NotFound(f"{path}: SOP Instance {uid} holds no dataflow provenance (no "
                       "Contributing Equipment item by dataflow) and no job folder's "
                       f"{FILE} lists it")  # fmt: skip
    return {"uid": uid, "jobs": jobs, "dicom": dicom}


# ----------------------------------------------------------------------- text


def _when(text: str | None) -> str:
    return (text or "?").replace("T", " ").removesuffix("Z")[:23]


def _parameters(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "-"


def format_trace(answer: Mapping[str, Any]) -> str:
    """The text ``dataflow trace`` prints (``--json`` prints ``answer`` itself)."""
    lines = []
    dicom = answer.get("dicom")
    if dicom:
        lines.append(f"file {dicom['file']}: {dicom['sop_class']} {dicom['sop_instance_uid']}")
        for c in dicom["contributions"]:
            lines.append(f"  made by {', '.join(c['software_versions'])} at {c['datetime']}"
                         f" ({c['purpose']})")  # fmt: skip
            lines.append(f"  {c['description']}")
        for a in dicom["algorithms"]:
            lines.append(f"  segment {a['segment']} {a['label']!r}: {a['type']} "
                         f"{a['name']} {a['version']}")  # fmt: skip
        if dicom["referenced_instances"]:
            lines.append(f"  references {len(dicom['referenced_instances'])} source instance(s)")
    for job in answer.get("jobs", []):
        record = job.get("provenance") or {}
        pipeline = record.get("pipeline") or {}
        lines.append(f"job {job['id']}  {job.get('state', '?')}  ({' and '.join(job['as'])} "
                     f"of {answer.get('uid') or 'it'})")  # fmt: skip
        if not record:
            lines.append("  (no provenance recorded for this job)")
            continue
        digest = short_hash(pipeline.get("sha256"))
        lines.append(f"  pipeline  {pipeline.get('name')}  sha256:{digest}"
                     f"  (dataflow {pipeline.get('dataflow')})")  # fmt: skip
        inputs = record.get("inputs") or {}
        lines.append(f"  inputs    {len(inputs.get('sop_instance_uids') or [])} instance(s), "
                     f"sha256:{short_hash(inputs.get('sha256'))}")  # fmt: skip
        for study in inputs.get("studies") or []:
            lines.append(f"            study {study}")
        for series in inputs.get("series") or []:
            lines.append(f"            series {series}")
        lines.append("  stages")
        for n, stage in enumerate(record.get("stages") or [], 1):
            version = f"{stage.get('package')} {stage.get('version')}" if stage.get(
                "package") else "?"  # fmt: skip
            lines.append(f"    {n:>2}. {stage['name']:<20} {stage.get('operator')} ({version})"
                         f"  {stage.get('device')}@{stage.get('host')}  "
                         f"{_when(stage.get('start'))} -> {_when(stage.get('end'))[11:]}"
                         f"{'' if stage.get('ok', True) else '  FAILED'}")  # fmt: skip
            lines.append(f"        parameters {_parameters(stage.get('parameters') or {})}")
            model = stage.get("model")
            if model:
                lines.append(f"        model {model.get('name')} version {model.get('version')}"
                             f" sha256:{model.get('sha256') or '?'}")  # fmt: skip
        for output in record.get("outputs") or []:
            lines.append(f"  output    {output['sop_instance_uid']} (by {output.get('stage')}, "
                         f"series {output.get('series_instance_uid')})")  # fmt: skip
        for delivery in job.get("deliveries") or []:
            lines.append(f"  delivery  {delivery['destination']}: {delivery['state']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------- API


def add_routes(app: Any, platform: Any, prefix: str, figures: Any = None) -> None:
    """``GET {prefix}/trace/{uid}`` on the FastAPI ``app`` (the read role)."""

    @app.get(f"{prefix}/trace/{{uid}}", tags=["jobs"])
    def trace(uid: str) -> dict[str, Any]:
        """The jobs that made ``uid`` (an output SOP Instance UID) or took it in (an input
        study, series or SOP Instance UID), each with its provenance and deliveries."""
        return trace_jobs(platform.jobs, uid)
