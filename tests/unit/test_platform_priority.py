"""Clara's job priorities in the executor's pure core: IMMEDIATE before any other job, HIGHER,
NORMAL and LOWER sharing admissions 4:2:1 so that none starves; no processes, no clock."""

from __future__ import annotations

from dataflow.execution.state import Core, Dispatch, Limits, Value, linear_graph


def order_of(jobs: list[tuple[str, int]], stages=("a",), max_jobs=1, first=1) -> list[str]:
    """Submit ``first`` jobs, then the rest while those hold the pipeline; finish every
    dispatch in turn: the order in which the first stage got the jobs."""
    core = Core(linear_graph(list(stages)), Limits(max_jobs=max_jobs), ordered=False)
    actions = core.start(0.0)
    for wid in list(core.workers):
        actions += core.worker_ready(wid, 0.0)
    for job, priority in jobs:
        actions += core.submit(job, Value(job), 0.0, priority)
    seen: list[str] = []
    pending = [a for a in actions if isinstance(a, Dispatch)]
    while pending:
        dispatch = pending.pop(0)
        if dispatch.stage == stages[0]:
            seen.append(dispatch.job)
        outputs = {
            p: Value(f"{dispatch.job}.{p}") for p in core.graph.stages[dispatch.stage].outputs
        }
        done = core.job_done(dispatch.worker, dispatch.job, outputs, 0.0)
        pending += [a for a in done if isinstance(a, Dispatch)]
    assert core.idle()
    return seen


def test_immediate_jobs_are_admitted_before_any_other():
    jobs = [("n1", 2), ("l1", 1), ("h1", 3), ("i1", 4), ("n2", 2), ("i2", 4)]
    seen = order_of(jobs)
    assert seen[0] == "n1"  # it was running before the others came
    assert seen[1:3] == ["i1", "i2"]


def test_higher_normal_lower_share_4_2_1_and_none_starves():
    jobs = [(f"h{i}", 3) for i in range(8)] + [(f"n{i}", 2) for i in range(4)]
    jobs += [(f"l{i}", 1) for i in range(2)]
    seen = order_of([("first", 2), *jobs])[1:]
    first_round = seen[:7]
    assert sorted(job[0] for job in first_round) == sorted("hhhhnnl")
    assert seen.index("l0") < 7 and seen.index("l1") < 14  # a LOWER job in every round
    assert sorted(seen) == sorted(job for job, _ in jobs)


def test_one_class_keeps_submission_order_and_unknown_priorities_are_normal():
    jobs = [("a", 2), ("b", 0), ("c", 2), ("d", 99)]
    assert order_of(jobs) == ["a", "b", "c", "d"]


def test_an_immediate_job_overtakes_others_at_every_stage():
    jobs = [("n1", 2), ("n2", 2), ("n3", 2), ("i1", 4)]
    core_order = order_of(jobs, stages=("a", "b"), max_jobs=8)
    assert core_order.index("i1") < core_order.index("n3")


def test_a_job_cancelled_while_waiting_is_never_admitted_and_the_rest_keep_their_order():
    core = Core(linear_graph(["a"]), Limits(max_jobs=1), ordered=False)
    actions = core.start(0.0)
    for wid in list(core.workers):
        actions += core.worker_ready(wid, 0.0)
    for job, priority in [("n1", 2), ("h1", 3), ("n2", 2), ("i1", 4), ("n3", 2)]:
        actions += core.submit(job, Value(job), 0.0, priority)
    assert [j.id for j in core.backlog] == ["h1", "n2", "i1", "n3"]  # submission order
    failed = core.cancel("i1", "cancelled by user", 0.0) + core.cancel("n2", "gone", 0.0)
    assert {a.job for a in failed if type(a).__name__ == "JobFailed"} == {"i1", "n2"}
    assert [j.id for j in core.backlog] == ["h1", "n3"]
    seen, pending = [], [a for a in actions if isinstance(a, Dispatch)]
    while pending:
        dispatch = pending.pop(0)
        seen.append(dispatch.job)
        pending += [
            a
            for a in core.job_done(dispatch.worker, dispatch.job, {}, 0.0)
            if isinstance(a, Dispatch)
        ]
    assert seen == ["n1", "h1", "n3"]
    assert len(core.backlog) == 0
