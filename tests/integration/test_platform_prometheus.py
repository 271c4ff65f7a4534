"""A real Prometheus (Debian's ``prometheus``, a plain process on loopback) scrapes the
service's ``/metrics`` on the REST port while jobs run; its figures after them match the job
records and the API's own counters, and every query of examples/grafana-dashboard.json is
valid PromQL. Skipped where Prometheus is not installed."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.platform_service import HANG, api_client, platform_service

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="needs Prometheus (Debian package prometheus)"),
]  # fmt: skip

ROOT = Path(__file__).parents[2]
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prometheus_scrapes_jobs_and_api_figures(tmp_path):
    pipelines = {"passthrough": ROOT / "pipelines" / "passthrough.yaml"}
    with platform_service(tmp_path, pipelines) as service, api_client(service) as client:
        target = service.platform.urls["rest"].removeprefix("http://")
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"- job_name: dataflow\n  static_configs: [{{targets: ['{target}']}}]\n"
        )
        log = tmp_path / "prometheus.log"
        with open(log, "w") as out:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            jobs = []
            for _ in range(3):
                made = client.post("/api/v1/jobs", json={"pipeline": "passthrough"}).json()
                client.put(f"/api/v1/payloads/{made['payload_id']}/files/input/volume.npy",
                           content=VOLUME.read_bytes())  # fmt: skip
                client.post(f"/api/v1/jobs/{made['job_id']}/start")
                jobs.append(made["job_id"])
            deadline = time.monotonic() + HANG
            while any(client.get(f"/api/v1/jobs/{j}").json()["state"] != "succeeded"
                      for j in jobs):  # fmt: skip
                assert time.monotonic() < deadline, "the jobs did not end"
                time.sleep(0.1)

            def query(expr: str) -> float | None:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                       params={"query": expr}, timeout=HANG).json()  # fmt: skip
                except httpx.TransportError:
                    return None  # not listening yet
                result = answer.get("data", {}).get("result", [])
                return float(result[0]["value"][1]) if result else None

            succeeded = 'dataflow_jobs{job="dataflow",pipeline="passthrough",state="succeeded"}'
            uploads = 'sum(dataflow_api_requests_total{method="PUT",status="201"})'
            passthrough = 'pipeline="passthrough"'
            wanted = {
                'up{job="dataflow"}': 1.0, succeeded: 3.0, uploads: 3.0,
                # the coordinator's own figures per stage and job: each counted once
                f'dataflow_stage_items_total{{{passthrough},stage="compare"}}': 3.0,
                f'dataflow_stage_seconds_count{{{passthrough},stage="npy-to-array"}}': 3.0,
                f'sum(dataflow_stage_failures_total{{{passthrough}}})': 0.0,
                f'sum(dataflow_stage_queued{{{passthrough}}})': 0.0,
                f'dataflow_job_seconds_count{{{passthrough},outcome="succeeded"}}': 3.0,
                f'dataflow_store_budget_bytes{{{passthrough}}} > bool 0': 1.0,
            }  # fmt: skip
            seen: dict[str, float | None] = {}
            while seen != wanted:
                assert prometheus.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"Prometheus saw {seen}, not {wanted}"
                time.sleep(0.2)
                seen = {expr: query(expr) for expr in wanted}
            dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
            for panel in dashboard["panels"]:  # every query of the dashboard is valid PromQL
                for target in panel["targets"]:
                    url = f"http://127.0.0.1:{port}/api/v1/query"
                    params = {"query": target["expr"]}
                    answer = httpx.get(url, params=params, timeout=HANG).json()
                    assert answer["status"] == "success", (panel["title"], answer)
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=HANG)
