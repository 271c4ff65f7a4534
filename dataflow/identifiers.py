"""What identifies a patient in a job's input, read from its first DICOM header: for pages
allowed to show it (the console's ``api.patient-details``), for finding jobs (accession
number, UIDs) and, by value, for keeping it out of logs and job records
(:func:`dataflow.logs.identifying`)."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

__all__ = ["IDENTIFYING", "first_dicom", "identifiers_of", "read_header"]

log = structlog.get_logger("dataflow")

#: elements whose values identify a patient, or may (descriptions typed by people)
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
               "OtherPatientIDs", "OtherPatientNames", "StudyDescription",
               "SeriesDescription")  # fmt: skip


def first_dicom(payload: Path, looked_at: int = 64) -> Path | None:
    """The first DICOM file of a job's input (``payload/input`` for a job made through the
    API, the received group's folder for one from DICOM), in name order, among the first
    ``looked_at`` files; None without one."""
    root = payload / "input" if (payload / "input").is_dir() else payload
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():
                continue
            looked_at -= 1
            if looked_at < 0:
                return None
            try:
                with path.open("rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        return path
            except OSError:
                continue
    return None


def read_header(payload: Path, keywords: tuple[str, ...]) -> dict[str, str]:
    """These elements of the first DICOM file of a job's input, as text (missing ones left
    out; nothing for an input that holds no DICOM file or one that cannot be read)."""
    import pydicom

    path = first_dicom(payload)
    if path is None:
        return {}
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    except Exception as exc:  # a damaged file: no keys, and the search goes on
        log.debug("header_unread", error=type(exc).__name__)
        return {}
    out = {}
    for keyword in keywords:
        value = dataset.get(keyword)
        if value not in (None, ""):
            out[keyword] = str(value).strip()
    return out


def identifiers_of(folder: Path | None) -> tuple[str, ...]:
    """The identifying values of the first DICOM file under ``folder`` (a job's input), as
    text to redact wherever it appears: each value, a name's parts (``DOE^JANE``: ``DOE``,
    ``JANE``), a birth date also as ``1961-02-03``; none shorter than 3 characters."""
    if folder is None:
        return ()
    found = read_header(Path(folder), IDENTIFYING)
    values = set(found.values())
    for key in ("PatientName", "OtherPatientNames"):
        values.update(part for part in found.get(key, "").replace("\\", "^").split("^"))
    birth = found.get("PatientBirthDate", "")
    if len(birth) == 8 and birth.isdigit():
        values.add(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    return tuple(sorted((v.strip() for v in values if len(v.strip()) >= 3), key=len,
                        reverse=True))  # fmt: skip
