"""NIfTI, MetaImage and NPZ writers: geometry against dcm2niix and independent readers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from deadlines import HANG

from dataflow.stage import PortError, StageError, Tensor
from dataflow.testing import run_stage
from operators.dicom.geometry import index_affine, voxel_points
from operators.dicom.phantom import labels_at, write_ct_series
from operators.dicom.series import load_series
from operators.research import (
    WriteMhd,
    WriteMhdLabels,
    WriteNifti,
    WriteNiftiLabels,
    WriteNpz,
    WriteNpzLabels,
)

pytestmark = pytest.mark.integration

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(params=[False, True], ids=["axial", "oblique"])
def series(request, tmp_path):
    study = tmp_path / "study"
    write_ct_series(study, slices=12, size=48, oblique=request.param, shuffle=True)
    volume, meta = load_series(study)
    return study, volume, meta


def _labels(volume, meta):
    return labels_at(voxel_points(meta, volume.shape))


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="needs dcm2niix (Debian package)")
def test_nifti_matches_dcm2niix(series, tmp_path):
    study, volume, meta = series
    subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "ref", str(study)],
        check=True, capture_output=True, timeout=HANG,
    )  # fmt: skip
    out = run_stage(WriteNifti, {"volume": Tensor(volume, meta)}, output_dir=tmp_path / "out")
    ours, ref = nib.load(out["nifti"] / "volume.nii.gz"), nib.load(tmp_path / "ref.nii")
    assert ours.header["sform_code"] == 1 and ours.header["qform_code"] == 1
    mine, theirs = ours.get_sform(), ref.get_sform()
    np.testing.assert_allclose(ours.get_qform(), mine, atol=1e-3)
    # their voxel index -> ours: a signed permutation (dcm2niix flips the row axis)
    perm = np.linalg.solve(mine, theirs)
    assert np.allclose(perm, np.rint(perm), atol=1e-4), perm
    perm = np.rint(perm)
    np.testing.assert_allclose(mine @ perm, theirs, atol=1e-3)
    data, expected = np.asarray(ours.dataobj), np.asarray(ref.get_fdata(), np.float32)
    index = np.stack(np.meshgrid(*map(np.arange, expected.shape), indexing="ij"), -1)
    mapped = (index @ perm[:3, :3].T + perm[:3, 3]).astype(int)
    np.testing.assert_array_equal(data[tuple(np.moveaxis(mapped, -1, 0))], expected)


def test_nifti_voxels_sit_at_the_volume_positions(series, tmp_path):
    _, volume, meta = series
    labels = _labels(volume, meta)
    out = run_stage(WriteNiftiLabels, {"labels": Tensor(labels, meta)}, output_dir=tmp_path)
    image = nib.load(out["nifti"] / "labels.nii.gz")
    assert image.get_data_dtype() == np.uint8
    assert image.header.get_intent()[0] == "label"
    data = np.asarray(image.dataobj)
    np.testing.assert_array_equal(data, labels.transpose(2, 1, 0))  # (i, j, k) = (w, h, d)
    ijk = np.stack(np.meshgrid(*map(np.arange, data.shape), indexing="ij"), -1)
    ras = ijk @ image.affine[:3, :3].T + image.affine[:3, 3]
    lps = voxel_points(meta, volume.shape).transpose(2, 1, 0, 3)
    np.testing.assert_allclose(ras * [-1, -1, 1], lps, atol=1e-3)


def read_mhd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array in C order [k, j, i], 4x4 affine index (i, j, k) -> LPS) of a MetaImage."""
    fields = dict(line.split(" = ", 1) for line in path.read_text().splitlines())
    assert fields["ObjectType"] == "Image" and fields["NDims"] == "3"
    assert fields["BinaryDataByteOrderMSB"] == "False" and fields["CompressedData"] == "False"
    dtype = {"MET_FLOAT": "<f4", "MET_UCHAR": "u1"}[fields["ElementType"]]
    dims = [int(v) for v in fields["DimSize"].split()]
    raw = (path.parent / fields["ElementDataFile"]).read_bytes()
    array = np.frombuffer(raw, dtype).reshape(dims[::-1])
    axes = np.array(fields["TransformMatrix"].split(), float).reshape(3, 3)  # row = axis dir
    affine = np.eye(4)
    affine[:3, :3] = axes.T * np.array(fields["ElementSpacing"].split(), float)
    affine[:3, 3] = np.array(fields["Offset"].split(), float)
    return array, affine


@pytest.mark.parametrize(("stage", "port"), [(WriteMhd, "volume"), (WriteMhdLabels, "labels")])
def test_mhd_reads_back_with_its_geometry(series, tmp_path, stage, port):
    _, volume, meta = series
    array = volume if port == "volume" else _labels(volume, meta)
    out = run_stage(stage, {port: Tensor(array, meta)}, arguments={"name": "ct"},
                    output_dir=tmp_path)  # fmt: skip
    back, affine = read_mhd(out["mhd"] / "ct.mhd")
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype
    ours = index_affine(meta)[:, [2, 1, 0, 3]]  # index (w, h, d) -> LPS
    np.testing.assert_allclose(affine, ours, atol=1e-9)


def test_mhd_geometry_agrees_with_simpleitk_if_installed(series, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="optional cross-check")
    _, volume, meta = series
    out = run_stage(WriteMhd, {"volume": Tensor(volume, meta)}, output_dir=tmp_path)
    image = sitk.ReadImage(str(out["mhd"] / "volume.mhd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
    points = voxel_points(meta, volume.shape)
    for d, h, w in [(0, 0, 0), (3, 5, 7), (11, 47, 20)]:
        position = image.TransformIndexToPhysicalPoint((w, h, d))
        np.testing.assert_allclose(position, points[d, h, w], atol=1e-6)


@pytest.mark.parametrize(("stage", "port"), [(WriteNpz, "volume"), (WriteNpzLabels, "labels")])
def test_npz_keeps_array_and_metadata(series, tmp_path, stage, port):
    _, volume, meta = series
    array = volume if port == "volume" else _labels(volume, meta)
    out = run_stage(stage, {port: Tensor(array, meta)}, output_dir=tmp_path)
    with np.load(out["npz"] / f"{port}.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["array"], array)
        assert npz["array"].dtype == array.dtype
        assert json.loads(str(npz["metadata"])) == meta


def test_geometry_is_required_for_nifti_and_mhd_but_not_npz(tmp_path):
    array = np.zeros((2, 3, 4), np.float32)
    for stage in (WriteNifti, WriteMhd):
        with pytest.raises(StageError, match="no 'spacing'"):
            run_stage(stage, {"volume": array}, output_dir=tmp_path)
    out = run_stage(WriteNpz, {"volume": array}, output_dir=tmp_path)
    with np.load(out["npz"] / "volume.npz") as npz:
        assert json.loads(str(npz["metadata"])) == {}


def test_element_types_follow_the_stage_variant():
    with pytest.raises(PortError, match="must be float32"):
        run_stage(WriteNifti, {"volume": np.zeros((2, 2, 2), np.uint8)})
    with pytest.raises(StageError, match="plain file name"):
        WriteNpz(name="../escape")
