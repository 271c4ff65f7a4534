"""The SEG writer's fast path: highdicom's Segmentation, its per-frame part encoded directly.

highdicom builds a BINARY SEG of a 200 x 512² CT (3 segments, about 550 non-empty frames) as
a pydicom Dataset per frame (Frame Content, Plane Position, Derivation Image with its Source
Image, Segment Identification), and pydicom then encodes some 12 000 elements one at a time:
about 0.6 s of Python per SEG. Here highdicom builds the same SEG on the *first source slice
alone* (everything that is not per frame or per source: patient, study, series, equipment,
segments, dimensions, shared functional groups), and what depends on every slice is written
from the sources directly, as the bytes pydicom would write (Explicit VR Little Endian, items
and sequences of defined length):

- the Per-frame Functional Groups Sequence: each source's Derivation Image and Plane Position
  items encoded once, each frame's item joined from them and its Frame Content and Segment
  Identification (the constant parts, such as the derivation and purpose codes, are taken
  from highdicom's item for the first slice, encoded by pydicom);
- the Source Image Sequence and the Referenced Series Sequence (every source slice);
- Pixel Data: each segment's non-empty planes, in highdicom's order (segments as described,
  planes along the normal), bit-packed by a Numba kernel; Number of Frames; the Spacing
  Between Slices and Dimension Organization Type highdicom derives from all the planes.

The frames, their order and every value are highdicom's (0.28): the same rules (empty planes
and empty segment frames omitted, planes sorted by their distance along the normal, dimension
index values counted among the non-empty planes) and highdicom's own helpers for the plane
positions' formatting and the slice spacing. ``tests/integration/test_dicom_seg_fast.py``
compares the two element by element and the per-frame sequence byte for byte. Anything this
path does not know (a multi-frame or slide source, no frame of reference, differing
orientations or sizes, a highdicom whose per-frame items are built differently) makes
:func:`fast_segmentation` return None, and the caller uses highdicom for the whole SEG.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from dataflow.execution.jitcache import configure_numba_cache

CACHE = configure_numba_cache()  # before numba is imported, so it reads NUMBA_CACHE_DIR

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import correct_ambiguous_vr, write_data_element  # noqa: E402
from pydicom.tag import Tag  # noqa: E402
from pydicom.valuerep import DS, format_number_as_ds  # noqa: E402

__all__ = ["fast_segmentation", "pack_frames", "plane_counts", "warmup"]

_PAR = {"parallel": True, "cache": CACHE, "nogil": True, "error_model": "numpy"}

# Tags (group << 16 | element)
_SOURCE_IMAGE = 0x00082112
_REFERENCED_SERIES = 0x00081115
_REFERENCED_INSTANCES = 0x0008114A
_SOP_CLASS = 0x00081150
_SOP_INSTANCE = 0x00081155
_SERIES_UID = 0x0020000E
_DERIVATION_IMAGE = 0x00089124
_DERIVATION_CODE = 0x00089215
_FRAME_CONTENT = 0x00209111
_DIMENSION_INDEX_VALUES = 0x00209157
_PLANE_POSITION = 0x00209113
_IMAGE_POSITION = 0x00200032
_SEGMENT_IDENTIFICATION = 0x0062000A
_SEGMENT_NUMBER = 0x0062000B
_PER_FRAME = 0x52009230
_PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}  # fmt: skip

# The keys highdicom 0.28 puts in each item this path writes; anything else: highdicom's path.
_FRAME_KEYS = [_DERIVATION_IMAGE, _FRAME_CONTENT, _PLANE_POSITION]  # + segment (several)
_DERIVATION_KEYS = [_SOURCE_IMAGE, _DERIVATION_CODE]
_SOURCE_KEYS = [_SOP_CLASS, _SOP_INSTANCE, 0x0028135A, 0x0040A170]


# ------------------------------------------------------------------ kernels


@njit(**_PAR)
def plane_counts(labels):
    """How many of each value 0..255 each plane of the uint8 ``labels [D, H * W]`` holds."""
    counts = np.zeros((labels.shape[0], 256), np.int64)
    for k in prange(labels.shape[0]):
        for i in range(labels.shape[1]):
            counts[k, labels[k, i]] += 1
    return counts


@njit(**_PAR)
def pack_frames(labels, planes, values, out):
    """Frame f is ``labels[planes[f]] == values[f]`` (``labels [D, H * W]``, H * W a multiple
    of 8), packed 8 pixels a byte, first pixel in the lowest bit, into ``out`` from byte
    f * H * W / 8 on: what pydicom's ``pack_bits`` makes of the frames one after another."""
    per = labels.shape[1] // 8
    for f in prange(planes.shape[0]):
        plane, value = planes[f], values[f]
        base = f * per
        for i in range(per):
            byte = 0
            for j in range(8):
                if labels[plane, 8 * i + j] == value:
                    byte |= 1 << j
            out[base + i] = byte


def warmup() -> None:
    """Compile (or load from the cache) the two kernels, as a stage's ``prepare`` does."""
    labels = np.zeros((2, 8), np.uint8)
    plane_counts(labels)
    pack_frames(labels, np.zeros(1, np.int64), np.ones(1, np.uint8), np.empty(1, np.uint8))


# ------------------------------------------------------------------ encoding


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element, Explicit VR Little Endian, of defined length."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _items(items: Sequence[bytes]) -> bytes:
    """A sequence's value: ``items`` (each its elements' bytes), items of defined length."""
    return b"".join(_ITEM + struct.pack("<I", len(i)) + i for i in items)


def _sequence(tag: int, items: Sequence[bytes]) -> bytes:
    return _element(tag, b"SQ", _items(items))


def _uid(value: Any) -> bytes:
    data = str(value).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _ds(values: Sequence[Any]) -> bytes:
    """A DS value as pydicom writes it (its original string where it keeps one)."""
    text = "\\".join(getattr(v, "original_string", None) or str(v) for v in values)
    data = text.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _pydicom_bytes(elem) -> bytes:
    """``elem`` as pydicom encodes it (Explicit VR Little Endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _references(sources: Sequence[Dataset]) -> list[bytes]:
    """Per source: the item of a Source Image / Referenced Instance Sequence (class, UID)."""
    return [
        _element(_SOP_CLASS, b"UI", _uid(ds.SOPClassUID))
        + _element(_SOP_INSTANCE, b"UI", _uid(ds.SOPInstanceUID))
        for ds in sources
    ]


# ------------------------------------------------------------------ the SEG


def _geometry(sources: Sequence[Dataset], orientation) -> tuple[np.ndarray, np.ndarray] | None:
    """The planes' positions (as highdicom formats them: DS, auto-formatted) and their
    order along the normal, or None when two planes share a position."""
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, _get_slice_distances, get_normal_vector

    positions = [[DS(v, auto_format=True) for v in ds.ImagePositionPatient] for ds in sources]
    values = np.array(positions)
    normal = get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION)
    _, order = np.unique(_get_slice_distances(values, normal), return_index=True)
    if len(order) != len(sources):
        return None
    return values, order


def _same_series(sources: Sequence[Dataset]) -> bool:
    """What highdicom requires of several single-frame sources (one series, size, frame of
    reference and orientation), and what this path needs (a frame of reference, in patient
    coordinates, no frames)."""
    first = sources[0]
    key = (first.StudyInstanceUID, first.SeriesInstanceUID, first.Rows, first.Columns,
           first.get("FrameOfReferenceUID"))  # fmt: skip
    orientation = first.ImageOrientationPatient
    for ds in sources:
        if (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Rows, ds.Columns,
                ds.get("FrameOfReferenceUID")) != key:  # fmt: skip
            return False
        if ds.ImageOrientationPatient != orientation or "NumberOfFrames" in ds:
            return False
    slide = "ImageOrientationSlide" in first or "ImageCenterPointCoordinatesSequence" in first
    return key[-1] is not None and not slide


def fast_segmentation(
    build: Callable[[Sequence[Dataset], np.ndarray], Dataset],
    sources: Sequence[Dataset],
    pixels: np.ndarray,
    numbers: Sequence[int],
    counts: np.ndarray | None = None,
) -> Dataset | None:
    """The SEG ``build`` (highdicom's Segmentation with the writer's arguments, given sources
    and pixels) makes of ``sources`` and ``pixels`` (uint8, values 0 and the segment
    ``numbers``, in the order described), or None where this path does not apply.

    ``counts`` is :func:`plane_counts` of ``pixels`` where the caller has it. ``build`` is
    called once, on the first source and one plane; the result is a pydicom
    Dataset (not a highdicom object: its per-frame sequence is kept encoded)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or len(sources) != pixels.shape[0]:
        return None
    if not _same_series(sources):
        return None
    first = sources[0]
    if (int(first.Rows), int(first.Columns)) != pixels.shape[1:]:
        return None
    labels = np.ascontiguousarray(pixels).reshape(pixels.shape[0], -1)
    if counts is None:
        counts = plane_counts(labels)
    numbers = [int(n) for n in numbers]
    present = [int(n) for n in np.flatnonzero(counts.sum(axis=0)) if n]
    if not present or any(n not in numbers for n in present):
        return None  # all empty (highdicom keeps every frame) or undescribed values
    # The skeleton: the first source, one plane holding a voxel of the first segment.
    plane = np.zeros((1, *pixels.shape[1:]), np.uint8)
    plane[0, 0, 0] = numbers[0]
    skeleton = build([first], plane)
    shared = skeleton.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared or "PixelMeasuresSequence" not in shared:
        return None
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    geometry = _geometry(sources, orientation)
    frame_item = skeleton.PerFrameFunctionalGroupsSequence[0]
    if geometry is None or not _known_structure(skeleton, frame_item, len(numbers)):
        return None
    positions, order = geometry
    out = _dataset(skeleton)
    _spatial(out, first, shared, positions, orientation, counts, numbers)
    _references_into(out, sources)
    frames = _frames(counts, order, numbers)
    out[_PER_FRAME] = _raw(_PER_FRAME, _per_frame(frame_item, sources, frames, len(numbers)))
    out.NumberOfFrames = len(frames)
    out.PixelData = _pixel_data(labels, frames, pixels.shape[1] * pixels.shape[2])
    return out


def _known_structure(skeleton: Dataset, item: Dataset, segments: int) -> bool:
    """Whether highdicom built its per-frame item and references as this path writes them."""
    keys = _tags(item)
    expected = _FRAME_KEYS + [_SEGMENT_IDENTIFICATION] * (segments > 1)
    if keys != expected or len(item.DerivationImageSequence) != 1:
        return False
    derivation = item.DerivationImageSequence[0]
    if _tags(derivation) != _DERIVATION_KEYS:
        return False
    if len(derivation.SourceImageSequence) != 1:
        return False
    source = derivation.SourceImageSequence[0]
    if _tags(source) != _SOURCE_KEYS:
        return False
    series = skeleton.get("ReferencedSeriesSequence") or []
    return (
        len(series) == 1
        and _tags(series[0]) == [_REFERENCED_INSTANCES, _SERIES_UID]
        and "SourceImageSequence" in skeleton
        and skeleton.get("DimensionOrganizationType") is None
    )


def _tags(ds: Dataset) -> list[int]:
    return sorted(map(int, ds.keys()))


def _dataset(skeleton: Dataset) -> Dataset:
    """A plain pydicom Dataset holding the skeleton's elements, to be written as Explicit VR
    Little Endian with its encoded elements as they are."""
    out = Dataset()
    out.update(skeleton)
    out.file_meta = skeleton.file_meta
    out.preamble = skeleton.preamble
    correct_ambiguous_vr(out, True)
    out.set_original_encoding(False, True, out._character_set)
    return out


def _spatial(out, first, shared, positions, orientation, counts, numbers) -> None:
    """Spacing Between Slices (all planes) and Dimension Organization Type (one segment: the
    non-empty planes), as highdicom derives them."""
    from highdicom.spatial import get_volume_positions

    measures = shared.PixelMeasuresSequence[0]
    if first.get("SpacingBetweenSlices") is None:  # else highdicom copies the source's
        spacing, _ = get_volume_positions(image_positions=positions, image_orientation=orientation)
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
        elif "SpacingBetweenSlices" in measures:  # the one plane's
            del measures.SpacingBetweenSlices
    if len(numbers) == 1:
        included = [k for k in range(len(positions)) if counts[k, 1:].any()]
        if len(included) > 1:
            spacing, _ = get_volume_positions(
                image_positions=positions[included, :], image_orientation=orientation, sort=False
            )
            if spacing is not None and spacing > 0.0:
                out.DimensionOrganizationType = "3D"


def _references_into(out: Dataset, sources: Sequence[Dataset]) -> None:
    """Source Image Sequence and Referenced Series Sequence naming every source, in order."""
    items = _references(sources)
    out[_SOURCE_IMAGE] = _raw(_SOURCE_IMAGE, _items(items))
    series = _sequence(_REFERENCED_INSTANCES, items) + _element(
        _SERIES_UID, b"UI", _uid(sources[0].SeriesInstanceUID)
    )
    out[_REFERENCED_SERIES] = _raw(_REFERENCED_SERIES, _items([series]))


def _frames(counts: np.ndarray, order: np.ndarray, numbers: list[int]) -> list[tuple]:
    """(plane, segment number, segment index, dimension index of the plane) of each frame, in
    highdicom's order: segments as described, non-empty planes along the normal."""
    nonempty = [int(k) for k in order if counts[k, 1:].any()]
    frames = []
    for s, number in enumerate(numbers):
        for rank, plane in enumerate(nonempty, 1):
            if counts[plane, number]:
                frames.append((plane, number, s + 1, rank))
    return frames


def _per_frame(item: Dataset, sources, frames, segments: int) -> bytes:
    """The Per-frame Functional Groups Sequence's value: one item per frame."""
    derivation = item.DerivationImageSequence[0]
    source = derivation.SourceImageSequence[0]
    code = _pydicom_bytes(derivation[_DERIVATION_CODE])
    source_tail = _pydicom_bytes(source[0x0028135A]) + _pydicom_bytes(source[0x0040A170])
    references = _references(sources)
    derived = {}
    placed = {}
    for plane in {f[0] for f in frames}:
        image = _sequence(_SOURCE_IMAGE, [references[plane] + source_tail]) + code
        derived[plane] = _sequence(_DERIVATION_IMAGE, [image])
        position = [DS(v, auto_format=True) for v in sources[plane].ImagePositionPatient]
        placed[plane] = _sequence(_PLANE_POSITION,
                                  [_element(_IMAGE_POSITION, b"DS", _ds(position))])  # fmt: skip
    out = []
    for plane, number, segment, rank in frames:  # about 550 for a 200 x 512² CT: 2 ms
        content = _element(_DIMENSION_INDEX_VALUES, b"UL", struct.pack("<II", segment, rank))
        body = derived[plane] + _sequence(_FRAME_CONTENT, [content]) + placed[plane]
        if segments > 1:
            body += _sequence(
                _SEGMENT_IDENTIFICATION,
                [_element(_SEGMENT_NUMBER, b"US", struct.pack("<H", number))],
            )
        out.append(body)
    return _items(out)


def _pixel_data(labels: np.ndarray, frames: list[tuple], pixels_per_frame: int) -> bytes:
    """The frames bit-packed one after another (highdicom's encoding: pydicom's ``pack_bits``
    of the frames' pixels in a row, a trailing ``b"0"`` where the length is odd)."""
    planes = np.array([f[0] for f in frames], np.int64)
    values = np.array([f[1] for f in frames], np.uint8)
    if pixels_per_frame % 8 == 0:
        data = np.empty(len(frames) * pixels_per_frame // 8, np.uint8)
        pack_frames(labels, planes, values, data)
    else:
        bits = (labels[planes] == values[:, None]).ravel()
        data = np.packbits(bits, bitorder="little")
    packed = data.tobytes()
    return packed + b"0" if len(packed) % 2 else packed


def _raw(tag: int, value: bytes) -> RawDataElement:
    """An encoded sequence's value (its items), written by pydicom as it is."""
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)
