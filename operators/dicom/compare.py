"""A study compared with its prior: lung volume by thresholding on CT in both, and the change,
as a small report (``report.json``) and a DICOM Enhanced SR (docs/operators.md,
pipelines/prior-comparison.yaml).

- :func:`lung_volume`: the volume (mL) of the air-filled regions inside the body of a CT
  volume in HU: the voxels below ``threshold`` (default -400 HU) whose connected region
  (6-connected) touches no edge of an image, i.e. not the air around the patient;
- :class:`CompareLungVolume`: the current and the prior volume (``SeriesToVolume`` of each) and
  the current study's folder in; ``report`` (``report.json``: both volumes, the change in mL
  and per cent, the studies' UIDs) and ``sr`` (one Enhanced SR instance in the current study,
  with the same figures as NUM items) out.

A reference measurement, not a clinical one: trachea and bowel gas count as lung, and nothing
separates the lungs from each other.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from dataflow import __version__
from dataflow.errors import DataflowError
from dataflow.stage import ParameterError, Port, Stage
from operators.dicom.frames import SeriesError
from operators.dicom.geometry import GeometryError
from operators.dicom.reading import read_header
from operators.dicom.series import find_files

__all__ = ["CompareLungVolume", "lung_volume", "make_report_sr"]

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SCHEME = "99DATAFLOW"  # our private coding scheme for the report's concepts
#: code value -> meaning of the report's concepts
CONCEPTS = {
    "lung-vol-curr": "Lung volume, current study",
    "lung-vol-prior": "Lung volume, prior study",
    "lung-vol-change": "Lung volume change",
    "lung-vol-pct": "Lung volume change, per cent",
    "prior-study": "Prior study",
    "method": "Method",
}
#: copied from the current study into the SR (Patient and General Study modules)
_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def lung_volume(volume: np.ndarray, spacing: Sequence[float], threshold: float = -400.0) -> float:
    """The volume in mL of the regions below ``threshold`` HU inside the body: each connected
    region (6-connected) of such voxels that touches no edge of an image (row or column 0 or
    last) is counted; the air around the patient touches them. ``spacing``: mm per voxel along
    the array's three axes."""
    from scipy import ndimage

    if volume.ndim != 3:
        raise GeometryError(f"a 3-D volume is needed, not shape {list(volume.shape)}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise GeometryError(f"spacing {list(spacing)} must be three positive numbers (mm)")
    labels, count = ndimage.label(np.asarray(volume) < threshold)
    if count == 0:
        return 0.0
    edges = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])  # fmt: skip
    outside = np.unique(edges[edges > 0])
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[outside] = 0
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return float(sizes.sum()) * voxel_ml


def _code(value: str, scheme: str = SCHEME, meaning: str | None = None) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning or CONCEPTS[value]
    return code


def _num(concept: str, value: float, unit: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = [_code(concept)]
    measured = Dataset()
    measured.NumericValue = f"{value:.6g}"[:16]
    measured.MeasurementUnitsCodeSequence = [_code(unit[0], "UCUM", unit[1])]
    item.MeasuredValueSequence = [measured]
    return item


def _evidence(headers: Sequence[Dataset]) -> list[Dataset]:
    """A Hierarchical SOP Instance Reference Macro item per study of ``headers``."""
    studies: dict[str, dict[str, list[Dataset]]] = {}
    for ds in headers:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series = studies.setdefault(str(ds.StudyInstanceUID), {})
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ref)
    out = []
    for study_uid, series in studies.items():
        item = Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = []
        for series_uid, refs in series.items():
            entry = Dataset()
            entry.SeriesInstanceUID = series_uid
            entry.ReferencedSOPSequence = refs
            item.ReferencedSeriesSequence.append(entry)
        out.append(item)
    return out


def make_report_sr(
    study: Sequence[Dataset],
    figures: Mapping[str, Any],
    *,
    prior: Sequence[Dataset] = (),
    series_number: int = 9901,
    now: dt.datetime | None = None,
) -> Dataset:
    """An Enhanced SR instance in the study of ``study`` (its instances' headers: the Patient
    and Study modules are copied from the first, all are the evidence) holding ``figures``
    (``current_ml``, ``prior_ml``, ``change_ml``, ``change_percent``, ``prior_study_uid``,
    ``threshold``) as NUM, UIDREF and TEXT items; ``prior``: the prior's headers (pertinent
    other evidence)."""
    if not study:
        raise SeriesError("no image of the current study to write the report into")
    first = study[0]
    now = now or dt.datetime.now()
    ds = Dataset()
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.SOPClassUID = ENHANCED_SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Lung volume change (dataflow)"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "dataflow"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.PerformedProcedureCodeSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study)
    if prior:
        ds.PertinentOtherEvidenceSequence = _evidence(prior)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContinuityOfContent = "SEPARATE"
    items = [
        _num("lung-vol-curr", figures["current_ml"], ("ml", "milliliter")),
        _num("lung-vol-prior", figures["prior_ml"], ("ml", "milliliter")),
        _num("lung-vol-change", figures["change_ml"], ("ml", "milliliter")),
    ]
    if figures.get("change_percent") is not None:
        items.append(_num("lung-vol-pct", figures["change_percent"], ("%", "percent")))
    if figures.get("prior_study_uid"):
        uid = Dataset()
        uid.RelationshipType = "CONTAINS"
        uid.ValueType = "UIDREF"
        uid.ConceptNameCodeSequence = [_code("prior-study")]
        uid.UID = figures["prior_study_uid"]
        items.append(uid)
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = [_code("method")]
    text.TextValue = (f"Voxels below {figures['threshold']:g} HU in regions that touch no image "
                      "edge, counted in both studies")  # fmt: skip
    items.append(text)
    ds.ContentSequence = items
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _headers(folder: Path, study_uid: str | None) -> list[Dataset]:
    """The headers of the image instances in ``folder`` of the study ``study_uid`` (any study
    when None), in file order."""
    out = []
    for path in find_files(folder):
        try:
            ds = read_header(path)
        except (InvalidDicomError, OSError, ValueError, DataflowError):
            continue
        if "Rows" not in ds or "SOPInstanceUID" not in ds:
            continue
        if study_uid is None or str(ds.get("StudyInstanceUID", "")) == study_uid:
            out.append(ds)
    return out


class CompareLungVolume(Stage):
    """The current and the prior CT volume (HU, from ``SeriesToVolume``) -> the lung volume of
    each (:func:`lung_volume`, ``threshold`` HU) and the change, as ``report/report.json`` and
    an Enhanced SR in the current study (``sr/``, ready for ``RegisterResults``). ``study``:
    the current study's folder (the SR's patient and study); ``priors``: FetchPriors' folder
    (optional: the SR's evidence of the prior)."""

    inputs = {
        "current": Port("array", element_type="float32", shape=(-1, -1, -1), description="HU"),
        "prior": Port("array", element_type="float32", shape=(-1, -1, -1), description="HU"),
        "study": Port("stream", element_type="dicom", description="the current study"),
    }
    outputs = {
        "report": Port("stream", element_type="json", description="report.json"),
        "sr": Port("stream", element_type="dicom", description="the Enhanced SR"),
    }

    def __init__(self, threshold: float = -400.0, series_number: int = 9901):
        self.threshold = float(threshold)
        self.series_number = int(series_number)
        if not -1100 <= self.threshold <= 0:
            raise ParameterError(f"CompareLungVolume: threshold {threshold} HU must be -1100..0")

    def _measure(self, ctx, port: str, volume) -> tuple[float, dict[str, Any]]:
        meta = ctx.metadata.get(port) or {}
        spacing = meta.get("spacing")
        if not spacing:
            raise GeometryError(f"CompareLungVolume: the {port} volume has no spacing in its "
                               "metadata (read it with SeriesToVolume)")  # fmt: skip
        return lung_volume(np.asarray(volume), spacing, self.threshold), meta

    def execute(self, ctx, current, prior, study: Path) -> dict[str, Path]:
        current_ml, current_meta = self._measure(ctx, "current", current)
        prior_ml, prior_meta = self._measure(ctx, "prior", prior)
        change = current_ml - prior_ml
        figures = {
            "measure": "lung volume (threshold)",
            "threshold": self.threshold,
            "unit": "mL",
            "current_ml": round(current_ml, 3),
            "prior_ml": round(prior_ml, 3),
            "change_ml": round(change, 3),
            "change_percent": round(100.0 * change / prior_ml, 3) if prior_ml else None,
            "current_study_uid": current_meta.get("study_instance_uid"),
            "current_series_uid": current_meta.get("series_instance_uid"),
            "prior_study_uid": prior_meta.get("study_instance_uid"),
            "prior_series_uid": prior_meta.get("series_instance_uid"),
        }
        report = ctx.output_dir("report")
        (report / "report.json").write_text(json.dumps(figures, indent=1) + "\n")
        headers = _headers(Path(study), figures["current_study_uid"])
        sr = make_report_sr(headers, figures, series_number=self.series_number)
        out = ctx.output_dir("sr")
        sr.save_as(out / f"{sr.SOPInstanceUID}.dcm", enforce_file_format=True)
        ctx.log.info("lung_volume_compared", current_ml=figures["current_ml"],
                     prior_ml=figures["prior_ml"], change_ml=figures["change_ml"])  # fmt: skip
        return {"report": report, "sr": out}
