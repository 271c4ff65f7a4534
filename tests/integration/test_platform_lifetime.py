"""Pipelines registered through the API with ``api: {start-pipelines: first-job, idle-stop}``:
their workers start at their first job (the job waits queued meanwhile) and stop after the
pipeline has been idle, and start again at the next job; against the real service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.platform_service import HANG, api_client, platform_service
from tests.integration.test_platform_rest import wait_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


def until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.05)


def run_job(client, pipeline: str) -> dict:
    job = client.post("/api/v1/jobs", json={"pipeline": pipeline}).json()
    client.put(f"/api/v1/payloads/{job['payload_id']}/files/input/volume.npy",
               content=VOLUME.read_bytes()).raise_for_status()  # fmt: skip
    client.post(f"/api/v1/jobs/{job['job_id']}/start").raise_for_status()
    return wait_state(client, job["job_id"])


def test_registered_pipelines_start_at_their_first_job_and_stop_when_idle(tmp_path):
    api = "start-pipelines: first-job, idle-stop: 1s"
    with platform_service(tmp_path, {"passthrough": PASSTHROUGH}, api) as service, \
            api_client(service) as client:  # fmt: skip
        state = lambda name: client.get(f"/api/v1/pipelines/{name}").json()["state"]  # noqa: E731
        assert state("passthrough") == "ready"  # configured pipelines always run warm
        definition = {"definition": PASSTHROUGH.read_text(), "name": "lazy"}
        made = client.post("/api/v1/pipelines", json=definition)
        assert made.status_code == 201, made.text
        assert made.json()["state"] == "idle" and "lazy" not in service.executors

        assert run_job(client, "lazy")["state"] == "succeeded"  # woken by its job
        until(lambda: state("lazy") == "idle", "the idle pipeline to stop its workers")
        assert "lazy" not in service.executors and "lazy" not in service.feeds
        assert run_job(client, "lazy")["state"] == "succeeded"  # and woken again

        # a job created while its pipeline sleeps waits pending, then queued, then runs
        until(lambda: state("lazy") == "idle", "the pipeline to sleep again")
        created = client.post("/api/v1/jobs", json={"pipeline": "lazy"})
        assert created.status_code == 201, created.text  # accepted while its workers sleep
        job = created.json()
        client.put(f"/api/v1/payloads/{job['payload_id']}/files/input/volume.npy",
                   content=VOLUME.read_bytes()).raise_for_status()  # fmt: skip
        client.post(f"/api/v1/jobs/{job['job_id']}/start").raise_for_status()
        assert wait_state(client, job["job_id"])["state"] == "succeeded"
        until(lambda: state("lazy") == "idle", "the pipeline to sleep once more")
        assert client.delete("/api/v1/pipelines/lazy").status_code == 204
        assert client.get("/api/v1/pipelines/lazy").status_code == 404
        assert state("passthrough") == "ready"  # idle-stop is for registered pipelines only
