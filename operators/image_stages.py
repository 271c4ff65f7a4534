"""Image stages on float32 [D, H, W] volumes and uint8 masks, backed by ``operators.kernels``.

Each stage computes straight into shared memory (``ctx.allocate``). It runs the CUDA version
when the worker has a GPU (``ctx.device is not None``) and numba-cuda can use it, or when an
input arrives as a device array; the CPU version otherwise. ``prepare`` compiles the kernels it
needs (see docs/kernels.md), so the first job does not pay the JIT.

Stages: WindowLevel, Normalize, Resample, GaussianSmooth, Threshold, ConnectedComponents,
FillHoles, PaintLabels, Crop (no kernel: a copy of a box).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from dataflow.stage import ParameterError, Port, Stage, StageContext, Tensor
from operators import kernels
from operators.kernels import CONNECTIVITIES, KernelValueError, is_device_array
from operators.kernels._common import as_triple

__all__ = [
    "ConnectedComponents",
    "Crop",
    "FillHoles",
    "GaussianSmooth",
    "Normalize",
    "PaintLabels",
    "Resample",
    "Threshold",
    "WindowLevel",
]

VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1))
MASK = Port("array", element_type="uint8", shape=(-1, -1, -1))


def _triple_parameter(value: Any, name: str, *, positive: bool) -> tuple[float, float, float]:
    try:
        return as_triple(value, name, positive=positive)
    except KernelValueError as exc:
        raise ParameterError(str(exc)) from None


class _KernelStage(Stage):
    """Chooses the device in ``prepare`` and compiles ``kernels`` there."""

    kernels: ClassVar[tuple[str, ...]] = ()

    def prepare(self, ctx: StageContext) -> None:
        self.use_cuda = ctx.device is not None and kernels.cuda_available()
        kernels.warmup(*self.kernels, device="cuda" if self.use_cuda else "cpu")

    def _device(self, array: Any) -> str:
        if is_device_array(array) or getattr(self, "use_cuda", False):
            return "cuda"
        return "cpu"


class WindowLevel(_KernelStage):
    """Clip to [center - width/2, center + width/2] (e.g. HU) and rescale to [0, 1].

    Inputs: volume float32 [D, H, W]. Outputs: volume float32 [D, H, W] in [0, 1]."""

    inputs = {"volume": VOLUME}
    outputs = {"volume": VOLUME}
    kernels = ("window_level",)

    def __init__(self, center: float = 40.0, width: float = 400.0):
        if not width > 0:
            raise ParameterError(f"WindowLevel: width must be positive; got {width}")
        self.center, self.width = center, width

    def execute(self, ctx, volume):
        out = ctx.allocate("volume", volume.shape, "float32")
        device = self._device(volume)
        return kernels.window_level(volume, self.center, self.width, out=out, device=device)


class Normalize(_KernelStage):
    """``zscore``: (v - mean) / std; ``minmax``: (v - min) / (max - min), over the volume."""

    inputs = {"volume": VOLUME}
    outputs = {"volume": VOLUME}
    kernels = ("normalize",)

    def __init__(self, method: str = "zscore"):
        if method not in ("zscore", "minmax"):
            raise ParameterError(f"Normalize: method must be 'zscore' or 'minmax'; got {method!r}")
        self.method = method

    def execute(self, ctx, volume):
        out = ctx.allocate("volume", volume.shape, "float32")
        return kernels.normalize(volume, self.method, out=out, device=self._device(volume))


class Resample(_KernelStage):
    """Trilinear resampling to ``spacing`` mm (one number, or [D, H, W]).

    Needs the input's ``spacing`` metadata. The output keeps origin and direction (the first
    voxel's centre does not move) and gets ``spacing`` = the target; ``sop_instance_uids`` is
    dropped when the number of slices changes (it no longer names the slices)."""

    inputs = {"volume": VOLUME}
    outputs = {"volume": VOLUME}
    kernels = ("resample",)

    def __init__(self, spacing: float | list[float] = 1.0):
        self.spacing = _triple_parameter(spacing, "Resample: spacing", positive=True)

    def execute(self, ctx, volume):
        metadata = dict(ctx.metadata.get("volume", {}))
        if "spacing" not in metadata:
            raise KernelValueError(
                f"stage {ctx.stage!r} input 'volume' has no 'spacing' metadata to resample from"
            )
        source = as_triple(metadata["spacing"], "input 'volume' spacing metadata")
        shape = kernels.resample_shape(volume.shape, source, self.spacing)
        out = ctx.allocate("volume", shape, "float32")
        kernels.resample(volume, source, self.spacing, out=out, device=self._device(volume))
        metadata["spacing"] = list(self.spacing)
        if shape[0] != volume.shape[0]:
            metadata.pop("sop_instance_uids", None)
        return Tensor(out, metadata)


class GaussianSmooth(_KernelStage):
    """Gaussian smoothing with ``sigma`` in mm (one number, or [D, H, W]); truncated at 3
    sigma, edges 'nearest'. Uses the input's ``spacing`` metadata (1 mm if absent)."""

    inputs = {"volume": VOLUME}
    outputs = {"volume": VOLUME}
    kernels = ("gaussian_smooth",)

    def __init__(self, sigma: float | list[float] = 1.0):
        self.sigma = _triple_parameter(sigma, "GaussianSmooth: sigma", positive=False)

    def execute(self, ctx, volume):
        spacing = ctx.metadata.get("volume", {}).get("spacing")
        if spacing is None:
            ctx.log.warning("spacing_missing_assuming_1mm", port="volume")
            spacing = (1.0, 1.0, 1.0)
        out = ctx.allocate("volume", volume.shape, "float32")
        device = self._device(volume)
        return kernels.gaussian_smooth(volume, self.sigma, spacing, out=out, device=device)


class Threshold(_KernelStage):
    """uint8 mask: 1 where lower <= v <= upper (a bound left out is open)."""

    inputs = {"volume": VOLUME}
    outputs = {"mask": MASK}
    kernels = ("threshold",)

    def __init__(self, lower: float | None = None, upper: float | None = None):
        if lower is not None and upper is not None and lower > upper:
            raise ParameterError(f"Threshold: lower ({lower}) must not exceed upper ({upper})")
        self.lower, self.upper = lower, upper

    def execute(self, ctx, volume):
        out = ctx.allocate("mask", volume.shape, "uint8")
        device = self._device(volume)
        return kernels.threshold(volume, self.lower, self.upper, out=out, device=device)


class ConnectedComponents(_KernelStage):
    """Keeps the connected components of a mask that have at least ``min_size`` voxels, and of
    those only the largest if ``keep_largest`` (off by default: a mask of bones, or of
    lesions, has many components that all count). ``connectivity``: 6, 18 or 26."""

    inputs = {"mask": MASK}
    outputs = {"mask": MASK}
    kernels = ("connected_components",)

    def __init__(self, connectivity: int = 26, keep_largest: bool = False, min_size: int = 0):
        if connectivity not in CONNECTIVITIES:
            raise ParameterError(
                f"ConnectedComponents: connectivity must be one of {CONNECTIVITIES}; "
                f"got {connectivity}"
            )
        if min_size < 0:
            raise ParameterError(f"ConnectedComponents: min_size must be >= 0; got {min_size}")
        self.connectivity, self.keep_largest, self.min_size = connectivity, keep_largest, min_size

    def execute(self, ctx, mask):
        out = ctx.allocate("mask", mask.shape, "uint8")
        return kernels.connected_components(
            mask,
            self.connectivity,
            keep_largest=self.keep_largest,
            min_size=self.min_size,
            out=out,
            device=self._device(mask),
        )


class FillHoles(_KernelStage):
    """Fills the holes of a mask: background regions that do not reach the volume's border
    (e.g. the lungs inside a body mask). ``connectivity`` is the background's: 6 (default,
    the pair of a 26-connected object), 18 or 26."""

    inputs = {"mask": MASK}
    outputs = {"mask": MASK}
    kernels = ("fill_holes",)

    def __init__(self, connectivity: int = 6):
        if connectivity not in CONNECTIVITIES:
            raise ParameterError(
                f"FillHoles: connectivity must be one of {CONNECTIVITIES}; got {connectivity}"
            )
        self.connectivity = connectivity

    def execute(self, ctx, mask):
        out = ctx.allocate("mask", mask.shape, "uint8")
        return kernels.fill_holes(mask, self.connectivity, out=out, device=self._device(mask))


class PaintLabels(_KernelStage):
    """Paints ``value`` into a label volume where ``mask`` is set, and, if ``within`` is
    given, only where the labels equal ``within`` (e.g. lungs = 2 only inside the body = 1).

    Inputs: ``labels`` (uint8; a 0/1 mask is a label volume with label 1) and ``mask``.
    Output: ``labels``, with the metadata of the input ``labels``. Chain several to build a
    label map from masks."""

    inputs = {"labels": MASK, "mask": MASK}
    outputs = {"labels": MASK}
    kernels = ("paint_labels",)  # CPU only: one parallel pass

    def __init__(self, value: int, within: int | None = None):
        for name, v in (("value", value), ("within", within)):
            if v is not None and not 0 <= v <= 255:
                raise ParameterError(f"PaintLabels: {name} must be in 0..255; got {v}")
        self.value, self.within = value, within

    def execute(self, ctx, labels, mask):
        if labels.shape != mask.shape:
            raise KernelValueError(
                f"stage {ctx.stage!r}: mask {list(mask.shape)} does not match labels "
                f"{list(labels.shape)}"
            )
        out = ctx.allocate("labels", labels.shape, "uint8")
        kernels.paint_labels(labels, mask, self.value, self.within, out=out)
        return out  # the metadata of `labels`, the first input


class Crop(Stage):
    """Crops a volume to the voxel box ``start`` (inclusive) .. ``stop`` (exclusive), one
    ``[D, H, W]`` triple each, with Python's slicing rules (negative counts from the end, a
    stop past the end is the end). The geometry follows: ``origin`` moves to the box's first
    voxel, ``sop_instance_uids`` (and ``frame_numbers``) keep the slices kept; spacing and
    direction are unchanged, so a cropped series still maps onto its source slices."""

    inputs = {"volume": VOLUME}
    outputs = {"volume": VOLUME}

    def __init__(self, start: list[int] | None = None, stop: list[int] | None = None):
        self.start = [0, 0, 0] if start is None else list(start)
        self.stop = [None, None, None] if stop is None else list(stop)
        for name, box in (("start", self.start), ("stop", self.stop)):
            if len(box) != 3 or not all(v is None or isinstance(v, int) for v in box):
                raise ParameterError(f"Crop: {name} must be three integers [D, H, W]; got {box}")

    def execute(self, ctx, volume):
        box = tuple(slice(a, b) for a, b in zip(self.start, self.stop))
        ranges = [s.indices(n) for s, n in zip(box, volume.shape)]
        if any(b <= a for a, b, _ in ranges):
            raise KernelValueError(
                f"stage {ctx.stage!r}: crop start {self.start} stop {self.stop} leaves nothing "
                f"of the volume {list(volume.shape)}"
            )
        cropped = volume[box]
        out = ctx.allocate("volume", cropped.shape, "float32")
        np.copyto(out, cropped)
        metadata = dict(ctx.metadata.get("volume", {}))
        first = np.array([a for a, _, _ in ranges], float)
        if "origin" in metadata and "direction" in metadata and "spacing" in metadata:
            direction = np.asarray(metadata["direction"], float).reshape(3, 3)
            shift = direction @ (np.asarray(metadata["spacing"], float) * first)
            metadata["origin"] = (np.asarray(metadata["origin"], float) + shift).tolist()
        for key in ("sop_instance_uids", "frame_numbers"):
            if key in metadata:
                metadata[key] = list(metadata[key])[box[0]]
        return Tensor(out, metadata)
