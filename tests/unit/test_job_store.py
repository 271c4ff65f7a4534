"""The job records' transitions that retries rely on: a queued job is taken once, a failed job
goes back to queued only while it is failed and not reaped, and retention does not reap a job
retried meanwhile."""

from __future__ import annotations

import sqlite3

import pytest

from dataflow.service.jobs import JobStore, RetryRefused


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    yield store
    store.close()


def failed_job(store, tmp_path, key="k") -> str:
    payload = tmp_path / key
    payload.mkdir()
    job, _ = store.create("p", payload, key=key)
    assert store.started(job.id)
    store.finished(job.id, False, stage="s", error="boom\ntraceback")
    return job.id


def test_a_queued_job_is_taken_once(store, tmp_path):
    job, _ = store.create("p", tmp_path, key="k")
    assert store.started(job.id)  # the submitting thread
    assert not store.started(job.id)  # the watcher, a moment late
    assert store.get(job.id).attempts == 1
    assert store.started(job.id, was=("queued", "running"))  # a resume takes running ones
    assert store.get(job.id).attempts == 2


def test_unfinished_in_the_states_asked_oldest_first(store, tmp_path):
    first, _ = store.create("p", tmp_path, key="a")
    second, _ = store.create("p", tmp_path, key="b")
    store.started(first.id)
    assert [j.id for j in store.unfinished()] == [first.id, second.id]
    assert [j.id for j in store.unfinished(("queued",))] == [second.id]


def test_retry_queues_a_failed_job_again_keeping_its_attempts_and_error(store, tmp_path):
    job_id = failed_job(store, tmp_path)
    job = store.retry(job_id)
    assert (job.state, job.stage, job.error, job.started, job.finished, job.seconds) == (
        "queued", None, None, None, None, None,
    )  # fmt: skip
    assert job.attempts == 1 and job.last_error == "s: boom\ntraceback"
    with pytest.raises(RetryRefused, match=f"job {job_id} is queued: only a failed job"):
        store.retry(job_id)
    assert store.started(job_id) and store.get(job_id).attempts == 2


def test_retention_does_not_reap_a_job_retried_meanwhile(store, tmp_path):
    job_id = failed_job(store, tmp_path)
    due = store.due_for_reaping(float("inf"), {"failed": 0})
    assert [job.id for job in due] == [job_id]
    store.retry(job_id)  # from another process, between the look and the reaping
    assert not store.mark_reaped(job_id, "failed")
    assert store.get(job_id).reaped is None and store.payload_in_use(str(tmp_path / "k"))


def test_a_reaped_job_is_not_retried(store, tmp_path):
    job_id = failed_job(store, tmp_path)
    assert store.mark_reaped(job_id, "failed")
    assert not store.mark_reaped(job_id, "failed")  # once
    with pytest.raises(RetryRefused, match="retention removed its outputs at .*re-send"):
        store.retry(job_id)
    assert store.get(job_id).state == "failed"


def test_a_jobs_db_from_before_retries_opens(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, key TEXT UNIQUE, pipeline TEXT NOT NULL,"
        " payload TEXT NOT NULL, source TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,"
        " created REAL NOT NULL, started REAL, finished REAL,"
        " attempts INTEGER NOT NULL DEFAULT 0, stage TEXT, error TEXT, reaped REAL);"
        "INSERT INTO jobs (id, pipeline, payload, state, created, error, reaped)"
        f" VALUES ('j', 'p', '{tmp_path}', 'failed', 1, 'boom', 5);"
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db")
    job = store.get("j")
    assert (job.error, job.reaped, job.last_error) == ("boom", 5, None)
    store.close()


def test_a_jobs_db_from_before_details_and_history_opens(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, key TEXT UNIQUE, pipeline TEXT NOT NULL,"
        " payload TEXT NOT NULL, source TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,"
        " created REAL NOT NULL, started REAL, finished REAL,"
        " attempts INTEGER NOT NULL DEFAULT 0, stage TEXT, error TEXT, reaped REAL,"
        " last_error TEXT);"
        "INSERT INTO jobs (id, pipeline, payload, state, created) VALUES ('j', 'p', 'x',"
        " 'running', 1);"
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db")
    job = store.get("j")
    assert (job.details, job.history) == (None, [])
    store.finished("j", False, stage="s", error="boom", details="Traceback ...")
    assert store.get("j").details == "Traceback ..."
    store.close()


def test_history_counts_attempts_cut_short_since_the_last_retry(store, tmp_path):
    job_id = failed_job(store, tmp_path)
    store.note(job_id, "cut_short", "cut short by shutdown at stage s", stage="s")
    assert len(store.interrupted(store.get(job_id))) == 1
    store.retry(job_id)  # by hand: the count starts again
    job = store.get(job_id)
    assert [e["event"] for e in job.history] == ["cut_short", "retried"]
    assert job.history[1]["what"] == "retried by hand after: s: boom\ntraceback"
    assert store.interrupted(job) == []
    store.started(job_id)
    store.note(job_id, "service_died", "service died while running")
    entry = store.interrupted(store.get(job_id))[0]
    assert (entry["attempt"], entry["event"]) == (2, "service_died")
    assert store.fail(job_id, "not resumed", was=("running",))
    assert not store.fail(job_id, "again", was=("running",))
    assert store.get(job_id).error == "not resumed"


def test_deliveries_are_found_by_task_and_destination(store, tmp_path):
    job, _ = store.create("p", tmp_path, key="k")
    store.add_export("task-1", job.id, "ClaraSCU", tmp_path)
    store.delivery("task-1", "PACS", "pending")
    store.delivery("task-1-PACS", "PACS", "dead", "deadline passed")  # the outbox's own id
    store.delivery("task-1", "WEB", "sent")
    store.delivery("unknown", "PACS", "sent")  # no such export: kept, with no job
    rows = store.deliveries(job.id)
    assert [(r["destination"], r["state"], r["detail"]) for r in rows] == [
        ("PACS", "dead", "deadline passed"),
        ("WEB", "sent", ""),
    ]
    assert store.delivery_counts() == {("PACS", "dead"): 1, ("WEB", "sent"): 1,
                                       ("PACS", "sent"): 1}  # fmt: skip
    assert store.pipeline_counts() == {("p", "queued"): 1}
