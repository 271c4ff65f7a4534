"""RegisterResults: Clara's task record with the files, and its refusals."""

from __future__ import annotations

import json

import pytest

from dataflow.stage import ParameterError, StageError
from dataflow.testing import run_stage
from operators.register import RegisterResults


def test_a_folder_becomes_a_task_with_its_files(tmp_path):
    (tmp_path / "seg" / "sub").mkdir(parents=True)
    (tmp_path / "seg" / "a.dcm").write_bytes(b"A")
    (tmp_path / "seg" / "sub" / "b.dcm").write_bytes(b"B")
    out = run_stage(RegisterResults, {"input": tmp_path / "seg"},
                    arguments={"destinations": ["PACS", "ARCHIVE"]},
                    output_dir=tmp_path / "out")["task"]  # fmt: skip
    task = json.loads((out / "task.json").read_text())
    assert task["agent"] == "ClaraSCU" and json.loads(task["parameters"]) == ["PACS", "ARCHIVE"]
    assert task["uris"] == ["a.dcm", "sub/b.dcm"] and task["state"] == "Pending"
    assert (out / "files" / "sub" / "b.dcm").read_bytes() == b"B"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"destinations": ["PACS"], "agent": "-bad"}, "agent '-bad' must be"),
        ({"destinations": ["../etc"]}, r"destination name\(s\) \['../etc'\]"),
        ({}, "ClaraSCU needs at least one destination"),
    ],
)
def test_bad_parameters_are_refused(tmp_path, arguments, message):
    with pytest.raises(ParameterError, match=message):
        run_stage(RegisterResults, {"input": tmp_path}, arguments=arguments)


def test_an_empty_folder_is_an_error_not_an_empty_task(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="nothing to register"):
        run_stage(RegisterResults, {"input": tmp_path / "empty"},
                  arguments={"destinations": ["PACS"]}, output_dir=tmp_path / "out")  # fmt: skip
