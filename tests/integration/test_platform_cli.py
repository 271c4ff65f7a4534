"""The CLI as a client of a running ``dataflow serve`` (a real subprocess, its REST API on a
free loopback port read from STATE/api.json): create a job from a folder, start it, wait,
download its outputs; list pipelines and jobs; and ``dataflow jobs CONFIG`` still reads the
state folder, the API's jobs among the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
STUDY = ROOT / "pipelines" / "samples" / "volumes" / "study-a"
HANG = 300.0


def dataflow(*args: str, api: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"DATAFLOW_API": api} if api else {})}
    return subprocess.run([sys.executable, "-m", "dataflow.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "service.yaml"
    config.write_text(
        f"state: {tmp / 'state'}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
        "api: {rest-port: 0, grpc-port: null}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "dataflow.cli", "serve", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    api_file = tmp / "state" / "api.json"
    try:
        deadline = time.monotonic() + HANG
        while not api_file.is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "dataflow serve did not start its API"
            time.sleep(0.1)
        yield config, json.loads(api_file.read_text())["rest"], tmp
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=HANG)
        assert proc.returncode == 0, output
    assert not api_file.exists()  # removed when the service stops


def test_create_start_wait_then_download(served):
    config, api, tmp = served
    created = dataflow("jobs", "create", "--pipeline", "passthrough", "--input", str(STUDY),
                       "--start", "--wait", "--json", api=api)  # fmt: skip
    assert created.returncode == 0, created.stderr
    status = json.loads(created.stdout)
    assert status["state"] == "succeeded" and status["clara_status"] == "HEALTHY"
    job_id = status["id"]

    shown = dataflow("jobs", "status", job_id, api=api)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "compare" in shown.stdout
    out = tmp / "downloaded"
    got = dataflow("jobs", "download", job_id, "--output", str(out), "--only", "/", api=api)
    assert got.returncode == 0, got.stderr
    assert (out / job_id / "input" / "volume.npy").read_bytes() == (
        STUDY / "volume.npy"
    ).read_bytes()
    report = out / job_id / "operators" / "compare" / "report" / "comparison.json"
    state = tmp / "state" / "jobs" / job_id / "compare" / "report" / "comparison.json"
    assert report.read_bytes() == state.read_bytes()

    listed = dataflow("jobs", "list", "--state", "succeeded", api=api)
    assert listed.returncode == 0 and job_id in listed.stdout
    pipelines = dataflow("pipelines", "list", "--json", api=api)
    assert [p["name"] for p in json.loads(pipelines.stdout)] == ["passthrough"]
    records = dataflow("jobs", str(config))  # the state folder, as before the API
    assert records.returncode == 0 and job_id in records.stdout and "succeeded" in records.stdout


def test_refusals_name_what_was_wrong(served):
    _, api, tmp = served
    unknown = "0" * 32
    missing = dataflow("jobs", "status", unknown, api=api)
    assert missing.returncode == 2 and f"no job '{unknown}'" in missing.stderr
    nothing = dataflow("jobs", "create", "--pipeline", "passthrough", "--input",
                       str(tmp / "absent"), api=api)  # fmt: skip
    assert nothing.returncode == 2 and "no such file or folder" in nothing.stderr
    away = dataflow("jobs", "list", api="http://127.0.0.1:9")
    assert away.returncode == 2 and "no dataflow API at http://127.0.0.1:9" in away.stderr


def test_a_job_step_by_step_with_its_payload(served):
    _, api, tmp = served
    created = dataflow("jobs", "create", "--pipeline", "passthrough", "--priority", "higher",
                       "--json", api=api)  # fmt: skip
    assert created.returncode == 0, created.stderr
    ids = json.loads(created.stdout)
    job_id, payload_id = ids["job_id"], ids["payload_id"]
    uploaded = dataflow("payloads", "upload", payload_id, str(STUDY), api=api)
    assert uploaded.returncode == 0 and "1 file(s) uploaded" in uploaded.stdout
    files = dataflow("payloads", "files", payload_id, api=api)
    assert "/input/volume.npy" in files.stdout
    assert dataflow("jobs", "start", job_id, api=api).returncode == 0
    again = dataflow("jobs", "start", job_id, api=api)
    assert again.returncode == 2 and "a job is started once" in again.stderr
    deadline = time.monotonic() + HANG
    while json.loads(dataflow("jobs", "status", job_id, "--json", api=api).stdout)["state"] in (
        "queued", "running"):  # fmt: skip
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.2)
    out = tmp / "payload-download"
    got = dataflow("payloads", "download", payload_id, "--output", str(out), "--only",
                   "/operators/", "--json", api=api)  # fmt: skip
    assert got.returncode == 0, got.stderr
    names = sorted(entry["name"] for entry in json.loads(got.stdout))
    assert "/operators/compare/report/comparison.json" in names
    assert (out / payload_id / "operators" / "compare" / "report" / "comparison.json").is_file()
    assert dataflow("payloads", "delete", payload_id, api=api).returncode == 0
    gone = dataflow("payloads", "files", payload_id, api=api)
    assert gone.returncode == 2 and f"no payload '{payload_id}'" in gone.stderr
