"""One record per image plane of a DICOM series, from single-frame or multi-frame headers.

A classic image (CT, MR...) has one frame whose geometry is at the top level of the dataset;
an enhanced multi-frame image (Enhanced CT/MR...) keeps each frame's geometry in its functional
groups: ``PerFrameFunctionalGroupsSequence[i]`` first, then ``SharedFunctionalGroupsSequence``,
then the top level (a few writers put PixelSpacing or rescale there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dataflow.errors import DataflowError

__all__ = ["Frame", "SeriesError", "frames_of"]


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


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if hasattr(value, "__iter__") else [value]))
    except (TypeError, ValueError):
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
    count = int(ds.get("NumberOfFrames") or 1)
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
    if ds.get("SamplesPerPixel", 1) != 1 or not str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ).startswith("MONOCHROME"):
        raise SeriesError(
            f"series {series_uid}: {name} is a colour image "
            f"({ds.get('PhotometricInterpretation')}); a volume needs grey-scale images"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except AttributeError:
        raise SeriesError(
            f"series {series_uid}: {name} has no Rows/Columns (not an image)"
        ) from None
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
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept", ds)
        between = _group_value(groups, "PixelMeasuresSequence", "SpacingBetweenSlices", ds)
        thickness = _group_value(groups, "PixelMeasuresSequence", "SliceThickness", ds)
        thickness = between if between not in (None, "") else thickness
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
                slope=float(slope) if slope not in (None, "") else 1.0,
                intercept=float(intercept) if intercept not in (None, "") else 0.0,
                thickness=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return frames
