"""issue 10: ``dataflow serve`` checks its whole configuration before it warms anything.

A typo in a connector's section was reported only once every pipeline had warmed up (76 s);
a pipeline whose stage lacked its extra started, its workers failed, and every study routed
to it failed. Now the service refuses to start, listing every problem (the pipeline, the
stage, the extra to install; the section and key), and no worker was ever started: the
``Prepared`` stage's marker file, which a started worker leaves, is the witness. Each test
also starts the same pipeline once the mistake is fixed, so the witness is known to work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli import dataflow

from dataflow.service import Service, ServiceError, load_config

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "service_data"

PIPELINE = """\
api-version: 0.5.0
name: {name}
operators:
- name: {name}
  stage: prepared:{stage}
  arguments: {{marker: {marker}}}
  input:
  - name: job
    type: stream
    {element}: folder
"""


@pytest.fixture
def folder(tmp_path):
    shutil.copy(DATA / "prepared.py", tmp_path / "prepared.py")
    return tmp_path


def pipeline(folder: Path, name: str, stage: str = "Prepared", element: str = "element-type"):
    path = folder / f"{name}.yaml"
    marker = folder / f"prepared-{name}"
    path.write_text(PIPELINE.format(name=name, stage=stage, marker=marker, element=element))
    return path, marker


def service_file(folder: Path, pipelines: dict[str, Path], dicom: str = "receivers") -> Path:
    path = folder / "service.yaml"
    lines = [f"state: {folder / 'state'}", "pipelines:"]
    lines += [f"  {name}: {file}" for name, file in pipelines.items()]
    lines += [
        "dicom:",
        f"  {dicom}:",
        "  - {name: plain, host: 127.0.0.1, port: 0}",
        f"  ae-titles: {{SEG: {{pipelines: [{next(iter(pipelines))}]}}}}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_typo_in_the_dicom_section_is_refused_before_any_worker_starts(folder):
    good, marker = pipeline(folder, "good")
    config = service_file(folder, {"good": good}, dicom="recievers")
    with pytest.raises(ServiceError) as info:
        Service(load_config(config)).start()
    message = str(info.value)
    assert "nothing was started" in message
    assert (
        f"{config}: dicom" in message
        and "unknown key 'recievers' (did you mean 'receivers'?" in message
    )
    assert not marker.exists()  # no worker was started, let alone warmed
    # the witness: fixed, the same service starts a worker that prepares
    service = Service(load_config(service_file(folder, {"good": good})))
    service.start()
    try:
        assert marker.exists()  # a worker has prepared before the service reports started
    finally:
        service.stop()


def test_every_pipeline_problem_is_listed_and_nothing_starts(folder):
    good, good_marker = pipeline(folder, "good")
    absent, absent_marker = pipeline(folder, "needs", stage="NeedsAbsent")
    typo, typo_marker = pipeline(folder, "typo", element="elemnt-type")
    config = service_file(folder, {"good": good, "needs": absent, "typo": typo})
    with pytest.raises(ServiceError) as info:
        Service(load_config(config)).start()
    message = str(info.value)
    assert "3 problem(s)" not in message  # the dicom section is right: two problems
    assert "not started: 2 problem(s)" in message
    assert f"pipeline 'needs' ({absent}):\n  {absent}:5:10: error: operator 'needs' field " in (
        message
    )
    assert (
        "prepared:NeedsAbsent needs dataflow_test_surely_absent, not installed here: "
        "pip install 'dataflow-test-extras[absent]'" in message
    )
    assert f"pipeline 'typo' ({typo}):" in message
    assert "unknown key 'elemnt-type' (did you mean 'element-type'?" in message
    assert not any(m.exists() for m in (good_marker, absent_marker, typo_marker))


def test_the_commands_refuse_a_stage_without_its_extra(folder):
    absent, marker = pipeline(folder, "needs", stage="NeedsAbsent")
    install = "pip install 'dataflow-test-extras[absent]'"
    for command in ("validate", "plan"):
        out = dataflow(command, absent, cwd=folder)  # invalid (1); plan cannot plan it (2)
        assert out.returncode == (1 if command == "validate" else 2), out.stdout + out.stderr
        assert install in out.stdout + out.stderr
    out = dataflow("serve", service_file(folder, {"needs": absent}), cwd=folder)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pipeline 'needs'" in out.stderr and install in out.stderr
    assert "service_started" not in out.stdout + out.stderr
    assert not marker.exists()
