"""`dataflow run` twice into one --output (issue 10): the second run succeeds, replaces each
job's folder as a whole and gives the same result; a folder no run wrote is refused; an empty
--input is refused before anything starts; summary.json lists each job's input and outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pytest
from cli import dataflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "pipelines" / "samples" / "volumes"


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def test_a_rerun_replaces_each_job_folder_and_the_summary_lists_inputs_and_outputs(tmp_path):
    out = tmp_path / "out"
    first = dataflow("run", "pipelines/passthrough.yaml", "--input", SAMPLES, "--output", out)
    assert first.returncode == 0, first.stderr
    before = _files(out)
    stale = out / "study-a" / "compare" / "report" / "from-an-older-pipeline.json"
    stale.write_text("{}")
    second = dataflow("run", "pipelines/passthrough.yaml", "--input", SAMPLES, "--output", out)
    assert second.returncode == 0, second.stderr
    assert _files(out) == before  # the same files, the stale one gone with its old folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    by_job = {r["job"]: r for r in summary["results"]}
    assert by_job["study-a"]["input"] == {"folder": str(SAMPLES / "study-a"), "files": 1}
    assert by_job["study-b"]["outputs"] == [
        "study-b/array-to-npz/output/volume.npz",
        "study-b/compare/report/comparison.json",
        "study-b/provenance.json",  # what made them (docs/provenance.md)
    ]
    for job in by_job.values():
        assert all((out / path).is_file() for path in job["outputs"])


def test_a_folder_no_run_wrote_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    refused = dataflow("run", "pipelines/passthrough.yaml", "--input", SAMPLES, "--output", out)
    assert refused.returncode == 2
    assert "not the output of an earlier dataflow run" in refused.stderr
    assert "--overwrite" in refused.stderr and not (out / "summary.json").exists()
    ran = dataflow(
        "run", "pipelines/passthrough.yaml", "--input", SAMPLES, "--output", out, "--overwrite"
    )
    assert ran.returncode == 0, ran.stderr
    assert (out / "notes.txt").read_text() == "a user's file"
    assert (out / "study-a" / "compare" / "report" / "comparison.json").is_file()


def test_an_input_without_files_is_refused_before_any_worker_starts(tmp_path):
    (tmp_path / "in" / "study-1").mkdir(parents=True)
    done = dataflow(
        "run", "pipelines/ct-segmentation.yaml", "--input", tmp_path / "in",
        "--output", tmp_path / "out", "--log-format", "json",
    )  # fmt: skip
    assert done.returncode == 2
    assert f"--input {tmp_path / 'in'}: holds no files" in done.stderr
    assert "worker" not in done.stderr  # refused before any worker was started
    assert not (tmp_path / "out").exists()


def _seg_content(path: Path) -> tuple:
    """What a SEG says, without what must differ between two writes (UIDs, times)."""
    seg = hd.seg.segread(path)
    segments = [
        (int(s.SegmentNumber), str(s.SegmentLabel), str(s.SegmentedPropertyTypeCodeSequence[0]))
        for s in seg.SegmentSequence
    ]
    positions = [
        tuple(g.PlanePositionSequence[0].ImagePositionPatient)
        for g in seg.PerFrameFunctionalGroupsSequence
    ]
    return segments, positions, seg.pixel_array.tobytes(), seg.StudyInstanceUID


@pytest.mark.slow
def test_the_readme_main_command_twice_gives_the_same_result(tmp_path):
    """The README's first command, run twice into `output` (a smaller phantom): it failed
    with SameFileError at register-dicom-output, and SEGs piled up in seg/seg/."""
    study = tmp_path / "samples" / "ct" / "study-1"
    subprocess.run(
        [sys.executable, "-m", "operators.dicom.phantom", study,
         "--slices", "24", "--size", "64", "--oblique", "--shuffle"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    runs = []
    for _ in range(2):
        done = dataflow(
            "run", ROOT / "pipelines" / "ct-segmentation.yaml",
            "--input", tmp_path / "samples" / "ct", "--output", "output", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        out = tmp_path / "output" / "study-1"
        (seg,) = (out / "seg" / "seg").glob("*.dcm")  # one SEG, not one per run
        task_dir = out / "register-dicom-output" / "task"
        task = json.loads((task_dir / "task.json").read_text())
        (registered,) = (task_dir / "files").rglob("*.dcm")
        assert registered.read_bytes() == seg.read_bytes()
        assert task["uris"] == [registered.relative_to(task_dir / "files").as_posix()]
        summary = json.loads((tmp_path / "output" / "summary.json").read_text())
        assert summary["results"][0]["outputs"] == [f"study-1/{name}" for name in _files(out)]
        runs.append((_seg_content(seg), _files(out)))
    (content_1, files_1), (content_2, files_2) = runs
    assert content_1 == content_2  # segments, frames and every voxel
    # Only the SEG's file name (its SOP Instance UID, new each time) differs between runs.
    assert len(files_1) == len(files_2)
    assert [f for f in files_1 if not f.endswith(".dcm")] == [
        f for f in files_2 if not f.endswith(".dcm")
    ]
