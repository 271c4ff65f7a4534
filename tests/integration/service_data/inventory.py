"""A test stage: lists the SOP Instance UIDs of the job's DICOM files (any count, any order),
so that a test can check which received instances a job processed."""

import json
from pathlib import Path

import pydicom

from dataflow.stage import Port, Stage


class Inventory(Stage):
    inputs = {"study": Port("stream", element_type="dicom")}
    outputs = {"inventory": Port("stream", element_type="json")}

    def execute(self, ctx, study: Path) -> Path:
        uids = sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in Path(study).rglob("*.dcm")
        )
        out = ctx.output_dir("inventory")
        (out / "uids.json").write_text(json.dumps(uids))
        return out
