"""DICOM series -> volume, against the phantom's analytic truth, dcm2niix and dciodvfy.

Phantoms are small (24 slices of 64 x 64 by default) and written into tmp_path. Tests that need
a Debian tool (dcm2niix, dciodvfy) skip when it is not installed, saying which package to add.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dataflow.stage import Tensor
from dataflow.tensors import GEOMETRY_KEYS
from dataflow.testing import run_stage
from operators.dicom import SeriesError, SeriesToVolume, load_series, phantom, split_series
from operators.dicom.enhanced import write_enhanced_ct

pytestmark = pytest.mark.integration

needs_dcm2niix = pytest.mark.skipif(
    shutil.which("dcm2niix") is None, reason="dcm2niix not installed (Debian package dcm2niix)"
)
needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)"
)


def affine(metadata: dict) -> np.ndarray:
    """4x4: array index (d, h, w) -> LPS mm, from the docs/tensors.md keys."""
    out = np.eye(4)
    out[:3, :3] = np.reshape(metadata["direction"], (3, 3)) * np.asarray(metadata["spacing"])
    out[:3, 3] = metadata["origin"]
    return out


def voxel_points(metadata: dict, shape: tuple[int, ...]) -> np.ndarray:
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    a = affine(metadata)
    return index @ a[:3, :3].T + a[:3, 3]


def truth(series: phantom.PhantomSeries) -> np.ndarray:
    g = series.geometry
    return np.stack([phantom.hu_at(g.points(k)) for k in range(g.slices)]).astype(np.float32)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> phantom.PhantomSeries:
    return phantom.write_ct_series(tmp_path_factory.mktemp("axial"), shuffle=True, seed=3)


@pytest.fixture(scope="module")
def oblique(tmp_path_factory) -> phantom.PhantomSeries:
    return phantom.write_ct_series(
        tmp_path_factory.mktemp("oblique"), shuffle=True, oblique=True, seed=4
    )


# (a) order and values ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["shuffled", "oblique"])
def test_shuffled_files_load_in_spatial_order_with_true_hu(which, request):
    series = request.getfixturevalue(which)
    numbers = [pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber for f in series.files]
    assert numbers != sorted(numbers), "the phantom must not number slices in spatial order"
    assert sorted(series.directory.iterdir()) != list(series.files)

    volume, meta = load_series(sorted(series.directory.iterdir()))

    assert volume.dtype == np.float32 and volume.shape == (24, 64, 64)
    assert meta["sop_instance_uids"] == list(series.sop_instance_uids)
    np.testing.assert_array_equal(volume, truth(series))
    # every voxel centre, placed by the metadata alone, has the phantom's HU
    expected = phantom.hu_at(voxel_points(meta, volume.shape))
    assert np.count_nonzero(expected != volume) == 0
    # and known structures are where they should be
    for point, label in [
        ((70.0, -10.0, 0.0), phantom.LUNG_LEFT),
        ((-70.0, -10.0, 0.0), phantom.LUNG_RIGHT),
        ((0.0, 60.0, 0.0), phantom.BONE),
        ((0.0, -60.0, 0.0), phantom.BODY),
        ((0.0, -150.0, 0.0), phantom.AIR),
    ]:
        index = np.linalg.solve(affine(meta), [*point, 1.0])[:3]
        d, h, w = np.rint(index).astype(int)
        centre = voxel_points(meta, volume.shape)[d, h, w]
        assert phantom.labels_at(centre) == label
        assert volume[d, h, w] == phantom.LABEL_HU[label]


def test_geometry_metadata_of_an_axial_series(shuffled):
    _, meta = load_series(shuffled.directory)
    g = shuffled.geometry
    assert meta["spacing"] == pytest.approx([g.slice_spacing, *g.pixel_spacing])
    assert meta["origin"] == pytest.approx(g.position(0).tolist())
    # columns: slice axis = +z (feet to head), rows advance along +y, columns along +x
    assert meta["direction"] == pytest.approx([0, 0, 1, 0, 1, 0, 1, 0, 0])
    assert meta["axes"] == "DHW"
    assert meta["modality"] == "CT"
    assert meta["study_instance_uid"] == shuffled.study_instance_uid
    assert meta["series_instance_uid"] == shuffled.series_instance_uid
    assert meta["frame_of_reference_uid"] == shuffled.frame_of_reference_uid
    assert "frame_numbers" not in meta


def test_non_unit_slope_and_signed_pixels(tmp_path):
    series = phantom.write_ct_series(
        tmp_path, slices=4, size=16, rescale_slope=0.5, rescale_intercept=-1000.0, signed=True
    )
    volume, _ = load_series(series.directory)
    np.testing.assert_array_equal(volume, truth(series))


# (b) dcm2niix -------------------------------------------------------------------------------

NIFTI_TYPES = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 64: "<f8", 256: "i1", 512: "<u2"}


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data indexed [i, j, k], 4x4 sform affine in RAS) of a little-endian NIfTI-1 file."""
    raw = path.read_bytes()
    assert struct.unpack("<i", raw[:4])[0] == 348, "not a little-endian NIfTI-1 file"
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    offset = int(struct.unpack("<f", raw[108:112])[0])
    slope, inter = struct.unpack("<2f", raw[112:120])
    assert struct.unpack("<h", raw[254:256])[0] > 0, "no sform"
    shape = tuple(d for d in dim[1 : dim[0] + 1] if d > 1 or len(dim) < 4)[:3]
    count = int(np.prod(shape))
    data = np.frombuffer(raw, NIFTI_TYPES[datatype], count, offset).reshape(shape[::-1]).T
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope or 1.0) + inter
    srow = np.array(struct.unpack("<12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    return data, np.vstack([srow, [0, 0, 0, 1]])


@needs_dcm2niix
@pytest.mark.parametrize("which", ["shuffled", "oblique"])
def test_geometry_and_voxels_equal_dcm2niix(which, request, tmp_path):
    series = request.getfixturevalue(which)
    subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-o", str(tmp_path), "-f", "vol",
         str(series.directory)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    nifti, ras = read_nifti(tmp_path / "vol.nii")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras  # NIfTI world is RAS, ours LPS
    volume, meta = load_series(series.files)

    # nifti index (i, j, k) -> our index (d, h, w): must be a signed permutation of the axes
    to_ours = np.linalg.solve(affine(meta), lps)
    perm = np.rint(to_ours)
    assert np.allclose(to_ours, perm, atol=1e-4), to_ours
    # the same affine within 1e-3 mm once the axes are matched
    np.testing.assert_allclose(affine(meta) @ perm, lps, atol=1e-3)
    axes, flips = [], []
    for a in range(3):
        (b,) = np.flatnonzero(perm[a, :3])
        axes.append(b)
        flips.append(perm[a, b] < 0)
        assert perm[a, 3] == (volume.shape[a] - 1 if flips[-1] else 0)
    reordered = np.transpose(nifti, axes)
    reordered = np.flip(reordered, [a for a in range(3) if flips[a]])
    np.testing.assert_array_equal(reordered.astype(np.float32), volume)


# (c) inconsistent series --------------------------------------------------------------------


def _copy(series: phantom.PhantomSeries, dest: Path) -> list[Path]:
    dest.mkdir()
    return [Path(shutil.copy(f, dest / f.name)) for f in series.files]


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _missing_slice(files):
    files[10].unlink()
    return [files[9].name, files[11].name, "uneven slice spacing", "a missing slice"]


def _duplicate(files):
    copy = files[5].with_name("copy.dcm")
    shutil.copy(files[5], copy)
    _edit(copy, SOPInstanceUID=generate_uid())
    return ["duplicate slice position", "copy.dcm", files[5].name]


def _same_instance_twice(files):
    shutil.copy(files[5], files[5].with_name("again.dcm"))
    return ["duplicate slice position", "again.dcm", "the same SOP Instance UID"]


def _orientation(files):
    r = phantom._rotation(0.0, 0.0, 5.0)
    _edit(files[7], ImageOrientationPatient=phantom.ds_values([*r[:, 0], *r[:, 1]]))
    return ["mixed ImageOrientationPatient", "in 1 frame(s)", files[7].name]


def _rows_columns(files):
    ds = pydicom.dcmread(files[3])
    ds.Rows = ds.Columns = 32
    ds.PixelData = np.zeros((32, 32), "<u2").tobytes()
    ds.save_as(files[3])
    return ["mixed Rows x Columns", "32 x 32 in 1 frame(s)", files[3].name, "64 x 64 in 23"]


def _pixel_spacing(files):
    _edit(files[4], PixelSpacing=["6.0", "6.0"])
    return ["mixed PixelSpacing", files[4].name]


def _uneven(files):
    ds = pydicom.dcmread(files[12])
    position = [float(v) for v in ds.ImagePositionPatient]
    _edit(files[12], ImagePositionPatient=phantom.ds_values([*position[:2], position[2] + 1.0]))
    return ["uneven slice spacing", files[12].name, "11 mm", "9 mm"]


def _tilt(files):
    for k, f in enumerate(files):  # a gantry tilt: each slice shifted along y
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=phantom.ds_values([x, y + 0.5 * k, z]))
    return ["not stacked along the normal", "gantry tilt"]


def _no_position(files):
    ds = pydicom.dcmread(files[2])
    del ds.ImagePositionPatient
    ds.save_as(files[2])
    return ["no valid ImagePositionPatient", files[2].name]


def _mixed_frame_of_reference(files):
    _edit(files[2], FrameOfReferenceUID=generate_uid())
    return ["mixed FrameOfReferenceUID"]


@pytest.mark.parametrize(
    "damage",
    [
        _missing_slice, _duplicate, _same_instance_twice, _orientation, _rows_columns,
        _pixel_spacing, _uneven, _tilt, _no_position, _mixed_frame_of_reference,
    ],
)  # fmt: skip
def test_inconsistent_series_raises_a_clear_series_error(damage, shuffled, tmp_path):
    files = _copy(shuffled, tmp_path / "series")
    expected = damage(files)
    with pytest.raises(SeriesError) as caught:
        load_series(tmp_path / "series")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert shuffled.series_instance_uid in message
    for text in expected:
        assert text in message, message
    for identifier in ("Phantom^Synthetic", "PHANTOM-3"):  # no patient identifiers
        assert identifier not in message


def test_files_from_two_series_are_refused(shuffled, oblique):
    with pytest.raises(SeriesError, match="hold 2 series") as caught:
        load_series([*shuffled.files, *oblique.files])
    assert shuffled.series_instance_uid in str(caught.value)


# (d) compressed transfer syntaxes -----------------------------------------------------------


def test_rle_lossless_series_loads_identically(shuffled, tmp_path):
    rle = phantom.write_ct_series(tmp_path, shuffle=True, seed=3, transfer_syntax=RLELossless)
    assert pydicom.dcmread(rle.files[0]).file_meta.TransferSyntaxUID == RLELossless
    volume, meta = load_series(rle.directory)
    plain, plain_meta = load_series(shuffled.directory)
    np.testing.assert_array_equal(volume, plain)
    assert meta == plain_meta


def test_jpeg2000_lossless_series_loads_identically(shuffled, tmp_path):
    pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg and pylibjpeg-openjpeg")
    j2k = phantom.write_ct_series(
        tmp_path, slices=24, shuffle=True, seed=3, transfer_syntax=JPEG2000Lossless
    )
    volume, meta = load_series(j2k.directory)
    np.testing.assert_array_equal(volume, truth(shuffled))
    assert meta["sop_instance_uids"] == list(shuffled.sop_instance_uids)


def test_undecodable_pixels_raise_series_error_naming_file_and_syntax(shuffled, tmp_path):
    files = _copy(shuffled, tmp_path / "series")
    ds = pydicom.dcmread(files[6])
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS stream \xff\xd9"])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(files[6])
    with pytest.raises(SeriesError, match="cannot decode the pixels") as caught:
        load_series(files)
    assert files[6].name in str(caught.value)
    assert "JPEG-LS Lossless" in str(caught.value)


def test_truncated_file_raises_series_error(shuffled, tmp_path):
    files = _copy(shuffled, tmp_path / "series")
    files[8].write_bytes(files[8].read_bytes()[:-1000])
    with pytest.raises(SeriesError, match="cannot decode the pixels") as caught:
        load_series(files)
    assert files[8].name in str(caught.value)


# (e) multi-frame ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_frame", [False, True], ids=["shared-groups", "per-frame-groups"])
def test_enhanced_multiframe_ct_loads_like_the_classic_series(per_frame, oblique, tmp_path):
    path = write_enhanced_ct(
        tmp_path / "enhanced.dcm", oblique=True, seed=4, shuffle=True, per_frame=per_frame
    )
    volume, meta = load_series([path])
    np.testing.assert_array_equal(volume, truth(oblique))
    _, classic = load_series(oblique.directory)
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(meta[key], classic[key], atol=1e-9)
    assert meta["frame_of_reference_uid"] == classic["frame_of_reference_uid"]
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert meta["sop_instance_uids"] == [sop] * 24
    stored = pydicom.dcmread(path, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    content = [stored[n - 1].FrameContentSequence[0] for n in meta["frame_numbers"]]
    in_stack = [item.InStackPositionNumber for item in content]
    assert in_stack == list(range(1, 25))
    assert meta["frame_numbers"] != sorted(meta["frame_numbers"])  # frames were shuffled


def test_enhanced_rle_multiframe(tmp_path):
    path = write_enhanced_ct(tmp_path / "e.dcm", slices=6, size=32, transfer_syntax=RLELossless)
    volume, _ = load_series([path])
    g = phantom.scan_geometry(6, 32)
    expected = np.stack([phantom.hu_at(g.points(k)) for k in range(6)])
    np.testing.assert_array_equal(volume, expected)


# (f) the stage ------------------------------------------------------------------------------


def test_series_to_volume_stage(shuffled, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(shuffled.directory, study / "nested" / "deeper")
    (study / "README.txt").write_text("not DICOM\n")
    out = run_stage(SeriesToVolume, {"study": study})
    tensor = out["volume"]
    assert isinstance(tensor, Tensor)
    assert tensor.array.dtype == np.float32 and tensor.array.shape == (24, 64, 64)
    np.testing.assert_array_equal(tensor.array, truth(shuffled))
    assert set(GEOMETRY_KEYS) - {"frame_numbers"} <= set(tensor.metadata)  # multi-frame only
    assert tensor.metadata["series_instance_uid"] == shuffled.series_instance_uid
    assert len(tensor.metadata["sop_instance_uids"]) == 24


def _two_series_study(shuffled, root: Path) -> phantom.PhantomSeries:
    shutil.copytree(shuffled.directory, root / "series1")
    return phantom.write_ct_series(
        root / "series2" / "nested", slices=6, size=32, seed=3, series_number=2,
        description="second",
    )  # fmt: skip


def test_stage_picks_a_series_or_lists_them(shuffled, tmp_path):
    second = _two_series_study(shuffled, tmp_path)
    with pytest.raises(SeriesError, match="holds 2 image series") as caught:
        run_stage(SeriesToVolume, {"study": tmp_path})
    message = str(caught.value)
    assert shuffled.series_instance_uid in message and second.series_instance_uid in message
    assert "'second', 6 instance(s)" in message and "'Phantom CT', 24 instance(s)" in message
    out = run_stage(
        SeriesToVolume, {"study": tmp_path}, arguments={"series_uid": second.series_instance_uid}
    )
    assert out["volume"].array.shape == (6, 32, 32)
    with pytest.raises(SeriesError, match="is not in the study folder"):
        run_stage(SeriesToVolume, {"study": tmp_path}, arguments={"series_uid": "1.2.3"})


# (g) split_series ---------------------------------------------------------------------------


def test_split_series_on_a_study_folder(shuffled, tmp_path):
    second = _two_series_study(shuffled, tmp_path)
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    groups = split_series(tmp_path)
    assert set(groups) == {shuffled.series_instance_uid, second.series_instance_uid}
    assert len(groups[shuffled.series_instance_uid]) == 24
    assert sorted(groups[second.series_instance_uid]) == sorted(second.files)
    volume, meta = load_series(groups[second.series_instance_uid])
    assert volume.shape == (6, 32, 32)
    assert meta["study_instance_uid"] == shuffled.study_instance_uid


# (h) validity of what the phantom writes ----------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@needs_dciodvfy
def test_dciodvfy_finds_no_error_in_phantom_files(shuffled, oblique, tmp_path):
    rle = phantom.write_ct_series(tmp_path / "rle", slices=2, size=16, transfer_syntax=RLELossless)
    enhanced = write_enhanced_ct(tmp_path / "enhanced.dcm", slices=4, size=16, per_frame=True)
    for path in (shuffled.files[0], oblique.files[-1], rle.files[0], enhanced):
        assert _dciodvfy_errors(path) == [], path


def test_phantom_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "operators.dicom.phantom", str(tmp_path / "out"),
         "--slices", "5", "--size", "16", "--oblique", "--shuffle", "--seed", "7"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stderr == ""
    assert "wrote 5 files" in done.stdout
    volume, meta = load_series(tmp_path / "out")
    assert volume.shape == (5, 16, 16)
    g = phantom.scan_geometry(5, 16, oblique=True)
    np.testing.assert_allclose(meta["origin"], g.position(0), atol=1e-9)
