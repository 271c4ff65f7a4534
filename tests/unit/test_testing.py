"""dataflow.testing: what a stage author uses to test a stage in three lines."""

import sys
from pathlib import Path

import numpy as np
import pytest

from dataflow.execution.local import StageDef
from dataflow.stage import ParameterError, Port, PortError, Stage, StageError, Tensor
from dataflow.testing import run_pipeline, run_stage

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from engine_stages import Load, Scale, make_jobs, total

VOL = Port("array", "float32", (-1, -1))


class Window(Stage):
    inputs = {"image": VOL}
    outputs = {"image": VOL}

    def __init__(self, low: float = 0.0, high: float = 1.0):
        self.low, self.high = low, high

    def execute(self, ctx, image):
        assert ctx.job_id == "test-job" and ctx.metadata["image"] == {"spacing": [1, 1]}
        return np.clip(image, self.low, self.high)


def test_run_stage_in_three_lines():
    image = np.array([[-5.0, 0.5], [2.0, 9.0]], np.float32)
    out = run_stage(Window, {"image": Tensor(image, {"spacing": [1, 1]})}, arguments={"high": 2})
    assert out["image"].tolist() == [[0.0, 0.5], [2.0, 2.0]]


def test_run_stage_checks_inputs_arguments_and_outputs_like_the_platform():
    with pytest.raises(ParameterError, match="unknown parameter 'width'"):
        run_stage(Window, {"image": np.zeros((2, 2), np.float32)}, arguments={"width": 3})
    with pytest.raises(PortError, match="stage 'Window' input 'image' must be float32"):
        run_stage(Window, {"image": np.zeros((2, 2), np.int16)})
    with pytest.raises(ValueError, match="missing \\['image'\\]"):
        run_stage(Window, {})


def test_inputs_are_read_only_as_in_the_store():
    class Mutate(Stage):
        inputs = outputs = {"image": VOL}

        def execute(self, ctx, image):
            image[0, 0] = 1
            return image

    with pytest.raises(ValueError, match="read-only"):
        run_stage(Mutate, {"image": np.zeros((2, 2), np.float32)})


def test_run_pipeline_in_process(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("x2", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 2}),
        StageDef("x3", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 3}),
        StageDef("sum", total, {"a": ("x2", "vec"), "b": ("x3", "vec")}, ("total",)),
    ]
    jobs = dict(make_jobs(tmp_path, [2, 4]))
    results = run_pipeline(stages, jobs)
    assert results == {"job0": {("sum", "total"): 10}, "job1": {("sum", "total"): 20}}


def test_run_pipeline_raises_the_stage_error_with_job_and_stage(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("scale", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"fail_on": 3}),
    ]
    with pytest.raises(StageError, match="job 'job0' failed in stage 'scale': ValueError"):
        run_pipeline(stages, dict(make_jobs(tmp_path, [3])))
