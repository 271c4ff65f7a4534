"""A derived image series (a processed volume back to DICOM) and a secondary-capture preview.

``WriteDerivedSeries`` takes a float32 volume in the geometry of a source series read by
``SeriesToVolume`` (e.g. a smoothed CT) and writes it as a new series of the source's IOD: one
file per source slice, each header derived from its source slice (same patient, study, frame
of reference, position and orientation), ImageType ``DERIVED\\SECONDARY``, new Series and SOP
Instance UIDs, a DerivationDescription and a SourceImageSequence naming the source slice.

Pixels are stored as 16-bit integers with one RescaleSlope / RescaleIntercept for the series
(:func:`choose_rescale`): integral values within int16 are stored exactly (slope 1), anything
else spreads its range over uint16, so that the error is at most half a step,
(max - min) / 65535 / 2.

The preview is one 8-bit grayscale Secondary Capture Image of the middle slice (highdicom's
``SCImage``), windowed by the source's WindowCenter / WindowWidth unless told otherwise.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from dataflow import __version__
from dataflow.stage import Port, Stage, StageError
from operators.dicom.provenance import stamp
from operators.dicom.seg import source_datasets

__all__ = [
    "WriteDerivedSeries",
    "choose_rescale",
    "make_derived_series",
    "make_preview",
    "orientation_letters",
]

# Attributes describing the source's stored pixels, dropped from the derived headers.
_STALE = (
    "PixelData", "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
    "PixelPaddingRangeLimit", "WindowCenterWidthExplanation", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)  # fmt: skip


def choose_rescale(volume: np.ndarray) -> tuple[float, float, bool]:
    """``(slope, intercept, signed)`` to store ``volume`` in 16-bit integers.

    Slope and intercept are what their decimal strings (VR DS) read back as.
    """
    if not np.all(np.isfinite(volume)):
        raise StageError("the volume holds NaN or infinite values: it cannot be stored as DICOM")
    low, high = float(volume.min()), float(volume.max())
    if low >= -32768 and high <= 32767 and np.array_equal(volume, np.rint(volume)):
        return 1.0, 0.0, True
    if high == low:
        return 1.0, float(format_number_as_ds(low)), False
    # a touch more than range / 65535, so that the range still fits after DS formatting
    slope = float(format_number_as_ds((high - low) / 65535 * (1 + 1e-9)))
    return slope, float(format_number_as_ds(low)), False


def _stored(values: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    dtype = np.dtype("<i2" if signed else "<u2")
    info = np.iinfo(dtype)
    stored = np.rint((values.astype(np.float64) - intercept) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _source_reference(source: Dataset) -> Dataset:
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def _check_fits(volume: np.ndarray, sources: Sequence[Dataset]) -> None:
    first = sources[0]
    expected = (len(sources), int(first.Rows), int(first.Columns))
    if volume.ndim != 3 or volume.shape != expected:
        raise StageError(
            f"volume {list(volume.shape)} does not match the source series {list(expected)}: "
            "a derived series keeps the source's slices and pixel grid (resample back first)"
        )
    if "PerFrameFunctionalGroupsSequence" in first or int(first.get("NumberOfFrames", 1)) > 1:
        raise StageError("derived series from multi-frame sources are not supported yet")


def make_derived_series(
    volume: np.ndarray,
    sources: Sequence[Dataset],
    *,
    series_description: str = "Derived",
    derivation_description: str = "Processed by dataflow",
    series_number: int = 9200,
) -> list[Dataset]:
    """One dataset per source slice (same order), holding ``volume``'s slice."""
    _check_fits(volume, sources)
    slope, intercept, signed = choose_rescale(volume)
    series_uid = generate_uid()
    now = datetime.datetime.now()
    out = []
    for k, source in enumerate(sources):
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for keyword in _STALE:
            if keyword in ds:
                del ds[keyword]
        image_type = list(source.get("ImageType", []))[2:]
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type]
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = k + 1
        ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
        ds.DerivationDescription = derivation_description
        ds.SourceImageSequence = DicomSequence([_source_reference(source)])
        ds.SoftwareVersions = __version__
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = format_number_as_ds(slope)
        ds.RescaleIntercept = format_number_as_ds(intercept)
        ds.add_new("PixelData", "OW", _stored(volume[k], slope, intercept, signed).tobytes())
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _window(source: Dataset, image: np.ndarray) -> tuple[float, float]:
    def first(value):
        return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str)
                     else value)  # fmt: skip

    if "WindowCenter" in source and "WindowWidth" in source:
        try:
            return first(source.WindowCenter), first(source.WindowWidth)
        except (TypeError, ValueError, IndexError):
            name = getattr(source, "filename", None) or "the middle source slice"
            raise StageError(
                f"{name}: (0028,1050) WindowCenter / (0028,1051) WindowWidth "
                f"{str(source.WindowCenter)[:20]!r} / {str(source.WindowWidth)[:20]!r} are not "
                "numbers (give window_center and window_width)"
            ) from None
    low, high = float(image.min()), float(image.max())
    return (low + high) / 2, max(high - low, 1e-6)


def orientation_letters(vector: Sequence[float]) -> str:
    """PatientOrientation value for an LPS direction: principal letter first, then refinements
    (components above 1e-3), e.g. ``(0.97, 0.26, 0)`` -> ``"LP"``."""
    letters = []
    for axis in np.argsort(-np.abs(vector), kind="stable"):
        if abs(vector[axis]) > 1e-3:
            letters.append("LPH"[axis] if vector[axis] > 0 else "RAF"[axis])
    return "".join(letters)


def make_preview(
    volume: np.ndarray,
    sources: Sequence[Dataset],
    *,
    window: tuple[float, float] | None = None,
    series_number: int = 9201,
    series_description: str = "Preview",
):
    """An 8-bit Secondary Capture Image (highdicom) of the middle slice of ``volume``."""
    import highdicom as hd

    _check_fits(volume, sources)
    k = len(sources) // 2
    image = np.asarray(volume[k], dtype=np.float64)
    center, width = window or _window(sources[k], image)
    iop = [float(v) for v in sources[k].ImageOrientationPatient]
    orientation = (orientation_letters(iop[:3]), orientation_letters(iop[3:]))
    scaled = np.clip((image - (center - width / 2)) / width, 0.0, 1.0)
    pixels = np.rint(scaled * 255).astype(np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[k],
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=(orientation[0][0], orientation[1][0]),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dataflow",
        pixel_spacing=tuple(float(v) for v in sources[k].PixelSpacing),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.PatientOrientation = list(orientation)  # highdicom takes only the principal letters
    sc.SeriesDescription = series_description
    for keyword in ("BodyPartExamined", "Laterality"):  # Laterality is type 2C on body part
        if keyword in sources[k] and keyword not in sc:
            sc[keyword] = copy.deepcopy(sources[k][keyword])
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = ""  # body part unknown: so is laterality (dciodvfy wants it present)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"slice {k + 1} of {len(sources)}, window {center:g}/{width:g}"
    sc.SourceImageSequence = DicomSequence([_source_reference(sources[k])])
    return sc


class WriteDerivedSeries(Stage):
    """Writes ``volume`` as a derived series of the source in ``study``, plus a preview."""

    inputs = {
        "volume": Port("array", element_type="float32", shape=(-1, -1, -1)),
        "study": Port("stream", element_type="dicom"),
    }
    outputs = {
        "series": Port("stream", element_type="dicom"),
        "preview": Port("stream", element_type="dicom"),
    }
    wants_provenance = True  # ctx.provenance: the job's record, into every instance

    def __init__(
        self,
        series_description: str = "Derived",
        derivation_description: str = "Processed by dataflow",
        series_number: int = 9200,
        preview: bool = True,
        window_center: float | None = None,
        window_width: float | None = None,
    ):
        if (window_center is None) != (window_width is None) or (window_width or 1) <= 0:
            raise StageError("give both window_center and window_width (> 0), or neither")
        self.series_description = series_description
        self.derivation_description = derivation_description
        self.series_number = series_number
        self.preview = preview
        self.window = None if window_center is None else (window_center, window_width)

    def execute(self, ctx, volume, study: Path) -> dict[str, Path]:
        sources = source_datasets(study, ctx.metadata["volume"])
        datasets = make_derived_series(
            volume, sources, series_description=self.series_description,
            derivation_description=self.derivation_description,
            series_number=self.series_number,
        )  # fmt: skip
        series = ctx.output_dir("series")
        for ds in datasets:
            stamp(ctx, ds)
            ds.save_as(series / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        preview = ctx.output_dir("preview")
        if self.preview:
            sc = make_preview(volume, sources, window=self.window,
                              series_number=self.series_number + 1)  # fmt: skip
            stamp(ctx, sc)
            sc.save_as(preview / f"{sc.SOPInstanceUID}.dcm")
        ctx.log.info(
            "derived_series_written", files=len(datasets), slope=float(datasets[0].RescaleSlope)
        )
        return {"series": series, "preview": preview}
