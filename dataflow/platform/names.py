"""Ids, names, states and metadata rules of the platform (pure: no I/O)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from dataflow.platform.errors import METADATA_INVALID, Invalid

__all__ = [
    "CLARA_STATE",
    "HEX32",
    "IN_FLIGHT",
    "JOB_ID_FORM",
    "NAME_FORM",
    "PRIORITIES",
    "check_metadata",
    "pipeline_id",
]

PRIORITIES = ("lower", "normal", "higher", "immediate")
#: jobs.db state -> (Clara JobState, JobStatus)
CLARA_STATE = {
    "pending": ("PENDING", "HEALTHY"),
    "queued": ("PENDING", "HEALTHY"),
    "running": ("RUNNING", "HEALTHY"),
    "succeeded": ("STOPPED", "HEALTHY"),
    "failed": ("STOPPED", "FAULTED"),
    "cancelled": ("STOPPED", "CANCELED"),
}
IN_FLIGHT = ("pending", "queued", "running")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
JOB_ID_FORM = re.compile(r"^([0-9a-f]{32}|\d{8}-\d{6}-[0-9a-f]{8})$")
NAME_FORM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IDS_NAMESPACE = uuid.UUID("6f1d3c1e-2b7a-4c55-9a41-0d7c3e9b5a10")  # pipeline ids from names
META_KEY, META_VALUE, META_TOTAL = 128, 256, 4 * 1024 * 1024  # Clara's limits, in bytes


def pipeline_id(name: str) -> str:
    """The pipeline's 32-hex id: the same for a name on every start and every machine."""
    return uuid.uuid5(_IDS_NAMESPACE, name).hex


def check_metadata(values: Any, what: str, existing: Mapping[str, str] | None = None) -> dict:
    """``values`` as Clara's metadata (string -> string; key <= 128 bytes, value <= 256
    bytes, all of an item's <= 4 MiB; keys case-insensitive, so two keys that differ only in
    case are refused); :class:`Invalid` naming the key otherwise."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise Invalid(f"{what}: metadata must map names to strings", code=METADATA_INVALID)
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise Invalid(f"{what}: metadata {key!r}: keys and values must be strings, keys not "
                          "empty", code=METADATA_INVALID)  # fmt: skip
        if len(key.encode()) > META_KEY:
            raise Invalid(f"{what}: metadata key {key[:40]!r}...: longer than {META_KEY} bytes",
                          code=METADATA_INVALID)  # fmt: skip
        if len(value.encode()) > META_VALUE:
            raise Invalid(f"{what}: metadata {key!r}: its value is longer than {META_VALUE} bytes",
                          code=METADATA_INVALID)  # fmt: skip
        if key.lower() in seen:
            raise Invalid(f"{what}: metadata keys {seen[key.lower()]!r} and {key!r} are the same "
                          "key (keys are case-insensitive)", code=METADATA_INVALID)  # fmt: skip
        seen[key.lower()] = key
        out[key] = value
    merged = {k.lower(): (k, v) for k, v in (existing or {}).items()}
    merged.update({k.lower(): (k, v) for k, v in out.items()})
    total = sum(len(k.encode()) + len(v.encode()) for k, v in merged.values())
    if total > META_TOTAL:
        raise Invalid(f"{what}: metadata would total {total} bytes (at most {META_TOTAL})",
                      code=METADATA_INVALID)  # fmt: skip
    return out
