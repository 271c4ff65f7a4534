"""Small stages that the pipeline tests name by import path (``pipelines_data.stages:X``)."""

from __future__ import annotations

import numpy as np

from dataflow.stage import Port, Stage, function_stage

VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1))
MASK = Port("array", element_type="uint8", shape=(-1, -1, -1))


class WindowLevel(Stage):
    inputs = {"image": VOLUME}
    outputs = {"image": VOLUME}

    def __init__(self, low: float = -1000.0, high: float = 1000.0):
        self.low, self.high = low, high

    def execute(self, ctx, image):
        return np.clip((image - self.low) / (self.high - self.low), 0, 1)


@function_stage(inputs={"image": VOLUME}, outputs={"mask": MASK, "volume_ml": Port("float64")})
def threshold(image, *, level: float = 0.5):
    mask = (image > level).astype(np.uint8)
    return {"mask": mask, "volume_ml": float(mask.sum())}


class Overlay(Stage):
    """Two inputs (fan-in)."""

    inputs = {"image": VOLUME, "label": MASK}
    outputs = {"overlay": VOLUME}

    def execute(self, ctx, image, label):
        return image * label


class Report(Stage):
    inputs = {"text": Port("string")}
    outputs = {}

    def execute(self, ctx, text):
        return None


class NeedsModel(Stage):
    """A required constructor argument and a GPU request."""

    inputs = {"image": VOLUME}
    outputs = {"mask": MASK}
    requests = {"gpu": 1}

    def __init__(self, model: str, batch: int = 1):
        self.model, self.batch = model, batch


class DicomSeries(Stage):
    inputs = {"series": Port("stream", element_type="dicom")}
    outputs = {"image": VOLUME}


def not_a_stage(image):
    return image


NOT_A_CLASS = 42
