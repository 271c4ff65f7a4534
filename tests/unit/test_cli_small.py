"""Small things a user tripped on (issue 10): ``--set`` into a list item, key paths printed
as ``dicom.receivers[0].port`` (never ``dicom.:``), and ``dataflow jobs --state`` with a
misspelled state refused instead of printing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from connectors.dicom.service import DicomConfigError, parse_section
from dataflow.cli import app
from dataflow.service.config import ConfigError, key_path, load_config, parse_key_path

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "service.yaml"


def test_set_reaches_into_a_list_item():
    config = load_config(EXAMPLE, ["dicom.receivers[0].port=11113", "dicom.allow[1].ae=CT01"])
    receivers = config.connectors["dicom"]["receivers"]
    assert receivers[0]["port"] == 11113
    assert receivers[1]["port"] != 11113  # the other receiver untouched
    assert config.connectors["dicom"]["allow"][1] == {"ae": "CT01", "host": "127.0.0.1"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dicom.receivers[5].port=1", r"dicom.receivers in .* has 2 item\(s\): \[5\] is not"),
        ("dicom.receivers.port=1", r"dicom.receivers in .* is a list: index it"),
        ("dicom.destinations[0].port=1", r"dicom.destinations in .* is not a list"),
        ("dicom.receivers[0][1]=1", r"dicom.receivers\[0\] in .* is not a list"),
        ("dicom..port=1", r"'dicom..port' is not a key path \(e.g. dicom.receivers\[0\].port\)"),
        ("dicom.receivers[x].port=1", r"is not a key path"),
    ],
)
def test_a_bad_set_path_is_refused_naming_where(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXAMPLE, [override])


def test_a_missing_mapping_is_made_on_the_way():
    config = load_config(EXAMPLE, ["dicom.export.deadline=60"])
    assert config.connectors["dicom"]["export"]["deadline"] == 60
    made = load_config(EXAMPLE, ["dicom.destinations.NEW.port=1"])
    assert made.connectors["dicom"]["destinations"]["NEW"] == {"port": 1}


def test_key_paths_print_as_written():
    parts = parse_key_path("dicom.receivers[0].tls.cert")
    assert parts == ["dicom", "receivers", 0, "tls", "cert"]
    assert key_path(parts) == "dicom.receivers[0].tls.cert"
    assert key_path(["a", 0, 1, "b"]) == "a[0][1].b"


def _section(**extra):
    return {
        "receivers": [{"port": 0}],
        "ae-titles": {"SEG": {"pipelines": ["seg"]}},
        **extra,
    }


def test_an_unknown_key_of_the_dicom_section_is_named_without_a_stray_dot(tmp_path):
    with pytest.raises(DicomConfigError) as info:
        parse_section(_section(recievers=[]), pipelines=("seg",), state=tmp_path, base=tmp_path)
    assert str(info.value).startswith("dicom: unknown key 'recievers' (did you mean 'receivers'?")
    assert "dicom.:" not in str(info.value)
    with pytest.raises(DicomConfigError) as info:
        parse_section([1], pipelines=("seg",), state=tmp_path, base=tmp_path)
    assert str(info.value) == "dicom: expected a mapping"


def test_a_receiver_value_that_is_not_a_number_names_its_key(tmp_path):
    section = _section(receivers=[{"port": 0}, {"port": "eleven"}])
    with pytest.raises(DicomConfigError, match=r"^dicom.receivers\[1\]: .*'eleven'"):
        parse_section(section, pipelines=("seg",), state=tmp_path, base=tmp_path)
    limits = _section(limits={"artim-timeout": "soon"})
    with pytest.raises(DicomConfigError, match=r"^dicom.limits.artim-timeout: 'soon'"):
        parse_section(limits, pipelines=("seg",), state=tmp_path, base=tmp_path)


def test_jobs_refuses_an_unknown_state_with_the_valid_ones(tmp_path):
    result = CliRunner().invoke(app, ["jobs", str(tmp_path), "--state", "runing"])
    assert result.exit_code == 2
    valid = "expected one of queued, running, succeeded, failed"
    assert f"--state 'runing': {valid}" in result.output
    assert "did you mean 'running'?" in result.output
    far = CliRunner().invoke(app, ["jobs", str(tmp_path), "--state", "xyz"])
    assert far.exit_code == 2 and "did you mean" not in far.output


def test_run_refuses_an_unknown_log_format_before_anything_starts(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "pipelines/passthrough.yaml", "--input", str(tmp_path),
              "--log-format", "jsno", "--output", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2 and "did you mean 'json'?" in result.output
    assert not (tmp_path / "out").exists()
