"""The `dicom` section of the service file, mapped onto the receiver and exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.dicom.service import DicomConfigError, parse_section, parse_sources
from dataflow.service import load_config

ROOT = Path(__file__).parents[2]


def parse(section, tmp_path, pipelines=("seg", "filter")):
    return parse_section(section, pipelines=pipelines, state=tmp_path, base=tmp_path)


def test_the_example_maps_onto_receivers_destinations_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_PORT", "4104")
    config = load_config(ROOT / "examples" / "service.yaml", [f"state={tmp_path}"])
    receivers, destinations, policy = parse_section(
        config.connectors["dicom"], pipelines=tuple(config.pipelines), state=tmp_path / "dicom",
        base=config.path.parent,
    )  # fmt: skip
    (plain,) = receivers  # the TLS listener is off by default
    assert plain.port == 4104 and plain.host == "127.0.0.1" and plain.tls is None
    assert plain.processes == 1
    assert plain.spool == tmp_path / "dicom" / "spool" / "plain"
    seg = plain.called("DATAFLOW-SEG")
    assert seg.routes == ["ct-segmentation"] and seg.group_by == "study" and seg.timeout == 5
    assert plain.called("DATAFLOW-FLT").group_by == "series"
    assert [(p.ae_title, p.host) for p in plain.peers] == [
        ("ORTHANC", None), ("STORESCU", "127.0.0.1"),
    ]  # fmt: skip
    assert plain.min_free_bytes == 2 * 1024**3 and plain.max_associations == 16
    pacs = destinations["PACS"]
    assert (pacs.ae_title, pacs.port, pacs.max_associations) == ("ORTHANC", 4242, 2)
    assert (policy.initial_delay, policy.max_delay, policy.deadline) == (5, 300, 86400)
    sources = parse_sources(config.connectors["dicom"], config.path.parent)
    assert list(sources) == ["PACS"] and sources["PACS"]["ae"] == "ORTHANC"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"receivers": [{"port": 1}]}, "ae-titles: at least one"),
        ({"ae-titles": {"A": {"pipelines": ["nope"]}}, "receivers": [{}]},
         r"ae-titles.A.pipelines: \['nope'\] not among the configured pipelines \(seg, filter\)"),
        ({"ae-titles": {"A": {"pipelines": ["seg"], "group": 1}}}, "unknown key"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": []}, "no receiver"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{"port": 70000}]},
         "receivers\\[0\\]: port"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{"journal": "off"}]},
         "receivers\\[0\\]: journal must be true or false"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "limits": {"disk-reserve": "lots"}}, "limits.disk-reserve: 'lots' is not a size"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "destinations": {"PACS": {"ae": "X", "host": "h"}}}, "destinations.PACS: 'port'"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}},
          "receivers": [{"tls": {"cert": "no.pem", "key": "no.key"}}]}, "no.pem does not exist"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "destinations": {"WEB": {"url": "ftp://pacs/dicom-web"}}}, "WEB: .* must be http"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "destinations": {"WEB": {"url": "http://u:p@pacs/dicom-web"}}}, "not the url"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "destinations": {"WEB": {"url": "http://pacs/x", "ae": "X"}}}, "WEB: unknown key"),
        ({"ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
          "destinations": {"WEB": {"url": "http://pacs/x", "username": "u"}}}, "needs a password"),
    ],
)  # fmt: skip
def test_mistakes_are_named(tmp_path, section, message):
    with pytest.raises(DicomConfigError, match=message):
        parse(section, tmp_path)


def test_the_ingest_journal_is_on_unless_a_receiver_says_journal_false(tmp_path):
    section = {
        "ae-titles": {"A": {"pipelines": ["seg"]}},
        "receivers": [{"name": "a"}, {"name": "b", "port": 105, "journal": False}],
    }
    receivers, _, _ = parse(section, tmp_path)
    assert [r.journal for r in receivers] == [True, False]


def test_a_destination_with_a_url_is_dicomweb(tmp_path):
    from connectors.dicom.export.stow import WebDestination

    section = {
        "ae-titles": {"A": {"pipelines": ["seg"]}}, "receivers": [{}],
        "destinations": {
            "PACS": {"ae": "PACS", "host": "10.0.0.5", "port": 104},
            "WEB": {"url": "https://pacs.example/dicom-web", "token": "abc", "batch-files": 10,
                    "batch-size": "16MiB", "max-associations": 2, "tls": {"ca": "ca.pem"}},
        },
    }  # fmt: skip
    _, destinations, _ = parse(section, tmp_path)
    web = destinations["WEB"]
    assert isinstance(web, WebDestination) and not isinstance(destinations["PACS"], WebDestination)
    assert (web.url, web.token, web.batch_files, web.batch_bytes, web.max_associations) == (
        "https://pacs.example/dicom-web", "abc", 10, 16 * 1024**2, 2,
    )  # fmt: skip
    assert web.tls_ca == str(tmp_path / "ca.pem")
    assert web._headers()["Authorization"] == "Bearer abc"
    assert "abc" not in web.describe()


def test_ignored_sop_classes_per_ae_title(tmp_path):
    section = {"receivers": [{}], "ae-titles": {
        "A": {"pipelines": ["seg"], "ignored-sop-classes": ["1.2.840.10008.5.1.4.1.1.7"]},
        "B": {"pipelines": ["seg"], "ignored-sop-classes": "1.2.840.10008.5.1.4.1.1.88.11"},
    }}  # fmt: skip
    (receiver,), _, _ = parse(section, tmp_path)
    assert receiver.called("A").ignores("1.2.840.10008.5.1.4.1.1.7")
    assert not receiver.called("A").ignores("1.2.840.10008.5.1.4.1.1.2")
    assert receiver.called("B").ignored_sop_classes == ["1.2.840.10008.5.1.4.1.1.88.11"]
    section["ae-titles"]["A"]["ignored-sop-classes"] = ["SC"]
    with pytest.raises(DicomConfigError, match=r"ignored_sop_classes: \['SC'\] are not UIDs"):
        parse(section, tmp_path)
