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

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["PHI_ELEMENTS", "PHI_KEYS", "configure_logging", "identifying", "job_log", "job_note",
           "scrub"]  # fmt: skip

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
#: a DICOM UID naming a study, series or instance (digits and dots from 0, 1 or 2, five
#: components or more: not an IPv4 address or a version; or 2.25.UUID), but not one of the
#: standard's own (1.2.840.10008...: transfer syntaxes, SOP classes), which name no patient
_UID = re.compile(r"(?<![\d.])(?:(?!1\.2\.840\.10008\.)[0-2](?:\.\d+){4,}|2\.25\.\d{10,})(?!\.?\d)")
UID_REDACTED = "<uid>"


def scrub(text: str | None, values: Iterable[str] = ()) -> str | None:
    """``text`` without patient identifiers: the rest of each line after a PHI element's
    keyword, name or tag (:data:`PHI_ELEMENTS`), and every occurrence of ``values`` (known
    identifiers of the study, e.g. its Patient ID, and those of the job this process runs:
    :func:`identifying`), replaced by ``<redacted>``; every study, series or instance UID (a
    spool path carries them) by ``<uid>``."""
    if not text:
        return text
    known = {str(v).strip() for v in (*values, *_known_now()) if v and str(v).strip()}
    for value in sorted(known, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _PHI_TEXT.sub(_redact_rest, _UID.sub(UID_REDACTED, text))


#: the identifying values of the job this process runs now, or what finds them when first
#: needed (:func:`identifying`)
_known: tuple[str, ...] | Callable[[], Iterable[str]] = ()


def _known_now() -> tuple[str, ...]:
    global _known
    if callable(_known):
        _known = tuple(_known())
    return _known


@contextlib.contextmanager
def identifying(values: Iterable[str] | Callable[[], Iterable[str]]) -> Iterator[None]:
    """While the block runs, :func:`scrub` (and so every log line, job log line and printed
    line of this process) also redacts ``values``: the identifiers of the job a worker runs
    (:func:`dataflow.identifiers.identifiers_of`), found by value where no key or element
    name gives them away. One job at a time: a worker's, not the service's many threads.
    ``values`` may be a function that finds them: it is called when something is first
    scrubbed in the block, so a job that logs nothing never reads its header."""
    global _known
    previous, _known = _known, values if callable(values) else tuple(values)
    try:
        yield
    finally:
        _known = previous


def _redact_rest(match: re.Match) -> str:
    """An element's name followed by something that may be its value: the name stays."""
    if _ALNUM.search(match.group(2)):
        return f"{match.group(1)} {REDACTED}"
    return match.group(0)  # e.g. "no attribute 'PatientName'": nothing to hide


def _redact_phi(logger, method_name, event_dict):
    """By key (:data:`PHI_KEYS`), then by value: every other text field :func:`scrub`-bed
    (UIDs, and what follows a PHI element's name), the event's own words included."""
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = REDACTED
    for key, value in event_dict.items():
        if key in ("timestamp", "level", "logger") or value == REDACTED:
            continue
        if isinstance(value, str | Path):
            event_dict[key] = scrub(str(value))
        elif isinstance(value, list | tuple) and any(isinstance(v, str | Path) for v in value):
            event_dict[key] = [scrub(str(v)) if isinstance(v, str | Path) else v for v in value]
    return event_dict


class _WholeLines:
    """A text stream for log lines that reach the file descriptor one whole line per write.

    ``dataflow serve`` and its workers share one stderr (a file or a pipe). structlog's
    PrintLogger prints the text and then its newline, and a stream writes a line longer than
    its buffer in pieces: another process's line could land in between. Here each thread's
    text is held until its newline, then the whole line goes in one ``os.write`` (one write
    to a regular file is not interleaved; to a pipe, up to 4 KiB is not). A stream without a
    file descriptor (pytest's capture) is written to as it is."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending = threading.local()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        held = getattr(self._pending, "text", "") + text
        head, newline, rest = held.rpartition("\n")
        self._pending.text = rest
        if newline:
            self._out(head + newline)
        return len(text)

    def flush(self) -> None:
        held = getattr(self._pending, "text", "")
        self._pending.text = ""
        if held:
            self._out(held)

    def _out(self, text: str) -> None:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor: write as it is
            self._stream.write(text)
            self._stream.flush()
            return
        data = memoryview(text.encode("utf-8", "replace"))
        with self._lock:
            self._stream.flush()  # what was written to the stream itself goes first
            while data:
                data = data[os.write(fd, data) :]

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def configure_logging(
    level: str | int = "INFO",
    *,
    json: bool = False,
    allow_phi: bool | None = None,
    job_logs: bool = False,
):
    """Configure structlog and stdlib logging for this process (idempotent). ``job_logs``:
    a worker keeping its jobs' logs (:func:`job_log`), which get info events whatever
    ``level`` the console shows."""
    if allow_phi is None:
        allow_phi = os.environ.get("DATAFLOW_LOG_PHI") == "1"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    stamped = [structlog.processors.add_log_level,
               structlog.processors.TimeStamper(fmt="iso", utc=True),
               *([] if allow_phi else [_redact_phi])]  # fmt: skip
    processors = [structlog.contextvars.merge_contextvars, *stamped]
    if job_logs:  # a job's log (job_log) keeps info events the console does not show
        processors += [_tee_to_job, _console_level(level)]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    lines = _WholeLines(sys.stderr)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            min(level, logging.INFO) if job_logs else level
        ),
        logger_factory=structlog.PrintLoggerFactory(lines),
        cache_logger_on_first_use=False,
    )
    # libraries' stdlib records (pynetdicom, numba, uvicorn...) pass through the same
    # redaction and renderer: JSON mode is JSON throughout, and none bypasses the redactor
    foreign = [structlog.stdlib.add_logger_name, *stamped]
    handler = logging.StreamHandler(lines)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))  # fmt: skip
    logging.basicConfig(level=level, handlers=[handler], force=True)


# ---------------------------------------------------------------------- a job's own log

_job_sink: TextIO | None = None  # the log file of the job this process runs now, if any
_sink_lock = threading.Lock()


def _write_job_line(text: str) -> None:
    with _sink_lock:
        sink = _job_sink
        if sink is not None:
            with contextlib.suppress(OSError, ValueError):
                sink.write(text)
                sink.flush()


def job_note(text: str) -> None:
    """``text``, scrubbed, into the running job's log only (see :func:`job_log`)."""
    text = scrub(text) or ""
    _write_job_line(text if text.endswith("\n") else text + "\n")


def _tee_to_job(logger: Any, method_name: str, event_dict: dict) -> dict:
    """structlog processor: the event, as one plain line, into the running job's log too."""
    if _job_sink is not None:
        fields = " ".join(f"{k}={v}" for k, v in event_dict.items()
                          if k not in ("event", "timestamp", "level"))  # fmt: skip
        line = f"{event_dict.get('timestamp', '')} [{event_dict.get('level', method_name)}] " \
               f"{event_dict.get('event', '')} {fields}".rstrip()  # fmt: skip
        _write_job_line((scrub(line) or "") + "\n")
    return event_dict


def _console_level(level: int):
    def drop_below(logger: Any, method_name: str, event_dict: dict) -> dict:
        number = logging.getLevelName(str(event_dict.get("level", method_name)).upper())
        if isinstance(number, int) and number < level:
            raise structlog.DropEvent
        return event_dict

    return drop_below


class _JobHandler(logging.Handler):
    """stdlib logging records (libraries' own) into the running job's log."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            _write_job_line((scrub(f"[{record.levelname.lower()}] {record.name}: "
                                   f"{record.getMessage()}") or "") + "\n")  # fmt: skip


class _Tee:
    """A text stream passing what it is given, line by line and scrubbed, both to the
    stream it wraps and to the job's log (``print(name, value)`` arrives in pieces: each line
    is scrubbed whole, so a stage's debug print cannot put a patient's name in either)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        if "\n" in self._line:
            lines, _, self._line = self._line.rpartition("\n")
            self._emit((scrub(lines) or "") + "\n")
        return len(text)

    def _emit(self, text: str) -> None:
        _write_job_line(text)
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()

    def close_line(self) -> None:
        if self._line:
            self._emit((scrub(self._line) or "") + "\n")
            self._line = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def job_log(path: Path) -> Iterator[None]:
    """While the block runs, what this process logs (structlog events and stdlib records) and
    prints (``sys.stdout``, ``sys.stderr``) also goes, scrubbed of patient identifiers
    (:func:`scrub`), to ``path`` (appended; its folder made): the log of one job in one stage,
    which ``dataflow serve`` keeps beside the job's outputs (Clara's per-operator logs)."""
    global _job_sink
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _JobHandler()
    with open(path, "a", encoding="utf-8", errors="replace") as sink:
        with _sink_lock:
            _job_sink = sink
        root = logging.getLogger()
        root.addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        tees = sys.stdout, sys.stderr = _Tee(stdout), _Tee(stderr)
        try:
            yield
        finally:
            for tee in tees:
                tee.close_line()
            sys.stdout, sys.stderr = stdout, stderr
            root.removeHandler(handler)
            with _sink_lock:
                _job_sink = None
