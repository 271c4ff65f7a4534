"""The ``--output`` folder of ``dataflow run``: what a re-run does to it.

A run owns the folder while it runs (``.dataflow-run.lock``: a second run into the same folder
is refused). Each job is written into a staging folder inside it (``.dataflow-staging-*/JOB``)
and, once its result is known, replaces ``OUTPUT/JOB`` as a whole: an earlier run's files and
the new run's are never mixed, and an earlier run's job folder stays as it was until the new
one is complete. A job the run does not touch keeps its folder. ``summary.json`` describes the
last run.

A folder that is not empty and holds no ``summary.json`` of ours is refused (it may be
anything: a PACS export, a user's data) unless ``overwrite``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from dataflow.errors import DataflowError

__all__ = ["SUMMARY", "OutputError", "RunOutput", "count_files", "list_files"]

SUMMARY = "summary.json"
_LOCK = ".dataflow-run.lock"
_STAGING = ".dataflow-staging-"
_OLD = ".dataflow-old-"


class OutputError(DataflowError, ValueError):
    """``--output`` cannot be used as it is (the message says why and what to do)."""


def _visible(folder: Path):
    """The entries of ``folder`` whose names do not start with a dot, sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_files(folder: Path, relative_to: Path) -> list[str]:
    """Every file under ``folder`` (recursively, hidden ones skipped) as a POSIX path
    relative to ``relative_to``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(relative_to)
        found += [(base / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


def count_files(folder: Path) -> int:
    """How many files ``folder`` holds (recursively, hidden ones skipped)."""
    return len(list_files(folder, folder))


def is_summary(path: Path) -> bool:
    """``path`` is a ``summary.json`` that ``dataflow run`` wrote."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"pipeline", "results"} <= set(data)


class RunOutput:
    """One run's hold on ``--output``: :meth:`open`, then :attr:`staging` is where the
    executor writes jobs, :meth:`commit` moves each finished job into place, :meth:`close`."""

    def __init__(self, root: str | Path, *, overwrite: bool = False) -> None:
        self.root = Path(root).resolve()
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self._made = False  # open() made the folder: a run that fails before any job removes it

    def open(self, inputs: Path) -> RunOutput:
        """Check the folder against ``inputs`` (the ``--input`` folder), take the lock,
        clear what an interrupted run left, and make the staging folder."""
        root, inputs = self.root, Path(inputs).resolve()
        if root.exists() and not root.is_dir():
            raise OutputError(f"--output {root}: exists and is not a folder")
        if root == inputs or root.is_relative_to(inputs):
            raise OutputError(
                f"--output {root} is inside --input {inputs}: it would be read as a job "
                "on the next run; choose a folder outside the input"
            )
        if inputs.is_relative_to(root):
            raise OutputError(
                f"--input {inputs} is inside --output {root}: a run replaces its job "
                "folders; choose an output folder that does not hold the input"
            )
        self._made = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(
                f"--output {root}: another dataflow run is writing into it; wait for it to "
                "finish or choose another folder"
            ) from None
        try:
            self._check_ours()
            for leftover in root.iterdir():  # an interrupted run's staging and old folders
                if leftover.name.startswith((_STAGING, _OLD)):
                    shutil.rmtree(leftover, ignore_errors=True)
            self.staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=root))
        except BaseException:
            self.close()
            raise
        return self

    def _check_ours(self) -> None:
        entries = _visible(self.root)
        if not entries or self.overwrite or is_summary(self.root / SUMMARY):
            return
        names = ", ".join(p.name for p in entries[:4]) + (" ..." if len(entries) > 4 else "")
        raise OutputError(
            f"--output {self.root}: the folder is not empty ({names}) and is not the output "
            f"of an earlier dataflow run (no {SUMMARY} of ours); choose an empty or new "
            "folder, or pass --overwrite to replace the job folders in it"
        )

    def commit(self, job: str) -> list[str]:
        """Replace ``OUTPUT/job`` with what this run wrote for it (nothing, if it wrote
        nothing); the files now there, relative to ``OUTPUT``."""
        assert self.staging is not None, "open() first"
        new, target = self.staging / job, self.root / job
        old = None
        if target.exists() or target.is_symlink():
            old = self.root / f"{_OLD}{uuid.uuid4().hex}"
            os.rename(target, old)
        if new.exists():
            os.rename(new, target)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        return list_files(target, self.root) if target.is_dir() else []

    def close(self) -> None:
        """Remove the staging folder (jobs never committed) and release the lock."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()
        if kind is not None and self._made and not _visible(self.root):
            shutil.rmtree(self.root, ignore_errors=True)  # e.g. the pipeline was refused
