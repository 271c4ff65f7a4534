"""DICOM RT Structure Set (RTSTRUCT) from a label volume: planar contours per slice and ROI.

The label volume is ``uint8 [D, H, W]`` in the geometry of a source series read by
``SeriesToVolume`` (as for ``operators.dicom.seg``). Each ROI is one label value; on every slice
its mask is traced with scikit-image's marching squares (``measure.find_contours`` at level 0.5
on the zero-padded mask, so every contour is closed and passes half-way between the centres of
pixels in and out of the ROI). Contour points go to patient coordinates (LPS mm) through the
volume's origin, direction and spacing, so they lie on the source slice's plane, axial or
oblique.

Holes: an ROI's contours on one slice are written as separate ``CLOSED_PLANAR`` contours, outer
boundaries and hole boundaries alike, to be combined by the even-odd (XOR) rule -- a contour
inside another is a hole, one inside a hole an island. This is how treatment-planning systems
(and rt-utils, plastimatch, Slicer's reader) interpret nested contours.

ROIs are configured as a list of mappings::

    - {label: 1, name: Body, color: [0, 255, 0], type: EXTERNAL}
    - {label: 2, name: Lung, type: ORGAN}

``color`` (ROIDisplayColor, three 0-255 integers) and ``type`` (RTROIInterpretedType) are
optional.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from dataflow import __version__
from dataflow.stage import Port, Stage, StageError
from operators.dicom.geometry import decimal_strings, patient_points
from operators.dicom.provenance import stamp
from operators.dicom.seg import check_allow_empty, refuse_empty, source_datasets

__all__ = ["DEFAULT_ROIS", "ROI_TYPES", "WriteRTStruct", "make_rtstruct", "slice_contours"]

DEFAULT_ROIS: tuple[Mapping[str, Any], ...] = (
    {"label": 1, "name": "Body", "color": [0, 255, 0], "type": "EXTERNAL"},
    {"label": 2, "name": "Lung", "color": [0, 128, 255], "type": "ORGAN"},
    {"label": 3, "name": "Bone", "color": [255, 255, 160], "type": "ORGAN"},
)

#: RTROIInterpretedType defined terms (PS3.3 C.8.8.8), plus "" (type 2: unknown).
ROI_TYPES = frozenset({
    "", "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS",
    "AVOIDANCE", "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY",
    "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT",
    "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
})  # fmt: skip

# Detached Study Management SOP Class: the value PS3.3 C.8.8.5 gives for RT Referenced Study.
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
)  # fmt: skip


def check_rois(rois: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ROI list with defaults filled in; StageError naming the first bad entry."""
    out, seen = [], set()
    for i, roi in enumerate(rois, 1):
        where = f"ROI {i} ({roi.get('name', '?')!r})"
        missing = {"label", "name"} - set(roi)
        if missing:
            raise StageError(f"{where}: missing {sorted(missing)}")
        label = int(roi["label"])
        if not 0 < label < 256 or label in seen:
            raise StageError(f"{where}: label {label} must be unique and within 1..255")
        seen.add(label)
        color = [int(c) for c in roi.get("color", [255, 0, 0])]
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise StageError(f"{where}: color must be three integers 0..255; got {color}")
        kind = str(roi.get("type", "")).upper()
        if kind not in ROI_TYPES:
            raise StageError(f"{where}: type {kind!r} is not an RTROIInterpretedType")
        out.append({"label": label, "name": str(roi["name"]), "color": color, "type": kind})
    return out


def slice_contours(mask: np.ndarray, tolerance: float = 0.01) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` of (row, column) pixel indices around ``mask`` (2D).

    Outer boundaries and holes alike (even-odd rule); the closing point is not repeated.
    ``tolerance`` (pixels) drops points that are (nearly) collinear with their neighbours.
    """
    from skimage import measure

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    contours = []
    for contour in measure.find_contours(padded, 0.5):
        contour = measure.approximate_polygon(contour, tolerance) - 1.0
        if len(contour) > 3:  # closed: first point == last point
            contours.append(contour[:-1])
    return contours


def _item(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _image_refs(sources: Sequence[Dataset]) -> DicomSequence:
    return DicomSequence(
        [_item(ReferencedSOPClassUID=s.SOPClassUID, ReferencedSOPInstanceUID=s.SOPInstanceUID)
         for s in sources]
    )  # fmt: skip


def _header(first: Dataset, series_number: int, series_description: str) -> Dataset:
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    for keyword in _PATIENT_AND_STUDY:  # type 2 (may be empty) but PatientAge, StudyDescription
        if keyword in first:
            ds[keyword] = copy.deepcopy(first[keyword])
        elif keyword not in ("PatientAge", "StudyDescription"):
            setattr(ds, keyword, "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.Manufacturer = "dataflow"
    ds.ManufacturerModelName = "dataflow"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = series_description[:16] or "ROIs"
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    return ds


def make_rtstruct(
    labels: np.ndarray,
    sources: Sequence[Dataset],
    metadata: Mapping[str, Any],
    rois: Sequence[Mapping[str, Any]] = DEFAULT_ROIS,
    *,
    series_description: str = "Structure set",
    series_number: int = 9100,
    tolerance: float = 0.01,
    allow_empty: bool | Sequence[str] = (),
) -> Dataset:
    """An RT Structure Set of ``labels``, whose slices are ``sources`` (same order) and whose
    geometry is ``metadata``'s (docs/tensors.md). An ROI without a voxel raises
    ``EmptySegmentError`` unless ``allow_empty`` names it (True: any)."""
    rois = check_rois(rois)
    if labels.ndim != 3 or labels.shape[0] != len(sources):
        raise StageError(
            f"label volume {list(labels.shape)} does not match the {len(sources)} source slices"
        )
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = present - {r["label"] for r in rois}
    if unknown:
        raise StageError(f"label value(s) {sorted(unknown)} have no ROI description")
    refuse_empty(rois, present, allow_empty, labels.shape[0], sources[0], "ROI")
    first = sources[0]
    frame_uid = str(metadata.get("frame_of_reference_uid") or first.FrameOfReferenceUID)
    ds = _header(first, series_number, series_description)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    series_ref = _item(SeriesInstanceUID=first.SeriesInstanceUID)
    series_ref.ContourImageSequence = _image_refs(sources)
    study_ref = _item(ReferencedSOPClassUID=_STUDY_SOP_CLASS,
                      ReferencedSOPInstanceUID=first.StudyInstanceUID)  # fmt: skip
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = _item(FrameOfReferenceUID=frame_uid)
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, roi in enumerate(rois, 1):
        ds.StructureSetROISequence.append(_item(
            ROINumber=number, ReferencedFrameOfReferenceUID=frame_uid, ROIName=roi["name"],
            ROIGenerationAlgorithm="AUTOMATIC",
        ))  # fmt: skip
        contours = DicomSequence()
        for k, source in enumerate(sources):
            for contour in slice_contours(labels[k] == roi["label"], tolerance):
                index = np.column_stack([np.full(len(contour), float(k)), contour])
                item = _item(ContourGeometricType="CLOSED_PLANAR",
                             NumberOfContourPoints=len(contour),
                             ContourNumber=len(contours) + 1)  # fmt: skip
                item.ContourImageSequence = _image_refs([source])
                item.ContourData = decimal_strings(patient_points(metadata, index))
                contours.append(item)
        roi_contour = _item(ReferencedROINumber=number, ROIDisplayColor=roi["color"])
        if contours:
            roi_contour.ContourSequence = contours
        ds.ROIContourSequence.append(roi_contour)
        ds.RTROIObservationsSequence.append(_item(
            ObservationNumber=number, ReferencedROINumber=number, ROIObservationLabel=roi["name"],
            RTROIInterpretedType=roi["type"], ROIInterpreter="",
        ))  # fmt: skip
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class WriteRTStruct(Stage):
    """Writes ``labels`` as an RT Structure Set referencing the source series in ``study``."""

    inputs = {
        "labels": Port("array", element_type="uint8", shape=(-1, -1, -1)),
        "study": Port("stream", element_type="dicom"),
    }
    outputs = {"rtstruct": Port("stream", element_type="dicom")}
    wants_provenance = True  # ctx.provenance: the job's record, into the structure set

    def __init__(
        self,
        rois: list | None = None,
        series_description: str = "Structure set",
        series_number: int = 9100,
        tolerance: float = 0.01,
        allow_empty: bool | list[str] = False,
    ):
        self.rois = check_rois(rois or DEFAULT_ROIS)  # bad ROIs fail when the worker starts
        self.allow_empty = check_allow_empty(allow_empty, self.rois, "WriteRTStruct")
        self.series_description = series_description
        self.series_number = series_number
        self.tolerance = tolerance

    def execute(self, ctx, labels, study: Path) -> Path:
        metadata = ctx.metadata["labels"]
        sources = source_datasets(study, metadata)
        ds = make_rtstruct(
            labels, sources, metadata, self.rois, series_description=self.series_description,
            series_number=self.series_number, tolerance=self.tolerance,
            allow_empty=self.allow_empty,
        )  # fmt: skip
        stamp(ctx, ds)
        out = ctx.output_dir("rtstruct")
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        ctx.log.info(
            "rtstruct_written",
            rois=len(self.rois),
            contours=sum(len(r.get("ContourSequence", [])) for r in ds.ROIContourSequence),
        )
        return out
