"""The registered-results format (``task.json``): written as Clara wrote it, read back the same,
and a wrong record refused naming the file and the field."""

from __future__ import annotations

import json

import pytest

from dataflow.registered import Registration, RegistrationError
from operators.register import register_files


def write(folder, record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(record))


def test_what_the_stage_writes_is_clara_s_record_and_reads_back(tmp_path):
    (tmp_path / "seg" / "sub").mkdir(parents=True)
    (tmp_path / "seg" / "a.dcm").write_bytes(b"a")
    (tmp_path / "seg" / "sub" / "b.dcm").write_bytes(b"b")
    record = register_files(
        tmp_path / "seg", tmp_path / "task", agent="ClaraSCU", destinations=["PACS", "web"],
        job_id="job-1", job_name="liver",
    )  # fmt: skip
    written = json.loads((tmp_path / "task" / "task.json").read_text())
    assert written == record
    assert list(written) == ["taskId", "jobId", "jobName", "agent", "parameters",
                             "destinations", "state", "retries", "uris"]  # fmt: skip
    assert written["parameters"] == '["PACS", "web"]'  # Clara: a JSON-encoded string
    read = Registration.read(tmp_path / "task")
    assert read.to_json() == written
    assert (read.task_id, read.job_id, read.agent) == (record["taskId"], "job-1", "ClaraSCU")
    assert read.destinations == ("PACS", "web") and read.uris == ("a.dcm", "sub/b.dcm")
    assert [p.read_bytes() for p, _ in read.files(tmp_path / "task")] == [b"a", b"b"]


def test_a_record_of_clara_s_own_names_its_destinations_in_parameters(tmp_path):
    write(tmp_path / "t1", {"agent": "ClaraSCU", "parameters": '["MYPACS"]', "uris": ["x.dcm"]})
    read = Registration.read(tmp_path / "t1")
    assert read.destinations == ("MYPACS",)
    assert (read.task_id, read.job_id) == ("t1", "")  # no taskId: named after its folder


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "must be a JSON object; got list"),
        ({"agent": "ClaraSCU"}, "field 'uris' is missing"),
        ({"uris": "a.dcm"}, "field 'uris' must be a list of strings; got 'a.dcm'"),
        ({"uris": ["../../etc/passwd"]}, r"'uris' item 0 \('../../etc/passwd'\) must be a path"),
        ({"uris": ["/abs.dcm"]}, "must be a path inside files/"),
        ({"uris": [], "destinations": "PACS"}, "field 'destinations' must be a list of strings"),
        ({"uris": [], "taskId": 7}, "field 'taskId' must be a string; got 7"),
        ({"uris": [], "retries": "0"}, "field 'retries' must be a whole number"),
    ],
)
def test_a_wrong_record_is_refused_naming_the_file_and_the_field(tmp_path, record, message):
    write(tmp_path / "task", record)
    with pytest.raises(RegistrationError, match=message) as caught:
        Registration.read(tmp_path / "task")
    assert str(caught.value).startswith(str(tmp_path / "task" / "task.json"))


def test_a_missing_or_broken_file_is_refused_naming_it(tmp_path):
    assert not Registration.present(tmp_path)
    with pytest.raises(RegistrationError, match=r"task\.json: cannot be read"):
        Registration.read(tmp_path)
    (tmp_path / "task.json").write_text("{not json")
    with pytest.raises(RegistrationError, match=r"task\.json: not JSON"):
        Registration.read(tmp_path)
