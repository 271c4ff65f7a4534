import numpy as np
import pyarrow as pa
import pytest

from dataflow.errors import StoreValueError
from dataflow.tensors import (
    ELEMENT_TYPES,
    METADATA_KEY,
    dtype_of,
    element_type_of,
    encode_metadata,
    tensor_from_arrow,
    tensor_to_arrow,
)
from dataflow.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("4GiB", 4 << 30), ("512 MiB", 512 << 20), ("1.5k", 1500), ("100", 100), (7, 7)],
)
def test_parse_bytes(text, nbytes):
    assert parse_bytes(text) == nbytes


@pytest.mark.parametrize("bad", ["lots", "4 GiBs", "-1", -5])
def test_parse_bytes_rejects_with_the_value(bad):
    with pytest.raises(ValueError, match=str(bad).strip("-") if isinstance(bad, str) else "-5"):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(100) == "100 B"
    assert format_bytes(3 << 20) == "3.0 MiB"
    assert format_bytes(5 << 40) == "5120.0 GiB"


def test_clara_names_aliases_and_numpy_dtypes():
    assert dtype_of("i16") == np.int16
    assert dtype_of("Float32") == np.float32
    assert dtype_of(np.uint64) == np.uint64
    assert dtype_of(np.dtype(">f4")) == np.float32  # byte order is normalised
    assert element_type_of(np.bool_) == "bool"
    assert len(ELEMENT_TYPES) == 12


@pytest.mark.parametrize("bad", ["complex64", "str", object, "int128"])
def test_unsupported_element_types_name_the_choices(bad):
    with pytest.raises(StoreValueError, match="unsupported element type.*uint8"):
        dtype_of(bad)


def test_metadata_must_be_json_and_small():
    assert encode_metadata({"spacing": np.array([1.0, 2.0]), "n": np.int64(3)}) == (
        '{"spacing": [1.0, 2.0], "n": 3}'
    )
    with pytest.raises(StoreValueError, match="JSON-compatible"):
        encode_metadata({"f": object()})
    with pytest.raises(StoreValueError, match="must be a mapping"):
        encode_metadata([1, 2])
    with pytest.raises(StoreValueError, match="limit is"):
        encode_metadata({"x": "a" * 1_100_000})


def test_tensor_arrow_round_trip_is_zero_copy_and_keeps_geometry():
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    meta = {"spacing": [2.5, 0.7, 0.7], "origin": [0, 0, 0], "axes": "DHW"}
    table = tensor_to_arrow(volume, meta)
    assert table.schema.metadata[METADATA_KEY]
    assert isinstance(table.schema.field("tensor").type, pa.FixedShapeTensorType)
    back, back_meta = tensor_from_arrow(table)
    assert back_meta == meta
    np.testing.assert_array_equal(back, volume)
    assert np.shares_memory(back, volume)


def test_tensor_from_arrow_names_what_is_wrong():
    with pytest.raises(StoreValueError, match="needs a column 'tensor'"):
        tensor_from_arrow(pa.table({"x": [1]}))
    with pytest.raises(StoreValueError, match="must hold one fixed-shape tensor"):
        tensor_from_arrow(pa.table({"tensor": [1, 2]}))
