"""Image previews of a job: a few slices of its input series, and the same slices with the
segments of the DICOM SEG it wrote drawn over them in colour, rendered on the server as PNG.

Only pixels are drawn (no text: no patient data). The series shown is the one the SEG
references; the slices are those with the most segmented pixels and two around them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Preview", "find_preview"]

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


class Preview:
    """The SEG of a job and the source slices it was drawn on."""

    def __init__(self, seg: Path, sources: dict[str, tuple[Path, float]]) -> None:
        import pydicom

        self.seg = pydicom.dcmread(seg)
        self.sources = {uid: path for uid, (path, _) in sources.items()}
        self.position = {uid: where for uid, (_, where) in sources.items()}
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

    @functools.cached_property
    def shown(self) -> list[str]:
        """The slices the page shows (computed once per preview)."""
        return self.slices()

    def slices(self, count: int = 3) -> list[str]:
        """Source UIDs to show: the most segmented slice and ``count - 1`` spread around it,
        in the series' order (by position along its normal)."""
        masks = self._masks()
        area = {
            uid: int(sum((masks[i] != 0).sum() for i, _ in f)) for uid, f in self.frames.items()
        }
        ordered = sorted(area, key=self.position.__getitem__)
        if not ordered:
            return []
        chosen = {max(ordered, key=lambda uid: area[uid])}
        for fraction in np.linspace(0.25, 0.75, max(count - 1, 0)):
            chosen.add(ordered[int(fraction * (len(ordered) - 1))])
        return sorted(chosen, key=ordered.index)[:count]

    def png(self, uid: str, overlay: bool) -> bytes:
        """One slice as PNG: windowed grey, and with ``overlay`` each segment in its colour."""
        import pydicom
        from PIL import Image

        ds = pydicom.dcmread(self.sources[uid])
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
        hu += float(ds.get("RescaleIntercept", 0) or 0)
        centre, width = WINDOW
        grey = np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0) * 255.0
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if overlay:
            masks = self._masks()
            for index, number in self.frames.get(uid, []):
                mask = masks[index] != 0
                if mask.shape != grey.shape:
                    continue
                colour = np.array(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float32)
                rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
        out = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(out, "PNG", optimize=False)
        return out.getvalue()

    def colours(self) -> list[tuple[str, str]]:
        """(segment label, CSS colour) for a legend."""
        return [
            (label, "rgb({},{},{})".format(*PALETTE[(n - 1) % len(PALETTE)]))
            for n, label in sorted(self.segments.items())
        ]


def find_preview(files: Iterable[dict[str, Any]], inputs: Path, outputs: Path) -> Preview | None:
    """The first DICOM SEG among a job's operator outputs, with the input files it
    references; None when the job wrote none (or its sources are gone)."""
    import pydicom

    seg = None
    for entry in files:
        name = entry["name"]
        if name.startswith("/operators/") and name.endswith(".dcm"):
            path = outputs / name[len("/operators/") :]
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if header.get("Modality") == "SEG":
                seg = path
                break
    if seg is None:
        return None
    sources: dict[str, tuple[Path, float]] = {}  # UID -> (file, position along the normal)
    tags = ["SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient"]
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except Exception:
            continue
        if "SOPInstanceUID" in header:
            position = np.array([float(v) for v in header.get("ImagePositionPatient", [0] * 3)])
            cosines = [float(v) for v in header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
            normal = np.cross(cosines[:3], cosines[3:])
            sources[str(header.SOPInstanceUID)] = (path, float(position @ normal))
    preview = Preview(seg, sources)
    return preview if preview.frames else None
