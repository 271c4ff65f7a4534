"""dataflow.testing runs a pipeline the way ``dataflow run`` does (issue 13): given the YAML
an author wrote, the same three stages see the same metadata in the harness as through the
real workers and store — a plain array returned by a stage inherits its input's geometry in
both — and ``run_stage`` shows the metadata an output carries downstream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli import dataflow

from dataflow.stage import Tensor
from dataflow.testing import run_pipeline, run_stage

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).parent / "harness_data" / "geometry.yaml"


def test_the_harness_and_dataflow_run_give_downstream_the_same_metadata(tmp_path):
    job = tmp_path / "in" / "job-a"
    job.mkdir(parents=True)
    np.save(job / "v.npy", np.arange(4, dtype=np.float32))

    results = run_pipeline(PIPELINE, {"job-a": job}, output_dir=tmp_path / "harness")
    harness = json.loads((results["job-a"][("report", "report")] / "report.json").read_text())

    ran = dataflow("run", PIPELINE, "--input", tmp_path / "in", "--output", tmp_path / "run")
    assert ran.returncode == 0, ran.stderr
    (report,) = (tmp_path / "run").rglob("report.json")
    real = json.loads(report.read_text())

    assert harness == real
    assert real["metadata"] == {"spacing": [2.0]} and real["sum"] == 12.0


def test_run_stage_shows_the_metadata_an_output_carries_downstream():
    import sys

    sys.path.insert(0, str(PIPELINE.parent))
    from geometry_stages import Double

    out = run_stage(Double, {"volume": Tensor(np.ones(3, np.float32), {"spacing": [0.5]})})
    assert out["volume"].tolist() == [2.0, 2.0, 2.0]  # a plain array, as before
    assert out.metadata["volume"] == {"spacing": [0.5]}  # what the next stage will be given
