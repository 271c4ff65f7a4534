"""Three stages for the harness test: a source that gives its array a geometry, a stage that
returns a plain array (which inherits it), and one that writes what metadata it was given."""

import json
from pathlib import Path

import numpy as np

from dataflow.stage import Port, Stage, Tensor

VOL = Port("array", element_type="float32", shape=(-1,))


class Source(Stage):
    inputs = {"job": Port("stream", element_type="npy")}
    outputs = {"volume": VOL}

    def execute(self, ctx, job: Path):
        volume = np.load(sorted(Path(job).glob("*.npy"))[0]).astype(np.float32)
        return Tensor(volume, {"spacing": [2.0]})


class Double(Stage):
    inputs = {"volume": VOL}
    outputs = {"volume": VOL}

    def execute(self, ctx, volume):
        return volume * 2  # a plain array: its metadata comes from the input


class Report(Stage):
    inputs = {"volume": VOL}
    outputs = {"report": Port("stream", element_type="json")}

    def execute(self, ctx, volume):
        out = ctx.output_dir("report")
        seen = {"metadata": ctx.metadata["volume"], "sum": float(volume.sum())}
        (out / "report.json").write_text(json.dumps(seen, sort_keys=True))
        return out
