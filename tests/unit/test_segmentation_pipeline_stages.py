"""What pipelines/ct-segmentation.yaml's stages hold (issue 10): the `bone` stage keeps every
bone that is not a speck, and the SEG's first segment is coded as what it holds (the body with
the lungs and bone painted over it), not as the entire body."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataflow.pipeline import import_stage, load_pipeline
from dataflow.testing import run_stage
from operators.dicom.seg import DEFAULT_SEGMENTS, _descriptions

ROOT = Path(__file__).parents[2]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


def bones_and_specks() -> tuple[np.ndarray, np.ndarray]:
    """A dense mask of a chest: a spine, a sternum and six ribs (each its own component), and
    specks of 1 to 8 voxels (noise, calcifications). Returns (mask, the bones alone)."""
    bones = np.zeros((24, 64, 64), np.uint8)
    bones[:, 44:54, 28:36] = 1  # vertebral bodies, one column
    bones[:, 8:12, 29:35] = 1  # sternum
    for k, z in enumerate((3, 11, 19)):  # ribs: left and right, apart from spine and sternum
        bones[z : z + 2, 16:40, 6 + k : 10 + k] = 1
        bones[z : z + 2, 16:40, 54 - k : 58 - k] = 1
    mask = bones.copy()
    for z, y, x, n in ((1, 2, 2, 1), (12, 60, 60, 2), (22, 30, 30, 8)):
        mask[z, y, x : x + n] = 1
    return mask, bones


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_bone_survives_the_pipelines_speck_removal(path):
    spec = load_pipeline(path)
    mask, bones = bones_and_specks()
    for op in spec.operators:
        if op.stage is None or not op.stage.endswith("ConnectedComponents"):
            continue
        if op.arguments.get("keep_largest"):
            assert "largest" in op.description, f"{op.name}: keeps one component, says not so"
            continue
        out = run_stage(import_stage(op.stage), {"mask": mask}, arguments=op.arguments)["mask"]
        np.testing.assert_array_equal(out, bones, err_msg=f"{path.name}: stage {op.name!r}")


def test_connected_components_keeps_every_component_unless_asked():
    mask, bones = bones_and_specks()
    stage = import_stage("operators.image_stages:ConnectedComponents")
    assert np.array_equal(run_stage(stage, {"mask": mask})["mask"], mask)
    largest = run_stage(stage, {"mask": mask}, arguments={"keep_largest": True})["mask"]
    assert largest.sum() == bones[:, 44:54, 28:36].sum()  # the spine alone


def test_the_first_segment_is_coded_as_the_soft_tissue_it_holds():
    body = DEFAULT_SEGMENTS[0]
    assert body["label"] == 1 and "without lung and bone" in body["name"]
    (first, *_) = _descriptions(DEFAULT_SEGMENTS)
    code = first.SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue) == ("SCT", "87784001")  # Soft tissue
    assert code.CodeMeaning != "Entire body" and "38266002" not in code.CodeValue
