"""The console's image previews of an RTSTRUCT: our WriteRTStruct's structure set over a
phantom CT series (axial, and oblique with rectangular pixels), drawn by the preview code the
job page uses. The PNGs are decoded and checked: grey without the overlay; with it each ROI's
colour on and inside its contours, and nowhere far from them. Last, a job of a pipeline that
writes an RTSTRUCT, run by the real service: its page in Chromium shows the images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

from dataflow.platform.console.preview import (
    PALETTE,
    PreviewError,
    StructurePreview,
    find_preview,
)
from dataflow.stage import Tensor
from dataflow.testing import run_stage
from operators.dicom.geometry import voxel_points
from operators.dicom.phantom import BONE, LUNG_LEFT, LUNG_RIGHT, labels_at, write_ct_series
from operators.dicom.rtstruct import WriteRTStruct
from operators.dicom.series import find_files, load_series
from tests.integration.browser import errors
from tests.integration.platform_service import api_client, folder_files, platform_service, start_job
from tests.integration.test_platform_rest import wait_state

pytestmark = pytest.mark.integration

# phantom labels -> ROIs: 1 Lung (both lungs), 2 Bone; the body is left out, so that the
# contoured area differs from slice to slice (the lungs are ellipsoids, the spine a cylinder)
TO_ROI = np.zeros(8, np.uint8)
TO_ROI[LUNG_LEFT], TO_ROI[LUNG_RIGHT], TO_ROI[BONE] = 1, 1, 2
ROIS = [
    {"label": 1, "name": "Lung", "color": [0, 128, 255], "type": "ORGAN"},
    {"label": 2, "name": "Bone", "type": "ORGAN"},  # its ROIDisplayColor is removed below
]
LUNG_COLOUR, BONE_COLOUR = (0, 128, 255), PALETTE[1]  # Bone: the palette's second colour


class Job:
    """A job's folders as the service keeps them: inputs, and outputs under /operators/."""

    def __init__(self, root, oblique: bool):
        self.inputs, self.outputs = root / "payload", root / "job"
        write_ct_series(self.inputs, slices=12, size=48, oblique=oblique, shuffle=True)
        if oblique:  # rectangular pixels: rows 1.5 times further apart than columns
            for path in find_files(self.inputs):
                ds = pydicom.dcmread(path)
                ds.PixelSpacing = [
                    format_number_as_ds(ds.PixelSpacing[0] * 1.5),
                    ds.PixelSpacing[1],
                ]
                ds.save_as(path)
        volume, self.meta = load_series(self.inputs)
        self.labels = TO_ROI[labels_at(voxel_points(self.meta, volume.shape))]
        out = run_stage(
            WriteRTStruct,
            {"labels": Tensor(self.labels, self.meta), "study": self.inputs},
            arguments={"rois": ROIS},
            output_dir=self.outputs / "rtstruct",
        )
        (self.rtstruct,) = sorted(out["rtstruct"].glob("*.dcm"))
        self.edit(lambda ds: delattr(ds.ROIContourSequence[1], "ROIDisplayColor"))

    def edit(self, change) -> None:
        ds = pydicom.dcmread(self.rtstruct)
        change(ds)
        ds.save_as(self.rtstruct)

    def preview(self):
        files = [{"name": f"/operators/{self.rtstruct.relative_to(self.outputs).as_posix()}"}]
        return find_preview(files, self.inputs, self.outputs)

    def mask(self, uid: str, label: int) -> np.ndarray:
        return self.labels[self.meta["sop_instance_uids"].index(uid)] == label


@pytest.fixture(params=[False, True], ids=["axial", "oblique-rectangular-pixels"])
def job(request, tmp_path):
    return Job(tmp_path, request.param)


def rgb(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(int)


def test_contours_fill_exactly_the_pixels_of_their_rois(job):
    preview = job.preview()
    assert isinstance(preview, StructurePreview)
    assert preview.colours() == [("Lung", "rgb(0,128,255)"), ("Bone", "rgb(60,180,75)")]
    assert len(preview.contours) == 12  # the spine is on every slice
    for uid in preview.contours:
        masks = preview.masks(uid, (48, 48))
        for roi, label in ((0, 1), (1, 2)):
            expected = job.mask(uid, label)
            if expected.any():
                np.testing.assert_array_equal(masks[roi], expected, err_msg=f"ROI {roi}")
            else:
                assert roi not in masks


def test_the_slice_with_most_contoured_pixels_is_shown_with_two_around_it(job):
    preview = job.preview()
    uids = job.meta["sop_instance_uids"]  # in the series' spatial order
    area = [(job.labels[k] != 0).sum() for k in range(len(uids))]
    assert len(set(area)) > 2  # the lungs make the slices differ
    shown = [uids.index(uid) for uid in preview.shown]
    assert len(shown) == 3 and shown == sorted(shown)
    assert max(area) in [area[k] for k in shown]


def test_the_pngs_are_grey_and_then_coloured_on_and_inside_the_contours(job):
    preview, filled = job.preview(), 0
    for uid in preview.shown:
        grey, drawn = rgb(preview.png(uid, overlay=False)), rgb(preview.png(uid, overlay=True))
        assert grey.shape == drawn.shape == (48, 48, 3)
        assert grey.std() > 10  # the CT, not an empty picture
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        near = np.zeros((48, 48), bool)
        for label, colour in ((1, LUNG_COLOUR), (2, BONE_COLOUR)):
            mask = job.mask(uid, label)
            if not mask.any():
                continue
            around = ndimage.binary_dilation(mask, iterations=2)
            near |= around
            outline = (drawn == colour).all(axis=2)
            assert outline.sum() >= 8, (label, outline.sum())  # an outline of the ROI ...
            assert not (outline & ~around).any(), label  # ... and none far from it
            assert (outline & mask).any() and (outline & ~mask).any()  # along the boundary
            inside = ndimage.binary_erosion(mask, iterations=2)  # away from the outline
            tinted = np.round(0.75 * grey[inside] + 0.25 * np.asarray(colour))
            assert (np.abs(drawn[inside] - tinted) <= 1).all(), label
            filled += inside.sum()
        assert near.any()
        np.testing.assert_array_equal(drawn[~near], grey[~near])  # elsewhere: the CT only
    assert filled > 20  # the lungs' insides were checked


def test_contours_without_a_known_slice_are_placed_by_position(job):
    before = job.preview()
    pictures = {uid: before.png(uid, overlay=True) for uid in before.shown}

    def unreference(ds):
        for roi in ds.ROIContourSequence:
            for n, contour in enumerate(roi.ContourSequence):
                if n % 2:
                    del contour.ContourImageSequence
                else:  # a slice this job does not have
                    contour.ContourImageSequence[0].ReferencedSOPInstanceUID = generate_uid()

    job.edit(unreference)
    after = job.preview()
    assert after.shown == before.shown
    assert {uid: after.png(uid, overlay=True) for uid in after.shown} == pictures


def test_contours_on_no_input_slice_give_no_preview(job):
    def move_away(ds):
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                del contour.ContourImageSequence
                points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
                points += (
                    500.0 * np.reshape(job.meta["direction"], (3, 3))[:, 0]
                )  # along the normal
                contour.ContourData = [f"{v:.6f}" for v in points.ravel()]

    job.edit(move_away)
    assert job.preview() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: setattr(ds.ROIContourSequence[0].ContourSequence[0], "ContourData",
                            ["1", "2", "3", "4"]), "ROI 1 contour 1: ContourData has 4 numbers"),
        (lambda ds: setattr(ds.ROIContourSequence[0], "ROIDisplayColor", [0, 300, 0]),
         r"ROI 1: ROIDisplayColor \[0, 300, 0\] is not three integers"),
    ],
    ids=["contour-data", "display-colour"],
)  # fmt: skip
def test_a_bad_structure_set_is_named_in_the_error(job, change, message):
    job.edit(change)
    with pytest.raises(PreviewError, match=f"RTSTRUCT {job.rtstruct.name}: {message}"):
        job.preview()


# A CT series -> everything denser than fat -> an RTSTRUCT with one ROI (the body, with the
# lungs as holes in it).
CONTOURING = """\
api-version: 0.5.0
name: ct-contours
operators:
- name: load
  stage: operators.dicom:SeriesToVolume
  arguments: {modality: CT}
  input: [{name: study}]
  output: [{name: volume}]
- name: tissue
  stage: operators.image_stages:Threshold
  arguments: {lower: -500}
  input: [{from: load, name: volume}]
  output: [{name: mask}]
- name: contours
  stage: operators.dicom.rtstruct:WriteRTStruct
  arguments:
    rois: [{label: 1, name: Tissue, color: [255, 0, 255]}]
  input: [{from: tissue, name: mask, port: labels}, {name: study}]
  output: [{name: rtstruct}]
"""


@pytest.fixture(scope="module")
def contoured(tmp_path_factory):
    """(service, job id) of a ct-contours job that succeeded over the API."""
    tmp = tmp_path_factory.mktemp("rtstruct-job")
    study = write_ct_series(tmp / "study", slices=8, size=48).directory
    pipeline = tmp / "ct-contours.yaml"
    pipeline.write_text(CONTOURING)
    with platform_service(tmp, {"ct-contours": pipeline}) as service, api_client(service) as client:
        job_id = start_job(client, "ct-contours", folder_files(Path(study)))
        assert wait_state(client, job_id)["state"] == "succeeded"
        yield service, job_id


@pytest.mark.slow
def test_the_job_page_of_an_rtstruct_job_shows_its_images(contoured, browser):
    service, job_id = contoured
    with api_client(service) as client:
        plain = client.get(f"/console/jobs/{job_id}/preview/0.png", params={"overlay": "false"})
        drawn = client.get(f"/console/jobs/{job_id}/preview/0.png")
    grey, colour = rgb(plain.content), rgb(drawn.content)
    assert (grey[..., 0] == grey[..., 2]).all()
    assert ((colour == (255, 0, 255)).all(axis=2)).sum() >= 8  # the ROI's outline
    browser.get(f"{service.platform.urls['rest']}/console/jobs/{job_id}")
    images = browser.find_elements("css selector", ".previews img")
    assert len(images) == 6  # three slices, each plain and drawn over
    loaded = [
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        for img in images
    ]
    assert all(width == 48 for width in loaded), loaded
    assert "Tissue" in browser.find_element("css selector", ".legend").text
    assert errors(browser) == []
