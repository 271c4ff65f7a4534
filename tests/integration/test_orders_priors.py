"""Orders, DICOMweb sources and the prior-comparison pipeline against a real Orthanc (issue 16
§1): Orthanc (with its DICOMweb plugin) holds a patient's current CT, its prior (the same
phantom with part of the left lung filled in: a known lung volume change) and another
patient's study.

- pipelines/prior-comparison.yaml on the current study: FetchPriors gets the prior by C-GET,
  the report gives the known change, the SR passes dciodvfy;
- QIDO-RS and WADO-RS (connectors/dicom/query/web.py) and FetchPriors/FetchStudy on a
  DICOMweb source; a DICOMweb server that is down fails after the bounded retries;
- orders through a real ``dataflow serve`` (REST and ``dataflow jobs order``): a study fetched
  from a DIMSE and from a DICOMweb source; the reference pipeline ordered (its SR exported
  back to Orthanc); an unknown source and a malformed UID refused naming the value; a study
  not there and a PACS that is down each a failed job saying so.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from deadlines import HANG, returns_before_a_hang, wait_until
from dicom_peers import free_port, start_orthanc

from connectors.dicom.query import (
    NotFoundError,
    PacsUnavailableError,
    QueryError,
    RetrieveError,
    Retry,
    c_find,
    c_get,
    source_from,
)
from dataflow.service import Service, load_config
from dataflow.testing import run_pipeline, run_stage
from operators.dicom.phantom import BODY, LABEL_HU, LUNG_LEFT, labels_at, write_ct_series
from operators.dicom.priors import FetchPriors, FetchStudy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
FILLED_ABOVE = 20.0  # mm: in the prior, the left lung above z = 20 mm is soft tissue
MOVE_PORT = free_port()  # where FetchStudy listens as MOVER for a C-MOVE to itself


def _write(folder, seed, patient, date, *, fill=False):
    series = write_ct_series(folder, slices=24, size=64, seed=seed)
    filled = 0
    for k, path in enumerate(series.files):  # spatial order
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.StudyDate = patient, date
        if fill:
            points = series.geometry.points(k)
            mask = (labels_at(points) == LUNG_LEFT) & (points[..., 2] > FILLED_ABOVE)
            pixels = ds.pixel_array.copy()
            pixels[mask] = LABEL_HU[BODY] - series.rescale_intercept
            ds.PixelData = pixels.tobytes()
            filled += int(mask.sum())
        ds.save_as(path, enforce_file_format=True)
    return series, filled


@pytest.fixture(scope="module")
def pacs(private_network, tmp_path_factory):
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orders")
    current, _ = _write(root / "current", 1, "PAT-A", "20240601")
    prior, filled = _write(root / "prior", 2, "PAT-A", "20230601", fill=True)
    other, _ = _write(root / "other", 4, "PAT-B", "20240101")
    config = {"Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}  # fmt: skip
    modalities = {"dataflow": ("DATAFLOW", "127.0.0.1", free_port()),
                  "mover": ("MOVER", "127.0.0.1", MOVE_PORT)}  # fmt: skip
    with start_orthanc(root / "orthanc", modalities=modalities, config=config) as orthanc:
        for series in (current, prior, other):
            for path in series.files:
                orthanc.upload(path)
        studies = {"current": current, "prior": prior, "other": other}
        yield orthanc, studies, filled


def _dimse(orthanc) -> dict:
    return {"ae": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _move(orthanc, ae="MOVER", port=None) -> dict:
    return {**_dimse(orthanc), "retrieve": "move", "move-ae": ae, "move-port": port or MOVE_PORT,
            "move-host": "127.0.0.1"}  # fmt: skip


def _web(orthanc) -> dict:
    return {"protocol": "dicomweb", "url": f"{orthanc.url}/dicom-web"}


def _pixels(paths):
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, paths)}


# ---------------------------------------------------------------- the reference pipeline


def test_prior_comparison_reports_the_known_change(pacs, tmp_path):
    orthanc, studies, filled = pacs
    params = {"pacs_ae": orthanc.aet, "pacs_host": "127.0.0.1",
              "pacs_port": str(orthanc.dicom_port)}  # fmt: skip
    results = run_pipeline(ROOT / "pipelines" / "prior-comparison.yaml",
                           {"job-1": studies["current"].directory},
                           output_dir=tmp_path / "out", params=params)  # fmt: skip
    outputs = results["job-1"]
    report = json.loads((outputs[("compare", "report")] / "report.json").read_text())
    geometry = studies["current"].geometry
    voxel_ml = geometry.slice_spacing * np.prod(geometry.pixel_spacing) / 1000
    known = filled * voxel_ml  # the prior lacks these lung voxels: the current has more
    assert filled > 100
    assert report["change_ml"] == pytest.approx(known, rel=0.01)
    assert report["current_ml"] - report["prior_ml"] == pytest.approx(known, rel=0.01)
    # the phantom's two lungs, 4/3 pi 45 55 80 mm^3 each, at this resolution
    assert report["current_ml"] == pytest.approx(2 * 4 / 3 * np.pi * 45 * 55 * 80 / 1000, rel=0.02)
    assert report["change_percent"] == pytest.approx(100 * known / report["prior_ml"], rel=0.01)
    assert report["prior_study_uid"] == studies["prior"].study_instance_uid
    assert report["current_study_uid"] == studies["current"].study_instance_uid

    (sr_file,) = (tmp_path / "out").glob("job-1/compare/sr/*.dcm")
    sr = pydicom.dcmread(sr_file)
    assert sr.StudyInstanceUID == studies["current"].study_instance_uid
    assert sr.Modality == "SR" and sr.PatientID == "PAT-A"
    change = [item for item in sr.ContentSequence
              if item.ConceptNameCodeSequence[0].CodeValue == "lung-vol-change"]  # fmt: skip
    assert float(change[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(known, rel=0.01)
    checked = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines()
              if line.startswith("Error")]  # fmt: skip
    assert errors == [], checked.stderr
    task = outputs[("register-sr", "task")]
    assert json.loads((task / "task.json").read_text())["destinations"] == ["PACS"]


def test_fetch_study_by_c_move_to_itself(pacs, tmp_path):
    """retrieve: move: the stage listens as MOVER (which Orthanc knows) for the move's
    duration; an AE Orthanc does not know, and a port already taken, each a clear failure."""
    orthanc, studies, _ = pacs
    other = studies["other"]
    out = run_stage(FetchStudy, {"order": other.study_instance_uid},
                    arguments={"pacs": _move(orthanc)}, output_dir=tmp_path)  # fmt: skip
    assert _pixels(out["study"].iterdir()) == _pixels(other.files)
    out = run_stage(FetchPriors, {"study": studies["current"].directory},
                    arguments={"pacs": _move(orthanc)}, output_dir=tmp_path / "p")  # fmt: skip
    assert _pixels((out["priors"] / "prior-1").iterdir()) == _pixels(studies["prior"].files)
    with pytest.raises(RetrieveError, match=r"C-MOVE of study .* failed: .*0xC000"):
        run_stage(FetchStudy, {"order": other.study_instance_uid},
                  arguments={"pacs": _move(orthanc, "STRANGER"), "retries": 1},
                  output_dir=tmp_path / "u")  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PacsUnavailableError,
                           match=rf"cannot listen on 127.0.0.1:{port} as MOVER for the C-MOVE: "
                                 r".*\(gave up after 2 attempts\)"):  # fmt: skip
            run_stage(FetchStudy, {"order": other.study_instance_uid},
                      arguments={"pacs": _move(orthanc, port=port), "retries": 2,
                                 "retry_delay": 0}, output_dir=tmp_path / "t")  # fmt: skip


# ---------------------------------------------------------------- DICOMweb sources


def test_qido_and_wado_on_orthanc(pacs, tmp_path):
    orthanc, studies, _ = pacs
    web = source_from(_web(orthanc))
    found = c_find(web, "STUDY", {"PatientID": "PAT-A", "StudyInstanceUID": "", "StudyDate": ""})
    assert sorted(str(s.StudyDate) for s in found) == ["20230601", "20240601"]
    patients = c_find(web, "PATIENT", {"PatientID": ""})
    assert sorted(str(p.PatientID) for p in patients) == ["PAT-A", "PAT-B"]
    prior = studies["prior"]
    series = c_find(web, "SERIES", {"StudyInstanceUID": prior.study_instance_uid,
                                    "SeriesInstanceUID": "", "Modality": ""})  # fmt: skip
    assert [str(s.SeriesInstanceUID) for s in series] == [prior.series_instance_uid]
    result = c_get(web, prior.study_instance_uid, tmp_path / "wado")
    assert result.completed == 24 and _pixels(result.files) == _pixels(prior.files)
    one = c_get(web, prior.study_instance_uid, tmp_path / "series",
                series_uid=prior.series_instance_uid)  # fmt: skip
    assert len(one.files) == 24
    with pytest.raises(NotFoundError, match=r"study 1\.2\.3\.4 is not on pacs \(http://"):
        c_get(web, "1.2.3.4", tmp_path / "none")


def test_fetch_priors_and_fetch_study_on_a_dicomweb_source(pacs, tmp_path, capsys):
    orthanc, studies, _ = pacs
    out = run_stage(FetchPriors, {"study": studies["current"].directory},
                    arguments={"pacs": _web(orthanc)}, output_dir=tmp_path)  # fmt: skip
    received = sorted((out["priors"] / "prior-1").iterdir())
    assert _pixels(received) == _pixels(studies["prior"].files)
    other = studies["other"]
    out = run_stage(FetchStudy, {"order": other.study_instance_uid},
                    arguments={"pacs": _web(orthanc)}, output_dir=tmp_path / "s")  # fmt: skip
    assert _pixels(out["study"].iterdir()) == _pixels(other.files)
    logged = capsys.readouterr()
    assert not [v for v in ("PAT-A", "PAT-B", "20230601") if v in logged.out + logged.err]


def test_a_dicomweb_source_that_is_down_fails_after_the_bounded_retries(tmp_path):
    port = free_port()  # nothing listens there
    arguments = {"pacs": {"protocol": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web",
                          "timeout": 5}, "retries": 2, "retry_delay": 0}  # fmt: skip
    with pytest.raises(PacsUnavailableError,
                       match=rf"127.0.0.1:{port}/dicom-web\): QIDO-RS STUDY: no connection "
                             r"\(gave up after 2 attempts\)"):  # fmt: skip
        returns_before_a_hang(run_stage, FetchStudy, {"order": "1.2.3.4.5"},
                              arguments=arguments, output_dir=tmp_path)  # fmt: skip


def test_a_dicomweb_source_that_refuses_us_is_not_retried(private_network, tmp_path, monkeypatch):
    """Orthanc with authentication on answers 401 to our bearer token: a QueryError naming
    the status at once, not an outage to retry."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    config = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True},
              "AuthenticationEnabled": True, "RegisteredUsers": {"alice": "secret"}}  # fmt: skip
    monkeypatch.setenv("O16_TOKEN", "not-alice")
    with start_orthanc(tmp_path / "orthanc", config=config) as orthanc:
        web = source_from({**_web(orthanc), "token-env": "O16_TOKEN"})
        with pytest.raises(QueryError, match=r"QIDO-RS STUDY: HTTP 401$"):
            c_find(web, "STUDY", {"StudyInstanceUID": ""}, retry=Retry(3, 60))


# ---------------------------------------------------------------- orders


ORDERED = """\
api-version: 0.5.0
name: fetch-study
operators:
- name: fetch
  stage: operators.dicom.priors:FetchStudy
  arguments: {retries: 2, retry_delay: 0}
  input:
  - name: order
  output:
  - name: study
"""


def _service(tmp_path, orthanc) -> Service:
    pipeline = tmp_path / "fetch-study.yaml"
    pipeline.write_text(ORDERED)
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  fetch-study: {pipeline}
  prior-comparison:
    file: {ROOT / "pipelines" / "prior-comparison.yaml"}
    params: {{pacs_ae: {orthanc.aet}, pacs_host: 127.0.0.1, pacs_port: "{orthanc.dicom_port}"}}
api: {{rest-port: 0, grpc-port: null}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {free_port()}}}
  ae-titles:
    DATAFLOW: {{pipelines: [fetch-study]}}
  destinations:
    PACS: {{ae: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
  sources:
    orthanc: {{ae: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
    orthanc-web: {{protocol: dicomweb, url: "{orthanc.url}/dicom-web"}}
    orthanc-move: {{ae: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}, retrieve: move,
                   move-ae: MOVER, move-port: {MOVE_PORT}, move-host: 127.0.0.1}}
    down: {{ae: PACS, host: 127.0.0.1, port: {free_port()}, connection-timeout: 5}}
""")
    service = Service(load_config(config))
    service.start()
    return service


def _ended(client, job_id):
    def ended():
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(ended, f"job {job_id} to end", HANG, 0.1)


def test_orders_through_the_api_and_the_cli(pacs, tmp_path):
    orthanc, studies, filled = pacs
    other = studies["other"]
    service = _service(tmp_path, orthanc)
    with contextlib.ExitStack() as stack:
        stack.callback(service.stop)
        url = service.platform.urls["rest"]
        client = httpx.Client(base_url=url, timeout=HANG)
        stack.callback(client.close)
        for source in ("orthanc", "orthanc-web", "orthanc-move"):
            order = {"study": other.study_instance_uid, "source": source}
            made = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": order})
            assert made.status_code == 201, made.text
            job = _ended(client, made.json()["job_id"])
            assert job["state"] == "succeeded", job
            files = client.get(f"/api/v1/jobs/{job['id']}/files").json()
            names = {Path(f["name"]).name for f in files}
            assert {f"{uid}.dcm" for uid in other.sop_instance_uids} <= names
            assert "order.json" in names  # what the job was asked, kept with it

        unknown = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": {
            "study": other.study_instance_uid, "source": "nowhere"}})  # fmt: skip
        assert unknown.status_code == 422
        assert unknown.json()["message"] == (
            "order: source 'nowhere' is not a source of this service "
            "(down, orthanc, orthanc-move, orthanc-web)"
        )
        bad = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": {
            "study": "1.2.x", "source": "orthanc"}})  # fmt: skip
        assert bad.status_code == 422 and "study '1.2.x' is not a DICOM UID" in bad.text

        missing = "1.2.826.0.1.3680043.8.498.1"
        made = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": {
            "study": missing, "source": "orthanc"}}).json()  # fmt: skip
        job = _ended(client, made["job_id"])
        assert job["state"] == "failed"
        assert job["messages"] == [  # the platform keeps no UID in what it records
            f"fetch: NotFoundError: study <uid> is not on orthanc (ORTHANC@127.0.0.1:"
            f"{orthanc.dicom_port})"
        ]
        made = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": {
            "study": missing, "source": "down"}}).json()  # fmt: skip
        job = _ended(client, made["job_id"])
        assert job["state"] == "failed"
        assert job["messages"][0].startswith("fetch: PacsUnavailableError: down (PACS@127.0.0.1:")
        assert job["messages"][0].endswith("(gave up after 2 attempts)")
        order = {"study": other.study_instance_uid, "series": missing, "source": "orthanc-web"}
        made = client.post("/api/v1/jobs", json={"pipeline": "fetch-study", "order": order})
        job = _ended(client, made.json()["job_id"])
        assert (
            job["state"] == "failed"
            and "NotFoundError: series <uid> of study <uid> is not on orthanc-web (http://"
            in job["messages"][0]
        )

        # the reference pipeline, ordered: the current study fetched, its prior too, the SR
        # of the comparison sent back to the PACS
        current = studies["current"]
        order = {"study": current.study_instance_uid, "source": "orthanc"}
        made = client.post("/api/v1/jobs", json={"pipeline": "prior-comparison", "order": order})
        job = _ended(client, made.json()["job_id"])
        assert job["state"] == "succeeded", job
        name = "operators/compare/report/report.json"
        report = client.get(f"/api/v1/jobs/{job['id']}/files/{name}").json()
        assert report["prior_study_uid"] == studies["prior"].study_instance_uid
        geometry = current.geometry
        voxel_ml = geometry.slice_spacing * np.prod(geometry.pixel_spacing) / 1000
        assert report["change_ml"] == pytest.approx(filled * voxel_ml, rel=0.01)

        def sr_in_pacs():
            query = {"StudyInstanceUID": current.study_instance_uid, "Modality": "SR"}
            return orthanc.rest("POST", "/tools/find", {"Level": "Series", "Query": query})

        wait_until(sr_in_pacs, "the SR exported to the PACS", HANG, 0.2)

        cli = subprocess.run(
            [sys.executable, "-m", "dataflow.cli", "jobs", "order", "fetch-study",
             "--study", other.study_instance_uid, "--from", "orthanc", "--wait", "--api", url],
            capture_output=True, text=True, timeout=HANG,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "succeeded" in cli.stdout and "(study from orthanc)" in cli.stdout
        cli = subprocess.run(
            [sys.executable, "-m", "dataflow.cli", "jobs", "order", "fetch-study",
             "--study", other.study_instance_uid, "--from", "nowhere", "--api", url],
            capture_output=True, text=True, timeout=HANG,
        )  # fmt: skip
        assert cli.returncode != 0 and "'nowhere'" in cli.stdout + cli.stderr
