"""Priors and studies fetched from a PACS (a query, then a retrieve): docs/dicom.md, "Query
and retrieve".

- :func:`choose_priors`: the rule, pure: which of a patient's studies (C-FIND results) are
  priors of the current one.
- :class:`FetchPriors`: the job's study folder in, a folder of its priors (as received) out.
- :class:`FetchStudy`: an order (the job's ``order.json``: "run pipeline P on study S from
  source X") or a Study Instance UID in, that study's folder (as received) out.

The PACS is DIMSE (C-FIND; C-GET, or with ``retrieve: move`` a C-MOVE to a listener of the
stage's own) or DICOMweb (QIDO-RS, WADO-RS): ``pacs`` is a mapping for
:func:`connectors.dicom.query.source_from` (and :func:`~connectors.dicom.query.move_from`).

Patient IDs and dates are never logged; errors name studies by UID only where the job's own
failure record needs it (the platform scrubs UIDs from logs).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from connectors.dicom.query import (
    QueryError,
    Retry,
    c_find,
    move_from,
    retrieve,
    source_from,
)
from dataflow.durable import link_or_copy
from dataflow.errors import DataflowError
from dataflow.stage import Port, Stage
from operators.dicom.reading import read_header
from operators.dicom.series import find_files

__all__ = [
    "ORDER_FILE",
    "FetchPriors",
    "FetchStudy",
    "PriorError",
    "StudyInfo",
    "choose_priors",
    "read_order",
    "study_info",
]

#: the file an ordered job's input folder holds (written by the platform, docs/dicom.md)
ORDER_FILE = "order.json"

Match = Literal["modality", "body-part", "any"]


class PriorError(DataflowError):
    """The job's study cannot be matched with priors (no PatientID, several studies...)."""


@dataclass(frozen=True)
class StudyInfo:
    """What the rule looks at in one study (the current one, or a C-FIND result)."""

    study_uid: str
    patient_id: str
    date: dt.date | None
    time: str = ""
    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()


def parse_date(value: Any) -> dt.date | None:
    """A DICOM DA (``YYYYMMDD``) as a date; None when empty or malformed."""
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def _codes(value: Any) -> frozenset[str]:
    if value is None or value == "":
        return frozenset()
    values = [value] if isinstance(value, str) else list(value)
    return frozenset(str(v).strip().upper() for v in values if str(v).strip())


def study_info(ds: Dataset, body_parts: Iterable[str] = ()) -> StudyInfo:
    """A :class:`StudyInfo` from a study-level C-FIND identifier (ModalitiesInStudy) or an
    instance's header (Modality, BodyPartExamined)."""
    modalities = _codes(ds.get("ModalitiesInStudy")) | _codes(ds.get("Modality"))
    return StudyInfo(
        study_uid=str(ds.get("StudyInstanceUID", "")).strip(),
        patient_id=str(ds.get("PatientID", "")).strip(),
        date=parse_date(ds.get("StudyDate")),
        time=str(ds.get("StudyTime", "") or "").strip(),
        modalities=modalities,
        body_parts=_codes(ds.get("BodyPartExamined")) | _codes(list(body_parts)),
    )


def choose_priors(
    current: StudyInfo,
    candidates: Iterable[StudyInfo],
    *,
    within_days: int | None = 1825,
    count: int = 1,
    match: Match = "modality",
) -> list[StudyInfo]:
    """The priors of ``current`` among ``candidates``, most recent first: the same PatientID,
    not the current study, sharing a modality (``match="modality"``) or a body part
    (``"body-part"``; ``"any"``: neither checked), dated on or before the current study and at
    most ``within_days`` before it (None: no limit; a study without a date is then accepted
    last, otherwise refused); at most ``count``."""
    if count < 1:
        raise PriorError(f"count must be >= 1, not {count}")
    if within_days is not None and within_days < 0:
        raise PriorError(f"within_days must be >= 0, not {within_days}")
    if match not in ("modality", "body-part", "any"):
        raise PriorError(f"match must be modality, body-part or any, not {match!r}")
    chosen: dict[str, StudyInfo] = {}
    for study in candidates:
        if not study.study_uid or study.study_uid == current.study_uid:
            continue
        if not current.patient_id or study.patient_id != current.patient_id:
            continue
        if match == "modality" and not current.modalities & study.modalities:
            continue
        if match == "body-part" and not current.body_parts & study.body_parts:
            continue
        if study.date is None:
            if within_days is not None:
                continue
        elif current.date is not None:
            age = (current.date - study.date).days
            if age < 0 or (within_days is not None and age > within_days):
                continue
        elif within_days is not None:
            continue
        chosen.setdefault(study.study_uid, study)
    ordered = sorted(
        chosen.values(),
        key=lambda s: (s.date or dt.date.min, s.time, s.study_uid),
        reverse=True,
    )
    return ordered[:count]


def _current_study(folder: Path) -> StudyInfo:
    """The study in the job's folder, from its files' headers (one study only)."""
    studies: dict[str, Dataset] = {}
    body_parts: set[str] = set()
    modalities: set[str] = set()
    for path in find_files(folder):
        try:
            ds = read_header(path)
        except (InvalidDicomError, OSError, ValueError, DataflowError):
            continue
        uid = str(ds.get("StudyInstanceUID", "")).strip()
        if uid:
            studies.setdefault(uid, ds)
            modalities |= _codes(ds.get("Modality"))
            body_parts |= _codes(ds.get("BodyPartExamined"))
    if not studies:
        raise PriorError(
            f"{folder.name}: no DICOM file with a StudyInstanceUID in the study folder"
        )
    if len(studies) > 1:
        raise PriorError(f"{folder.name}: the study folder holds {len(studies)} studies, not one")
    info = study_info(next(iter(studies.values())), body_parts)
    if not info.patient_id:
        raise PriorError(f"{folder.name}: the study has no PatientID: its priors cannot be found")
    return StudyInfo(
        info.study_uid, info.patient_id, info.date, info.time,
        info.modalities | frozenset(modalities), info.body_parts,
    )  # fmt: skip


class _PacsStage(Stage):
    """What both stages share: the PACS, the retries, what a partial retrieve means."""

    def __init__(
        self,
        pacs: Mapping[str, Any] | None,
        retries: int = 3,
        retry_delay: float = 2.0,
        allow_partial: bool = False,
    ):
        try:
            self.pacs = None if pacs is None else source_from(pacs)
            self.move = None if pacs is None else move_from(pacs)
            self.retry = Retry(attempts=int(retries), delay=float(retry_delay))
        except (QueryError, ValueError, TypeError) as exc:
            raise PriorError(f"{type(self).__name__}: {exc}") from None
        self.allow_partial = bool(allow_partial)


class FetchPriors(_PacsStage):
    """The job's study folder -> a folder of its priors from the PACS, as received: one
    sub-folder per prior, ``prior-1`` (the most recent) to ``prior-N``.

    The current study's PatientID, StudyDate, modalities and body parts are read from its
    files; the PACS is asked (C-FIND, study level) for every study of that patient; the rule
    (:func:`choose_priors`: ``within_days``, ``count``, ``match``) picks; each prior is
    retrieved (C-GET, C-MOVE or WADO-RS, as ``pacs`` says). No prior found: an empty folder,
    or a failure with ``required``."""

    inputs = {"study": Port("stream", element_type="dicom", description="the current study")}
    outputs = {"priors": Port("stream", element_type="dicom", description="prior-N folders")}

    def __init__(
        self,
        pacs: Mapping[str, Any],
        within_days: int | None = 1825,
        count: int = 1,
        match: Match = "modality",
        required: bool = False,
        retries: int = 3,
        retry_delay: float = 2.0,
        allow_partial: bool = False,
    ):
        super().__init__(pacs, retries, retry_delay, allow_partial)
        if self.pacs is None:
            raise PriorError("FetchPriors: pacs is required (the PACS that holds the priors)")
        self.within_days = None if within_days is None else int(within_days)
        self.count = int(count)
        self.match = match
        self.required = bool(required)
        # the rule checks its parameters: a wrong one fails when the stage is made
        choose_priors(StudyInfo("", "", None), [], within_days=self.within_days,
                      count=self.count, match=match)  # fmt: skip

    def _candidates(self, current: StudyInfo) -> list[StudyInfo]:
        found = c_find(
            self.pacs,
            "STUDY",
            {"PatientID": current.patient_id, "StudyInstanceUID": "", "StudyDate": "",
             "StudyTime": "", "ModalitiesInStudy": ""},
            retry=self.retry,
        )  # fmt: skip
        studies = [study_info(ds) for ds in found]
        if self.match != "body-part":
            return studies
        with_parts = []
        for study in studies:  # BodyPartExamined is a series attribute: ask per study
            series = c_find(self.pacs, "SERIES",
                            {"StudyInstanceUID": study.study_uid, "BodyPartExamined": ""},
                            retry=self.retry)  # fmt: skip
            parts = frozenset().union(*(_codes(s.get("BodyPartExamined")) for s in series))
            with_parts.append(StudyInfo(study.study_uid, study.patient_id, study.date,
                                        study.time, study.modalities, parts))  # fmt: skip
        return with_parts

    def execute(self, ctx, study: Path) -> Path:
        current = _current_study(Path(study))
        out = ctx.output_dir("priors")
        candidates = self._candidates(current)
        priors = choose_priors(current, candidates, within_days=self.within_days,
                               count=self.count, match=self.match)  # fmt: skip
        ctx.log.info("priors_chosen", candidates=len(candidates), chosen=len(priors),
                     pacs=self.pacs.describe())  # fmt: skip
        if not priors and self.required:
            raise PriorError(
                f"no prior on {self.pacs.describe()}: {len(candidates)} studies of the patient, "
                f"none matching (match={self.match}, within_days={self.within_days})"
            )
        for n, prior in enumerate(priors, 1):
            result = retrieve(self.pacs, prior.study_uid, out / f"prior-{n}", move=self.move,
                              allow_partial=self.allow_partial, retry=self.retry)  # fmt: skip
            age = (current.date - prior.date).days if current.date and prior.date else None
            ctx.log.info("prior_fetched", prior=n, files=len(result.files), age_days=age,
                         completed=result.completed, failed=result.failed,
                         warning=result.warning)  # fmt: skip
        return out


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def read_order(folder: Path) -> dict[str, Any]:
    """The order in an ordered job's input folder (:data:`ORDER_FILE`): ``study`` (a Study
    Instance UID), ``series`` (one series only, or absent), ``source`` (the name the order gave)
    and ``pacs`` (that source's settings, from the service's ``dicom.sources``)."""
    path = Path(folder) / ORDER_FILE
    try:
        order = json.loads(path.read_text())
    except FileNotFoundError:
        raise PriorError(
            f"FetchStudy: the job's input holds no {ORDER_FILE} (an order: "
            "POST /api/v1/jobs with an order, or dataflow jobs order)"
        ) from None
    except (OSError, ValueError) as exc:
        raise PriorError(f"FetchStudy: {ORDER_FILE} is unreadable: {exc}") from None
    if not isinstance(order, dict) or not _is_uid(str(order.get("study", "")).strip()):
        study = order.get("study") if isinstance(order, dict) else None
        raise PriorError(f"FetchStudy: {ORDER_FILE}: study {study!r} is not a Study Instance UID")
    return order


class FetchStudy(_PacsStage):
    """An order -> that study's folder from the PACS (C-GET, C-MOVE or WADO-RS), for "run
    pipeline P on study S from source X". The input is the ordered job's folder, whose
    :data:`ORDER_FILE` names the study, its series (optional) and the source with its settings
    (which the ``pacs`` argument stands in for when the order has none); or a Study Instance
    UID itself. ``series_uid`` fetches one series only. A folder without an order is a study
    pushed to the service (or given to ``dataflow run``): its files are passed on as they are
    (hard links), so that one pipeline serves pushed and ordered studies alike."""

    inputs = {"order": Port("stream", element_type="order", description="order.json, or a UID")}
    outputs = {"study": Port("stream", element_type="dicom", description="the study")}

    def __init__(
        self,
        pacs: Mapping[str, Any] | None = None,
        series_uid: str | None = None,
        retries: int = 3,
        retry_delay: float = 2.0,
        allow_partial: bool = False,
    ):
        super().__init__(pacs, retries, retry_delay, allow_partial)
        self.series_uid = series_uid.strip() if series_uid else None

    def _order(self, order: str | Path) -> tuple[str, str | None, Any, Any]:
        """(study UID, series UID or None, the PACS, how to retrieve) of the input."""
        move = self.move
        if Path(order).is_dir():
            found = read_order(Path(order))
            pacs = self.pacs
            if found.get("pacs") is not None:
                try:
                    name = str(found.get("source") or "pacs")
                    pacs = source_from(found["pacs"], name)
                    move = move_from(found["pacs"], name)
                except QueryError as exc:
                    raise PriorError(f"FetchStudy: the order's source: {exc}") from None
            series = str(found.get("series") or "").strip() or self.series_uid
            uid = str(found["study"]).strip()
        else:
            uid, series, pacs = str(order).strip(), self.series_uid, self.pacs
            if not _is_uid(uid):
                raise PriorError(f"FetchStudy: {uid!r} is neither a Study Instance UID nor a "
                                 f"folder holding {ORDER_FILE}")  # fmt: skip
        if series is not None and not _is_uid(series):
            raise PriorError(f"FetchStudy: series {series!r} is not a Series Instance UID")
        if pacs is None:
            raise PriorError("FetchStudy: no PACS: the order names no source with settings and "
                             "the stage has no pacs argument")  # fmt: skip
        return uid, series, pacs, move

    def execute(self, ctx, order: str | Path) -> Path:
        folder = Path(order)
        if folder.is_dir() and not (folder / ORDER_FILE).exists():
            return self._pass_on(ctx, folder)
        uid, series, pacs, move = self._order(order)
        out = ctx.output_dir("study")
        result = retrieve(pacs, uid, out, move=move, series_uid=series,
                          allow_partial=self.allow_partial, retry=self.retry)  # fmt: skip
        ctx.log.info("study_fetched", files=len(result.files), completed=result.completed,
                     failed=result.failed, warning=result.warning,
                     pacs=pacs.describe())  # fmt: skip
        return out

    def _pass_on(self, ctx, folder: Path) -> Path:
        files = [path for path in find_files(folder) if path.name != ORDER_FILE]
        if not files:
            raise PriorError(f"FetchStudy: {folder.name} holds neither {ORDER_FILE} (an order) "
                             "nor a file of a study")  # fmt: skip
        out = ctx.output_dir("study")
        for path in files:
            link_or_copy(path, out / path.relative_to(folder))
        ctx.log.info("study_passed_on", files=len(files))
        return out
