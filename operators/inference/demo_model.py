"""A tiny 3D segmentation network with fixed weights, built with ``onnx.helper``.

It segments the lungs of a CT volume in HU (the phantom of ``operators.dicom.phantom``: air
-1000, lung -800, body 40, bone 700) and needs no training and no download:

1. four 1x1x1 convolutions + ReLU build a trapezoid of the HU, 1 for -850 <= HU <= -550
   (lung), falling to 0 at -950 (air) and -450 (soft tissue): ``relu(x+950) - relu(x+850)
   - relu(x+550) + relu(x+450)``, divided by 100;
2. a 3x3x3 mean (edge-padded, so a window's border sees what lies beyond it) removes isolated
   voxels and keeps the boundary of a smooth organ;
3. a 1x1x1 convolution to two logits (background, lung), steep around 0.5, and a softmax over
   the channels.

Input ``volume`` float32 [N, 1, d, h, w] (any size); output ``probabilities`` float32
[N, 2, d, h, w]. Argmax over the channels gives the label 1 for lung.

As a command::

    python -m operators.inference.demo_model OUT.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["INPUT_NAME", "LUNG_LABEL", "OUTPUT_NAME", "build_demo_model", "main", "save_demo_model"]

INPUT_NAME = "volume"
OUTPUT_NAME = "probabilities"
LUNG_LABEL = 1
#: HU breakpoints of the lung trapezoid: rises over [-950, -850], falls over [-550, -450].
BREAKPOINTS = (-950.0, -850.0, -550.0, -450.0)
STEEPNESS = 20.0  # logit slope around a smoothed lung score of 0.5
OPSET = 17


def _initializer(name: str, values: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name)


def build_demo_model():
    """The demo network as an ``onnx.ModelProto`` (checked with ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper

    ramp_w = np.ones((4, 1, 1, 1, 1), np.float32)
    ramp_b = -np.asarray(BREAKPOINTS, np.float32)  # relu(x - breakpoint)
    combine_w = (np.array([1.0, -1.0, -1.0, 1.0], np.float32) / 100.0).reshape(1, 4, 1, 1, 1)
    mean_w = np.full((1, 1, 3, 3, 3), 1.0 / 27.0, np.float32)
    logit_w = np.array([-STEEPNESS, STEEPNESS], np.float32).reshape(2, 1, 1, 1, 1)
    logit_b = np.array([STEEPNESS / 2, -STEEPNESS / 2], np.float32)
    pads = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 1], np.int64)

    nodes = [
        helper.make_node(
            "Conv", [INPUT_NAME, "ramp_w", "ramp_b"], ["ramps"], kernel_shape=[1, 1, 1]
        ),
        helper.make_node("Relu", ["ramps"], ["ramps_relu"]),
        helper.make_node("Conv", ["ramps_relu", "combine_w"], ["score"], kernel_shape=[1, 1, 1]),
        helper.make_node("Pad", ["score", "pads"], ["score_padded"], mode="edge"),
        helper.make_node("Conv", ["score_padded", "mean_w"], ["smooth"], kernel_shape=[3, 3, 3]),
        helper.make_node(
            "Conv", ["smooth", "logit_w", "logit_b"], ["logits"], kernel_shape=[1, 1, 1]
        ),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1),
    ]
    from onnx import numpy_helper

    initializers = [
        _initializer("ramp_w", ramp_w),
        _initializer("ramp_b", ramp_b),
        _initializer("combine_w", combine_w),
        _initializer("mean_w", mean_w),
        _initializer("logit_w", logit_w),
        _initializer("logit_b", logit_b),
        numpy_helper.from_array(pads, "pads"),
    ]
    dims = ["N", 1, "D", "H", "W"]
    graph = helper.make_graph(
        nodes,
        "dataflow-demo-lung",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2, "D", "H", "W"])],
        initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="dataflow",
        doc_string="Demo lung segmentation of CT in HU (fixed weights; see docstring).",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    return model


def save_demo_model(path: str | Path) -> Path:
    """Write the demo model to ``path`` (folders created); returns the path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_demo_model(), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m operators.inference.demo_model",
        description="Write the demo lung segmentation network (ONNX, fixed weights).",
    )
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    args = parser.parse_args(argv)
    print(save_demo_model(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
