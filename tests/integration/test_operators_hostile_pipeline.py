"""`dataflow run pipelines/ct-segmentation.yaml` on studies that are not CT in HU, or whose
values are not finite: each job fails with a reason naming the modality, the file and the
element, and no SEG is registered for export (issue 9: wrong results must not reach the PACS
as successes). Deflate bombs fail at load without taking memory (the run is under RLIMIT_AS
= 3 GiB: a regression fails instead of eating the machine). The volume that cannot fit the
store fails naming the series and the budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from deadlines import LONG_HANG
from hostile_dicom import deflated_bomb, limit_address_space
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from operators.dicom import phantom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def dataflow_run(inputs: Path, out: Path, *options: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "run", "pipelines/ct-segmentation.yaml",
         "--input", inputs, "--output", out, *options],
        cwd=ROOT, capture_output=True, text=True, timeout=LONG_HANG,
        preexec_fn=limit_address_space(3 << 30),
    )  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr  # failed jobs: a failed run
    summary = json.loads((out / "summary.json").read_text())
    return {r["job"]: r for r in summary["results"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("hostile")
    for job, name in (("mr", "MR_small.dcm"), ("dose", "rtdose_1frame.dcm")):
        (base / "in" / job).mkdir(parents=True)
        shutil.copy(TEST_FILES / name, base / "in" / job / "image.dcm")
    series = phantom.write_ct_series(base / "in" / "nan", slices=16, size=32)
    ds = pydicom.dcmread(series.files[5])
    tag = Tag(0x00281053)  # RescaleSlope
    ds._dict[tag] = RawDataElement(tag, "DS", 4, b"NaN ", 0, False, True)
    ds.save_as(series.files[5])
    for job, rows, pixel_bytes in (("honest", 40000, 40000 * 40000 * 2), ("liar", 64, 3 << 30)):
        (base / "in" / job).mkdir()
        deflated_bomb(
            base / "in" / job / "bomb.dcm", series.files[0],
            rows=rows, columns=rows, pixel_bytes=pixel_bytes,
        )  # fmt: skip
    return base, dataflow_run(base / "in", base / "out")


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        ("mr", "Modality (0008,0060) is MR (image.dcm); this stage reads CT only"),
        ("dose", "Modality (0008,0060) is RTDOSE (image.dcm); this stage reads CT only"),
        ("nan", "(0028,1053) RescaleSlope: 'NaN' is not a finite number"),
        ("honest", "the volume (6.0 GiB, 1 x 40000 x 40000 float32) cannot be allocated"),
        ("liar", "bomb.dcm inflates to more than 32.0 MiB though its header describes 8.0 KiB"),
    ],
)
def test_the_job_fails_with_the_reason_and_nothing_is_registered(results, job, reason):
    base, by_job = results
    assert by_job[job]["ok"] is False and by_job[job]["stage"] == "load"
    assert reason in by_job[job]["reason"]
    assert "Phantom" not in by_job[job]["reason"]
    assert not (base / "out" / job / "seg").exists()
    assert not (base / "out" / job / "register-dicom-output").exists()


def test_a_volume_larger_than_the_store_fails_naming_the_series(tmp_path):
    series = phantom.write_ct_series(tmp_path / "in" / "big", slices=32, size=96)
    by_job = dataflow_run(tmp_path / "in", tmp_path / "out", "--store-budget", "512KiB")
    uid = str(pydicom.dcmread(series.files[0]).SeriesInstanceUID)
    assert f"series {uid}: the volume (1.1 MiB, 32 x 96 x 96 float32)" in by_job["big"]["reason"]
    assert "store budget is 512.0 KiB" in by_job["big"]["reason"]
