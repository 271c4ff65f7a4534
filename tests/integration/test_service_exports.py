"""A result's export state per destination, as the exporting connector reports it through
``ServiceHost.export_progress``: ``dataflow jobs`` shows a dead-lettered result with its job
(no longer simply "succeeded"), the metrics count it and ``dataflow health`` says it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli import dataflow

from dataflow.service import Service, ServiceHost, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "pipelines" / "samples" / "volumes"


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_a_dead_lettered_result_shows_with_its_job_in_metrics_and_health(tmp_path):
    config = tmp_path / "service.yaml"
    config.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
    )
    service = Service(load_config(config))
    service.health_interval = 3600.0  # written at each change only: what the test waits for
    service.start()
    try:
        job = service.submit("passthrough", SAMPLES / "study-a", source={}, key="a")
        wait_for(lambda: service.jobs.get(job.id).state == "succeeded")
        service.jobs.add_export("task-1", job.id, "ClaraSCU", tmp_path)  # as RegisterResults
        host = ServiceHost(service, "dicom")  # what the exporting connector holds
        host.export_progress("task-1", "PACS", "pending")
        host.export_progress("task-1-WEB", "WEB", "sent")  # the outbox's own task id
        healthy = dataflow("health", config)
        assert healthy.returncode == 0, healthy.stdout
        host.export_progress(
            "task-1", "PACS", "dead", "deadline passed: (0010,0020) Patient ID LO: 'PAT-9'"
        )
        metrics = tmp_path / "state" / "metrics.prom"
        wait_for(lambda: 'dataflow_dead_letters{destination="PACS"} 1.0' in metrics.read_text())
        health = dataflow("health", config)
        assert health.returncode == 1, health.stdout
        assert "destination PACS: 1 result(s) dead-lettered" in health.stdout
        listing = dataflow("jobs", config)
        line = next(text for text in listing.stdout.splitlines() if text.startswith(job.id))
        assert "succeeded" in line and line.endswith("export PACS: dead, WEB: sent")
        assert "    export PACS dead: deadline passed: (0010,0020) <redacted>" in listing.stdout
        (record,) = [json.loads(text) for text in dataflow("jobs", config, "--json").stdout
                     .splitlines()]  # fmt: skip
        assert [(e["destination"], e["state"]) for e in record["exports"]] == [
            ("PACS", "dead"), ("WEB", "sent"),
        ]  # fmt: skip
        assert "PAT-9" not in json.dumps(record)
    finally:
        service.stop()
    assert dataflow("health", config).returncode == 2  # stopped
