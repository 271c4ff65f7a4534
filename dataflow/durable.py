"""Writes that survive a crash or a power cut, one owner for each way they are made: a SQLite
database in WAL mode whose commits reach the disk (``synchronous=FULL``), a folder whose new
entries reach the disk (``fsync`` on the folder), and a file placed in a folder without a
half-written name ever being seen (a hard link or a copy, then one rename). The job store,
the platform's registry, the DICOM spool and the export outbox use them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

__all__ = ["fsync_dir", "link_or_copy", "open_database"]


def open_database(path: Path, *, timeout: float = 5.0, full: bool = True) -> sqlite3.Connection:
    """A connection to the SQLite database at ``path`` (its folder made), shared by threads
    under the caller's lock, in autocommit mode (``BEGIN IMMEDIATE`` ... ``COMMIT`` where a
    transaction is wanted), WAL; ``full``: every commit synced to disk (synchronous=FULL),
    else the caller decides per transaction. ``timeout``: how long a writer waits for
    another process's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    if full:
        db.execute("PRAGMA synchronous=FULL")
    return db


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the entries created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (same file system), else copy it. A ``target``
    that exists (a stage run again on the same job) is replaced, atomically, even when it
    is already a link to ``source``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return  # already this very file (and rename() would leave the temporary link)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copy2(source, temporary)
    os.replace(temporary, target)
