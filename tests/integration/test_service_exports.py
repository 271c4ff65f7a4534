"""A result's export state per destination, as the exporting connector reports it through
``ServiceHost.export_progress``: ``dataflow jobs`` shows a dead-lettered result with its job
(no longer simply "succeeded"), the metrics count it and ``dataflow health`` says it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli import dataflow
from deadlines import wait_until

from dataflow.service import JobStore, Service, ServiceHost, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "pipelines" / "samples" / "volumes"


def wait_for(predicate):
    wait_until(predicate, "condition met", poll=0.05)


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


@pytest.mark.slow
def test_dataflow_exports_lists_a_dead_letter_and_resends_it(private_network, tmp_path):
    """A result whose PACS stayed down past the deadline is dead-lettered: `dataflow jobs`
    says so with its job, `dataflow exports --state dead` lists it; once the PACS is back,
    `dataflow exports --resend` (another process, the service running) sends it, and the job
    then shows `export PACS: sent`. An unknown task is refused with exit code 1."""
    from dicom_peers import free_port, start_storescp

    from operators.dicom.phantom import write_ct_series
    from operators.register import register_files

    state, port = tmp_path / "state", free_port()  # nobody listens there yet
    write_ct_series(tmp_path / "seg", slices=2, size=16, seed=7)  # what a pipeline registered
    store = JobStore(state / "jobs.db")
    job, _ = store.create("passthrough", SAMPLES / "study-a", key="a")
    store.finished(job.id, True)
    task = state / "jobs" / job.id / "register" / "task"
    task_id = register_files(
        tmp_path / "seg", task, agent="ClaraSCU", destinations=["PACS"], job_id=job.id
    )["taskId"]
    store.add_export(task_id, job.id, "ClaraSCU", task)  # handed over at start
    store.close()
    config = tmp_path / "service.yaml"
    config.write_text(
        f"state: {state}\n"
        f"pipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
        "dicom:\n"
        "  receivers: [{name: plain, host: 127.0.0.1, port: 0}]\n"
        "  ae-titles: {DATAFLOW: {pipelines: [passthrough]}}\n"
        f"  destinations: {{PACS: {{ae: STORESCP, host: 127.0.0.1, port: {port}}}}}\n"
        "  export: {retry-initial: 0.2, retry-max: 0.2, deadline: 1}\n"
    )

    def export_line() -> str:
        out = dataflow("jobs", config).stdout
        return next(line for line in out.splitlines() if line.startswith(job.id))

    service = Service(load_config(config))
    service.start()
    try:
        wait_for(lambda: export_line().endswith("export PACS: dead"))
        listed = dataflow("exports", config, "--state", "dead", "--json")
        assert listed.returncode == 0, listed.stderr
        (dead,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert (dead["job_id"], dead["destination"], dead["state"]) == (job.id, "PACS", "dead")
        assert dead["instances"] == 2 and dead["last_error"]
        assert dataflow("health", config).returncode == 1  # a dead letter needs an operator
        wrong = dataflow("exports", config, "--state", "gone")
        assert wrong.returncode == 2 and "unknown export state 'gone'" in wrong.stderr
        refused = dataflow("exports", config, "--resend", "no-such-task")
        assert refused.returncode == 2 and "no-such-task" in refused.stderr
        with start_storescp(tmp_path / "pacs", port=port) as pacs:  # the PACS is back
            resent = dataflow("exports", config, "--resend", dead["task_id"])
            assert resent.returncode == 0, resent.stderr
            wait_for(lambda: export_line().endswith("export PACS: sent"))
            assert len(pacs.files()) == 2
        assert dataflow("exports", config, "--state", "dead", "--json").stdout.strip() == ""
    finally:
        service.stop()


def test_a_result_whose_task_json_is_wrong_is_said_and_left_at_start(tmp_path):
    """A registered result whose ``task.json`` has a wrong field does not stop the service
    from starting: ``export_task_invalid`` names the file and the field, and the export stays
    ``new`` (read again at the next start, once someone mended it); a good one beside it is
    handed over as before (no connector serves ClaraSCU here: ``no-agent``)."""
    import structlog

    from operators.register import register_files

    state = tmp_path / "state"
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "a.dcm").write_bytes(b"registered")
    store = JobStore(state / "jobs.db")
    job, _ = store.create("passthrough", SAMPLES / "study-a", key="a")
    store.finished(job.id, True)
    good = state / "jobs" / job.id / "register" / "good"
    good_id = register_files(
        tmp_path / "seg", good, agent="ClaraSCU", destinations=["PACS"], job_id=job.id
    )["taskId"]
    bad = state / "jobs" / job.id / "register" / "bad"
    bad.mkdir(parents=True)
    (bad / "task.json").write_text(json.dumps({"taskId": "t-bad", "agent": "ClaraSCU",
                                               "uris": "a.dcm"}))  # fmt: skip
    store.add_export(good_id, job.id, "ClaraSCU", good)
    store.add_export("t-bad", job.id, "ClaraSCU", bad)
    store.close()
    config = tmp_path / "service.yaml"
    config.write_text(
        f"state: {state}\npipelines:\n  passthrough: {ROOT / 'pipelines' / 'passthrough.yaml'}\n"
    )
    service = Service(load_config(config))
    with structlog.testing.capture_logs() as logs:
        service.start()
    try:
        states = {e["task_id"]: e["state"] for e in service.jobs.exports()}
        assert states == {good_id: "no-agent", "t-bad": "new"}
        (said,) = [e for e in logs if e["event"] == "export_task_invalid"]
        assert said["job_id"] == job.id
        assert said["error"] == (
            f"{bad / 'task.json'}: field 'uris' must be a list of strings; got 'a.dcm'"
        )
    finally:
        service.stop()
