"""The SelectSeries stage: its outputs feed SeriesToVolume, no match is a clear error, a bad
rule file fails `dataflow validate`, and pipelines/series-selection.yaml runs end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cli import dataflow

from dataflow.stage import ParameterError
from dataflow.testing import run_stage
from operators.dicom import SelectionError, SelectSeries, SeriesToVolume
from operators.dicom.phantom import write_ct_series

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PIPELINE = ROOT / "pipelines" / "series-selection.yaml"


def make_study(folder: Path) -> dict[str, str]:
    """A localizer, a thick and a thin axial series of one study (description -> UID)."""
    uids = {}
    for number, (name, slices, spacing) in enumerate(
        [("Scout", 2, 1.0), ("Thick", 6, 10.0), ("Thin", 16, 2.5)], start=1
    ):
        s = write_ct_series(
            folder / name, slices=slices, size=16, seed=11, series_number=number,
            description=name, slice_spacing=spacing,
        )  # fmt: skip
        uids[name] = s.series_instance_uid
        if name == "Scout":
            for path in s.files:
                ds = pydicom.dcmread(path)
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
                ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
                ds.save_as(path)
    return uids


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("study")
    return folder, make_study(folder)


def test_the_chosen_series_feeds_series_to_volume(study, tmp_path):
    folder, uids = study
    out = run_stage(
        SelectSeries, {"study": folder}, output_dir=tmp_path,
        arguments={"rules": (ROOT / "pipelines/rules/ct-axial.json").read_text(),
                   "all_matched": True, "sort_by_instance_count": True},
    )  # fmt: skip
    files = sorted(out["series"].rglob("*.dcm"))
    assert len(files) == 16 and {f.parent.name for f in files} == {"Thin"}
    source = folder / "Thin" / files[0].name
    assert os.path.samefile(files[0], source)  # a hard link, same file system
    report = json.loads((out["selection"] / "selection.json").read_text())
    assert report["chosen_selection"] == "CT axial" and report["chosen_series"] == uids["Thin"]
    rejected = report["selections"][0]["rejected"]
    assert (
        rejected[uids["Scout"]] == "ImageType ['ORIGINAL', 'PRIMARY', 'LOCALIZER'] has 'LOCALIZER'"
    )
    assert rejected[uids["Thick"]] == "SliceThickness 10.0 is not in [0.5, 5]"
    volume = run_stage(SeriesToVolume, {"study": out["series"]})["volume"]
    assert volume.array.shape == (16, 16, 16)
    assert volume.metadata["series_instance_uid"] == uids["Thin"]


def test_a_named_selection_and_the_first_match_by_default(study, tmp_path):
    folder, _ = study
    rules = {"selections": [
        {"name": "scout", "conditions": {"ImageType": "LOCALIZER"}},
        {"name": "thick", "conditions": {"SliceThickness": [">", 5],
                                         "ImageOrientationPatient": "Axial"}},
    ]}  # fmt: skip
    first = run_stage(
        SelectSeries, {"study": folder}, output_dir=tmp_path / "a", arguments={"rules": rules}
    )
    assert {p.parent.name for p in first["series"].rglob("*.dcm")} == {"Scout"}
    named = run_stage(
        SelectSeries, {"study": folder}, output_dir=tmp_path / "b",
        arguments={"rules": rules, "selection": "thick"},
    )  # fmt: skip
    assert {p.parent.name for p in named["series"].rglob("*.dcm")} == {"Thick"}
    with pytest.raises(ParameterError, match="selection 'thin' is not in the rules"):
        run_stage(SelectSeries, {"study": folder}, arguments={"rules": rules, "selection": "thin"})


def test_no_match_lists_every_series_with_the_condition_it_failed(study):
    folder, uids = study
    sagittal = {"Modality": "CT", "ImageOrientationPatient": "Sagittal"}
    rules = {"selections": [{"name": "mr", "conditions": {"Modality": "MR"}},
                            {"name": "sag", "conditions": sagittal}]}  # fmt: skip
    with pytest.raises(SelectionError) as info:
        run_stage(SelectSeries, {"study": folder}, arguments={"rules": rules})
    text = str(info.value)
    assert "no series of the study (3) matches any selection" in text
    for uid in uids.values():
        assert f"{uid} (" in text
    assert "Modality 'CT' does not match 'MR'" in text
    assert "ImageOrientationPatient is Coronal, not Sagittal" in text
    assert "ImageOrientationPatient is Axial, not Sagittal" in text
    assert "Phantom" not in text.replace("Phantom CT", "") and "PHANTOM-" not in text


BAD_RULES = """{
    "selections": [
        {
            "name": "CT axial",
            "conditions": {
                "Modality": "CT",
                "SliceThickness": [5, "=>"]
            }
        }
    ]
}
"""


def test_validate_refuses_a_bad_rule_file_naming_the_rule(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ct-axial.json").write_text(BAD_RULES)
    pipeline = tmp_path / "series-selection.yaml"
    shutil.copy(PIPELINE, pipeline)  # rules/ct-axial.json, relative to the pipeline's folder
    out = dataflow("validate", pipeline)
    assert out.returncode == 1, out.stdout
    rule_file = tmp_path / "rules" / "ct-axial.json"
    assert f"{pipeline}:" in out.stdout  # the pipeline's line, then the rule file's line
    assert (
        f"{rule_file}:7: selection 'CT axial' condition 'SliceThickness': unknown relation "
        "'=>'" in out.stdout
    ), out.stdout
    assert dataflow("validate", PIPELINE).returncode == 0


def test_validate_refuses_an_unknown_keyword_inline(tmp_path):
    pipeline = tmp_path / "inline.yaml"
    pipeline.write_text(
        PIPELINE.read_text().replace(
            "rules: rules/ct-axial.json",
            "rules: {selections: [{name: ct, conditions: {Modalty: CT}}]}",
        )
    )
    out = dataflow("validate", pipeline)
    assert out.returncode == 1
    assert "selection 'ct' condition 'Modalty'" in out.stdout
    assert "did you mean 'Modality'" in out.stdout


def test_the_reference_pipeline_runs_on_a_three_series_study(tmp_path):
    make_study(tmp_path / "in" / "job1")
    out = dataflow("run", PIPELINE, "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    job = tmp_path / "out" / "job1"
    report = json.loads((job / "select/selection/selection.json").read_text())
    assert report["chosen_selection"] == "CT axial"
    mask = np.load(job / "save/output/bone.npy")
    assert mask.shape == (16, 16, 16) and mask.dtype == np.uint8 and 0 < mask.sum() < mask.size
    meta = json.loads((job / "save/output/bone.json").read_text())
    assert meta["series_instance_uid"] == report["chosen_series"]
