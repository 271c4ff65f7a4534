"""The job's provenance in the DICOM a writer makes (docs/provenance.md).

A writer stage sets ``wants_provenance = True`` and gets the job's record so far as
``ctx.provenance`` (:mod:`dataflow.execution.provenance`). From it:

- :func:`add_contributing_equipment` adds an item to the Contributing Equipment Sequence
  (0018,A001): Manufacturer ``dataflow``, Software Versions (dataflow's, the pipeline's short
  hash, each model's name and version), Contribution DateTime, Purpose of Reference DCM 109102
  "Processing Equipment" (PS3.16 CID 7005: equipment that processed instances to make new
  ones) and a Contribution Description naming the pipeline (name and short hash), the job,
  the inputs' hash and the stages in order (:func:`dataflow.execution.provenance.describe`;
  ``dataflow trace`` on a file reads it back).
- :func:`algorithm` is a SEG's Segmentation Algorithm Identification: the model's name and
  version when an upstream stage used one (family Artificial Intelligence), else the
  pipeline's name and short hash (family Morphological Operations: thresholds, connected
  components and filled holes, as the reference pipelines do), with the pipeline, its hash
  and the job as Algorithm Parameters.

Without a record (a stage run by ``dataflow.testing``) the item names dataflow only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dataflow import __version__
from dataflow.execution.provenance import describe

__all__ = [
    "add_contributing_equipment",
    "algorithm",
    "models",
    "note",
    "stamp",
]

PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # PS3.16 CID 7005


def _lo(text: str) -> str:
    return text[:64]


def models(provenance: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The models the upstream stages used (and this one), in order, each once."""
    if not provenance:
        return []
    stages = [*provenance.get("stages", []), provenance.get("stage") or {}]
    out, seen = [], set()
    for stage in stages:
        model = stage.get("model")
        key = model and (model.get("name"), model.get("version"), model.get("sha256"))
        if model and key not in seen:
            seen.add(key)
            out.append(model)
    return out


def add_contributing_equipment(ds: Dataset, provenance: Mapping[str, Any] | None) -> Dataset:
    """Append dataflow's item to ``ds``'s Contributing Equipment Sequence (made if absent)."""
    pipeline = (provenance or {}).get("pipeline") or {}
    versions = [f"dataflow {__version__}"]
    if pipeline.get("name"):
        versions.append(_lo(f"{pipeline['name']} {str(pipeline.get('sha256') or '')[:12]}"))
    for model in models(provenance):
        version = model.get("version") or str(model.get("sha256") or "")[:12] or "?"
        versions.append(_lo(f"model {model.get('name')} {version}"))
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_EQUIPMENT
    item = Dataset()
    item.Manufacturer = "dataflow"
    item.ManufacturerModelName = "dataflow"
    item.SoftwareVersions = versions if len(versions) > 1 else versions[0]
    now = datetime.datetime.now(datetime.UTC)
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f+0000")
    item.ContributionDescription = describe(provenance)
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = DicomSequence([])
    ds.ContributingEquipmentSequence.append(item)
    return item


def algorithm(provenance: Mapping[str, Any] | None) -> tuple[str, str, str, dict[str, str]]:
    """A SEG's algorithm: (name, version, family keyword of CID 7162, parameters)."""
    used = models(provenance)
    pipeline = (provenance or {}).get("pipeline") or {}
    parameters: dict[str, str] = {}
    if pipeline.get("name"):
        parameters = {"pipeline": str(pipeline["name"]),
                      "pipeline_sha256": str(pipeline.get("sha256") or "")[:12],
                      "job": str((provenance or {}).get("job"))}  # fmt: skip
    if used:
        model = used[-1]
        version = model.get("version") or str(model.get("sha256") or "")[:12] or "unknown"
        if model.get("sha256"):
            parameters["model_sha256"] = str(model["sha256"])[:12]
        return _lo(str(model.get("name"))), _lo(str(version)), "ArtificialIntelligence", parameters
    if pipeline.get("name"):
        return (_lo(str(pipeline["name"])), _lo(str(pipeline.get("sha256") or "")[:12]),
                "MorphologicalOperations", parameters)  # fmt: skip
    return "dataflow", __version__, "ArtificialIntelligence", parameters


def note(ctx: Any, ds: Dataset) -> None:
    """Tell the job's provenance (``ctx.note_output``) that it wrote ``ds``."""
    ctx.note_output(ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                    series_instance_uid=ds.SeriesInstanceUID,
                    study_instance_uid=ds.StudyInstanceUID,
                    file=f"{ds.SOPInstanceUID}.dcm")  # fmt: skip


def stamp(ctx: Any, ds: Dataset) -> Dataset:
    """The job's provenance into ``ds`` (:func:`add_contributing_equipment`), and ``ds``
    noted as one of the job's outputs (:func:`note`): what a writer does per instance."""
    add_contributing_equipment(ds, ctx.provenance)
    note(ctx, ds)
    return ds
