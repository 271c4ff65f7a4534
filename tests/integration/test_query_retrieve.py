"""Query/retrieve against a real Orthanc (issue 16 §1): connectors/dicom/query and the
FetchPriors/FetchStudy stages of operators/dicom/priors.py.

Orthanc holds one patient's current study, its prior, an older study of that patient outside the
window, and another patient's study (all phantom CTs, PatientID and StudyDate set); our AE
title (``DATAFLOW``) is in its DicomModalities, as is a dcmtk storescp (the C-MOVE target).
"""

from __future__ import annotations

import subprocess

import pydicom
import pytest
from deadlines import HANG, returns_before_a_hang
from dicom_peers import DCMTK_ENV, dcmtk, free_port, start_orthanc, start_storescp, wait_for_port
from pydicom.uid import generate_uid

from connectors.dicom.query import (
    NotFoundError,
    PacsUnavailableError,
    RetrieveError,
    RetrieveResult,
    Retry,
    c_find,
    c_move,
    destination_from,
)
from connectors.dicom.query.scu import _judge
from dataflow.testing import run_pipeline, run_stage
from operators.dicom.phantom import write_ct_series
from operators.dicom.priors import FetchPriors, FetchStudy, PriorError

pytestmark = pytest.mark.integration

STUDIES = {  # name: (seed, PatientID, StudyDate)
    "current": (1, "PAT-A", "20240601"),
    "prior": (2, "PAT-A", "20230601"),
    "old": (3, "PAT-A", "20150101"),  # outside the 5-year window
    "other": (4, "PAT-B", "20240101"),  # another patient
    "mixed": (5, "PAT-C", "20240101"),  # plus one instance of a private SOP class
}
PRIVATE_CLASS = "1.2.826.0.1.3680043.8.498.999.1"


def _write(folder, seed, patient, date):
    series = write_ct_series(folder, slices=3, size=16, seed=seed)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.StudyDate = patient, date
        ds.save_as(path, enforce_file_format=True)
    return series


@pytest.fixture(scope="module")
def pacs(private_network, tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    studies = {name: _write(root / name, *spec) for name, spec in STUDIES.items()}
    odd = pydicom.dcmread(studies["mixed"].files[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["query private"]
    )
    odd.save_as(root / "private.dcm", enforce_file_format=True)
    sink = start_storescp(root / "sink")
    modalities = {
        "dataflow": ("DATAFLOW", "127.0.0.1", free_port()),
        "sink": (sink.aet, "127.0.0.1", sink.port),
    }
    with (
        sink,
        start_orthanc(
            root / "orthanc", modalities=modalities, config={"UnknownSopClassAccepted": True}
        ) as orthanc,
    ):
        for series in studies.values():
            for path in series.files:
                orthanc.upload(path)
        orthanc.upload(root / "private.dcm")
        yield orthanc, studies, sink


def _settings(orthanc, **extra):
    return {"ae": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, **extra}


def _pixels(paths):
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, paths)}


def test_fetch_priors_retrieves_the_prior_only(pacs, tmp_path, capsys):
    orthanc, studies, _ = pacs
    out = run_stage(
        FetchPriors,
        {"study": studies["current"].directory},
        arguments={"pacs": _settings(orthanc), "count": 5, "within_days": 1825},
        output_dir=tmp_path,
    )
    folder = out["priors"]
    assert sorted(p.name for p in folder.iterdir()) == ["prior-1"]
    received = sorted((folder / "prior-1").iterdir())
    assert all(pydicom.dcmread(p).StudyInstanceUID == studies["prior"].study_instance_uid
               for p in received)  # fmt: skip
    assert _pixels(received) == _pixels(studies["prior"].files)  # byte-equal pixel data

    # without a window the older study of the same patient is a prior too; never the other
    # patient's study, never the current one
    out = run_stage(
        FetchPriors,
        {"study": studies["current"].directory},
        arguments={"pacs": _settings(orthanc), "count": 5, "within_days": None},
        output_dir=tmp_path / "all",
    )
    fetched = {
        pydicom.dcmread(next((out["priors"] / name).iterdir())).StudyInstanceUID: name
        for name in ("prior-1", "prior-2")
    }
    assert fetched == {
        studies["prior"].study_instance_uid: "prior-1",
        studies["old"].study_instance_uid: "prior-2",
    }
    assert sorted(p.name for p in out["priors"].iterdir()) == ["prior-1", "prior-2"]
    logged = capsys.readouterr()
    assert "prior_fetched" in logged.out  # and no patient identifier nor date:
    assert not [v for v in ("PAT-A", "20230601", "20240601") if v in logged.out + logged.err]


PIPELINE = """\
api-version: 0.5.0
name: prior-volume
operators:
- name: priors
  stage: operators.dicom.priors:FetchPriors
  arguments:
    pacs: {{ae: {ae}, host: 127.0.0.1, port: {port}}}
    within_days: 1825
  input:
  - name: study
  output:
  - name: priors
- name: volume
  stage: operators.dicom:SeriesToVolume
  input:
  - from: priors
    name: priors
    port: study
  output:
  - name: volume
"""


def test_a_pipeline_reads_the_prior_as_a_volume(pacs, tmp_path):
    orthanc, studies, _ = pacs
    pipeline = tmp_path / "prior.yaml"
    pipeline.write_text(PIPELINE.format(ae=orthanc.aet, port=orthanc.dicom_port))
    results = run_pipeline(pipeline, {"job-1": studies["current"].directory},
                           output_dir=tmp_path / "out")  # fmt: skip
    volume = results["job-1"][("volume", "volume")]
    assert volume.shape == (3, 16, 16)


def test_no_prior_is_an_empty_folder_or_a_failure_when_required(pacs, tmp_path):
    orthanc, studies, _ = pacs
    arguments = {"pacs": _settings(orthanc), "within_days": 30}
    out = run_stage(FetchPriors, {"study": studies["current"].directory}, arguments=arguments,
                    output_dir=tmp_path)  # fmt: skip
    assert list(out["priors"].iterdir()) == []
    with pytest.raises(PriorError, match=r"no prior on pacs \(ORTHANC@127.0.0.1:\d+\): 3 studies"):
        run_stage(FetchPriors, {"study": studies["current"].directory},
                  arguments={**arguments, "required": True}, output_dir=tmp_path / "r")  # fmt: skip


def test_fetch_study_by_uid_and_a_study_that_is_not_there(pacs, tmp_path):
    orthanc, studies, _ = pacs
    other = studies["other"]
    out = run_stage(FetchStudy, {"order": other.study_instance_uid},
                    arguments={"pacs": _settings(orthanc)}, output_dir=tmp_path)  # fmt: skip
    assert _pixels(out["study"].iterdir()) == _pixels(other.files)
    missing = "1.2.826.0.1.3680043.8.498.1"
    with pytest.raises(NotFoundError, match=rf"study {missing} is not on pacs \(ORTHANC@"):
        returns_before_a_hang(
            run_stage, FetchStudy, {"order": missing}, arguments={"pacs": _settings(orthanc)}
        )


def test_c_find_levels(pacs):
    orthanc, studies, _ = pacs
    dest = destination_from(_settings(orthanc))
    patients = c_find(dest, "PATIENT", {"PatientID": ""})
    assert sorted(str(p.PatientID) for p in patients) == ["PAT-A", "PAT-B", "PAT-C"]
    found = c_find(dest, "STUDY", {"PatientID": "PAT-A", "StudyInstanceUID": ""})
    assert len(found) == 3
    series = c_find(dest, "SERIES", {"StudyInstanceUID": studies["prior"].study_instance_uid,
                                     "SeriesInstanceUID": "", "Modality": ""})  # fmt: skip
    assert [str(s.SeriesInstanceUID) for s in series] == [studies["prior"].series_instance_uid]


def test_c_move_to_a_known_ae_and_to_an_unknown_one(pacs):
    orthanc, studies, sink = pacs
    dest = destination_from(_settings(orthanc))
    prior = studies["prior"]
    for path in sink.files():
        path.unlink()
    result = c_move(dest, prior.study_instance_uid, sink.aet)
    assert (result.completed, result.failed, result.warning) == (3, 0, 0)
    assert _pixels(sink.files()) == _pixels(prior.files)
    # Orthanc answers 0xC000 for a move destination it does not know (0xA801 is the standard's)
    with pytest.raises(RetrieveError, match="C-MOVE of study .* (move destination|failed.*0xC000)"):
        c_move(dest, prior.study_instance_uid, "NOBODY", retry=Retry(1, 0))


def test_a_partial_c_get_fails_unless_allowed_and_a_failed_c_move_fails(pacs, tmp_path):
    """The mixed study holds 3 CT images and an instance of a private SOP class. Our C-GET
    proposes it (the PACS lists it in SOPClassesInStudy) but Orthanc 1.10 does not take the
    SCP role for it (without UnknownSopClassAccepted it fails the whole C-GET): the C-GET is
    partial, 3 completed and 1 failed. A C-MOVE to a storescp without --promiscuous, which
    refuses the private class, fails as a whole."""
    orthanc, studies, _ = pacs
    mixed = studies["mixed"]
    with pytest.raises(RetrieveError, match=r"C-GET of study .* partial: 3 completed, 1 failed"):
        run_stage(FetchStudy, {"order": mixed.study_instance_uid},
                  arguments={"pacs": _settings(orthanc)}, output_dir=tmp_path)  # fmt: skip
    out = run_stage(FetchStudy, {"order": mixed.study_instance_uid},
                    arguments={"pacs": _settings(orthanc), "allow_partial": True},
                    output_dir=tmp_path / "allowed")  # fmt: skip
    assert _pixels(out["study"].iterdir()) == _pixels(mixed.files)

    port = free_port()
    strict = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STRICT", "-od", str(tmp_path), str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=strict)
        orthanc.rest("PUT", "/modalities/strict", ["STRICT", "127.0.0.1", port])
        dest = destination_from(_settings(orthanc))
        # Orthanc 1.10 ends the whole C-MOVE at the instance it cannot send (0xC000): a
        # failure, even with allow_partial
        for allow_partial in (False, True):
            with pytest.raises(RetrieveError, match=r"C-MOVE of study .* failed: .*0xC000"):
                c_move(dest, mixed.study_instance_uid, "STRICT", allow_partial=allow_partial)
    finally:
        strict.terminate()
        strict.wait(HANG)


def test_pacs_down_fails_after_the_bounded_retries(tmp_path):
    port = free_port()  # nothing listens there
    arguments = {"pacs": {"ae": "PACS", "host": "127.0.0.1", "port": port},
                 "retries": 2, "retry_delay": 0}  # fmt: skip
    with pytest.raises(PacsUnavailableError, match=rf"PACS@127.0.0.1:{port}.*after 2 attempts"):
        returns_before_a_hang(run_stage, FetchStudy, {"order": "1.2.3.4.5"},
                              arguments=arguments, output_dir=tmp_path)  # fmt: skip


def test_partial_and_refused_retrieves_are_job_failures():
    dest = destination_from({"ae": "PACS", "host": "127.0.0.1", "port": 104})
    partial = RetrieveResult(0xB000, completed=2, failed=1)
    with pytest.raises(RetrieveError, match=r"partial: 2 completed, 1 failed, 0 with warnings"):
        _judge(dest, "C-GET", "study 1.2.3", partial, allow_partial=False)
    assert _judge(dest, "C-GET", "study 1.2.3", partial, allow_partial=True) is partial
    with pytest.raises(RetrieveError, match=r"failed: 0 completed, 3 failed.*0xC000"):
        _judge(dest, "C-MOVE", "study 1.2.3", RetrieveResult(0xC000, failed=3), False)
    with pytest.raises(PacsUnavailableError, match="out of resources"):
        _judge(dest, "C-GET", "study 1.2.3", RetrieveResult(0xA702, completed=1), False)
    with pytest.raises(RetrieveError, match="does not know the move destination"):
        _judge(dest, "C-MOVE", "study 1.2.3", RetrieveResult(0xA801), False)
