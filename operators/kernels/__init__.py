"""Image kernels for the hot paths, each with a CPU (Numba, parallel) and a CUDA version.

Every function takes a [D, H, W] volume (float32; other real types are converted on the host)
or mask (uint8 or bool; nonzero is foreground) and ``device``:

- ``"auto"`` (default): CUDA if the input is on the GPU (CuPy or Numba device array), else CPU;
- ``"cpu"``: the Numba CPU version (the input must be on the host);
- ``"cuda"``: the CUDA version; host inputs are copied to the GPU and the result back.

The result goes into ``out`` if given (must match shape and dtype exactly), otherwise it is
returned where the input lives. The CUDA versions are also importable as ``*_cuda`` (importing
one imports ``numba.cuda``; this package alone never does). Conventions: docs/kernels.md.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _common as c
from ._common import CONNECTIVITIES, KernelValueError, is_device_array, resample_shape

__all__ = [
    "CONNECTIVITIES",
    "SERIAL_BELOW_VOXELS",
    "KernelValueError",
    "connected_components",
    "connected_components_cuda",
    "cuda_available",
    "fill_holes",
    "fill_holes_cuda",
    "gaussian_smooth",
    "gaussian_smooth_cuda",
    "is_device_array",
    "label",
    "label_cuda",
    "normalize",
    "normalize_cuda",
    "paint_labels",
    "resample",
    "resample_cuda",
    "resample_shape",
    "threshold",
    "threshold_cuda",
    "value_counts",
    "warmup",
    "window_level",
    "window_level_cuda",
]

_CUDA_NAMES = {name for name in __all__ if name.endswith("_cuda")}


def __getattr__(name: str) -> Any:  # the *_cuda functions, imported on first use
    if name in _CUDA_NAMES:
        from . import cuda

        return getattr(cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def cuda_available() -> bool:
    """Whether numba-cuda is installed and a GPU (or the simulator) is usable. Cached."""
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver or toolkit: treat as no GPU
        return False


def _use_cuda(x: Any, device: str) -> bool:
    if device == "auto":
        return is_device_array(x)
    if device == "cpu":
        if is_device_array(x):
            raise KernelValueError("device='cpu' needs a host array; this one is on the GPU")
        return False
    if device == "cuda":
        if not cuda_available():
            raise KernelValueError("device='cuda' but no CUDA GPU is usable (numba-cuda, driver)")
        return True
    raise KernelValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")


def _cuda(name: str) -> Any:
    from . import cuda

    return getattr(cuda, name)


# Inputs smaller than this run on one thread. A parallel region costs little alone, but when
# several processes run kernels at once on few cores (the stages of a pipeline), threads that
# wait at a barrier for a descheduled sibling made short kernels several times slower than one
# thread (64 x 192^2 on 2 cores, two processes at once: 11 ms serial vs 48 ms on two threads
# for gaussian_smooth; see docs/kernels.md). Large inputs keep every thread.
SERIAL_BELOW_VOXELS = 1 << 23


def _threads_by_size(kernel: Callable) -> Callable:
    """Run ``kernel`` on one Numba thread when its first argument has fewer than
    SERIAL_BELOW_VOXELS elements; the caller's thread count is restored afterwards."""

    @functools.wraps(kernel)
    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if int(getattr(x, "size", 0) or 0) >= SERIAL_BELOW_VOXELS:
            return kernel(x, *args, **kwargs)
        import numba

        threads = numba.get_num_threads()
        if threads == 1:
            return kernel(x, *args, **kwargs)
        numba.set_num_threads(1)
        try:
            return kernel(x, *args, **kwargs)
        finally:
            numba.set_num_threads(threads)

    return run


def _out(out: Any, shape: tuple, dtype: Any) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    c.check_out(out, shape, dtype)
    if not isinstance(out, np.ndarray):
        raise KernelValueError("out must be a NumPy array for a CPU computation")
    return out


@_threads_by_size
def window_level(
    volume: Any, center: float, width: float, *, out: Any = None, device: str = "auto"
) -> Any:
    """Clip to [center - width/2, center + width/2] and rescale to [0, 1] (float32)."""
    if _use_cuda(volume, device):
        return _cuda("window_level_cuda")(volume, center, width, out=out)
    low, inv = c.window_params(center, width)
    src = c.host_volume(volume)
    res = _out(out, src.shape, np.float32)
    from . import cpu

    cpu.window_level(src.reshape(-1), low, inv, res.reshape(-1))
    return res


@_threads_by_size
def normalize(volume: Any, method: str = "zscore", *, out: Any = None, device: str = "auto") -> Any:
    """``"zscore"``: (v - mean) / std (population std; 0 where std is 0).
    ``"minmax"``: (v - min) / (max - min) (0 where max == min). Statistics in float64."""
    if method not in ("zscore", "minmax"):
        raise KernelValueError(f"normalize method must be 'zscore' or 'minmax'; got {method!r}")
    if _use_cuda(volume, device):
        return _cuda("normalize_cuda")(volume, method, out=out)
    src = c.host_volume(volume)
    res = _out(out, src.shape, np.float32)
    if src.size == 0:
        return res
    from . import cpu

    flat = src.reshape(-1)
    if method == "zscore":
        mean = cpu.total(flat) / flat.size
        std = math.sqrt(cpu.squared_deviation(flat, mean) / flat.size)
        shift, scale = mean, (1.0 / std if std > 0.0 else 0.0)
    else:
        lo, hi = cpu.minmax(flat)
        shift, scale = lo, (1.0 / (hi - lo) if hi > lo else 0.0)
    cpu.affine(flat, shift, scale, res.reshape(-1))
    return res


@_threads_by_size
def resample(
    volume: Any,
    spacing: Any,
    target_spacing: Any,
    *,
    out: Any = None,
    device: str = "auto",
) -> Any:
    """Trilinear resampling from ``spacing`` to ``target_spacing`` (mm per axis, [D, H, W]).

    Voxel centres of the first voxel coincide (the origin is unchanged); output spacing is
    exactly ``target_spacing``; the shape is :func:`resample_shape` (rounded down, so the
    extent may shrink by less than one output voxel; nothing is extrapolated)."""
    if _use_cuda(volume, device):
        return _cuda("resample_cuda")(volume, spacing, target_spacing, out=out)
    src = c.host_volume(volume)
    shape = resample_shape(src.shape, spacing, target_spacing)
    s, t = c.as_triple(spacing, "spacing"), c.as_triple(target_spacing, "target spacing")
    tables = []
    for n, a, b, m in zip(src.shape, s, t, shape):
        tables += c.resample_tables(n, a, b, m)
    res = _out(out, shape, np.float32)
    from . import cpu

    cpu.resample(src, *tables, res)
    return res


@_threads_by_size
def gaussian_smooth(
    volume: Any,
    sigma: Any,
    spacing: Any = (1.0, 1.0, 1.0),
    *,
    truncate: float = 3.0,
    out: Any = None,
    device: str = "auto",
) -> Any:
    """Separable Gaussian with ``sigma`` in mm (one or per axis), converted to voxels with
    ``spacing``; kernel radius ``int(truncate * sigma_vox + 0.5)``; edge mode 'nearest'. Same
    as ``scipy.ndimage.gaussian_filter(v, sigma_mm / spacing, mode='nearest', truncate=3)``."""
    if _use_cuda(volume, device):
        return _cuda("gaussian_smooth_cuda")(volume, sigma, spacing, truncate=truncate, out=out)
    plan = c.gaussian_plan(sigma, spacing, truncate)
    src = c.host_volume(volume)
    res = _out(out, src.shape, np.float32)
    if not plan:
        res[...] = src
        return res
    from . import cpu

    if len(plan) == 3:  # every axis: one fused sweep, no volume-sized temporary
        import numba

        chunks = max(1, min(src.shape[0], 4 * numba.get_num_threads()))
        cpu.gaussian_fused(src, plan[0][1], plan[1][1], plan[2][1], chunks, res)
        return res
    passes = (cpu.gaussian_axis0, cpu.gaussian_axis1, cpu.gaussian_axis2)
    tmp = np.empty(src.shape, np.float32) if len(plan) > 1 else None
    for (axis, weights), into_out in zip(plan, c.pass_targets(len(plan))):
        dst = res if into_out else tmp
        passes[axis](src, weights, dst)
        src = c.readonly(dst)
    return res


@_threads_by_size
def threshold(
    volume: Any,
    lower: float | None = None,
    upper: float | None = None,
    *,
    out: Any = None,
    device: str = "auto",
) -> Any:
    """uint8 mask: 1 where lower <= v <= upper (a missing bound is open; NaN gives 0)."""
    if _use_cuda(volume, device):
        return _cuda("threshold_cuda")(volume, lower, upper, out=out)
    lo, hi = c.threshold_bounds(lower, upper)
    src = c.host_volume(volume)
    res = _out(out, src.shape, np.uint8)
    from . import cpu

    cpu.threshold(src.reshape(-1), lo, hi, res.reshape(-1))
    return res


@_threads_by_size
def paint_labels(
    labels: Any, mask: Any, value: int, within: int | None = None, *, out: Any = None
) -> np.ndarray:
    """uint8 labels with ``value`` where ``mask`` is nonzero and, with ``within``, only where
    ``labels == within``; ``labels`` elsewhere. One parallel pass (CPU only); ``out`` may be
    ``labels`` itself."""
    for name, v in (("value", value), ("within", within)):
        if v is not None and not 0 <= v <= 255:
            raise KernelValueError(f"{name} must be in 0..255; got {v}")
    src = np.asarray(labels)
    if src.dtype != np.uint8:
        raise KernelValueError(f"labels must be uint8; got {src.dtype}")
    src = c.readonly(np.ascontiguousarray(src))
    where = c.host_mask(mask)
    if where.shape != src.shape:
        raise KernelValueError(f"mask {list(where.shape)} does not match labels {list(src.shape)}")
    res = _out(out, src.shape, np.uint8)
    from . import cpu

    within = -1 if within is None else int(within)
    cpu.paint(src.reshape(-1), where.reshape(-1), np.uint8(value), within, res.reshape(-1))
    return res


@_threads_by_size
def value_counts(array: Any) -> np.ndarray:
    """int64[256]: how many elements of the uint8 ``array`` (any shape) hold each value; one
    parallel pass (``np.unique`` sorts or hashes, ``np.bincount`` casts to intp first). CPU."""
    src = np.asarray(array)
    if src.dtype != np.uint8:
        raise KernelValueError(f"value_counts needs uint8; got {src.dtype}")
    from . import cpu

    flat = c.readonly(np.ascontiguousarray(src).reshape(-1))
    return cpu.value_counts(flat, max(1, min(flat.size, 4 * _threads())))


def _runs(mask: np.ndarray, connectivity: int) -> tuple:
    from . import cpu

    return cpu.runs(mask, c.row_neighbours(connectivity), _threads())


def _threads() -> int:
    import numba

    return max(1, numba.get_num_threads())


@_threads_by_size
def label(
    mask: Any, connectivity: int = 6, *, out: Any = None, device: str = "auto"
) -> tuple[Any, int]:
    """Connected components of ``mask`` (6, 18 or 26-connectivity): (int32 labels, n).

    Labels are 1..n in raster order of each component's first voxel, as scipy.ndimage.label."""
    if _use_cuda(mask, device):
        return _cuda("label_cuda")(mask, connectivity, out=out)
    c.neighbour_offsets(connectivity)  # checks connectivity before any work
    src = c.host_mask(mask)
    res = _out(out, src.shape, np.int32)
    if src.size == 0:
        return res, 0
    row_start, starts, ends, labels, count = _runs(src, connectivity)
    from . import cpu

    cpu.paint_runs(row_start, starts, ends, labels, np.int32(0), res)
    return res, count


@_threads_by_size
def connected_components(
    mask: Any,
    connectivity: int = 6,
    *,
    keep_largest: bool = False,
    min_size: int = 0,
    out: Any = None,
    device: str = "auto",
) -> Any:
    """uint8 mask of the components of at least ``min_size`` voxels, and of those only the
    largest if ``keep_largest`` (ties: the first in raster order)."""
    if _use_cuda(mask, device):
        fn = _cuda("connected_components_cuda")
        return fn(mask, connectivity, keep_largest=keep_largest, min_size=min_size, out=out)
    c.neighbour_offsets(connectivity)
    src = c.host_mask(mask)
    res = _out(out, src.shape, np.uint8)
    if src.size == 0:
        return res
    row_start, starts, ends, labels, count = _runs(src, connectivity)
    from . import cpu

    sizes = cpu.run_label_sizes(starts, ends, labels, count)
    keep = c.keep_table(sizes, keep_largest, min_size)
    cpu.paint_runs(row_start, starts, ends, keep[labels], np.uint8(0), res)
    return res


@_threads_by_size
def fill_holes(mask: Any, connectivity: int = 6, *, out: Any = None, device: str = "auto") -> Any:
    """uint8 mask with every hole filled: background components (``connectivity``-connected)
    that do not touch the volume's border become foreground, e.g. the lungs inside a body
    mask. Use 6 for the background of a 26-connected object (the usual pairing)."""
    if _use_cuda(mask, device):
        return _cuda("fill_holes_cuda")(mask, connectivity, out=out)
    c.neighbour_offsets(connectivity)
    src = c.host_mask(mask)
    res = _out(out, src.shape, np.uint8)
    if src.size == 0:
        return res
    background = (src == 0).view(np.uint8)
    row_start, starts, ends, labels, count = _runs(background, connectivity)
    from . import cpu

    outside = cpu.border_run_labels(row_start, starts, ends, labels, src.shape, count)
    # the background runs of components touching the border stay 0, everything else is 1
    cpu.paint_runs(row_start, starts, ends, 1 - outside[labels], np.uint8(1), res)
    return res


_WARMUPS = {
    "window_level": lambda v, m, d: window_level(v, 0.5, 1.0, device=d),
    "normalize": lambda v, m, d: [normalize(v, k, device=d) for k in ("zscore", "minmax")],
    "resample": lambda v, m, d: resample(v, (1.0, 1.0, 1.0), (0.7, 0.7, 0.7), device=d),
    "gaussian_smooth": lambda v, m, d: [  # every axis: the fused sweep; fewer: the passes
        gaussian_smooth(v, s, device=d) for s in (1.0, (1.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    ],
    "threshold": lambda v, m, d: threshold(v, 0.5, device=d),
    "paint_labels": lambda v, m, d: [paint_labels(m, m, 2, w) for w in (None, 1)],
    "value_counts": lambda v, m, d: value_counts(m),
    "label": lambda v, m, d: label(m, 6, device=d),
    "connected_components": lambda v, m, d: connected_components(m, 26, device=d),
    "fill_holes": lambda v, m, d: fill_holes(m, 6, device=d),
}


def warmup(*kernels: str, device: str = "cpu") -> dict[str, float]:
    """Compile ``kernels`` (default: all) for ``device`` ("cpu" or "cuda") by running them on
    a 4x4x4 volume, so the first job does not pay the JIT; returns seconds per kernel.
    Call it from a stage's ``prepare``."""
    names = kernels or tuple(_WARMUPS)
    unknown = sorted(set(names) - set(_WARMUPS))
    if unknown:
        raise KernelValueError(f"unknown kernel(s) {unknown}; known: {sorted(_WARMUPS)}")
    volume = np.random.default_rng(0).random((4, 4, 4), dtype=np.float32)
    mask = (volume > 0.5).view(np.uint8)
    times = {}
    for name in names:
        start = time.perf_counter()
        _WARMUPS[name](volume, mask, device)
        times[name] = time.perf_counter() - start
    return times
