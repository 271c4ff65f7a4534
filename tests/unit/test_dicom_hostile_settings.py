"""The receiver's settings against hostile peers (``limits.reserved-associations``,
``limits.artim-timeout``) as the service file gives them, and their checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.dicom.config import CalledAE, ReceiverConfig, ReceiverConfigError
from connectors.dicom.service import DicomConfigError, parse_section
from dataflow.service import load_config

ROOT = Path(__file__).parents[2]
SECTION = {"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}]}


def parse(limits: dict, tmp_path: Path) -> ReceiverConfig:
    section = {**SECTION, "limits": limits}
    (receiver,), _, _ = parse_section(section, pipelines=("seg",), state=tmp_path, base=tmp_path)
    return receiver


def test_defaults_and_values(tmp_path):
    default = parse({}, tmp_path)
    assert (default.reserved_associations, default.artim_timeout) == (2, 10.0)
    given = parse({"reserved-associations": 4, "artim-timeout": "3s"}, tmp_path)
    assert (given.reserved_associations, given.artim_timeout) == (4, 3.0)
    assert parse({"artim-timeout": 2.5}, tmp_path).artim_timeout == 2.5


def test_the_example_sets_them(tmp_path):
    config = load_config(ROOT / "examples" / "service.yaml", [f"state={tmp_path}"])
    (plain,), _, _ = parse_section(
        config.connectors["dicom"], pipelines=tuple(config.pipelines), state=tmp_path,
        base=config.path.parent,
    )  # fmt: skip
    assert (plain.max_associations, plain.reserved_associations) == (16, 2)
    assert plain.artim_timeout == 10.0


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"artim-timeout": "soon"}, "limits.artim-timeout: 'soon' is not seconds"),
        ({"artim-timeout": 0}, "artim_timeout must be > 0"),
        ({"reserved-associations": -1}, "reserved_associations must be 0..1000"),
    ],
)
def test_mistakes_are_named(tmp_path, limits, message):
    with pytest.raises(DicomConfigError, match=message):
        parse(limits, tmp_path)


def test_receiver_config_checks(tmp_path):
    called = [CalledAE("A")]
    with pytest.raises(ReceiverConfigError, match="artim_timeout"):
        ReceiverConfig(spool=tmp_path, called_aes=called, artim_timeout=-1).validate()
    config = ReceiverConfig.from_dict(
        {"spool": str(tmp_path), "called_aes": [{"ae_title": "A"}], "artim_timeout": 4,
         "reserved_associations": 1}
    )  # fmt: skip
    assert ReceiverConfig.from_dict(config.to_dict()) == config
