"""Self-healing stages, memory limits, default time-outs and the health snapshot, with real
worker processes (serve mode, as ``dataflow serve`` runs them). Backoffs are small in the tests;
the assertions are on events (results, log lines, health), never on elapsed time."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import structlog
from deadlines import HANG, wait_until
from engine_stages import Load, Scale, Slow, make_jobs
from heal_stages import Hog, Sink

from dataflow.execution.local import JobFeed, JobResult, LocalExecutor, StageDef
from dataflow.execution.state import Limits

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class Serving:
    """``executor.serve`` in a thread; ``run(job)`` puts one job and waits for its result."""

    def __init__(self, executor: LocalExecutor) -> None:
        self.executor = executor
        self.feed = JobFeed()
        self.results: dict[str, JobResult] = {}
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.thread = threading.Thread(
            target=executor.serve, args=(self.feed, self._record),
            kwargs={"on_ready": self.ready.set}, daemon=True,
        )  # fmt: skip

    def _record(self, result: JobResult) -> None:
        outputs = {
            key: (np.array(value[0]), value[1]) if isinstance(value, tuple) else value
            for key, value in result.outputs.items()
        }  # the views are valid during the call only
        with self.cond:
            self.results[result.job] = JobResult(
                result.job, result.ok, outputs, result.stage, result.reason, result.details
            )
            self.cond.notify_all()

    def run(self, job_id, payload) -> JobResult:
        self.feed.put(job_id, payload)
        with self.cond:
            assert self.cond.wait_for(lambda: job_id in self.results, HANG), job_id
            return self.results[job_id]

    def wait_health(self, predicate) -> dict:
        return wait_until(
            lambda: predicate(health := self.executor.health()) and health, "health wanted"
        )

    def __enter__(self) -> Serving:
        self.thread.start()
        assert self.ready.wait(HANG)
        return self

    def __exit__(self, *exc) -> None:
        self.feed.abort()
        self.thread.join(HANG)
        assert not self.thread.is_alive()


def chain(stage_cls, **arguments):
    return [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef("scale", stage_cls, {"vec": ("load", "vec")}, ("vec",), arguments=arguments),
    ]


def events(logs, name):
    return [e for e in logs if e["event"] == name]


def test_a_stage_whose_worker_keeps_dying_breaks_then_heals_by_itself(tmp_path):
    jobs = make_jobs(tmp_path / "in", [2, 2, 2, 2, 3])  # four poison studies, then a good one
    limits = Limits(max_restarts=3, restart_backoff=0.1, restart_backoff_max=0.5)
    executor = LocalExecutor(chain(Scale, crash_on=2), output_root=tmp_path / "o", limits=limits)
    with structlog.testing.capture_logs() as logs, Serving(executor) as serving:
        for job_id, payload in jobs[:4]:
            result = serving.run(job_id, payload)
            assert (result.ok, result.stage) == (False, "scale")
            assert result.reason == "worker scale#0 died: killed by signal 9 (SIGKILL)"
        # no restart of the executor: the stage comes back on its own after its backoff
        health = serving.wait_health(lambda h: h["counters"]["stage_recovered"] == 1)
        result = serving.run(*jobs[4])
        assert result.ok
        np.testing.assert_array_equal(result.outputs[("scale", "vec")][0], np.full(3, 2))
    died = events(logs, "worker_died")
    assert [(e["log_level"], e["worker"], e["stage"]) for e in died] == [
        ("error", "scale#0", "scale")
    ] * 4
    assert died[0]["reason"] == "killed by signal 9 (SIGKILL)"
    (broken,) = events(logs, "stage_broken")
    assert (broken["log_level"], broken["stage"]) == ("error", "scale")
    assert broken["reason"] == (
        "stage 'scale' is broken: its worker died 4 times in a row "
        "(last: killed by signal 9 (SIGKILL))"
    )
    (recovered,) = events(logs, "stage_recovered")
    assert (recovered["log_level"], recovered["stage"]) == ("info", "scale")
    assert health["counters"] == {
        "worker_died": 4, "worker_oom": 0, "stage_broken": 1, "stage_recovered": 1,
        "stage_timeouts": 0, "job_timeouts": 0,
    }  # fmt: skip
    assert health["stages"]["scale"]["restarts"] == 4
    load = health["stages"]["load"]
    assert {key: load[key] for key in ("state", "reason", "workers", "live", "restarts")} == {
        "state": "ok",
        "reason": None,
        "workers": 1,
        "live": 1,
        "restarts": 0,
    }
    # the coordinator's figures per stage, as /metrics shows them: every job through load
    # done, none failed there, nothing left waiting when the run is over
    assert load["failed"] == 0 and load["done"] == load["latency"]["count"] >= 1
    assert (load["busy"], load["queued"], load["items_out"]) == (0, 0, 0)
    assert health["stages"]["scale"]["failed"] >= 1  # the jobs its dying worker held


def test_a_stage_that_cannot_be_constructed_is_reported_at_once_not_restarted(tmp_path):
    stages = chain(Sink, colour="red")
    stages[1] = StageDef("sink", Sink, {"vec": ("load", "vec")}, (), arguments={"colour": "red"})
    limits = Limits(restart_backoff_max=600)
    executor = LocalExecutor(stages, output_root=tmp_path / "o", limits=limits)
    with structlog.testing.capture_logs() as logs, Serving(executor) as serving:
        health = executor.health()  # ready means settled: up, or failed and backing off
        sink = health["stages"]["sink"]
        assert (sink["state"], sink["live"]) == ("broken", 0)
        assert sink["reason"].startswith(
            "stage 'sink' is broken: it cannot start: failed to start: "
            "TypeError: Sink() takes no arguments; next try in "
        )
        (job_id, payload), *_ = make_jobs(tmp_path / "in", [1])
        result = serving.run(job_id, payload)
        assert not result.ok and result.stage == "sink"
        assert "TypeError: Sink() takes no arguments" in result.reason
        assert "Traceback" in result.details  # the constructor's, for the job record
    (failed,) = events(logs, "worker_failed_to_start")  # once: no restart loop
    assert (failed["log_level"], failed["stage"]) == ("error", "sink")
    assert failed["reason"] == "TypeError: Sink() takes no arguments"
    assert events(logs, "stage_broken")[0]["log_level"] == "error"


def test_an_allocation_beyond_the_memory_limit_fails_the_job_and_the_worker_serves_on(tmp_path):
    stages = chain(Hog, hog_on=5, mib=1024)
    stages[1] = StageDef(**{**stages[1].__dict__, "memory_limit": 64 << 20})
    executor = LocalExecutor(stages, output_root=tmp_path / "o")
    results = executor.run(make_jobs(tmp_path / "in", [1, 5, 2]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].stage == "scale"
    assert results[1].reason.startswith(
        "out of memory: stage 'scale' is limited to 64 MiB (requests.memory); MemoryError"
    ), results[1].reason
    assert "Traceback" in results[1].details
    assert results[2].outputs[("scale", "vec")][1] == {"memory_limit": 64 << 20}
    assert executor.health()["counters"]["worker_died"] == 0  # the same worker went on


def test_a_hanging_stage_is_cut_by_the_default_stage_timeout(tmp_path):
    executor = LocalExecutor(
        chain(Scale, sleep_on=2), output_root=tmp_path / "o", limits=Limits(stage_timeout=1)
    )
    results = executor.run(make_jobs(tmp_path / "in", [1, 2, 3]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == "stage 'scale' timed out after 1 s"
    assert executor.health()["counters"]["stage_timeouts"] == 1


def test_in_flight_says_which_stage_each_job_is_in(tmp_path):
    stages = chain(Slow, seconds=HANG)
    executor = LocalExecutor(stages, output_root=tmp_path / "o")
    (job_id, payload), *_ = make_jobs(tmp_path / "in", [1])
    with Serving(executor) as serving:
        assert executor.in_flight() == {}
        serving.feed.put(job_id, payload)
        serving.wait_health(lambda _: executor.in_flight() == {job_id: ["scale"]})
    # aborted (Serving's exit) with the job in its slow stage: no result came
    assert serving.results == {}


def test_build_executor_defaults_give_way_to_the_pipeline_own_settings(tmp_path):
    from dataflow.run import build_executor

    text = (ROOT / "pipelines/passthrough.yaml").read_text()
    text = text.replace(
        "  stage: operators.passthrough:Compare\n",
        "  stage: operators.passthrough:Compare\n  requests: {memory: 256}\n  timeout: 30\n",
    )
    plain = tmp_path / "plain.yaml"
    plain.write_text(text)
    own = tmp_path / "own.yaml"
    own.write_text(text.replace("name: passthrough\n", "name: passthrough\ntimeout: 900\n"))
    defaults = {"stage_timeout": 600, "job_timeout": 1800, "memory_limit": 4 << 30}
    _, executor = build_executor(plain, tmp_path / "out", **defaults)
    assert (executor.limits.stage_timeout, executor.limits.job_timeout) == (600, 1800)
    stages = executor.stages
    assert (stages["compare"].memory_limit, stages["compare"].memory_source) == (
        256 << 20,
        "requests.memory",
    )
    assert (stages["npy-to-array"].memory_limit, stages["npy-to-array"].memory_source) == (
        4 << 30,
        "worker-memory",
    )
    assert (stages["compare"].timeout, stages["npy-to-array"].timeout) == (30, None)
    _, executor = build_executor(own, tmp_path / "out", **defaults)
    assert executor.limits.job_timeout == 900  # the pipeline's timeout: wins
    _, executor = build_executor(own, tmp_path / "out")
    assert executor.limits.stage_timeout is None  # dataflow run: no default
    assert executor.stages["npy-to-array"].memory_limit is None


def test_a_worker_the_oom_killer_took_is_reported_as_out_of_memory(tmp_path, monkeypatch):
    # The kernel's OOM killer cannot be fired safely here: the worker's SIGKILL is real, the
    # cgroup's oom_kill count (read by dataflow.machine.oom_kills) is simulated as rising.
    import dataflow.execution.local as local

    kills = iter(range(100))
    monkeypatch.setattr(local, "oom_kills", lambda: next(kills))
    stages = chain(Scale, crash_on=2)
    stages[1] = StageDef(**{**stages[1].__dict__, "memory_limit": 512 << 20})
    executor = LocalExecutor(stages, output_root=tmp_path / "o")
    results = executor.run(make_jobs(tmp_path / "in", [2, 1]))
    assert [r.ok for r in results] == [False, True]
    assert results[0].reason == (
        "worker scale#0 died: out of memory: killed by the kernel's OOM killer (killed by "
        "signal 9 (SIGKILL)); stage 'scale' is limited to 512 MiB (requests.memory)"
    )
    assert executor.health()["counters"]["worker_oom"] == 1
