"""Model inference on volumes: sliding-window 3D inference over an embedded ONNX Runtime
session or a Triton Inference Server, and the stages ``operators.inference:Inference``
(labels) and ``operators.inference:InferenceProbabilities``. See docs/operators.md
("Inference").

``operators.inference.triton`` (tritonclient) and ``operators.inference.demo_model`` (onnx)
import their libraries only when used; ``python -m operators.inference.demo_model OUT.onnx``
writes the demo lung network.
"""

from operators.inference.backends import (
    Backend,
    InferenceError,
    OnnxBackend,
    TensorInfo,
    resolve_model_path,
)
from operators.inference.sliding_window import (
    SlidingWindowError,
    argmax_labels,
    importance_map,
    sliding_window_inference,
)
from operators.inference.stage import Inference, InferenceProbabilities, make_backend

__all__ = [
    "Backend",
    "Inference",
    "InferenceError",
    "InferenceProbabilities",
    "OnnxBackend",
    "SlidingWindowError",
    "TensorInfo",
    "argmax_labels",
    "importance_map",
    "make_backend",
    "resolve_model_path",
    "sliding_window_inference",
]
