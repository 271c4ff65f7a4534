"""What a re-run does to ``dataflow run``'s --output (dataflow.output), what it says about an
empty --input (dataflow.run.check_jobs), and register-results run twice on one job."""

from __future__ import annotations

import json

import pytest

from dataflow.output import SUMMARY, OutputError, RunOutput
from dataflow.run import check_jobs, find_jobs
from operators.register import register_files


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _summary(root):
    (root / SUMMARY).write_text(json.dumps({"pipeline": "p", "results": []}))


def test_register_twice_into_one_task_lists_exactly_the_new_files(tmp_path):
    """Issue 10: the second run's link onto the first's hard link raised SameFileError."""
    seg, task = tmp_path / "seg", tmp_path / "task"
    seg.mkdir()
    (seg / "a.dcm").write_bytes(b"first")
    (seg / "stale.dcm").write_bytes(b"gone next time")
    register_files(seg, task, agent="ClaraSCU", destinations=["PACS"], job_id="j")
    (seg / "stale.dcm").unlink()
    (seg / "a.dcm").unlink()
    (seg / "a.dcm").write_bytes(b"second")  # a new file of the same name
    again = register_files(seg, task, agent="ClaraSCU", destinations=["PACS"], job_id="j")
    assert again["uris"] == ["a.dcm"]
    assert _tree(task / "files") == ["a.dcm"]
    assert (task / "files" / "a.dcm").read_bytes() == b"second"
    assert json.loads((task / "task.json").read_text())["uris"] == ["a.dcm"]


def test_a_job_folder_is_replaced_as_a_whole_and_other_jobs_are_kept(tmp_path):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    (root / "study-1" / "seg" / "seg").mkdir(parents=True)
    (root / "study-1" / "seg" / "seg" / "old.dcm").write_bytes(b"old")
    (root / "study-2").mkdir()
    (root / "study-2" / "kept.txt").write_text("another job, not in this run")
    _summary(root)
    with RunOutput(root).open(inputs) as out:
        new = out.staging / "study-1" / "seg" / "seg"
        new.mkdir(parents=True)
        (new / "new.dcm").write_bytes(b"new")
        assert (root / "study-1" / "seg" / "seg" / "old.dcm").exists()  # until the job is done
        assert out.commit("study-1") == ["study-1/seg/seg/new.dcm"]
        assert out.commit("study-3") == []  # wrote nothing: nothing there
    assert _tree(root / "study-1") == ["seg/seg/new.dcm"]
    assert _tree(root / "study-2") == ["kept.txt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".dataflow-staging")]


def test_a_job_that_wrote_nothing_this_time_leaves_no_earlier_result(tmp_path):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    (root / "study-1").mkdir(parents=True)
    (root / "study-1" / "results.json").write_text("{}")
    _summary(root)
    with RunOutput(root).open(inputs) as out:
        assert out.commit("study-1") == []
    assert not (root / "study-1").exists()


def test_a_foreign_non_empty_output_is_refused_unless_overwrite(tmp_path):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    root.mkdir()
    (root / "patients.csv").write_text("not ours")
    with pytest.raises(OutputError, match=r"not empty \(patients.csv\).*--overwrite"):
        RunOutput(root).open(inputs)
    with RunOutput(root, overwrite=True).open(inputs) as out:
        assert out.staging.is_dir()
    assert (root / "patients.csv").read_text() == "not ours"  # not a job: left alone


@pytest.mark.parametrize("content", ["", "{not json", '{"something": "else"}'])
def test_only_a_summary_of_ours_makes_a_folder_an_earlier_run(tmp_path, content):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    root.mkdir()
    (root / SUMMARY).write_text(content)
    with pytest.raises(OutputError, match="no summary.json of ours"):
        RunOutput(root).open(inputs)
    _summary(root)
    RunOutput(root).open(inputs).close()


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(tmp_path):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    busy = pytest.raises(OutputError, match="another dataflow run is writing into it")
    with RunOutput(root).open(inputs), busy:
        RunOutput(root).open(inputs)
    RunOutput(root).open(inputs).close()  # free again once the first is done


def test_what_an_interrupted_run_left_is_cleared(tmp_path):
    root, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    (root / ".dataflow-staging-x1" / "study-1").mkdir(parents=True)
    (root / ".dataflow-old-abc").mkdir()
    _summary(root)
    with RunOutput(root).open(inputs) as out:
        left = sorted(p.name for p in root.iterdir() if p.name.startswith(".dataflow-"))
        assert left == [".dataflow-run.lock", out.staging.name]


def test_output_and_input_must_not_hold_each_other(tmp_path):
    with pytest.raises(OutputError, match="is inside --input"):
        RunOutput(tmp_path / "in" / "out").open(tmp_path / "in")
    with pytest.raises(OutputError, match="is inside --output"):
        RunOutput(tmp_path).open(tmp_path / "studies")
    with pytest.raises(OutputError, match="is not a folder"):
        (tmp_path / "file").write_text("x")
        RunOutput(tmp_path / "file").open(tmp_path / "in")


def test_an_input_without_files_is_refused_at_once(tmp_path):
    (tmp_path / "study-1" / "empty").mkdir(parents=True)
    (tmp_path / "study-1" / ".hidden").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"--input .*: holds no files"):
        check_jobs(tmp_path, find_jobs(tmp_path))
    (tmp_path / "study-2").mkdir()
    (tmp_path / "study-2" / "IM1").write_bytes(b"x")
    (tmp_path / "study-2" / "IM2").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 job folder\(s\) hold no files: study-1"):
        check_jobs(tmp_path, find_jobs(tmp_path))
    (tmp_path / "study-1" / "IM1").write_bytes(b"x")
    assert check_jobs(tmp_path, find_jobs(tmp_path)) == {"study-1": 1, "study-2": 2}


def test_a_run_refused_before_any_job_leaves_no_new_output_folder(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    with pytest.raises(RuntimeError), RunOutput(tmp_path / "new").open(inputs):
        raise RuntimeError("the pipeline was refused")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    _summary(tmp_path / "kept")  # a folder that was there stays
    with pytest.raises(RuntimeError), RunOutput(tmp_path / "kept").open(inputs):
        raise RuntimeError("the pipeline was refused")
    assert (tmp_path / "kept" / SUMMARY).exists()
