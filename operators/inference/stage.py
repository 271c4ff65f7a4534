"""The inference stages: a model over a volume, window by window, warm in its worker.

``operators.inference:Inference`` writes a uint8 label volume (``labels``, the argmax over the
model's channels); ``operators.inference:InferenceProbabilities`` writes the blended model
output itself (``probabilities``, float32 [C, D, H, W]). Ports are fixed per class, so the
choice of output is the choice of class. Both load the model or connect to Triton in
``prepare`` (once per worker) and carry the input's metadata (geometry, source UIDs) to the
output.

Parameters: ``backend`` (``onnx`` or ``triton``); ``model`` (onnx: a ``.onnx`` file, or
``demo`` for the demo lung network of ``operators.inference.demo_model``, built into the
worker's scratch folder; a relative path is looked for next to the pipeline file, then in the
current folder); ``url``, ``protocol`` (``http``/``grpc``), ``model_name``,
``model_version``, ``shared_memory`` (``auto``/``none``/``system``/``cuda``), ``timeout``
(triton); ``roi_size``, ``overlap``, ``sw_batch_size``, ``blend`` (``gaussian``/``constant``),
``sigma_scale``, ``padding_mode`` (``constant``/``edge``), ``cval`` (sliding window);
``input_name``, ``output_name`` (which model tensors; the first ones by default).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dataflow import models
from dataflow.stage import (
    ParameterError,
    Port,
    Stage,
    StageContext,
    StageError,
    Tensor,
    pipeline_folder,
)
from operators.inference.backends import (
    Backend,
    InferenceError,
    OnnxBackend,
    resolve_model_path,
)
from operators.inference.sliding_window import (
    SlidingWindowError,
    argmax_labels,
    check_settings,
    sliding_window_inference,
)
from operators.inference.triton import SHARED_MEMORY

__all__ = ["BACKENDS", "Inference", "InferenceProbabilities", "make_backend"]

BACKENDS = ("onnx", "triton")
VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1), description="DHW, e.g. HU")


def make_backend(
    backend: str, model: str, ctx: StageContext | None = None, **options: Any
) -> Backend:
    """The backend a stage's parameters describe (``model: demo`` builds the demo network)."""
    device = ctx.device if ctx is not None else None
    if backend == "onnx":
        if model == "demo":
            from operators.inference.demo_model import save_demo_model

            folder = ctx.scratch_dir if ctx is not None and ctx.scratch_dir else None
            folder = Path(folder or tempfile.mkdtemp(prefix="dataflow-demo-model-"))
            path = save_demo_model(folder / "demo-lung.onnx")
        else:
            path = resolve_model_path(model)
        return OnnxBackend(
            path,
            device=device,
            input_name=options.get("input_name"),
            output_name=options.get("output_name"),
        )
    from operators.inference.triton import TritonBackend

    return TritonBackend(
        options["model_name"],
        url=options.get("url"),
        protocol=options.get("protocol", "http"),
        model_version=options.get("model_version", ""),
        shared_memory=options.get("shared_memory", "auto"),
        device=device,
        input_name=options.get("input_name"),
        output_name=options.get("output_name"),
        timeout=options.get("timeout", 30.0),
    )


class _InferenceBase(Stage):
    @classmethod
    def requirements(cls, parameters: Mapping[str, Any]) -> Mapping[str, str]:
        """onnx: onnxruntime (and onnx to build the demo model); triton: tritonclient with
        its HTTP (geventhttpclient) or gRPC (grpc) transport."""
        if parameters.get("backend", "onnx") == "triton":
            transport = "grpc" if parameters.get("protocol") == "grpc" else "geventhttpclient"
            return {"tritonclient": "dataflow[triton]", transport: "dataflow[triton]"}
        needs = {"onnxruntime": "dataflow[onnx]"}
        if parameters.get("model", "demo") == "demo":
            needs["onnx"] = "dataflow[onnx]"
        return needs

    @classmethod
    def check_parameters(cls, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """The base checks; a relative ``model`` found next to the pipeline file becomes an
        absolute path (a missing one fails the job that needs it, naming the file)."""
        out = super().check_parameters(values, where)
        model = out.get("model", "demo")
        if out.get("backend", "onnx") == "onnx" and models.is_reference(model):
            try:  # a model of the repository must be there when the pipeline is checked
                out["model"] = str(resolve_model_path(model))
            except InferenceError as exc:
                raise ParameterError(f"{where or f'stage {cls.__name__}'}: parameter 'model': "
                                     f"{exc}") from None  # fmt: skip
        elif out.get("backend", "onnx") == "onnx" and model != "demo":
            with contextlib.suppress(InferenceError):
                out["model"] = str(resolve_model_path(model, pipeline_folder()))
        return out

    def __init__(
        self,
        backend: str = "onnx",
        model: str = "demo",
        url: str | None = None,
        protocol: str = "http",
        model_name: str | None = None,
        model_version: str = "",
        shared_memory: str = "auto",
        timeout: float = 30.0,
        roi_size: int | list[int] = 64,
        overlap: float = 0.25,
        sw_batch_size: int = 1,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        input_name: str | None = None,
        output_name: str | None = None,
    ):
        name = type(self).__name__
        if backend not in BACKENDS:
            raise ParameterError(f"{name}: backend must be one of {BACKENDS}; got {backend!r}")
        if backend == "triton" and not model_name:
            raise ParameterError(f"{name}: backend 'triton' needs model_name")
        if protocol not in ("http", "grpc"):
            raise ParameterError(f"{name}: protocol must be 'http' or 'grpc'; got {protocol!r}")
        if shared_memory not in SHARED_MEMORY:
            raise ParameterError(
                f"{name}: shared_memory must be one of {SHARED_MEMORY}; got {shared_memory!r}"
            )
        roi = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
        self.window = {
            "roi_size": roi, "overlap": overlap, "sw_batch_size": sw_batch_size,
            "mode": blend, "sigma_scale": sigma_scale, "padding_mode": padding_mode,
            "cval": cval,
        }  # fmt: skip
        try:
            check_settings(self.window)
        except SlidingWindowError as exc:
            raise ParameterError(f"{name}: {exc}".replace("blend mode", "blend")) from None
        self.backend_name, self.model = backend, model
        self.options = {
            "url": url, "protocol": protocol, "model_name": model_name,
            "model_version": model_version, "shared_memory": shared_memory,
            "timeout": timeout, "input_name": input_name, "output_name": output_name,
        }  # fmt: skip
        self.backend: Backend | None = None

    def prepare(self, ctx: StageContext) -> None:
        self.backend = make_backend(self.backend_name, self.model, ctx, **self.options)
        ctx.log.info(
            "inference_ready",
            backend=self.backend_name,
            model=self.backend.model,
            input=self.backend.input.describe(),  # type: ignore[attr-defined]
            output=self.backend.output.describe(),  # type: ignore[attr-defined]
        )

    def _scores(self, ctx: StageContext, volume, out=None):
        if self.backend is None:  # execute without prepare (direct use): connect now
            self.prepare(ctx)
        assert self.backend is not None
        _check_finite(volume, f"stage {ctx.stage!r} input 'volume'")
        scores = sliding_window_inference(volume, self.backend.infer, out=out, **self.window)
        _check_finite(scores, f"stage {ctx.stage!r}: the model's output")
        return scores

    def cleanup(self, ctx: StageContext) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def _check_finite(array, where: str) -> None:
    """A model fed NaN or infinite values, or giving them, segments nothing without a word:
    StageError instead (host arrays; a device array is the kernels' business)."""
    if not isinstance(array, np.ndarray):
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise StageError(
            f"{where} has {bad} NaN or infinite value(s) of {array.size}: refused (a model's "
            "result on them would look like a segmentation and be wrong)"
        )


class Inference(_InferenceBase):
    """Segments ``volume`` (float32 [D, H, W]) with a model: ``labels`` uint8 [D, H, W], the
    argmax of the model's channels (one channel: 1 where it exceeds 0.5)."""

    inputs = {"volume": VOLUME}
    outputs = {"labels": Port("array", element_type="uint8", shape=(-1, -1, -1))}

    def execute(self, ctx, volume):
        scores = self._scores(ctx, volume)
        labels = argmax_labels(scores, out=ctx.allocate("labels", volume.shape, "uint8"))
        ctx.log.info("inference_done", shape=list(volume.shape), channels=scores.shape[0])
        return labels


class InferenceProbabilities(_InferenceBase):
    """Runs a model over ``volume``: ``probabilities`` float32 [C, D, H, W], the blended model
    output (probabilities or logits, as the model gives them), with the input's metadata and
    ``channels: C``."""

    inputs = {"volume": VOLUME}
    outputs = {"probabilities": Port("array", element_type="float32", shape=(-1, -1, -1, -1))}

    def execute(self, ctx, volume):
        scores = self._scores(ctx, volume)
        out = ctx.allocate("probabilities", scores.shape, "float32")
        out[...] = scores
        metadata = dict(ctx.metadata.get("volume", {}))
        metadata["channels"] = int(scores.shape[0])
        return Tensor(out, metadata)
