"""Hostile DICOM files for the tests: what a site that means harm (or a broken one) sends."""

from __future__ import annotations

import io
import resource
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

MIB = 1 << 20


def deflated_bomb(path: Path, template: Path, *, rows: int, columns: int, pixel_bytes: int):
    """``template``'s header with Rows x Columns changed and ``pixel_bytes`` of zero pixel
    data, deflated. Zeros after a full flush compress to the same block every MiB, so the
    file (about 1 KiB per MiB) is written without compressing gigabytes."""
    ds = pydicom.dcmread(template, stop_before_pixels=True)
    ds.Rows, ds.Columns = rows, columns
    meta = ds.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    del ds.file_meta
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = packer.compress(head.getvalue() + pixel_header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(MIB)) + packer.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(pixel_bytes, MIB)
    file_meta = io.BytesIO()
    write_file_meta_info(file_meta, meta)
    with open(path, "wb") as out:
        out.write(b"\0" * 128 + b"DICM" + file_meta.getvalue() + start)
        for _ in range(whole):
            out.write(block)
        out.write(packer.compress(bytes(rest)) + packer.flush())
    return path


def limit_address_space(nbytes: int):
    """A ``preexec_fn`` that caps a child's address space (RLIMIT_AS) at ``nbytes``, so that
    a regression fails with MemoryError instead of taking the machine's memory."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

    return limit
