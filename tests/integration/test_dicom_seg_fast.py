"""The SEG writer's fast path (operators.dicom.seg_fast) writes highdicom's SEG: the same
elements and values (but the new UIDs and the times), the per-frame functional groups byte
for byte, and a file dciodvfy accepts; where it does not apply, highdicom writes it all."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from operators.dicom import seg_fast
from operators.dicom.phantom import BODY, BONE, labels_at, write_ct_series
from operators.dicom.seg import DEFAULT_SEGMENTS, _segmentation, make_segmentation, source_datasets
from operators.dicom.series import load_series

pytestmark = pytest.mark.integration

# new per SEG: not compared (the file meta's group length follows the length of the new
# MediaStorageSOPInstanceUID: a fresh UID may be a byte or two longer than the other's)
FRESH = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID",
         "DimensionOrganizationUID", "InstanceCreationDate", "InstanceCreationTime",
         "ContentDate", "ContentTime", "ContributionDateTime",
         "FileMetaInformationGroupLength"}  # fmt: skip
TO_SEGMENT = np.zeros(8, np.uint8)
TO_SEGMENT[BODY], TO_SEGMENT[2], TO_SEGMENT[3], TO_SEGMENT[BONE] = 1, 2, 2, 3
LUNG = {"label": 2, "name": "Lung", "category": "AnatomicalStructure", "type": "Lung"}
REORDERED = [DEFAULT_SEGMENTS[2], DEFAULT_SEGMENTS[0], LUNG]  # label 3 is segment 1


def differences(a: pydicom.Dataset, b: pydicom.Dataset, where: str = "") -> list[str]:
    out = [f"{where}{t} in one only" for t in sorted(set(a.keys()) ^ set(b.keys()))]
    for tag in sorted(set(a.keys()) & set(b.keys())):
        x, y = a[tag], b[tag]
        if x.keyword in FRESH:
            continue
        if x.VR != y.VR:
            out.append(f"{where}{x.keyword}: VR {x.VR} != {y.VR}")
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{where}{x.keyword}: {len(x.value)} != {len(y.value)} items")
            for i, (p, q) in enumerate(zip(x.value, y.value)):
                out += differences(p, q, f"{where}{x.keyword}[{i}].")
        elif x.value != y.value:
            out.append(f"{where}{x.keyword}: {str(x.value)[:60]} != {str(y.value)[:60]}")
    return out


def encoded(elem) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


@pytest.fixture(scope="module", params=["axial", "oblique-45"])
def study(request, tmp_path_factory):
    """A phantom study, its label volume (body 1, lung 2, bone 3) and source headers; 45²
    pixels per frame is not a multiple of 8 (frames packed across byte boundaries)."""
    folder = tmp_path_factory.mktemp("seg-fast") / "study"
    if request.param == "axial":
        write_ct_series(folder, slices=12, size=48, shuffle=True)
    else:
        write_ct_series(folder, slices=9, size=45, oblique=True, shuffle=True)
    volume, meta = load_series(folder)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    direction = np.asarray(meta["direction"], float).reshape(3, 3)
    points = np.asarray(meta["origin"]) + (index * np.asarray(meta["spacing"])) @ direction.T
    return TO_SEGMENT[labels_at(points)], source_datasets(folder, meta)


def both(tmp_path, labels, sources, **kwargs):
    """The fast SEG and highdicom's, each written and read back."""
    fast = make_segmentation(labels, sources, allow_empty=True, **kwargs)
    slow = make_segmentation(labels, sources, allow_empty=True, fast=False, **kwargs)
    assert not isinstance(fast, hd.seg.Segmentation), "the fast path was not taken"
    assert isinstance(slow, hd.seg.Segmentation)
    assert fast.get_item(0x52009230).is_raw  # still encoded: pydicom never parsed it
    assert fast.get_item(0x52009230).value == encoded(slow[0x52009230])[12:]
    paths = tmp_path / "fast.dcm", tmp_path / "highdicom.dcm"
    fast.save_as(paths[0])
    slow.save_as(paths[1])
    return paths, pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1])


def check(paths, fast, slow) -> None:
    assert differences(fast, slow) == []
    assert differences(fast.file_meta, slow.file_meta) == []
    assert fast.NumberOfFrames == len(fast.PerFrameFunctionalGroupsSequence)
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True)
        assert [line for line in run.stderr.splitlines() if line.startswith("Error")] == []


@pytest.mark.parametrize(
    "case",
    ["three segments", "one segment", "segments reordered", "an empty segment", "a gap"],
)
def test_the_fast_seg_is_highdicoms(study, case, tmp_path):
    labels, sources = study
    kwargs = {}
    if case == "one segment":  # Dimension Organization Type 3D, segment in the shared groups
        labels, kwargs = np.where(labels == 2, 2, 0).astype(np.uint8), {"segments": [LUNG]}
    elif case == "segments reordered":  # label values remapped onto segment numbers
        kwargs = {"segments": REORDERED}
    elif case == "an empty segment":  # no bone: its frames are left out
        labels = np.where(labels == 3, 0, labels).astype(np.uint8)
    elif case == "a gap":  # irregular spacing: no Spacing Between Slices
        keep = [k for k in range(len(sources)) if k != 4]
        labels, sources = labels[keep], [sources[k] for k in keep]
    paths, fast, slow = both(tmp_path, labels, sources, **kwargs)
    check(paths, fast, slow)
    if case == "one segment":
        assert fast.DimensionOrganizationType == "3D"
    if case == "a gap":
        measures = fast.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert "SpacingBetweenSlices" not in measures


def test_sources_the_fast_path_does_not_know_go_to_highdicom(study):
    labels, sources = study
    sources = [pydicom.Dataset(ds) for ds in sources]
    sources[-1].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]  # highdicom refuses these

    def build(images, array):
        return _segmentation(hd, images, array, DEFAULT_SEGMENTS, "S", 1, None)

    assert seg_fast.fast_segmentation(build, sources, labels, [1, 2, 3]) is None
    empty = np.zeros_like(labels)  # highdicom keeps every frame of an empty SEG
    assert seg_fast.fast_segmentation(build, study[1], empty, [1, 2, 3]) is None
