"""The platform's append-only audit log: every change made through the API, one JSON line
each in ``STATE/platform/audit.log`` (opened for appending only, each line written whole and
fsynced before the call that made the change returns)::

    {"at": "2026-12-04T00:40:42.123Z", "who": "anonymous", "from": "127.0.0.1", "via": "rest",
     "what": "job_started", "job": "0cc6e33c...", "pipeline": "ct-segmentation"}

``who``, ``from`` and ``via`` come from :data:`CALLER`, which each API layer sets per request (the
REST middleware: the peer's address; ``who`` is ``anonymous`` until API tokens exist). Ids,
names of pipelines, sizes and metadata *keys* are recorded; never file names inside a payload
or metadata values, which may hold patient data.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["CALLER", "AuditLog"]

#: who makes the current call: (who, from, via), set by the REST or gRPC layer per request
CALLER: contextvars.ContextVar[tuple[str, str, str]] = contextvars.ContextVar(
    "caller", default=("local", "in-process", "python")
)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lock = threading.Lock()

    def record(self, what: str, **fields: Any) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        who, where, via = CALLER.get()
        entry = {"at": now.replace("+00:00", "Z"), "who": who, "from": where, "via": via,
                 "what": what, **fields}  # fmt: skip
        line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                return
            os.write(self._fd, line)
            os.fsync(self._fd)

    def tail(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` entries, oldest first."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines[-limit:] if line.strip()]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
