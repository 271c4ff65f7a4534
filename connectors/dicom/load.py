"""The DICOM side of ``dataflow load`` (dataflow.load): simulated modalities that C-STORE
studies to a running ``dataflow serve``, each study with fresh Study, Series and SOP Instance
UIDs so that each is a new job.

``dataflow load`` finds this module through the ``dicom`` entry point of ``dataflow.load``,
else beside the module that the ``dicom`` connector's entry point names (dataflow never
imports ``connectors/``). It calls :func:`studies` once for the study to send (a folder, or
a synthetic CT written by the CT phantom stage) and :func:`modality` once per simulated
modality; each :meth:`Modality.send` is one study over the modality's own associations, sent
by the export sender (``export/sender.py``: the same C-STORE code and fast path as results).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from connectors.dicom.export.sender import Destination, echo, send_files
from connectors.dicom.export.transport import ExportError, FileInfo, FileResult, describe_file
from connectors.dicom.net.association import AssociationFailed
from dataflow.errors import MissingFile, UsageError

__all__ = ["Modality", "Sent", "Studies", "modality", "studies"]


@dataclass
class Sent:
    """One study sent by a modality: ``last`` when its last instance was acknowledged
    (seconds since the epoch); ``error`` says why instances failed (no UIDs in it)."""

    study_uid: str
    instances: int
    failed: int
    bytes: int
    began: float
    last: float
    error: str = ""


class Studies:
    """The study to send, copied with fresh UIDs for each send into a private scratch folder
    (removed by :meth:`close`)."""

    def __init__(self, files: list[Path], scratch: tempfile.TemporaryDirectory) -> None:
        self.files = files
        self._scratch = scratch
        self._count = 0
        self._lock = threading.Lock()

    def fresh(self) -> tuple[str, list[Path]]:
        """A copy of the study with new Study/Series/SOP Instance UIDs: (its study UID, its
        files). Each series of the source keeps being one series."""
        with self._lock:
            self._count += 1
            number = self._count
        folder = Path(self._scratch.name) / f"study-{number}"
        folder.mkdir()
        study_uid = generate_uid()
        series: dict[str, str] = {}
        out = []
        for k, path in enumerate(self.files):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            old = str(ds.get("SeriesInstanceUID", ""))
            ds.SeriesInstanceUID = series.setdefault(old, generate_uid())
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = folder / f"{k:05d}.dcm"
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
        return study_uid, out

    def discard(self, files: list[Path]) -> None:
        for path in files:
            path.unlink(missing_ok=True)
        if files:
            files[0].parent.rmdir()

    def close(self) -> None:
        self._scratch.cleanup()


def studies(folder: Path | None = None, *, slices: int = 64, size: int = 128) -> Studies:
    """The study to send: every DICOM file under ``folder``, or (``folder`` None) a synthetic
    CT of ``slices`` slices of ``size``² written by the CT phantom stage."""
    scratch = tempfile.TemporaryDirectory(prefix="dataflow-load-")
    if folder is None:
        from operators.dicom.phantom import write_ct_series

        series = write_ct_series(Path(scratch.name) / "source", slices=slices, size=size)
        return Studies(sorted(Path(p) for p in series.files), scratch)
    folder = Path(folder)
    if not folder.is_dir():
        scratch.cleanup()
        raise MissingFile(f"--study {folder}: no such folder")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            describe_file(path)
        except ExportError:
            continue  # not DICOM (a DICOMDIR's neighbours, notes): not sent
        files.append(path)
    if not files:
        scratch.cleanup()
        raise MissingFile(f"--study {folder}: holds no DICOM files with file meta")
    return Studies(files, scratch)


@dataclass
class Modality:
    """A simulated modality: ``calling`` C-STOREs studies to ``called`` at ``host:port``."""

    host: str
    port: int
    called: str
    calling: str
    _destination: Destination = field(init=False)

    def __post_init__(self) -> None:
        try:
            self._destination = Destination(
                name=self.calling, ae_title=self.called, host=self.host, port=self.port,
                calling_ae_title=self.calling, transfer_syntax="stored",
            )  # fmt: skip
        except ExportError as exc:  # an AE title that cannot be one, say
            raise UsageError(str(exc)) from None

    def check(self) -> None:
        """C-ECHO the service: :class:`AssociationFailed` naming the address if it does not
        answer."""
        result = echo(self._destination)
        if not result.ok:
            raise AssociationFailed(
                f"no DICOM service answered C-ECHO at {self.host}:{self.port} as {self.called} "
                f"from {self.calling} ({result.error}): is dataflow serve running with a "
                "dicom: receiver there, and does its allow: list take this AE title?"
            )

    def send(self, study_uid: str, files: list[Path]) -> Sent:
        """C-STORE one study (its own associations); failures counted, never raised."""
        infos: list[tuple[int, FileInfo]] = [(k, describe_file(p)) for k, p in enumerate(files)]
        size = sum(p.stat().st_size for p in files)
        results: list[FileResult] = []
        began = time.time()
        error = ""
        try:
            send_files(self._destination, infos, results.append)
        except ExportError as exc:
            error = str(exc)
        last = time.time()
        failed = len(files) - sum(1 for r in results if r.outcome == "delivered")
        if failed and not error:
            error = next((r.error for r in results if r.outcome != "delivered"), "not sent")
        return Sent(study_uid, len(files), failed, size, began, last, error.replace(study_uid, ""))


def modality(host: str, port: int, called: str, calling: str) -> Modality:
    return Modality(host, port, called, calling)
