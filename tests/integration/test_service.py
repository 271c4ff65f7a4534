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
