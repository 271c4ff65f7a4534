"""DICOM series -> one float32 volume in HU with its geometry (docs/tensors.md).

- :func:`split_series`: files (or a folder, searched recursively) -> ``{series UID: files}``,
  reading headers only.
- :func:`plan_series`: a series' headers -> a :class:`SeriesPlan` (shape, slice order,
  geometry metadata), after checking that the frames form one regular volume.
- :func:`load_series`: files -> ``(volume, metadata)``; ``plan.read_into(out)`` decodes into an
  array of your own (the stage decodes straight into shared memory).
- :class:`SeriesToVolume`: the stage (a study folder in, the ``volume`` tensor out).

Slices are ordered by their position along the normal ``row cosine x column cosine``, never by
InstanceNumber, file name or SliceLocation. Anything that would give a wrong volume raises
:class:`SeriesError`; the tolerances are the module constants below (see docs/operators.md).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dataflow.errors import DataflowError
from dataflow.stage import Port, Stage, Tensor
from dataflow.units import format_bytes
from operators.dicom.frames import Frame, SeriesError, element_int, frames_of
from operators.dicom.reading import decoded_size, read_header, read_instance

__all__ = [
    "ORIENTATION_TOL",
    "PIXEL_SPACING_RTOL",
    "POSITION_TOL_MM",
    "SLICE_GAP_RTOL",
    "MemoryLimitError",
    "SeriesError",
    "SeriesPlan",
    "SeriesToVolume",
    "check_modality",
    "find_files",
    "load_series",
    "plan_series",
    "split_series",
]

#: Largest difference of a direction cosine between two frames, and from a unit, orthogonal pair.
ORIENTATION_TOL = 1e-4
#: Largest relative difference of PixelSpacing between frames.
PIXEL_SPACING_RTOL = 1e-4
#: Positions closer than this along the normal are duplicates; in-plane offsets between slices
#: (gantry tilt, shifted stacks) larger than this are refused; also the floor of the gap tolerance.
POSITION_TOL_MM = 0.01
#: Each gap between neighbouring slices, and each slice's distance from the uniform grid, may
#: differ from the median gap by at most max(POSITION_TOL_MM, SLICE_GAP_RTOL x median gap).
SLICE_GAP_RTOL = 0.01

_DICOMDIR = "1.2.840.10008.1.3.10"
_NOT_DICOM = "not DICOM Part 10 (no DICM preamble)"
_SHOWN = 4  # offending items named in a message before "... and N more"


def find_files(folder: str | Path) -> list[Path]:
    """Every regular file under ``folder`` (recursively, hidden ones skipped), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise SeriesError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found)


def _paths(files: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return find_files(files) if Path(files).is_dir() else [Path(files)]
    return [Path(f) for f in files]


def read_headers(
    files: str | Path | Iterable[str | Path], skipped: dict[str, list[str]] | None = None
) -> list[tuple[Path, Dataset]]:
    """``(path, header)`` of every DICOM instance among ``files`` (pixels not read).

    Files that are not DICOM Part 10 (no preamble and "DICM"), DICOMDIRs and instances
    without a SeriesInstanceUID are skipped; given ``skipped``, the names of those files are
    added to it under the reason. Headers are read within bounds
    (:func:`operators.dicom.reading.read_header`): a deflated file is inflated only up to its
    pixel data."""
    headers = []
    paths = _paths(files)
    names = _names(paths)
    skip = skipped if skipped is not None else {}
    for path in paths:
        try:
            ds = read_header(path, names[path])
        except InvalidDicomError:
            skip.setdefault(_NOT_DICOM, []).append(names[path])
            continue
        except SeriesError:
            raise
        except Exception as exc:  # a damaged DICOM file: pydicom raises many types
            raise SeriesError(
                f"cannot read the DICOM header of {names[path]}: {type(exc).__name__}: {exc}"
            ) from exc
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
            skip.setdefault("a DICOMDIR (an index, no image)", []).append(names[path])
        elif "SeriesInstanceUID" in ds:
            headers.append((path, ds))
        else:
            skip.setdefault("no SeriesInstanceUID (0020,000E)", []).append(names[path])
    return headers


def _split(headers: list[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in headers:
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    return groups


def split_series(files: str | Path | Iterable[str | Path]) -> dict[str, list[Path]]:
    """``{SeriesInstanceUID: [files]}`` for the DICOM files among ``files`` (or under a folder);
    headers only (``stop_before_pixels``); non-DICOM files and DICOMDIRs are left out."""
    return {uid: [p for p, _ in group] for uid, group in _split(read_headers(files)).items()}


def _names(paths: Sequence[Path]) -> dict[Path, str]:
    """How messages call files: relative to the folder that holds them all."""
    if not paths:
        return {}
    parents = {str(p.parent) for p in paths}
    root = Path(os.path.commonpath(sorted(parents)))
    return {p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths}


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


class MemoryLimitError(SeriesError):
    """A series, or one of its instances, would take more memory than the stage may use."""


@dataclasses.dataclass
class SeriesPlan:
    """A checked series: its frames in volume order, the volume's shape and its metadata."""

    series_uid: str
    frames: list[Frame]
    shape: tuple[int, int, int]
    metadata: dict[str, Any]
    names: dict[Path, str]
    #: Bytes each file's pixels decode to (Rows x Columns x frames x samples x bytes), from
    #: its header; the decode of a file is bounded by it.
    pixel_bytes: dict[Path, int] = dataclasses.field(default_factory=dict)

    @property
    def volume_bytes(self) -> int:
        """What the float32 volume takes."""
        return int(np.prod(self.shape)) * 4

    def check_memory(self, limit: int | None, *, volume: bool = False) -> None:
        """Refuse, before anything is decoded, a series that cannot be read within ``limit``
        bytes (None: no limit): an instance whose pixels decode to more than that, or whose
        read (encoded and decoded pixels at once: twice that) does not fit. ``volume``: the
        float32 volume is in the same memory (``load_series``), not in the store."""
        if limit is None:
            return
        have = format_bytes(limit)
        for path, size in self.pixel_bytes.items():
            if size > limit:
                raise MemoryLimitError(
                    f"instance {self.names.get(path, path.name)} would decode to "
                    f"{format_bytes(size)}, more than the {have} this stage may use"
                )
        beside = self.volume_bytes if volume else 0
        if beside > limit:
            raise MemoryLimitError(
                f"series {self.series_uid}: the volume would take {format_bytes(beside)} "
                f"({' x '.join(map(str, self.shape))} float32), more than the {have} this "
                "stage may use"
            )
        path, size = max(self.pixel_bytes.items(), key=lambda item: item[1], default=(None, 0))
        if path is not None and beside + 2 * size > limit:
            where = f" beside the {format_bytes(beside)} volume" if beside else ""
            raise MemoryLimitError(
                f"instance {self.names.get(path, path.name)} would decode to "
                f"{format_bytes(size)}: reading it takes twice that (its encoded and decoded "
                f"pixels){where}, more than the {have} this stage may use"
            )

    def read_into(self, out: np.ndarray, memory_limit: int | None = None) -> np.ndarray:
        """Decode every frame into ``out`` (float32 ``shape``), applying the rescale (HU).

        Each file is read within the size its header gave (:func:`read_instance`), after
        :meth:`check_memory` with ``memory_limit`` (``out`` not counted). Pixels that are NaN
        or infinite, before or after the rescale, raise SeriesError naming the file."""
        if out.shape != self.shape:
            raise ValueError(f"out has shape {out.shape}; the series needs {self.shape}")
        self.check_memory(memory_limit)
        by_file: dict[Path, list[tuple[int, Frame]]] = collections.defaultdict(list)
        for k, frame in enumerate(self.frames):
            by_file[frame.path].append((k, frame))
        for path, entries in by_file.items():
            name = self.names.get(path, str(path))
            syntax = "unknown"
            try:
                size = self.pixel_bytes.get(path)
                if size is None:
                    size = decoded_size(read_header(path, name), name)
                ds = read_instance(path, size, name)
                syntax = ds.file_meta.get("TransferSyntaxUID", syntax)
                pixels = ds.pixel_array
            except SeriesError:
                raise
            except Exception as exc:  # pydicom raises several types, by codec and plugin
                raise SeriesError(
                    f"series {self.series_uid}: cannot decode the pixels of {name} "
                    f"(transfer syntax {getattr(syntax, 'name', syntax)}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if pixels.ndim == 2:
                pixels = pixels[None]
            expected = (element_int(ds, "NumberOfFrames", name) or 1, *self.shape[1:])
            if pixels.shape != expected:
                raise SeriesError(
                    f"series {self.series_uid}: {name} decodes to {pixels.shape}; "
                    f"expected {expected}"
                )
            for k, frame in entries:
                out[k] = pixels[frame.index or 0]
                if frame.slope != 1.0:
                    out[k] *= np.float32(frame.slope)
                if frame.intercept != 0.0:
                    out[k] += np.float32(frame.intercept)
                _check_finite(out[k], self.series_uid, _where(frame, self.names), ds)
            del ds, pixels
        return out


def _check_finite(plane: np.ndarray, uid: str, where: str, ds: Dataset) -> None:
    bad = plane.size - int(np.count_nonzero(np.isfinite(plane)))
    if bad:
        element = next(
            (k for k in ("FloatPixelData", "DoubleFloatPixelData", "PixelData") if k in ds), "?"
        )
        raise SeriesError(
            f"series {uid}: {where}: {bad} pixel value(s) are NaN or infinite ({element}, "
            "after the rescale); a volume needs finite values"
        )


def _cluster(values: list[tuple[np.ndarray, Frame]], close) -> list[list[tuple[Any, Frame]]]:
    clusters: list[list[tuple[Any, Frame]]] = []
    for value, frame in values:
        for cluster in clusters:
            if close(cluster[0][0], value):
                cluster.append((value, frame))
                break
        else:
            clusters.append([(value, frame)])
    return sorted(clusters, key=len, reverse=True)


def _check_same(uid, what, values, close, show, names) -> None:
    clusters = _cluster(values, close)
    if len(clusters) > 1:
        parts = [
            f"{show(c[0][0])} in {len(c)} frame(s) ({_listing([_where(f, names) for _, f in c])})"
            for c in clusters
        ]
        raise SeriesError(f"series {uid}: mixed {what}: " + "; ".join(parts))


def _where(frame: Frame, names: dict[Path, str]) -> str:
    name = names.get(frame.path, str(frame.path))
    return name if frame.index is None else f"{name} frame {frame.index + 1}"


def _plan(uid: str, headers: list[tuple[Path, Dataset]]) -> SeriesPlan:
    names = _names([p for p, _ in headers])
    uids = sorted({str(ds.SeriesInstanceUID) for _, ds in headers})
    if len(uids) > 1:
        raise SeriesError(f"the files hold {len(uids)} series ({', '.join(uids)}): split them")
    frames = [f for path, ds in headers for f in frames_of(ds, path, names[path], uid)]
    if not frames:
        raise SeriesError(f"series {uid}: no image frames")
    first_ds = headers[0][1]
    frame_of_reference = {p: str(ds.get("FrameOfReferenceUID", "")) for p, ds in headers}

    def same(what, values, close, show):
        _check_same(uid, what, [(v, f) for v, f in zip(values, frames)], close, show, names)

    same("FrameOfReferenceUID", [frame_of_reference[f.path] for f in frames], str.__eq__,
         lambda v: v or "(none)")  # fmt: skip

    same("Rows x Columns", [(f.rows, f.columns) for f in frames], tuple.__eq__,
         lambda v: f"{v[0]} x {v[1]}")  # fmt: skip
    same("ImageOrientationPatient", [f.orientation for f in frames],
         lambda a, b: np.abs(a - b).max() <= ORIENTATION_TOL, _fmt)  # fmt: skip
    same("PixelSpacing", [np.asarray(f.pixel_spacing) for f in frames],
         lambda a, b: np.allclose(a, b, rtol=PIXEL_SPACING_RTOL, atol=0), _fmt)  # fmt: skip

    row, col = frames[0].orientation[:3], frames[0].orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOL
        or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOL
        or abs(row @ col) > ORIENTATION_TOL
    ):
        raise SeriesError(
            f"series {uid}: ImageOrientationPatient {_fmt(frames[0].orientation)} is not two "
            "orthogonal unit vectors"
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    frames.sort(key=lambda f: float(f.position @ normal))
    distance = np.array([f.position @ normal for f in frames])
    _check_positions(uid, frames, distance, normal, names)

    count = len(frames)
    if count > 1:
        slice_spacing = float((distance[-1] - distance[0]) / (count - 1))
    else:
        slice_spacing = frames[0].thickness or 1.0
    direction = np.column_stack([normal, col, row])  # array axes D, H, W
    multi = any(f.index is not None for f in frames)
    metadata = {
        "spacing": [slice_spacing, *map(float, frames[0].pixel_spacing)],
        "origin": [float(v) for v in frames[0].position],
        "direction": [float(v) for v in direction.ravel()],
        "axes": "DHW",
        "study_instance_uid": str(first_ds.get("StudyInstanceUID", "")),
        "series_instance_uid": uid,
        "frame_of_reference_uid": frame_of_reference[frames[0].path],
        "sop_instance_uids": [f.sop_instance_uid for f in frames],
        "modality": str(first_ds.get("Modality", "")),
    }
    if multi:
        metadata["frame_numbers"] = [f.frame_number for f in frames]
    shape = (count, frames[0].rows, frames[0].columns)
    pixel_bytes = {path: decoded_size(ds, names[path]) for path, ds in headers}
    return SeriesPlan(uid, frames, shape, metadata, names, pixel_bytes)


def _check_positions(uid, frames, distance, normal, names) -> None:
    """Duplicates, in-plane offsets (tilt), then gaps: the slices must form a regular grid."""
    where = [_where(f, names) for f in frames]
    gaps = np.diff(distance)
    dupes = [i for i, g in enumerate(gaps) if g <= POSITION_TOL_MM]
    if dupes:
        items = []
        for i in dupes:
            a, b = frames[i], frames[i + 1]
            same = a.index is None and b.index is None and a.sop_instance_uid == b.sop_instance_uid
            note = ", the same SOP Instance UID" if same else ""
            items.append(f"{where[i]} and {where[i + 1]} at {_fmt(frames[i].position)}{note}")
        raise SeriesError(
            f"series {uid}: {len(dupes)} duplicate slice position(s) (closer than "
            f"{POSITION_TOL_MM} mm along the normal; copies, or several echoes, phases or "
            f"time points in one series?): {_listing(items)}"
        )
    offsets = [f.position - frames[0].position for f in frames]
    in_plane = np.array([np.linalg.norm(o - (o @ normal) * normal) for o in offsets])
    if in_plane.max(initial=0.0) > POSITION_TOL_MM:
        bad = [
            f"{where[i]} by {in_plane[i]:.3g} mm"
            for i in np.flatnonzero(in_plane > POSITION_TOL_MM)
        ]
        raise SeriesError(
            f"series {uid}: slices are not stacked along the normal {_fmt(normal)} "
            f"(gantry tilt or shifted stacks?): offset in-plane from {where[0]}: {_listing(bad)}"
        )
    if len(frames) < 3:
        return
    median = float(np.median(gaps))
    tol = max(POSITION_TOL_MM, SLICE_GAP_RTOL * median)
    bad = [
        f"{gaps[i]:.4g} mm between {where[i]} {_fmt(frames[i].position)} and "
        f"{where[i + 1]} {_fmt(frames[i + 1].position)}"
        for i in np.flatnonzero(np.abs(gaps - median) > tol)
    ]
    if not bad:
        grid = distance[0] + np.arange(len(frames)) * (distance[-1] - distance[0]) / (
            len(frames) - 1
        )
        drift = np.abs(distance - grid)
        if drift.max() > tol:
            i = int(drift.argmax())
            bad = [f"{where[i]} is {drift[i]:.3g} mm off the regular grid (drifting spacing)"]
    if bad:
        raise SeriesError(
            f"series {uid}: uneven slice spacing (median gap {median:.4g} mm, tolerance "
            f"{tol:.3g} mm; a missing slice?): {_listing(bad)}"
        )


def plan_series(files: str | Path | Iterable[str | Path]) -> SeriesPlan:
    """Check one series (its files, or a folder holding only it) and plan its volume."""
    headers = read_headers(files)
    if not headers:
        raise SeriesError("no DICOM instances among the files given")
    groups = _split(headers)
    if len(groups) > 1:
        raise SeriesError(
            f"the files hold {len(groups)} series ({', '.join(groups)}): pick one with split_series"
        )
    uid, group = next(iter(groups.items()))
    return _plan(uid, group)


def load_series(
    files: str | Path | Iterable[str | Path], memory_limit: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """One series -> ``(volume, metadata)``: float32 HU ``[slice, row, column]`` and the
    geometry and UIDs of docs/tensors.md (plus ``frame_numbers`` for multi-frame sources).

    ``memory_limit`` (bytes): refuse, before allocating, a series that needs more."""
    plan = plan_series(files)
    plan.check_memory(memory_limit, volume=True)
    volume = plan.read_into(np.empty(plan.shape, dtype=np.float32))
    return volume, plan.metadata


def _describe(uid: str, group: list[tuple[Path, Dataset]]) -> str:
    """A series as a message lists it; never fails (a malformed NumberOfFrames counts 1)."""
    ds = group[0][1]

    def count(d: Dataset) -> int:
        try:
            return element_int(d, "NumberOfFrames", "") or 1
        except SeriesError:
            return 1

    frames = sum(count(d) for _, d in group)
    what = f"{len(group)} instance(s)" + (f", {frames} frames" if frames != len(group) else "")
    return f"{uid} ({ds.get('Modality', '?')} {str(ds.get('SeriesDescription', ''))!r}, {what})"


def _no_image_series(
    study: Path, groups: dict[str, list[tuple[Path, Dataset]]], skipped: dict[str, list[str]]
) -> str:
    """Why a study folder gave no image series: each reason a file was skipped, with its
    count and a few file names (no header values that could identify a patient)."""
    reasons = dict(skipped)
    for group in groups.values():  # DICOM, but not images: SR, RT Structure Set, SEG...
        for path, ds in group:
            kind = str(ds.get("Modality") or "?").strip()
            name = str(path.relative_to(study)) if path.is_relative_to(study) else path.name
            reasons.setdefault(f"no pixel data ({kind})", []).append(name)
    total = sum(len(files) for files in reasons.values())
    if not total:
        return "no DICOM image series in the study folder: it holds no files"
    parts = [
        f"{len(files)} {reason}: {_listing(sorted(files))}"
        for reason, files in sorted(reasons.items(), key=lambda kv: -len(kv[1]))
    ]
    return f"no DICOM image series in the study folder; {total} file(s) skipped: " + "; ".join(
        parts
    )


class SeriesToVolume(Stage):
    """A study folder of DICOM files (nested folders allowed) -> one series as a float32 HU
    volume ``[slice, row, column]`` with its geometry and UIDs (docs/tensors.md).

    ``series_uid`` picks the series when the folder holds several image series. ``modality``
    (e.g. ``CT``): the series must be of that modality, else the job fails naming what it is;
    for CT its RescaleType, where given, must be HU. The memory a job may use in the worker
    (``ctx.memory_limit``) bounds every decode, checked before anything is decoded; the volume
    itself goes to the store, bounded by its budget."""

    inputs = {"study": Port("stream", element_type="dicom", description="DICOM files")}
    outputs = {
        "volume": Port("array", element_type="float32", shape=(-1, -1, -1), description="HU, DHW")
    }

    def __init__(self, series_uid: str | None = None, modality: str | None = None):
        self.series_uid = series_uid
        self.modality = modality.strip().upper() if modality else None

    def execute(self, ctx, study: Path) -> Tensor:
        skipped: dict[str, list[str]] = {}
        groups = _split(read_headers(study, skipped))
        images = {u: g for u, g in groups.items() if all("Rows" in ds for _, ds in g)}
        listing = "; ".join(_describe(u, g) for u, g in images.items())
        if self.series_uid is not None:
            if self.series_uid not in groups:
                raise SeriesError(
                    f"series {self.series_uid} is not in the study folder; it holds: "
                    f"{listing or 'no image series'}"
                )
            uid = self.series_uid
        elif len(images) == 1:
            uid = next(iter(images))
        elif not images:
            raise SeriesError(_no_image_series(study, groups, skipped))
        else:
            raise SeriesError(
                f"the study folder holds {len(images)} image series; choose one with the "
                f"series_uid parameter: {listing}"
            )
        if self.modality:
            check_modality(uid, groups[uid], self.modality)
        plan = _plan(uid, groups[uid])
        plan.check_memory(getattr(ctx, "memory_limit", None))
        try:
            volume = ctx.allocate("volume", plan.shape)
        except (MemoryError, DataflowError) as exc:  # the store's budget, or the worker's
            raise MemoryLimitError(
                f"series {uid}: the volume ({format_bytes(plan.volume_bytes)}, "
                f"{' x '.join(map(str, plan.shape))} float32) cannot be allocated: {exc}"
            ) from exc
        plan.read_into(volume)
        ctx.log.info(
            "series_loaded",
            shape=list(plan.shape),
            spacing=plan.metadata["spacing"],
            files=len(groups[uid]),
        )
        return Tensor(volume, plan.metadata)


def _rescale_types(ds: Dataset) -> set[str]:
    """RescaleType values of an instance: top level and functional groups (shared, per frame)."""
    found = {str(ds.get("RescaleType") or "")}
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(sequence) or []:
            for item in group.get("PixelValueTransformationSequence") or []:
                found.add(str(item.get("RescaleType") or ""))
    return found - {""}


def check_modality(uid: str, group: list[tuple[Path, Dataset]], modality: str) -> None:
    """Refuse a series that is not of ``modality`` (its Modality, in every instance); for CT,
    also one whose RescaleType is given and is not HU (Hounsfield units)."""
    names = _names([p for p, _ in group])
    found: dict[str, list[str]] = {}
    for path, ds in group:
        found.setdefault(str(ds.get("Modality") or "(none)").strip(), []).append(names[path])
    wrong = {m: files for m, files in found.items() if m.upper() != modality}
    if wrong:
        parts = [f"{m} ({_listing(files)})" for m, files in sorted(wrong.items())]
        raise SeriesError(
            f"series {uid}: Modality (0008,0060) is {'; '.join(parts)}; this stage reads "
            f"{modality} only (its modality parameter), so the series is refused"
        )
    if modality == "CT":
        for path, ds in group:
            units = _rescale_types(ds) - {"HU"}
            if units:
                raise SeriesError(
                    f"series {uid}: {names[path]}: (0028,1054) RescaleType is "
                    f"{', '.join(sorted(units))}, not HU: the values are not Hounsfield units"
                )
