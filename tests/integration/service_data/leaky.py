"""A test stage that leaks its study's identifiers every way a stage author might: a log
event field under an innocent name, a stdlib logger, a print, and an exception quoting them
with its file's path; then fails. What the service keeps and logs must hold none of them."""

import logging
from pathlib import Path

import pydicom

from dataflow.stage import Port, Stage


class Leaky(Stage):
    inputs = {"job": Port("stream", element_type="folder")}
    outputs = {"done": Port("stream", element_type="text")}

    def execute(self, ctx, job: Path) -> Path:
        path = sorted(Path(job).rglob("*.dcm"))[0]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        said = (f"{ds.PatientName} {ds.PatientID} {ds.PatientBirthDate} {ds.AccessionNumber} "
                f"{ds.SeriesDescription} {ds.StudyInstanceUID} {ds.SOPInstanceUID}")  # fmt: skip
        ctx.log.info("leaky_read", note=said, file=str(path))
        logging.getLogger("leaky.library").warning("read %s from %s", said, path)
        print("debug:", said, flush=True)
        raise ValueError(f"cannot use {path}: {said}")
