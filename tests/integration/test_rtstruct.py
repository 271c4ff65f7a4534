"""RTSTRUCT from a label volume: valid (dciodvfy), on the source planes, and faithful."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from deadlines import HANG
from skimage.draw import polygon

from dataflow.stage import StageError, Tensor
from dataflow.testing import run_stage
from operators.dicom.geometry import index_affine, voxel_points
from operators.dicom.phantom import BODY, BONE, labels_at, write_ct_series
from operators.dicom.rtstruct import WriteRTStruct, slice_contours
from operators.dicom.series import find_files, load_series

pytestmark = pytest.mark.integration

# phantom labels -> our ROIs: 1 Body, 2 Lung (both lungs), 3 Bone
TO_ROI = np.zeros(8, np.uint8)
TO_ROI[BODY], TO_ROI[2], TO_ROI[3], TO_ROI[BONE] = 1, 2, 2, 3


def dciodvfy_errors(path) -> list[str]:
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=HANG)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def rasterise(ds: pydicom.Dataset, meta: dict, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """ROI number -> mask, filling every contour in pixel space by the even-odd rule."""
    to_index = np.linalg.inv(index_affine(meta))
    uids = meta["sop_instance_uids"]
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            assert len(points) == contour.NumberOfContourPoints
            index = points @ to_index[:3, :3].T + to_index[:3, 3]
            k = round(float(index[0, 0]))
            np.testing.assert_allclose(index[:, 0], k, atol=1e-4)
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID == uids[k]
            rr, cc = polygon(index[:, 1], index[:, 2], shape[1:])
            fill = np.zeros(shape[1:], bool)
            fill[rr, cc] = True
            mask[k] ^= fill
        masks[int(roi.ReferencedROINumber)] = mask
    return masks


@pytest.fixture(params=[False, True], ids=["axial", "oblique"])
def study(request, tmp_path):
    write_ct_series(tmp_path / "study", slices=12, size=48, oblique=request.param, shuffle=True)
    return tmp_path / "study"


def _write(study, tmp_path, **arguments):
    volume, meta = load_series(study)
    labels = TO_ROI[labels_at(voxel_points(meta, volume.shape))]
    out = run_stage(WriteRTStruct, {"labels": Tensor(labels, meta), "study": study},
                    arguments=arguments, output_dir=tmp_path / "out")  # fmt: skip
    (path,) = sorted(out["rtstruct"].glob("*.dcm"))
    return path, labels, meta


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (dicom3tools)")
def test_rtstruct_is_valid_and_references_the_source(study, tmp_path):
    path, _, meta = _write(study, tmp_path)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == meta["study_instance_uid"]
    assert ds.SeriesInstanceUID != meta["series_instance_uid"]
    assert ds.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    (ref_study,) = frame.RTReferencedStudySequence
    assert ref_study.ReferencedSOPInstanceUID == meta["study_instance_uid"]
    (ref_series,) = ref_study.RTReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == meta["series_instance_uid"]
    referenced = [i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence]
    assert referenced == meta["sop_instance_uids"]
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Body", "Lung", "Bone"]
    kinds = [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence]
    assert kinds == ["EXTERNAL", "ORGAN", "ORGAN"]


def test_contours_lie_on_the_source_slice_planes(study, tmp_path):
    path, _, _ = _write(study, tmp_path)
    planes = {}
    for file in find_files(study):  # geometry straight from the source headers
        src = pydicom.dcmread(file)
        iop = np.asarray(src.ImageOrientationPatient, float)
        planes[src.SOPInstanceUID] = (np.asarray(src.ImagePositionPatient, float),
                                      np.cross(iop[:3], iop[3:]))  # fmt: skip
    count = 0
    for roi in pydicom.dcmread(path).ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            origin, normal = planes[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
            assert np.abs((points - origin) @ normal).max() < 1e-3
            count += 1
    assert count > 12


def test_rasterised_contours_reproduce_the_masks(study, tmp_path):
    path, labels, meta = _write(study, tmp_path)
    masks = rasterise(pydicom.dcmread(path), meta, labels.shape)
    for number in (1, 2, 3):
        assert dice(masks[number], labels == number) > 0.95, number
    # the body has holes where the lungs and the spine are: even-odd filling keeps them
    assert not np.any(masks[1] & (labels == 2))


def test_nested_holes_and_islands_are_separate_contours():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    mask[5:15, 5:15] = False  # hole
    mask[8:12, 8:12] = True  # island in the hole
    contours = slice_contours(mask)
    assert len(contours) == 3
    fill = np.zeros_like(mask)
    for c in contours:
        rr, cc = polygon(c[:, 0], c[:, 1], mask.shape)
        part = np.zeros_like(mask)
        part[rr, cc] = True
        fill ^= part
    np.testing.assert_array_equal(fill, mask)
    assert all(not np.allclose(c[0], c[-1]) for c in contours)  # closing point implicit


def test_labels_without_an_roi_are_refused(study):
    volume, meta = load_series(study)
    labels = np.full(volume.shape, 9, np.uint8)
    with pytest.raises(StageError, match=r"label value\(s\) \[9\] have no ROI description"):
        run_stage(WriteRTStruct, {"labels": Tensor(labels, meta), "study": study})


@pytest.mark.parametrize(
    ("rois", "message"),
    [([{"label": 1}], "missing \\['name'\\]"),
     ([{"label": 1, "name": "A", "color": [1, 2]}], "color must be three integers"),
     ([{"label": 1, "name": "A", "type": "LIVER"}], "'LIVER' is not an RTROIInterpretedType"),
     ([{"label": 1, "name": "A"}, {"label": 1, "name": "B"}], "must be unique")],
)  # fmt: skip
def test_bad_roi_lists_are_refused_when_the_stage_starts(rois, message):
    with pytest.raises(StageError, match=message):
        WriteRTStruct(rois=rois)
