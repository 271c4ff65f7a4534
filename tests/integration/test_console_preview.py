"""The console's image previews against the real service: a CT study run through
ct-segmentation, its job page in Chromium shows slices of the input series and the same slices
with the SEG's segments drawn in colour (PNGs rendered by the server, decoded and checked
here: grey without the overlay, the segments' colours with it)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.deadlines import LONG_HANG
from tests.integration.browser import errors, shoot
from tests.integration.platform_service import api_client, folder_files, platform_service, start_job
from tests.integration.test_platform_rest import wait_state

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """(service, job id) of a ct-segmentation job that succeeded over the API."""
    tmp = tmp_path_factory.mktemp("preview")
    study = tmp / "study"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "operators.dicom.phantom",
            str(study),
            "--slices",
            "16",
            "--size",
            "64",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        timeout=LONG_HANG,
    )
    pipelines = {"ct-segmentation": ROOT / "pipelines" / "ct-segmentation.yaml"}
    with platform_service(tmp, pipelines) as service, api_client(service) as client:
        job_id = start_job(client, "ct-segmentation", folder_files(study))
        client.timeout = LONG_HANG
        assert wait_state(client, job_id)["state"] == "succeeded"
        yield service, job_id


def test_the_server_draws_the_seg_over_the_ct(segmented):
    service, job_id = segmented
    with api_client(service) as client:
        plain = client.get(f"/console/jobs/{job_id}/preview/0.png", params={"overlay": "false"})
        drawn = client.get(f"/console/jobs/{job_id}/preview/0.png")
        beyond = client.get(f"/console/jobs/{job_id}/preview/9.png")
    assert plain.headers["content-type"] == drawn.headers["content-type"] == "image/png"
    assert beyond.status_code == 404
    grey = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")).astype(int)
    colour = np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB")).astype(int)
    assert grey.shape == colour.shape == (64, 64, 3)
    assert grey.std() > 10  # the CT, not an empty picture
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    tinted = (np.abs(colour - grey).sum(axis=2) > 20).mean()
    assert 0.05 < tinted < 0.95, tinted  # the segments, drawn over part of the slice


def test_the_job_page_shows_the_images(segmented, browser):
    service, job_id = segmented
    browser.get(f"{service.platform.urls['rest']}/console/jobs/{job_id}")
    images = browser.find_elements("css selector", ".previews img")
    assert len(images) >= 2
    loaded = [
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        for img in images
    ]
    assert all(width == 64 for width in loaded), loaded
    legend = browser.find_element("css selector", ".legend").text
    assert "Body" in legend and "Lung" in legend
    timeline = browser.find_element("css selector", "svg.gantt")
    assert len(timeline.find_elements("css selector", "rect.ok")) == 12  # every operator ran
    browser.execute_script("arguments[0].scrollIntoView()", timeline)
    shoot(browser, "job-timeline")
    browser.execute_script("arguments[0].scrollIntoView()", images[0])
    shoot(browser, "job-images")
    assert errors(browser) == []
