"""Workers forked from the preloaded fork server get what a spawned worker would have had.

The executor forks CPU workers from one server process that imported NumPy, Numba, PyArrow and
the stages' modules once (``dataflow.execution.forkserver``); these tests run real workers both
ways and compare what each sees: the coordinator's folder, environment and output at the time
the worker starts (not when the server started), its own thread count and random state.
"""

from __future__ import annotations

import json
import os

import pytest

from dataflow.execution import forkserver
from dataflow.execution.local import LocalExecutor, StageDef

STAGE = "startup_stages:Inherited"


def _run(tmp_path, monkeypatch, mode, names=("a", "b"), env=None):
    """One job through stages ``names`` (one worker each, side by side): their reports."""
    monkeypatch.setenv("DATAFLOW_WORKER_START", mode)
    stages = [
        StageDef(
            name, STAGE, {"payload": None}, ("report",),
            env=[{"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}],
        )
        for name in names
    ]  # fmt: skip
    folder = tmp_path / "in" / "job"
    folder.mkdir(parents=True)
    executor = LocalExecutor(stages, output_root=tmp_path / "out")
    (result,) = executor.run([("job", folder)])
    assert result.ok, result.reason
    return [json.loads(result.outputs[(name, "report")]) for name in names]


@pytest.mark.parametrize("mode", ["forkserver", "spawn"])
def test_a_worker_sees_the_coordinators_folder_variables_and_output_now(
    tmp_path, monkeypatch, capfd, mode
):
    # the fork server starts first, in another folder and environment than the run's
    forkserver.context_for({}, None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DATAFLOW_TEST_MARK", f"set-late-{mode}")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))
    reports = _run(tmp_path, monkeypatch, mode)
    for report in reports:
        assert report["cwd"] == str(work)
        assert report["mark"] == f"set-late-{mode}"
        assert report["numba_threads"] == 1  # NUMBA_NUM_THREADS of the stage's CPU request
        assert report["numba_cache_dir"] == str(tmp_path / "numba-cache")
    parent = forkserver.server_pid() if mode == "forkserver" else os.getpid()
    assert {r["parent"] for r in reports} == {parent}
    assert reports[0]["pid"] != reports[1]["pid"]
    assert reports[0]["draw"] != reports[1]["draw"]  # each worker its own random state
    out, err = capfd.readouterr()
    assert "stdout of a" in out and "stdout of b" in out  # this test's capture, not the server's
    assert "stderr of a" in err and "stderr of b" in err


def test_cpu_workers_are_forked_from_one_server_and_others_spawned():
    cpu = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    assert forkserver.forkable(cpu, None)
    assert not forkserver.forkable(cpu, 0)  # a GPU worker: CUDA starts in its own process
    assert not forkserver.forkable({**cpu, "CUDA_VISIBLE_DEVICES": "0"}, None)
    assert forkserver.forkable({**cpu, "CUDA_VISIBLE_DEVICES": ""}, None)  # GPUs hidden
    assert not forkserver.forkable({**cpu, "OMP_NUM_THREADS": "2"}, None)  # BLAS read at import
    assert not forkserver.forkable({**cpu, "STAGE_VARIABLE": "x"}, None)  # a stage's variables


def test_a_stage_with_variables_of_its_own_is_spawned_and_sees_them(tmp_path, monkeypatch):
    (report,) = _run(tmp_path, monkeypatch, "forkserver", ["a"], env={"STAGE_VARIABLE": "v"})
    assert report["variable"] == "v"
    assert report["parent"] == os.getpid()  # spawned by the coordinator itself


def _journaled(tmp_path, specs):
    journal = tmp_path / "journal"
    stages = [
        StageDef(
            name, f"startup_stages:{cls}", {"payload": None}, ("name",),
            arguments={"journal": str(journal), "name": name, **args},
        )
        for name, cls, args in specs
    ]  # fmt: skip
    folder = tmp_path / "in" / "job"
    folder.mkdir(parents=True)
    executor = LocalExecutor(stages, output_root=tmp_path / "out")
    (result,) = executor.run([("job", folder)])
    return result, journal.read_text().splitlines()


def test_workers_of_the_same_stage_code_start_after_the_first_is_up(tmp_path):
    # the first compiles (and caches) the kernels; the others load them instead of compiling
    # them again at the same time
    result, journal = _journaled(
        tmp_path,
        [
            ("a", "Journaled", {}),
            ("b", "Journaled", {}),
            ("c", "Journaled", {}),
            ("o", "Other", {}),
        ],
    )
    assert result.ok, result.reason
    first = journal.index("ready a")
    assert journal.index("start b") > first and journal.index("start c") > first
    assert {"ready b", "ready c", "ready o"} <= set(journal)


def test_a_first_worker_that_cannot_start_lets_the_next_one_try(tmp_path):
    result, journal = _journaled(
        tmp_path, [("a", "Journaled", {"fail": True}), ("b", "Journaled", {})]
    )
    assert not result.ok and "a cannot start" in result.reason
    assert "ready b" in journal and "ready a" not in journal


def test_a_run_reports_each_stage_starting_then_ready_then_the_pipeline(tmp_path):
    seen = []
    journal = str(tmp_path / "journal")
    stages = [  # the job needs both: each is up before it ends (a replica might not be)
        StageDef(
            name, f"startup_stages:{cls}", {"payload": None}, ("name",),
            arguments={"journal": journal, "name": name},
        )
        for name, cls in (("a", "Journaled"), ("b", "Other"))
    ]  # fmt: skip
    folder = tmp_path / "in" / "job"
    folder.mkdir(parents=True)
    executor = LocalExecutor(
        stages, output_root=tmp_path / "out",
        on_progress=lambda event, progress: seen.append((event.name, event.stage, event.ready)),
    )  # fmt: skip
    (result,) = executor.run([("job", folder)])
    assert result.ok, result.reason
    names = [(name, stage) for name, stage, _ in seen]
    assert sorted(names[:2]) == [("stage_starting", "a"), ("stage_starting", "b")]
    assert sorted(names[2:4]) == [("stage_ready", "a"), ("stage_ready", "b")]
    assert seen[-1] == ("pipeline_ready", None, 2)
    assert [ready for *_, ready in seen[2:]] == sorted(ready for *_, ready in seen[2:])
