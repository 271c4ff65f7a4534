"""The service core with real warm pipelines: submitted jobs run and are recorded, the same
key gives the same job, and a restart runs what a crash left queued or running."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deadlines import HANG, wait_until

from dataflow.service import JobStore, Service, ServiceError, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "pipelines" / "samples" / "volumes"


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "service.yaml"
    path.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
    )
    return path


def wait_for(predicate, timeout=HANG):
    wait_until(predicate, "condition met", timeout, poll=0.05)


def test_jobs_run_on_warm_pipelines_and_are_recorded(config_path, tmp_path):
    service = Service(load_config(config_path))
    service.start()
    try:
        first = service.submit("passthrough", SAMPLES / "study-a", source={"called_ae": "A"},
                               key="group-1")  # fmt: skip
        again = service.submit("passthrough", SAMPLES / "study-a", source={}, key="group-1")
        assert again.id == first.id
        second = service.submit("passthrough", SAMPLES / "study-b", source={}, key="group-2")
        wait_for(lambda: service.jobs.counts().get("succeeded") == 2)
        with pytest.raises(ServiceError, match="no pipeline 'nope'"):
            service.submit("nope", SAMPLES / "study-a", source={}, key=None)
    finally:
        service.stop()
    store = JobStore(tmp_path / "state" / "jobs.db")
    records = {job.id: job for job in store.list()}
    assert records[first.id].state == "succeeded" and records[first.id].source == {"called_ae": "A"}
    assert records[second.id].attempts == 1
    report = tmp_path / "state" / "jobs" / first.id / "compare" / "report" / "comparison.json"
    assert report.is_file()
    store.close()


def test_a_restart_runs_jobs_left_queued_or_running(config_path, tmp_path):
    store = JobStore(tmp_path / "state" / "jobs.db")
    store.create("passthrough", SAMPLES / "study-a", key="q")
    running, _ = store.create("passthrough", SAMPLES / "study-b", key="r")
    store.started(running.id)  # the service died while it ran
    store.close()
    service = Service(load_config(config_path))
    service.start()
    try:
        wait_for(lambda: service.jobs.counts().get("succeeded") == 2)
        assert service.jobs.get(running.id).attempts == 2
    finally:
        service.stop()


def test_dataflow_serve_stops_cleanly_on_sigterm_and_jobs_lists_records(config_path, tmp_path):
    store = JobStore(tmp_path / "state" / "jobs.db")
    job, _ = store.create("passthrough", SAMPLES / "study-a", key="k")
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflow.cli", "serve", str(config_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def done():
            out = subprocess.run(
                [sys.executable, "-m", "dataflow.cli", "jobs", str(config_path), "--json"],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            return '"state": "succeeded"' in out.stdout

        wait_for(done)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, output
    assert "service_stopped" in output
    listing = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "jobs", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert job.id in listing.stdout and "succeeded" in listing.stdout
    assert shutil.which("true")  # nothing else left running: the leak check covers stores


def test_retention_removes_outputs_of_finished_jobs_never_unhanded_results(tmp_path):
    """A succeeded job past its retention loses its outputs (the record stays, with when);
    one whose registered result was not handed over yet keeps them; a failed job is kept
    longer. The payload is released to its connector once no job needs it (none here: the
    jobs were submitted directly, so nothing is asked of a connector)."""
    path = tmp_path / "service.yaml"
    path.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
        "retention: {succeeded: 1h, failed: 2h, interval: 1h}\n"
    )
    service = Service(load_config(path))
    service.start()
    try:
        done = service.submit("passthrough", SAMPLES / "study-a", source={}, key="a")
        waiting = service.submit("passthrough", SAMPLES / "study-b", source={}, key="b")
        wait_for(lambda: service.jobs.counts().get("succeeded") == 2)
        outputs = tmp_path / "state" / "jobs"
        task = outputs / waiting.id / "register"
        task.mkdir(parents=True)
        service.jobs.add_export("task-1", waiting.id, "ClaraSCU", task)  # not handed yet
        failed, _ = service.jobs.create("passthrough", SAMPLES / "study-c", key="c")
        service.jobs.finished(failed.id, False, error="boom")
        (outputs / failed.id).mkdir()
        now = time.time()
        assert service.reap(now) == 0  # nothing is an hour old
        assert service.reap(now + 3601) == 1
        assert not (outputs / done.id).exists() and (outputs / waiting.id).is_dir()
        assert service.jobs.get(done.id).reaped is not None
        assert service.jobs.get(done.id).state == "succeeded"  # the record stays
        service.jobs.export_state("task-1", "handed")
        assert service.reap(now + 3601) == 1 and not (outputs / waiting.id).exists()
        assert (outputs / failed.id).is_dir()  # failed: kept 2 h
        assert service.reap(now + 7201) == 1 and not (outputs / failed.id).exists()
        assert service.reap(now + 99999) == 0  # each job once
        assert (SAMPLES / "study-a").is_dir()  # a payload nobody released stays
    finally:
        service.stop()


def test_a_jobs_db_from_before_retention_opens(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, key TEXT UNIQUE, pipeline TEXT NOT NULL,"
        " payload TEXT NOT NULL, source TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,"
        " created REAL NOT NULL, started REAL, finished REAL,"
        " attempts INTEGER NOT NULL DEFAULT 0, stage TEXT, error TEXT);"
        "INSERT INTO jobs (id, pipeline, payload, state, created)"
        " VALUES ('j', 'p', 'x', 'queued', 1);"
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db")
    assert store.get("j").reaped is None and store.unfinished()[0].id == "j"
    store.close()


def test_a_failed_job_retried_through_the_cli_runs_again_in_the_running_service(
    config_path, tmp_path
):
    """A study whose folder was not there yet fails; once it is, `dataflow jobs --retry`
    (another process) queues the job again and the running service picks it up by itself:
    the same job id, its attempts counted, what it failed with kept in last_error."""
    from cli import dataflow

    payload = tmp_path / "late-study"
    service = Service(load_config(config_path))
    service.start()
    try:
        job = service.submit("passthrough", payload, source={}, key="late")
        wait_for(lambda: service.jobs.get(job.id).state == "failed")
        refused = dataflow("jobs", config_path, "--retry", job.id)
        assert refused.returncode == 2
        assert f"{payload} no longer exists" in refused.stderr
        payload.mkdir()
        shutil.copy(SAMPLES / "study-a" / "volume.npy", payload)
        (tmp_path / "state" / "jobs" / job.id).mkdir(parents=True, exist_ok=True)
        (tmp_path / "state" / "jobs" / job.id / "stale.txt").write_text("first attempt")
        out = dataflow("jobs", config_path, "--retry", job.id)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{job.id} queued again (passthrough; 1 attempt so far")
        wait_for(lambda: service.jobs.get(job.id).state == "succeeded")
        again = dataflow("jobs", config_path, "--retry", job.id)
        assert again.returncode == 2
        assert f"job {job.id} is succeeded: only a failed job" in again.stderr
    finally:
        service.stop()
    store = JobStore(tmp_path / "state" / "jobs.db")
    record = store.get(job.id)
    store.close()
    assert record.state == "succeeded" and record.attempts == 2 and not record.error
    assert record.last_error.startswith("npy-to-array: ") and "found 0" in record.last_error
    outputs = tmp_path / "state" / "jobs" / job.id
    assert (outputs / "compare" / "report" / "comparison.json").is_file()
    assert not (outputs / "stale.txt").exists()  # the retry started without old outputs
    listing = dataflow("jobs", config_path)
    assert "retried after npy-to-array: " in listing.stdout


def test_retry_refuses_unknown_unfailed_reaped_and_payload_less_jobs(config_path, tmp_path):
    """Each refusal names the job and why, and exits 2; the one retryable job among them is
    queued again (stage, error, start and end cleared, attempts kept) and runs at the next
    start of the service."""
    from cli import dataflow

    store = JobStore(tmp_path / "state" / "jobs.db")

    def job(key: str, payload: Path, ok: bool | None) -> str:
        record, _ = store.create("passthrough", payload, key=key)
        if ok is not None:
            store.started(record.id)
            store.finished(record.id, ok, stage="compare", error=None if ok else "boom")
        return record.id

    queued = job("queued", SAMPLES / "study-a", None)
    succeeded = job("succeeded", SAMPLES / "study-a", True)
    reaped = job("reaped", SAMPLES / "study-b", False)
    assert store.mark_reaped(reaped, "failed")
    gone = job("gone", tmp_path / "gone", False)
    failed = job("failed", SAMPLES / "study-b", False)
    store.close()
    out = dataflow(
        "jobs", tmp_path / "state",
        *("--retry", "nope", "--retry", queued, "--retry", succeeded, "--retry", reaped),
        *("--retry", gone, "--retry", failed),
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        f"{failed} queued again (passthrough; 1 attempt so far, the last failed: compare: boom)"
    ]
    errors = out.stderr.splitlines()
    assert errors[0].startswith("error: no job 'nope' in ")
    assert errors[1] == f"error: job {queued} is queued: only a failed job can be retried"
    assert errors[2] == f"error: job {succeeded} is succeeded: only a failed job can be retried"
    assert errors[3].startswith(f"error: job {reaped}: retention removed its outputs at ")
    assert errors[4] == (
        f"error: job {gone}: its payload folder {tmp_path / 'gone'} no longer exists: "
        "re-send the study"
    )
    assert len(errors) == 5
    store = JobStore(tmp_path / "state" / "jobs.db")
    record = store.get(failed)
    assert (record.state, record.stage, record.error, record.started, record.finished) == (
        "queued", None, None, None, None,
    )  # fmt: skip
    assert record.attempts == 1 and record.last_error == "compare: boom"
    assert store.get(reaped).state == "failed" and store.get(gone).state == "failed"
    store.close()
    service = Service(load_config(config_path))  # not running when retried: runs at start
    service.start()
    try:
        wait_for(lambda: service.jobs.get(failed).state == "succeeded")
        assert service.jobs.get(failed).attempts == 2
    finally:
        service.stop()


def test_results_without_a_connector_are_exported_once_one_serves_their_agent(tmp_path):
    """A result registered for ClaraSCU while no DICOM connector was configured waits as
    ``no-agent``; after the DICOM section is added, the next start hands it over (its files
    into the outbox); one whose task folder is gone meanwhile is marked ``missing``."""
    from operators.dicom.phantom import write_ct_series
    from operators.register import register_files

    state = tmp_path / "state"
    write_ct_series(tmp_path / "seg", slices=1, size=16, seed=5)  # what a pipeline registered
    store = JobStore(state / "jobs.db")
    tasks, ids = {}, {}
    for name in ("kept", "gone"):
        job, _ = store.create("passthrough", SAMPLES / "study-a", key=name)
        store.finished(job.id, True)
        task = state / "jobs" / job.id / "register" / "task"
        record = register_files(
            tmp_path / "seg", task, agent="ClaraSCU", destinations=["PACS"], job_id=job.id
        )
        ids[name] = record["taskId"]
        store.add_export(ids[name], job.id, "ClaraSCU", task)
        store.export_state(ids[name], "no-agent")
        tasks[name] = task
    store.close()
    shutil.rmtree(tasks["gone"])
    path = tmp_path / "service.yaml"
    path.write_text(
        f"state: {state}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
        "dicom:\n"
        "  receivers: [{name: plain, host: 127.0.0.1, port: 0}]\n"
        "  ae-titles: {DATAFLOW: {pipelines: [passthrough]}}\n"
        "  destinations: {PACS: {ae: PACS, host: 127.0.0.1, port: 9}}\n"  # nobody: it waits
        "  export: {retry-initial: 60, retry-max: 60}\n"
    )
    service = Service(load_config(path))
    service.start()
    try:
        states = {e["task_id"]: e["state"] for e in service.jobs.exports()}
        assert states == {ids["kept"]: "handed", ids["gone"]: "missing"}
        exporter = service.connectors["dicom"].exporter
        (queued,) = exporter.tasks()
        assert queued.id == f"{ids['kept']}-PACS" and queued.files == 1
    finally:
        service.stop()


def test_jobs_the_service_died_under_get_history_and_fail_after_max_attempts(config_path, tmp_path):
    """At start, a job found running that no shutdown accounted for gets "service died while
    running" (with the stage the last health file saw it at) and runs again; one whose third
    attempt was so cut short is failed with its history instead (max-attempts 3)."""
    import json

    store = JobStore(tmp_path / "state" / "jobs.db")
    poison, _ = store.create("passthrough", SAMPLES / "study-a", key="poison")
    for _ in range(2):
        store.started(poison.id, was=("queued", "running"))
        store.note(poison.id, "service_died", "service died while running")
    store.started(poison.id, was=("running",))  # the third attempt: the service died again
    victim, _ = store.create("passthrough", SAMPLES / "study-b", key="victim")
    store.started(victim.id)
    store.close()
    health = {"pipelines": {"passthrough": {"in_flight": {victim.id: ["npy-to-array"]}}}}
    (tmp_path / "state" / "health.json").write_text(json.dumps(health))
    service = Service(load_config(config_path))
    service.start()
    try:
        wait_for(lambda: service.jobs.get(victim.id).state == "succeeded")
        failed = service.jobs.get(poison.id)
    finally:
        service.stop()
    assert failed.state == "failed" and failed.attempts == 3
    assert failed.error == (
        "not resumed: 3 attempts were cut short (attempt 1: service died while running; "
        "attempt 2: service died while running; attempt 3: service died while running)"
    )
    assert [e["event"] for e in failed.history][-2:] == ["service_died", "not_resumed"]
    store = JobStore(tmp_path / "state" / "jobs.db")
    (entry,) = store.get(victim.id).history
    store.close()
    assert (entry["attempt"], entry["event"], entry["stage"]) == (1, "service_died", "npy-to-array")
    assert entry["what"] == "service died while running (last seen at stage npy-to-array)"
