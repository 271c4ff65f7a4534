"""The DICOM side over the platform's REST API, against the real service: a study sent with
dcmtk's storescu is listed with its state and the job made of it, and the receiver's
associations — the one that stored it, and one refused for an unknown called AE title — with
who called, from where, how it ended and what it stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from deadlines import HANG, wait_until
from dicom_peers import free_port, storescu

from dataflow.service import Service, load_config
from operators.dicom.phantom import write_ct_series

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "service_data"


def until(predicate, what: str):
    return wait_until(predicate, what, HANG, 0.1)


def test_received_studies_and_associations_over_rest(tmp_path):
    port = free_port()
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  inventory: {DATA / "inventory.yaml"}
api: {{rest-port: 0, grpc-port: null}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    DATAFLOW: {{pipelines: [inventory], group-by: study, timeout: 1}}
  allow:
  - {{ae: STORESCU}}
""")
    study = write_ct_series(tmp_path / "study", slices=4, size=16, seed=5)
    service = Service(load_config(config))
    service.start()
    try:
        client = httpx.Client(base_url=service.platform.urls["rest"], timeout=HANG)
        sent = storescu("127.0.0.1", port, study.files, called="DATAFLOW")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        refused = storescu("127.0.0.1", port, study.files[:1], called="NOBODY")
        assert refused.returncode != 0

        def done():
            studies = client.get("/api/v1/dicom/studies").json()
            jobs = [job for s in studies for job in s["jobs"]]
            return studies if jobs and all(j["state"] == "succeeded" for j in jobs) else None

        (listed,) = until(done, "the study's job to succeed")
        assert (listed["receiver"], listed["group_by"], listed["instances"]) == (
            "plain",
            "study",
            4,
        )
        assert (listed["called_ae"], listed["calling_ae"]) == ("DATAFLOW", "STORESCU")
        assert listed["state"] == "dispatched" and listed["pipelines"] == ["inventory"]
        assert listed["connector"] == "dicom" and len(listed["jobs"]) == 1
        job = client.get(f"/api/v1/jobs/{listed['jobs'][0]['id']}").json()
        assert job["state"] == "succeeded"
        assert client.get("/api/v1/dicom/studies", params={"state": "pending"}).json() == []
        bad = client.get("/api/v1/dicom/studies", params={"state": "sent"})
        assert bad.status_code == 422 and "'sent'" in bad.json()["message"]

        associations = client.get("/api/v1/dicom/associations").json()
        stored = [a for a in associations if a["outcome"] == "released"]
        rejected = [a for a in associations if a["outcome"] == "rejected"]
        assert len(stored) == 1 and stored[0]["stored"] == 4 and stored[0]["failed"] == 0
        assert (stored[0]["calling_ae"], stored[0]["called_ae"]) == ("STORESCU", "DATAFLOW")
        assert stored[0]["peer_host"] == "127.0.0.1" and stored[0]["ended"] >= stored[0]["started"]
        assert len(rejected) == 1 and rejected[0]["called_ae"] == "NOBODY" and rejected[0]["reason"]
        assert associations[0]["ended"] >= associations[-1]["ended"]  # newest first
        # the same in /metrics, from the spool's database (every listener process's)
        wanted = (
            'dataflow_dicom_groups{receiver="plain",state="dispatched"} 1.0',
            'dataflow_dicom_group_instances{receiver="plain",state="dispatched"} 4.0',
            'dataflow_dicom_associations{outcome="released",receiver="plain"} 1.0',
            'dataflow_dicom_associations{outcome="rejected",receiver="plain"} 1.0',
            'dataflow_dicom_association_instances{receiver="plain",status="stored"} 4.0',
        )
        until(
            lambda: all(w in client.get("/metrics").text for w in wanted),
            "the receiver's figures in /metrics",
        )
        client.close()

        dataflow = str(Path(sys.executable).with_name("dataflow"))  # the on-call engineer's view
        api = ["--api", service.platform.urls["rest"]]
        shown = subprocess.run([dataflow, "dicom", "studies", *api], capture_output=True,
                               text=True, timeout=HANG)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "STORESCU" in shown.stdout and "inventory:succeeded" in shown.stdout
        calls = subprocess.run([dataflow, "dicom", "associations", *api], capture_output=True,
                               text=True, timeout=HANG)  # fmt: skip
        assert calls.returncode == 0, calls.stderr
        assert "released" in calls.stdout and "rejected" in calls.stdout
        assert "NOBODY" in calls.stdout
    finally:
        service.stop()
