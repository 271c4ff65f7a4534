"""A study folder with no image series (issue 10): the series reader says what it skipped and
why, counted per reason with a few file names, and no value from the files' headers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dataflow.testing import run_stage
from operators.dicom.series import SeriesError, SeriesToVolume

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _no_series_uid(path: Path) -> None:
    """A DICOM Part 10 file without a SeriesInstanceUID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName = "Doe^Jane"
    ds.save_as(path, enforce_file_format=True)


def _message(study: Path) -> str:
    with pytest.raises(SeriesError) as info:
        run_stage(SeriesToVolume, {"study": study})
    return str(info.value)


def test_every_skipped_file_is_counted_under_its_reason(tmp_path):
    study = tmp_path / "study"
    (study / "docs").mkdir(parents=True)
    for k in range(6):
        (study / "docs" / f"note-{k}.txt").write_text("not an image")
    shutil.copy(TEST_FILES / "test-SR.dcm", study / "report.dcm")
    shutil.copy(TEST_FILES / "rtplan.dcm", study / "plan.dcm")
    _no_series_uid(study / "orphan.dcm")
    message = _message(study)
    assert message.startswith("no DICOM image series in the study folder; 9 file(s) skipped: ")
    assert (
        "6 not DICOM Part 10 (no DICM preamble): docs/note-0.txt, docs/note-1.txt, "
        "docs/note-2.txt, docs/note-3.txt and 2 more"
    ) in message
    assert "1 no pixel data (SR): report.dcm" in message
    assert "1 no pixel data (RTPLAN): plan.dcm" in message
    assert "1 no SeriesInstanceUID (0020,000E): orphan.dcm" in message
    for ds in (pydicom.dcmread(study / name) for name in ("report.dcm", "plan.dcm")):
        identifiers = [str(ds.get(k) or "") for k in ("PatientName", "PatientID")]
        assert not [i for i in identifiers if i and i in message]
    assert "Doe" not in message


def test_an_empty_study_folder_says_so(tmp_path):
    (tmp_path / "study").mkdir()
    assert _message(tmp_path / "study").endswith("in the study folder: it holds no files")
