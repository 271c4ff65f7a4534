"""The issue's "done when": `dataflow serve` receives a study over DICOM — from dcmtk's
storescu and from Orthanc acting as a PACS — runs the pipeline its AE title routes to, and
the resulting SEG arrives in Orthanc; `dataflow jobs` lists the jobs; SIGTERM stops it."""

from __future__ import annotations

import signal
from pathlib import Path

import pydicom
import pytest
from cli import jobs, serve, study_sent, wait_serving
from deadlines import HANG, LONG_HANG
from dicom_peers import free_port, start_orthanc, storescu, wait_for_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def service_yaml(tmp_path: Path, port: int, orthanc) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  ct-segmentation: {ROOT / "pipelines" / "ct-segmentation.yaml"}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: 104}}
  ae-titles:
    DATAFLOW-SEG: {{pipelines: [ct-segmentation], group-by: study, timeout: 1}}
  allow:
  - {{ae: ORTHANC, host: 127.0.0.1}}
  - {{ae: STORESCU}}
  destinations:
    PACS: {{ae: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
  export: {{retry-initial: 0.5, retry-max: 2, deadline: 120}}
""")
    return path


def segs_in(orthanc) -> list[dict]:
    tags = [orthanc.rest("GET", f"/instances/{i}/simplified-tags") for i in orthanc.instances()]
    return [t for t in tags if t.get("Modality") == "SEG"]


def test_a_study_from_storescu_and_one_from_orthanc_come_back_to_orthanc_as_segs(
    private_network, tmp_path
):
    port = free_port()
    first = write_ct_series(tmp_path / "study-1", slices=16, size=64, seed=21, oblique=True)
    second = write_ct_series(tmp_path / "study-2", slices=12, size=64, seed=22)
    modalities = {"dataflow": ("DATAFLOW-SEG", "127.0.0.1", port)}
    with start_orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
        config = service_yaml(tmp_path, port, orthanc)
        receivers = f"dicom.receivers=[{{name: plain, host: 127.0.0.1, port: {port}}}]"
        proc = serve(config, tmp_path / "serve.log", "--set", receivers)
        try:
            wait_for_port(port, proc=proc, timeout=LONG_HANG)
            # 1. a modality pushes a study with dcmtk's storescu
            sent = storescu("127.0.0.1", port, first.files, called="DATAFLOW-SEG")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            seg = wait_serving(
                lambda: segs_in(orthanc), LONG_HANG, "the first SEG in Orthanc", proc
            )
            assert seg[0]["StudyInstanceUID"] == first.study_instance_uid
            # 2. Orthanc, as a PACS, sends a study it holds
            ids = [orthanc.upload(p)["ID"] for p in second.files]
            orthanc.store_to("dataflow", ids)
            segs = wait_serving(lambda: len(segs_in(orthanc)) == 2 and segs_in(orthanc), LONG_HANG,
                            "the second SEG in Orthanc", proc)  # fmt: skip
            assert {s["StudyInstanceUID"] for s in segs} == {
                first.study_instance_uid, second.study_instance_uid,
            }  # fmt: skip
            records = jobs(config)
            assert len(records) == 2 and {r["state"] for r in records} == {"succeeded"}
            assert {r["source"]["calling_ae"] for r in records} == {"STORESCU", "ORTHANC"}
            assert {r["source"]["called_ae"] for r in records} == {"DATAFLOW-SEG"}
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=HANG)
        output = (tmp_path / "serve.log").read_text()
        assert code == 0, output[-5000:]
        assert "service_stopped" in output
        for name in ("Phantom^Synthetic", "PHANTOM-21", "PHANTOM-22"):
            assert name not in output  # no patient identifiers in the logs
    # the SEG that arrived is the pipeline's, referencing the source series
    state = tmp_path / "state" / "jobs"
    written = sorted(state.glob("*/seg/seg/*.dcm"))
    assert len(written) == 2
    assert {pydicom.dcmread(p).ReferencedSeriesSequence[0].SeriesInstanceUID for p in written} == {
        first.series_instance_uid, second.series_instance_uid,
    }  # fmt: skip


def test_a_study_over_dicom_runs_on_ray_and_its_seg_comes_back_to_orthanc(
    private_network, tmp_path
):
    """``executor: {kind: ray}``: the receiver, the job records and the exporter stay in the
    service; the pipeline's stages run as Ray actors (a runtime started for the service on
    loopback); the SEG goes back to the PACS as with the local executor."""
    pytest.importorskip("ray")
    port = free_port()
    study = write_ct_series(tmp_path / "study", slices=12, size=64, seed=23)
    with start_orthanc(tmp_path / "orthanc", modalities={}) as orthanc:
        config = service_yaml(tmp_path, port, orthanc)
        text = config.read_text().replace("port: 104}", f"port: {port}}}")
        config.write_text(text + "executor: {kind: ray}\n")
        ray_env = {"RAY_AUTH_MODE": "disabled"}
        with study_sent(config, study.files, port, "DATAFLOW-SEG", "succeeded", ray_env) as (
            proc,
            record,
        ):
            [seg] = wait_serving(lambda: segs_in(orthanc), LONG_HANG, "the SEG in Orthanc", proc)
            assert seg["StudyInstanceUID"] == study.study_instance_uid
            assert record["source"]["called_ae"] == "DATAFLOW-SEG"
        output = (tmp_path / "serve.log").read_text()
        assert proc.returncode == 0, output[-5000:]  # stopped by SIGTERM
        assert "ray_connected" in output and "service_stopped" in output
        for name in ("Phantom^Synthetic", "PHANTOM-23"):
            assert name not in output  # no patient identifiers in the service's log
    [written] = sorted((tmp_path / "state" / "jobs").glob("*/seg/seg/*.dcm"))
    assert pydicom.dcmread(written).ReferencedSeriesSequence[0].SeriesInstanceUID == (
        study.series_instance_uid
    )
