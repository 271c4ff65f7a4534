"""The service core with real warm pipelines: submitted jobs run and are recorded, the same
key gives the same job, and a restart runs what a crash left queued or running."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")


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

        wait_for(done, timeout=120)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
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
