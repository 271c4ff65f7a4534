"""CPU kernels: Numba ``@njit(parallel=True)`` over C-contiguous float32 / uint8 arrays.

These are the raw kernels: arguments are already checked and converted by
``operators.kernels`` (C-contiguous, read-only inputs, preallocated outputs, host tables). They
are compiled on first call (see docs/kernels.md for the times and :func:`warmup`).

Caching: on by default. Compiled kernels are written to a per-user directory chosen by
:func:`dataflow.execution.jitcache.configure_numba_cache` (``NUMBA_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/dataflow/numba``), so the next process loads them instead of compiling; with
nothing writable, or ``DATAFLOW_NUMBA_CACHE=0``, every process compiles.
"""

from __future__ import annotations

from dataflow.execution.jitcache import configure_numba_cache

CACHE = configure_numba_cache()  # before numba is imported, so it reads NUMBA_CACHE_DIR

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

__all__ = [
    "affine",
    "apply_table",
    "ccl_labels",
    "fill_from_table",
    "gaussian_axis0",
    "gaussian_axis1",
    "gaussian_axis2",
    "label_sizes",
    "minmax",
    "resample",
    "squared_deviation",
    "threshold",
    "total",
    "window_level",
]

_PAR = {"parallel": True, "cache": CACHE, "nogil": True, "error_model": "numpy"}
_SER = {"cache": CACHE, "nogil": True, "error_model": "numpy"}


# ------------------------------------------------------------------ elementwise (flat 1-D views)


@njit(**_PAR)
def window_level(src, low, inv_width, out):
    """out = clip((src - low) / width, 0, 1); NaN stays NaN."""
    for i in prange(src.size):
        v = (src[i] - low) * inv_width
        if v < 0.0:
            v = 0.0
        elif v > 1.0:
            v = 1.0
        out[i] = v


@njit(**_PAR)
def affine(src, shift, scale, out):
    """out = (src - shift) * scale, computed in float64."""
    for i in prange(src.size):
        out[i] = (src[i] - shift) * scale


@njit(**_PAR)
def total(src):
    """sum(src) in float64."""
    s = 0.0
    for i in prange(src.size):
        s += np.float64(src[i])
    return s


@njit(**_PAR)
def squared_deviation(src, mean):
    """sum((src - mean)^2) in float64."""
    q = 0.0
    for i in prange(src.size):
        d = np.float64(src[i]) - mean
        q += d * d
    return q


@njit(**_PAR)
def minmax(src):
    lo = np.inf
    hi = -np.inf
    for i in prange(src.size):
        v = np.float64(src[i])
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@njit(**_PAR)
def threshold(src, lower, upper, out):
    """out = 1 where lower <= src <= upper (NaN: 0)."""
    for i in prange(src.size):
        v = src[i]
        out[i] = 1 if (v >= lower and v <= upper) else 0


# ------------------------------------------------------------------ resampling


@njit(**_PAR)
def resample(src, z0, z1, wz, y0, y1, wy, x0, x1, wx, out):
    """Trilinear: out[k, j, i] from the 8 voxels of the per-axis index/weight tables."""
    for k in prange(out.shape[0]):
        a0, a1 = z0[k], z1[k]
        fz = wz[k]
        gz = np.float32(1.0) - fz
        for j in range(out.shape[1]):
            b0, b1 = y0[j], y1[j]
            fy = wy[j]
            gy = np.float32(1.0) - fy
            for i in range(out.shape[2]):
                c0, c1 = x0[i], x1[i]
                fx = wx[i]
                gx = np.float32(1.0) - fx
                v00 = gx * src[a0, b0, c0] + fx * src[a0, b0, c1]
                v01 = gx * src[a0, b1, c0] + fx * src[a0, b1, c1]
                v10 = gx * src[a1, b0, c0] + fx * src[a1, b0, c1]
                v11 = gx * src[a1, b1, c0] + fx * src[a1, b1, c1]
                v0 = gy * v00 + fy * v01
                v1 = gy * v10 + fy * v11
                out[k, j, i] = gz * v0 + fz * v1


# ------------------------------------------------------------------ separable Gaussian
# One pass per axis, edge mode "nearest" (indices clamped). Accumulation in float32 in tap
# order, the same order as the CUDA kernels.


@njit(**_PAR)
def gaussian_axis0(src, w, out):
    depth, height, width = src.shape
    r = (w.size - 1) // 2
    for z in prange(depth):
        for y in range(height):
            for x in range(width):
                out[z, y, x] = 0.0
            for k in range(w.size):
                zz = min(max(z + k - r, 0), depth - 1)
                wk = w[k]
                for x in range(width):
                    out[z, y, x] += wk * src[zz, y, x]


@njit(**_PAR)
def gaussian_axis1(src, w, out):
    depth, height, width = src.shape
    r = (w.size - 1) // 2
    for z in prange(depth):
        for y in range(height):
            for x in range(width):
                out[z, y, x] = 0.0
            for k in range(w.size):
                yy = min(max(y + k - r, 0), height - 1)
                wk = w[k]
                for x in range(width):
                    out[z, y, x] += wk * src[z, yy, x]


@njit(**_PAR)
def gaussian_axis2(src, w, out):
    depth, height, width = src.shape
    r = (w.size - 1) // 2
    for z in prange(depth):
        for y in range(height):
            for x in range(width):
                acc = np.float32(0.0)
                for k in range(w.size):
                    xx = min(max(x + k - r, 0), width - 1)
                    acc += w[k] * src[z, y, xx]
                out[z, y, x] = acc


# ------------------------------------------------------------------ connected components
# Union-find over flat voxel indices with the invariant parent[i] <= i (a root is the first
# voxel of its component in raster order). Slabs of planes are unioned in parallel (each
# touches only its own entries), then the planes between slabs serially, then one raster pass
# numbers the roots 1, 2, ... in raster order — the numbering scipy.ndimage.label uses.


@njit(inline="always")
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps parent[i] <= i
        i = parent[i]
    return i


@njit(inline="always")
def _union(parent, a, b):
    a = _find(parent, a)
    b = _find(parent, b)
    if a < b:
        parent[b] = a
    elif b < a:
        parent[a] = b


@njit(inline="always")
def _union_plane(mask, offsets, parent, z, z_min):
    _, height, width = mask.shape
    for y in range(height):
        for x in range(width):
            if mask[z, y, x] == 0:
                continue
            i = (z * height + y) * width + x
            for k in range(offsets.shape[0]):
                zz = z + offsets[k, 0]
                yy = y + offsets[k, 1]
                xx = x + offsets[k, 2]
                if zz < z_min or yy < 0 or yy >= height or xx < 0 or xx >= width:
                    continue
                if mask[zz, yy, xx] != 0:
                    _union(parent, i, (zz * height + yy) * width + xx)


@njit(**_PAR)
def _ccl_slabs(mask, offsets, parent, slabs):
    depth = mask.shape[0]
    plane = mask.shape[1] * mask.shape[2]
    for s in prange(slabs):
        z0 = s * depth // slabs
        z1 = (s + 1) * depth // slabs
        for i in range(z0 * plane, z1 * plane):
            parent[i] = i
        for z in range(z0, z1):
            _union_plane(mask, offsets, parent, z, z0)


@njit(**_SER)
def _ccl_seams_and_number(mask, offsets, parent, slabs, out):
    depth = mask.shape[0]
    for s in range(1, slabs):
        z = s * depth // slabs
        _union_plane(mask, offsets, parent, z, z - 1)  # only dz = -1 rows reach z - 1
    flat = mask.ravel()
    n = 0
    for i in range(flat.size):
        if flat[i] == 0:
            out[i] = 0
        elif parent[i] == i:
            n += 1
            out[i] = n
        else:
            out[i] = out[parent[i]]  # parent[i] < i: already numbered with its root's label
    return n


def ccl_labels(mask: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> int:
    """Label ``mask`` (uint8 C-contiguous 3-D) into ``out`` (int32, same shape); returns n."""
    if mask.size == 0:
        return 0
    if mask.size >= 2**31:
        raise ValueError("connected components: volumes of 2**31 voxels or more are not supported")
    slabs = max(1, min(mask.shape[0], numba.get_num_threads()))
    parent = np.empty(mask.size, np.int32)
    _ccl_slabs(mask, offsets, parent, slabs)
    return int(_ccl_seams_and_number(mask, offsets, parent, slabs, out.reshape(-1)))


# ------------------------------------------------------------------ per-label tables


@njit(**_PAR)
def _label_sizes(labels, count, threads):
    """Voxels per label 0..count of a flat int32 label array (one histogram per thread).

    ``threads`` comes from the caller: ``numba.get_num_threads()`` inside a kernel is a dynamic
    global, which keeps the kernel out of Numba's on-disk cache.
    """
    n = labels.size
    chunk = (n + threads - 1) // threads
    partial = np.zeros((threads, count + 1), np.int64)
    for t in prange(threads):
        row = partial[t]
        for i in range(t * chunk, min(n, (t + 1) * chunk)):
            row[labels[i]] += 1
    sizes = np.zeros(count + 1, np.int64)
    for t in range(threads):
        sizes += partial[t]
    return sizes


def label_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxels per label 0..count of a flat int32 label array."""
    return _label_sizes(labels, count, max(1, numba.get_num_threads()))


@njit(**_PAR)
def apply_table(labels, table, out):
    """``out[i] = table[labels[i]]`` over flat arrays."""
    for i in prange(labels.size):
        out[i] = table[labels[i]]


@njit(**_PAR)
def fill_from_table(mask, labels, table, out):
    """``out[i] = 1`` where ``mask`` is set, else ``table[labels[i]]`` (flat arrays)."""
    for i in prange(labels.size):
        out[i] = 1 if mask[i] != 0 else table[labels[i]]
