"""`pipelines/ct-filter.yaml` registers what it writes for the PACS (issue 10: its derived series
was described as "for the PACS" and never registered): one export task for the derived series
and one for its preview, to the `destination` parameter, each listing exactly those files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.cli import dataflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_the_derived_series_and_its_preview_are_registered_for_export(tmp_path):
    study = tmp_path / "in" / "study-1"
    subprocess.run(
        [sys.executable, "-m", "operators.dicom.phantom", study, "--slices", "6", "--size", "112"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    out = tmp_path / "out"
    done = dataflow("run", "pipelines/ct-filter.yaml", "--input", tmp_path / "in",
                    "--output", out, "--param", "destination=ORTHANC")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    job = out / "study-1"
    for stage, port in (("register-series", "series"), ("register-preview", "preview")):
        task_dir = job / stage / "task"
        task = json.loads((task_dir / "task.json").read_text())
        assert task["agent"] == "ClaraSCU" and task["destinations"] == ["ORTHANC"]
        written = sorted(p.name for p in (job / "derived" / port).iterdir())
        assert sorted(task["uris"]) == written and written
        assert all(uri.endswith(".dcm") for uri in task["uris"])  # no NIfTI or MHD exported
        for uri in task["uris"]:
            ds = pydicom.dcmread(task_dir / "files" / uri, stop_before_pixels=True)
            assert ds.StudyInstanceUID == pydicom.dcmread(next(study.iterdir())).StudyInstanceUID
    assert len(list((job / "register-series" / "task" / "files").iterdir())) == 6
