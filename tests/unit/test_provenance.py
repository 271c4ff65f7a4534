"""The provenance record (dataflow.execution.provenance): inputs and their hash, the
pipeline's definition hash, models named by arguments, a job's record written at its end;
the job records' index of it (JobStore) and the offline lookups of dataflow trace."""

from __future__ import annotations

import hashlib
import json

import pytest

from dataflow.execution.provenance import (
    FILE,
    JobProvenance,
    describe,
    input_uids,
    model_of,
    parse_description,
    pipeline_record,
    write_notes,
)
from dataflow.models import ModelRepository
from dataflow.platform.errors import NotFound
from dataflow.platform.trace import format_trace, trace_folder
from dataflow.service.jobs import JobStore
from operators.dicom.phantom import write_ct_series


def stages(sigma=1.0):
    return [
        {"name": "load", "stage_ref": "operators.dicom:SeriesToVolume",
         "arguments": {"modality": "CT"}, "inputs": {"study": None}},
        {"name": "smooth", "stage_ref": "operators.image_stages:GaussianSmooth",
         "arguments": {"sigma": sigma}, "inputs": {"volume": ("load", "volume")}},
    ]  # fmt: skip


def test_the_inputs_are_the_sorted_sop_instance_uids_and_their_hash(tmp_path):
    series = write_ct_series(tmp_path / "study", slices=5, size=16, seed=3)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    found = input_uids(tmp_path / "study")
    uids = sorted(str(__import__("pydicom").dcmread(p).SOPInstanceUID) for p in series.files)
    assert found["sop_instance_uids"] == uids
    assert found["sha256"] == hashlib.sha256("".join(f"{u}\n" for u in uids).encode()).hexdigest()
    assert found["studies"] == [series.study_instance_uid]
    assert found["series"] == [series.series_instance_uid]
    assert found["other_files"] == 1
    text = json.dumps(found)
    assert "Phantom" not in text and "PHANTOM" not in text  # no patient name or ID


def test_the_definition_hash_follows_the_arguments_and_names_operator_and_version():
    one, same, other = (pipeline_record("p", stages(s)) for s in (1.0, 1.0, 2.0))
    assert one["sha256"] == same["sha256"] != other["sha256"]
    assert len(one["sha256"]) == 64
    smooth = one["stages"][1]
    assert smooth["operator"] == "operators.image_stages:GaussianSmooth"
    assert smooth["package"] == "dataflow" and smooth["version"] == one["dataflow"]
    assert smooth["parameters"] == {"sigma": 1.0} and "model" not in smooth


def test_a_model_is_known_by_its_repository_record_its_file_or_its_name(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    record = repo.add_file("lungs", None, "model.onnx", [b"weights"])
    path = repo.path("lungs")
    model = model_of({"model": str(path)})
    assert (model["name"], model["version"], model["sha256"]) == ("lungs", "1", record["sha256"])
    assert model["file_sha256"] == hashlib.sha256(b"weights").hexdigest()
    loose = tmp_path / "net.onnx"
    loose.write_bytes(b"other weights")
    model = model_of({"model": str(loose)})
    assert (model["name"], model["version"]) == ("net", None)
    assert model["sha256"] == hashlib.sha256(b"other weights").hexdigest()
    assert model_of({"model": "demo"})["name"] == "demo"
    triton = model_of({"model_name": "seg", "model_version": "3", "url": "h:8000"})
    assert (triton["name"], triton["version"], triton["source"]) == ("seg", "3", "triton")
    assert model_of({"sigma": 1.0, "modality": "CT"}) is None


def test_a_jobs_record_is_written_at_its_end_with_stages_and_noted_outputs(tmp_path):
    series = write_ct_series(tmp_path / "in", slices=3, size=16, seed=4)
    record = pipeline_record("p", stages())
    keeper = JobProvenance(record, {"load": [None], "smooth": [0]}, tmp_path / "out")
    keeper.begin("job-1", tmp_path / "in", 1_700_000_000.0)
    keeper.ran("job-1", "load", 0, 1_700_000_001.0, 1_700_000_002.5, True)
    so_far = keeper.snapshot("job-1", "smooth")
    assert [s["name"] for s in so_far["stages"]] == ["load"]
    assert so_far["stage"]["name"] == "smooth" and so_far["pipeline"]["name"] == "p"
    assert so_far["inputs"]["studies"] == [series.study_instance_uid]
    keeper.ran("job-1", "smooth", 0, 1_700_000_002.5, 1_700_000_003.0, True)
    write_notes(tmp_path / "out" / "job-1", "smooth", [{"sop_instance_uid": "1.2.3"}])
    done = keeper.finish("job-1", True, None)
    keeper.close()
    assert json.loads((tmp_path / "out" / "job-1" / FILE).read_text()) == done
    load, smooth = done["stages"]
    assert (load["device"], smooth["device"]) == ("cpu", "cuda:0")
    assert load["start"] == "2023-11-14T22:13:21.000000Z" and load["end"].endswith("22.500000Z")
    assert done["outputs"] == [{"sop_instance_uid": "1.2.3"}] and done["ok"] is True
    # what a writer says in DICOM reads back
    parsed = parse_description(describe(so_far))
    assert parsed["pipeline"] == "p" and parsed["job"] == "job-1"
    assert parsed["sha256"] == record["sha256"][:12] and parsed["stages"] == ["load", "smooth"]
    # and dataflow trace finds the job in the folder, by output, input or job id
    for uid in ("1.2.3", series.study_instance_uid, "job-1"):
        [job] = trace_folder(tmp_path / "out", uid)["jobs"]
        assert job["id"] == "job-1"
    assert "smooth" in format_trace(trace_folder(tmp_path / "out", "1.2.3"))
    with pytest.raises(NotFound, match="'9.9.9'"):
        trace_folder(tmp_path / "out", "9.9.9")


def test_a_failed_jobs_record_names_its_stage_not_its_reason(tmp_path):
    keeper = JobProvenance(pipeline_record("p", stages()), {}, tmp_path)
    keeper.begin("job-2", None, 1_700_000_000.0)
    keeper.ran("job-2", "load", 0, 1_700_000_001.0, 1_700_000_002.0, False)
    done = keeper.finish("job-2", False, "load")
    keeper.close()
    assert done["ok"] is False and done["failed_stage"] == "load" and "reason" not in done
    assert done["inputs"]["sop_instance_uids"] == [] and done["inputs"]["sha256"] is None


def test_the_job_records_keep_and_index_the_provenance(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    try:
        job, _ = store.create("p", tmp_path, key="k")
        store.started(job.id)
        record = {"job": job.id, "outputs": [{"sop_instance_uid": "1.2.9"}],
                  "inputs": {"studies": ["1.2.1"], "series": ["1.2.2"],
                             "sop_instance_uids": ["1.2.3", "1.2.4"]}}  # fmt: skip
        (tmp_path / "jobs" / job.id).mkdir(parents=True)
        (tmp_path / "jobs" / job.id / FILE).write_text(json.dumps(record))
        assert store.finished(job.id, True)
        assert store.provenance(job.id) == record
        assert store.trace("1.2.9") == [(job.id, "output")]
        assert store.trace("1.2.1") == [(job.id, "study")]
        assert store.trace("1.2.4") == [(job.id, "instance")]
        assert store.trace(job.id) == [(job.id, "job")]
        assert store.trace("9.9.9") == []
        # a retry's record replaces the first attempt's, index and all
        store.keep_provenance(job.id, {**record, "outputs": [{"sop_instance_uid": "1.2.10"}]})
        assert store.trace("1.2.9") == [] and store.trace("1.2.10") == [(job.id, "output")]
    finally:
        store.close()
