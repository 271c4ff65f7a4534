import json
import logging

import pytest
import structlog

from dataflow.logs import configure_logging, scrub


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging binds to the sys.stderr of the moment: capsys's, closed after the
    test. Put back the defaults, or later tests log into a closed file."""
    handlers, level = list(logging.root.handlers), logging.root.level
    yield
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_patient_identifiers_are_redacted_by_default(capsys):
    configure_logging("INFO", json=True)
    structlog.get_logger("t").info("instance_stored", patient_id="PAT-123", nbytes=10)
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["patient_id"] == "<redacted>" and record["nbytes"] == 10
    assert record["event"] == "instance_stored"


def test_phi_can_be_allowed_explicitly(capsys):
    configure_logging("INFO", json=True, allow_phi=True)
    structlog.get_logger("t").info("instance_stored", patient_id="PAT-123")
    assert "PAT-123" in capsys.readouterr().err
    configure_logging("INFO", json=True)


def test_level_filters(capsys):
    configure_logging("WARNING", json=True)
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err and "quiet" not in err
    configure_logging("INFO")


TRACEBACK = """Traceback (most recent call last):
  File "stage.py", line 12, in execute
    raise ValueError(f"bad dataset {ds}")
ValueError: bad dataset (0010,0010) Patient's Name                      PN: 'DOE^JANE'
(0010,0020) Patient ID                          LO: 'PAT-0042'
(0010,0030) Patient's Birth Date                DA: '19700101'
(0008,0050) Accession Number                    SH: 'ACC-77'
(0028,0010) Rows                                US: 512
Dataset.PatientName='DOE^JANE' PatientID=PAT-0042, OtherPatientIDs: ['X1', 'X2']
AccessionNumber ACC-77
AttributeError: 'FileDataset' object has no attribute 'PatientBirthDate'
invalid value 'Smith' for (0x00100010) in /spool/MR.12.dcm; the patient 'Smith' again
"""


def test_scrub_removes_patient_identifiers_by_element_and_by_value():
    from dataflow.logs import scrub

    text = scrub(TRACEBACK, values=["Smith"])
    for secret in ("DOE^JANE", "PAT-0042", "19700101", "ACC-77", "X1", "Smith"):
        assert secret not in text, secret
    lines = text.splitlines()
    assert lines[3] == "ValueError: bad dataset (0010,0010) <redacted>"
    assert lines[4] == "(0010,0020) <redacted>"
    assert "(0028,0010) Rows                                US: 512" in lines  # kept
    assert 'File "stage.py", line 12, in execute' in text  # where it failed stays
    assert lines[8] == "Dataset.PatientName <redacted>"
    assert lines[9] == "AccessionNumber <redacted>"
    # an element named without a value (a missing attribute) keeps its sentence
    assert lines[10] == "AttributeError: 'FileDataset' object has no attribute 'PatientBirthDate'"
    assert lines[11].startswith("invalid value '<redacted>' for (0x00100010) <redacted>")
    assert scrub("Rows 512, PatientAge 040Y") == "Rows 512, PatientAge 040Y"
    assert scrub(None) is None and scrub("") == ""


def test_a_jobs_log_keeps_its_events_prints_and_records_scrubbed(capsys, tmp_path):
    from dataflow.logs import job_log, job_note

    configure_logging("WARNING", json=True, job_logs=True)  # a worker's console: warnings
    log = structlog.get_logger("stage")
    path = tmp_path / "job" / ".logs" / "seg.log"
    log.info("before_the_job")
    with job_log(path):
        log.info("slice_read", index=3)  # below the console's level: in the job's log only
        log.warning("odd_spacing", spacing=2.5)
        print("PatientName:", "DOE^JANE")  # in pieces: scrubbed as one line
        print("no newline at the end", end="")
        logging.getLogger("some.library").warning("library says %s", "hi")
        job_note("job failed: PatientID=PAT-7")
    log.info("after_the_job")
    print("after the job")
    text = path.read_text()
    assert "before_the_job" not in text and "after_the_job" not in text
    assert "after the job" not in text
    assert "slice_read" in text and "index=3" in text and "odd_spacing" in text
    assert "PatientName <redacted>" in text and "DOE^JANE" not in text
    assert "no newline at the end\n" in text and "some.library: library says hi" in text
    assert "PatientID <redacted>" in text and "PAT-7" not in text
    out = capsys.readouterr()
    console = out.out + out.err
    assert "odd_spacing" in console and "slice_read" not in console  # the console's level
    assert "PatientName <redacted>" in out.out and "DOE^JANE" not in console


def test_uids_are_redacted_by_value_but_addresses_versions_and_the_standards_uids_stay():
    text = ("failed on /spool/AE/1.2.826.0.1.3680043.8.498.123.g4/2.25.329800735698586629295641"
            "978511506172918/x.dcm (series "
            "1.3.6.1.4.1.9328.50.1.99) from 127.0.0.1, pynetdicom 3.0.4, transfer syntax "
            "1.2.840.10008.1.2.1, 12.5 s")  # fmt: skip
    assert scrub(text) == ("failed on /spool/AE/<uid>.g4/<uid>/x.dcm (series <uid>) from "
                           "127.0.0.1, pynetdicom 3.0.4, transfer syntax 1.2.840.10008.1.2.1, "
                           "12.5 s")  # fmt: skip


def test_the_running_jobs_identifiers_are_redacted_wherever_they_appear():
    from dataflow.logs import identifying

    with identifying(["QUIMBY", "QX-778812"]):
        assert scrub("note=QUIMBY, QX-778812 seen") == "note=<redacted>, <redacted> seen"
    assert scrub("note=QUIMBY") == "note=QUIMBY"  # the job over: its values are forgotten


def test_a_jobs_identifiers_are_looked_up_only_when_something_is_scrubbed():
    """A worker gives the lookup (reading the job's first DICOM header) instead of the
    values: a job that logs nothing never pays for it; one that does, once."""
    from dataflow.logs import identifying

    lookups = []

    def lookup():
        lookups.append(1)
        return ["QUIMBY"]

    with identifying(lookup):
        pass
    assert lookups == []
    with identifying(lookup):
        assert scrub("QUIMBY here") == "<redacted> here"
        assert scrub("and QUIMBY again") == "and <redacted> again"
    assert lookups == [1]
    assert scrub("QUIMBY") == "QUIMBY"


_WRITER = """
import logging, sys
import structlog
from dataflow.logs import configure_logging
configure_logging(json=True)
log = structlog.get_logger("writer")
n = int(sys.argv[1])
for k in range(200):
    log.info("long_line", writer=n, k=k, text=str(n) * (3000 + 97 * k))
    logging.getLogger("lib").warning("a library's record %s %s", n, "x" * (9000 + k))
"""


def test_processes_sharing_one_stderr_never_cut_into_each_others_lines(tmp_path):
    """dataflow serve and its workers write to one stderr: every line stays whole, even lines
    longer than a stream's buffer (a JSON line cut by another process's was seen once)."""
    import subprocess
    import sys

    from deadlines import HANG

    out = tmp_path / "shared.log"
    with open(out, "w") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", _WRITER, str(n)], stderr=shared)
            for n in range(3)
        ]
        assert [w.wait(timeout=HANG) for w in writers] == [0, 0, 0]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 * 200 * 2
    events = [json.loads(line) for line in lines]  # a cut line would not parse
    for n in range(3):
        mine = [e for e in events if e.get("writer") == n]
        assert [e["k"] for e in mine] == list(range(200))
        assert all(e["text"] == str(n) * (3000 + 97 * e["k"]) for e in mine)
