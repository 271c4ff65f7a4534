"""`dataflow serve` against a stage that hangs or fails: SIGTERM stops the service within its
shutdown grace and the job cut short stays resumable (with its history) until max-attempts,
a stage time-out fails the hung job and the one behind it runs, and a failure's traceback is
kept with its job, free of patient identifiers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli import dataflow, jobs, serve, wait_serving
from deadlines import HANG, LONG_HANG

from dataflow.service import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).parent / "service_data"
PHI = ("DOE^JANE", "PAT-0042")


def setup(tmp_path: Path, limits: str, *folders: tuple[str, str]) -> tuple[Path, dict]:
    """A service file for the hang pipeline, and a queued job per (name, marker) folder."""
    config = tmp_path / "service.yaml"
    config.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines: {{hang: {DATA / 'hang.yaml'}}}\n"
        f"limits: {limits}\n"
        "log: {format: json}\n"
    )
    store = JobStore(tmp_path / "state" / "jobs.db")
    ids = {}
    for name, marker in folders:
        folder = tmp_path / name
        folder.mkdir()
        if marker:
            (folder / marker).touch()
        ids[name] = store.create("hang", folder, key=name)[0].id
    store.close()
    return config, ids


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=HANG)  # the grace is 1 s: this only catches a hang


def record(config: Path, job_id: str) -> dict:
    return next(job for job in jobs(config) if job["id"] == job_id)


def test_sigterm_cuts_a_hung_job_short_and_max_attempts_fails_it_at_start(tmp_path):
    config, ids = setup(tmp_path, "{shutdown-grace: 1s, max-attempts: 2}", ("stuck", "hang"))
    log, stuck = tmp_path / "serve.log", tmp_path / "stuck"
    for attempt in (1, 2):
        # the second time the grace is an hour: a second SIGTERM cuts the job short at once
        proc = serve(config, log, *(["--set", "limits.shutdown-grace=1h"] if attempt == 2 else []))
        try:
            wait_serving(lambda a=attempt: (stuck / f"started-{a}").exists(), LONG_HANG,
                         f"attempt {attempt} running", proc)  # fmt: skip
            if attempt == 1:
                health = dataflow("health", config)
                assert health.returncode == 0, health.stdout + health.stderr
                assert health.stdout.startswith("healthy")
                metrics = (tmp_path / "state" / "metrics.prom").read_text()
                assert 'dataflow_jobs{pipeline="hang",state="running"} 1.0' in metrics
            else:
                proc.send_signal(signal.SIGTERM)
                wait_serving(lambda: log.read_text().count('"service_stopping"') == 2, LONG_HANG,
                             "the first signal handled", proc)  # fmt: skip
        finally:
            code = stop(proc)
        assert code == 0, log.read_text()[-3000:]
        job = record(config, ids["stuck"])
        assert job["state"] == "running" and job["attempts"] == attempt  # resumable
        assert [e["event"] for e in job["history"]] == ["cut_short"] * attempt
        assert job["history"][-1]["what"] == "cut short by shutdown at stage hang"
    assert dataflow("health", config).returncode == 2  # not running
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.count("shutdown_grace_passed") == 1 and events.count("service_aborting") == 1
    proc = serve(config, log)  # the third start: two attempts were cut short, it fails
    try:
        wait_serving(lambda: record(config, ids["stuck"])["state"] == "failed", LONG_HANG,
                     "the job failed at start", proc)  # fmt: skip
    finally:
        assert stop(proc) == 0
    job = record(config, ids["stuck"])
    assert job["error"] == (
        "not resumed: 2 attempts were cut short (attempt 1: cut short by shutdown at stage hang;"
        " attempt 2: cut short by shutdown at stage hang)"
    )
    assert [e["event"] for e in job["history"]] == ["cut_short", "cut_short", "not_resumed"]
    assert not (stuck / "started-3").exists()
    shown = dataflow("jobs", config, "--show", ids["stuck"])
    assert "attempt 2: cut short by shutdown" in shown.stdout, shown.stdout


def test_a_stage_timeout_fails_the_hung_job_and_keeps_a_failures_details(tmp_path):
    """The hung job fails when the stage time-out set in the service file passes; the job
    behind it on the same worker succeeds; a job whose stage raised keeps its traceback with
    its record, and neither the record nor the log carries the patient's name or ID; the
    time-out and the worker killed under a job are counted in the metrics."""
    config, ids = setup(
        tmp_path, "{stage-timeout: 2s}", ("stuck", "hang"), ("innocent", ""), ("phi", "fail"),
        ("crash", "crash"),
    )  # fmt: skip
    log = tmp_path / "serve.log"
    proc = serve(config, log)
    try:
        wait_serving(
            lambda: all(job["state"] in ("succeeded", "failed") for job in jobs(config)),
            LONG_HANG, "every job finished", proc,
        )  # fmt: skip
    finally:
        assert stop(proc) == 0
    stuck, innocent, phi, crash = (
        record(config, ids[name]) for name in ("stuck", "innocent", "phi", "crash")
    )
    assert stuck["state"] == "failed" and "timed out" in stuck["error"], stuck
    assert innocent["state"] == "succeeded", innocent
    assert phi["state"] == "failed" and phi["stage"] == "hang"
    assert "Traceback" in phi["details"] and "raise ValueError(" in phi["details"]
    assert "(0010,0010) <redacted>" in phi["error"] + phi["details"]
    text = log.read_text() + json.dumps(jobs(config))
    assert not any(secret in text for secret in PHI)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["event"] == "job_finished" and not line["ok"]]
    assert {line["job_id"] for line in failed} == {ids["stuck"], ids["phi"], ids["crash"]}
    assert all(line["level"] == "error" and line["error"] for line in failed)
    shown = dataflow("jobs", config, "--show", ids["phi"])
    assert "details:" in shown.stdout and "Traceback" in shown.stdout
    assert crash["state"] == "failed" and "signal 9" in crash["error"], crash
    metrics = (tmp_path / "state" / "metrics.prom").read_text()
    assert 'dataflow_stage_timeouts_total{pipeline="hang"} 1.0' in metrics
    died = [line for line in metrics.splitlines() if line.startswith("dataflow_worker_died_total")]
    assert died and float(died[0].split()[-1]) >= 1, died  # the crash (and the time-out's kill)


def test_a_stage_that_cannot_start_is_reported_by_health_and_the_other_pipeline_runs(tmp_path):
    """The service starts with a pipeline whose stage cannot be constructed: its health file
    and `dataflow health` (exit 1) say which stage and why, its jobs fail with that reason,
    and the other pipeline's jobs succeed."""
    from dataflow.service import Service, load_config

    config = tmp_path / "service.yaml"
    config.write_text(
        f"state: {tmp_path / 'state'}\n"
        f"pipelines: {{hang: {DATA / 'hang.yaml'}, broken: {DATA / 'broken.yaml'}}}\n"
    )
    for name in ("ok", "refused"):
        (tmp_path / name).mkdir()
    service = Service(load_config(config))
    service.start()
    try:
        health = dataflow("health", config)
        assert health.returncode == 1, health.stdout
        assert "problem: pipeline broken: stage broken is broken" in health.stdout
        assert "missing.onnx" in health.stdout
        ok = service.submit("hang", tmp_path / "ok", source={}, key="ok")
        refused = service.submit("broken", tmp_path / "refused", source={}, key="refused")
        wait_serving(lambda: service.jobs.get(refused.id).state == "failed", LONG_HANG,
                     "the job at the broken stage failed", None)  # fmt: skip
        wait_serving(lambda: service.jobs.get(ok.id).state == "succeeded", LONG_HANG,
                     "the other pipeline's job", None)  # fmt: skip
        failed = service.jobs.get(refused.id)
        assert failed.stage == "broken" and "missing.onnx" in failed.error + failed.details
    finally:
        service.stop()


def test_sigterm_to_the_whole_process_group_lets_the_running_job_finish(tmp_path):
    """systemd (KillMode=control-group) and a terminal's Ctrl-C signal every process of the
    service at once: the workers leave stopping to the service, so the job in flight still
    finishes within the shutdown grace instead of losing its workers."""
    config, ids = setup(tmp_path, "{shutdown-grace: 1h}", ("slow", "hang"))
    log, slow = tmp_path / "serve.log", tmp_path / "slow"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataflow.cli", "serve", str(config)],
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_serving(lambda: (slow / "started-1").exists(), LONG_HANG, "the job running", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the group, as systemd does
        wait_serving(lambda: '"service_stopping"' in log.read_text(), LONG_HANG,
                     "the signal handled", proc)  # fmt: skip
        (slow / "hang").unlink()  # the job can finish now, well within its grace
        code = proc.wait(timeout=LONG_HANG)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert record(config, ids["slow"])["state"] == "succeeded", text[-3000:]
    assert "worker_died" not in text and "cut_short" not in text
