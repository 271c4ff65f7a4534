"""Finding jobs by what people know of a study: its accession number, a study, series or SOP
instance UID (read from the first DICOM file of the job's input), or the job's own id, name,
payload or received group UID.

The keys read from a job's input are kept in memory (a job's input does not change once it
runs), so a search reads each job's header once. Accession numbers are searched, never logged
or shown.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dataflow.identifiers import read_header

__all__ = ["JobFinder"]

#: what a job's input is searched by (DICOM keywords)
KEYS = ("AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class JobFinder:
    """Matches job records against what a person typed (see the module docstring)."""

    def __init__(self, kept: int = 20_000) -> None:
        self._keys: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._kept = kept
        self._lock = threading.Lock()

    def _dicom_keys(self, job: Any) -> frozenset[str]:
        with self._lock:
            if job.id in self._keys:
                return self._keys[job.id]
        found = read_header(Path(job.payload), KEYS)
        keys = frozenset(value.casefold() for value in found.values())
        with self._lock:
            self._keys[job.id] = keys
            while len(self._keys) > self._kept:
                self._keys.popitem(last=False)
        return keys

    def matches(self, job: Any, text: str) -> bool:
        """Whether ``text`` (whole, case-insensitive) is the job's id (or its first 8 or more
        characters), name, payload id, received group's UID, or its input's accession
        number or study, series or first instance's UID."""
        wanted = text.strip().casefold()
        if not wanted:
            return True
        if len(wanted) >= 8 and job.id.casefold().startswith(wanted):
            return True
        source = job.source or {}
        own = (source.get("name"), source.get("payload_id"), source.get("group_uid"))
        if wanted in {str(value).casefold() for value in own if value}:
            return True
        return wanted in self._dicom_keys(job)
