"""Orders and sources without a server (issue 16 §1): ``dicom.sources`` parsing, the ``pacs``
mapping of either protocol, FetchStudy's input (an order, a pushed folder, or neither), and
the lung volume of operators/dicom/compare.py on small arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from connectors.dicom.query import MoveHere, QueryError, WebSource, move_from, qido, source_from
from connectors.dicom.service import parse_sources
from dataflow.errors import ConfigError
from dataflow.testing import run_stage
from operators.dicom.compare import lung_volume
from operators.dicom.geometry import GeometryError
from operators.dicom.priors import FetchStudy, PriorError


def test_sources_are_checked_at_load_and_their_tls_paths_made_absolute(tmp_path):
    section = {"sources": {
        "pacs": {"ae": "PACS", "host": "10.0.0.5", "port": 104, "tls": {"ca": "ca.pem"}},
        "web": {"protocol": "dicomweb", "url": "https://pacs/dicom-web", "token-env": "T"},
    }}  # fmt: skip
    sources = parse_sources(section, tmp_path)
    assert sources["pacs"]["tls"] == {"ca": str(tmp_path / "ca.pem")}
    assert sources["web"]["url"] == "https://pacs/dicom-web"
    assert parse_sources({}, tmp_path) == {}
    bad = {
        "x": ({"ae": "PACS", "host": "h"}, r"dicom\.sources\.x: 'port' missing"),
        "y": ({"url": "ftp://pacs"}, r"dicom\.sources\.y: url 'ftp://pacs' must be an http"),
        "z": ({"protocol": "carrier-pigeon", "ae": "A"}, r"protocol 'carrier-pigeon' must be"),
        "w": ({"url": "http://pacs", "password": "p"}, r"unknown key\(s\) \['password'\]"),
    }
    for name, (entry, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse_sources({"sources": {name: entry}}, tmp_path)
    with pytest.raises(ConfigError, match="dicom.sources: expected a mapping"):
        parse_sources({"sources": ["pacs"]}, tmp_path)


def test_source_from_either_protocol():
    dimse = source_from({"ae": "PACS", "host": "h", "port": "4242", "protocol": "DIMSE"})
    assert dimse.describe() == "pacs (PACS@h:4242)"
    web = source_from({"url": "http://h:8042/dicom-web/", "timeout": 5}, "web")
    assert isinstance(web, WebSource) and web.url == "http://h:8042/dicom-web"
    assert web.describe() == "web (http://h:8042/dicom-web)"
    with pytest.raises(QueryError, match="timeout 0.0 must be"):
        source_from({"url": "http://h", "timeout": 0})
    with pytest.raises(QueryError, match="expected a mapping"):
        source_from("PACS@h:104")


def test_retrieve_by_c_get_or_by_c_move_to_ourselves():
    pacs = {"ae": "PACS", "host": "h", "port": 104}
    assert move_from(pacs) is None and move_from({**pacs, "retrieve": "get"}) is None
    move = {**pacs, "retrieve": "move", "move-ae": "US", "move-port": "11112"}
    assert move_from(move) == MoveHere("US", 11112, "0.0.0.0")
    assert source_from(move).describe() == "pacs (PACS@h:104)"
    for entry, message in [
        ({**pacs, "move-ae": "US"}, "need retrieve: move"),
        ({**pacs, "retrieve": "push"}, "retrieve 'push' must be get or move"),
        ({**pacs, "retrieve": "move", "move-port": 1}, "needs move-ae"),
        ({**pacs, "retrieve": "move", "move-ae": "US"}, "needs move-port"),
        ({**move, "move-port": 70000}, "move-port 70000 must be 1..65535"),
    ]:
        with pytest.raises(QueryError, match=message):
            source_from(entry)


def test_a_token_named_by_an_unset_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("O16_NO_SUCH_TOKEN", raising=False)
    web = source_from({"url": "http://127.0.0.1:9/dicom-web", "token-env": "O16_NO_SUCH_TOKEN"})
    with pytest.raises(QueryError, match="O16_NO_SUCH_TOKEN \\(token-env\\) is not set"):
        qido(web, "STUDY", {"StudyInstanceUID": ""})


def test_fetch_study_input_an_order_a_pushed_study_or_neither(tmp_path):
    pushed = tmp_path / "pushed"
    (pushed / "series").mkdir(parents=True)
    (pushed / "series" / "a.dcm").write_bytes(b"not read: passed on")
    out = run_stage(FetchStudy, {"order": pushed}, output_dir=tmp_path / "out")
    assert (out["study"] / "series" / "a.dcm").read_bytes() == b"not read: passed on"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PriorError, match="empty holds neither order.json .* nor a file"):
        run_stage(FetchStudy, {"order": empty}, output_dir=tmp_path / "o2")
    ordered = tmp_path / "ordered"
    ordered.mkdir()
    cases = [
        ("{", "order.json is unreadable"),
        (json.dumps({"study": "1.2.x"}), "study '1.2.x' is not a Study Instance UID"),
        (json.dumps({"study": "1.2.3"}), "no PACS: the order names no source"),
        (
            json.dumps(
                {"study": "1.2.3", "series": "x", "pacs": {"ae": "A", "host": "h", "port": 1}}
            ),
            "series 'x' is not a Series Instance UID",
        ),
        (
            json.dumps({"study": "1.2.3", "source": "s", "pacs": {"ae": "A"}}),
            "the order's source: s: 'host', 'port' missing",
        ),
    ]
    for text, message in cases:
        (ordered / "order.json").write_text(text)
        with pytest.raises(PriorError, match=message):
            run_stage(FetchStudy, {"order": ordered}, output_dir=tmp_path / "o3")
    with pytest.raises(PriorError, match="'nothing' is neither a Study Instance UID nor a folder"):
        run_stage(FetchStudy, {"order": "nothing"}, output_dir=tmp_path / "o4")


def test_lung_volume_counts_the_regions_inside_the_body():
    volume = np.full((10, 20, 20), -1000.0, dtype=np.float32)  # air all around
    volume[:, 2:18, 2:18] = 40  # the body
    volume[2:6, 5:9, 5:9] = -800  # a lung: 4 x 4 x 4 voxels
    volume[3:5, 12:15, 12:14] = -900  # another: 2 x 3 x 2
    volume[:, 10:12, 0:5] = -1000  # air reaching in from the edge: not counted
    assert lung_volume(volume, [2.0, 1.0, 1.5]) == pytest.approx((64 + 12) * 3.0 / 1000)
    assert lung_volume(volume, [1, 1, 1], threshold=-850) == pytest.approx(12 / 1000)
    with pytest.raises(GeometryError, match="spacing"):
        lung_volume(volume, [1, 1])
    with pytest.raises(GeometryError, match="3-D"):
        lung_volume(volume[0], [1, 1, 1])
