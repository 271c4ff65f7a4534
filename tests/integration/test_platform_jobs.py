"""Jobs through the platform API beyond the simple flow, against the real service: a running
job cancelled (its stage is stopped, its outputs discarded, it stays cancelled), a failed
job fixed and retried, retention releasing an uploaded payload, 200 clients listing jobs
while jobs finish, and the export outbox over REST."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from dataflow.service.config import Retention
from tests.integration.platform_service import HANG, api_client, platform_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parent / "service_data"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


def until(predicate, what: str):
    deadline = time.monotonic() + HANG
    while not predicate():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pipelines = {"hang": DATA / "hang.yaml", "passthrough": ROOT / "pipelines" / "passthrough.yaml"}
    with platform_service(tmp_path_factory.mktemp("jobs"), pipelines) as service:
        yield service


@pytest.fixture
def client(service):
    with api_client(service) as client:
        yield client


def job_with(client, pipeline: str, files: dict[str, bytes]) -> tuple[str, str]:
    created = client.post("/api/v1/jobs", json={"pipeline": pipeline}).json()
    for name, data in files.items():
        put = client.put(f"/api/v1/payloads/{created['payload_id']}/files/input/{name}",
                         content=data)  # fmt: skip
        assert put.status_code == 201, put.text
    return created["job_id"], created["payload_id"]


def state_of(client, job_id):
    return client.get(f"/api/v1/jobs/{job_id}").json()["state"]


def test_a_running_job_cancelled_stops_and_ends_cancelled_without_outputs(service, client):
    job_id, payload_id = job_with(client, "hang", {"hang": b""})
    inputs = service.config.state / "payloads" / payload_id / "input"
    assert client.post(f"/api/v1/jobs/{job_id}/start").status_code == 200
    until(lambda: (inputs / "started-1").exists(), "the stage to start")
    status = client.get(f"/api/v1/jobs/{job_id}").json()
    assert status["state"] == "running"
    assert status["operators"] == [{"name": "hang", "status": "RUNNING"}]
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"reason": "wrong study"})
    assert cancelled.json()["state"] == "cancelled"
    assert "cancelled: wrong study" in cancelled.json()["messages"][0]
    executor = service.executors["hang"]
    # the stage would hang for ever on its 'hang' file: only the cancel stops it
    until(lambda: job_id not in executor.in_flight(), "the stage to let go of the job")
    until(lambda: not (service.jobs_dir / job_id).exists(), "the outputs to be discarded")
    assert state_of(client, job_id) == "cancelled"
    assert service.jobs.get(job_id).state == "cancelled"
    names = [f["name"] for f in client.get(f"/api/v1/payloads/{payload_id}/files").json()]
    assert sorted(names) == ["/input/hang", "/input/started-1"]
    after, _ = job_with(client, "hang", {"x": b""})  # the stage's worker was restarted
    client.post(f"/api/v1/jobs/{after}/start")
    until(lambda: state_of(client, after) == "succeeded", "a job after the cancelled one")


def test_a_failed_job_fixed_and_retried_succeeds(service, client):
    job_id, payload_id = job_with(client, "hang", {"fail": b""})
    client.post(f"/api/v1/jobs/{job_id}/start")
    until(lambda: state_of(client, job_id) == "failed", "the job to fail")
    status = client.get(f"/api/v1/jobs/{job_id}").json()
    assert status["clara_status"] == "FAULTED"
    assert status["operators"] == [{"name": "hang", "status": "FAULTED"}]
    assert "PAT-0042" not in str(status) and "DOE^JANE" not in str(status)
    logs = client.get(f"/api/v1/jobs/{job_id}/logs", params={"operator": "hang"}).json()["logs"]
    assert any("failed: hang:" in line for line in logs) and "PAT-0042" not in str(logs)
    # what the operator logged (info, below the console's level) and printed while it ran the
    # job, and its traceback, kept per job; the patient's name it printed is scrubbed
    own = [line for line in logs if line.startswith("[hang] ")]
    assert any("hang_attempt" in line and "attempt=1" in line for line in own), logs
    assert any("attempt 1 on its folder" in line for line in own), logs
    assert any("Traceback" in line for line in own) and any("ValueError" in line for line in own)
    assert "DOE^JANE" not in str(logs) and any("PatientName <redacted>" in line for line in own)
    files = client.get(f"/api/v1/jobs/{job_id}/files").json()
    assert not any(".logs" in f["name"] for f in files)  # logs are read through /logs
    unknown_op = client.get(f"/api/v1/jobs/{job_id}/logs", params={"operator": "nope"})
    assert unknown_op.status_code == 404 and "'nope'" in unknown_op.json()["message"]
    client.delete(f"/api/v1/payloads/{payload_id}/files/input/fail")
    retried = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200, retried.text
    until(lambda: state_of(client, job_id) == "succeeded", "the retried job")
    logs = client.get(f"/api/v1/jobs/{job_id}/logs").json()["logs"]  # every operator's
    assert any(line.startswith("[hang] ") and "attempt 2 on its folder" in line for line in logs)
    again = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert again.status_code == 409 and "only a failed job" in again.json()["message"]


def test_retention_releases_an_uploaded_payload(service, client):
    job_id, payload_id = job_with(client, "hang", {"x": b"1"})
    client.post(f"/api/v1/jobs/{job_id}/start")
    until(lambda: state_of(client, job_id) == "succeeded", "the job")
    folder = service.config.state / "payloads" / payload_id
    assert folder.is_dir()
    configured = service.config
    service.config = dataclasses.replace(configured, retention=Retention(succeeded=0))
    try:
        finished = service.jobs.get(job_id).finished  # reaped as of just after it ended
        assert service.reap(now=finished + 1) >= 1
    finally:
        service.config = configured
    assert not folder.exists()
    assert client.get(f"/api/v1/payloads/{payload_id}/files").status_code == 404
    assert state_of(client, job_id) == "succeeded"  # the record stays


def test_200_clients_list_jobs_while_jobs_finish(service, client):
    jobs = [job_with(client, "passthrough", {"volume.npy": VOLUME.read_bytes()})[0]
            for _ in range(6)]  # fmt: skip
    base = service.platform.urls["rest"]
    start = threading.Barrier(201)

    def lister(_):
        with httpx.Client(base_url=base, timeout=HANG) as mine:
            start.wait(timeout=HANG)
            response = mine.get("/api/v1/jobs", params={"pipeline": "passthrough"})
            return response.status_code, [job["id"] for job in response.json()]

    with ThreadPoolExecutor(max_workers=200) as pool:
        listings = pool.map(lister, range(200))
        for job_id in jobs:
            client.post(f"/api/v1/jobs/{job_id}/start")
        start.wait(timeout=HANG)
        results = list(listings)
    for code, ids in results:
        assert code == 200 and len(ids) == len(set(ids))
        assert set(jobs) <= set(ids)
    until(lambda: all(state_of(client, j) == "succeeded" for j in jobs), "the jobs to finish")
    final = client.get("/api/v1/jobs", params={"pipeline": "passthrough", "limit": 1000}).json()
    assert len([job for job in final if job["id"] in jobs]) == len(jobs)


def test_the_export_outbox_over_rest_without_a_dicom_section(client):
    assert client.get("/api/v1/exports").json() == []
    missing = client.post("/api/v1/exports/abc/resend")
    assert missing.status_code == 404 and "'abc'" in missing.json()["message"]
