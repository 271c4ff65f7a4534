"""A dead letter re-sent from the console's export page reaches the PACS: ct-segmentation's SEG
for a study, the PACS down while the SEG is exported (dead-lettered after its retries), then
a real Orthanc up on the PACS's port and the Re-send button pressed in Chromium; the row
follows the export's events to sent, without a reload."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from dicom_peers import free_port, start_orthanc

from dataflow.service import Service, load_config
from tests.deadlines import HANG, LONG_HANG, wait_until
from tests.integration.browser import errors, live, shoot, text_of
from tests.integration.platform_service import api_client, folder_files, start_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def the_seg(client, job_id: str) -> pydicom.Dataset:
    """The job's output SEG (the seg operator's one file), read from the API."""
    names = [
        f["name"]
        for f in client.get(f"/api/v1/jobs/{job_id}/files").json()
        if f["name"].startswith("/operators/seg/")
    ]
    assert len(names) == 1, names
    data = client.get(f"/api/v1/jobs/{job_id}/files{names[0]}").raise_for_status().content
    return pydicom.dcmread(io.BytesIO(data))


def state_of(row) -> str:
    """An export row's State cell (Task, Job, Destination, State, ...)."""
    return row.find_elements("tag name", "td")[3].text


def test_a_dead_letter_is_resent_from_the_page_and_reaches_orthanc(
    private_network, tmp_path, browser
):
    pacs_port = free_port()  # nothing listens there until Orthanc starts on it
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  ct-segmentation: {ROOT / "pipelines" / "ct-segmentation.yaml"}
api: {{rest-port: 0, grpc-port: null}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: 0}}
  ae-titles:
    DATAFLOW: {{pipelines: [ct-segmentation]}}
  destinations:
    PACS: {{ae: ORTHANC, host: 127.0.0.1, port: {pacs_port}}}
  export: {{retry-initial: 0.1, retry-max: 0.1, max-attempts: 2}}
""")
    study = tmp_path / "study"
    subprocess.run(
        [sys.executable, "-m", "operators.dicom.phantom", str(study), "--slices", "8",
         "--size", "48"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=LONG_HANG,
    )  # fmt: skip
    service = Service(load_config(config))
    service.start()
    orthanc = None
    try:
        with api_client(service) as client:
            job_id = start_job(client, "ct-segmentation", folder_files(study))
            (dead,) = wait_until(
                lambda: client.get("/api/v1/exports", params={"state": "dead"}).json(),
                "the SEG dead-lettered (nothing listens on the PACS port)",
                LONG_HANG,
            )
            seg = the_seg(client, job_id)
        assert dead["destination"] == "PACS" and dead["job_id"] == job_id
        assert dead["attempts"] == 2 and dead["last_error"]

        orthanc = start_orthanc(tmp_path / "orthanc", dicom_port=pacs_port)
        assert orthanc.instances() == []
        exports = f"{service.platform.urls['rest']}/console/exports"
        browser.get(exports)
        browser.execute_script("window.__same_page = true")
        wait_until(lambda: text_of(browser, "live") == "live", "the event stream open", HANG)
        shoot(browser, "exports")
        row = browser.find_element("css selector", f'tr[data-task="{dead["task_id"]}"]')
        assert state_of(row) == "dead" and dead["last_error"] in row.text  # the reason shown
        row.find_element("css selector", f'button[data-resend="{dead["task_id"]}"]').click()

        def sent() -> bool:  # the row follows the export's events: no reload
            def read():
                rows = browser.find_elements("css selector", f'tr[data-task="{dead["task_id"]}"]')
                return bool(rows) and state_of(rows[0]) == "sent"

            return live(read, False)  # False: the rows were replaced as they were read

        wait_until(sent, "the task shown sent on the page", HANG, 0.2)
        assert browser.execute_script("return window.__same_page === true")
        assert orthanc.sop_instance_uids() == {seg.SOPInstanceUID}
        (study_id,) = orthanc.rest("GET", "/studies")
        tags = orthanc.rest("GET", f"/studies/{study_id}")["MainDicomTags"]
        assert tags["StudyInstanceUID"] == seg.StudyInstanceUID
        assert errors(browser) == []
    finally:
        if orthanc is not None:
            orthanc.stop()
        service.stop()
