"""``dataflow load`` against a real ``dataflow serve`` (its DICOM receiver and REST API), with
dcmtk's ``storescp`` as the PACS: studies from two simulated modalities each end with a job,
its stages' times and the SEG's arrival in the PACS in the results file; jobs through the API
keep the priorities asked for; a service that is down is named. Latencies are reported by the
run, never asserted against a bound."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pydicom
import pytest
from cli import dataflow, serve
from deadlines import HANG, LONG_HANG
from dicom_peers import free_port, start_storescp, wait_for_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parent / "service_data"


@pytest.fixture(scope="module")
def served(private_network, tmp_path_factory):
    """``dataflow serve`` with ct-segmentation behind the AE title DATAFLOW-SEG (results to a
    storescp PACS), the inventory pipeline for API jobs and one whose stage cannot start:
    (its DICOM port, its REST URL, the PACS, the folder)."""
    tmp = tmp_path_factory.mktemp("load")
    port = free_port()
    with start_storescp(tmp / "pacs", aet="PACS") as pacs:
        config = tmp / "service.yaml"
        config.write_text(f"""
state: {tmp / "state"}
pipelines:
  ct-segmentation: {ROOT / "pipelines" / "ct-segmentation.yaml"}
  inventory: {DATA / "inventory.yaml"}
  broken: {DATA / "broken.yaml"}
api: {{rest-port: 0, grpc-port: null}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    DATAFLOW-SEG: {{pipelines: [ct-segmentation], group-by: study, timeout: 1}}
  allow:
  - {{ae: LOAD1}}
  - {{ae: LOAD2}}
  destinations:
    PACS: {{ae: PACS, host: 127.0.0.1, port: {pacs.port}}}
  export: {{retry-initial: 0.5, retry-max: 2, deadline: 120}}
""")
        proc = serve(config, tmp / "serve.log")
        try:
            wait_for_port(port, proc=proc, timeout=LONG_HANG)
            api_file = tmp / "state" / "api.json"
            deadline = time.monotonic() + LONG_HANG
            while not api_file.is_file():
                assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "dataflow serve did not start its API"
                time.sleep(0.1)
            yield port, json.loads(api_file.read_text())["rest"], pacs, tmp
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=HANG)


def read_results(path: Path) -> tuple[dict, list[dict], dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [lines[0]["record"], lines[-1]["record"]] == ["run", "summary"]
    assert {line["record"] for line in lines[1:-1]} == {"study"}
    return lines[0], lines[1:-1], lines[-1]


def test_two_modalities_send_three_studies_each_followed_to_the_pacs(served):
    port, api, pacs, tmp = served
    results = tmp / "dicom-results.jsonl"
    run = dataflow("load", "--dicom", f"127.0.0.1:{port}", "--called", "DATAFLOW-SEG",
                   "--modalities", 2, "--count", 3, "--slices", 12, "--size", 48,
                   "--api", api, "--results", results, timeout=LONG_HANG)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    head, studies, summary = read_results(results)
    assert head["options"]["mode"] == "dicom" and head["options"]["modalities"] == 2
    assert [s["index"] for s in studies] == [0, 1, 2]
    assert {s["sender"] for s in studies} <= {"LOAD1", "LOAD2"}
    assert len({s["job_id"] for s in studies}) == 3  # fresh UIDs: each study its own job
    for s in studies:
        assert s["ok"] and s["state"] == "succeeded" and s["pipeline"] == "ct-segmentation"
        assert s["instances"] == 12
        assert s["sent"] <= s["created"] <= s["started"] <= s["finished"] <= s["pacs"]
        assert [e["state"] for e in s["exports"]] == ["sent"]
        assert s["stages"], "each stage's start and end"
        for stage in s["stages"]:
            assert stage["ok"] and stage["start"] <= stage["end"]
        assert s["latency"] == pytest.approx(s["pacs"] - s["sent"], abs=1e-5)
    assert summary["studies"] == summary["done"] == 3 and summary["failed"] == 0
    assert summary["latency"]["latency"]["n"] == 3 and summary["studies_per_hour"] > 0
    assert "done 3" in run.stderr  # the plain progress lines (no terminal)
    assert json.loads(run.stdout) == summary  # the summary, for scripts
    # the three SEGs are in the PACS, each of its own study
    segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]
    segs = [ds for ds in segs if ds.Modality == "SEG"]
    assert len({ds.StudyInstanceUID for ds in segs}) == 3
    # no patient identifiers and no UIDs in the results file
    text = results.read_text()
    for ds in segs:
        assert ds.StudyInstanceUID not in text
    for name in ("Phantom^Synthetic", "PHANTOM-"):
        assert name not in text


def test_a_study_folder_is_sent_with_fresh_uids_each_time(served):
    port, api, pacs, tmp = served
    source = write_ct_series(tmp / "source-study", slices=8, size=32, seed=3)
    before = set(pacs.files())
    results = tmp / "folder-results.jsonl"
    run = dataflow("load", "--dicom", f"127.0.0.1:{port}", "--called", "DATAFLOW-SEG",
                   "--study", Path(source.files[0]).parent, "--count", 2, "--api", api,
                   "--results", results, timeout=LONG_HANG)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    _, studies, summary = read_results(results)
    assert summary["done"] == 2 and [s["instances"] for s in studies] == [8, 8]
    assert studies[0]["job_id"] != studies[1]["job_id"]
    segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in set(pacs.files()) - before]
    referenced = {ds.ReferencedSeriesSequence[0].SeriesInstanceUID for ds in segs}
    assert len(referenced) == 2 and source.series_instance_uid not in referenced
    assert {ds.StudyInstanceUID for ds in segs}.isdisjoint({source.study_instance_uid})
    # a folder that is not there is named
    missing = tmp / "no-such-study"
    run = dataflow("load", "--dicom", f"127.0.0.1:{port}", "--called", "DATAFLOW-SEG",
                   "--study", missing, "--api", api, "--results", tmp / "none.jsonl")  # fmt: skip
    assert run.returncode == 2 and f"--study {missing}: no such folder" in run.stderr


def test_api_jobs_with_payloads_keep_their_priorities(served):
    _, api, _, tmp = served
    study = write_ct_series(tmp / "api-study", slices=3, size=16, seed=7)
    results = tmp / "api-results.jsonl"
    run = dataflow("load", "--pipeline", "inventory", "--input", Path(study.files[0]).parent,
                   "--count", 4, "--priority", "lower", "--priority", "higher", "--api", api,
                   "--delay", 0.05, "--results", results)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    head, studies, summary = read_results(results)
    assert head["options"]["mode"] == "api"
    assert [s["priority"] for s in studies] == ["lower", "higher", "lower", "higher"]
    offered = [s["offered"] - studies[0]["offered"] for s in studies]
    assert offered == pytest.approx([0.0, 0.05, 0.1, 0.15])  # the schedule, not the clock
    assert summary["done"] == 4 and summary["failures"] == {}
    for s in studies:
        assert s["state"] == "succeeded" and s["instances"] == 3 and s["pacs"] is None
        assert [stage["stage"] for stage in s["stages"]] == ["inventory"]
        shown = dataflow("jobs", "status", s["job_id"], "--json", "--api", api)
        assert json.loads(shown.stdout)["priority"] == s["priority"]


def test_failures_are_counted_by_reason(served):
    _, api, _, tmp = served
    results = tmp / "failed-results.jsonl"
    run = dataflow("load", "--pipeline", "broken", "--count", 2, "--api", api,
                   "--results", results)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    _, studies, summary = read_results(results)
    assert summary["failures"] == {"job failed in broken": 2} and summary["done"] == 0
    assert [s["state"] for s in studies] == ["failed", "failed"]
    run = dataflow("load", "--pipeline", "no-such-pipeline", "--api", api,
                   "--results", results)  # fmt: skip
    assert run.returncode == 1
    assert read_results(results)[2]["failures"] == {"send failed: API HTTP 404": 1}


def test_a_service_that_is_down_is_named(served):
    _, api, _, tmp = served
    nobody = f"http://127.0.0.1:{free_port()}"
    run = dataflow("load", "--pipeline", "inventory", "--api", nobody,
                   "--results", tmp / "none.jsonl")  # fmt: skip
    assert run.returncode == 2 and f"no dataflow API at {nobody}" in run.stderr
    closed = free_port()
    run = dataflow("load", "--dicom", f"127.0.0.1:{closed}", "--called", "DATAFLOW-SEG",
                   "--api", api, "--results", tmp / "none.jsonl")  # fmt: skip
    assert run.returncode == 2 and f"127.0.0.1:{closed}" in run.stderr, run.stderr
