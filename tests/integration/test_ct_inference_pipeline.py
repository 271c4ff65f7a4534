"""pipelines/ct-inference.yaml end to end with `dataflow run`: a valid SEG of the lungs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from deadlines import HANG, LONG_HANG

from operators.dicom.phantom import LUNG_LEFT, LUNG_RIGHT, labels_at
from operators.dicom.series import load_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
PIPELINE = ROOT / "pipelines" / "ct-inference.yaml"


def command(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=LONG_HANG,
        env={"DATAFLOW_CONTAINER_ENGINE": "none", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    jobs = tmp_path_factory.mktemp("jobs")
    made = command("operators.dicom.phantom", jobs / "ct", "--slices", "24", "--size", "64",
                   "--shuffle")  # fmt: skip
    assert made.returncode == 0, made.stderr
    return jobs / "ct"


def lung_dice(seg_path: Path, study: Path) -> float:
    volume, meta = load_series(study)
    seg = hd.seg.segread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lung"]
    assert seg.StudyInstanceUID == meta["study_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_instance_uid"]
    mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=meta["sop_instance_uids"], combine_segments=True
    ) == 1  # fmt: skip
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    direction = np.asarray(meta["direction"], float).reshape(3, 3)
    points = np.asarray(meta["origin"]) + (index * np.asarray(meta["spacing"])) @ direction.T
    truth = np.isin(labels_at(points), [LUNG_LEFT, LUNG_RIGHT])
    return 2.0 * (mask & truth).sum() / (mask.sum() + truth.sum())


def dciodvfy_errors(path: Path) -> list[str]:
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=HANG)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def test_the_reference_pipeline_writes_a_valid_lung_seg(study, tmp_path):
    out = command("dataflow.cli", "run", PIPELINE, "--input", study, "--output", tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["ok"] for r in summary["results"]] == [True]
    (seg_path,) = sorted((tmp_path / "ct" / "write-seg" / "seg").glob("*.dcm"))
    assert shutil.which("dciodvfy"), "dicom3tools' dciodvfy is needed (.ci/run installs it)"
    assert dciodvfy_errors(seg_path) == []
    assert lung_dice(seg_path, study) > 0.95


def test_a_relative_model_is_found_next_to_the_pipeline_file(study, tmp_path):
    """The pipeline in a folder of its own with its model; run from another folder."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(PIPELINE, folder / "ct-inference.yaml")
    made = command("operators.inference.demo_model", folder / "models" / "lung.onnx")
    assert made.returncode == 0, made.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = command(
        "dataflow.cli", "run", folder / "ct-inference.yaml", "--input", study,
        "--output", tmp_path / "out", "-p", "model=models/lung.onnx", "-p", "roi_size=24",
        cwd=elsewhere,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not (elsewhere / "models").exists()  # found next to the pipeline, not in the cwd
    (seg_path,) = sorted((tmp_path / "out" / "ct" / "write-seg" / "seg").glob("*.dcm"))
    assert lung_dice(seg_path, study) > 0.95


def test_a_missing_model_fails_the_job_naming_the_file(study, tmp_path):
    out = command("dataflow.cli", "run", PIPELINE, "--input", study, "--output", tmp_path,
                  "-p", "model=absent.onnx")  # fmt: skip
    assert out.returncode == 1
    assert "model file not found: absent.onnx" in out.stderr + out.stdout
