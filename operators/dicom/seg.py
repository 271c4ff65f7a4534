"""DICOM Segmentation (SEG) from a label volume, with highdicom.

The label volume is ``uint8 [D, H, W]`` in the geometry of a source series read by
``SeriesToVolume`` (its metadata names the series and, per slice, the SOP Instance UID). Each
label value is one segment; the writer finds the source files in the job's study folder, so the
SEG references them, belongs to the same study and frame of reference, and is a new series.

Segments are configured as a list of mappings (YAML or Python)::

    - {label: 1, name: Body, category: AnatomicalStructure,
       type: "SCT:38266002:Entire body as a whole"}
    - {label: 2, name: Lung, category: AnatomicalStructure, type: Lung}

``category`` and ``type`` are keywords of pydicom's SNOMED CT dictionary (``Lung``, ``Bone``,
``Tissue``...) or ``SCHEME:VALUE:MEANING`` codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dataflow import __version__
from dataflow.stage import Port, Stage, StageError
from operators.dicom.series import find_files

__all__ = ["DEFAULT_SEGMENTS", "WriteSegmentation", "make_segmentation"]

DEFAULT_SEGMENTS: tuple[Mapping[str, Any], ...] = (
    {"label": 1, "name": "Body", "category": "AnatomicalStructure",
     "type": "SCT:38266002:Entire body as a whole"},
    {"label": 2, "name": "Lung", "category": "AnatomicalStructure", "type": "Lung"},
    {"label": 3, "name": "Bone", "category": "Tissue", "type": "Bone"},
)  # fmt: skip


def _code(text: str, where: str):
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if text.count(":") >= 2:
        scheme, value, meaning = text.split(":", 2)
        return Code(value=value, scheme_designator=scheme, meaning=meaning)
    try:
        return getattr(codes.SCT, text)
    except (AttributeError, NotImplementedError):
        raise StageError(
            f"{where}: {text!r} is not a SNOMED CT keyword in pydicom's dictionary; "
            "write it as SCHEME:VALUE:MEANING (e.g. SCT:39607008:Lung)"
        ) from None


def _descriptions(segments: Sequence[Mapping[str, Any]]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="dataflow", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    out = []
    for i, seg in enumerate(segments, 1):
        where = f"segment {i} ({seg.get('name', '?')!r})"
        missing = {"label", "name", "category", "type"} - set(seg)
        if missing:
            raise StageError(f"{where}: missing {sorted(missing)}")
        out.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=str(seg["name"]),
                segmented_property_category=_code(str(seg["category"]), where),
                segmented_property_type=_code(str(seg["type"]), where),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return out


def source_datasets(study: Path, metadata: Mapping[str, Any]) -> list[pydicom.Dataset]:
    """The source series' datasets in the order of the volume's slices."""
    wanted = metadata.get("sop_instance_uids")
    if not wanted:
        raise StageError("the label volume's metadata names no source slices (sop_instance_uids)")
    if metadata.get("frame_numbers"):
        raise StageError("SEG from a multi-frame source is not supported yet")
    found: dict[str, pydicom.Dataset] = {}
    for path in find_files(study):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.get("SOPInstanceUID") in wanted:
            found[str(ds.SOPInstanceUID)] = ds
    missing = [uid for uid in wanted if uid not in found]
    if missing:
        raise StageError(
            f"{len(missing)} source slice(s) of series {metadata.get('series_instance_uid')} "
            f"are not in the study folder (first: {missing[0]})"
        )
    return [found[uid] for uid in wanted]


def make_segmentation(
    labels: np.ndarray,
    sources: Sequence[pydicom.Dataset],
    segments: Sequence[Mapping[str, Any]] = DEFAULT_SEGMENTS,
    *,
    series_description: str = "Segmentation",
    series_number: int = 9000,
):
    """A highdicom Segmentation of ``labels`` (one frame per source slice, same order)."""
    import highdicom as hd

    if labels.ndim != 3 or labels.shape[0] != len(sources):
        raise StageError(
            f"label volume {list(labels.shape)} does not match the {len(sources)} source slices"
        )
    known = {int(s["label"]) for s in segments}
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = present - known
    if unknown:
        raise StageError(f"label value(s) {sorted(unknown)} have no segment description")
    # highdicom numbers segments 1..n in the order given: map label values onto that.
    order = {int(s["label"]): i for i, s in enumerate(segments, 1)}
    lut = np.zeros(256, dtype=np.uint8)
    for value, number in order.items():
        lut[value] = number
    pixels = lut[labels]
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(segments),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dataflow",
        manufacturer_model_name="dataflow",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
    )


class WriteSegmentation(Stage):
    """Writes ``labels`` as a DICOM SEG referencing the source series in ``study``."""

    inputs = {
        "labels": Port("array", element_type="uint8", shape=(-1, -1, -1)),
        "study": Port("stream", element_type="dicom"),
    }
    outputs = {"seg": Port("stream", element_type="dicom")}

    def __init__(
        self,
        segments: list | None = None,
        series_description: str = "Segmentation",
        series_number: int = 9000,
    ):
        self.segments = list(segments) if segments else list(DEFAULT_SEGMENTS)
        _descriptions(self.segments)  # bad codes fail when the worker starts, not per job
        self.series_description = series_description
        self.series_number = series_number

    def execute(self, ctx, labels, study: Path) -> Path:
        sources = source_datasets(study, ctx.metadata["labels"])
        seg = make_segmentation(
            labels, sources, self.segments,
            series_description=self.series_description, series_number=self.series_number,
        )  # fmt: skip
        out = ctx.output_dir("seg")
        seg.save_as(out / f"{seg.SOPInstanceUID}.dcm")
        ctx.log.info(
            "segmentation_written",
            segments=len(self.segments),
            frames=len(seg.PerFrameFunctionalGroupsSequence),
        )
        return out
