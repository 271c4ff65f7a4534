"""Access control against the real service: with ``api: {tokens: true}`` every REST and gRPC
call needs a token whose role allows it (made, listed and revoked with ``dataflow tokens``),
the audit log names the token, secrets are never stored or logged; with ``tls:`` REST and gRPC
are served over TLS only (a self-signed certificate made by openssl in the test)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from dataflow.platform.clara.gen.nvidia.clara.platform import jobs_pb2, jobs_pb2_grpc
from tests.integration.platform_service import HANG, platform_service
from tests.integration.test_platform_rest import wait_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"
DATAFLOW = str(Path(sys.executable).with_name("dataflow"))


def dataflow(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DATAFLOW, *args], capture_output=True, text=True, timeout=HANG, env={**os.environ, **env}
    )


def token(config: Path, name: str, role: str) -> str:
    made = dataflow("tokens", "create", name, str(config), "--role", role)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    with platform_service(tmp, {"passthrough": PASSTHROUGH}, "tokens: true", grpc=True) as svc:
        yield svc


@pytest.fixture(scope="module")
def secrets(service):
    config = Path(service.config.path)
    return {role: token(config, f"{role}-robot", role) for role in ("read", "operator", "admin")}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_every_rest_call_needs_a_token_with_the_role_it_needs(service, secrets):
    base = service.platform.urls["rest"]
    with httpx.Client(base_url=base, timeout=HANG) as http:
        assert http.get("/healthz").status_code == 200  # a load balancer's check
        anonymous = http.get("/api/v1/jobs")
        assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["message"]
        assert anonymous.headers["www-authenticate"] == "Bearer"
        wrong = http.get("/api/v1/jobs", headers=bearer("dft_not-a-token"))
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["message"]
        assert http.get("/api/v1/jobs", headers=bearer(secrets["read"])).status_code == 200
        assert http.get("/console/jobs", headers=bearer(secrets["read"])).status_code == 200
        refused = http.post(
            "/api/v1/jobs", json={"pipeline": "passthrough"}, headers=bearer(secrets["read"])
        )
        assert refused.status_code == 403
        assert "'read-robot' has the role 'read'; this call needs 'operator'" in refused.text

        ops = bearer(secrets["operator"])
        job = http.post("/api/v1/jobs", json={"pipeline": "passthrough"}, headers=ops).json()
        http.put(
            f"/api/v1/payloads/{job['payload_id']}/files/input/volume.npy",
            content=VOLUME.read_bytes(),
            headers=ops,
        ).raise_for_status()
        http.post(f"/api/v1/jobs/{job['job_id']}/start", headers=ops).raise_for_status()
        http.headers.update(ops)
        assert wait_state(http, job["job_id"])["state"] == "succeeded"
        definition = {"definition": PASSTHROUGH.read_text(), "name": "copy"}
        assert http.post("/api/v1/pipelines", json=definition).status_code == 403
        made = http.post("/api/v1/pipelines", json=definition, headers=bearer(secrets["admin"]))
        assert made.status_code == 201, made.text
        audit = http.get("/api/v1/audit").json()
    who = {entry["what"]: entry["who"] for entry in audit}
    assert who["job_created"] == "operator-robot" and who["pipeline_added"] == "admin-robot"
    state = Path(service.config.state)
    stored = (state / "platform" / "tokens.json").read_text()
    assert (state / "platform" / "tokens.json").stat().st_mode & 0o777 == 0o600
    for secret in secrets.values():  # neither kept nor written anywhere
        assert secret not in stored and secret not in (state / "platform" / "audit.log").read_text()


def test_claras_grpc_calls_need_a_token_too(service, secrets):
    with grpc.insecure_channel(service.platform.urls["grpc"]) as channel:
        jobs = jobs_pb2_grpc.JobsStub(channel)
        listing = jobs_pb2.JobsListRequest()
        with pytest.raises(grpc.RpcError) as refused:
            list(jobs.List(listing))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in refused.value.details()
        reader = (("authorization", f"Bearer {secrets['read']}"),)
        assert all(r.header.code == 0 for r in jobs.List(listing, metadata=reader))
        pipeline = jobs_pb2.JobsCreateRequest()
        pipeline.pipeline_id.value = "passthrough"
        with pytest.raises(grpc.RpcError) as denied:
            jobs.Create(pipeline, metadata=reader)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        made = jobs.Create(pipeline, metadata=(("authorization", f"Bearer {secrets['operator']}"),))
        assert made.header.code == 0 and made.job_id.value
    audit = (Path(service.config.state) / "platform" / "audit.log").read_text().splitlines()
    created = [json.loads(line) for line in audit if made.job_id.value in line]
    assert created[0]["who"] == "operator-robot" and created[0]["via"] == "grpc"


def test_the_cli_uses_a_token_and_a_revoked_one_is_refused_at_once(service, secrets):
    api = service.platform.urls["rest"]
    listed = dataflow("jobs", "list", "--api", api, DATAFLOW_TOKEN=secrets["read"])
    assert listed.returncode == 0, listed.stderr
    without = dataflow("jobs", "list", "--api", api, DATAFLOW_TOKEN="")
    assert without.returncode == 2 and "needs a token" in without.stderr
    config = str(service.config.path)
    shown = dataflow("tokens", "list", config, "--json")
    names = {t["name"]: t for t in json.loads(shown.stdout)}
    assert names["read-robot"]["role"] == "read" and "digest" not in shown.stdout
    assert all(secret not in shown.stdout for secret in secrets.values())
    assert dataflow("tokens", "revoke", "read-robot", config).returncode == 0
    after = dataflow("jobs", "list", "--api", api, DATAFLOW_TOKEN=secrets["read"])
    assert after.returncode == 2 and "unknown or revoked" in after.stderr
    bad = dataflow("tokens", "create", "x", config, "--role", "root")
    assert bad.returncode == 2 and "one of read, operator, admin" in bad.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_with_tls_rest_and_grpc_are_served_over_tls_only(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert made.returncode == 0, made.stderr
    api = f"tls: {{cert: {cert}, key: {key}}}"
    with platform_service(tmp_path, {"passthrough": PASSTHROUGH}, api, grpc=True) as service:
        url = service.platform.urls["rest"]
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=trusted, timeout=HANG) as http:
            assert http.get("/api/v1/pipelines").status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(url.replace("https://", "http://") + "/api/v1/pipelines", timeout=HANG)
        listed = dataflow("pipelines", "list", "--api", url, DATAFLOW_CA=str(cert))
        assert listed.returncode == 0 and "passthrough" in listed.stdout, listed.stderr
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(service.platform.urls["grpc"], credentials) as channel:
            jobs = jobs_pb2_grpc.JobsStub(channel)
            assert all(r.header.code == 0 for r in jobs.List(jobs_pb2.JobsListRequest()))
