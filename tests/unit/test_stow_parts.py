"""STOW-RS's pure parts: the incremental multipart reader (any chunking gives the same parts),
the Part 10 file meta reader, and the ``dicom.stow`` section's checks."""

from __future__ import annotations

import io

import pytest

from connectors.dicom.receive.spool import BadInstance
from connectors.dicom.receive.stow import Malformed, part10_meta, read_multipart
from connectors.dicom.service import DicomConfigError, parse_section, parse_stow
from operators.dicom.phantom import write_ct_series

BODY = (
    b"preamble to ignore\r\n"
    b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--b0und\r\n"
    b"--b0undary \r\ncontent-type: text/plain\r\nX-Other: 1\r\n\r\n\r\n"
    b"--b0undary\r\n\r\n--b0undarY\r\n"
    b"--b0undary--\r\nepilogue"
)


def parts(chunks) -> list[tuple[dict, bytes]]:
    out = []
    for event, value in read_multipart(chunks, "b0undary"):
        if event == "part":
            out.append((value, b""))
        elif event == "data":
            out[-1] = (out[-1][0], out[-1][1] + value)
    return out


def test_any_chunking_gives_the_same_parts():
    whole = parts([BODY])
    assert whole == [
        ({"content-type": "application/dicom"}, b"first\r\n--b0und"),
        ({"content-type": "text/plain", "x-other": "1"}, b""),
        ({}, b"--b0undarY"),
    ]
    for size in (1, 2, 3, 7, 13):
        assert parts([BODY[i : i + size] for i in range(0, len(BODY), size)]) == whole


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"no boundary here", "no multipart boundary"),
        (b"--b0undary\r\nContent-Type: x\r\n\r\nunfinished", "ends inside a part"),
        (b"--b0undary\r\nno colon\r\n\r\nx\r\n--b0undary--", "without ':'"),
        (b"--b0undary\r\nA: b\r\n\r\nx\r\n--b0undary", "closing '--'"),
        (b"--b0undary junk\r\n\r\nx\r\n--b0undary--", "text after a boundary"),
    ],
)
def test_malformed_bodies_are_named(body, said):
    with pytest.raises(Malformed, match=said):
        parts([body])


def test_part10_meta(tmp_path):
    series = write_ct_series(tmp_path, slices=1, size=8, seed=3)
    data = series.files[0].read_bytes()
    sop_class, sop_instance, syntax, offset = part10_meta(io.BytesIO(data))
    assert sop_instance == series.sop_instance_uids[0]
    assert sop_class == "1.2.840.10008.5.1.4.1.1.2" and syntax == "1.2.840.10008.1.2.1"
    assert data[offset : offset + 2] == b"\x08\x00"  # the dataset's first group
    for broken in (b"x" * 200, data[:140], data[:128] + b"DICM"):
        with pytest.raises(BadInstance, match="not a DICOM Part 10 file"):
            part10_meta(io.BytesIO(broken))


def section(**stow) -> dict:
    return {
        "receivers": [{"name": "plain", "port": 11112}, {"name": "other", "port": 11113}],
        "ae-titles": {"SEG": {"pipelines": ["seg"]}, "HOLD": {"pipelines": ["seg"]}},
        "stow": stow,
    }


def stow_of(tmp_path, data):
    receivers, _, _ = parse_section(data, pipelines=("seg",), state=tmp_path, base=tmp_path)
    return parse_stow(data, receivers)


def test_stow_section(tmp_path):
    config = stow_of(tmp_path, section())
    assert (config.receiver, config.ae_title, config.max_request_size) == ("plain", "SEG", 4 << 30)
    chosen = {"receiver": "other", "ae-title": "HOLD", "max-request-size": "1MB"}
    config = stow_of(tmp_path, section(**chosen))
    assert (config.receiver, config.ae_title, config.max_request_size) == ("other", "HOLD", 10**6)
    assert stow_of(tmp_path, section(enabled=False)) is None
    assert stow_of(tmp_path, {k: v for k, v in section().items() if k != "stow"}) is None
    for wrong, said in (
        ({"receiver": "nope"}, "dicom.stow.receiver: 'nope' is not an enabled receiver"),
        ({"ae-title": "NOPE"}, "dicom.stow.ae-title: 'NOPE' is not among dicom.ae-titles"),
        ({"max-request-size": "lots"}, "dicom.stow.max-request-size"),
        ({"max-size": "1MB"}, "dicom.stow"),
    ):
        with pytest.raises(DicomConfigError, match=said):
            stow_of(tmp_path, section(**wrong))
