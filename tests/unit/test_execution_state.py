"""The executor's pure core on hand-built graphs: no processes, no clock, no sleeps."""

import pytest

from dataflow.execution.state import (
    Core,
    Discard,
    Dispatch,
    Graph,
    JobFailed,
    JobSucceeded,
    KillWorker,
    Limits,
    StageBroken,
    StageNode,
    StageRecovered,
    Stalled,
    StartWorker,
    Value,
    linear_graph,
)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


class Harness:
    """Drives a Core like the process layer would, with a fake clock."""

    def __init__(self, graph, ordered=True, **limits):
        self.core = Core(graph, Limits(**limits), ordered=ordered)
        self.now = 0.0
        self.log = []
        self.record(self.core.start(self.now))
        for wid in list(self.core.workers):
            self.record(self.core.worker_ready(wid, self.now))

    def record(self, actions):
        self.log += actions
        return actions

    def submit(self, *jobs):
        for job in jobs:
            self.record(self.core.submit(job, Value(f"payload-{job}"), self.now))

    def running(self):
        return {w.id: w.job.id for w in self.core.workers.values() if w.state == "busy"}

    def finish(self, worker, nbytes=10):
        job = self.core.workers[worker].job.id
        stage = self.core.workers[worker].stage
        outputs = {
            p: Value(f"{stage}.{p}@{job}", nbytes) for p in self.core.graph.stages[stage].outputs
        }
        return self.record(self.core.job_done(worker, job, outputs, self.now))

    def results(self):
        return [
            (a.job, type(a).__name__) for a in self.log if isinstance(a, (JobSucceeded, JobFailed))
        ]


def test_chain_runs_a_job_through_every_stage_and_frees_intermediates():
    h = Harness(linear_graph(["a", "b", "c"]))
    h.submit("j1")
    (d,) = of(h.log, Dispatch)
    assert (d.worker, d.job, d.inputs) == ("a#0", "j1", {"in": Value("payload-j1")})
    h.finish("a#0")
    assert h.running() == {"b#0": "j1"}
    acts = h.finish("b#0")
    assert of(acts, Discard) == [Discard((Value("a.out@j1", 10),))]  # b consumed a's output
    acts = h.finish("c#0")
    (done,) = of(acts, JobSucceeded)
    assert done.outputs == {("c", "out"): Value("c.out@j1", 10)}
    assert of(acts, Discard) == [Discard((Value("b.out@j1", 10),))]
    assert h.core.idle()


def test_stages_pipeline_many_jobs_at_once():
    h = Harness(linear_graph(["a", "b"]))
    h.submit("j1", "j2", "j3")
    h.finish("a#0")
    assert h.running() == {"a#0": "j2", "b#0": "j1"}  # both stages busy: pipelining


def test_results_come_out_in_submission_order_across_replicas():
    h = Harness(linear_graph(["a"], replicas=2))
    h.submit("j1", "j2")
    assert h.running() == {"a#0": "j1", "a#1": "j2"}
    h.finish("a#1")  # j2 finishes first...
    assert h.results() == []  # ...but waits for j1
    h.finish("a#0")
    assert h.results() == [("j1", "JobSucceeded"), ("j2", "JobSucceeded")]


def diamond():
    return Graph(
        {
            "read": StageNode("read", {"in": None}, ("image",)),
            "seg": StageNode("seg", {"image": ("read", "image")}, ("mask",)),
            "stats": StageNode("stats", {"image": ("read", "image")}, ("numbers",)),
            "report": StageNode(
                "report", {"mask": ("seg", "mask"), "numbers": ("stats", "numbers")}, ("pdf",)
            ),
        }
    )


def test_fan_out_and_fan_in_join_per_job():
    h = Harness(diamond())
    h.submit("j1")
    h.finish("read#0")
    assert h.running() == {"seg#0": "j1", "stats#0": "j1"}  # fan-out
    acts = h.finish("seg#0")
    assert not of(acts, Dispatch)  # report still waits for stats
    assert not of(acts, Discard)  # read.image is still needed by stats
    acts = h.finish("stats#0")
    (d,) = of(acts, Dispatch)
    assert d.stage == "report" and set(d.inputs) == {"mask", "numbers"}
    assert Discard((Value("read.image@j1", 10),)) in acts


def test_backpressure_holds_a_fast_producer_behind_a_slow_consumer():
    h = Harness(linear_graph(["fast", "slow"]), edge_items=2, max_jobs=10)
    h.submit(*[f"j{i}" for i in range(6)])
    h.finish("fast#0")  # j0 -> slow starts on it
    h.finish("fast#0")  # j1 waits on the edge
    # The edge holds j0 (in use by slow) and j1: fast may not start j2.
    assert "fast#0" not in h.running()
    assert "edge fast.out holds 2 item(s)" in h.core._blocked_by("fast")
    h.finish("slow#0")  # frees j0, slow takes j1, fast resumes with j2
    assert h.running() == {"fast#0": "j2", "slow#0": "j1"}


def test_health_shows_busy_workers_queued_jobs_and_outputs_waiting_in_the_store():
    h = Harness(linear_graph(["fast", "slow"]), edge_items=2, max_jobs=10)
    h.submit(*[f"j{i}" for i in range(6)])
    h.finish("fast#0", nbytes=100)  # j0 -> slow starts on it
    h.finish("fast#0", nbytes=100)  # j1 waits on the edge; fast is held back
    fast, slow = (h.core.health(h.now)[name] for name in ("fast", "slow"))
    assert (fast["busy"], fast["queued"], fast["items_out"], fast["bytes_out"]) == (0, 4, 2, 200)
    assert (slow["busy"], slow["queued"]) == (1, 1)
    h.finish("slow#0")  # j0's value is freed; slow takes j1, fast resumes with j2
    fast = h.core.health(h.now)["fast"]
    assert (fast["busy"], fast["queued"], fast["items_out"]) == (1, 3, 1)


def test_byte_budget_per_edge():
    h = Harness(linear_graph(["fast", "slow"]), edge_items=100, edge_bytes=25)
    h.submit("j0", "j1", "j2", "j3")
    h.finish("fast#0", nbytes=20)
    h.finish("fast#0", nbytes=20)  # 40 bytes on the edge > 25
    assert "fast#0" not in h.running()


def test_max_jobs_in_flight():
    h = Harness(linear_graph(["a"]), max_jobs=2)
    h.submit("j1", "j2", "j3")
    assert set(h.core.jobs) == {"j1", "j2"} and [j.id for j in h.core.backlog] == ["j3"]
    h.finish("a#0")
    assert "j3" in h.core.jobs


def test_a_failing_job_fails_alone_and_the_stage_goes_on():
    h = Harness(linear_graph(["a", "b"]))
    h.submit("j1", "j2")
    h.finish("a#0")  # j1 -> b; a takes j2
    acts = h.record(h.core.job_failed("b#0", "j1", "ValueError: bad slice", "Traceback...", h.now))
    (failed,) = of(acts, JobFailed)
    assert (failed.job, failed.stage, failed.reason) == ("j1", "b", "ValueError: bad slice")
    h.finish("a#0")
    h.finish("b#0")
    assert h.results() == [("j1", "JobFailed"), ("j2", "JobSucceeded")]


def test_a_failure_discards_the_job_values_and_stops_its_other_branches():
    h = Harness(diamond())
    h.submit("j1")
    h.finish("read#0")
    acts = h.record(h.core.job_failed("seg#0", "j1", "boom", "", h.now))
    assert KillWorker("stats#0", "job 'j1' failed: boom") in acts
    assert StartWorker("stats#0", "stats", 0) in acts
    assert Discard((Value("read.image@j1", 10),)) in acts


def test_a_dead_worker_fails_its_job_and_is_restarted():
    h = Harness(linear_graph(["a"]))
    h.submit("j1", "j2")
    acts = h.record(h.core.worker_died("a#0", "killed by signal 9 (SIGKILL)", h.now))
    assert of(acts, JobFailed)[0].reason == "worker a#0 died: killed by signal 9 (SIGKILL)"
    assert of(acts, StartWorker) == [StartWorker("a#0", "a", 0)]
    h.record(h.core.worker_ready("a#0", h.now))
    assert h.running() == {"a#0": "j2"}


def test_a_worker_that_keeps_dying_breaks_its_stage_and_fails_its_jobs():
    h = Harness(linear_graph(["a", "b"]), max_restarts=2)
    h.submit("j1")
    for _ in range(3):
        h.record(h.core.worker_died("b#0", "exit code 1 in prepare", h.now))
    assert "b" in h.core.broken
    assert KillWorker("a#0", "job 'j1' failed: " + h.core.broken["b"]) in h.log  # j1 stops
    h.submit("j2")  # fails at once: its pipeline cannot finish
    fails = [a for a in h.log if isinstance(a, JobFailed)]
    assert [f.job for f in fails] == ["j1", "j2"]
    assert "stage 'b' is broken" in fails[-1].reason


def test_stage_timeout_kills_the_worker_and_fails_the_job():
    graph = Graph({"slow": StageNode("slow", {"in": None}, ("out",), timeout=5)})
    h = Harness(graph)
    h.submit("j1", "j2")
    h.now = 4.9
    assert not of(h.record(h.core.tick(h.now)), KillWorker)
    h.now = 5.0
    acts = h.record(h.core.tick(h.now))
    assert KillWorker("slow#0", "stage 'slow' timed out after 5 s") in acts
    assert of(acts, JobFailed)[0].reason == "stage 'slow' timed out after 5 s"
    assert h.core.next_deadline() is not None


def test_job_timeout_and_cancellation():
    h = Harness(linear_graph(["a"]), job_timeout=60)
    h.submit("j1", "j2")
    h.record(h.core.cancel("j2", "cancelled by user", h.now))
    h.now = 61
    h.record(h.core.tick(h.now))
    assert [(a.job, a.reason) for a in of(h.log, JobFailed)] == [
        ("j1", "job timed out after 60 s"),
        ("j2", "cancelled by user"),
    ]


def test_watchdog_names_what_is_stuck():
    h = Harness(linear_graph(["a", "b"]), stall_seconds=30)
    h.submit("j1")
    h.now = 31
    (stalled,) = of(h.record(h.core.tick(h.now)), Stalled)
    assert "worker a#0 busy with job 'j1' for 31 s" in stalled.report
    assert not of(h.core.tick(h.now + 1), Stalled)  # not every tick


def test_idle_time_before_a_job_arrives_is_not_a_stall():
    h = Harness(linear_graph(["a", "b"]), stall_seconds=30)
    h.now = 500  # a service idle for minutes, then a study arrives
    h.submit("j1")
    h.now = 510
    assert not of(h.core.tick(h.now), Stalled)
    h.now = 531
    assert of(h.core.tick(h.now), Stalled)  # 31 s after it arrived: it is stuck


def test_reporting_a_job_a_worker_is_not_running_is_a_bug():
    h = Harness(linear_graph(["a"]))
    with pytest.raises(ValueError, match="was not running"):
        h.core.job_done("a#0", "ghost", {}, 0)


def test_the_next_hop_is_dispatched_before_consumed_values_are_freed():
    h = Harness(linear_graph(["a", "b", "c"]))
    h.submit("j1")
    h.finish("a#0")
    acts = h.finish("b#0")
    kinds = [type(a).__name__ for a in acts]
    assert kinds.index("Dispatch") < kinds.index("Discard")  # a store delete costs a round trip


def test_a_job_id_is_refused_twice_even_after_it_finished():
    h = Harness(linear_graph(["a"]))
    h.submit("j1")
    h.core.forget("j1")  # in flight: still refused
    with pytest.raises(ValueError, match="already submitted"):
        h.submit("j1")
    h.finish("a#0")
    with pytest.raises(ValueError, match="already submitted"):
        h.submit("j1")
    h.core.forget("j1")  # retired, and the caller says it may run again (a service's retry)
    h.submit("j1")


@pytest.mark.parametrize("ordered", [True, False])
def test_results_in_submission_order_or_as_they_are_known(ordered):
    h = Harness(linear_graph(["a"], replicas=2), ordered=ordered)
    h.submit("slow", "fast")
    assert h.running() == {"a#0": "slow", "a#1": "fast"}
    h.finish("a#1")
    assert h.results() == ([] if ordered else [("fast", "JobSucceeded")])
    h.finish("a#0")
    expected = ["slow", "fast"] if ordered else ["fast", "slow"]
    assert [job for job, _ in h.results()] == expected
    assert h.core.idle()


# ------------------------------------------------------------------ self-healing


def fails(h):
    return [(a.job, a.reason) for a in of(h.log, JobFailed)]


def test_deaths_in_a_row_back_off_break_the_stage_and_it_recovers_by_itself():
    h = Harness(linear_graph(["a"]), max_restarts=3, restart_backoff=1, restart_backoff_max=3)
    restarts = []
    for n in range(4):  # four poison jobs, each killing the worker
        h.submit(f"p{n}")
        acts = h.record(h.core.worker_died("a#0", "killed by signal 9 (SIGKILL)", h.now))
        restart_at = h.core.workers["a#0"].restart_at
        restarts.append(None if restart_at is None else restart_at - h.now)
        if of(acts, StartWorker):  # restarted at once: ready again
            h.record(h.core.worker_ready("a#0", h.now))
        else:
            h.now = restart_at
            assert of(h.record(h.core.tick(h.now)), StartWorker) == [StartWorker("a#0", "a", 0)]
            if n < 3:
                h.record(h.core.worker_ready("a#0", h.now))
    assert restarts == [None, 1, 2, 3]  # at once, then 1 s, doubling, capped at 3 s
    (broken,) = of(h.log, StageBroken)
    assert broken.stage == "a" and "died 4 times in a row" in broken.reason
    assert broken.retry_in == 3
    assert h.core.health(h.now)["a"]["state"] == "broken"
    h.submit("early")  # while broken: refused at once, with the reason
    assert fails(h)[-1] == ("early", h.core.broken["a"])
    h.record(h.core.worker_ready("a#0", h.now))  # the restart came up: healed
    assert of(h.log, StageRecovered) == [StageRecovered("a")]
    h.submit("good")
    h.finish("a#0")
    assert ("good", "JobSucceeded") in h.results()
    assert h.core.counters == {
        "worker_died": 4, "stage_broken": 1, "stage_recovered": 1,
        "stage_timeouts": 0, "job_timeouts": 0,
    }  # fmt: skip
    assert h.core.health(h.now)["a"] == {
        "state": "ok",
        "reason": None,
        "workers": 1,
        "live": 1,
        "restarts": 4,
        "busy": 0,
        "queued": 0,
        "items_out": 0,
        "bytes_out": 0,
    }


def test_a_worker_that_stays_up_has_its_deaths_forgotten():
    h = Harness(linear_graph(["a"]), max_restarts=3, restart_backoff=1, healthy_after=60)
    for _ in range(2):
        h.record(h.core.worker_died("a#0", "killed", h.now))
        if h.core.workers["a#0"].restart_at is not None:
            h.now = h.core.workers["a#0"].restart_at
            h.record(h.core.tick(h.now))
        h.record(h.core.worker_ready("a#0", h.now))
    assert h.core.workers["a#0"].failures_in_a_row == 2
    assert h.core.next_deadline() == h.now + 60  # the core asks to be woken to forgive
    h.now += 60
    h.record(h.core.tick(h.now))
    assert h.core.workers["a#0"].failures_in_a_row == 0
    acts = h.record(h.core.worker_died("a#0", "killed", h.now))
    assert of(acts, StartWorker)  # a first death again: restarted at once


def test_a_stage_that_cannot_start_is_broken_at_once_and_tried_again_slowly():
    h = Harness(linear_graph(["a", "b"]), restart_backoff_max=60)
    h.record(h.core.worker_died("b#0", "killed", h.now))  # restarted at once: starting...
    h.submit("j1")
    reason = "failed to start: TypeError: Sink() takes no arguments"
    acts = h.record(h.core.worker_died("b#0", reason, h.now, fatal=True))  # ...and cannot
    assert StartWorker("b#0", "b", 0) not in acts  # no restart loop
    (broken,) = of(acts, StageBroken)
    assert broken.reason == (
        "stage 'b' is broken: it cannot start: failed to start: "
        "TypeError: Sink() takes no arguments"
    )
    assert fails(h) == [("j1", broken.reason)]
    health = h.core.health(h.now)["b"]
    assert health["state"] == "broken" and "Sink() takes no arguments" in health["reason"]
    assert h.core.next_deadline() == h.now + 60
    # two deaths really happened: not counted as more to make the stage broken (issue 13)
    assert h.core.workers["b#0"].failures_in_a_row == 2
    h.now += 60
    assert of(h.record(h.core.tick(h.now)), StartWorker) == [StartWorker("b#0", "b", 0)]
    h.record(h.core.worker_ready("b#0", h.now))  # fixed (a module replaced): it recovers
    assert h.core.health(h.now)["b"]["state"] == "ok"


def test_one_replica_down_degrades_the_stage_and_the_other_takes_the_jobs():
    h = Harness(linear_graph(["a"], replicas=2), max_restarts=0, restart_backoff_max=60)
    h.record(h.core.worker_died("a#1", "killed", h.now))  # restarted...
    h.record(h.core.worker_died("a#1", "failed to start: boom", h.now, fatal=True))  # ...fails
    assert not of(h.log, StageBroken)
    health = h.core.health(h.now)["a"]
    assert health["state"] == "degraded" and health["live"] == 1
    assert health["reason"] == "worker a#1 died: failed to start: boom; next try in 60 s"
    h.submit("j1")
    assert h.running() == {"a#0": "j1"}


def test_first_start_is_starting_not_degraded():
    core = Core(linear_graph(["a"]), Limits())
    core.start(0.0)
    assert core.health(0.0)["a"]["state"] == "starting"
    core.worker_ready("a#0", 0.0)
    assert core.health(0.0)["a"]["state"] == "ok"


def test_a_default_stage_timeout_applies_to_stages_without_their_own():
    graph = Graph(
        {
            "a": StageNode("a", {"in": None}, ("out",)),
            "b": StageNode("b", {"in": ("a", "out")}, ("out",), timeout=100),
        }
    )
    h = Harness(graph, stage_timeout=5)
    h.submit("j1", "j2")
    assert of(h.log, Dispatch)[0].timeout == 5
    h.now = 5
    h.record(h.core.tick(h.now))
    assert fails(h) == [("j1", "stage 'a' timed out after 5 s")]
    h.record(h.core.worker_ready("a#0", h.now))  # restarted after the kill
    h.finish("a#0")  # j2 goes on to b, which keeps its own 100 s
    assert of(h.log, Dispatch)[-1].stage == "b" and of(h.log, Dispatch)[-1].timeout == 100
    assert h.core.counters["stage_timeouts"] == 1
