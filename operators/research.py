"""Research writers: a volume (or label volume) with its geometry as NIfTI, MetaImage or NPZ.

Each format has two stages, because a port has one element type (docs/stages.md):

=================== ============================= ===================== ==============
stage               input port                    output (stream)       file
=================== ============================= ===================== ==============
``WriteNifti``      ``volume`` float32 [D, H, W]  ``nifti`` (``nifti``) ``volume.nii.gz``
``WriteNiftiLabels`` ``labels`` uint8 [D, H, W]   ``nifti``             ``labels.nii.gz``
``WriteMhd``        ``volume``                    ``mhd`` (``mhd``)     ``volume.mhd`` + ``.raw``
``WriteMhdLabels``  ``labels``                    ``mhd``               ``labels.mhd`` + ``.raw``
``WriteNpz``        ``volume``                    ``npz`` (``npz``)     ``volume.npz``
``WriteNpzLabels``  ``labels``                    ``npz``               ``labels.npz``
=================== ============================= ===================== ==============

The geometry comes from the input's metadata (docs/tensors.md: DICOM LPS, array axes DHW).
NIfTI and MetaImage files list the column (W) index fastest, so their axes are
``(i, j, k) = (column, row, slice)``; the bytes are the array's own C-order bytes.

- NIfTI (nibabel): sform and qform (code 1, scanner) map (i, j, k) to RAS mm, i.e. our LPS
  affine with x and y negated; labels get intent NIFTI_INTENT_LABEL. Same world positions as
  dcm2niix's NIfTI of the source series (dcm2niix also flips the row axis: a different but
  equivalent voxel order).
- MetaImage: ``Offset`` is the LPS origin, ``ElementSpacing`` and ``DimSize`` in (i, j, k) order,
  ``TransformMatrix`` the direction of i, then of j, then of k (ITK's convention).
- NPZ: ``array`` (the array as given, DHW) and ``metadata`` (its metadata as JSON text, a 0-d
  string array: ``json.loads(str(npz["metadata"]))``); ``np.load`` needs no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dataflow.stage import Port, Stage, StageError
from dataflow.tensors import encode_metadata
from operators.dicom.geometry import GeometryError, index_affine

__all__ = [
    "WriteMhd",
    "WriteMhdLabels",
    "WriteNifti",
    "WriteNiftiLabels",
    "WriteNpz",
    "WriteNpzLabels",
    "mhd_header",
    "nifti_affine",
]

_VOLUME = {"volume": Port("array", element_type="float32", shape=(-1, -1, -1))}
_LABELS = {"labels": Port("array", element_type="uint8", shape=(-1, -1, -1))}
_MET_TYPES = {
    "int8": "MET_CHAR", "uint8": "MET_UCHAR", "int16": "MET_SHORT", "uint16": "MET_USHORT",
    "int32": "MET_INT", "uint32": "MET_UINT", "float32": "MET_FLOAT", "float64": "MET_DOUBLE",
}  # fmt: skip
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine(metadata: Mapping[str, Any]) -> np.ndarray:
    try:
        return index_affine(metadata)
    except GeometryError as exc:
        raise StageError(f"cannot place the array in patient space: {exc}") from exc


def nifti_affine(metadata: Mapping[str, Any]) -> np.ndarray:
    """4x4: NIfTI voxel (i, j, k) = array index (w, h, d) -> RAS mm."""
    return _LPS_TO_RAS @ _affine(metadata)[:, [2, 1, 0, 3]]


def _number(value: float) -> str:
    return repr(float(value) + 0.0)  # + 0.0: no "-0.0"


def mhd_header(array: np.ndarray, metadata: Mapping[str, Any], data_file: str) -> str:
    """The text of a MetaImage header for ``array`` (DHW) stored in ``data_file``."""
    element = _MET_TYPES.get(array.dtype.name)
    if element is None:
        raise StageError(f"MetaImage has no element type for {array.dtype.name}")
    affine = _affine(metadata)
    direction = np.asarray(metadata["direction"], dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(metadata["spacing"], dtype=np.float64)
    fields = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        # rows: the directions of i (column), j (row), k (slice): columns 2, 1, 0 of ours
        "TransformMatrix": " ".join(_number(v) for v in direction[:, [2, 1, 0]].T.ravel()),
        "Offset": " ".join(_number(v) for v in affine[:3, 3]),
        "CenterOfRotation": "0 0 0",
        "ElementSpacing": " ".join(_number(v) for v in spacing[::-1]),
        "DimSize": " ".join(str(n) for n in array.shape[::-1]),
        "ElementType": element,
        "ElementDataFile": data_file,  # last, as MetaIO requires
    }
    return "".join(f"{key} = {value}\n" for key, value in fields.items())


class _Writer(Stage):
    """One array input -> one folder with the file(s); subclasses set the ports and format."""

    port: ClassVar[str] = "volume"
    output: ClassVar[str] = ""

    def __init__(self, name: str = ""):
        if "/" in name or "\\" in name or name.startswith("."):
            raise StageError(f"name {name!r} must be a plain file name without a folder")
        self.name = name or self.port

    def execute(self, ctx, **inputs: Any) -> Path:
        array = np.ascontiguousarray(inputs[self.port])
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        metadata = dict(ctx.metadata.get(self.port) or {})
        out = ctx.output_dir(self.output)
        path = self.write(out, array, metadata)
        ctx.log.info("research_file_written", format=self.output, file=path.name,
                     shape=list(array.shape))  # fmt: skip
        return out

    def write(self, out: Path, array: np.ndarray, metadata: dict[str, Any]) -> Path:
        raise NotImplementedError


def _labels_variant(base: type[_Writer], doc: str) -> type[_Writer]:
    """``base`` with the input port ``labels`` (uint8) instead of ``volume`` (float32)."""
    name = f"{base.__name__}Labels"
    namespace = {"__doc__": doc, "__module__": __name__, "__qualname__": name,
                 "inputs": _LABELS, "port": "labels"}  # fmt: skip
    return type(name, (base,), namespace)


class WriteNifti(_Writer):
    """A float32 volume as NIfTI-1 (``<name>.nii.gz``; ``compress=False``: ``.nii``)."""

    inputs = _VOLUME
    outputs = {"nifti": Port("stream", element_type="nifti")}
    output = "nifti"
    requires = {"nibabel": "dataflow[research]"}  # checked by validate, imported lazily

    def __init__(self, name: str = "", compress: bool = True):
        super().__init__(name)
        self.compress = compress
        try:
            import nibabel  # noqa: F401
        except ImportError:
            raise StageError("WriteNifti needs nibabel: pip install 'dataflow[research]'") from None

    def write(self, out: Path, array: np.ndarray, metadata: dict[str, Any]) -> Path:
        import nibabel as nib

        affine = nifti_affine(metadata)
        image = nib.Nifti1Image(array.transpose(2, 1, 0), affine)
        header = image.header
        header.set_data_dtype(array.dtype)
        header.set_xyzt_units("mm")
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        header["descrip"] = b"dataflow"
        if self.port == "labels":
            header.set_intent("label")
        path = out / f"{self.name}.nii{'.gz' if self.compress else ''}"
        nib.save(image, path)
        return path


WriteNiftiLabels = _labels_variant(WriteNifti, "A uint8 label volume as NIfTI-1 (intent label).")


class WriteMhd(_Writer):
    """A float32 volume as MetaImage: ``<name>.mhd`` (text header) and ``<name>.raw``."""

    inputs = _VOLUME
    outputs = {"mhd": Port("stream", element_type="mhd")}
    output = "mhd"

    def write(self, out: Path, array: np.ndarray, metadata: dict[str, Any]) -> Path:
        header = mhd_header(array, metadata, f"{self.name}.raw")
        (out / f"{self.name}.raw").write_bytes(array.tobytes())
        path = out / f"{self.name}.mhd"
        path.write_text(header)
        return path


WriteMhdLabels = _labels_variant(WriteMhd, "A uint8 label volume as MetaImage (MET_UCHAR).")


class WriteNpz(_Writer):
    """A float32 volume as ``<name>.npz``: ``array`` and ``metadata`` (JSON text)."""

    inputs = _VOLUME
    outputs = {"npz": Port("stream", element_type="npz")}
    output = "npz"

    def __init__(self, name: str = "", compress: bool = True):
        super().__init__(name)
        self.compress = compress

    def write(self, out: Path, array: np.ndarray, metadata: dict[str, Any]) -> Path:
        path = out / f"{self.name}.npz"
        save = np.savez_compressed if self.compress else np.savez
        save(path, array=array, metadata=np.array(encode_metadata(metadata)))
        return path


WriteNpzLabels = _labels_variant(WriteNpz, "A uint8 label volume as ``<name>.npz``.")
