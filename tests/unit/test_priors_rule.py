"""The prior-selection rule (operators/dicom/priors.py: choose_priors), pure."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset

from operators.dicom.priors import PriorError, StudyInfo, choose_priors, parse_date, study_info

CURRENT = StudyInfo("1.2.3.100", "P1", dt.date(2024, 6, 1), "120000", frozenset({"CT"}),
                    frozenset({"CHEST"}))  # fmt: skip


def study(uid, patient="P1", date="20240101", modalities=("CT",), parts=("CHEST",), time=""):
    return StudyInfo(uid, patient, parse_date(date), time, frozenset(modalities),
                     frozenset(parts))  # fmt: skip


def uids(chosen):
    return [s.study_uid for s in chosen]


def test_the_most_recent_prior_of_the_same_patient_and_modality():
    candidates = [
        study("1.2.3.1", date="20230101"),
        study("1.2.3.2", date="20240301"),
        study("1.2.3.3", date="20240401", patient="P2"),  # another patient
        study("1.2.3.4", date="20240501", modalities=("MR",)),  # another modality
        study("1.2.3.100", date="20240601"),  # the current study itself
    ]
    assert uids(choose_priors(CURRENT, candidates)) == ["1.2.3.2"]
    assert uids(choose_priors(CURRENT, candidates, count=5)) == ["1.2.3.2", "1.2.3.1"]


def test_the_window_in_days_and_later_studies():
    candidates = [
        study("1.2.3.1", date="20240502"),  # 30 days before
        study("1.2.3.2", date="20240501"),  # 31 days before
        study("1.2.3.3", date="20240701"),  # after the current study: not a prior
        study("1.2.3.4", date="20240601"),  # the same day: a prior
    ]
    assert uids(choose_priors(CURRENT, candidates, within_days=30, count=9)) == [
        "1.2.3.4",
        "1.2.3.1",
    ]
    assert uids(choose_priors(CURRENT, candidates, within_days=0, count=9)) == ["1.2.3.4"]


def test_undated_studies_only_without_a_window():
    candidates = [study("1.2.3.1", date=""), study("1.2.3.2", date="20200101")]
    assert uids(choose_priors(CURRENT, candidates, within_days=30, count=9)) == []
    assert uids(choose_priors(CURRENT, candidates, within_days=None, count=9)) == [
        "1.2.3.2",
        "1.2.3.1",
    ]


def test_match_by_body_part_or_any():
    candidates = [
        study("1.2.3.1", date="20240101", modalities=("PT",), parts=("CHEST",)),
        study("1.2.3.2", date="20240201", modalities=("CT",), parts=("HEAD",)),
    ]
    assert uids(choose_priors(CURRENT, candidates, match="body-part")) == ["1.2.3.1"]
    assert uids(choose_priors(CURRENT, candidates, match="modality")) == ["1.2.3.2"]
    assert uids(choose_priors(CURRENT, candidates, match="any", count=2)) == [
        "1.2.3.2",
        "1.2.3.1",
    ]


def test_ties_are_broken_by_time_then_uid_and_duplicates_count_once():
    candidates = [
        study("1.2.3.1", date="20240101", time="080000"),
        study("1.2.3.2", date="20240101", time="090000"),
        study("1.2.3.2", date="20240101", time="090000"),
    ]
    assert uids(choose_priors(CURRENT, candidates, count=3)) == ["1.2.3.2", "1.2.3.1"]


def test_no_patient_id_matches_nothing():
    current = StudyInfo("1.2.3.100", "", dt.date(2024, 6, 1), "", frozenset({"CT"}))
    assert choose_priors(current, [study("1.2.3.1", patient="")]) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"count": 0}, "count must be >= 1"),
        ({"within_days": -1}, "within_days must be >= 0"),
        ({"match": "size"}, "match must be modality, body-part or any"),
    ],
)
def test_wrong_parameters(arguments, message):
    with pytest.raises(PriorError, match=message):
        choose_priors(CURRENT, [], **arguments)


def test_study_info_from_a_find_result_and_from_a_header():
    found = Dataset()
    found.StudyInstanceUID, found.PatientID, found.StudyDate = "1.2.3.1", "P1", "20240101"
    found.ModalitiesInStudy = ["CT", "SEG"]
    info = study_info(found)
    assert info.modalities == {"CT", "SEG"} and info.date == dt.date(2024, 1, 1)
    header = Dataset()
    header.StudyInstanceUID, header.PatientID, header.StudyDate = "1.2.3.2", "P1", ""
    header.Modality, header.BodyPartExamined = "CT", "CHEST"
    info = study_info(header)
    assert (info.modalities, info.body_parts, info.date) == ({"CT"}, {"CHEST"}, None)
