"""The local executor with real worker processes, a real store and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deadlines import HANG, wait_until
from engine_stages import BrokenPrepare, Load, Scale, Slow, make_jobs, total

from dataflow.execution import forkserver
from dataflow.execution.local import LocalExecutor, StageDef
from dataflow.execution.state import Limits

pytestmark = pytest.mark.integration


def chain(**scale_args):
    return [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("scale", Scale, {"vec": ("load", "vec")}, ("vec",), arguments=scale_args),
    ]


def run(tmp_path, stages, sizes, **kwargs):
    executor = LocalExecutor(stages, output_root=tmp_path / "out", **kwargs)
    return executor.run(make_jobs(tmp_path / "in", sizes))


def test_jobs_stream_through_warm_workers_in_order(tmp_path):
    results = run(tmp_path, chain(factor=3), [5, 1, 7, 2])
    assert [r.job for r in results] == ["job0", "job1", "job2", "job3"]
    assert all(r.ok for r in results)
    array, meta = results[2].outputs[("scale", "vec")]
    np.testing.assert_array_equal(array, np.full(7, 3))
    assert meta == {"n": 7, "job": "job2"}  # metadata flows with the tensor


def test_fan_in_joins_two_branches_per_job(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("x2", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 2}),
        StageDef("x5", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 5}),
        StageDef("sum", total, {"a": ("x2", "vec"), "b": ("x5", "vec")}, ("total",)),
    ]
    results = run(tmp_path, stages, [1, 10])
    assert [r.outputs[("sum", "total")] for r in results] == [7, 70]


def test_an_exception_fails_that_job_only(tmp_path):
    results = run(tmp_path, chain(fail_on=2), [1, 2, 3])
    assert [r.ok for r in results] == [True, False, True]
    failed = results[1]
    assert failed.stage == "scale" and failed.reason == "ValueError: cannot scale a vector of 2"
    assert "Traceback" in failed.details and "engine_stages.py" in failed.details


def test_a_worker_killed_mid_job_fails_that_job_and_is_restarted(tmp_path):
    results = run(tmp_path, chain(crash_on=2), [1, 2, 3, 4])
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].reason == "worker scale#0 died: killed by signal 9 (SIGKILL)"


def test_a_stage_timeout_kills_the_job_not_the_run(tmp_path):
    stages = chain(sleep_on=2)
    stages[1] = StageDef(**{**stages[1].__dict__, "timeout": 1.0})
    t0 = time.monotonic()
    results = run(tmp_path, stages, [1, 2, 3])
    assert time.monotonic() - t0 < HANG  # job 2 sleeps for ever: the run did not wait for it
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "stage 'scale' timed out after 1 s"


def test_a_stage_that_cannot_start_fails_its_jobs_with_the_reason(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("model", BrokenPrepare, {"vec": ("load", "vec")}, ("vec",)),
    ]
    results = run(tmp_path, stages, [1, 2], limits=Limits(max_restarts=1))
    assert not any(r.ok for r in results)
    assert "RuntimeError: model file missing" in results[0].reason


def test_replicas_share_the_work_and_results_stay_in_order(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", Slow, {"vec": ("load", "vec")}, ("vec",), replicas=2),
    ]
    results = run(tmp_path, stages, [1, 2, 3, 4])
    assert [r.job for r in results] == ["job0", "job1", "job2", "job3"] and all(
        r.ok for r in results
    )


def _descendants() -> set[int]:
    """Live descendants of this test process (workers are children of the fork server),
    but the fork server itself: it lives as long as this process, by design."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(pid)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found - {forkserver.server_pid()}


def test_nothing_is_left_running_after_a_run(tmp_path):
    before = _descendants()
    run(tmp_path, chain(), [1])
    assert _descendants() - before == set()  # no worker, no store server


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)],
    ids=[
        "ctrl-c-to-the-terminal-group",
        "sigterm-to-the-coordinator",
        "sigterm-to-the-group-as-systemd",
    ],
)
def test_an_interrupted_run_stops_cleanly(tmp_path, sig, to_group):
    script = Path(__file__).with_name("engine_stages.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "running"
    wait_until((tmp_path / "busy").exists, "slow stage busy with a job")  # it sleeps for ever
    if to_group:
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the whole group
    else:
        os.kill(proc.pid, sig)  # what a service manager does first
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 130 and "interrupted" in out

    def group_left() -> str:
        found = subprocess.run(["pgrep", "-a", "-g", str(proc.pid)], capture_output=True, text=True)
        return found.stdout.strip()

    # multiprocessing's resource tracker may take a moment to notice
    wait_until(lambda: not group_left(), "empty process group")
