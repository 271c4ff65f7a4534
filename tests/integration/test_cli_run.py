"""`dataflow validate`, `plan` and `run` as a user types them, on the reference pipelines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import dataflow
from deadlines import HANG

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "pipelines" / "samples" / "volumes"


def test_validate_accepts_a_good_file_and_rejects_a_bad_one_with_its_line(tmp_path):
    ok = dataflow("validate", "pipelines/passthrough.yaml")
    assert ok.returncode == 0 and "valid (0 error(s)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "pipelines/passthrough.yaml")
        .read_text()
        .replace("from: npy-to-array", "from: nope")
    )
    out = dataflow("validate", bad)
    assert out.returncode == 1
    assert f"{bad}:" in out.stdout and "'nope'" in out.stdout and "invalid" in out.stderr


def test_plan_prints_the_dag_and_every_replica(tmp_path):
    out = dataflow("plan", "pipelines/mixed.yaml", "--replicas", "load=3")
    assert out.returncode == 0, out.stderr
    assert "threshold <- load" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.startswith("load ")]) == 3


def test_plan_refuses_what_cannot_be_placed(tmp_path):
    gpu = tmp_path / "gpu.yaml"
    text = (ROOT / "pipelines/passthrough.yaml").read_text()
    gpu.write_text(
        text.replace(
            "  stage: operators.passthrough:Compare",
            "  stage: operators.passthrough:Compare\n  requests: {gpu: 1}",
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "plan", str(gpu)], capture_output=True, text=True,
        cwd=ROOT, env={"DATAFLOW_GPUS": "none", "PATH": "/usr/bin:/bin"}, timeout=HANG,
    )  # fmt: skip
    assert out.returncode == 2 and "compare" in out.stderr and "GPU" in out.stderr


def test_run_writes_every_job_result_and_a_summary(tmp_path):
    out = dataflow(
        "run", "pipelines/passthrough.yaml", "--input", SAMPLES, "--output", tmp_path, "--progress"
    )
    assert out.returncode == 0, out.stderr
    assert "2/2" in out.stderr  # the progress display (on stderr) counted both jobs
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["job"] for r in summary["results"]] == ["study-a", "study-b"]
    assert all(r["ok"] for r in summary["results"])
    report = json.loads((tmp_path / "study-b/compare/report/comparison.json").read_text())
    assert report == {"match": True, "shape": [16, 32, 32], "job": "study-b"}


def test_run_mixes_a_command_operator_with_python_stages(tmp_path):
    out = dataflow(
        "run", "pipelines/mixed.yaml", "--input", SAMPLES, "--output", tmp_path,
        "--param", "level=-200", "--log-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    mask = np.load(tmp_path / "study-a/save/output/mask.npy")
    volume = np.load(SAMPLES / "study-a/volume.npy")
    np.testing.assert_array_equal(mask, (volume > -200).astype(np.uint8))
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert {e["event"] for e in events} >= {"job_succeeded"}


def test_a_failing_job_is_reported_and_the_exit_status_says_so(tmp_path):
    jobs = tmp_path / "in"
    shutil.copytree(SAMPLES, jobs)
    np.save(jobs / "study-a" / "second.npy", np.zeros((2, 2, 2), np.float32))  # two volumes
    out = dataflow("run", "pipelines/passthrough.yaml", "--input", jobs, "--output", tmp_path / "o")
    assert out.returncode == 1
    assert "FAILED study-a at npy-to-array: StageError: expected one .npy file" in out.stdout
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    assert [r["ok"] for r in summary["results"]] == [False, True]


def test_run_refuses_a_bad_input_folder(tmp_path):
    out = dataflow("run", "pipelines/passthrough.yaml", "--input", tmp_path / "missing")
    assert out.returncode == 2 and "not a folder" in out.stderr


def test_plan_and_run_refuse_an_image_this_machine_cannot_run(tmp_path):
    out = dataflow("plan", "pipelines/clara/covid19.yaml")
    assert out.returncode == 2
    assert "cannot run here: operator 'lung-segmentation' (image 'clara/ai-lung:latest'" in (
        out.stderr
    )  # dicom-reader runs here as a bundled stage (tests/integration/test_clara_images.py)
    assert "covid19.yaml:" in out.stderr  # where the image is named
    ran = dataflow("run", "pipelines/clara/covid19.yaml", "--input", SAMPLES, "--output", tmp_path)
    assert ran.returncode == 2 and "cannot run here" in ran.stderr
    assert not (tmp_path / "summary.json").exists()  # nothing started
