"""``dataflow serve`` with ``executor: {kind: ray}``: the job records and the API stay in the
service's process, the pipelines run as Ray actors (a Ray runtime started for the service
on loopback), and a job made through the REST API gives the same files as with the local
executor. Real Ray, real service, real HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dataflow.service import JobStore, Service, ServiceError, load_config
from operators.dicom.phantom import write_ct_series
from tests.cli import dataflow
from tests.deadlines import wait_until
from tests.integration.platform_service import HANG, api_client, start_job
from tests.integration.ray_stages import without_times
from tests.integration.test_rerun import _files, _seg_content

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"
CT_SEGMENTATION = ROOT / "pipelines" / "ct-segmentation.yaml"


@pytest.fixture(autouse=True)
def ray_auth_mode(monkeypatch):
    """No token for the runtime a test starts in this process: else ``ray.init`` turns
    token authentication on for the whole process (its environment and Ray's cached
    configuration), and the two-node cluster of test_ray_executor, started later in the same
    session without one, lost every actor."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


@contextlib.contextmanager
def service(tmp: Path, executor: str, pipeline: Path = ROOT / "pipelines" / "passthrough.yaml"):
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "service.yaml"
    path.write_text(
        f"state: {tmp / 'state'}\n"
        f"pipelines:\n  {pipeline.stem}: {pipeline}\n"
        "api: {rest-port: 0, grpc-port: null}\n"
        f"executor: {executor}\n"
    )
    running = Service(load_config(path))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def run_one_job(tmp: Path, executor: str) -> tuple[dict, dict[str, bytes], dict]:
    """A passthrough job through the REST API of a service with ``executor``: its record,
    the files it wrote (by path in its job folder, but its timeline and logs) and the health file's
    entry for the pipeline while it served."""
    with service(tmp, executor) as running, api_client(running) as client:
        job_id = start_job(client, "passthrough", {"volume.npy": VOLUME.read_bytes()})
        job = wait_for_end(client, job_id)
        health = running._gather()["pipelines"]["passthrough"]
        health["executor"] = type(running.executors["passthrough"]).__name__
        folder = running.jobs_dir / job_id
        files = {  # a file that names its job names it JOB here
            str(p.relative_to(folder)): p.read_bytes().replace(job_id.encode(), b"JOB")
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".timeline.json" and ".logs" not in p.parts
        }
        files["provenance.json"] = without_times(files["provenance.json"])
    return job, files, health


def wait_for_end(client: httpx.Client, job_id: str) -> dict:
    seen: dict = {}

    def ended() -> bool:
        seen.update(client.get(f"/api/v1/jobs/{job_id}").json())
        return seen["state"] in ("succeeded", "failed")

    wait_until(ended, f"job {job_id} to end", HANG, poll=0.1)
    return seen


def test_a_job_through_the_api_runs_on_ray_with_the_local_executors_outputs(tmp_path):
    job, files, health = run_one_job(tmp_path / "ray", "{kind: ray}")
    assert job["state"] == "succeeded", job
    assert not ray.is_initialized()  # the service's Ray runtime was shut down at its stop
    assert health["executor"] == "RayExecutor"
    assert health["stages"]["npy-to-array"]["done"] == 1  # health from the Ray executor
    assert health["in_flight"] == {}
    local_job, local_files, _ = run_one_job(tmp_path / "local", "{kind: local}")
    assert local_job["state"] == "succeeded"
    assert files == local_files
    assert any(name.endswith("comparison.json") for name in files)


def test_a_failed_jobs_logs_on_ray_are_kept_per_operator_and_scrubbed(tmp_path):
    """The API's per-job logs (Clara's ReadLogs) with the Ray executor: what the stage
    logged, printed and raised in its actor, kept beside the job's outputs, every patient
    identifier scrubbed, as with the local executor (test_platform_jobs)."""
    hang = Path(__file__).parent / "service_data" / "hang.yaml"
    with service(tmp_path, "{kind: ray}", hang) as running, api_client(running) as client:
        job_id = start_job(client, "hang", {"fail": b""})
        job = wait_for_end(client, job_id)
        assert job["state"] == "failed"
        logs = client.get(f"/api/v1/jobs/{job_id}/logs", params={"operator": "hang"}).json()
    own = [line for line in logs["logs"] if line.startswith("[hang] ")]
    assert any("hang_attempt" in line and "attempt=1" in line for line in own), logs
    assert any("attempt 1 on its folder" in line for line in own), logs
    assert any("Traceback" in line for line in own) and any("ValueError" in line for line in own)
    assert any("PatientName <redacted>" in line for line in own), logs
    assert "DOE^JANE" not in str(logs) and "PAT-0042" not in str(logs)


def test_a_running_job_cancelled_on_ray_stops_and_the_next_job_runs(tmp_path):
    hang = Path(__file__).parent / "service_data" / "hang.yaml"
    with service(tmp_path, "{kind: ray}", hang) as running, api_client(running) as client:
        job_id = start_job(client, "hang", {"hang": b""})  # hangs until cancelled
        payload = running.config.state / "payloads"
        wait_until(lambda: any(payload.glob("*/input/started-1")), "the stage to start", HANG)
        cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"reason": "wrong study"})
        assert cancelled.json()["state"] == "cancelled"
        executor = running.executors["hang"]
        wait_until(lambda: job_id not in executor.in_flight(), "the actor to let go", HANG)
        after = start_job(client, "hang", {"x": b""})  # on the actor started in its place
        assert wait_for_end(client, after)["state"] == "succeeded"
        assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_a_service_whose_ray_cluster_does_not_answer_is_not_started(tmp_path):
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with (
        pytest.raises(ServiceError) as refused,
        service(tmp_path, f"{{kind: ray, address: '127.0.0.1:{port}'}}"),
    ):
        pass
    message = str(refused.value)
    assert message.startswith(
        f"not started: {tmp_path / 'service.yaml'}: executor.address 127.0.0.1:{port}: no Ray "
        "cluster to connect to (nothing answers at"
    )
    assert not ray.is_initialized()


def test_dataflow_serve_on_ray_stops_cleanly_on_sigterm(tmp_path):
    """Ray's ``ray.init`` sets a SIGTERM handler of its own (exit at once): the service's is
    kept, so SIGTERM still stops it cleanly (jobs finish, exit 0)."""
    path = tmp_path / "service.yaml"
    path.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
        "executor: {kind: ray}\n"
    )
    store = JobStore(tmp_path / "state" / "jobs.db")
    store.create("passthrough", VOLUME.parent, key="k")
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflow.cli", "serve", str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def succeeded() -> bool:
            jobs = JobStore(tmp_path / "state" / "jobs.db")
            try:
                return jobs.counts().get("succeeded") == 1
            finally:
                jobs.close()

        wait_until(succeeded, "the job to succeed on Ray", HANG, poll=0.2)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, output
    assert "service_stopped" in output


def test_the_reference_ct_segmentation_gives_the_same_seg_on_both_executors(tmp_path):
    """``dataflow run pipelines/ct-segmentation.yaml`` with ``--executor ray`` (a runtime
    started for the run) and without: the same SEG (segments, frames, every voxel; its UIDs
    and times are new each run, as with one executor run twice: test_rerun)."""
    write_ct_series(tmp_path / "in" / "study-1", slices=24, size=64, oblique=True, shuffle=True)
    got = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        done = dataflow("run", CT_SEGMENTATION, "-i", tmp_path / "in", "-o", out,
                        "--executor", executor)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        (seg,) = (out / "study-1" / "seg" / "seg").glob("*.dcm")
        names = [f for f in _files(out / "study-1") if not f.endswith(".dcm")]
        got[executor] = (_seg_content(seg), names)
    assert got["ray"] == got["local"]
