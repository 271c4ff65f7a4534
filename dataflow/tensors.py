"""Clara element types, tensor metadata, and how a tensor with its geometry travels as Arrow.

The written convention is ``docs/tensors.md``; this module is its one implementation.

- Element types use Clara's names (``uint8`` … ``float64``, the short aliases ``u8`` … ``f64``)
  plus ``bool``; :func:`dtype_of` turns any of them (or a NumPy dtype) into a NumPy dtype and
  :func:`element_type_of` turns a NumPy dtype back into the Clara name.
- Metadata is a small JSON-compatible mapping. Geometry keys follow array axis order
  (``spacing[i]`` belongs to ``shape[i]``), see :data:`GEOMETRY_KEYS`.
- As Arrow, a tensor is a one-row :class:`pyarrow.Table` with one column ``tensor`` of the
  canonical fixed-shape tensor extension type; the metadata travels as JSON under the schema
  metadata key ``dataflow.metadata``. Both directions are zero-copy for C-contiguous arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from dataflow.errors import StoreValueError

__all__ = [
    "ELEMENT_TYPES",
    "GEOMETRY_KEYS",
    "MAX_METADATA_BYTES",
    "METADATA_KEY",
    "dtype_of",
    "element_type_of",
    "encode_metadata",
    "tensor_from_arrow",
    "tensor_to_arrow",
]

#: Clara element-type name -> NumPy dtype (plus ``bool``).
ELEMENT_TYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "uint8", "uint16", "uint32", "uint64",
        "int8", "int16", "int32", "int64",
        "float16", "float32", "float64", "bool",
    )
}  # fmt: skip
_ALIASES = {
    "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "f16": "float16", "f32": "float32", "f64": "float64",
}  # fmt: skip
_BY_DTYPE = {dt: name for name, dt in ELEMENT_TYPES.items()}

#: Metadata keys with a fixed meaning (see docs/tensors.md).
GEOMETRY_KEYS = (
    "spacing",  # per array axis, in mm, same order as shape
    "origin",  # patient position (x, y, z) of element [0, 0, 0], LPS, mm
    "direction",  # 9 floats, row-major 3x3; column i = LPS direction of array axis i
    "axes",  # axis labels in array order, e.g. "DHW" or "CDHW"
    "study_instance_uid",
    "series_instance_uid",
    "frame_of_reference_uid",
    "sop_instance_uids",  # one per slice along the first spatial axis
    "frame_numbers",  # multi-frame sources: the frame of each slice (1-based), with the UIDs
    "modality",
)

#: Schema metadata key under which the JSON metadata travels in Arrow.
METADATA_KEY = b"dataflow.metadata"
#: Largest metadata mapping accepted, once JSON-encoded (room for the SOP Instance UIDs of a
#: few thousand slices).
MAX_METADATA_BYTES = 1024 * 1024
_COLUMN = "tensor"


def dtype_of(element_type: Any) -> np.dtype:
    """The NumPy dtype for a Clara element type name, alias or anything NumPy accepts."""
    if isinstance(element_type, str):
        name = _ALIASES.get(element_type.lower(), element_type.lower())
        if name in ELEMENT_TYPES:
            return ELEMENT_TYPES[name]
    else:
        try:
            dt = np.dtype(element_type)
        except TypeError:
            dt = None
        if dt is not None and dt.newbyteorder("=") in _BY_DTYPE:
            return dt.newbyteorder("=")
    choices = ", ".join(ELEMENT_TYPES)
    raise StoreValueError(f"unsupported element type {element_type!r}; expected one of {choices}")


def element_type_of(dtype: Any) -> str:
    """Clara's name for a NumPy dtype (``np.int16`` -> ``"int16"``)."""
    return _BY_DTYPE[dtype_of(dtype)]


def check_shape(shape: Any) -> tuple[int, ...]:
    """A concrete shape as a tuple of non-negative ints, or a clear error."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise StoreValueError(f"shape must be a sequence of integers; got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise StoreValueError(f"shape must be concrete (no -1) and non-negative; got {dims}")
    return dims


def encode_metadata(metadata: Mapping[str, Any] | None) -> str:
    """Validate a metadata mapping and return its JSON text."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise StoreValueError(f"metadata must be a mapping; got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata), allow_nan=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StoreValueError(f"metadata must be JSON-compatible: {exc}") from None
    if len(text) > MAX_METADATA_BYTES:
        raise StoreValueError(
            f"metadata is {len(text)} bytes as JSON; the limit is {MAX_METADATA_BYTES} "
            "(put bulky data in an object of its own)"
        )
    return text


def _json_default(value: Any) -> Any:
    # NumPy scalars and small arrays (spacing, direction) are common in metadata.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-compatible")


def tensor_to_arrow(array: np.ndarray, metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """A tensor and its metadata as a one-row Arrow table (zero-copy when C-contiguous)."""
    array = np.asarray(array)
    dtype_of(array.dtype)  # reject unsupported element types with a clear error
    if array.dtype == np.bool_:
        raise StoreValueError("bool tensors have no Arrow fixed-shape form (Arrow packs bits)")
    array = np.ascontiguousarray(array)
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(array.reshape((1, *array.shape)))
    schema = pa.schema(
        [pa.field(_COLUMN, column.type)], metadata={METADATA_KEY: encode_metadata(metadata)}
    )
    return pa.Table.from_arrays([column], schema=schema)


def tensor_from_arrow(table: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, dict[str, Any]]:
    """The tensor (zero-copy view) and metadata from a table written by :func:`tensor_to_arrow`."""
    if _COLUMN not in table.column_names:
        raise StoreValueError(
            f"an Arrow tensor needs a column {_COLUMN!r}; got columns {table.column_names}"
        )
    column = table.column(_COLUMN)
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            column = column.combine_chunks()
        else:
            column = column.chunk(0)
    if not isinstance(column.type, pa.FixedShapeTensorType) or len(column) != 1:
        raise StoreValueError(
            f"column {_COLUMN!r} must hold one fixed-shape tensor; got {len(column)} "
            f"value(s) of type {column.type}"
        )
    array = column.to_numpy_ndarray()[0]
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"{}")
    return array, json.loads(raw)
