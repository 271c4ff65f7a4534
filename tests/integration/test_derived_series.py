"""A derived series and its secondary-capture preview: valid (dciodvfy) and faithful."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from deadlines import HANG
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from scipy.ndimage import gaussian_filter

from dataflow.stage import StageError, Tensor
from dataflow.testing import run_stage
from operators.dicom.derived import WriteDerivedSeries, choose_rescale, orientation_letters
from operators.dicom.phantom import write_ct_series
from operators.dicom.series import load_series

pytestmark = pytest.mark.integration

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="needs dciodvfy (Debian package dicom3tools)"
)


def dciodvfy_errors(path) -> list[str]:
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=HANG)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(params=[False, True], ids=["axial", "oblique"])
def study(request, tmp_path):
    write_ct_series(tmp_path / "study", slices=12, size=48, oblique=request.param, shuffle=True)
    return tmp_path / "study"


def _derive(study, tmp_path, volume=None, **arguments):
    source, meta = load_series(study)
    if volume is None:
        volume = gaussian_filter(source, 1.0).astype(np.float32)  # a smoothed CT
    out = run_stage(WriteDerivedSeries, {"volume": Tensor(volume, meta), "study": study},
                    arguments=arguments, output_dir=tmp_path / "out")  # fmt: skip
    return out, volume, meta


def test_smoothed_ct_reads_back_within_the_quantisation_step(study, tmp_path):
    out, volume, meta = _derive(study, tmp_path)
    files = sorted(out["series"].glob("*.dcm"))
    assert len(files) == 12
    back, back_meta = load_series(out["series"])
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert slope < 0.05  # a 16-bit range over ~1700 HU
    assert np.abs(back - volume).max() <= slope / 2 + 1e-3
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(back_meta[key], meta[key], atol=1e-6)
    assert back_meta["study_instance_uid"] == meta["study_instance_uid"]
    assert back_meta["frame_of_reference_uid"] == meta["frame_of_reference_uid"]
    assert back_meta["series_instance_uid"] != meta["series_instance_uid"]
    assert back_meta["modality"] == "CT"
    assert not set(back_meta["sop_instance_uids"]) & set(meta["sop_instance_uids"])
    for k, uid in enumerate(back_meta["sop_instance_uids"]):  # slice k derives from source k
        ds = pydicom.dcmread(next(f for f in files if f.stem == uid))
        assert ds.SOPClassUID == CTImageStorage
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.DerivationDescription
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == meta["sop_instance_uids"][k]
        assert ds.InstanceNumber == k + 1


@needs_dciodvfy
def test_derived_series_and_preview_pass_dciodvfy(study, tmp_path):
    out, _, _ = _derive(study, tmp_path)
    for path in [*sorted(out["series"].glob("*.dcm")), *out["preview"].glob("*.dcm")]:
        assert dciodvfy_errors(path) == [], path.name


def test_preview_is_an_8_bit_secondary_capture_of_the_middle_slice(study, tmp_path):
    out, volume, meta = _derive(study, tmp_path, window_center=-300, window_width=1400)
    (path,) = out["preview"].glob("*.dcm")
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.BitsAllocated, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (
        8, 1, "MONOCHROME2",
    )  # fmt: skip
    assert sc.StudyInstanceUID == meta["study_instance_uid"]
    assert sc.SeriesInstanceUID != meta["series_instance_uid"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == meta["sop_instance_uids"][6]
    expected = np.clip((volume[6] - (-300 - 700)) / 1400, 0, 1) * 255
    assert np.abs(sc.pixel_array.astype(float) - expected).max() <= 0.5 + 1e-6


def test_integral_values_are_stored_exactly(study, tmp_path):
    source, _ = load_series(study)
    out, _, _ = _derive(study, tmp_path, volume=source, preview=False)
    assert list(out["preview"].iterdir()) == []
    back, _ = load_series(out["series"])
    np.testing.assert_array_equal(back, source)
    ds = pydicom.dcmread(next(out["series"].glob("*.dcm")))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.PixelRepresentation) == (
        1.0, 0.0, 1,
    )  # fmt: skip


def test_rescale_covers_the_range():
    values = np.array([-1234.5678, 0.1, 98765.4321], np.float32)
    slope, intercept, signed = choose_rescale(values)
    assert not signed and intercept == pytest.approx(values.min(), abs=1e-6)
    assert intercept + 65535 * slope >= values.max()
    assert choose_rescale(np.full(3, 2.5, np.float32)) == (1.0, 2.5, False)


def test_a_volume_off_the_source_grid_or_not_finite_is_refused(study):
    source, meta = load_series(study)
    with pytest.raises(StageError, match=r"does not match the source series \[12, 48, 48\]"):
        run_stage(WriteDerivedSeries, {"volume": Tensor(source[:, :24], meta), "study": study})
    bad = source.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(StageError, match="NaN or infinite"):
        run_stage(WriteDerivedSeries, {"volume": Tensor(bad, meta), "study": study})


def test_orientation_letters():
    assert orientation_letters([1, 0, 0]) == "L"
    assert orientation_letters([0, -1, 0]) == "A"
    assert orientation_letters([-0.26, 0.0, -0.97]) == "FR"
