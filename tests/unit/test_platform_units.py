"""The platform's pure parts: the api: section, payload file names, atomic writes, Clara's
metadata limits, pipeline ids."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from dataflow.platform.core import check_metadata, pipeline_id
from dataflow.platform.errors import Invalid, Refused
from dataflow.platform.payloads import check_name, list_files, write_file
from dataflow.service.config import ApiConfig, ConfigError, load_config

ROOT = Path(__file__).parents[2]


def test_the_example_serves_the_api_on_loopback_with_ports_from_the_environment(monkeypatch):
    monkeypatch.delenv("API_PORT", raising=False)
    monkeypatch.delenv("CLARA_PORT", raising=False)
    api = load_config(ROOT / "examples" / "service.yaml").api
    assert api == ApiConfig("127.0.0.1", 8080, 30031, 10 * 1024**3, 2 * 1024**3)
    monkeypatch.setenv("API_PORT", "8181")
    monkeypatch.setenv("CLARA_PORT", "31031")
    api = load_config(ROOT / "examples" / "service.yaml").api
    assert (api.rest_port, api.grpc_port) == (8181, 31031)


def _config(tmp_path, api: str, pipelines: str = "") -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(f"state: {tmp_path / 'state'}\n{pipelines}api: {api}\n")
    return path


def test_a_non_loopback_host_is_refused_without_tokens_or_tls(tmp_path):
    with pytest.raises(ConfigError, match=r"api.host: '0.0.0.0' is not a loopback address.*"
                       "tokens: true"):  # fmt: skip
        load_config(_config(tmp_path, "{host: 0.0.0.0}"))
    assert load_config(_config(tmp_path, "{host: 0.0.0.0, tokens: true}")).api.tokens
    (tmp_path / "a.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"api.host: '0.0.0.0' .*needs tokens: true"):
        load_config(_config(tmp_path, "{host: 0.0.0.0, tls: {cert: a.pem, key: a.pem}}"))
    with pytest.raises(ConfigError, match=r"api.start-pipelines: 'first': 'registration'"):
        load_config(_config(tmp_path, "{start-pipelines: first}"))
    with pytest.raises(ConfigError, match=r"api.idle-stop: 'soon' is not a duration"):
        load_config(_config(tmp_path, "{idle-stop: soon}"))
    lazy = load_config(_config(tmp_path, "{start-pipelines: first-job, idle-stop: 10m}")).api
    assert (lazy.start_pipelines, lazy.idle_stop) == ("first-job", 600.0)
    with pytest.raises(ConfigError, match=r"api.tls: unknown key 'certs'.*did you mean 'cert'"):
        load_config(_config(tmp_path, "{tls: {certs: a.pem, key: a.pem}}"))
    with pytest.raises(ConfigError, match=r"api.tokens: 'yes': true"):
        load_config(_config(tmp_path, "{tokens: 'yes'}"))
    with pytest.raises(ConfigError, match=r"api.tls.cert: .*nope.pem is not a file"):
        load_config(_config(tmp_path, "{tls: {cert: nope.pem, key: nope.key}}"))
    with pytest.raises(ConfigError, match=r"api.rest-port: 'http' is not a port number"):
        load_config(_config(tmp_path, "{rest-port: http}"))
    with pytest.raises(
        ConfigError, match=r"api: unknown key 'rest_port'.*did you mean 'rest-port'"
    ):
        load_config(_config(tmp_path, "{rest_port: 1}"))


def test_patient_details_need_a_role_and_tokens(tmp_path):
    assert load_config(_config(tmp_path, "{tokens: true}")).api.patient_details is None
    shown = load_config(_config(tmp_path, "{tokens: true, patient-details: admin}")).api
    assert shown.patient_details == "admin"
    with pytest.raises(ConfigError, match=r"api.patient-details: 'doctor': false .* read, "
                       "operator, admin"):  # fmt: skip
        load_config(_config(tmp_path, "{tokens: true, patient-details: doctor}"))
    with pytest.raises(ConfigError, match=r"api.patient-details: 'read' needs tokens: true"):
        load_config(_config(tmp_path, "{patient-details: read}"))


def test_an_api_only_platform_needs_no_pipelines(tmp_path):
    config = load_config(_config(tmp_path, "{rest-port: 0, grpc-port: null}"))
    assert config.pipelines == {} and config.connectors == {}
    assert (config.api.rest_port, config.api.grpc_port) == (0, None)


@pytest.mark.parametrize(
    ("name", "why"),
    [("../x", "'..'"), ("a/../../x", "'..'"), ("/etc/passwd", "absolute"), ("a\x00b", "NUL"),
     ("a\\b", "'/'"), ("", "needs a name"), ("./", "names no file")],
)  # fmt: skip
def test_bad_payload_names_are_refused(name, why):
    with pytest.raises(Invalid, match=why):
        check_name(name)


def test_good_payload_names():
    assert check_name("series1/./1.dcm") == PurePosixPath("series1/1.dcm")
    assert check_name("/input/a/b.dcm") == PurePosixPath("a/b.dcm")


def test_a_write_that_fails_or_overflows_leaves_nothing(tmp_path):
    root, partial = tmp_path / "input", tmp_path / ".partial"
    root.mkdir()

    def cut_off():
        yield b"x" * 10
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        write_file(root, partial, PurePosixPath("a/b.bin"), cut_off(), room=100, reserve=0)
    with pytest.raises(Refused, match="max-upload") as refused:
        write_file(root, partial, PurePosixPath("c.bin"), [b"x" * 60] * 2, room=100, reserve=0)
    assert refused.value.status == 413
    with pytest.raises(Refused, match="disk-reserve") as full:
        write_file(root, partial, PurePosixPath("d.bin"), [b"x"], room=100, reserve=1 << 62)
    assert full.value.status == 507
    assert not list(root.rglob("*")) and not list(partial.iterdir())
    assert (
        write_file(root, partial, PurePosixPath("a/b.bin"), [b"ab", b"c"], room=3, reserve=0) == 3
    )
    assert (root / "a" / "b.bin").read_bytes() == b"abc"


def test_listing_maps_inputs_and_each_operators_outputs(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "job"
    (inputs / "s").mkdir(parents=True)
    (inputs / "s" / "1.dcm").write_bytes(b"1")
    (outputs / "seg" / "seg").mkdir(parents=True)
    (outputs / "seg" / "seg" / "x.dcm").write_bytes(b"22")
    (outputs / "results.json").write_text("{}")
    listed = [(f["name"], f["size"]) for f in list_files(inputs, outputs)]
    assert listed == [("/input/s/1.dcm", 1), ("/output/results.json", 2),
                      ("/operators/seg/seg/x.dcm", 2)]  # fmt: skip


def test_metadata_follows_clara_limits():
    assert check_metadata({"a": "1"}, "job") == {"a": "1"}
    with pytest.raises(Invalid, match="longer than 128 bytes"):
        check_metadata({"k" * 129: "v"}, "job")
    with pytest.raises(Invalid, match="longer than 256 bytes"):
        check_metadata({"k": "é" * 129}, "job")
    with pytest.raises(Invalid, match="case-insensitive"):
        check_metadata({"Key": "1", "kEY": "2"}, "job")
    with pytest.raises(Invalid, match="strings"):
        check_metadata({"k": 1}, "job")
    big = {f"k{i}": "v" * 256 for i in range(17000)}
    with pytest.raises(Invalid, match="would total"):
        check_metadata(big, "job")


def test_pipeline_ids_are_stable_32_hex():
    assert pipeline_id("ct-segmentation") == pipeline_id("ct-segmentation")
    assert len(pipeline_id("a")) == 32 and pipeline_id("a") != pipeline_id("b")
