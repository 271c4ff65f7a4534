"""The service configuration: environment expansion, --set overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataflow.service.config import (
    ConfigError,
    JobLimits,
    Retention,
    load_config,
    parse_duration,
)

ROOT = Path(__file__).parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


def test_paths_env_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("api-version: 0.5.0\n")
    path = write(
        tmp_path,
        """
state: state
pipelines:
  one: p.yaml
  two: {file: p.yaml, params: {level: 3}, replicas: {x: 2}}
dicom:
  receiver: {port: "${DICOM_PORT:-11112}", host: "${DICOM_HOST}"}
  destinations: {PACS: {host: 127.0.0.1, port: 4242}}
""",
    )
    monkeypatch.setenv("DICOM_HOST", "127.0.0.2")
    config = load_config(path, ["dicom.destinations.PACS.port=104", "log.level=debug"])
    assert config.state == tmp_path / "state"
    assert config.pipelines["one"].file == tmp_path / "p.yaml"
    assert config.pipelines["two"].params == {"level": "3"}
    assert config.pipelines["two"].replicas == {"x": 2}
    receiver = config.connectors["dicom"]["receiver"]
    assert receiver == {"port": 11112, "host": "127.0.0.2"}  # a whole ${...} keeps its type
    assert config.connectors["dicom"]["destinations"]["PACS"]["port"] == 104
    assert config.log_level == "debug"
    monkeypatch.setenv("DICOM_PORT", "2000")
    assert load_config(path).connectors["dicom"]["receiver"]["port"] == 2000
    assert (
        load_config(path, ["dicom.receiver.port=3000"]).connectors["dicom"]["receiver"]["port"]
        == 3000
    )


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("pipelines: {a: p.yaml}\n", [], "'state'"),
        ("state: s\n", [], "'pipelines' must map at least one name"),
        ("state: s\npipelines: {a: missing.yaml}\n", [], "pipelines.a: pipeline file"),
        ("state: s\npipelines: {a: {file: p.yaml, extra: 1}}\n", [], "unknown key"),
        ("state: s\npipelines: {a: p.yaml}\ndicom: [1]\n", [], "section 'dicom' must be"),
        ("state: ${NOPE_NOT_SET}\npipelines: {a: p.yaml}\n", [], "NOPE_NOT_SET is not set"),
        ("state: s\npipelines: {a: p.yaml}\n", ["justakey"], "expected dotted.path=value"),
        ("state: s\npipelines: {a: p.yaml}\n", ["state.x=1"], "state in"),
        ("state: [\n", [], "not valid YAML"),
        ("state: s\npipelines: {a: p.yaml}\nretention: 8h\n", [], "'retention' must be a mapping"),
        ("state: s\npipelines: {a: p.yaml}\nretention: {keep: 1}\n", [], "unknown key.*keep"),
        (
            "state: s\npipelines: {a: p.yaml}\nretention: {succeeded: soon}\n",
            [],
            "retention.succeeded: 'soon' is not a duration",
        ),
        ("state: s\npipelines: {a: p.yaml}\nretention: {failed: -5}\n", [], "negative"),
        ("state: s\npipelines: {a: p.yaml}\nretention: {interval: 0}\n", [], "positive"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, text, overrides, message):
    (tmp_path / "p.yaml").write_text("api-version: 0.5.0\n")
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_the_example_configuration_loads():
    config = load_config(ROOT / "examples" / "service.yaml")
    assert set(config.pipelines) >= {"ct-segmentation"}
    assert "dicom" in config.connectors
    assert config.limits == JobLimits()  # the example spells the defaults out


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), ("30s", 30.0), ("10m", 600.0), ("1.5h", 5400.0), ("7d", 604800.0),
     ("45", 45.0), (None, None), ("never", None), (0, 0.0)],
)  # fmt: skip
def test_durations(value, seconds):
    assert parse_duration(value, "here") == seconds


def test_retention_defaults_keep_everything_and_the_example_sets_it(tmp_path):
    (tmp_path / "p.yaml").write_text("api-version: 0.5.0\n")
    assert load_config(write(tmp_path, "state: s\npipelines: {a: p.yaml}\n")).retention == (
        Retention(None, None, 600.0)
    )
    text = "state: s\npipelines: {a: p.yaml}\nretention: {succeeded: 8h, interval: 1m}\n"
    retention = load_config(write(tmp_path, text), ["retention.failed=never"]).retention
    assert retention == Retention(8 * 3600.0, None, 60.0)
    assert "retention" not in load_config(write(tmp_path, text)).connectors
    example = load_config(ROOT / "examples" / "service.yaml").retention
    assert example.succeeded == 8 * 3600 and example.failed == 7 * 86400


def test_limits_default_and_are_set_service_wide_and_per_pipeline(tmp_path):
    """Every job has time-outs and a memory limit unless the file says otherwise; a pipeline's
    own limits override the service's, key by key."""
    (tmp_path / "p.yaml").write_text("api-version: 0.5.0\n")
    defaults = load_config(write(tmp_path, "state: s\npipelines: {a: p.yaml}\n"))
    assert defaults.limits == JobLimits(600.0, 1800.0, 4 * 1024**3, 3, 30.0)
    assert defaults.pipelines["a"].limits == defaults.limits
    config = load_config(
        write(
            tmp_path,
            "state: s\n"
            "limits: {stage-timeout: 2m, job-timeout: never, worker-memory: 512MiB,"
            " max-attempts: 5, shutdown-grace: 10s}\n"
            "pipelines:\n  a: p.yaml\n"
            "  b: {file: p.yaml, limits: {stage-timeout: 1h, worker-memory: none}}\n",
        )
    )
    assert config.limits == JobLimits(120.0, None, 512 * 1024**2, 5, 10.0)
    assert config.pipelines["a"].limits == config.limits
    assert config.pipelines["b"].limits == JobLimits(3600.0, None, None, 5, 10.0)
    assert "limits" not in config.connectors


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("limits: 10m", r"service.yaml: limits: must be a mapping"),
        (
            "limits: {stage-timout: 1m}",
            r"limits: unknown key 'stage-timout' \(did you mean 'stage-timeout'",
        ),
        ("limits: {stage-timeout: soon}", r"limits.stage-timeout: 'soon' is not a duration"),
        ("limits: {job-timeout: 0}", r"limits.job-timeout: 0: give a positive duration"),
        ("limits: {shutdown-grace: never}", r"limits.shutdown-grace: 'never': give a positive"),
        ("limits: {worker-memory: lots}", r"limits.worker-memory: 'lots' is not a memory size"),
        ("limits: {worker-memory: 100}", r"limits.worker-memory: 100 is not a memory size"),
        ("limits: {max-attempts: 0}", r"limits.max-attempts: 0 is not a whole number"),
        ("limits: {max-attempts: two}", r"limits.max-attempts: 'two' is not a whole number"),
        (
            "pipelines: {b: {file: p.yaml, limits: {shutdown-grace: 5s}}}",
            r"pipelines.b.limits: unknown key.*shutdown-grace is service-wide",
        ),
        (
            "pipelines: {b: {file: p.yaml, limits: {stage-timeout: -1}}}",
            r"pipelines.b.limits.stage-timeout: -1 is negative",
        ),
    ],
)
def test_limit_errors_name_the_file_and_key(tmp_path, limits, message):
    (tmp_path / "p.yaml").write_text("api-version: 0.5.0\n")
    text = "state: s\n" + limits + "\n"
    if not limits.startswith("pipelines"):
        text += "pipelines: {a: p.yaml}\n"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))
