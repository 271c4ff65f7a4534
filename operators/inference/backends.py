"""Inference backends with one interface: ``infer(batch) -> batch`` and tensor metadata.

- :class:`OnnxBackend`: an embedded ONNX Runtime session (CPU provider; CUDA provider when a GPU
  is given and the installed onnxruntime has it). No server.
- :class:`~operators.inference.triton.TritonBackend`: a Triton Inference Server over HTTP or gRPC
  (``operators.inference.triton``).

Both describe their model's tensors as :class:`TensorInfo` (name, element type, shape with -1 for
dynamic dimensions) in ``inputs`` and ``outputs``, and check a batch against the input before
sending it, so a wrong shape is named together with the model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflow.errors import DataflowError

__all__ = [
    "Backend",
    "InferenceError",
    "OnnxBackend",
    "TensorInfo",
    "check_batch",
    "resolve_model_path",
]


class InferenceError(DataflowError, ValueError):
    """A model cannot be loaded or reached, or a batch does not fit it."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One model input or output: ``shape`` uses -1 for a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name!r} {self.dtype} [{', '.join(map(str, self.shape))}]"


class Backend:
    """What the Inference stage calls. ``model`` names the model in messages."""

    model: str = "?"
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on ``batch`` [N, C, d, h, w]; returns its output [N, C', d, h, w]."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the session, connections and shared memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pick(infos: Sequence[TensorInfo], name: str | None, what: str, model: str) -> TensorInfo:
    """The tensor called ``name`` (the first one when None)."""
    if not infos:
        raise InferenceError(f"model {model} has no {what}s")
    if name is None:
        return infos[0]
    for info in infos:
        if info.name == name:
            return info
    known = ", ".join(repr(i.name) for i in infos)
    raise InferenceError(f"model {model} has no {what} {name!r} (its {what}s: {known})")


def check_batch(batch: np.ndarray, info: TensorInfo, model: str) -> np.ndarray:
    """``batch`` as a contiguous array of the input's type; InferenceError if its shape does
    not fit the input's (same rank, equal fixed dimensions)."""
    shape = tuple(batch.shape)
    fits = len(shape) == len(info.shape) and all(d in (-1, s) for s, d in zip(shape, info.shape))
    if not fits:
        raise InferenceError(
            f"model {model}: input {info.describe()} does not accept a batch of shape {list(shape)}"
        )
    return np.ascontiguousarray(batch, dtype=np.dtype(info.dtype))


def resolve_model_path(model: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Where the model file ``model`` is: an absolute path as is; a relative one is looked for
    in ``base`` (the pipeline file's folder, when a pipeline loads), then in the current
    folder. ``models:/NAME/VERSION`` (or ``models:/NAME``, its highest version) is a model of
    the model repository (:mod:`dataflow.models`: the service's, or ``DATAFLOW_MODELS``)."""
    from dataflow import models

    if models.is_reference(model):
        try:
            return models.resolve(str(model))
        except models.ModelError as exc:
            raise InferenceError(str(exc)) from None
    path = Path(model).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [*([base / path] if base is not None else []), Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = " and ".join(str(c.parent) for c in candidates)
    where = path if path.is_absolute() else f"{path} (looked in {looked})"
    raise InferenceError(f"model file not found: {where}")


_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _onnx_info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorInfo(arg.name, _ONNX_TYPES.get(arg.type, arg.type), shape)


class OnnxBackend(Backend):
    """An ONNX Runtime session on ``path``.

    ``device``: a GPU index to run on with the CUDA execution provider (if the installed
    onnxruntime has it; otherwise the CPU, with ``fell_back`` set); None for the CPU.
    ``input_name``/``output_name``: which tensors to use (the first ones by default).
    ``threads``: intra-op threads (0: onnxruntime's default)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: int | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InferenceError(
                "the onnx backend needs onnxruntime: pip install 'dataflow[onnx]'"
            ) from exc
        self.path = Path(path)
        self.model = str(self.path)
        if not self.path.is_file():
            raise InferenceError(f"model file not found: {self.path}")
        providers: list[Any] = ["CPUExecutionProvider"]
        self.fell_back = False
        if device is not None:
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device)}))
            else:
                self.fell_back = True
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ours carry the context
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/...
            raise InferenceError(
                f"cannot load ONNX model {self.path}: {type(exc).__name__}: {exc}"
            ) from exc
        self.providers = tuple(self.session.get_providers())
        self.inputs = tuple(_onnx_info(a) for a in self.session.get_inputs())
        self.outputs = tuple(_onnx_info(a) for a in self.session.get_outputs())
        self.input = pick(self.inputs, input_name, "input", self.model)
        self.output = pick(self.outputs, output_name, "output", self.model)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        data = check_batch(batch, self.input, self.model)
        try:
            (result,) = self.session.run([self.output.name], {self.input.name: data})
        except Exception as exc:
            raise InferenceError(
                f"model {self.model} failed on a batch of shape {list(data.shape)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return result

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
