"""Clara container operators run as local commands, with Clara's environment."""

from __future__ import annotations

import pytest

from dataflow.execution.command import CommandStage
from dataflow.stage import StageError
from dataflow.testing import run_stage

pytestmark = pytest.mark.integration

SCRIPT = """
set -e
in_dir="${NVIDIA_CLARA_INPUTPATHS#*:}"
out_dir="${NVIDIA_CLARA_OUTPUTPATHS#*:}"
tr a-z A-Z < "$in_dir/note.txt" > "$out_dir/NOTE.txt"
echo "$NVIDIA_CLARA_STAGENAME $NVIDIA_CLARA_JOBID $GREETING" > "$DATAFLOW_OUTPUT_RESULT/env.txt"
"""


def test_a_command_gets_clara_paths_and_writes_its_output_folder(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "note.txt").write_text("hello clara\n")
    stage = CommandStage(
        command=["sh", "-c", SCRIPT],
        inputs={"input": "/input"},
        outputs={"result": "/output"},
        variables={"GREETING": "hi"},
        use_engine=False,
    )
    out = run_stage(stage, {"input": job}, name="shout", output_dir=tmp_path / "out")
    assert (out["result"] / "NOTE.txt").read_text() == "HELLO CLARA\n"
    assert (out["result"] / "env.txt").read_text() == "shout test-job hi\n"
    assert out["result"] == tmp_path / "out" / "test-job" / "shout" / "result"


def test_a_failing_command_fails_the_job_with_its_stderr(tmp_path):
    stage = CommandStage(
        command=["sh", "-c", "echo 'no DICOM found' >&2; exit 3"],
        inputs={"input": None},
        outputs={"output": None},
        use_engine=False,
    )
    with pytest.raises(StageError, match="command 'sh' exited with code 3: no DICOM found"):
        run_stage(stage, {"input": tmp_path})


def test_an_image_without_command_or_engine_cannot_run(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StageError, match="image 'clara/ai-lung' needs Docker or Podman"):
        CommandStage(image="clara/ai-lung", inputs={"input": None}, outputs={"output": None})
