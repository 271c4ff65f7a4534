"""The REST API of the platform against the real service (warm passthrough pipeline, uvicorn
on a free loopback port) with a real httpx client: the job flow from creation to download,
events, pipelines registered at run time, and every bad input refused with nothing changed."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.integration.platform_service import HANG, api_client, platform_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pipelines = {"passthrough": PASSTHROUGH}
    with platform_service(
        tmp_path_factory.mktemp("platform"), pipelines, "max-upload: 1MiB"
    ) as service:
        yield service


@pytest.fixture
def client(service):
    with api_client(service) as client:
        yield client


def wait_state(client, job_id, states=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        status = client.get(f"/api/v1/jobs/{job_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not end")


def new_job(client, **body):
    response = client.post("/api/v1/jobs", json={"pipeline": "passthrough", **body})
    assert response.status_code == 201, response.text
    return response.json()["job_id"], response.json()["payload_id"]


def test_a_job_runs_from_creation_to_download(service, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert "/api/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    pipelines = client.get("/api/v1/pipelines").json()
    assert [p["name"] for p in pipelines] == ["passthrough"] and len(pipelines[0]["id"]) == 32
    described = client.get(f"/api/v1/pipelines/{pipelines[0]['id']}").json()
    assert described["yaml"] == PASSTHROUGH.read_text()
    assert [op["name"] for op in described["operators"]][:2] == ["npy-to-array", "array-to-npz"]

    job_id, payload_id = new_job(client, name="study-a", priority="higher",
                                 metadata={"Study": "a"})  # fmt: skip
    assert client.get(f"/api/v1/jobs/{job_id}").json()["clara_state"] == "PENDING"
    data = VOLUME.read_bytes()
    put = client.put(f"/api/v1/payloads/{payload_id}/files/input/volume.npy", content=data)
    assert put.status_code == 201 and put.json() == {
        "name": "/input/volume.npy", "size": len(data), "mode": 0o644}  # fmt: skip
    with client.stream("GET", "/api/v1/events") as events:
        started = client.post(f"/api/v1/jobs/{job_id}/start")
        assert started.status_code == 200, started.text
        seen = []
        for line in events.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["job_id"] == job_id:
                    seen.append(event["state"])
                    if event["state"] == "succeeded":
                        break
    assert seen[0] in ("queued", "running") and seen[-1] == "succeeded"
    status = wait_state(client, job_id)
    assert (status["state"], status["clara_state"], status["clara_status"]) == (
        "succeeded", "STOPPED", "HEALTHY")  # fmt: skip
    assert status["priority"] == "higher" and status["metadata"] == {"Study": "a"}
    assert {op["status"] for op in status["operators"]} == {"COMPLETED"}

    again = client.post(f"/api/v1/jobs/{job_id}/start")
    assert again.status_code == 409 and job_id in again.json()["message"]

    names = [f["name"] for f in client.get(f"/api/v1/payloads/{payload_id}/files").json()]
    assert names[0] == "/input/volume.npy"
    assert "/operators/array-to-npz/output/volume.npz" in names
    assert "/operators/compare/report/comparison.json" in names
    back = client.get(f"/api/v1/payloads/{payload_id}/files/input/volume.npy")
    assert back.content == data
    report = client.get(f"/api/v1/payloads/{payload_id}/files/operators/compare/report/"
                        "comparison.json")  # fmt: skip
    job_dir = service.jobs_dir / job_id
    assert report.content == (job_dir / "compare" / "report" / "comparison.json").read_bytes()
    assert client.get(f"/api/v1/jobs/{job_id}/files").json() == client.get(
        f"/api/v1/payloads/{payload_id}/files").json()  # fmt: skip

    listed = client.get("/api/v1/jobs", params={"state": "succeeded"}).json()
    assert job_id in [job["id"] for job in listed]
    assert all(job["state"] == "succeeded" for job in listed)
    logs = client.get(f"/api/v1/jobs/{job_id}/logs").json()["logs"]
    assert "succeeded" in logs[-1]
    health = client.get("/api/v1/health").json()
    assert (health["verdict"], health["summary"]) == (0, "healthy")
    assert "passthrough" in health["pipelines"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "dataflow_up 1.0" in metrics.text
    lines = [line for line in metrics.text.splitlines() if line and not line.startswith("#")]
    figures = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    route = "/api/v1/payloads/{payload_id}/files/{name:path}"
    assert figures[f'dataflow_api_requests_total{{method="PUT",route="{route}",status="201"}}'] >= 1
    assert figures['dataflow_api_payload_bytes_total{direction="upload"}'] >= len(data)
    assert figures['dataflow_api_payload_bytes_total{direction="download"}'] >= len(data)
    assert not any(job_id in key for key in figures)  # ids never become labels

    audit = [e for e in client.get("/api/v1/audit").json() if job_id in str(e)]
    assert [e["what"] for e in audit] == ["job_created", "job_started"]
    assert all((e["who"], e["from"], e["via"]) == ("anonymous", "127.0.0.1", "rest")
               for e in audit)  # fmt: skip
    assert audit[0]["metadata_keys"] == ["Study"] and "'a'" not in str(audit)
    uploads = [e for e in client.get("/api/v1/audit").json() if payload_id in str(e)]
    assert {
        "what": "payload_file_uploaded",
        "payload": payload_id,
        "bytes": len(data),
    }.items() <= uploads[1].items()
    assert "volume.npy" not in (service.config.state / "platform" / "audit.log").read_text()
    busy = client.delete(f"/api/v1/payloads/{payload_id}")
    assert busy.status_code == 204  # its job ended
    assert client.get(f"/api/v1/payloads/{payload_id}/files").status_code == 404


def test_bad_names_ids_and_sizes_are_refused_and_change_nothing(service, client):
    job_id, payload_id = new_job(client)
    inputs = service.config.state / "payloads" / payload_id / "input"
    files = f"/api/v1/payloads/{payload_id}/files"
    outside = service.config.state / "outside"
    outside.mkdir(exist_ok=True)
    (inputs / "link").symlink_to(outside)
    bad = {
        "input/%2E%2E/escape.npy": "'..' would leave the payload",
        "input//etc/passwd": "an absolute path",
        "input/a%00b": "NUL",
        "input/link/x.npy": "symbolic link leads out",
        "elsewhere/x.npy": "uploaded under input/",
    }
    for name, why in bad.items():
        response = client.put(f"{files}/{name}", content=b"x")
        assert response.status_code == 422, (name, response.text)
        assert why in response.json()["message"], name
    too_big = client.put(f"{files}/input/big.bin", content=b"\0" * (2 * 1024 * 1024))
    assert too_big.status_code == 413 and "api.max-upload" in too_big.json()["message"]
    assert sorted(p.name for p in inputs.iterdir()) == ["link"]
    assert not list(outside.iterdir())
    assert not list((inputs.parent / ".partial").iterdir())

    unknown = "0" * 32
    calls = [("GET", f"/api/v1/jobs/{unknown}"), ("POST", f"/api/v1/jobs/{unknown}/start"),
             ("GET", f"/api/v1/payloads/{unknown}/files")]  # fmt: skip
    for method, url in calls:
        response = client.request(method, url)
        assert response.status_code == 404 and unknown in response.json()["message"]
    malformed = client.get("/api/v1/jobs/not-an-id")
    assert malformed.status_code == 422 and "'not-an-id'" in malformed.json()["message"]
    assert client.post("/api/v1/jobs", json={"pipeline": "nope"}).status_code == 404
    assert (
        client.post(
            "/api/v1/jobs", json={"pipeline": "passthrough", "priority": "urgent"}
        ).status_code
        == 422
    )
    over = client.post(f"/api/v1/jobs/{job_id}/metadata", json={"k": "v" * 257})
    assert over.status_code == 422 and "256 bytes" in over.json()["message"]
    twice = client.post(f"/api/v1/jobs/{job_id}/metadata", json={"Key": "1", "KEY": "2"})
    assert twice.status_code == 422 and "case-insensitive" in twice.json()["message"]
    assert client.get(f"/api/v1/jobs/{job_id}/metadata").json() == {}
    missing = client.get(f"{files}/input/none.npy")
    assert missing.status_code == 404 and "none.npy" in missing.json()["message"]

    in_use = client.delete(f"/api/v1/payloads/{payload_id}")
    assert in_use.status_code == 409 and job_id in in_use.json()["message"]
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"reason": "not needed"})
    assert cancelled.status_code == 200
    assert (cancelled.json()["state"], cancelled.json()["clara_status"]) == (
        "cancelled",
        "CANCELED",
    )
    assert client.post(f"/api/v1/jobs/{job_id}/start").status_code == 409
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409
    assert service.jobs.get(job_id).state == "cancelled"  # one list, one set of states


def test_an_upload_cut_off_by_its_client_leaves_nothing(service, client):
    _, payload_id = new_job(client)
    host, port = service.platform.urls["rest"].removeprefix("http://").rsplit(":", 1)
    partial = service.config.state / "payloads" / payload_id / ".partial"

    def waiting(what, predicate):
        deadline = time.monotonic() + HANG
        while not predicate():
            assert time.monotonic() < deadline, f"hung waiting for {what}"
            time.sleep(0.02)

    with socket.create_connection((host, int(port)), timeout=HANG) as sock:
        sock.sendall(
            f"PUT /api/v1/payloads/{payload_id}/files/input/cut.npy HTTP/1.1\r\n"
            f"Host: {host}\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"\0" * 5000
        )
        waiting("the upload to begin", lambda: partial.is_dir() and any(partial.iterdir()))
    waiting("the partial file to go", lambda: not any(partial.iterdir()))
    assert client.get(f"/api/v1/payloads/{payload_id}/files").json() == []


def test_a_pipeline_registered_at_run_time_runs_warm_and_is_removed(service, client):
    broken = PASSTHROUGH.read_text().replace("from: npy-to-array\n", "from: npy-to-arary\n", 1)
    refused = client.post("/api/v1/pipelines", json={"definition": broken, "name": "bad"})
    assert refused.status_code == 422
    assert "pipeline.yaml:" in refused.json()["message"]
    assert "npy-to-arary" in refused.json()["message"]
    assert [p["name"] for p in client.get("/api/v1/pipelines").json()] == ["passthrough"]

    created = client.post(
        "/api/v1/pipelines",
        json={
            "definition": PASSTHROUGH.read_text(),
            "name": "copy",
            "metadata": {"owner": "tests"},
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "ready" and created.json()["source"] == "api"
    assert (
        client.post(
            "/api/v1/pipelines", json={"definition": PASSTHROUGH.read_text(), "name": "copy"}
        ).status_code
        == 409
    )
    response = client.post("/api/v1/jobs", json={"pipeline": created.json()["id"]})
    job_id, payload_id = response.json()["job_id"], response.json()["payload_id"]
    client.put(f"/api/v1/payloads/{payload_id}/files/input/volume.npy",
               content=VOLUME.read_bytes())  # fmt: skip
    removal = client.delete("/api/v1/pipelines/copy")
    assert removal.status_code == 409 and job_id in removal.json()["message"]
    busy = client.put("/api/v1/pipelines/copy", json={"definition": PASSTHROUGH.read_text()})
    assert busy.status_code == 409 and job_id in busy.json()["message"]
    client.post(f"/api/v1/jobs/{job_id}/start")
    assert wait_state(client, job_id)["state"] == "succeeded"

    bad = client.put("/api/v1/pipelines/copy", json={"definition": broken})
    assert bad.status_code == 422 and "npy-to-arary" in bad.json()["message"]
    described = PASSTHROUGH.read_text().replace(
        "description: File to typed", "description: Updated file to typed"
    )
    updated = client.put(
        f"/api/v1/pipelines/{created.json()['id']}", json={"definition": described}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["state"] == "ready" and updated.json()["metadata"] == {"owner": "tests"}
    assert "Updated file" in client.get("/api/v1/pipelines/copy").json()["yaml"]
    again = client.post("/api/v1/jobs", json={"pipeline": "copy"}).json()
    client.put(f"/api/v1/payloads/{again['payload_id']}/files/input/volume.npy",
               content=VOLUME.read_bytes())  # fmt: skip
    client.post(f"/api/v1/jobs/{again['job_id']}/start")
    assert wait_state(client, again["job_id"])["state"] == "succeeded"
    assert client.delete("/api/v1/pipelines/copy").status_code == 204
    assert client.get("/api/v1/pipelines/copy").status_code == 404
    configured = client.delete("/api/v1/pipelines/passthrough")
    assert configured.status_code == 422 and "change it there" in configured.json()["message"]


def test_max_upload_counts_the_whole_payload_and_a_replaced_file_once(service, client):
    _, payload_id = new_job(client)
    files = f"/api/v1/payloads/{payload_id}/files/input"
    part = b"\1" * (600 * 1024)  # the fixture's max-upload is 1 MiB
    assert client.put(f"{files}/a.bin", content=part).status_code == 201
    assert client.put(f"{files}/a.bin", content=part).status_code == 201  # replaces a.bin
    over = client.put(f"{files}/b.bin", content=part)
    assert over.status_code == 413 and "b.bin" in over.json()["message"]
    assert client.delete(f"{files}/a.bin").status_code == 204
    assert client.put(f"{files}/b.bin", content=part).status_code == 201
    listed = client.get(f"/api/v1/payloads/{payload_id}/files").json()
    assert [(f["name"], f["size"]) for f in listed] == [("/input/b.bin", len(part))]


def test_input_payloads_are_copied_into_a_new_jobs_input(service, client):
    shared = client.post("/api/v1/payloads").json()["payload_id"]
    other = client.post("/api/v1/payloads", json={"site": "a"}).json()["payload_id"]
    for payload in (shared, other):
        put = client.put(f"/api/v1/payloads/{payload}/files/input/volume.npy",
                         content=VOLUME.read_bytes())  # fmt: skip
        assert put.status_code == 201
    details = client.get(f"/api/v1/payloads/{other}").json()
    assert details["type"] == "REUSABLE" and details["metadata"] == {"site": "a"}
    clash = client.post("/api/v1/jobs", json={"pipeline": "passthrough",
                                              "input_payloads": [shared, other]})  # fmt: skip
    assert clash.status_code == 422 and "'volume.npy'" in clash.json()["message"]
    created = client.post("/api/v1/jobs", json={"pipeline": "passthrough",
                                                "input_payloads": [shared]}).json()  # fmt: skip
    listed = client.get(f"/api/v1/payloads/{created['payload_id']}/files").json()
    assert [f["name"] for f in listed] == ["/input/volume.npy"]
    body = {"pipeline": "passthrough", "input_payloads": [created["payload_id"]]}
    of_a_job = client.post("/api/v1/jobs", json=body)
    assert of_a_job.status_code == 422 and "belongs to a job" in of_a_job.json()["message"]
    client.post(f"/api/v1/jobs/{created['job_id']}/start")
    assert wait_state(client, created["job_id"])["state"] == "succeeded"
    assert client.get(f"/api/v1/payloads/{shared}/files").json()[0]["name"] == "/input/volume.npy"


def test_a_download_cut_off_by_its_client_leaves_the_service_serving(service, client):
    _, payload_id = new_job(client)
    data = bytes(range(256)) * 3000  # 750 KiB: several chunks
    files = f"/api/v1/payloads/{payload_id}/files"
    assert client.put(f"{files}/input/big.bin", content=data).status_code == 201
    host, port = service.platform.urls["rest"].removeprefix("http://").rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=HANG) as sock:
            sock.sendall(f"GET {files}/input/big.bin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get(f"{files}/input/big.bin").content == data
