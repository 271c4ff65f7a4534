"""A function stage reads its input's geometry (issue 10): a parameter annotated ``Tensor``
receives ``Tensor(array, metadata)``, in ``run_stage`` and in a real ``dataflow run`` (worker
processes, the shared-memory store), so a volume in mL needs no class stage."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from dataflow import Port, Tensor, function_stage
from dataflow.stage import PortError
from dataflow.testing import run_stage
from tests.cli import dataflow

pytestmark = pytest.mark.integration

MASK = Port("array", element_type="uint8", shape=(-1, -1, -1))

STAGES = """
import numpy as np
from dataflow import Port, Stage, Tensor, function_stage

MASK = Port("array", element_type="uint8", shape=(-1, -1, -1))


class Load(Stage):
    inputs = {"study": Port("stream", element_type="npy")}
    outputs = {"mask": MASK}

    def execute(self, ctx, study):
        return Tensor(np.load(study / "mask.npy"), {"spacing": [2.5, 0.8, 0.8]})


@function_stage(inputs={"mask": MASK}, outputs={"ml": Port("float64")})
def volume_ml(mask: Tensor):
    return float(mask.array.sum()) * float(np.prod(mask.spacing)) / 1000.0
"""

PIPELINE = """
api-version: 0.5.0
name: volume
operators:
- name: load
  stage: geometry_stages:Load
  input:
  - name: study
  output:
  - name: mask
- name: measure
  stage: geometry_stages:volume_ml
  input:
  - from: load
    name: mask
  output:
  - name: ml
"""


@function_stage(inputs={"mask": MASK}, outputs={"ml": Port("float64")})
def volume_ml(mask: Tensor, *, label: int = 1):
    assert not mask.array.flags.writeable  # the same read-only view, not a copy
    return float((mask.array == label).sum()) * float(np.prod(mask.spacing)) / 1000.0


@function_stage(inputs={"mask": MASK}, outputs={"voxels": Port("int64")})
def voxels(mask):
    return int(mask.sum())


def test_a_tensor_annotated_input_gets_its_metadata():
    mask = np.zeros((4, 10, 10), np.uint8)
    mask[:2, :5, :5] = 1  # 50 voxels
    out = run_stage(volume_ml, {"mask": Tensor(mask, {"spacing": [2.0, 1.0, 0.5]})})
    assert out["ml"] == pytest.approx(50 * 1.0 / 1000.0)
    assert run_stage(voxels, {"mask": mask})["voxels"] == 50  # unannotated: the bare array


def test_spacing_is_none_when_the_metadata_has_none():
    assert Tensor(np.zeros(1)).spacing is None
    assert Tensor(np.zeros(1), {"spacing": ["2.5", 1, 1]}).spacing == (2.5, 1.0, 1.0)


def test_a_tensor_annotation_on_a_port_that_is_not_an_array_is_refused():
    with pytest.raises(PortError, match="'name' is annotated Tensor but input port 'name' is"):

        @function_stage(inputs={"name": Port("string")}, outputs={})
        def bad(name: Tensor):
            return None


def test_a_function_stage_reads_spacing_in_a_real_run(tmp_path):
    (tmp_path / "geometry_stages.py").write_text(STAGES)
    (tmp_path / "volume.yaml").write_text(textwrap.dedent(PIPELINE))
    job = tmp_path / "studies" / "case-1"
    job.mkdir(parents=True)
    mask = np.zeros((8, 16, 16), np.uint8)
    mask[2:6, 4:12, 4:12] = 1  # 256 voxels of 2.5 x 0.8 x 0.8 mm = 0.4096 mL
    np.save(job / "mask.npy", mask)
    done = dataflow("run", "volume.yaml", "--input", "studies", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out" / "case-1" / "results.json").read_text())
    assert results["measure.ml"] == pytest.approx(256 * 2.5 * 0.8 * 0.8 / 1000.0)
