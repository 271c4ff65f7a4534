"""The phantom's analytic truth and geometry, and per-frame attribute lookup (no files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from operators.dicom import SeriesError, phantom
from operators.dicom.frames import frames_of


def test_labels_at_known_points():
    points = [
        (70, -10, 0),
        (-70, -10, 0),
        (0, 60, 100),
        (0, -60, 100),
        (0, -150, 0),
        (70, -10, 85),  # above the lung: body
    ]
    assert phantom.labels_at(points).tolist() == [
        phantom.LUNG_LEFT,
        phantom.LUNG_RIGHT,
        phantom.BONE,
        phantom.BODY,
        phantom.AIR,
        phantom.BODY,
    ]
    assert phantom.hu_at([(0, 60, 0)]).tolist() == [700]


@pytest.mark.parametrize("oblique", [False, True])
def test_scan_geometry_is_centred_and_orthonormal(oblique):
    g = phantom.scan_geometry(5, 8, oblique=oblique)
    r, c = np.array(g.row_cosine), np.array(g.column_cosine)
    assert r @ c == pytest.approx(0, abs=1e-12)
    assert np.linalg.norm(g.normal) == pytest.approx(1)
    centre = (g.points(0).mean(axis=(0, 1)) + g.points(4).mean(axis=(0, 1))) / 2
    np.testing.assert_allclose(centre, 0, atol=1e-9)
    assert (g.position(1) - g.position(0)) @ g.normal == pytest.approx(48.0)
    assert (not oblique) == np.allclose(g.normal, [0, 0, 1])


def test_stored_values_must_be_exact():
    assert phantom.stored_values(np.array([-1000, 40]), 1.0, -1024.0, False).tolist() == [24, 1064]
    with pytest.raises(ValueError, match="cannot store"):
        phantom.stored_values(np.array([41]), 2.0, -1024.0, False)


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _enhanced(frames: int) -> Dataset:
    ds = _item(Rows=4, Columns=4, NumberOfFrames=frames, SOPInstanceUID="1.2.3")
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                PixelMeasuresSequence=Sequence([_item(PixelSpacing=["0.5", "0.5"])]),
                PlaneOrientationSequence=Sequence(
                    [_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]
                ),
                PixelValueTransformationSequence=Sequence(
                    [_item(RescaleSlope="1", RescaleIntercept="-1024", RescaleType="HU")]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=["0", "0", str(k)])]))
            for k in range(frames)
        ]
    )
    return ds


def test_frames_of_reads_shared_then_per_frame_groups():
    ds = _enhanced(3)
    per = ds.PerFrameFunctionalGroupsSequence[1]
    per.PixelValueTransformationSequence = Sequence(
        [_item(RescaleSlope="2", RescaleIntercept="0", RescaleType="HU")]
    )
    frames = frames_of(ds, Path("e.dcm"), "e.dcm", "9.9")
    assert [f.position[2] for f in frames] == [0, 1, 2]
    assert [(f.slope, f.intercept) for f in frames] == [(1, -1024), (2, 0), (1, -1024)]
    assert [f.frame_number for f in frames] == [1, 2, 3]
    assert frames[0].pixel_spacing == (0.5, 0.5)


def test_frames_of_refuses_missing_geometry_and_colour():
    ds = _enhanced(2)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(SeriesError, match=r"series 9\.9: e\.dcm frame 2 has no valid Image"):
        frames_of(ds, Path("e.dcm"), "e.dcm", "9.9")
    colour = _item(Rows=2, Columns=2, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    with pytest.raises(SeriesError, match="colour image"):
        frames_of(colour, Path("c.dcm"), "c.dcm", "9.9")
    legacy = _item(Rows=2, Columns=2, NumberOfFrames=4)
    with pytest.raises(SeriesError, match="no functional groups"):
        frames_of(legacy, Path("m.dcm"), "m.dcm", "9.9")
