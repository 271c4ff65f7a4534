"""Logging setup: the one place structlog (and the stdlib logging it renders into) is configured.

Events are snake_case facts with key/value fields::

    log = structlog.get_logger("dataflow.store")
    log.info("store_started", budget=budget, address=address)

Patient identifiers stay out of logs unless ``allow_phi=True`` (or ``DATAFLOW_LOG_PHI=1``):
values under the keys in :data:`PHI_KEYS` are replaced by ``"<redacted>"``.

Free text that may quote a dataset (a failed job's traceback, an error message) goes through
:func:`scrub` before it is kept or logged: whatever follows the name or tag of a
patient-identifying element on its line (``PatientName``, ``Patient's Name``, ``(0010,0010)``
...) is replaced by ``<redacted>``, and so is every literal value the caller knows to be one.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

import structlog

__all__ = ["PHI_ELEMENTS", "PHI_KEYS", "configure_logging", "scrub"]

#: Field names whose values are patient identifiers (or may embed them).
PHI_KEYS = frozenset(
    {
        "patient_id", "patient_name", "patient_birth_date", "accession_number",
        "study_instance_uid", "series_instance_uid", "sop_instance_uid", "object_id",
    }
)  # fmt: skip


#: Patient-identifying DICOM elements: (keyword, name in the standard, tag).
PHI_ELEMENTS = (
    ("PatientName", "Patient's Name", "0010,0010"),
    ("PatientID", "Patient ID", "0010,0020"),
    ("PatientBirthDate", "Patient's Birth Date", "0010,0030"),
    ("PatientBirthTime", "Patient's Birth Time", "0010,0032"),
    ("OtherPatientIDs", "Other Patient IDs", "0010,1000"),
    ("OtherPatientNames", "Other Patient Names", "0010,1001"),
    ("OtherPatientIDsSequence", "Other Patient IDs Sequence", "0010,1002"),
    ("PatientAddress", "Patient's Address", "0010,1040"),
    ("AccessionNumber", "Accession Number", "0008,0050"),
)
_SPELLINGS = sorted(
    {re.escape(name) for element in PHI_ELEMENTS for name in element[:2]}
    | {r"\(?" + tag.replace(",", r",\s*") + r"\)?" for *_, tag in PHI_ELEMENTS}
    | {r"\(?0x" + tag.replace(",", "") + r"\)?" for *_, tag in PHI_ELEMENTS},
    key=len,
    reverse=True,
)  # longest first: "PatientID" must not stop "PatientIDsSequence" short
_PHI_TEXT = re.compile(r"(?i)(?<![A-Za-z0-9])(" + "|".join(_SPELLINGS) + r")(?![A-Za-z])([^\n]*)")
_ALNUM = re.compile(r"[A-Za-z0-9]")
REDACTED = "<redacted>"


def scrub(text: str | None, values: Iterable[str] = ()) -> str | None:
    """``text`` without patient identifiers: the rest of each line after a PHI element's
    keyword, name or tag (:data:`PHI_ELEMENTS`), and every occurrence of ``values`` (known
    identifiers of the study, e.g. its Patient ID), replaced by ``<redacted>``."""
    if not text:
        return text
    for value in sorted({str(v).strip() for v in values if v and str(v).strip()}, key=len,
                        reverse=True):  # fmt: skip
        text = text.replace(value, REDACTED)
    return _PHI_TEXT.sub(_redact_rest, text)


def _redact_rest(match: re.Match) -> str:
    """An element's name followed by something that may be its value: the name stays."""
    if _ALNUM.search(match.group(2)):
        return f"{match.group(1)} {REDACTED}"
    return match.group(0)  # e.g. "no attribute 'PatientName'": nothing to hide


def _redact_phi(logger, method_name, event_dict):
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = "<redacted>"
    return event_dict


def configure_logging(
    level: str | int = "INFO", *, json: bool = False, allow_phi: bool | None = None
):
    """Configure structlog and stdlib logging for this process (idempotent)."""
    if allow_phi is None:
        allow_phi = os.environ.get("DATAFLOW_LOG_PHI") == "1"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not allow_phi:
        processors.append(_redact_phi)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s", force=True)
