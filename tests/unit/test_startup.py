"""Start-up: not a stall, and its progress events in order (no clock: times are fed in)."""

from __future__ import annotations

from dataflow.execution.state import Core, Limits, Stalled, StartWorker, Value, linear_graph
from dataflow.progress import StartupProgress


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_workers_still_starting_are_not_a_stall():
    core = Core(linear_graph(["load", "smooth"]), Limits(stall_seconds=30))
    core.start(0.0)
    core.submit("j1", Value("payload"), 0.0)
    assert not of(core.tick(45.0), Stalled)  # what every first run printed: smooth#0 starting
    assert core.next_deadline() == 75.0  # the watchdog's next look, not a report
    core.worker_ready("load#0", 50.0)
    assert not of(core.tick(70.0), Stalled)
    core.worker_ready("smooth#0", 90.0)  # the last one up: the quiet period starts here
    assert not of(core.tick(119.0), Stalled)
    assert core.next_deadline() == 120.0
    (stalled,) = of(core.tick(121.0), Stalled)  # load busy for 31 s after start-up: a stall
    assert "worker load#0 busy with job 'j1'" in stalled.report
    assert "starting" not in stalled.report


def test_a_worker_restarting_is_not_a_stall_either_but_a_hung_job_still_is():
    core = Core(linear_graph(["a", "b"]), Limits(stall_seconds=30))
    core.start(0.0)
    core.worker_ready("a#0", 1.0)
    core.worker_ready("b#0", 1.0)
    core.submit("j1", Value("payload"), 2.0)
    core.submit("j2", Value("payload"), 2.0)
    core.job_done("a#0", "j1", {"out": Value("a.out")}, 3.0)  # j1 -> b, j2 -> a
    restart = core.worker_died("b#0", "killed by signal 9", 4.0)
    assert of(restart, StartWorker)
    assert not of(core.tick(60.0), Stalled)  # b#0 is starting again
    core.worker_ready("b#0", 61.0)
    (stalled,) = of(core.tick(92.0), Stalled)  # a#0 still busy with j2: that is stuck
    assert "worker a#0 busy with job 'j2'" in stalled.report


def events(progress, *facts):
    out = []
    for what, stage in facts:
        out += getattr(progress, f"worker_{what}")(stage)
    return [(e.name, e.stage, e.ready, e.total, e.failed) for e in out]


def test_progress_events_come_in_order_with_counts():
    progress = StartupProgress({"load": 1, "smooth": 2, "seg": 1})
    got = events(
        progress,
        ("starting", "load"), ("starting", "smooth"), ("starting", "smooth"),
        ("starting", "seg"), ("ready", "smooth"), ("ready", "load"), ("ready", "seg"),
        ("ready", "smooth"),
    )  # fmt: skip
    assert got == [
        ("stage_starting", "load", 0, 4, ()),
        ("stage_starting", "smooth", 0, 4, ()),  # once per stage, not per replica
        ("stage_starting", "seg", 0, 4, ()),
        ("stage_ready", "load", 2, 4, ()),  # smooth has 1 of 2 up: not ready yet
        ("stage_ready", "seg", 3, 4, ()),
        ("stage_ready", "smooth", 4, 4, ()),
        ("pipeline_ready", None, 4, 4, ()),
    ]
    assert progress.line() == "workers ready: 4/4"
    # after start-up, restarts are not start-up progress
    assert events(progress, ("starting", "load"), ("ready", "load")) == []


def test_a_stage_that_cannot_start_is_named_and_start_up_still_ends():
    progress = StartupProgress({"load": 1, "infer": 1})
    got = events(progress, ("starting", "load"), ("starting", "infer"), ("ready", "load"))
    assert progress.line() == "starting workers: 1/2 ready; starting infer"
    got += events(progress, ("failed", "infer"), ("starting", "infer"), ("failed", "infer"))
    assert got[-2:] == [
        ("stage_failed", "infer", 1, 2, ()),
        ("pipeline_ready", None, 1, 2, ("infer",)),
    ]
    assert progress.line() == "workers ready: 1/2; could not start: infer"


def test_the_status_line_names_the_stages_still_starting():
    progress = StartupProgress(dict.fromkeys("abcdef", 1))
    for stage in "abcdef":
        progress.worker_starting(stage)
    progress.worker_ready("a")
    assert progress.line() == "starting workers: 1/6 ready; starting b, c, d, e (+1)"
