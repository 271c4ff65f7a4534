"""A synthetic CT study with an analytic truth, written with pydicom.

The phantom lives in patient coordinates (DICOM LPS, mm; +x = patient left, +y = posterior,
+z = head), independent of how it is scanned:

========== ===== ======================================================================
label      HU    shape
========== ===== ======================================================================
0 air      -1000 everywhere else
1 body        40 elliptic cylinder along z, semi-axes 150 mm (x) and 100 mm (y), centred on z
2 lung L    -800 ellipsoid centred at (+70, -10, 0), semi-axes (45, 55, 80) mm
3 lung R    -800 ellipsoid centred at (-70, -10, 0), semi-axes (45, 55, 80) mm
4 bone       700 cylinder along z (the spine), centre (0, 60), radius 20 mm
========== ===== ======================================================================

Each pixel holds the HU of the structure its centre lies in (no partial volume, no noise), so
:func:`hu_at` of a pixel centre is the pixel's exact value and :func:`labels_at` gives the ground
truth for Dice tests at any resolution. Pixels are stored as ``uint16`` with RescaleSlope 1 and
RescaleIntercept -1024 (stored = HU + 1024) unless told otherwise.

A scan is a stack of ``slices`` images of ``size`` x ``size`` pixels centred on the origin, with a
400 mm field of view and 240 mm covered along the slice normal by default; ``oblique=True``
rotates the image plane (:data:`OBLIQUE_ROTATION`). ``shuffle=True`` writes the files in a random
order under random names, with InstanceNumbers that do not follow the spatial order.

As a command::

    python -m operators.dicom.phantom OUT_DIR [--slices N] [--size N] [--oblique] [--shuffle]
        [--seed S] [--rle] [--enhanced]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "AIR",
    "BODY",
    "BONE",
    "LABEL_HU",
    "LABEL_NAMES",
    "LUNG_LEFT",
    "LUNG_RIGHT",
    "OBLIQUE_ROTATION",
    "PhantomSeries",
    "ScanGeometry",
    "hu_at",
    "labels_at",
    "main",
    "noisy_volume",
    "scan_geometry",
    "stored_values",
    "write_ct_series",
]

AIR, BODY, LUNG_LEFT, LUNG_RIGHT, BONE = range(5)
LABEL_NAMES = ("air", "body", "lung_left", "lung_right", "bone")
LABEL_HU = np.array([-1000, 40, -800, -800, 700], dtype=np.int16)

BODY_SEMI_AXES = (150.0, 100.0)
LUNGS = {
    LUNG_LEFT: ((70.0, -10.0, 0.0), (45.0, 55.0, 80.0)),
    LUNG_RIGHT: ((-70.0, -10.0, 0.0), (45.0, 55.0, 80.0)),
}
SPINE_CENTER, SPINE_RADIUS = (0.0, 60.0), 20.0


def labels_at(points: np.ndarray | Sequence) -> np.ndarray:
    """The label (``AIR`` ... ``BONE``) at each patient point (LPS, mm; shape ``(..., 3)``)."""
    p = np.asarray(points, dtype=np.float64)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    labels = np.zeros(p.shape[:-1], dtype=np.uint8)
    labels[(x / BODY_SEMI_AXES[0]) ** 2 + (y / BODY_SEMI_AXES[1]) ** 2 <= 1.0] = BODY
    for label, (center, axes) in LUNGS.items():
        r2 = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), center, axes))
        labels[r2 <= 1.0] = label
    labels[(x - SPINE_CENTER[0]) ** 2 + (y - SPINE_CENTER[1]) ** 2 <= SPINE_RADIUS**2] = BONE
    return labels


def hu_at(points: np.ndarray | Sequence) -> np.ndarray:
    """The phantom's HU (int16) at each patient point (LPS, mm; shape ``(..., 3)``)."""
    return LABEL_HU[labels_at(points)]


def _rotation(x_deg: float, y_deg: float, z_deg: float) -> np.ndarray:
    ax, ay, az = np.radians([x_deg, y_deg, z_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: The image plane's rotation for ``oblique=True``: 25° about x, then -10° about y, 15° about z.
OBLIQUE_ROTATION = _rotation(25.0, -10.0, 15.0)


@dataclasses.dataclass(frozen=True)
class ScanGeometry:
    """Where a scan's pixels are: ``slices`` images of ``rows`` x ``columns``, centred on
    ``center``; ``row_cosine`` / ``column_cosine`` are ImageOrientationPatient's two triplets
    (the direction of increasing column index, then of increasing row index)."""

    slices: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as PixelSpacing
    slice_spacing: float
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (slices ascend along the normal)."""
        offset = (k - (self.slices - 1) / 2) * self.slice_spacing * self.normal
        offset -= (self.columns - 1) / 2 * self.pixel_spacing[1] * np.asarray(self.row_cosine)
        offset -= (self.rows - 1) / 2 * self.pixel_spacing[0] * np.asarray(self.column_cosine)
        return np.asarray(self.center, dtype=np.float64) + offset

    def points(self, k: int) -> np.ndarray:
        """Patient positions of slice ``k``'s pixel centres, shape ``(rows, columns, 3)``."""
        i = np.arange(self.rows)[:, None, None] * self.pixel_spacing[0]
        j = np.arange(self.columns)[None, :, None] * self.pixel_spacing[1]
        return (
            self.position(k) + j * np.asarray(self.row_cosine) + i * np.asarray(self.column_cosine)
        )


def scan_geometry(
    slices: int = 24,
    size: int = 64,
    *,
    oblique: bool = False,
    slice_spacing: float | None = None,
    field_of_view: float = 400.0,
) -> ScanGeometry:
    """The default scan: ``size`` x ``size`` pixels over ``field_of_view`` mm, ``slices``
    slices ``slice_spacing`` apart (default: 240 mm / slices), axial or oblique."""
    if slices < 1 or size < 2:
        raise ValueError(f"need at least 1 slice of 2 x 2 pixels; got {slices} of {size}")
    rotation = OBLIQUE_ROTATION if oblique else np.eye(3)
    pixel = field_of_view / size
    return ScanGeometry(
        slices=slices,
        rows=size,
        columns=size,
        pixel_spacing=(pixel, pixel),
        slice_spacing=float(slice_spacing if slice_spacing is not None else 240.0 / slices),
        row_cosine=tuple(float(v) for v in rotation[:, 0]),
        column_cosine=tuple(float(v) for v in rotation[:, 1]),
    )


def noisy_volume(
    slices: int, size: int, noise_hu: float, seed: int = 0
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The phantom's HU on an axial scan's voxel centres plus N(0, ``noise_hu``²), float32,
    and its spacing [D, H, W] in mm: a volume for kernels and benchmarks, no DICOM."""
    geometry = scan_geometry(slices, size)
    rng = np.random.default_rng(seed)
    volume = np.empty((slices, size, size), np.float32)
    for k in range(slices):
        volume[k] = hu_at(geometry.points(k))
        volume[k] += rng.standard_normal((size, size), dtype=np.float32) * np.float32(noise_hu)
    return volume, (geometry.slice_spacing, *geometry.pixel_spacing)


def stored_values(hu: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    """The stored pixel values (int16 or uint16) that rescale exactly to ``hu``."""
    stored = (np.asarray(hu, dtype=np.float64) - intercept) / slope
    dtype = np.dtype(np.int16 if signed else np.uint16)
    info = np.iinfo(dtype)
    rounded = np.rint(stored)
    if not np.array_equal(rounded, stored) or rounded.min() < info.min or rounded.max() > info.max:
        raise ValueError(
            f"slope {slope} and intercept {intercept} cannot store the phantom's HU exactly "
            f"as {dtype.name}"
        )
    return rounded.astype(dtype)


def ds_values(values: Sequence[float] | np.ndarray) -> list[str]:
    """Decimal strings (VR DS, at most 16 characters) for a sequence of numbers."""
    return [format_number_as_ds(float(v) + 0.0) for v in values]  # + 0.0: no "-0.0"


@dataclasses.dataclass(frozen=True)
class PhantomSeries:
    """What :func:`write_ct_series` wrote; ``files`` and ``sop_instance_uids`` are in spatial
    order (ascending along the slice normal), whatever order and names the files have."""

    directory: Path
    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    geometry: ScanGeometry
    rescale_slope: float
    rescale_intercept: float


def study_uids(seed: int) -> tuple[str, str]:
    """The (study, frame of reference) UIDs of the phantom study for ``seed``."""
    study = generate_uid(entropy_srcs=["dataflow phantom", str(seed), "study"])
    frame = generate_uid(entropy_srcs=["dataflow phantom", str(seed), "frame of reference"])
    return str(study), str(frame)


def common_dataset(*, seed: int, series_uid: str, series_number: int, description: str) -> Dataset:
    """Patient, study, series, frame of reference and equipment modules shared by every file."""
    study_uid, frame_uid = study_uids(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "dataflow"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic CT phantom"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "synthetic phantom"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = f"PHANTOM-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Write ``ds`` as a DICOM Part 10 file, compressing it first for an encapsulated syntax."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)  # lossless: same instance
    ds.save_as(path, enforce_file_format=True)


def _order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` that is neither ascending nor descending (when n > 2)."""
    while True:
        order = rng.permutation(n)
        if n <= 2 or (np.any(np.diff(order) < 0) and np.any(np.diff(order) > 0)):
            return order


def write_ct_series(
    out_dir: str | Path,
    *,
    slices: int = 24,
    size: int = 64,
    oblique: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    series_number: int = 1,
    description: str = "Phantom CT",
    slice_spacing: float | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    signed: bool = False,
) -> PhantomSeries:
    """Write the phantom as a CT Image Storage series (one file per slice) into ``out_dir``.

    Files are named ``CT<series>_<n>.dcm``. Without ``shuffle`` n and InstanceNumber follow
    the spatial order; with it, names, InstanceNumbers and the writing order are three
    independent random permutations (``seed``). Pixels are uint16 (int16 when ``signed``);
    stored = (HU - intercept) / slope must be exact. ``transfer_syntax`` may be any syntax
    pydicom can encode (RLE Lossless natively; JPEG 2000 with pylibjpeg-openjpeg).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = scan_geometry(slices, size, oblique=oblique, slice_spacing=slice_spacing)
    entropy = ["dataflow phantom", str(seed), "series", str(series_number), str(geometry)]
    series_uid = str(generate_uid(entropy_srcs=entropy))
    sop_uids = [str(generate_uid(entropy_srcs=[series_uid, str(k)])) for k in range(slices)]
    rng = np.random.default_rng(seed)
    if shuffle:
        numbers, names, writing = _order(slices, rng), _order(slices, rng), _order(slices, rng)
    else:
        numbers = names = writing = np.arange(slices)
    base = common_dataset(
        seed=seed, series_uid=series_uid, series_number=series_number, description=description
    )
    files = [out / f"CT{series_number:02d}_{names[k] + 1:04d}.dcm" for k in range(slices)]
    for k in writing:
        ds = Dataset()
        ds.update(base)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(numbers[k]) + 1
        ds.ImagePositionPatient = ds_values(geometry.position(k))
        ds.ImageOrientationPatient = ds_values(geometry.row_cosine + geometry.column_cosine)
        ds.SliceThickness = format_number_as_ds(geometry.slice_spacing)
        ds.SliceLocation = format_number_as_ds(float(geometry.position(k) @ geometry.normal))
        ds.KVP = "120"
        ds.Rows, ds.Columns = geometry.rows, geometry.columns
        ds.PixelSpacing = ds_values(geometry.pixel_spacing)
        ds.PixelRepresentation = int(signed)
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept = format_number_as_ds(rescale_intercept)
        ds.RescaleSlope = format_number_as_ds(rescale_slope)
        ds.RescaleType = "HU"
        pixels = stored_values(hu_at(geometry.points(k)), rescale_slope, rescale_intercept, signed)
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        save(ds, files[k], transfer_syntax)
    return PhantomSeries(
        directory=out,
        files=tuple(files),
        study_instance_uid=base.StudyInstanceUID,
        series_instance_uid=series_uid,
        frame_of_reference_uid=base.FrameOfReferenceUID,
        sop_instance_uids=tuple(sop_uids),
        geometry=geometry,
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m operators.dicom.phantom",
        description="Write a synthetic CT phantom study (CT Image Storage files).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="rows = columns")
    parser.add_argument("--oblique", action="store_true", help="rotated image plane")
    parser.add_argument("--shuffle", action="store_true", help="random names, order, numbers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rle", action="store_true", help="RLE Lossless transfer syntax")
    parser.add_argument(
        "--enhanced", action="store_true", help="one Enhanced CT multi-frame file instead"
    )
    args = parser.parse_args(argv)
    syntax = RLELossless if args.rle else ExplicitVRLittleEndian
    if args.enhanced:
        from operators.dicom.enhanced import write_enhanced_ct

        path = write_enhanced_ct(
            args.out_dir / "enhanced-ct.dcm",
            slices=args.slices,
            size=args.size,
            oblique=args.oblique,
            shuffle=args.shuffle,
            seed=args.seed,
            transfer_syntax=syntax,
        )
        print(f"wrote {path} ({args.slices} frames)")
        return 0
    series = write_ct_series(
        args.out_dir,
        slices=args.slices,
        size=args.size,
        oblique=args.oblique,
        shuffle=args.shuffle,
        seed=args.seed,
        transfer_syntax=syntax,
    )
    print(f"wrote {len(series.files)} files to {series.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
