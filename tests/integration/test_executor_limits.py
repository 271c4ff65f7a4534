"""Backpressure bounds, the watchdog, job timeouts and GPU placement, with real processes."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import structlog
from deadlines import HANG, wait_until
from engine_stages import Load, Scale, Slow, make_jobs, whereami

from dataflow.execution.local import LocalExecutor, StageDef
from dataflow.execution.state import Limits
from dataflow.scheduler import Inventory, ReplicaRequest, place

pytestmark = pytest.mark.integration


def test_a_slow_consumer_bounds_what_a_fast_producer_leaves_in_memory(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", Slow, {"vec": ("load", "vec")}, ("vec",), arguments={"seconds": 0.1}),
    ]
    executor = LocalExecutor(
        stages, output_root=tmp_path / "out", limits=Limits(max_jobs=12, edge_items=2)
    )
    executor.run(make_jobs(tmp_path / "in", [1000] * 12))
    # load is far faster than slow, yet never more than 2 of its outputs waited on the edge
    assert executor.core.peak_on_edge[("load", "vec")] == 2


def test_the_watchdog_says_what_is_stuck(tmp_path):
    release = tmp_path / "release"  # the slow job ends once the test has seen the report
    arguments = {"seconds": HANG, "until": str(release)}
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("slow", Slow, {"vec": ("load", "vec")}, ("vec",), arguments=arguments),
    ]
    executor = LocalExecutor(stages, output_root=tmp_path / "o", limits=Limits(stall_seconds=1))
    reported = threading.Event()

    def release_once_reported(logs):  # beside the run (which needs the main thread)
        try:  # no report before HANG: released all the same, the assertion below says so
            wait_until(
                lambda: any(
                    e["event"] == "pipeline_stalled"
                    and "worker slow#0 busy with job 'job0'" in e["report"]
                    for e in list(logs)
                ),
                "stall report naming the busy worker",
            )
            reported.set()
        except AssertionError:
            pass
        finally:
            release.touch()

    with structlog.testing.capture_logs() as logs:
        watcher = threading.Thread(target=release_once_reported, args=(logs,), daemon=True)
        watcher.start()
        executor.run(make_jobs(tmp_path / "in", [3]))
    watcher.join(HANG)
    assert reported.is_set(), [e for e in logs if e["event"] == "pipeline_stalled"]


def test_a_job_timeout_cancels_the_job_wherever_it_is(tmp_path):
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("scale", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"sleep_on": 2}),
    ]
    # One job in flight at a time, so that job 2's stall is not also job 3's: a job's clock
    # runs from its first stage on, including any wait between stages — for job 1 the scale
    # worker's start, for job 3 its restart after job 2 killed it: 5 s leave room on a busy
    # machine (job 2 sleeps for ever, so only the timeout ends it).
    limits = Limits(job_timeout=5, max_jobs=1)
    executor = LocalExecutor(stages, output_root=tmp_path / "o", limits=limits)
    results = executor.run(make_jobs(tmp_path / "in", [1, 2, 3]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "job timed out after 5 s"


def test_each_gpu_replica_sees_only_its_gpu(tmp_path):
    inventory = Inventory.detect({"DATAFLOW_GPUS": "2x16GiB"}, cpus=2, memory_mb=8192)
    requests = [
        ReplicaRequest("load", 0),
        ReplicaRequest("where", 0, gpu=1),
        ReplicaRequest("where", 1, gpu=1),
    ]
    plan = place(requests, inventory)
    env = {r.stage: [] for r in requests}
    devices = {r.stage: [] for r in requests}
    meet = tmp_path / "meet"  # both "where" replicas take a job before either answers
    meet.mkdir()
    for r in requests:
        a = plan.assignment(r.stage, r.replica)
        env[r.stage].append(
            {**a.env, "MEET_IN": str(meet), "MEET_COUNT": "2", "MEET_DEADLINE": str(HANG)}
        )
        devices[r.stage].append(a.gpus[0] if a.gpus else None)
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",), env=env["load"]),
        StageDef(
            "where", whereami, {"vec": ("load", "vec")}, ("where",), replicas=2,
            env=env["where"], devices=devices["where"],
        ),
    ]  # fmt: skip
    results = LocalExecutor(stages, output_root=tmp_path / "o").run(
        make_jobs(tmp_path / "in", [1] * 6)
    )
    seen = {r.outputs[("where", "where")] for r in results}
    assert seen == {"0|0", "1|1"}  # both replicas worked, each on its own GPU
    assert dataclasses.asdict(plan.assignment("load", 0))["gpus"] == ()
