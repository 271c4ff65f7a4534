"""The platform across restarts of the real service: a pipeline registered through the API is
started again, warm, at the next start; one that no longer validates does not stop the
service (listed as not started, with the reason, until removed); a REST port in use refuses
the start before any worker starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dataflow.service import Service, ServiceError, load_config
from tests.integration.platform_service import api_client, platform_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


def run_job(client, pipeline: str) -> dict:
    created = client.post("/api/v1/jobs", json={"pipeline": pipeline}).json()
    client.put(f"/api/v1/payloads/{created['payload_id']}/files/input/volume.npy",
               content=VOLUME.read_bytes())  # fmt: skip
    client.post(f"/api/v1/jobs/{created['job_id']}/start")
    with client.stream("GET", "/api/v1/events") as events:
        status = client.get(f"/api/v1/jobs/{created['job_id']}").json()
        if status["state"] not in ("succeeded", "failed"):
            for line in events.iter_lines():
                if created["job_id"] in line and ('"succeeded"' in line or '"failed"' in line):
                    break
    return client.get(f"/api/v1/jobs/{created['job_id']}").json()


def test_registered_pipelines_come_back_and_a_broken_one_does_not_stop_the_service(tmp_path):
    pipelines = {"passthrough": PASSTHROUGH}
    with platform_service(tmp_path, pipelines) as service, api_client(service) as client:
        body = {"definition": PASSTHROUGH.read_text(), "name": "copy"}
        created = client.post("/api/v1/pipelines", json=body)
        assert created.status_code == 201, created.text
    with platform_service(tmp_path, pipelines) as service, api_client(service) as client:
        listed = {p["name"]: p for p in client.get("/api/v1/pipelines").json()}
        assert listed["copy"]["state"] == "ready" and listed["copy"]["source"] == "api"
        assert run_job(client, "copy")["state"] == "succeeded"
    stored = tmp_path / "state" / "platform" / "pipelines" / "copy" / "pipeline.yaml"
    stored.write_text(stored.read_text().replace("operators.passthrough:ArrayToNpz",
                                                 "operators.passthrough:Gone"))  # fmt: skip
    with platform_service(tmp_path, pipelines) as service, api_client(service) as client:
        listed = {p["name"]: p for p in client.get("/api/v1/pipelines").json()}
        assert listed["copy"]["state"] == "not started" and "Gone" in listed["copy"]["reason"]
        assert listed["passthrough"]["state"] == "ready"
        refused = client.post("/api/v1/jobs", json={"pipeline": "copy"})
        assert refused.status_code == 409 and "was not started" in refused.json()["message"]
        assert client.delete(f"/api/v1/pipelines/{listed['copy']['id']}").status_code == 204
        assert [p["name"] for p in client.get("/api/v1/pipelines").json()] == ["passthrough"]
    assert not stored.parent.exists()


def test_a_rest_port_in_use_refuses_the_start_before_any_worker(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / "service.yaml"
        path.write_text(f"state: {tmp_path / 'state'}\npipelines:\n  passthrough: {PASSTHROUGH}\n"
                        f"api: {{rest-port: {port}, grpc-port: null}}\n")  # fmt: skip
        service = Service(load_config(path))
        with pytest.raises(
            ServiceError, match=rf"api.rest-port: cannot listen on 127.0.0.1:{port}"
        ):
            service.start()
        assert service.executors == {}  # refused before any pipeline was built
