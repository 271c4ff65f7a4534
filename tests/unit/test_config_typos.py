"""A misspelled key anywhere in the service file is refused with the key it most likely meant
(issue 10: errors in the DICOM section and the service's own sections had no "did you mean")."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.dicom.service import DicomConfigError, parse_section
from dataflow.hints import suggest, unknown_keys
from dataflow.service.config import ConfigError, load_config
from dataflow.service.service import ServiceError, load_connector

ROOT = Path(__file__).parents[2]
EXAMPLE = (ROOT / "examples" / "service.yaml").read_text()


def _service(tmp_path: Path, old: str, new: str) -> Path:
    assert old in EXAMPLE, old  # the example still holds what the typo replaces
    text = EXAMPLE.replace(old, new, 1).replace("../pipelines/", f"{ROOT}/pipelines/")
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("where", "meant", "typo"),
    [
        ("retention", "succeeded", "succeded"),
        ("limits", "job-timeout", "job-timout"),
        ("pipelines.ct-filter", "params", "parms"),
        ("log", "level", "levle"),
    ],
)
def test_a_misspelled_service_key_names_the_key_it_meant(tmp_path, where, meant, typo):
    with pytest.raises(ConfigError) as info:
        load_config(_service(tmp_path, f"  {meant}: ", f"  {typo}: "))
    assert f"{where}: unknown key {typo!r} (did you mean {meant!r}?" in str(info.value)


def test_a_misspelled_section_is_not_taken_for_a_connector():
    with pytest.raises(ServiceError) as info:
        load_connector("retension")
    text = str(info.value)
    assert "did you mean 'retention'?" in text and "connectors: dicom" in text


def test_a_misspelled_dicom_key_names_the_key_it_meant(tmp_path):
    section = {
        "receivers": [{"port": 0, "proceses": 2}],
        "ae-titles": {"SEG": {"pipelines": ["seg"]}},
    }
    with pytest.raises(DicomConfigError) as info:
        parse_section(section, pipelines=("seg",), state=tmp_path, base=tmp_path)
    assert str(info.value).startswith(
        "dicom.receivers[0]: unknown key 'proceses' (did you mean 'processes'?"
    )


def test_unknown_keys_wording():
    assert suggest("elemnt-type", ["element-type", "name"]) == "element-type"
    assert suggest("zzz", ["element-type", "name"]) is None
    assert unknown_keys({"zzz"}, ["b", "a"]) == "unknown key 'zzz' (known: a, b)"
    several = unknown_keys({"nmae", "zzz"}, ["name", "port"])
    assert (
        several == "unknown keys 'nmae', 'zzz' (did you mean 'name' for 'nmae'? known: name, port)"
    )
