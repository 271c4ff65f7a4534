"""Retention in `dataflow serve`, as a hospital runs it: after a study's job has finished and
its retention is over, the job's outputs and the received study are deleted from disk, the
records stay, and a result the PACS has not taken yet is still in the export outbox."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from cli import jobs, serve, wait_serving
from deadlines import HANG, LONG_HANG
from dicom_peers import free_port, storescu, wait_for_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_finished_jobs_and_their_studies_are_reclaimed_but_not_unsent_results(tmp_path):
    port, pacs = free_port(), free_port()  # nothing listens on the PACS port: exports wait
    state = tmp_path / "state"
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {state}
pipelines:
  ct-segmentation: {ROOT / "pipelines" / "ct-segmentation.yaml"}
retention: {{succeeded: 2s, failed: 2s, interval: 0.5s}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    DATAFLOW-SEG: {{pipelines: [ct-segmentation], group-by: study, timeout: 1}}
  allow:
  - {{ae: STORESCU}}
  destinations:
    PACS: {{ae: PACS, host: 127.0.0.1, port: {pacs}}}
  export: {{retry-initial: 30, retry-max: 60, deadline: 3600}}
""")
    study = write_ct_series(tmp_path / "study", slices=12, size=48, seed=31)
    proc = serve(config, tmp_path / "serve.log")
    try:
        wait_for_port(port, proc=proc, timeout=LONG_HANG)
        sent = storescu("127.0.0.1", port, study.files, called="DATAFLOW-SEG")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        spool = state / "dicom" / "spool" / "plain"
        (job,) = wait_serving(
            lambda: [j for j in jobs(config) if j["reaped"]], LONG_HANG, "the job reaped", proc
        )
        assert job["state"] == "succeeded" and job["source"]["connector"] == "dicom"
        assert job["reaped"] - job["finished"] >= 2  # not before its retention
        assert not (state / "jobs" / job["id"]).exists()  # the job's outputs
        wait_serving(
            lambda: not list(spool.glob("DATAFLOW-SEG/*")), LONG_HANG, "the study removed", proc
        )
        assert job["payload"].startswith(str(spool / "DATAFLOW-SEG"))  # that was the study
        with sqlite3.connect(spool / "receiver.sqlite") as db:
            groups = db.execute("SELECT state FROM groups").fetchall()
            instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        assert groups == [("reclaimed",)] and instances == 0
        # the SEG the PACS has not taken yet is still queued, in the outbox's own copy
        queued = list((state / "dicom" / "outbox").rglob("*.dcm"))
        assert len(queued) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=HANG)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output[-5000:]
    assert "job_reaped" in output and "group_reclaimed" in output
