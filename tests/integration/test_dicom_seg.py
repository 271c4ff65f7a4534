"""DICOM SEG from a label volume: valid (dciodvfy), referencing its source, and exact."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dataflow.stage import StageError, Tensor
from dataflow.testing import run_stage
from operators.dicom.phantom import BODY, BONE, labels_at, write_ct_series
from operators.dicom.seg import WriteSegmentation
from operators.dicom.series import load_series

pytestmark = pytest.mark.integration

# phantom labels -> our segments: 1 body without lung and bone, 2 Lung (both lungs), 3 Bone
TO_SEGMENT = np.zeros(8, np.uint8)
TO_SEGMENT[BODY], TO_SEGMENT[2], TO_SEGMENT[3], TO_SEGMENT[BONE] = 1, 2, 2, 3


def voxel_points(meta, shape):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    direction = np.asarray(meta["direction"], float).reshape(3, 3)
    return np.asarray(meta["origin"]) + (index * np.asarray(meta["spacing"])) @ direction.T


@pytest.fixture(params=[False, True], ids=["axial", "oblique"])
def study(request, tmp_path):
    write_ct_series(tmp_path / "study", slices=12, size=48, oblique=request.param, shuffle=True)
    return tmp_path / "study"


def test_a_label_volume_becomes_a_valid_seg_of_the_same_study(study, tmp_path):
    volume, meta = load_series(study)
    labels = TO_SEGMENT[labels_at(voxel_points(meta, volume.shape))]
    out = run_stage(WriteSegmentation, {"labels": Tensor(labels, meta), "study": study},
                    output_dir=tmp_path / "out")  # fmt: skip
    (path,) = sorted(out["seg"].glob("*.dcm"))
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == []
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Body without lung and bone",
        "Lung",
        "Bone",
    ]
    assert seg.StudyInstanceUID == meta["study_instance_uid"]
    assert seg.SeriesInstanceUID != meta["series_instance_uid"]
    assert seg.FrameOfReferenceUID == meta["frame_of_reference_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_instance_uid"]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=meta["sop_instance_uids"], combine_segments=True
    )
    np.testing.assert_array_equal(back, labels)


def test_labels_without_a_segment_description_are_refused(study):
    volume, meta = load_series(study)
    labels = np.full(volume.shape, 7, np.uint8)
    with pytest.raises(StageError, match=r"label value\(s\) \[7\] have no segment description"):
        run_stage(WriteSegmentation, {"labels": Tensor(labels, meta), "study": study})


def test_unknown_codes_are_refused_when_the_stage_starts():
    with pytest.raises(StageError, match="'Spleeen' is not a SNOMED CT keyword"):
        WriteSegmentation(
            segments=[{"label": 1, "name": "S", "category": "Organ", "type": "Spleeen"}]
        )


def test_a_missing_source_slice_is_named(study, tmp_path):
    volume, meta = load_series(study)
    first = next(
        p
        for p in study.iterdir()
        if pydicom.dcmread(p).SOPInstanceUID == meta["sop_instance_uids"][0]
    )
    first.unlink()
    with pytest.raises(StageError, match="1 source slice"):
        run_stage(
            WriteSegmentation,
            {"labels": Tensor(np.zeros(volume.shape, np.uint8), meta), "study": study},
        )
