"""The console's "done when", in a real browser (Debian's Chromium) against the real service: a
study sent by dcmtk's storescu over DICOM appears on the jobs page without a reload, runs
(ct-segmentation) and is exported to a real Orthanc; the page finds the job by its accession
number and study UID and filters it by called AE title; its page draws the pipeline's graph
with each stage's state, the timeline and the SEG over the CT; no patient name, ID or birth
date is on any page (the service file does not allow them)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest
from dicom_peers import free_port, start_orthanc, storescu

from dataflow.service import Service, load_config
from operators.dicom.phantom import write_ct_series
from tests.deadlines import LONG_HANG, wait_until
from tests.integration.browser import (
    accessibility_violations,
    errors,
    live,
    overflowing,
    shoot,
    text_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
ACCESSION, NAME, PATIENT_ID, BIRTH = "ACC-7731-X", "DOE^JANE", "PAT-0042", "19610203"


def until(predicate, what: str):
    return wait_until(predicate, what, LONG_HANG, 0.2)


@pytest.fixture(scope="module")
def site(private_network, tmp_path_factory):
    """(service, orthanc, study) with ct-segmentation routed from DATAFLOW-SEG, its SEGs
    exported to Orthanc, and a phantom CT study carrying an accession number and a patient."""
    tmp = tmp_path_factory.mktemp("console-dicom")
    study = write_ct_series(tmp / "study", slices=12, size=48, seed=41)
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber, ds.PatientName, ds.PatientID = ACCESSION, NAME, PATIENT_ID
        ds.PatientBirthDate = BIRTH
        ds.save_as(path)
    port = free_port()
    with start_orthanc(tmp / "orthanc") as orthanc:
        config = tmp / "service.yaml"
        config.write_text(f"""
state: {tmp / "state"}
pipelines:
  ct-segmentation: {ROOT / "pipelines" / "ct-segmentation.yaml"}
api: {{rest-port: 0, grpc-port: null}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    DATAFLOW-SEG: {{pipelines: [ct-segmentation], group-by: study, timeout: 1}}
  allow:
  - {{ae: STORESCU, host: 127.0.0.1}}
  destinations:
    PACS: {{ae: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.dicom_port}}}
""")
        service = Service(load_config(config))
        service.start()
        try:
            yield service, orthanc, study, port
        finally:
            service.stop()


def row_of(browser, job_id: str | None = None):
    """The jobs table's rows (one job's, given its id)."""
    css = f'tr[data-job="{job_id}"]' if job_id else "tr[data-job]"
    return browser.find_elements("css selector", f"#jobs {css}")


def test_a_study_from_dicom_arrives_runs_and_is_exported_on_the_pages(site, browser):
    service, orthanc, study, port = site
    base = service.platform.urls["rest"]
    browser.get(f"{base}/console/jobs")
    browser.execute_script("window.__same_page = true")
    until(lambda: text_of(browser, "live") == "live", "the event stream open")
    assert row_of(browser) == []

    sent = storescu("127.0.0.1", port, study.files, called="DATAFLOW-SEG")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def finished() -> str | None:
        def read():
            rows = row_of(browser)
            state = rows[0].find_element("css selector", ".chip").text if rows else None
            return rows[0].get_attribute("data-job") if state == "succeeded" else None

        return live(read)  # None: the rows were replaced as they were read

    job_id = until(finished, "the study's job on the jobs page, succeeded")
    assert browser.execute_script("return window.__same_page === true")  # no reload
    cells = [td.text for td in row_of(browser, job_id)[0].find_elements("tag name", "td")]
    assert "DATAFLOW-SEG" in cells and any("STORESCU" in c for c in cells)
    shoot(browser, "jobs")
    assert errors(browser) == []

    # found by what a person knows of the study, filtered by the AE title it was sent to
    for query in (
        f"find={ACCESSION.lower()}",
        f"find={study.study_instance_uid}",
        "called_ae=DATAFLOW-SEG",
        "since=3600&called_ae=DATAFLOW-SEG&state=succeeded",
    ):
        browser.get(f"{base}/console/jobs?{query}")
        assert [r.get_attribute("data-job") for r in row_of(browser)] == [job_id], query
    for query in ("find=ACC-0000", "called_ae=ELSEWHERE", f"find={study.files[0].name}"):
        browser.get(f"{base}/console/jobs?{query}")
        assert row_of(browser) == [] and "No job matches" in browser.page_source, query
    options = browser.find_elements("css selector", 'select[name="called_ae"] option')
    assert "DATAFLOW-SEG" in [o.text for o in options]

    # the SEG reaches the PACS; the job's page draws it all
    until(lambda: any(orthanc.rest("GET", f"/instances/{i}/simplified-tags")["Modality"] == "SEG"
                      for i in orthanc.instances()), "the SEG in Orthanc")  # fmt: skip
    browser.get(f"{base}/console/jobs/{job_id}")
    operators = [li.get_attribute("data-operator") for li in
                 browser.find_elements("css selector", ".graph li")]  # fmt: skip
    boxes = browser.find_elements("css selector", "#graph svg g.operator")
    drawn = {g.get_attribute("data-operator"): g.find_element("css selector", "text.state").text
             for g in boxes}  # fmt: skip
    assert drawn == dict.fromkeys(operators, "completed"), drawn
    assert len(browser.find_elements("css selector", "svg.gantt rect.ok")) >= len(operators)
    until(lambda: all(browser.execute_script("return arguments[0].complete && "
                                             "arguments[0].naturalWidth > 0", img)
                      for img in browser.find_elements("css selector", ".previews img")),
          "the preview images loaded")  # fmt: skip
    assert len(browser.find_elements("css selector", ".previews img")) == 6
    shoot(browser, "job-dicom")
    # the download button: the job's outputs in one ZIP, the SEG among them as Orthanc got it
    href = browser.find_element("id", "download-outputs").get_attribute("href")
    archive = zipfile.ZipFile(io.BytesIO(httpx.get(href, timeout=LONG_HANG).content))
    (seg_name,) = [n for n in archive.namelist() if n.startswith("operators/seg/")]
    seg = pydicom.dcmread(io.BytesIO(archive.read(seg_name)))
    assert seg.SOPInstanceUID in orthanc.sop_instance_uids()
    assert overflowing(browser) == []  # fits 1280x800
    assert accessibility_violations(browser) == []
    browser.get(f"{base}/console/dicom")  # the routing the service file set
    routes = [[td.text for td in tr.find_elements("tag name", "td")]
              for tr in browser.find_elements("css selector", "#routing tbody tr")]  # fmt: skip
    assert routes == [["plain", f"127.0.0.1:{port}", "DATAFLOW-SEG", "ct-segmentation", "study",
                       "1 s quiet", "new-job"]]  # fmt: skip
    (pacs,) = browser.find_elements("css selector", "#destinations tbody tr")
    assert pacs.text.split() == ["PACS", "DIMSE", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                                 "up"]  # fmt: skip
    shoot(browser, "dicom")
    for page in (f"jobs/{job_id}", "jobs", "dicom", "", "exports"):
        browser.get(f"{base}/console/{page}")
        source = browser.page_source
        for identifier in (NAME, "DOE", PATIENT_ID, BIRTH, ACCESSION):
            assert identifier not in source, (page, identifier)
    assert errors(browser) == []


def test_a_receiver_below_its_disk_reserve_is_what_the_overview_says_first(
    private_network, tmp_path, browser
):
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  passthrough: {ROOT / "pipelines" / "passthrough.yaml"}
api: {{rest-port: 0, grpc-port: null, disk-reserve: 1KiB}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {free_port()}}}
  ae-titles:
    DATAFLOW: {{pipelines: [passthrough]}}
  limits: {{disk-reserve-percent: 99.999}}  # more than any disk in use has free
""")
    service = Service(load_config(config))
    service.start()
    try:
        browser.get(f"{service.platform.urls['rest']}/console/")
        until(lambda: "below its disk reserve" in browser.find_element("id", "attention-list").text,
              "the overview to say the receiver is below its disk reserve")  # fmt: skip
        rows = {tr.find_element("tag name", "td").text: tr.text for tr in
                browser.find_elements("css selector", "#disk-table tbody tr")}  # fmt: skip
        assert "below its reserve" in rows["DICOM receiver plain"]
        assert rows["state folder (API uploads)"].endswith("ok")
        assert browser.find_element("id", "open-associations").text == "0"  # none calls
        assert errors(browser) == []
    finally:
        service.stop()
