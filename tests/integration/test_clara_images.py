"""Clara's own pipelines, unchanged, without containers (issue 10): the well-known operator
images whose job a bundled stage does run as that stage (the table comes through the
``dataflow.images`` entry point, so the engine never imports ``operators``); an image whose
work cannot be had (a proprietary model) is refused naming the image and what it does.

Every run here is real: ``dataflow run`` with its worker processes and shared-memory store,
``DATAFLOW_CONTAINER_ENGINE=none`` (no Docker on CI machines)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dataflow.pipeline import check_pipeline
from dataflow.pipeline.images import SWITCH_ENV, image_key
from operators.dicom.series import load_series
from tests.cli import dataflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
CLARA = ROOT / "pipelines" / "clara"


@pytest.fixture(autouse=True)
def no_engine(monkeypatch):
    monkeypatch.setenv("DATAFLOW_CONTAINER_ENGINE", "none")


def phantom(folder: Path, slices: int = 6, size: int = 32) -> Path:
    subprocess.run(
        [sys.executable, "-m", "operators.dicom.phantom", folder,
         "--slices", str(slices), "--size", str(size), "--oblique", "--shuffle"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return folder


def run(pipeline: Path, jobs: Path, out: Path) -> subprocess.CompletedProcess:
    return dataflow("run", pipeline, "--input", jobs, "--output", out)


def test_image_names_match_without_registry_namespace_or_tag():
    assert image_key("nvcr.io/nvidia/clara/dicom-reader:0.7.3-2011.5") == "clara/dicom-reader"
    assert image_key("clara/dicom-reader") == "clara/dicom-reader"
    assert image_key("localhost:5000/null-pipeline/operator-py:0.8.1") == (
        "null-pipeline/operator-py"
    )
    assert image_key("Lung-Lesion-Seg-App@sha256:abc") == "lung-lesion-seg-app"


def test_the_null_pipeline_runs_unchanged_and_passes_its_input_on(tmp_path):
    jobs = tmp_path / "in"
    for job, files in {"a": {"x.dcm": b"1", "sub/y.txt": b"22"}, "b": {"z.bin": b"333"}}.items():
        for name, data in files.items():
            (jobs / job / name).parent.mkdir(parents=True, exist_ok=True)
            (jobs / job / name).write_bytes(data)
    # null-inference asks for a GPU (the image's need); the null operator needs none
    done = run(CLARA / "null-pipeline.yaml", jobs, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    for job in ("a", "b"):
        source = {p.relative_to(jobs / job): p.read_bytes() for p in (jobs / job).rglob("*")
                  if p.is_file()}  # fmt: skip
        written = tmp_path / "out" / job / "null-writer" / "output"
        assert {p.relative_to(written): p.read_bytes() for p in written.rglob("*")
                if p.is_file()} == source  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["ok"] for r in summary["results"]] == [True, True]


def test_the_fastio_passthrough_runs_and_its_compare_checks_the_round_trip(tmp_path):
    nib = pytest.importorskip("nibabel")  # the research extra, as the image needs
    jobs = tmp_path / "in"
    rng = np.random.default_rng(7)
    volume = rng.normal(size=(5, 6, 7)).astype(np.float32)
    (jobs / "case-1").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), jobs / "case-1" / "image.nii.gz")
    (jobs / "case-2").mkdir()  # two NIfTI files: which one the image should read is unclear
    for name in ("one.nii", "two.nii"):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), jobs / "case-2" / name)
    done = run(CLARA / "fastio-passthrough.yaml", jobs, tmp_path / "out")
    assert done.returncode == 1, done.stdout + done.stderr  # case-2 fails, case-1 not
    job = tmp_path / "out" / "case-1"
    report = json.loads((job / "compare" / "output" / "report.json").read_text())
    assert report == {"nifti": "image.nii.gz", "shape": [1, 5, 6, 7], "equal": True}
    with np.load(job / "fastio-to-npz" / "output" / "segmentation.npz") as npz:
        np.testing.assert_array_equal(npz["segmentation"][0], volume)
    assert "expected one .nii or .nii.gz file in the input folder; found 2" in done.stdout


@pytest.mark.parametrize(
    ("pipeline", "refused"),
    [
        ("covid19.yaml", {"lung-segmentation": "lung segmentation (clara/ai-lung) needs "
                          "NVIDIA's trained model",
                          "classification-covid-19": "COVID-19 classification"}),
        ("lung-lesion.yaml", {"lung-lesion-segmentation": "lung and lesion (GGO) segmentation"
                              ", a user's application image"}),
    ],
)  # fmt: skip
def test_a_pipeline_needing_a_model_that_cannot_be_had_is_refused_saying_so(
    tmp_path, pipeline, refused
):
    phantom(tmp_path / "in" / "study-1")
    done = run(CLARA / pipeline, tmp_path / "in", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    for operator, what in refused.items():
        assert f"operator {operator!r} (image " in done.stderr
        assert what in done.stderr
    assert "operator 'dicom-reader'" not in done.stderr  # that one runs here
    assert not (tmp_path / "out" / "summary.json").exists()  # nothing started


def test_validate_says_which_bundled_stage_runs_each_image():
    report = check_pipeline(CLARA / "covid19.yaml")
    notes = {d.operator: d.message for d in report.notes if d.field == "container.image"}
    assert "operators.clara_images:DicomReader" in notes["dicom-reader"]
    assert "operators.clara_images:RegisterResultsImage" in notes["register-dicom-output"]
    warned = {d.operator: d.message for d in report.warnings if d.field == "container.image"}
    assert set(warned) == {"lung-segmentation", "classification-covid-19"}


def test_the_table_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    warned = check_pipeline(CLARA / "null-pipeline.yaml").warnings
    assert {d.operator for d in warned if d.field == "container.image"} == {
        "null-reader", "null-inference", "null-writer"
    }  # fmt: skip


EXPORT = """
api-version: 0.4.0
name: clara-export
operators:
- name: dicom-reader
  container:
    image: nvcr.io/nvidia/clara/dicom-reader
    tag: 0.7.3-2011.5
  input:
  - path: /input
  output:
  - path: /output
- name: dicom-writer
  container:
    image: clara/dicom-writer
  input:
  - from: dicom-reader
    path: /input
  - path: /dicom
  output:
  - path: /output
    name: dicom
- name: register-dicom-output
  container:
    image: clara/register-results
    command: ["python", "register.py", "--agent", "ClaraSCU", "--data", "[\\"MYPACS\\"]"]
  input:
  - from: dicom-writer
    name: dicom
    path: /input
"""


def test_clara_reader_writer_and_register_run_as_a_chain(tmp_path):
    """The shape of Clara's reference pipelines without their model: dicom-reader's MetaImage,
    dicom-writer's new series of the same study, register-results' export task."""
    study = phantom(tmp_path / "in" / "study-1")
    (tmp_path / "export.yaml").write_text(textwrap.dedent(EXPORT))
    done = run(tmp_path / "export.yaml", tmp_path / "in", tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    job = tmp_path / "out" / "study-1"
    source, meta = load_series(study)
    (mhd,) = (job / "dicom-reader" / "output").glob("*.mhd")
    assert mhd.stem == meta["series_instance_uid"]  # named by its series, as Clara's reader
    written, written_meta = load_series(job / "dicom-writer" / "dicom")
    np.testing.assert_allclose(written, source, atol=0.05)
    assert written_meta["study_instance_uid"] == meta["study_instance_uid"]
    assert written_meta["series_instance_uid"] != meta["series_instance_uid"]
    task_dir = job / "register-dicom-output" / "task"
    task = json.loads((task_dir / "task.json").read_text())
    assert task["agent"] == "ClaraSCU" and task["destinations"] == ["MYPACS"]
    assert len(task["uris"]) == 6
    first = pydicom.dcmread(task_dir / "files" / task["uris"][0], stop_before_pixels=True)
    assert first.SeriesInstanceUID == written_meta["series_instance_uid"]
