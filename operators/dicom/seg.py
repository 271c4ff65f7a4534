"""DICOM Segmentation (SEG) from a label volume, with highdicom.

The label volume is ``uint8 [D, H, W]`` in the geometry of a source series read by
``SeriesToVolume`` (its metadata names the series and, per slice, the SOP Instance UID). Each
label value is one segment; the writer finds the source files in the job's study folder, so the
SEG references them, belongs to the same study and frame of reference, and is a new series.

Segments are configured as a list of mappings (YAML or Python)::

    - {label: 1, name: Body without lung and bone, category: Tissue, type: SoftTissue}
    - {label: 2, name: Lung, category: AnatomicalStructure, type: Lung}

A label volume has one label per voxel, so segments never overlap: where labels are painted
over others (lung and bone over the body), the segment under them holds what is left, and its
label and code must say so (the default label 1 is soft tissue, not "Entire body").

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
from dataflow.errors import DataflowError
from dataflow.stage import ParameterError, Port, Stage, StageError
from operators.dicom import seg_fast
from operators.dicom.provenance import add_contributing_equipment, algorithm, note
from operators.dicom.reading import read_header
from operators.dicom.series import find_files

__all__ = [
    "DEFAULT_SEGMENTS",
    "EmptySegmentError",
    "WriteSegmentation",
    "check_allow_empty",
    "check_sources",
    "make_segmentation",
    "refuse_empty",
]


class EmptySegmentError(StageError):
    """A segment the pipeline expects has no voxel."""


# Label 1 of pipelines/ct-segmentation.yaml is the body with the lungs and bone painted over
# it: coded as what it holds (SCT 87784001 Soft tissue), not as the entire body.
DEFAULT_SEGMENTS: tuple[Mapping[str, Any], ...] = (
    {"label": 1, "name": "Body without lung and bone", "category": "Tissue",
     "type": "SoftTissue"},
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


def _descriptions(
    segments: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any] | None = None
):
    """Segment descriptions, each AUTOMATIC with the algorithm the job's provenance names
    (the model's name and version, else the pipeline's: :func:`.provenance.algorithm`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    name, version, family, parameters = algorithm(provenance)
    identification = hd.AlgorithmIdentificationSequence(
        name=name, version=version, family=getattr(codes.cid7162, family),
        source="dataflow", parameters=parameters or None,
    )  # fmt: skip
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
                algorithm_identification=identification,
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
    wanted_set = set(wanted)
    for path in find_files(study):
        name = path.relative_to(study).as_posix()
        try:
            ds = read_header(path, name)  # bounded; the pixels are not needed
        except pydicom.errors.InvalidDicomError:
            continue
        except DataflowError:
            raise
        except Exception as exc:  # pydicom raises many types on a damaged file
            raise StageError(f"cannot read the DICOM header of {name}: {exc}") from exc
        if ds.get("SOPInstanceUID") in wanted_set:
            ds.filename = name  # how messages call it
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
    allow_empty: bool | Sequence[str] = (),
    provenance: Mapping[str, Any] | None = None,
    fast: bool = True,
) -> pydicom.Dataset:
    """highdicom's Segmentation of ``labels`` (one frame per source slice, same order), with
    the job's ``provenance`` (``ctx.provenance``) in its Contributing Equipment Sequence and
    segment algorithm identification.

    With ``fast`` (the default) the same SEG comes from :mod:`.seg_fast` (highdicom builds
    what is not per frame; the per-frame groups, references and pixels are encoded directly)
    as a pydicom Dataset, where it applies; ``fast=False``, or sources it does not know:
    highdicom's Segmentation object, built frame by frame.

    A segment without a voxel raises :class:`EmptySegmentError`, unless its name is in
    ``allow_empty`` (True: any segment may be empty)."""
    import highdicom as hd

    check_sources(sources)
    if labels.ndim != 3 or labels.shape[0] != len(sources):
        raise StageError(
            f"label volume {list(labels.shape)} does not match the {len(sources)} source slices"
        )
    known = {int(s["label"]) for s in segments}
    counts = _plane_counts(labels)
    present = _values(labels, counts) - {0}
    unknown = present - known
    if unknown:
        raise StageError(f"label value(s) {sorted(unknown)} have no segment description")
    refuse_empty(segments, present, allow_empty, labels.shape[0], sources[0], "segment")
    # highdicom numbers segments 1..n in the order given: map label values onto that.
    order = {int(s["label"]): i for i, s in enumerate(segments, 1)}
    if all(order[value] == value for value in present):
        pixels = labels  # label values are the segment numbers already: no 0.1 s copy
    else:
        lut = np.zeros(256, dtype=np.uint8)
        for value, number in order.items():
            lut[value] = number
        pixels, counts = lut[labels], None

    def build(images, array):
        return _segmentation(hd, images, array, segments, series_description, series_number,
                             provenance)  # fmt: skip

    try:
        seg = None
        if fast:
            numbers = range(1, len(segments) + 1)
            seg = seg_fast.fast_segmentation(build, sources, pixels, numbers, counts)
        if seg is None:
            seg = build(list(sources), pixels)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        classes = sorted({_sop_class(ds) for ds in sources})
        raise StageError(
            f"highdicom cannot write a SEG on these sources ({', '.join(classes)}; first "
            f"{_name(sources[0])}): {type(exc).__name__}: {exc}"
        ) from exc
    add_contributing_equipment(seg, provenance)
    return seg


def _plane_counts(labels: np.ndarray) -> np.ndarray | None:
    """Each plane's count of each value (uint8 labels; else None): what the fast path needs
    to know which frames are empty, and the values present besides."""
    if labels.dtype != np.uint8 or labels.ndim != 3:
        return None
    return seg_fast.plane_counts(np.ascontiguousarray(labels).reshape(labels.shape[0], -1))


def _values(labels: np.ndarray, counts: np.ndarray | None) -> set[int]:
    """The values ``labels`` holds, from ``counts`` (its :func:`_plane_counts`: one parallel
    pass, 52 M voxels in about 0.01 s where ``np.unique`` takes 0.05 s) where there are."""
    if counts is not None:
        return set(np.flatnonzero(counts.sum(axis=0)).tolist())
    return {int(v) for v in np.unique(labels)}


def refuse_empty(items, present, allow_empty, slices, first, what) -> None:
    """EmptySegmentError when one of ``items`` (segments or ROIs: ``label``, ``name``) has no
    voxel (its label not in ``present``), unless ``allow_empty`` names it or is True."""
    if allow_empty is True:
        return
    allowed = {str(n) for n in allow_empty or ()}
    empty = [s for s in items if int(s["label"]) not in present and str(s["name"]) not in allowed]
    if empty:
        shown = ", ".join(f"{str(s['name'])!r} (label {int(s['label'])})" for s in empty)
        raise EmptySegmentError(
            f"{what}(s) {shown} have no voxel in the {slices}-slice label volume of series "
            f"{first.get('SeriesInstanceUID', '?')}: refused rather than exported empty "
            f"(allow_empty: [name] in the pipeline when an empty {what} is a valid result)"
        )


def check_allow_empty(allow_empty, items, where: str) -> bool | list[str]:
    """The ``allow_empty`` parameter checked against the names of ``items``."""
    if allow_empty is True or allow_empty is False or allow_empty is None:
        return bool(allow_empty)
    names = {str(s["name"]) for s in items}
    unknown = sorted(set(map(str, allow_empty)) - names)
    if unknown:
        raise ParameterError(f"{where}: allow_empty names {unknown}, not in {sorted(names)}")
    return [str(n) for n in allow_empty]


def _name(ds: pydicom.Dataset) -> str:
    return str(getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "?"))


def _sop_class(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "(no SOP Class UID)")


def check_sources(sources: Sequence[pydicom.Dataset]) -> None:
    """Refuse sources the SEG writer cannot reference: every one must be a single-frame image
    of an IOD that has no frames (CT, MR, PET...), with the plane's position, orientation
    and pixel spacing. The message names the file and the element."""
    try:
        from highdicom._standard_utils import is_multiframe_image
    except ImportError:  # pragma: no cover - an older or newer highdicom

        def is_multiframe_image(ds):
            return "NumberOfFrames" in ds

    multiframe: dict[str, bool] = {}  # per SOP class: highdicom's look-up is slow
    for ds in sources:
        if "SOPClassUID" not in ds:
            raise StageError(f"{_name(ds)}: (0008,0016) SOPClassUID is missing")
        sop_class = str(ds.SOPClassUID)
        if sop_class not in multiframe:
            multiframe[sop_class] = is_multiframe_image(ds)
        if multiframe[sop_class] and "SharedFunctionalGroupsSequence" not in ds:
            raise StageError(
                f"{_name(ds)}: {_sop_class(ds)} is a multi-frame IOD without functional "
                "groups; a SEG is written only on single-frame images (CT, MR, PET...)"
            )
        for keyword, tag in (
            ("ImagePositionPatient", "(0020,0032)"),
            ("ImageOrientationPatient", "(0020,0037)"),
            ("PixelSpacing", "(0028,0030)"),
        ):
            if not ds.get(keyword):
                raise StageError(f"{_name(ds)}: {tag} {keyword} is missing")


def _segmentation(hd, sources, pixels, segments, series_description, series_number,
                  provenance):  # fmt: skip
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(segments, provenance),
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
    wants_provenance = True  # ctx.provenance: the job's record, into the SEG

    def __init__(
        self,
        segments: list | None = None,
        series_description: str = "Segmentation",
        series_number: int = 9000,
        allow_empty: bool | list[str] = False,
    ):
        self.segments = list(segments) if segments else list(DEFAULT_SEGMENTS)
        _descriptions(self.segments)  # bad codes fail when the worker starts, not per job
        self.allow_empty = check_allow_empty(allow_empty, self.segments, "WriteSegmentation")
        self.series_description = series_description
        self.series_number = series_number

    def prepare(self, ctx) -> None:
        seg_fast.warmup()  # the per-plane counts and the bit packing (compiled or cached)

    def execute(self, ctx, labels, study: Path) -> Path:
        sources = source_datasets(study, ctx.metadata["labels"])
        seg = make_segmentation(
            labels, sources, self.segments,
            series_description=self.series_description, series_number=self.series_number,
            allow_empty=self.allow_empty, provenance=ctx.provenance,
        )  # fmt: skip
        out = ctx.output_dir("seg")
        seg.save_as(out / f"{seg.SOPInstanceUID}.dcm")
        note(ctx, seg)
        ctx.log.info(
            "segmentation_written",
            segments=len(self.segments),
            frames=int(seg.NumberOfFrames),
        )
        return out
