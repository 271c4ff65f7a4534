"""The README's main job: `dataflow run pipelines/ct-segmentation.yaml` on generated phantom
studies writes, per study, a DICOM SEG that dciodvfy accepts and that matches the phantom's
analytic truth (Dice >= 0.98 per segment, compared in patient coordinates: each SEG frame's
plane position against `phantom.labels_at`), and registers it for export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from deadlines import LONG_HANG

from operators.dicom.phantom import BODY, BONE, LUNG_LEFT, LUNG_RIGHT, labels_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
TRUTH = {"Body without lung and bone": [BODY], "Lung": [LUNG_LEFT, LUNG_RIGHT], "Bone": [BONE]}
STUDIES = {  # job -> phantom options: oblique and axial, files shuffled, two seeds
    "oblique": ["--slices", "40", "--size", "96", "--oblique", "--shuffle", "--seed", "3"],
    "axial": ["--slices", "32", "--size", "80", "--shuffle", "--seed", "4"],
}


def pixel_points(position, orientation, spacing, rows, columns) -> np.ndarray:
    """Patient coordinates (LPS mm) of every pixel centre of one image plane: (rows, cols, 3)."""
    row_cosine, column_cosine = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    return (
        np.asarray(position, float)
        + (c[..., None] * float(spacing[1])) * row_cosine
        + (r[..., None] * float(spacing[0])) * column_cosine
    )


def seg_dice(seg_path: Path, study: Path) -> dict[str, float]:
    """Dice of each segment against the phantom, over every slice of the source series.

    The SEG is read with highdicom alone: each frame's segment number and plane position (a
    frame left out because it is empty counts as empty); the truth is `labels_at` of the
    source slices' pixel centres, read from the source files' own headers."""
    seg = hd.seg.segread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    frames = {}
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = group.PlanePositionSequence[0].ImagePositionPatient
        frames[(number, tuple(round(float(v), 2) for v in position))] = pixels[i] != 0
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(study.iterdir())]
    overlap = dict.fromkeys(names, 0)
    sizes = dict.fromkeys(names, 0)
    for ds in sources:
        key = tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        assert spacing == pytest.approx([float(v) for v in ds.PixelSpacing])  # the same grid
        points = pixel_points(key, orientation, ds.PixelSpacing, ds.Rows, ds.Columns)
        labels = labels_at(points)
        for number, name in names.items():
            truth = np.isin(labels, TRUTH[name])
            got = frames.get((number, key), np.zeros_like(truth))
            overlap[number] += int(np.count_nonzero(truth & got))
            sizes[number] += int(np.count_nonzero(truth)) + int(np.count_nonzero(got))
    return {names[n]: 2 * overlap[n] / sizes[n] for n in names}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The two README commands' work: generate studies, run the pipeline on them."""
    base = tmp_path_factory.mktemp("ct")
    for job, options in STUDIES.items():
        subprocess.run(
            [sys.executable, "-m", "operators.dicom.phantom", base / "in" / job, *options],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "run", "pipelines/ct-segmentation.yaml",
         "--input", base / "in", "--output", base / "out"],
        cwd=ROOT, capture_output=True, text=True, timeout=LONG_HANG,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return base


@pytest.mark.parametrize("job", list(STUDIES))
def test_the_seg_matches_the_phantom_in_patient_coordinates(run, job):
    (seg_path,) = (run / "out" / job / "seg" / "seg").glob("*.dcm")
    dice = seg_dice(seg_path, run / "in" / job)
    assert set(dice) == set(TRUTH)
    assert min(dice.values()) >= 0.98, dice


@pytest.mark.parametrize("job", list(STUDIES))
def test_the_seg_is_valid_dicom_of_the_same_study(run, job):
    (seg_path,) = (run / "out" / job / "seg" / "seg").glob("*.dcm")
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
        assert [line for line in check.stderr.splitlines() if line.startswith("Error")] == []
    seg = pydicom.dcmread(seg_path)
    source = pydicom.dcmread(next((run / "in" / job).iterdir()))
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_each_seg_is_registered_for_export_and_the_run_is_summarised(run):
    summary = json.loads((run / "out" / "summary.json").read_text())
    assert summary["failed"] == 0 and {r["job"] for r in summary["results"]} == set(STUDIES)
    for job in STUDIES:
        task_dir = run / "out" / job / "register-dicom-output" / "task"
        task = json.loads((task_dir / "task.json").read_text())
        assert task["agent"] == "ClaraSCU" and json.loads(task["parameters"]) == ["PACS"]
        assert task["state"] == "Pending" and task["jobId"] == job
        (seg_path,) = (run / "out" / job / "seg" / "seg").glob("*.dcm")
        assert task["uris"] == [seg_path.name]
        assert (task_dir / "files" / seg_path.name).read_bytes() == seg_path.read_bytes()
