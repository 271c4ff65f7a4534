"""Image previews of a job: a few slices of its input series, and the same slices with the
DICOM SEG or RTSTRUCT it wrote drawn over them in colour, rendered on the server as PNG.

Only pixels are drawn (no text: no patient data). The series shown is the one the SEG or
RTSTRUCT references; the slices are the one with the most segmented (or contoured) pixels and
two spread around it.

A SEG's segments are tinted in the palette's colours. An RTSTRUCT's ROIs are drawn in their
ROIDisplayColor (the palette's when absent): each closed contour outlined 2 px wide and lightly
filled, contours of one ROI on one slice combined by the even-odd rule (a contour inside
another is a hole). Contour points (patient coordinates, mm) go to pixels through each slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing; a contour is drawn on the slice
its ContourImageSequence names, else on the slice whose plane is nearest (within half the
spacing between slices).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.errors import DataflowError

__all__ = ["Preview", "PreviewError", "SegPreview", "Slice", "StructurePreview", "find_preview"]

#: one colour per segment number (RGB), cycling
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)
WINDOW = (-300.0, 1500.0)  # centre, width in HU: lungs, soft tissue and bone all visible
SEG_ALPHA = 0.45  # share of the segment's colour over the grey
FILL_ALPHA = 0.25  # share of an ROI's colour inside its contours (the outline is opaque)
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_HEADER_TAGS = [
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
]


class PreviewError(DataflowError, ValueError):
    """A job's file cannot be drawn: the message names the file and the bad value."""


@dataclass(frozen=True, eq=False)
class Slice:
    """One input image: its file, and where its pixels lie in the patient (LPS, mm).

    ``origin`` is the centre of pixel (0, 0) (ImagePositionPatient); ``row_cosine`` points
    along a row (columns increase), ``column_cosine`` down a column (ImageOrientationPatient);
    ``spacing`` is PixelSpacing (between rows, between columns). Without them the slice can
    show a SEG but not an RTSTRUCT's contours (``spacing`` is None).
    """

    path: Path
    position: float  # along the normal, to order the series
    frame: str = ""
    origin: np.ndarray | None = None
    row_cosine: np.ndarray | None = None
    column_cosine: np.ndarray | None = None
    spacing: tuple[float, float] | None = None
    shape: tuple[int, int] | None = None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def pixels(self, points: np.ndarray) -> np.ndarray:
        """(row, column) of patient points ``(N, 3)``, projected onto this slice's plane."""
        offset = points - self.origin
        rows = offset @ self.column_cosine / self.spacing[0]
        return np.column_stack([rows, offset @ self.row_cosine / self.spacing[1]])


class Preview:
    """Slices of a job's input series with what the job found drawn over them."""

    def __init__(self, sources: dict[str, Slice]) -> None:
        self.sources = sources
        self.position = {uid: s.position for uid, s in sources.items()}

    def area(self) -> dict[str, int]:
        """Source UID -> pixels drawn over it, for every slice with something to draw."""
        raise NotImplementedError

    def draw(self, uid: str, rgb: np.ndarray) -> None:
        """Draws over ``rgb`` (float, [H, W, 3], 0-255), the slice ``uid``, in place."""
        raise NotImplementedError

    def colours(self) -> list[tuple[str, str]]:
        """(label, CSS colour) for a legend."""
        raise NotImplementedError

    @functools.cached_property
    def shown(self) -> list[str]:
        """The slices the page shows (computed once per preview)."""
        return self.slices()

    def slices(self, count: int = 3) -> list[str]:
        """Source UIDs to show: the slice with the most pixels drawn and ``count - 1`` spread
        around it, in the series' order (by position along its normal)."""
        area = self.area()
        ordered = sorted(area, key=self.position.__getitem__)
        if not ordered:
            return []
        chosen = {max(ordered, key=lambda uid: area[uid])}
        for fraction in np.linspace(0.25, 0.75, max(count - 1, 0)):
            chosen.add(ordered[int(fraction * (len(ordered) - 1))])
        return sorted(chosen, key=ordered.index)[:count]

    def png(self, uid: str, overlay: bool) -> bytes:
        """One slice as PNG: windowed grey, and with ``overlay`` what was found, in colour."""
        import pydicom
        from PIL import Image

        ds = pydicom.dcmread(self.sources[uid].path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
        hu += float(ds.get("RescaleIntercept", 0) or 0)
        centre, width = WINDOW
        grey = np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0) * 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if overlay:
            self.draw(uid, rgb)
        out = io.BytesIO()
        Image.fromarray(np.round(rgb).astype(np.uint8), "RGB").save(out, "PNG", optimize=False)
        return out.getvalue()


class SegPreview(Preview):
    """The DICOM SEG of a job over the source slices it references."""

    def __init__(self, seg: Path, sources: dict[str, Slice]) -> None:
        import pydicom

        super().__init__(sources)
        self.seg = pydicom.dcmread(seg)
        names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in self.seg.SegmentSequence}
        self.segments = names
        frames: dict[str, list[tuple[int, int]]] = {}  # source UID -> [(frame, segment)]
        for index, item in enumerate(self.seg.PerFrameFunctionalGroupsSequence):
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            source = str(
                item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            )
            if source in sources:
                frames.setdefault(source, []).append((index, number))
        self.frames = frames
        self._pixels: np.ndarray | None = None

    def _masks(self) -> np.ndarray:
        if self._pixels is None:
            pixels = self.seg.pixel_array
            self._pixels = pixels[None] if pixels.ndim == 2 else pixels
        return self._pixels

    def area(self) -> dict[str, int]:
        masks = self._masks()
        return {
            uid: int(sum((masks[i] != 0).sum() for i, _ in f)) for uid, f in self.frames.items()
        }

    def draw(self, uid: str, rgb: np.ndarray) -> None:
        masks = self._masks()
        for index, number in self.frames.get(uid, []):
            mask = masks[index] != 0
            if mask.shape != rgb.shape[:2]:
                continue
            colour = np.array(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float32)
            rgb[mask] = (1 - SEG_ALPHA) * rgb[mask] + SEG_ALPHA * colour

    def colours(self) -> list[tuple[str, str]]:
        return [
            (label, "rgb({},{},{})".format(*PALETTE[(n - 1) % len(PALETTE)]))
            for n, label in sorted(self.segments.items())
        ]


@dataclass(frozen=True, eq=False)
class Contour:
    """One contour of an ROI on one slice, in that slice's pixels: ``(N, 2)`` (row, column)."""

    roi: int  # index into StructurePreview.rois
    points: np.ndarray
    closed: bool


class StructurePreview(Preview):
    """The RT Structure Set of a job: its ROIs' contours over the slices they lie on."""

    def __init__(self, rtstruct: Path, sources: dict[str, Slice]) -> None:
        import pydicom

        mapped = {uid: s for uid, s in sources.items() if s.spacing is not None}
        super().__init__(mapped)
        ds = pydicom.dcmread(rtstruct)
        where = f"RTSTRUCT {rtstruct.name}"
        names, frames = {}, {}
        for item in ds.get("StructureSetROISequence", []):
            number = _number(item, "ROINumber", where)
            names[number] = str(item.get("ROIName", "")) or f"ROI {number}"
            frames[number] = str(item.get("ReferencedFrameOfReferenceUID", ""))
        self.rois: list[tuple[str, tuple[int, int, int]]] = []  # (name, RGB)
        self.contours: dict[str, list[Contour]] = {}  # source UID -> contours on it
        planes = _Planes(mapped)
        for k, roi in enumerate(ds.get("ROIContourSequence", []), 1):
            number = _number(roi, "ReferencedROINumber", f"{where}: ROIContourSequence item {k}")
            here = f"{where}: ROI {number}"
            colour = _colour(roi.get("ROIDisplayColor"), len(self.rois), here)
            self.rois.append((names.get(number, f"ROI {number}"), colour))
            for n, item in enumerate(roi.get("ContourSequence", []), 1):
                points = _points(item.get("ContourData"), f"{here} contour {n}")
                uid = planes.slice_of(item, points, frames.get(number, ""))
                if uid is None:
                    continue
                kind = str(item.get("ContourGeometricType", "CLOSED_PLANAR"))
                contour = Contour(len(self.rois) - 1, mapped[uid].pixels(points),
                                  closed=kind == "CLOSED_PLANAR")  # fmt: skip
                self.contours.setdefault(uid, []).append(contour)

    def masks(self, uid: str, shape: tuple[int, int]) -> dict[int, np.ndarray]:
        """ROI index (into ``rois``) -> the pixels of slice ``uid`` inside the ROI's closed
        contours there (even-odd), for each ROI with such contours."""
        polygons: dict[int, list[np.ndarray]] = {}
        for contour in self.contours.get(uid, []):
            if contour.closed and len(contour.points) >= 3:
                polygons.setdefault(contour.roi, []).append(contour.points)
        return {roi: fill_polygons(p, shape) for roi, p in polygons.items()}

    def area(self) -> dict[str, int]:
        return {
            uid: sum(int(m.sum()) for m in self.masks(uid, self.sources[uid].shape).values())
            for uid in self.contours
        }

    def draw(self, uid: str, rgb: np.ndarray) -> None:
        shape = rgb.shape[:2]
        for roi, inside in self.masks(uid, shape).items():
            colour = np.array(self.rois[roi][1], dtype=np.float32)
            rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colour
        for contour in self.contours.get(uid, []):  # outlines over every fill
            rgb[draw_lines(contour.points, shape, contour.closed)] = self.rois[contour.roi][1]

    def colours(self) -> list[tuple[str, str]]:
        return [(name, "rgb({},{},{})".format(*colour)) for name, colour in self.rois]


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a bad value named, not a file dumped."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _number(item: Any, keyword: str, where: str) -> int:
    try:
        return int(item[keyword].value)
    except (KeyError, TypeError, ValueError):
        raise PreviewError(
            f"{where}: {keyword} {_short(item.get(keyword))} is not a number"
        ) from None


def _colour(value: Any, index: int, where: str) -> tuple[int, int, int]:
    if value is None or value == "" or value == []:
        return PALETTE[index % len(PALETTE)]
    try:
        colour = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        colour = ()
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise PreviewError(f"{where}: ROIDisplayColor {_short(value)} is not three integers 0..255")
    return colour  # type: ignore[return-value]


def _points(value: Any, where: str) -> np.ndarray:
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    values = [] if value is None else values
    try:
        numbers = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise PreviewError(f"{where}: ContourData {_short(value)} is not numbers") from None
    if numbers.size == 0 or numbers.size % 3 or not np.isfinite(numbers).all():
        shown = f"{numbers.size} numbers" if np.isfinite(numbers).all() else "a NaN or infinity"
        raise PreviewError(f"{where}: ContourData has {shown}, not (x, y, z) points")
    return numbers.reshape(-1, 3)


class _Planes:
    """The planes of the located input slices, to find the one a contour lies on."""

    def __init__(self, sources: dict[str, Slice]) -> None:
        self.sources = sources
        self.uids = list(sources)
        self.origins = np.array([s.origin for s in sources.values()]).reshape(-1, 3)
        self.normals = np.array([s.normal for s in sources.values()]).reshape(-1, 3)
        self.frames = np.array([s.frame for s in sources.values()], dtype=object)
        # half the usual distance between neighbouring slices (1 mm for a single slice)
        gaps = np.diff(np.sort([s.position for s in sources.values()]))
        gaps = gaps[gaps > 1e-6]
        self.tolerance = float(np.median(gaps)) / 2 if gaps.size else 1.0

    def slice_of(self, item: Any, points: np.ndarray, frame: str) -> str | None:
        """The source a contour lies on: the one its ContourImageSequence names, else the one
        (in the ROI's frame of reference) whose plane is nearest, if within ``tolerance`` mm."""
        for image in item.get("ContourImageSequence", []):
            uid = str(image.get("ReferencedSOPInstanceUID", ""))
            if uid in self.sources:
                return uid
        if not self.uids:
            return None
        away = np.abs(((points.mean(axis=0) - self.origins) * self.normals).sum(axis=1))
        if frame:
            away[(self.frames != "") & (self.frames != frame)] = np.inf
        nearest = int(np.argmin(away))
        return self.uids[nearest] if away[nearest] <= self.tolerance else None


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside ``polygons`` (each ``(N, 2)`` of (row, column), closed
    implicitly) by the even-odd rule, over all of them together: a scanline fill."""
    rows, columns = shape
    inside = np.zeros(shape, dtype=bool)
    edges = np.concatenate([np.stack([p, np.roll(p, -1, axis=0)], axis=1) for p in polygons])
    y0, x0, y1, x1 = edges[:, 0, 0], edges[:, 0, 1], edges[:, 1, 0], edges[:, 1, 1]
    first = max(0, math.ceil(min(y0.min(), y1.min())))
    last = min(rows - 1, math.floor(max(y0.max(), y1.max())))
    slope = np.divide(x1 - x0, y1 - y0, out=np.zeros_like(x0), where=y1 != y0)
    block = max(1, 2**20 // len(edges))  # rows at a time: bounded memory for long contours
    for start in range(first, last + 1, block):
        y = np.arange(start, min(start + block, last + 1), dtype=np.float64)[:, None]
        crossing = (y0 <= y) != (y1 <= y)  # half-open: a vertex on the row counts once
        at, edge = np.nonzero(crossing)
        x = x0[edge] + (y[at, 0] - y0[edge]) * slope[edge]
        # a pixel is inside when an odd number of crossings lie at or left of its centre
        toggles = np.zeros((len(y), columns + 1), dtype=np.int32)
        np.add.at(toggles, (at, np.clip(np.ceil(x), 0, columns).astype(np.intp)), 1)
        inside[start : start + len(y)] = np.cumsum(toggles, axis=1)[:, :columns] % 2 == 1
    return inside


def draw_lines(points: np.ndarray, shape: tuple[int, int], closed: bool) -> np.ndarray:
    """Pixels of a 2 px wide line through ``points`` ``(N, 2)`` of (row, column): those whose
    centre lies less than a pixel from it (from a point sampled on it every quarter pixel)."""
    rows, columns = shape
    line = np.zeros(shape, dtype=bool)
    ends = np.concatenate([points, points[:1]]) if closed and len(points) > 1 else points
    a, b = _clip(ends[:-1], ends[1:], rows, columns) if len(ends) > 1 else (ends, ends)
    steps = np.ceil(4 * np.abs(b - a).max(axis=1, initial=0)).astype(np.intp) + 1
    t = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
    t = t / np.repeat(np.maximum(steps - 1, 1), steps)
    samples = np.repeat(a, steps, axis=0) + t[:, None] * np.repeat(b - a, steps, axis=0)
    nearest = np.round(samples).astype(np.intp)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = nearest[:, 0] + dr, nearest[:, 1] + dc
            near = (r - samples[:, 0]) ** 2 + (c - samples[:, 1]) ** 2 < 1.0
            keep = near & (r >= 0) & (r < rows) & (c >= 0) & (c < columns)
            line[r[keep], c[keep]] = True
    return line


def _clip(a: np.ndarray, b: np.ndarray, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Segments ``a -> b`` cut to the image (with a pixel's margin), Liang-Barsky; segments
    wholly outside are dropped."""
    d = b - a
    low, high = np.zeros(len(a)), np.ones(len(a))
    keep = np.ones(len(a), dtype=bool)
    for p, q in (
        (-d[:, 0], a[:, 0] + 2),
        (d[:, 0], rows + 1 - a[:, 0]),
        (-d[:, 1], a[:, 1] + 2),
        (d[:, 1], columns + 1 - a[:, 1]),
    ):
        parallel = p == 0
        keep &= ~(parallel & (q < 0))
        t = np.divide(q, p, out=np.zeros_like(q), where=~parallel)
        low = np.where(~parallel & (p < 0), np.maximum(low, t), low)
        high = np.where(~parallel & (p > 0), np.minimum(high, t), high)
    keep &= low <= high
    return (a + low[:, None] * d)[keep], (a + high[:, None] * d)[keep]


def _read_slices(inputs: Path) -> dict[str, Slice]:
    """Every DICOM image among a job's input files, by SOP Instance UID."""
    import pydicom

    sources: dict[str, Slice] = {}
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception:
            continue
        if "SOPInstanceUID" not in header:
            continue
        where = f"input {path.name}"
        origin = _vector(header, "ImagePositionPatient", 3, where)
        cosines = _vector(header, "ImageOrientationPatient", 6, where)
        spacing = _vector(header, "PixelSpacing", 2, where)
        normal = np.cross(*(cosines.reshape(2, 3) if cosines is not None else np.eye(3)[:2]))
        position = float((origin if origin is not None else np.zeros(3)) @ normal)
        frame = str(header.get("FrameOfReferenceUID", ""))
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        located = (
            origin is not None
            and cosines is not None
            and spacing is not None
            and (spacing > 0).all()
            and rows > 0
            and columns > 0
        )
        if located:
            sources[str(header.SOPInstanceUID)] = Slice(
                path, position, frame, origin, cosines[:3], cosines[3:],
                (float(spacing[0]), float(spacing[1])), (rows, columns),
            )  # fmt: skip
        else:
            sources[str(header.SOPInstanceUID)] = Slice(path, position, frame)
    return sources


def _vector(header: Any, keyword: str, count: int, where: str) -> np.ndarray | None:
    value = header.get(keyword)
    if value is None or value == "":
        return None
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.zeros(0)
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise PreviewError(f"{where}: {keyword} {_short(value)} is not {count} numbers")
    return numbers


def find_preview(files: Iterable[dict[str, Any]], inputs: Path, outputs: Path) -> Preview | None:
    """The preview of the first DICOM SEG among a job's operator outputs, else of its first
    RTSTRUCT, over the input files it references; None when the job wrote neither (or
    nothing it wrote lies on its input slices). PreviewError names a file that cannot be
    drawn."""
    import pydicom

    found: dict[str, Path] = {}
    for entry in files:
        name = entry["name"]
        if name.startswith("/operators/") and name.endswith(".dcm"):
            path = outputs / name[len("/operators/") :]
            try:
                header = pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"]
                )
            except Exception:
                continue
            if header.get("Modality") == "SEG":
                found.setdefault("SEG", path)
                break
            if (
                header.get("Modality") == "RTSTRUCT"
                or header.get("SOPClassUID") == RTSTRUCT_STORAGE
            ):
                found.setdefault("RTSTRUCT", path)
    if not found:
        return None
    sources = _read_slices(inputs)
    if "SEG" in found:
        seg = SegPreview(found["SEG"], sources)
        return seg if seg.frames else None
    structures = StructurePreview(found["RTSTRUCT"], sources)
    return structures if structures.contours else None
