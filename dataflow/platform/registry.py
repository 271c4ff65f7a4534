"""What the platform keeps beside the job records: ``STATE/platform/platform.db`` (SQLite).

- ``pipelines``: the pipelines registered through the API (name, id, definition file, when);
  the configured ones are not stored (their id is derived from their name, like these).
- ``payloads``: every payload made through the API (id, the job it belongs to, if any).
- ``jobs``: what the API adds to a job record (its name, priority, payload).
- ``metadata``: Clara's string -> string maps on pipelines, jobs and payloads; keys are
  case-insensitive (the key as first written is kept).

Thread-safe: one connection, one lock, short statements.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from dataflow.durable import open_database

__all__ = ["Registry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT PRIMARY KEY, id TEXT UNIQUE NOT NULL, file TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS payloads (
    id TEXT PRIMARY KEY, job_id TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, priority TEXT NOT NULL, payload_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metadata (
    kind TEXT NOT NULL, id TEXT NOT NULL, lkey TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, PRIMARY KEY (kind, id, lkey)
);
"""


class Registry:
    def __init__(self, path: Path) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _run(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # pipelines
    def pipelines(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT name, id, file, created FROM pipelines ORDER BY created")
        return [dict(zip(("name", "id", "file", "created"), row)) for row in rows]

    def add_pipeline(self, name: str, pipeline_id: str, file: Path) -> None:
        self._run("INSERT INTO pipelines (name, id, file, created) VALUES (?, ?, ?, ?)",
                  (name, pipeline_id, str(file), time.time()))  # fmt: skip

    def remove_pipeline(self, name: str) -> None:
        self._run("DELETE FROM pipelines WHERE name = ?", (name,))

    # payloads and jobs
    def add_payload(self, payload_id: str, job_id: str | None) -> None:
        self._run("INSERT INTO payloads (id, job_id, created) VALUES (?, ?, ?)",
                  (payload_id, job_id, time.time()))  # fmt: skip

    def payload(self, payload_id: str) -> dict[str, Any] | None:
        rows = self._all("SELECT id, job_id, created FROM payloads WHERE id = ?", (payload_id,))
        return dict(zip(("id", "job_id", "created"), rows[0])) if rows else None

    def remove_payload(self, payload_id: str) -> None:
        self._run("DELETE FROM payloads WHERE id = ?", (payload_id,))
        self._run("DELETE FROM metadata WHERE kind = 'payload' AND id = ?", (payload_id,))

    def add_job(self, job_id: str, name: str, priority: str, payload_id: str) -> None:
        self._run("INSERT INTO jobs (id, name, priority, payload_id) VALUES (?, ?, ?, ?)",
                  (job_id, name, priority, payload_id))  # fmt: skip

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._all("SELECT name, priority, payload_id FROM jobs WHERE id = ?", (job_id,))
        return dict(zip(("name", "priority", "payload_id"), rows[0])) if rows else None

    # metadata
    def metadata(self, kind: str, item: str) -> dict[str, str]:
        rows = self._all("SELECT key, value FROM metadata WHERE kind = ? AND id = ? ORDER BY key",
                         (kind, item))  # fmt: skip
        return dict(rows)

    def set_metadata(self, kind: str, item: str, values: dict[str, str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in values.items():
                    self._db.execute(
                        "INSERT INTO metadata (kind, id, lkey, key, value) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (kind, id, lkey) DO UPDATE SET value = excluded.value",
                        (kind, item, key.lower(), key, value),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def remove_metadata(self, kind: str, item: str, keys: list[str]) -> None:
        for key in keys:
            self._run("DELETE FROM metadata WHERE kind = ? AND id = ? AND lkey = ?",
                      (kind, item, key.lower()))  # fmt: skip

    def drop_metadata(self, kind: str, item: str) -> None:
        self._run("DELETE FROM metadata WHERE kind = ? AND id = ?", (kind, item))
