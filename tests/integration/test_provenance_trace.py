"""Issue 16's "done when" for provenance: `dataflow serve` receives a study from dcmtk's
storescu, ct-segmentation makes a SEG that goes back to the PACS (a real Orthanc), and
`dataflow trace` on the SEG's SOP Instance UID (CLI and API) says exactly what made it — the
job, the inputs' hash, the stages in order with versions and parameters — as the SEG's own
Contributing Equipment Sequence does; dciodvfy finds no error in it. And with a model:
`dataflow run` of ct-inference with a model of the repository records its name, version and
hash, which the SEG names as its segments' algorithm."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import pydicom
import pytest
from cli import jobs, serve, wait_serving
from deadlines import HANG, LONG_HANG
from dicom_peers import free_port, start_orthanc, storescu, wait_for_port
from test_serve_dicom import service_yaml

from dataflow.models import ModelRepository
from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
STAGES = ["load", "smooth", "tissue", "body-tissue", "body", "low-density", "dense", "bone",
          "label-lung", "label-bone", "seg", "register-dicom-output"]  # fmt: skip


def dciodvfy_errors(path: Path) -> list[str]:
    assert shutil.which("dciodvfy"), "dicom3tools' dciodvfy is needed (.ci/run installs it)"
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=HANG)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def trace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataflow.cli", "trace", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG)  # fmt: skip


def uids_hash(files) -> str:
    uids = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files)
    return hashlib.sha256("".join(f"{u}\n" for u in uids).encode()).hexdigest()


def ours(ds) -> pydicom.Dataset:
    """dataflow's Contributing Equipment item (highdicom adds its own, and the source's
    acquisition equipment is copied too)."""
    [item] = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "dataflow"
              and i.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"]  # fmt: skip
    return item


def test_trace_on_the_seg_that_came_back_to_the_pacs_says_what_made_it(private_network, tmp_path):
    port, rest = free_port(), free_port()
    study = write_ct_series(tmp_path / "study", slices=12, size=64, seed=31)
    with start_orthanc(tmp_path / "orthanc", modalities={}) as orthanc:
        config = service_yaml(tmp_path, port, orthanc)  # test_serve_dicom's, with an API
        text = config.read_text().replace("port: 104}", f"port: {port}}}")
        config.write_text(text + f"api: {{rest-port: {rest}, grpc-port: null}}\n")
        proc = serve(config, tmp_path / "serve.log")
        api = f"http://127.0.0.1:{rest}"
        try:
            wait_for_port(port, proc=proc, timeout=LONG_HANG)
            sent = storescu("127.0.0.1", port, study.files, called="DATAFLOW-SEG")
            assert sent.returncode == 0, sent.stdout + sent.stderr

            def seg_in_orthanc():
                for i in orthanc.instances():
                    tags = orthanc.rest("GET", f"/instances/{i}/simplified-tags")
                    if tags.get("Modality") == "SEG":
                        return i, tags["SOPInstanceUID"]
                return None

            orthanc_id, uid = wait_serving(seg_in_orthanc, LONG_HANG, "the SEG in Orthanc", proc)
            [record] = jobs(config)
            assert record["state"] == "succeeded"

            # 1. the CLI, through the API
            shown = trace(uid, "--api", api, "--json")
            assert shown.returncode == 0, shown.stderr
            answer = json.loads(shown.stdout)
            [job] = answer["jobs"]
            assert job["id"] == record["id"] and job["as"] == ["output"]
            assert job["state"] == "succeeded" and job["pipeline"] == "ct-segmentation"
            made = job["provenance"]
            assert made["inputs"]["sha256"] == uids_hash(study.files)
            assert made["inputs"]["studies"] == [study.study_instance_uid]
            assert len(made["inputs"]["sop_instance_uids"]) == 12
            assert len(made["pipeline"]["sha256"]) == 64
            stages = made["stages"]
            assert sorted(s["name"] for s in stages) == sorted(STAGES)
            order = [s["name"] for s in stages]
            for before, after in (
                ("load", "smooth"),
                ("smooth", "tissue"),
                ("body", "label-lung"),
                ("label-bone", "seg"),
                ("seg", "register-dicom-output"),
            ):
                assert order.index(before) < order.index(after)  # fmt: skip
            by_name = {s["name"]: s for s in stages}
            assert by_name["smooth"]["operator"] == "operators.image_stages:GaussianSmooth"
            assert by_name["smooth"]["parameters"] == {"sigma": 1.0}
            assert by_name["bone"]["parameters"] == {"keep_largest": False, "min_size": 50}
            assert all(s["version"] and s["device"] == "cpu" and s["ok"] for s in stages)
            assert all(s["start"] <= s["end"] for s in stages)
            assert [o["sop_instance_uid"] for o in made["outputs"]] == [uid]
            assert job["deliveries"] and job["deliveries"][0]["destination"] == "PACS"
            text = trace(uid, "--api", api)
            assert text.returncode == 0, text.stderr
            assert record["id"] in text.stdout and "register-dicom-output" in text.stdout
            assert made["inputs"]["sha256"][:12] in text.stdout

            # 2. the API itself: by the SEG, by the input study; an unknown UID is a 404
            with httpx.Client(base_url=api, timeout=HANG) as client:
                assert client.get(f"/api/v1/trace/{uid}").json()["jobs"][0]["id"] == record["id"]
                by_study = client.get(f"/api/v1/trace/{study.study_instance_uid}").json()
                assert [(j["id"], j["as"]) for j in by_study["jobs"]] == [(record["id"],
                                                                           ["study"])]  # fmt: skip
                missing = client.get("/api/v1/trace/1.2.3.4.5")
                assert missing.status_code == 404 and "'1.2.3.4.5'" in missing.json()["message"]
            unknown = trace("1.2.3.4.5", "--api", api)
            assert unknown.returncode == 2 and "'1.2.3.4.5'" in unknown.stderr

            # 3. the SEG as the PACS holds it says the same, and is valid
            with urllib.request.urlopen(f"{orthanc.url}/instances/{orthanc_id}/file",
                                        timeout=HANG) as response:  # fmt: skip
                (tmp_path / "seg.dcm").write_bytes(response.read())
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=HANG)
        output = (tmp_path / "serve.log").read_text()
        assert code == 0, output[-5000:]
        for name in ("Phantom^Synthetic", "PHANTOM-31"):
            assert name not in output  # no patient identifiers in the logs
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    item = ours(ds)
    assert item.Manufacturer == "dataflow"
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    description = str(item.ContributionDescription)
    assert f"pipeline ct-segmentation sha256:{made['pipeline']['sha256'][:12]}" in description
    assert f"job {record['id']}" in description
    assert f"inputs sha256:{made['inputs']['sha256'][:12]} (12 instances)" in description
    assert f"ct-segmentation {made['pipeline']['sha256'][:12]}" in item.SoftwareVersions
    for segment in ds.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "ct-segmentation"
        [algo] = segment.SegmentationAlgorithmIdentificationSequence
        assert algo.AlgorithmVersion == made["pipeline"]["sha256"][:12]
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    # offline, from the file alone: what its Contributing Equipment Sequence says
    offline = trace(str(tmp_path / "seg.dcm"), "--json")
    assert offline.returncode == 0, offline.stderr
    [said] = json.loads(offline.stdout)["dicom"]["contributions"]
    assert (said["pipeline"], said["job"]) == ("ct-segmentation", record["id"])
    assert said["stages"] == [s for s in order if s != "register-dicom-output"]


def test_a_model_of_the_repository_is_named_with_its_hash_in_the_record_and_the_seg(tmp_path):
    pytest.importorskip("onnxruntime")
    from operators.inference.demo_model import save_demo_model

    models = tmp_path / "models"
    built = save_demo_model(tmp_path / "built" / "demo-lung.onnx")
    record = ModelRepository(models).add_file("lungs", None, "model.onnx",
                                              [built.read_bytes()])  # fmt: skip
    write_ct_series(tmp_path / "in" / "ct", slices=16, size=64, seed=32)
    run = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "run", str(ROOT / "pipelines" / "ct-inference.yaml"),
         "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "-p", "model=models:/lungs/1"],
        capture_output=True, text=True, cwd=ROOT, timeout=LONG_HANG,
        env={**os.environ, "DATAFLOW_MODELS": str(models), "DATAFLOW_CONTAINER_ENGINE": "none"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    made = json.loads((tmp_path / "out" / "ct" / "provenance.json").read_text())
    [used] = [s["model"] for s in made["stages"] if "model" in s]
    assert (used["name"], used["version"], used["sha256"]) == ("lungs", "1", record["sha256"])
    assert used["file_sha256"] == hashlib.sha256(built.read_bytes()).hexdigest()
    [seg_path] = sorted((tmp_path / "out" / "ct" / "write-seg" / "seg").glob("*.dcm"))
    ds = pydicom.dcmread(seg_path)
    [segment] = ds.SegmentSequence
    [algo] = segment.SegmentationAlgorithmIdentificationSequence
    assert (segment.SegmentAlgorithmName, algo.AlgorithmVersion) == ("lungs", "1")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert "model lungs 1" in ours(ds).SoftwareVersions
    assert dciodvfy_errors(seg_path) == []
    # dataflow trace, offline on the output folder and on the file
    shown = trace(str(ds.SOPInstanceUID), "--in", str(tmp_path / "out"))
    assert shown.returncode == 0, shown.stderr
    assert f"model lungs version 1 sha256:{record['sha256']}" in shown.stdout
    on_file = trace(str(seg_path), "--json")
    assert on_file.returncode == 0, on_file.stderr
    [job] = json.loads(on_file.stdout)["jobs"]
    assert job["id"] == "ct" and job["provenance"] == made
