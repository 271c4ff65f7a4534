"""Series selection rules (MONAI Deploy's format) on real phantom studies: each condition kind,
all_matched, sorting by instance count, MONAI's sample rules, and malformed rule files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from operators.dicom.phantom import write_ct_series
from operators.dicom.selector import evaluate, select_series
from operators.dicom.selector_rules import RuleError, load_rules, orientation_of
from operators.dicom.series import read_headers

CORONAL = ["1", "0", "0", "0", "0", "-1"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]


def edit(files, **attributes) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.save_as(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, str]:
    """Five series of one study: axial 5 mm (8 slices), thin 2 mm (12), a localizer, a coronal
    and an oblique series. Returns description -> SeriesInstanceUID, plus the folder."""
    root = tmp_path_factory.mktemp("study")
    uids = {}

    def series(name, number, slices, **kw):
        s = write_ct_series(
            root / name, slices=slices, size=8, seed=7, series_number=number,
            description=name, **kw,
        )  # fmt: skip
        uids[name] = s.series_instance_uid
        return s.files

    series("Axial 5mm", 1, 8, slice_spacing=5.0)
    series("Thin 2mm", 2, 12, slice_spacing=2.0)
    edit(series("Scout", 3, 2, slice_spacing=1.0), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    edit(series("Coronal", 4, 3, slice_spacing=3.0), ImageOrientationPatient=CORONAL)
    series("Oblique", 5, 4, oblique=True, slice_spacing=4.0)
    uids["root"] = str(root)
    return uids


def rules(**conditions) -> dict:
    return {"selections": [{"name": "s", "conditions": conditions}]}


def matched(study, all_matched=True, **conditions) -> list[str]:
    names = {v: k for k, v in study.items()}
    found = select_series(study["root"], rules(**conditions), all_matched=all_matched)["s"]
    return [names[s.uid] for s in found]


def test_regular_expressions_and_equality(study):
    assert matched(study, SeriesDescription="(?i)^axial") == ["Axial 5mm"]
    assert matched(study, SeriesDescription="thin 2MM") == ["Thin 2mm"]  # case-insensitive
    assert matched(study, Modality="MR") == []
    assert len(matched(study, Modality="(?i)ct", BodyPartExamined="CHEST")) == 5
    assert matched(study, SeriesNumber=4) == ["Coronal"]
    assert matched(study, SeriesNumber="[45]") == ["Coronal", "Oblique"]  # regex on a number


def test_numeric_range_and_relations_in_both_orders(study):
    assert matched(study, SliceThickness=[3, 5]) == ["Axial 5mm", "Coronal", "Oblique"]
    assert matched(study, SliceThickness=[4, ">"]) == ["Axial 5mm"]  # MONAI's order
    assert matched(study, SliceThickness=[">", 4]) == ["Axial 5mm"]  # ours
    assert matched(study, SliceThickness=["<=", 3]) == ["Thin 2mm", "Scout", "Coronal"]
    assert "Thin 2mm" not in matched(study, SliceThickness=[2, "!="])
    report = evaluate(study["root"], rules(SliceThickness=[3, 5]))
    assert report.rejected["s"][study["Thin 2mm"]] == "SliceThickness 2.0 is not in [3, 5]"


def test_set_inclusion_and_exclusion(study):
    everything = ["Axial 5mm", "Thin 2mm", "Coronal", "Oblique"]
    assert matched(study, ImageType=["PRIMARY", "ORIGINAL"]) == [
        *everything[:2],
        "Scout",
        *everything[2:],
    ]
    assert matched(study, ImageType=["PRIMARY", "!LOCALIZER"]) == everything
    assert matched(study, ImageType="!LOCALIZER") == everything
    assert matched(study, ImageType="localizer") == ["Scout"]
    assert matched(study, ImageType={"not_in": ["LOCALIZER", "DERIVED"]}) == everything
    assert matched(study, SeriesDescription={"in": ["Scout", "Coronal"]}) == ["Scout", "Coronal"]
    assert matched(study, SeriesDescription={"not": "(?i)axial|thin|oblique"}) == [
        "Scout",
        "Coronal",
    ]
    report = evaluate(study["root"], rules(ImageType=["PRIMARY", "!LOCALIZER"]))
    assert report.rejected["s"][study["Scout"]] == (
        "ImageType ['ORIGINAL', 'PRIMARY', 'LOCALIZER'] has 'LOCALIZER'"
    )


def test_orientation_from_the_direction_cosines(study):
    assert matched(study, ImageOrientationPatient="Coronal") == ["Coronal"]
    assert "Coronal" not in matched(study, ImageOrientationPatient="axial")
    assert "Oblique" in matched(study, ImageOrientationPatient="Axial")  # closest to z
    assert matched(study, ImageOrientationPatient="Sagittal") == []
    assert orientation_of([float(v) for v in SAGITTAL]) == "Sagittal"
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "Axial"
    assert orientation_of([1, 0, 0, 1, 0, 0]) is None  # parallel cosines: no normal


def test_all_matched_and_sort_by_instance_count(study):
    cond = {"ImageType": "!LOCALIZER", "ImageOrientationPatient": "Axial"}
    first = select_series(study["root"], rules(**cond))["s"]
    assert [s.uid for s in first] == [study["Axial 5mm"]]  # MONAI: first match only
    every = select_series(study["root"], rules(**cond), all_matched=True)["s"]
    assert [s.instances for s in every] == [8, 12, 4]  # SeriesNumber order
    big = select_series(study["root"], rules(**cond), all_matched=True, sort_by_instance_count=True)
    assert [s.instances for s in big["s"]] == [12, 8, 4]
    assert big["s"][0].description == "Thin 2mm" and len(big["s"][0].files) == 12
    report = evaluate(study["root"], rules(**cond))
    assert "not the first match" in report.rejected["s"][study["Thin 2mm"]]


def test_headers_in_instead_of_a_folder(study):
    headers = read_headers(Path(study["root"]) / "Coronal")
    assert [s.description for s in select_series(headers, rules(Modality="CT"))["s"]] == ["Coronal"]


MONAI_SAMPLE = """
{
    "selections": [
        {"name": "CT Series 1", "conditions": {"StudyDescription": "(?i)^Spleen",
            "Modality": "(?i)CT", "SeriesDescription": "(?i)^No series description|(.*?)"}},
        {"name": "CT Series 2", "conditions": {"Modality": "CT", "BodyPartExamined": "Abdomen",
            "SeriesDescription" : "Not to be matched"}},
        {"name": "CT Series 3", "conditions": {"StudyDescription": "(.*?)", "Modality": "(?i)CT",
            "ImageType": ["PRIMARY", "ORIGINAL", "AXIAL"], "SliceThickness": [3, 5]}},
        {"name": "CT Series 4", "conditions": {"StudyDescription": "(.*?)", "Modality": "(?i)MR",
            "ImageOrientationPatient": "Axial", "SliceThickness": [2, ">"]}},
        {"name": "CT Series 5", "conditions": {"StudyDescription": "(.*?)", "Modality": "(?i)CT",
            "ImageType": ["PRIMARY", "!SECONDARY"]}}
    ]
}
"""


def test_monai_sample_rules_select_what_monai_selects(tmp_path):
    for number, (slices, spacing) in enumerate([(4, 8.0), (6, 4.0), (3, 1.0)], start=1):
        s = write_ct_series(
            tmp_path / str(number), slices=slices, size=8, seed=3, series_number=number,
            slice_spacing=spacing,
        )  # fmt: skip
        edit(s.files, StudyDescription="Spleen abdomen")
    found = select_series(tmp_path, MONAI_SAMPLE)
    assert [s.number for s in found["CT Series 1"]] == [1]
    assert found["CT Series 2"] == [] and found["CT Series 4"] == []
    assert [s.number for s in found["CT Series 3"]] == [2]  # 4 mm slices, in [3, 5]
    assert [s.number for s in found["CT Series 5"]] == [1]
    rule_file = tmp_path / "monai.json"
    rule_file.write_text(MONAI_SAMPLE)
    assert select_series(tmp_path, load_rules(rule_file)) == found


def test_yaml_rules_and_a_bare_list(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("selections:\n- name: ct\n  conditions:\n    Modality: CT\n")
    assert load_rules(path).names == ["ct"] and load_rules(path).source == str(path)
    assert load_rules([{"name": "x", "conditions": {"Modality": "CT"}}]).names == ["x"]
    assert load_rules([{"conditions": {"Modality": "CT"}}]).names == ["selection 1"]


BAD = [
    ({"SliceThikness": 5}, "'SliceThikness' is not a DICOM keyword; did you mean 'SliceThickness'"),
    ({"SliceThickness": [5, "=>"]}, "unknown relation '=>'"),
    ({"SliceThickness": [5, 3]}, "a range [min, max] needs min <= max"),
    ({"SeriesDescription": "(unclosed"}, "not a valid regular expression"),
    ({"ImageOrientationPatient": "Oblique"}, "an orientation is one of Sagittal, Coronal, Axial"),
    ({"Modality": {"maybe": "CT"}}, "a mapping condition is one of {not, in, not_in: ...}"),
    ({"Modality": True}, "true/false is not a condition"),
    ({"ReferencedImageSequence": "x"}, "a sequence attribute cannot be matched"),
]


@pytest.mark.parametrize(("condition", "message"), BAD)
def test_a_malformed_rule_is_refused_with_file_line_selection_and_key(tmp_path, condition, message):
    key = next(iter(condition))
    doc = {"selections": [
        {"name": "fine", "conditions": {"Modality": "CT"}},
        {"name": "broken", "conditions": {"Modality": "CT", **condition}},
    ]}  # fmt: skip
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(doc, indent=4))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if f'"{key}"' in t
                and i > 8)  # fmt: skip
    with pytest.raises(RuleError) as info:
        load_rules(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: selection 'broken' condition '{key}': "), text
    assert message in text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{", "not valid JSON"),
        ('{"selection": []}', "unknown key 'selection'"),
        ('{"selections": []}', "a non-empty list"),
        ('{"selections": [{"name": "a"}]}', "selection 'a' needs 'conditions'"),
        ('{"selections": [{"name": "a", "condition": {}}]}', "unknown key 'condition'"),
        (
            '{"selections": [{"name": "a", "conditions": {"Modality": "CT"}},'
            ' {"name": "a", "conditions": {"Modality": "MR"}}]}',
            "selection name 'a' is used twice",
        ),
    ],
)
def test_malformed_rule_documents(doc, message):
    with pytest.raises(RuleError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_rules(doc)
    with pytest.raises(ValueError):  # RuleError is also a ValueError
        load_rules(doc)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(RuleError, match="cannot read the rule file .*nope.json"):
        load_rules(tmp_path / "nope.json")


def test_patient_attributes_stay_out_of_messages(study):
    report = evaluate(study["root"], rules(PatientID="SOMEONE-ELSE"))
    reasons = list(report.rejected["s"].values())
    assert reasons and all("PHANTOM" not in r and "SOMEONE" not in r for r in reasons)
    assert all("withheld" in r for r in reasons)
    assert "PHANTOM" not in json.dumps(report.to_json()) and "Phantom^" not in report.explain()
