"""CUDA versions of the kernels (numba-cuda ``@cuda.jit``) and the ``*_cuda`` functions.

Importing this module imports ``numba.cuda`` (needs the ``numba-cuda`` package; set
``NUMBA_ENABLE_CUDASIM=1`` before the import to run on the simulator).

Every ``*_cuda`` function takes a Numba device array, a CuPy array (any object with
``__cuda_array_interface__``, used in place) or a NumPy array (copied to the device). The result
goes into ``out`` if given (a device array, or a NumPy array it is copied into), otherwise it
stays where the input was: a CuPy array for CuPy input, a Numba device array for a device
input, a NumPy array for NumPy input. Kernels run on the default stream; results on the host are
complete on return, results on the device are ordered before later default-stream work.

Launches use a flat grid-stride loop of 256-thread blocks; grids too small for the GPU (tiny
volumes) are expected, so numba-cuda's low-occupancy warning is silenced for these launches only.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from numba import cuda, float64, int32

from . import _common as c

__all__ = [
    "connected_components_cuda",
    "fill_holes_cuda",
    "gaussian_smooth_cuda",
    "label_cuda",
    "normalize_cuda",
    "resample_cuda",
    "threshold_cuda",
    "window_level_cuda",
]

TPB = 256  # threads per block (the reductions' shared arrays are this long)
MAX_BLOCKS = 65536  # beyond this, threads loop (grid-stride)


def _launch(kernel, n: int, *args: Any, blocks: int | None = None) -> None:
    if blocks is None:
        blocks = max(1, min((n + TPB - 1) // TPB, MAX_BLOCKS))
    with warnings.catch_warnings():
        # numba-cuda highlights the message (ANSI escapes before "Grid size") on a real GPU
        warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU")
        kernel[blocks, TPB](*args)


# ------------------------------------------------------------------ where arrays live


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _numba_view(x: Any) -> Any:
    return x if getattr(x, "__cuda_ndarray__", False) else cuda.as_cuda_array(x)


def _device_input(x: Any, kind: str) -> tuple[Any, bool]:
    """(a Numba device array of the input, whether the input was on the host)."""
    if not c.is_device_array(x):
        host = c.host_volume(x) if kind == "volume" else c.host_mask(x)
        return cuda.to_device(host), True
    d = _numba_view(x)
    if len(d.shape) != 3:
        raise c.KernelValueError(f"{kind} must be a 3-D [D, H, W] array; got shape {d.shape}")
    allowed = (np.float32,) if kind == "volume" else (np.uint8, np.bool_)
    if d.dtype not in [np.dtype(t) for t in allowed]:
        names = " or ".join(np.dtype(t).name for t in allowed)
        raise c.KernelValueError(f"a device {kind} must be {names}; got {d.dtype}")
    return d, False


class _Output:
    """A device array to compute into, and what to hand back when done."""

    def __init__(self, like: Any, on_host: bool, shape: tuple, dtype: Any, out: Any) -> None:
        self.shape, self.dtype, self.host = tuple(shape), np.dtype(dtype), None
        if out is not None:
            c.check_out(out, self.shape, self.dtype)
            if isinstance(out, np.ndarray):
                self.host, self.device = out, cuda.device_array(self.shape, self.dtype)
            else:
                self.result, self.device = out, _numba_view(out)
        elif on_host:
            self.host = np.empty(self.shape, self.dtype)
            self.device = cuda.device_array(self.shape, self.dtype)
        elif _is_cupy(like):
            import cupy

            self.result = cupy.empty(self.shape, self.dtype)
            self.device = cuda.as_cuda_array(self.result)
        else:
            self.result = self.device = cuda.device_array(self.shape, self.dtype)

    def done(self) -> Any:
        if self.host is not None:
            if self.host.size:
                self.device.copy_to_host(self.host)
            return self.host
        return self.result


def _zeros(shape: Any, dtype: Any) -> Any:
    return cuda.to_device(np.zeros(shape, dtype))


# ------------------------------------------------------------------ kernels


@cuda.jit(device=True)
def _zyx(i, height, width):
    t = i // width
    return t // height, t % height, i % width


@cuda.jit
def _k_window_level(src, low, inv_width, out):
    depth, height, width = src.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        v = (src[z, y, x] - low) * inv_width
        if v < 0.0:
            v = 0.0
        elif v > 1.0:
            v = 1.0
        out[z, y, x] = v
        i += step


@cuda.jit
def _k_threshold(src, lower, upper, out):
    depth, height, width = src.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        v = src[z, y, x]
        out[z, y, x] = 1 if (v >= lower and v <= upper) else 0
        i += step


@cuda.jit(device=True)
def _block_add(value, acc, index):
    buf = cuda.shared.array(TPB, float64)
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    s = TPB // 2
    while s > 0:
        if tid < s:
            buf[tid] += buf[tid + s]
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        cuda.atomic.add(acc, index, buf[0])


@cuda.jit
def _k_moments(src, stats, which):
    """which 0: stats[0] += sum(v); which 1: stats[1] += sum((v - stats[0] / n)^2)."""
    depth, height, width = src.shape
    n = depth * height * width
    mean = stats[0] / n if which == 1 else 0.0
    acc = 0.0
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < n:
        z, y, x = _zyx(i, height, width)
        v = float64(src[z, y, x])
        acc += v if which == 0 else (v - mean) * (v - mean)
        i += step
    _block_add(acc, stats, which)


@cuda.jit
def _k_minmax(src, stats):
    depth, height, width = src.shape
    lo, hi = math.inf, -math.inf
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        v = float64(src[z, y, x])
        lo = min(lo, v)
        hi = max(hi, v)
        i += step
    low = cuda.shared.array(TPB, float64)
    high = cuda.shared.array(TPB, float64)
    tid = cuda.threadIdx.x
    low[tid], high[tid] = lo, hi
    cuda.syncthreads()
    s = TPB // 2
    while s > 0:
        if tid < s:
            low[tid] = min(low[tid], low[tid + s])
            high[tid] = max(high[tid], high[tid + s])
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        cuda.atomic.min(stats, 2, low[0])
        cuda.atomic.max(stats, 3, high[0])


@cuda.jit
def _k_affine(src, stats, method, out):
    """method 0: z-score from stats[0:2]; method 1: min-max from stats[2:4]."""
    depth, height, width = src.shape
    n = depth * height * width
    if method == 0:
        shift = stats[0] / n
        std = math.sqrt(stats[1] / n)
        scale = 1.0 / std if std > 0.0 else 0.0
    else:
        shift = stats[2]
        scale = 1.0 / (stats[3] - stats[2]) if stats[3] > stats[2] else 0.0
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < n:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = (src[z, y, x] - shift) * scale
        i += step


@cuda.jit
def _k_resample(src, z0, z1, wz, y0, y1, wy, x0, x1, wx, out):
    depth, height, width = out.shape
    one = np.float32(1.0)
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        k, j, m = _zyx(i, height, width)
        a0, a1, fz = z0[k], z1[k], wz[k]
        b0, b1, fy = y0[j], y1[j], wy[j]
        c0, c1, fx = x0[m], x1[m], wx[m]
        gz, gy, gx = one - fz, one - fy, one - fx
        v00 = gx * src[a0, b0, c0] + fx * src[a0, b0, c1]
        v01 = gx * src[a0, b1, c0] + fx * src[a0, b1, c1]
        v10 = gx * src[a1, b0, c0] + fx * src[a1, b0, c1]
        v11 = gx * src[a1, b1, c0] + fx * src[a1, b1, c1]
        v0 = gy * v00 + fy * v01
        v1 = gy * v10 + fy * v11
        out[k, j, m] = gz * v0 + fz * v1
        i += step


@cuda.jit
def _k_gaussian(src, w, axis, out):
    depth, height, width = src.shape
    r = (w.size - 1) // 2
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        acc = np.float32(0.0)
        for k in range(w.size):
            if axis == 0:
                v = src[min(max(z + k - r, 0), depth - 1), y, x]
            elif axis == 1:
                v = src[z, min(max(y + k - r, 0), height - 1), x]
            else:
                v = src[z, y, min(max(x + k - r, 0), width - 1)]
            acc += w[k] * v
        out[z, y, x] = acc
        i += step


@cuda.jit
def _k_copy(src, out):
    depth, height, width = src.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = src[z, y, x]
        i += step


# Connected components: union-find over flat indices with atomicMin links, so that
# parent[i] <= i always and a root is its component's first voxel in raster order
# (Playne & Hawick 2018). Roots are then numbered in raster order by a prefix sum, which
# gives exactly the CPU version's (and scipy's) labels.


@cuda.jit(device=True)
def _find(parent, i):
    p = parent[i]
    while p != i:
        i = p
        p = parent[i]
    return i


@cuda.jit(device=True)
def _union(parent, a, b):
    while True:
        a = _find(parent, a)
        b = _find(parent, b)
        if a == b:
            return
        if a > b:
            a, b = b, a
        old = cuda.atomic.min(parent, b, a)
        if old == b:
            return
        b = old  # b had been linked to old meanwhile: now join a and old


@cuda.jit
def _k_ccl_init(parent):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < parent.size:
        parent[i] = i
        i += step


@cuda.jit
def _k_ccl_merge(mask, offsets, parent):
    depth, height, width = mask.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        if mask[z, y, x] != 0:
            for k in range(offsets.shape[0]):
                zz, yy, xx = z + offsets[k, 0], y + offsets[k, 1], x + offsets[k, 2]
                inside = zz >= 0 and 0 <= yy < height and 0 <= xx < width
                if inside and mask[zz, yy, xx] != 0:
                    _union(parent, i, (zz * height + yy) * width + xx)
        i += step


@cuda.jit
def _k_ccl_roots(mask, parent, flags):
    depth, height, width = mask.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        root = _find(parent, i) if mask[z, y, x] != 0 else -1
        if root >= 0:
            parent[i] = root
        flags[i] = 1 if root == i else 0
        i += step


@cuda.jit
def _k_ccl_write(mask, parent, ranks, out):
    depth, height, width = mask.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = ranks[parent[i]] if mask[z, y, x] != 0 else 0
        i += step


@cuda.jit
def _k_scan_block(data, block_sums):
    """Inclusive scan of each TPB-long block of ``data`` in place; block totals out."""
    buf = cuda.shared.array(TPB, int32)
    tid = cuda.threadIdx.x
    i = cuda.blockIdx.x * TPB + tid
    buf[tid] = data[i] if i < data.size else 0
    cuda.syncthreads()
    offset = 1
    while offset < TPB:
        t = buf[tid - offset] if tid >= offset else 0
        cuda.syncthreads()
        buf[tid] += t
        cuda.syncthreads()
        offset *= 2
    if i < data.size:
        data[i] = buf[tid]
    if tid == TPB - 1:
        block_sums[cuda.blockIdx.x] = buf[tid]


@cuda.jit
def _k_scan_add(data, block_prefix):
    b = cuda.blockIdx.x
    i = b * TPB + cuda.threadIdx.x
    if b > 0 and i < data.size:
        data[i] += block_prefix[b - 1]


@cuda.jit
def _k_sizes(labels, sizes):
    depth, height, width = labels.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        if labels[z, y, x] != 0:
            cuda.atomic.add(sizes, labels[z, y, x], 1)
        i += step


@cuda.jit
def _k_keep(labels, keep, out):
    depth, height, width = labels.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = keep[labels[z, y, x]]
        i += step


@cuda.jit
def _k_invert(mask, out):
    depth, height, width = mask.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = 1 if mask[z, y, x] == 0 else 0
        i += step


@cuda.jit
def _k_border(labels, flags):
    depth, height, width = labels.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        edge = z == 0 or y == 0 or x == 0 or z == depth - 1 or y == height - 1 or x == width - 1
        if edge:
            flags[labels[z, y, x]] = 1
        i += step


@cuda.jit
def _k_fill(mask, labels, holes, out):
    depth, height, width = mask.shape
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < depth * height * width:
        z, y, x = _zyx(i, height, width)
        out[z, y, x] = 1 if mask[z, y, x] != 0 else holes[labels[z, y, x]]
        i += step


def _inclusive_scan(data: Any) -> None:
    """Inclusive prefix sum of a 1-D int32 device array, in place."""
    blocks = (data.size + TPB - 1) // TPB
    sums = cuda.device_array(blocks, np.int32)
    _launch(_k_scan_block, 0, data, sums, blocks=blocks)
    if blocks > 1:
        _inclusive_scan(sums)
        _launch(_k_scan_add, 0, data, sums, blocks=blocks)


# ------------------------------------------------------------------ public functions


def window_level_cuda(volume: Any, center: float, width: float, *, out: Any = None) -> Any:
    """clip((v - (center - width/2)) / width, 0, 1) on the GPU (see ``window_level``)."""
    low, inv = c.window_params(center, width)
    src, on_host = _device_input(volume, "volume")
    res = _Output(volume, on_host, src.shape, np.float32, out)
    if src.size:
        _launch(_k_window_level, src.size, src, low, inv, res.device)
    return res.done()


def normalize_cuda(volume: Any, method: str = "zscore", *, out: Any = None) -> Any:
    """z-score or min-max normalisation on the GPU (see ``normalize``)."""
    if method not in ("zscore", "minmax"):
        raise c.KernelValueError(f"normalize method must be 'zscore' or 'minmax'; got {method!r}")
    src, on_host = _device_input(volume, "volume")
    res = _Output(volume, on_host, src.shape, np.float32, out)
    if src.size:
        stats = cuda.to_device(np.array([0.0, 0.0, np.inf, -np.inf]))
        if method == "zscore":
            _launch(_k_moments, src.size, src, stats, 0)
            _launch(_k_moments, src.size, src, stats, 1)
        else:
            _launch(_k_minmax, src.size, src, stats)
        _launch(_k_affine, src.size, src, stats, 0 if method == "zscore" else 1, res.device)
    return res.done()


def resample_cuda(volume: Any, spacing: Any, target_spacing: Any, *, out: Any = None) -> Any:
    """Trilinear resampling to ``target_spacing`` on the GPU (see ``resample``)."""
    src, on_host = _device_input(volume, "volume")
    shape = c.resample_shape(src.shape, spacing, target_spacing)
    s, t = c.as_triple(spacing, "spacing"), c.as_triple(target_spacing, "target spacing")
    tables = []
    for n, a, b, m in zip(src.shape, s, t, shape):
        tables += [cuda.to_device(v) for v in c.resample_tables(n, a, b, m)]
    res = _Output(volume, on_host, shape, np.float32, out)
    _launch(_k_resample, math.prod(shape), src, *tables, res.device)
    return res.done()


def gaussian_smooth_cuda(
    volume: Any,
    sigma: Any,
    spacing: Any = (1.0, 1.0, 1.0),
    *,
    truncate: float = 3.0,
    out: Any = None,
) -> Any:
    """Separable Gaussian, sigma in mm, edges 'nearest', on the GPU (see ``gaussian_smooth``)."""
    plan = c.gaussian_plan(sigma, spacing, truncate)
    src, on_host = _device_input(volume, "volume")
    res = _Output(volume, on_host, src.shape, np.float32, out)
    if src.size == 0:
        return res.done()
    if not plan:
        _launch(_k_copy, src.size, src, res.device)
        return res.done()
    tmp = cuda.device_array(src.shape, np.float32) if len(plan) > 1 else None
    for (axis, weights), into_out in zip(plan, c.pass_targets(len(plan))):
        dst = res.device if into_out else tmp
        _launch(_k_gaussian, src.size, src, cuda.to_device(weights), axis, dst)
        src = dst
    return res.done()


def threshold_cuda(
    volume: Any, lower: float | None = None, upper: float | None = None, *, out: Any = None
) -> Any:
    """uint8 mask of lower <= v <= upper on the GPU (see ``threshold``)."""
    lo, hi = c.threshold_bounds(lower, upper)
    src, on_host = _device_input(volume, "volume")
    res = _Output(volume, on_host, src.shape, np.uint8, out)
    if src.size:
        _launch(_k_threshold, src.size, src, lo, hi, res.device)
    return res.done()


def _label_device(mask: Any, connectivity: int, labels: Any) -> int:
    n = mask.size
    if n >= 2**31:
        raise c.KernelValueError("connected components: 2**31 voxels or more are not supported")
    offsets = cuda.to_device(c.neighbour_offsets(connectivity))
    parent = cuda.device_array(n, np.int32)
    _launch(_k_ccl_init, n, parent)
    _launch(_k_ccl_merge, n, mask, offsets, parent)
    ranks = cuda.device_array(n, np.int32)
    _launch(_k_ccl_roots, n, mask, parent, ranks)
    _inclusive_scan(ranks)
    _launch(_k_ccl_write, n, mask, parent, ranks, labels)
    return int(ranks[n - 1 : n].copy_to_host()[0])


def label_cuda(mask: Any, connectivity: int = 6, *, out: Any = None) -> tuple[Any, int]:
    """(int32 labels 1..n in raster order of first voxel, n) on the GPU (see ``label``)."""
    c.neighbour_offsets(connectivity)  # checks connectivity before any work
    src, on_host = _device_input(mask, "mask")
    res = _Output(mask, on_host, src.shape, np.int32, out)
    count = _label_device(src, connectivity, res.device) if src.size else 0
    return res.done(), count


def connected_components_cuda(
    mask: Any,
    connectivity: int = 6,
    *,
    keep_largest: bool = False,
    min_size: int = 0,
    out: Any = None,
) -> Any:
    """uint8 mask of the kept components on the GPU (see ``connected_components``)."""
    c.neighbour_offsets(connectivity)
    src, on_host = _device_input(mask, "mask")
    res = _Output(mask, on_host, src.shape, np.uint8, out)
    if src.size == 0:
        return res.done()
    labels = cuda.device_array(src.shape, np.int32)
    count = _label_device(src, connectivity, labels)
    sizes = _zeros(count + 1, np.int32)
    _launch(_k_sizes, src.size, labels, sizes)
    keep = c.keep_table(sizes.copy_to_host(), keep_largest, min_size)
    _launch(_k_keep, src.size, labels, cuda.to_device(keep), res.device)
    return res.done()


def fill_holes_cuda(mask: Any, connectivity: int = 6, *, out: Any = None) -> Any:
    """uint8 mask with the background components not touching the border filled, on the GPU
    (see ``fill_holes``)."""
    c.neighbour_offsets(connectivity)
    src, on_host = _device_input(mask, "mask")
    res = _Output(mask, on_host, src.shape, np.uint8, out)
    if src.size == 0:
        return res.done()
    background = cuda.device_array(src.shape, np.uint8)
    _launch(_k_invert, src.size, src, background)
    labels = cuda.device_array(src.shape, np.int32)
    count = _label_device(background, connectivity, labels)
    flags = _zeros(count + 1, np.int32)
    _launch(_k_border, src.size, labels, flags)
    holes = c.hole_table(count, np.flatnonzero(flags.copy_to_host()))
    _launch(_k_fill, src.size, src, labels, cuda.to_device(holes), res.device)
    return res.done()
