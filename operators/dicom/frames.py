"""One record per image plane of a DICOM series, from single-frame or multi-frame headers.

A classic image (CT, MR...) has one frame whose geometry is at the top level of the dataset;
an enhanced multi-frame image (Enhanced CT/MR...) keeps each frame's geometry in its functional
groups: ``PerFrameFunctionalGroupsSequence[i]`` first, then ``SharedFunctionalGroupsSequence``,
then the top level (a few writers put PixelSpacing or rescale there).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dataflow.errors import DataflowError

__all__ = ["Frame", "SeriesError", "element_float", "element_int", "frames_of"]


class SeriesError(DataflowError, ValueError):
    """A DICOM series cannot form one volume: the message names the series UID, the problem and
    the offending files or positions (never patient identifiers)."""


@dataclasses.dataclass(frozen=True)
class Frame:
    """One image plane: a single-frame file, or frame ``index`` (0-based) of a multi-frame one."""

    path: Path
    index: int | None
    sop_instance_uid: str
    rows: int
    columns: int
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    slope: float
    intercept: float
    thickness: float | None  # SpacingBetweenSlices, else SliceThickness (single slices only)

    @property
    def frame_number(self) -> int | None:
        """DICOM's 1-based frame number, None for a single-frame instance."""
        return None if self.index is None else self.index + 1


def _element(ds: Dataset, keyword: str, name: str) -> str:
    """How a message names an element of a file: ``slice-012.dcm: (0028,0010) Rows``."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword) or 0
    return f"{name}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def _shown(value: Any) -> str:
    text = repr(str(value))
    return text if len(text) <= 40 else text[:37] + "...'"


def _value(ds: Dataset, keyword: str, name: str) -> Any:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises several types on a malformed value
        raise SeriesError(
            f"{_element(ds, keyword, name)}: cannot be read ({type(exc).__name__})"
        ) from None
    return None if value is None or value == "" else value


def element_int(ds: Dataset, keyword: str, name: str) -> int | None:
    """``keyword`` of ``ds`` as an integer (None if absent or empty); a value that is not one
    raises SeriesError naming the file (``name``), the element and the value."""
    value = _value(ds, keyword, name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SeriesError(
            f"{_element(ds, keyword, name)}: {_shown(value)} is not an integer"
        ) from None


def element_float(value: Any, ds: Dataset, keyword: str, name: str) -> float | None:
    """``value`` (of element ``keyword``) as a finite float, or SeriesError naming them."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SeriesError(f"{_element(ds, keyword, name)}: {_shown(value)} is not a finite number")
    return number


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if hasattr(value, "__iter__") else [value]))
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    return values if len(values) == count else None


def _group_value(groups: list[Dataset], sequence: str, keyword: str, top: Dataset) -> Any:
    """``keyword`` from the first functional group holding ``sequence``, else from ``top``."""
    for group in groups:
        items = group.get(sequence)
        if items:
            value = items[0].get(keyword)
            if value is not None and value != "":
                return value
    value = top.get(keyword)
    return None if value == "" else value


def frames_of(ds: Dataset, path: Path, name: str, series_uid: str) -> list[Frame]:
    """The frames of one instance (``name``: how to call the file in messages)."""
    count = element_int(ds, "NumberOfFrames", name) or 1
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    enhanced = bool(shared or per_frame)
    if enhanced and per_frame and len(per_frame) != count:
        raise SeriesError(
            f"series {series_uid}: {name} has {count} frames but "
            f"{len(per_frame)} per-frame functional group items"
        )
    if count > 1 and not enhanced:
        raise SeriesError(
            f"series {series_uid}: {name} has {count} frames and no functional groups, so the "
            "frames' positions are unknown (only enhanced multi-frame images are supported)"
        )
    if (element_int(ds, "SamplesPerPixel", name) or 1) != 1 or not str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ).startswith("MONOCHROME"):
        raise SeriesError(
            f"series {series_uid}: {name} is a colour image "
            f"({ds.get('PhotometricInterpretation')}); a volume needs grey-scale images"
        )
    rows, columns = element_int(ds, "Rows", name), element_int(ds, "Columns", name)
    if not rows or not columns:
        raise SeriesError(f"series {series_uid}: {name} has no Rows/Columns (not an image)")
    frames = []
    for index in range(count):
        groups = ([per_frame[index]] if per_frame else []) + shared[:1]
        position = _floats(
            _group_value(groups, "PlanePositionSequence", "ImagePositionPatient", ds), 3
        )
        orientation = _floats(
            _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", ds), 6
        )
        spacing = _floats(_group_value(groups, "PixelMeasuresSequence", "PixelSpacing", ds), 2)
        where = f"{name} frame {index + 1}" if enhanced else name
        missing = [
            keyword
            for keyword, value in (
                ("ImagePositionPatient", position),
                ("ImageOrientationPatient", orientation),
                ("PixelSpacing", spacing),
            )
            if value is None
        ]
        if missing:
            raise SeriesError(
                f"series {series_uid}: {where} has no valid {', '.join(missing)}, so its place "
                "in the volume is unknown (a localizer, secondary capture or projection image?)"
            )
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope", ds)
        slope = element_float(slope, ds, "RescaleSlope", where)
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept", ds)
        intercept = element_float(intercept, ds, "RescaleIntercept", where)
        between = _group_value(groups, "PixelMeasuresSequence", "SpacingBetweenSlices", ds)
        between = element_float(between, ds, "SpacingBetweenSlices", where)
        thickness = _group_value(groups, "PixelMeasuresSequence", "SliceThickness", ds)
        thickness = element_float(thickness, ds, "SliceThickness", where)
        thickness = between if between is not None else thickness
        frames.append(
            Frame(
                path=path,
                index=index if enhanced else None,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                rows=rows,
                columns=columns,
                position=np.asarray(position, dtype=np.float64),
                orientation=np.asarray(orientation, dtype=np.float64),
                pixel_spacing=(spacing[0], spacing[1]),
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
                thickness=thickness,
            )
        )
    return frames
