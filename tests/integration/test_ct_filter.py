"""`pipelines/ct-filter.yaml` (Clara's FastIO-ITK shape: read -> filter -> write) as a user
runs it: the smoothed CT comes back as a derived DICOM series of the same study, and its
cropped box as NIfTI whose world coordinates are those of the source voxels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from deadlines import LONG_HANG

from operators.dicom import load_series
from operators.kernels import gaussian_smooth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_the_filter_pipeline_writes_a_derived_series_and_a_cropped_nifti(tmp_path):
    study = tmp_path / "in" / "study-1"
    subprocess.run(
        [sys.executable, "-m", "operators.dicom.phantom", study,
         "--slices", "12", "--size", "128", "--oblique", "--shuffle"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", "run", "pipelines/ct-filter.yaml",
         "--input", tmp_path / "in", "--output", tmp_path / "out", "--param", "sigma=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=LONG_HANG,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    source, meta = load_series(study)
    smoothed = gaussian_smooth(source, 3.0, meta["spacing"])

    derived, derived_meta = load_series(tmp_path / "out" / "study-1" / "derived" / "series")
    np.testing.assert_allclose(derived, smoothed, atol=0.05)  # within the quantisation step
    assert derived_meta["study_instance_uid"] == meta["study_instance_uid"]
    assert derived_meta["series_instance_uid"] != meta["series_instance_uid"]
    np.testing.assert_allclose(derived_meta["origin"], meta["origin"], atol=1e-4)
    assert len(list((tmp_path / "out" / "study-1" / "derived" / "preview").glob("*.dcm"))) == 1

    (nifti,) = (tmp_path / "out" / "study-1" / "nifti" / "nifti").glob("*.nii.gz")
    image = nib.load(nifti)
    box = smoothed[:, 48:-48, 48:-48]
    np.testing.assert_allclose(np.asarray(image.dataobj).transpose(2, 1, 0), box, atol=1e-5)
    # NIfTI voxel (i, j, k) = our (column, row, slice); RAS = LPS with x and y negated
    direction = np.asarray(meta["direction"]).reshape(3, 3)
    for d, h, w in [(0, 0, 0), (11, 31, 0), (5, 7, 31)]:
        lps = np.asarray(meta["origin"]) + direction @ (
            np.asarray(meta["spacing"]) * [d, h + 48, w + 48]
        )
        ras = image.affine @ [w, h, d, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)
    assert (tmp_path / "out" / "study-1" / "mhd" / "mhd" / "smoothed-crop.mhd").is_file()
