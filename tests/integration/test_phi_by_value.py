"""Patient data kept out by value (issue 13): a study with a recognisable patient name, ID,
birth date, accession number, series description and UIDs goes through ``dataflow serve``
(JSON logs) to a stage that leaks them every way it can (a log field under an innocent name,
a stdlib logger, a print, an exception quoting them with its spool path) and fails. None of
them is in any line the service logged, in the operator's job log, or in the job's record as
``dataflow jobs`` shows it; UIDs only in the record's fields that name the received group
(docs/service.md), never in its free text. The stdlib logger's line is JSON like the
service's own."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from cli import study_sent
from dicom_peers import free_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).parent / "service_data"
NAME, PATIENT_ID, BIRTH, ACCESSION = "ZEBULON^QUIMBY", "QX-778812", "19450317", "ACC-55-991"
DESCRIPTION = "QUIMBY PRIVATE CHEST"


def test_no_identifier_of_a_failing_study_is_logged_or_kept(private_network, tmp_path):
    study = write_ct_series(tmp_path / "study", slices=2, size=16, seed=5)
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
        ds.AccessionNumber, ds.SeriesDescription = ACCESSION, DESCRIPTION
        ds.save_as(path)
    uids = {study.study_instance_uid, *(str(pydicom.dcmread(p).SOPInstanceUID)
                                        for p in study.files)}  # fmt: skip
    secrets = {NAME, "ZEBULON", "QUIMBY", PATIENT_ID, BIRTH, ACCESSION, DESCRIPTION}
    port = free_port()
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  leaky: {DATA / "leaky.yaml"}
log: {{level: debug, format: json}}
limits: {{max-attempts: 1}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    LEAKY: {{pipelines: [leaky], timeout: 1}}
  allow:
  - {{ae: STORESCU, host: 127.0.0.1}}
""")
    with study_sent(config, study.files, port, "LEAKY", "failed") as (_, record):
        pass
    log = tmp_path / "serve.log"

    logged = log.read_text()
    job_logs = "".join(p.read_text() for p in (tmp_path / "state").rglob(".logs/*.log"))
    assert "leaky_read" in job_logs and "debug:" in job_logs  # the stage did log and print
    (library,) = [line for line in logged.splitlines() if "leaky.library" in line]
    assert json.loads(library)["level"] == "warning"  # a stdlib logger's line, in JSON too
    for line in logged.splitlines():
        if line.startswith("{"):
            json.loads(line)  # no line of the service's own log is half JSON
    free_text = json.dumps([record.get("error"), record.get("details"), record.get("last_error"),
                            record.get("history")])  # fmt: skip
    for secret in secrets:
        assert secret not in logged, secret
        assert secret not in job_logs, secret
        assert secret not in json.dumps(record), secret
    for uid in uids:
        assert uid not in logged and uid not in job_logs and uid not in free_text, uid
    assert "<redacted>" in record["error"] and "<uid>" in record["error"]
