"""A serving executor (``LocalExecutor.serve``): warm workers take jobs as they arrive from
other threads, until the feed is closed; the jobs in flight finish first."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from deadlines import HANG
from engine_stages import Load, Scale, make_jobs

from dataflow.execution.local import JobFeed, LocalExecutor, StageDef

pytestmark = pytest.mark.integration

CHAIN = [
    StageDef("load", Load, {"payload": None}, ("vec",)),
    StageDef("scale", Scale, {"vec": ("load", "vec")}, ("vec",), arguments={"factor": 2}),
]


def test_jobs_put_while_serving_run_on_the_same_warm_workers(tmp_path):
    jobs = make_jobs(tmp_path / "in", [3, 1, 4, 1, 5])
    feed = JobFeed()
    results, ready = [], threading.Event()
    executor = LocalExecutor(CHAIN, output_root=tmp_path / "out")

    def record(result):
        array, _ = result.outputs[("scale", "vec")]
        results.append((result.job, result.ok, array.sum()))

    def producer():
        ready.wait(HANG)
        for job_id, payload in jobs:
            feed.put(job_id, payload)
            time.sleep(0.05)  # jobs arrive over time, not as one batch
        while len(results) < len(jobs):
            time.sleep(0.01)
        feed.close()

    thread = threading.Thread(target=producer)
    thread.start()
    executor.serve(feed, record, on_ready=ready.set)
    thread.join()
    assert results == [(j, True, 2 * n) for (j, _), n in zip(jobs, [3, 1, 4, 1, 5])]
    assert executor.stage_jobs == {"load": 5, "scale": 5}
    assert executor.store is None  # stopped with the serve loop
    with pytest.raises(RuntimeError, match="stopping"):
        feed.put("late", None)


def test_close_with_jobs_in_flight_finishes_them_first(tmp_path):
    jobs = make_jobs(tmp_path / "in", [2, 2, 2])
    feed = JobFeed()
    for job_id, payload in jobs:
        feed.put(job_id, payload)
    feed.close()  # before the executor even started: the queued jobs still run
    done = []
    LocalExecutor(CHAIN, output_root=tmp_path / "out").serve(
        feed, lambda r: done.append((r.job, r.ok, np.asarray(r.outputs[("scale", "vec")][0])))
    )
    assert [(j, ok) for j, ok, _ in done] == [(j, True) for j, _ in jobs]
