"""Logging setup: the one place structlog (and the stdlib logging it renders into) is configured.

Events are snake_case facts with key/value fields::

    log = structlog.get_logger("dataflow.store")
    log.info("store_started", budget=budget, address=address)

Patient identifiers stay out of logs unless ``allow_phi=True`` (or ``DATAFLOW_LOG_PHI=1``):
values under the keys in :data:`PHI_KEYS` are replaced by ``"<redacted>"``.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["PHI_KEYS", "configure_logging"]

#: Field names whose values are patient identifiers (or may embed them).
PHI_KEYS = frozenset(
    {
        "patient_id", "patient_name", "patient_birth_date", "accession_number",
        "study_instance_uid", "series_instance_uid", "sop_instance_uid", "object_id",
    }
)  # fmt: skip


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
