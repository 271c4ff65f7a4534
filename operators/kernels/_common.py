"""What the CPU and CUDA kernels share: argument checks, and the small host-side tables (filter
weights, resampling coordinates, which components to keep) that both consume, so the two
versions cannot disagree on a convention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflow.errors import DataflowError

__all__ = [
    "CONNECTIVITIES",
    "KernelValueError",
    "as_triple",
    "check_out",
    "gaussian_plan",
    "gaussian_weights",
    "host_mask",
    "host_volume",
    "is_device_array",
    "keep_table",
    "neighbour_offsets",
    "pass_targets",
    "readonly",
    "resample_shape",
    "resample_tables",
    "row_neighbours",
    "threshold_bounds",
    "window_params",
]

CONNECTIVITIES = (6, 18, 26)


class KernelValueError(DataflowError, ValueError):
    """A kernel argument is wrong: shape, element type, spacing, sigma, bounds, device."""


def is_device_array(x: Any) -> bool:
    """True for GPU arrays: CuPy, Numba device arrays (also the simulator's), anything with
    ``__cuda_array_interface__``. Never imports numba.cuda."""
    if isinstance(x, np.ndarray):
        return False
    return bool(getattr(x, "__cuda_ndarray__", False)) or hasattr(x, "__cuda_array_interface__")


def readonly(array: np.ndarray) -> np.ndarray:
    # Numba compiles one specialisation per (dtype, layout, writeable): stage inputs are
    # read-only store views, so every input is passed read-only and one version is compiled.
    view = array.view()
    view.flags.writeable = False
    return view


def host_volume(volume: Any, name: str = "volume") -> np.ndarray:
    """A C-contiguous, read-only float32 [D, H, W] view (a copy only if needed)."""
    array = np.asarray(volume)
    if array.ndim != 3:
        raise KernelValueError(f"{name} must be a 3-D [D, H, W] array; got shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise KernelValueError(f"{name} must be a real-valued array; got {array.dtype}")
    return readonly(np.ascontiguousarray(array, dtype=np.float32))


def host_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """A C-contiguous, read-only uint8 [D, H, W] view: nonzero is foreground."""
    array = np.asarray(mask)
    if array.ndim != 3:
        raise KernelValueError(f"{name} must be a 3-D [D, H, W] array; got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    elif array.dtype != np.uint8:
        array = (array != 0).view(np.uint8)
    return readonly(np.ascontiguousarray(array))


def check_out(out: Any, shape: tuple[int, ...], dtype: Any, name: str = "out") -> None:
    """``out`` must be a writable C-contiguous array of exactly this shape and dtype."""
    dtype = np.dtype(dtype)
    got_shape, got_dtype = tuple(getattr(out, "shape", ())), getattr(out, "dtype", None)
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise KernelValueError(
            f"{name} must be {dtype} {list(shape)}; got {got_dtype} {list(got_shape)} instead"
        )
    if isinstance(out, np.ndarray) and not (out.flags.c_contiguous and out.flags.writeable):
        raise KernelValueError(f"{name} must be a writable C-contiguous array")


def as_triple(value: float | Sequence[float], name: str, *, positive: bool = True) -> tuple:
    """One number for all three axes, or one per axis in [D, H, W] order."""
    values = [value] * 3 if np.isscalar(value) else list(value)  # type: ignore[arg-type]
    if len(values) != 3:
        raise KernelValueError(f"{name} must be one number or three ([D, H, W]); got {value!r}")
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise KernelValueError(f"{name} must be numbers; got {value!r}") from None
    ok = all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in triple)
    if not ok:
        kind = "positive" if positive else "non-negative"
        raise KernelValueError(f"{name} must be finite and {kind}; got {list(triple)}")
    return triple


def window_params(center: float, width: float) -> tuple[float, float]:
    """(low, 1 / width) of the window [center - width/2, center + width/2]."""
    center, width = float(center), float(width)
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise KernelValueError(f"window width must be positive and finite; got {width}")
    return center - width / 2.0, 1.0 / width


def threshold_bounds(lower: float | None, upper: float | None) -> tuple[float, float]:
    lo = -math.inf if lower is None else float(lower)
    hi = math.inf if upper is None else float(upper)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise KernelValueError(f"threshold bounds must satisfy lower <= upper; got {lo}, {hi}")
    return lo, hi


def resample_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Output shape when resampling ``shape`` at ``spacing`` to ``target_spacing`` (mm).

    Sample ``j`` of an axis lies at ``j * target`` mm from the centre of the first input voxel;
    samples stop at the centre of the last one, so the count is ``floor((n - 1) * s / t) + 1``
    (1e-6 of slack absorbs rounding: 2.9999999 counts as 3).
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise KernelValueError(f"cannot resample a volume of shape {tuple(shape)}")
    s = as_triple(spacing, "spacing")
    t = as_triple(target_spacing, "target spacing")
    return tuple(math.floor((int(n) - 1) * a / b + 1e-6) + 1 for n, a, b in zip(shape, s, t))


def resample_tables(n: int, spacing: float, target: float, m: int) -> tuple:
    """Per-axis (i0 int32, i1 int32, w float32): output j = (1 - w) * in[i0] + w * in[i1]."""
    x = np.arange(m, dtype=np.float64) * (target / spacing)
    x = np.clip(x, 0.0, n - 1)
    i0 = np.minimum(np.floor(x).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (x - i0).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), w


def gaussian_weights(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``), float32.

    ``sigma`` is in voxels; 0 gives the identity filter ``[1.0]``."""
    if sigma <= 0:
        return np.ones(1, np.float32)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    return (phi / phi.sum()).astype(np.float32)


def gaussian_plan(
    sigma_mm: float | Sequence[float], spacing: Sequence[float], truncate: float = 3.0
) -> list[tuple[int, np.ndarray]]:
    """[(axis, weights)] of the 1-D passes to run, in axis order; axes with sigma 0 are skipped."""
    sigma = as_triple(sigma_mm, "sigma", positive=False)
    step = as_triple(spacing, "spacing")
    if not (math.isfinite(truncate) and truncate > 0):
        raise KernelValueError(f"truncate must be positive; got {truncate}")
    plan = []
    for axis in range(3):
        weights = gaussian_weights(sigma[axis] / step[axis], truncate)
        if weights.size > 1:
            plan.append((axis, weights))
    return plan


def pass_targets(passes: int) -> list[bool]:
    """For ping-ponging separable passes between ``out`` and one temporary: True where pass p
    writes into ``out`` (the last pass always does)."""
    return [(passes - 1 - p) % 2 == 0 for p in range(passes)]


def neighbour_offsets(connectivity: int) -> np.ndarray:
    """The already-visited half of the neighbourhood, as (k, 3) int64 (dz, dy, dx) rows.

    6: faces, 18: faces and edges, 26: faces, edges and corners."""
    if connectivity not in CONNECTIVITIES:
        raise KernelValueError(f"connectivity must be one of {CONNECTIVITIES}; got {connectivity}")
    order = {6: 1, 18: 2, 26: 3}[connectivity]
    rows = [
        (dz, dy, dx)
        for dz in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dz, dy, dx) < (0, 0, 0) and 0 < abs(dz) + abs(dy) + abs(dx) <= order
    ]
    return np.array(rows, dtype=np.int64)


def row_neighbours(connectivity: int) -> np.ndarray:
    """The already-visited rows next to a row, for run-based labelling: (k, 3) int64
    (dz, dy, ext) rows, ext = 1 where a neighbour one voxel away along x (the last axis) counts,
    so runs meeting only at a corner join, else 0 (the runs must overlap).

    6: (0, -1, 0), (-1, 0, 0); 18: the in-plane and through-plane rows with ext = 1, the two
    (dz, dy) diagonals with ext = 0; 26: all four rows with ext = 1."""
    rows: dict[tuple[int, int], int] = {}
    for dz, dy, dx in neighbour_offsets(connectivity):
        if (dz, dy) != (0, 0):
            rows[(int(dz), int(dy))] = max(rows.get((int(dz), int(dy)), 0), int(dx != 0))
    return np.array([(dz, dy, ext) for (dz, dy), ext in sorted(rows.items())], dtype=np.int64)


def keep_table(sizes: np.ndarray, keep_largest: bool, min_size: int) -> np.ndarray:
    """uint8 per label (0 = background): components of at least ``min_size`` voxels, and of
    those only the largest if ``keep_largest`` (ties: the lowest label, first in raster order)."""
    keep = (sizes >= max(int(min_size), 0)).astype(np.uint8)
    keep[0] = 0
    if keep_largest and sizes.size > 1:
        candidates = np.where(keep[1:] == 1, sizes[1:], -1)
        best = int(np.argmax(candidates))
        keep[:] = 0
        if candidates[best] >= 0:
            keep[best + 1] = 1
    return keep


def hole_table(count: int, outside: np.ndarray) -> np.ndarray:
    """uint8 per background label (0 = foreground): 1 for the holes, i.e. the components
    whose label is not in ``outside`` (the labels touching the border)."""
    holes = np.ones(count + 1, np.uint8)
    holes[0] = 0
    holes[np.asarray(outside, np.int64)] = 0
    return holes
