"""Small image stages: thresholding and saving a volume (used by the reference pipelines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataflow.stage import Port, Stage, function_stage

__all__ = ["SaveNpy", "threshold"]

VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1))
MASK = Port("array", element_type="uint8", shape=(-1, -1, -1))


@function_stage(inputs={"volume": VOLUME}, outputs={"mask": MASK})
def threshold(volume, ctx, *, level: float = 0.0):
    """Voxels above ``level`` (e.g. HU) become 1, the rest 0; computed in shared memory."""
    mask = ctx.allocate("mask", volume.shape)
    np.greater(volume, level, out=mask.view(bool))
    return mask


class SaveNpy(Stage):
    """Writes an array input to ``<name>.npy`` (and its metadata to ``<name>.json``)."""

    inputs = {"array": Port("array", element_type="uint8", shape=(-1, -1, -1))}
    outputs = {"output": Port("stream", element_type="npy")}

    def __init__(self, name: str = "mask"):
        self.name = name

    def execute(self, ctx, array) -> Path:
        out = ctx.output_dir("output")
        np.save(out / f"{self.name}.npy", array)
        meta = ctx.metadata.get("array", {})
        (out / f"{self.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out
