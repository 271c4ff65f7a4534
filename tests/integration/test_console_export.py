"""A dead letter re-sent from the console's export page reaches the PACS: ct-segmentation's SEG
for a study, a PACS down past the export deadline (dead-lettered), then a real storage SCP
(pynetdicom) up and the Re-send button pressed in Chromium."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from dicom_peers import free_port
from pynetdicom import AE, StoragePresentationContexts, evt

from dataflow.service import Service, load_config
from tests.deadlines import LONG_HANG, wait_until
from tests.integration.browser import errors, shoot
from tests.integration.platform_service import HANG, api_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_a_dead_letter_is_resent_from_the_page_and_reaches_the_pacs(tmp_path, browser):
    pacs_port = free_port()
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
    PACS: {{ae: PACS, host: 127.0.0.1, port: {pacs_port}}}
  export: {{retry-initial: 0.2, retry-max: 0.5, deadline: 2}}
""")
    study = tmp_path / "study"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "operators.dicom.phantom",
            str(study),
            "--slices",
            "8",
            "--size",
            "48",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        timeout=LONG_HANG,
    )
    received: Counter = Counter()
    service = Service(load_config(config))
    service.start()
    pacs = None
    try:
        with api_client(service) as client:
            job = client.post("/api/v1/jobs", json={"pipeline": "ct-segmentation"}).json()
            for path in sorted(study.iterdir()):
                client.put(
                    f"/api/v1/payloads/{job['payload_id']}/files/input/{path.name}",
                    content=path.read_bytes(),
                ).raise_for_status()
            client.post(f"/api/v1/jobs/{job['job_id']}/start").raise_for_status()
            (dead,) = wait_until(
                lambda: client.get("/api/v1/exports", params={"state": "dead"}).json(),
                "the SEG dead-lettered (nothing listens on the PACS port)",
                LONG_HANG,
            )
        assert dead["destination"] == "PACS" and dead["job_id"] == job["job_id"]

        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts

        def store(event) -> int:
            received[event.request.AffectedSOPInstanceUID] += 1
            return 0x0000

        pacs = ae.start_server(
            ("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
        )
        browser.get(f"{service.platform.urls['rest']}/console/exports")
        shoot(browser, "exports")
        browser.find_element("css selector", f'button[data-resend="{dead["task_id"]}"]').click()
        wait_until(lambda: sum(received.values()) >= 1, "the SEG at the PACS", HANG)

        def sent() -> bool:
            browser.get(f"{service.platform.urls['rest']}/console/exports")
            rows = browser.find_elements("css selector", f'tr[data-task="{dead["task_id"]}"]')
            return bool(rows) and "sent" in rows[0].text

        wait_until(sent, "the task shown sent on the page", HANG, 0.2)
        assert errors(browser) == []
    finally:
        if pacs is not None:
            pacs.shutdown()
        service.stop()
