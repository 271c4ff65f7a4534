"""Hostile studies at the stage level: whatever would give a wrong result fails the job with a
reason naming the file and the element, instead of reaching the PACS as a success (issue 9).

Bad studies are the phantom with one file changed, and pydicom's own test files (by path:
``pydicom.data.get_testdata_files`` would download)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dataflow.stage import ParameterError, StageError, Tensor
from dataflow.testing import run_stage
from operators.dicom import SeriesError, SeriesToVolume, WriteDerivedSeries, load_series, phantom
from operators.dicom.reading import ReadError, read_header
from operators.dicom.rtstruct import WriteRTStruct
from operators.dicom.seg import EmptySegmentError, WriteSegmentation
from operators.inference import Inference

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PATIENT = ("Phantom", "PHANTOM-")  # the phantom's name and ID: never in a message


@pytest.fixture
def study(tmp_path) -> Path:
    """A small phantom CT series (6 slices of 16 x 16) in its own folder."""
    phantom.write_ct_series(tmp_path / "study", slices=6, size=16)
    return tmp_path / "study"


def files(study: Path) -> list[Path]:
    return sorted(study.glob("*.dcm"))


def set_raw(path: Path, keyword: str, vr: str, value: bytes) -> str:
    """Write ``value`` as the encoded bytes of ``keyword`` in ``path`` (no validation: the
    malformed values a hostile site sends). Returns the file's name."""
    ds = pydicom.dcmread(path)
    tag = Tag(tag_for_keyword(keyword))
    value += b" " * (len(value) % 2)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(path)
    return path.name


def refused(stage, inputs, error=(SeriesError, StageError), **arguments) -> str:
    """The message of the error ``stage`` fails with; it never holds the patient's name or ID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values themselves
        with pytest.raises(error) as info:
            run_stage(stage, inputs, arguments=arguments)
    message = str(info.value)
    assert not any(p in message for p in PATIENT), message
    return message


# -- values a volume relies on -----------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "vr", "value", "expected"),
    [
        ("NumberOfFrames", "IS", b"abc", "(0028,0008) NumberOfFrames: 'abc' is not an integer"),
        ("RescaleSlope", "DS", b"x1", "(0028,1053) RescaleSlope: 'x1' is not a finite number"),
        ("RescaleSlope", "DS", b"NaN", "(0028,1053) RescaleSlope: 'NaN' is not a finite number"),
        (
            "RescaleIntercept",
            "DS",
            b"inf",
            "(0028,1052) RescaleIntercept: 'inf' is not a finite number",
        ),
    ],
)
def test_a_malformed_or_non_finite_value_names_the_file_and_the_element(
    study, keyword, vr, value, expected
):
    name = set_raw(files(study)[2], keyword, vr, value)
    message = refused(SeriesToVolume, {"study": study})
    assert f"{name}: {expected}" in message


def test_nan_and_inf_in_float_pixel_data_are_refused_naming_the_file(study):
    path = files(study)[3]
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) - 1024
    hu[2, 2], hu[5, 5] = np.nan, np.inf
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsAllocated = 32
    ds.FloatPixelData = hu.tobytes()
    ds.save_as(path)
    message = refused(SeriesToVolume, {"study": study})
    assert f"{path.name}: 2 pixel value(s) are NaN or infinite (FloatPixelData" in message


def test_a_rescale_that_overflows_float32_is_refused(study):
    name = set_raw(files(study)[1], "RescaleSlope", "DS", b"1e38")
    assert f"{name}: " in refused(SeriesToVolume, {"study": study})


# -- modality and units ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test_file", "modality"), [("MR_small.dcm", "MR"), ("rtdose_1frame.dcm", "RTDOSE")]
)
def test_a_ct_stage_refuses_other_modalities(tmp_path, test_file, modality):
    (tmp_path / "study").mkdir()
    shutil.copy(TEST_FILES / test_file, tmp_path / "study" / "image.dcm")
    message = refused(SeriesToVolume, {"study": tmp_path / "study"}, modality="CT")
    assert f"Modality (0008,0060) is {modality} (image.dcm)" in message
    assert "reads CT only" in message
    run_stage(SeriesToVolume, {"study": tmp_path / "study"})  # without `modality`: read as is


def test_ct_is_read_and_a_rescale_type_other_than_hu_is_refused(study):
    volume = run_stage(SeriesToVolume, {"study": study}, arguments={"modality": "ct"})["volume"]
    assert volume.array.shape == (6, 16, 16)
    name = set_raw(files(study)[0], "RescaleType", "LO", b"US")
    message = refused(SeriesToVolume, {"study": study}, modality="CT")
    assert f"{name}: (0028,1054) RescaleType is US, not HU" in message


# -- empty outputs -----------------------------------------------------------------------


def labels_of(tmp_path: Path, keep: tuple[int, ...]) -> tuple[Path, Tensor]:
    """A phantom study, and its body 1 / lung 2 / bone 3 labels with only the values in
    ``keep``."""
    study = tmp_path / "study"
    phantom.write_ct_series(study, slices=24, size=32)
    volume, metadata = load_series(study)
    labels = np.zeros(volume.shape, np.uint8)
    labels[volume > -500] = 1
    labels[volume < -600] = 0
    labels[(volume < -600) & (volume > -900)] = 2
    labels[volume > 300] = 3
    labels[~np.isin(labels, keep)] = 0
    return study, Tensor(labels, metadata)


def test_an_empty_segment_fails_the_job_unless_the_pipeline_allows_it(tmp_path):
    study, labels = labels_of(tmp_path, keep=(1, 2))  # no bone
    message = refused(WriteSegmentation, {"labels": labels, "study": study}, EmptySegmentError)
    assert "segment(s) 'Bone' (label 3) have no voxel" in message
    out = run_stage(
        WriteSegmentation,
        {"labels": labels, "study": study},
        arguments={"allow_empty": ["Bone"]},
        output_dir=tmp_path / "out",
    )
    (seg,) = out["seg"].glob("*.dcm")
    assert [s.SegmentLabel for s in pydicom.dcmread(seg).SegmentSequence] == [
        "Body without lung and bone",
        "Lung",
        "Bone",
    ]
    with pytest.raises(ParameterError, match=r"allow_empty names \['Spleen'\]"):
        WriteSegmentation(allow_empty=["Spleen"])


def test_an_empty_roi_fails_the_rtstruct_job_unless_allowed(tmp_path):
    study, labels = labels_of(tmp_path, keep=(1, 3))  # no lung
    message = refused(WriteRTStruct, {"labels": labels, "study": study}, EmptySegmentError)
    assert "ROI(s) 'Lung' (label 2) have no voxel" in message
    run_stage(WriteRTStruct, {"labels": labels, "study": study}, arguments={"allow_empty": True})


def test_the_seg_writer_refuses_rt_dose_naming_the_file(tmp_path):
    (tmp_path / "study").mkdir()
    shutil.copy(TEST_FILES / "rtdose_1frame.dcm", tmp_path / "study" / "dose.dcm")
    volume, metadata = load_series(tmp_path / "study")
    labels = Tensor(np.ones(volume.shape, np.uint8), metadata)
    message = refused(
        WriteSegmentation,
        {"labels": labels, "study": tmp_path / "study"},
        segments=[{"label": 1, "name": "Dose", "category": "Tissue", "type": "Tissue"}],
    )
    assert "dose.dcm: RT Dose Storage is a multi-frame IOD" in message


# -- bounded header reads ------------------------------------------------------------------


def test_the_bounded_header_read_equals_pydicoms_on_its_test_files():
    """read_header (bounded, deflate inflated in chunks) gives what dcmread with
    stop_before_pixels gives, for every test file pydicom reads (deflated ones included)."""
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(TEST_FILES.rglob("*")):
            if not path.is_file():
                continue
            try:
                expected = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            got = read_header(path)
            assert got == expected, path.name
            assert got.file_meta == expected.file_meta and got.preamble == expected.preamble
            compared += 1
    assert compared > 100
    deflated = read_header(TEST_FILES / "image_dfl.dcm")
    assert deflated.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian


def test_a_malformed_window_names_the_file_in_the_derived_series_preview(study):
    volume, metadata = load_series(study)
    uid = metadata["sop_instance_uids"][3]  # the middle slice: the preview's source
    (middle,) = [p for p in files(study) if pydicom.dcmread(p).SOPInstanceUID == uid]
    set_raw(middle, "WindowCenter", "DS", b"abc")
    message = refused(WriteDerivedSeries, {"volume": Tensor(volume, metadata), "study": study})
    assert f"{middle.name}: (0028,1050) WindowCenter / (0028,1051) WindowWidth 'abc'" in message


@pytest.mark.parametrize("name", ["CT_small.dcm", "image_dfl.dcm"])
def test_a_header_larger_than_the_limit_is_refused_naming_the_file(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's about CT_small's VRs
        with pytest.raises(ReadError, match=f"^{name}: its (deflated )?header .*than 512 B"):
            read_header(TEST_FILES / name, limit=512)


def test_junk_after_the_file_meta_is_refused_at_once(tmp_path):
    """64 MiB of zeros where the dataset should be: refused at its second element, not parsed
    (8 million empty elements) up to the header limit."""
    source = TEST_FILES / "CT_small.dcm"
    meta_end = 132 + 12 + int.from_bytes(source.read_bytes()[140:144], "little")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(source.read_bytes()[:meta_end] + bytes(64 << 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's: zeros look like implicit VR
        with pytest.raises(ReadError, match=r"^junk.dcm: element \(0000,0000\) follows"):
            read_header(junk)


def test_a_malformed_value_in_another_series_does_not_fail_the_chosen_one(tmp_path):
    chosen = phantom.write_ct_series(tmp_path / "study" / "a", slices=6, size=16, seed=1)
    other = phantom.write_ct_series(tmp_path / "study" / "b", slices=6, size=16, seed=2)
    set_raw(other.files[0], "NumberOfFrames", "IS", b"abc")
    uid = str(pydicom.dcmread(chosen.files[0]).SeriesInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_stage(
            SeriesToVolume, {"study": tmp_path / "study"}, arguments={"series_uid": uid}
        )
    assert out["volume"].array.shape == (6, 16, 16)


def test_inference_refuses_a_volume_with_nan(tmp_path):
    volume = np.full((8, 32, 32), -1000.0, np.float32)
    volume[4, 10:20, 10:20] = np.nan
    message = refused(Inference, {"volume": volume}, model="demo", roi_size=32)
    assert "stage 'Inference' input 'volume' has 100 NaN or infinite value(s) of 8192" in message
