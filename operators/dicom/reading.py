"""Reading DICOM files with bounded memory: headers, and whole instances whose size is known.

A Deflated Explicit VR Little Endian file of a few megabytes can inflate to gigabytes, and
``pydicom.dcmread`` inflates all of it, even with ``stop_before_pixels``. So every read here
is bounded before memory is spent:

- :func:`read_header`: the elements before the pixel data, read from at most
  ``HEADER_LIMIT`` bytes (of the file, or of the inflated dataset: deflated files are inflated
  in chunks, only until the pixel data's tag has been seen). Everything from (7FE0,0008) on is
  left out (pixel data, trailing padding).
- :func:`read_instance`: the whole instance, once its header says how large its pixels are
  (``pixel_bytes``): a deflated dataset is inflated up to ``pixel_bytes + HEADER_LIMIT`` and no
  further; a plain file larger than that is refused unread.
- :func:`decoded_size`: Rows x Columns x NumberOfFrames x SamplesPerPixel x bytes per sample,
  what the decoded pixel array takes, from a header alone.

Every refusal raises :class:`ReadError` (a ``SeriesError``) naming the file, as the caller
calls it (a name, not patient data), and the sizes.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble

from dataflow.units import format_bytes
from operators.dicom.frames import SeriesError, element_int

__all__ = ["HEADER_LIMIT", "ReadError", "decoded_size", "read_header", "read_instance"]

#: Most bytes a header (everything before the pixel data) may take, inflated or not.
HEADER_LIMIT = 32 << 20
_PIXELS = 0x7FE00008  # FloatPixelData; DoubleFloatPixelData and PixelData follow
_DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 256 << 10
_REPEATS = 4


class ReadError(SeriesError):
    """A file cannot be read within its bounds, or is not the DICOM its header claims."""


class _Capped(io.RawIOBase):
    """A read-only file that refuses to be read past ``cap`` bytes (seeks are free)."""

    def __init__(self, fp: BinaryIO, cap: int, name: str) -> None:
        self._fp, self._cap, self.name = fp, cap, name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._fp.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        at = self._fp.tell()
        if size is None or size < 0 or at + size > self._cap:
            raise ReadError(
                f"{self.name}: its header is larger than {format_bytes(self._cap)} (an element "
                f"before the pixel data reaches past byte {self._cap}); refused unread"
            )
        return self._fp.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Stop:
    """``stop_when`` for the top level: True at the pixel data (``seen``); an element whose
    tag comes before the one it follows, or the same tag more than ``_REPEATS`` times in a row
    (zeros, garbage: not a dataset), raises ReadError, so that a run of junk is refused at
    once instead of parsed up to the cap. (A repeated tag is tolerated: some writers do it.)"""

    def __init__(self, name: str) -> None:
        self.name, self.last, self.seen, self.repeats = name, -1, False, 0

    def __call__(self, tag, vr, length) -> bool:
        if tag >= _PIXELS:
            self.seen = True
            return True
        self.repeats = self.repeats + 1 if tag == self.last else 0
        if tag < self.last or self.repeats > _REPEATS:
            raise ReadError(
                f"{self.name}: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) follows "
                f"({self.last >> 16:04X},{self.last & 0xFFFF:04X}): the dataset's elements are "
                "out of order or not DICOM (damaged?)"
            )
        self.last = tag
        return False


def _meta(fp: BinaryIO) -> tuple[bytes, Dataset]:
    """The preamble and the File Meta Information; ``fp`` is left where the dataset starts.

    Raises pydicom's InvalidDicomError for a file without the preamble and "DICM"."""
    preamble = read_preamble(fp, False)
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    return preamble, meta


def _syntax(meta: Dataset) -> tuple[str, bool, bool]:
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    implicit = syntax in ("", "1.2.840.10008.1.2")
    little = syntax != "1.2.840.10008.1.2.2"
    return syntax, implicit, little


def _inflate(fp: BinaryIO, inflater, data: io.BytesIO, target: int) -> None:
    """Inflate from ``fp`` onto the end of ``data`` until it holds ``target`` bytes or the
    deflated stream ends; ``data`` is left at its start."""
    size = data.seek(0, os.SEEK_END)
    while size < target and not inflater.eof:
        chunk = inflater.unconsumed_tail or fp.read(_CHUNK)
        if not chunk:
            break
        size += data.write(inflater.decompress(chunk, target - size))
    data.seek(0)


def _file_dataset(path: Path, ds: Dataset, preamble: bytes, meta: Dataset, syntax) -> FileDataset:
    _, implicit, little = syntax
    out = FileDataset(str(path), ds, preamble, FileMetaDataset(meta), implicit, little)
    out.set_original_encoding(implicit, little, ds._character_set)
    return out


def read_header(path: str | Path, name: str | None = None, limit: int = HEADER_LIMIT) -> Dataset:
    """The header of ``path`` (file meta included, pixel data and what follows left out).

    At most ``limit`` bytes of header are read (inflated, for a deflated file): a larger one
    raises :class:`ReadError`. A file that is not DICOM Part 10 raises pydicom's
    ``InvalidDicomError``, as ``dcmread`` does."""
    path = Path(path)
    name = name or path.name
    with open(path, "rb") as raw:
        capped = _Capped(raw, limit, name)
        preamble, meta = _meta(capped)
        syntax = _syntax(meta)
        if syntax[0] != _DEFLATED:
            ds = read_dataset(capped, syntax[1], syntax[2], stop_when=_Stop(name))
            return _file_dataset(path, ds, preamble, meta, syntax)
        return _deflated_header(raw, path, name, limit, preamble, meta, syntax)


def _deflated_header(raw, path, name, limit, preamble, meta, syntax) -> FileDataset:
    """Inflate a chunk at a time (doubling) until the pixel data's tag or the end is read."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = io.BytesIO()
    while True:
        size = data.getbuffer().nbytes
        try:
            _inflate(raw, inflater, data, min(limit, max(_CHUNK, 2 * size)))
        except zlib.error as exc:
            raise ReadError(f"{name}: cannot inflate the deflated dataset: {exc}") from None
        stop = _Stop(name)
        ds = read_dataset(data, False, True, stop_when=stop)
        if stop.seen or inflater.eof:
            return _file_dataset(path, ds, preamble, meta, syntax)
        if data.getbuffer().nbytes >= limit:
            raise ReadError(
                f"{name}: its deflated header inflates to more than {format_bytes(limit)} "
                "before any pixel data; refused"
            )


def decoded_size(ds: Dataset, name: str) -> int:
    """Bytes of the decoded pixel array: Rows x Columns x NumberOfFrames x SamplesPerPixel x
    BitsAllocated / 8 (rounded up to whole bytes per sample)."""
    rows = element_int(ds, "Rows", name) or 0
    columns = element_int(ds, "Columns", name) or 0
    frames = element_int(ds, "NumberOfFrames", name) or 1
    samples = element_int(ds, "SamplesPerPixel", name) or 1
    bits = element_int(ds, "BitsAllocated", name) or 16
    return rows * columns * frames * samples * max(1, (bits + 7) // 8)


def read_instance(path: str | Path, pixel_bytes: int, name: str | None = None) -> Dataset:
    """The whole instance at ``path``, whose pixels decode to ``pixel_bytes`` (its header's
    :func:`decoded_size`): at most ``pixel_bytes + HEADER_LIMIT`` bytes are read or inflated."""
    import pydicom

    path = Path(path)
    name = name or path.name
    bound = pixel_bytes + HEADER_LIMIT
    with open(path, "rb") as raw:
        preamble, meta = _meta(raw)
        syntax = _syntax(meta)
        if syntax[0] != _DEFLATED:
            size = os.fstat(raw.fileno()).st_size
            if size > bound:
                raise ReadError(
                    f"{name} holds {format_bytes(size)}, more than its header's "
                    f"{format_bytes(pixel_bytes)} of pixels allow; refused unread"
                )
            raw.seek(0)
            return pydicom.dcmread(raw)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = io.BytesIO()
        try:
            _inflate(raw, inflater, data, bound + 1)
        except zlib.error as exc:
            raise ReadError(f"{name}: cannot inflate the deflated dataset: {exc}") from None
        if not inflater.eof:
            raise ReadError(
                f"{name} inflates to more than {format_bytes(bound)} though its header "
                f"describes {format_bytes(pixel_bytes)} of pixels; refused"
            )
        ds = read_dataset(data, False, True)
        del data
        return _file_dataset(path, ds, preamble, meta, syntax)
