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

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

__all__ = [
    "affine",
    "border_run_labels",
    "gaussian_axis0",
    "gaussian_axis1",
    "gaussian_axis2",
    "gaussian_fused",
    "minmax",
    "paint",
    "paint_runs",
    "resample",
    "run_label_sizes",
    "runs",
    "squared_deviation",
    "threshold",
    "total",
    "value_counts",
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


@njit(**_PAR)
def paint(labels, mask, value, within, out):
    """out = value where mask != 0 and (within < 0 or labels == within), labels elsewhere."""
    for i in prange(labels.size):
        v = labels[i]
        out[i] = value if mask[i] != 0 and (within < 0 or v == within) else v


@njit(**_PAR)
def value_counts(src, chunks):
    """How many of each value 0..255 the uint8 ``src`` holds: a histogram per chunk, summed."""
    counts = np.zeros((chunks, 256), np.int64)
    n = src.size
    for c in prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            counts[c, src[i]] += 1
    return counts.sum(axis=0)


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


@njit(inline="always")
def _axpy(a, x, y):
    for i in range(y.size):
        y[i] += a * x[i]


@njit(**_PAR)
def gaussian_fused(src, w0, w1, w2, chunks, out):
    """The three passes above in one sweep over z: slice z along axis 0, then that slice along
    axis 1 and axis 2, through two slice-sized buffers per chunk of slices instead of a
    volume-sized temporary (no page faults on a fresh 200 MB, one write of ``out``). Each voxel
    gets the same float32 operations in the same order as the three passes: the same result,
    bit for bit."""
    depth, height, width = src.shape
    r0, r1, r2 = (w0.size - 1) // 2, (w1.size - 1) // 2, (w2.size - 1) // 2
    for c in prange(chunks):
        a = np.empty((height, width), np.float32)
        b = np.empty((height, width), np.float32)
        for z in range(c * depth // chunks, (c + 1) * depth // chunks):
            for y in range(height):
                a[y, :] = 0.0
                for k in range(w0.size):
                    _axpy(w0[k], src[min(max(z + k - r0, 0), depth - 1), y], a[y])
            for y in range(height):
                b[y, :] = 0.0
                for k in range(w1.size):
                    _axpy(w1[k], a[min(max(y + k - r1, 0), height - 1)], b[y])
            for y in range(height):
                for x in range(width):
                    acc = np.float32(0.0)
                    for k in range(w2.size):
                        xx = min(max(x + k - r2, 0), width - 1)
                        acc += w2[k] * b[y, xx]
                    out[z, y, x] = acc


# ------------------------------------------------------------------ connected components
# Run-based union-find. A run is a maximal stretch of foreground along the last axis (x);
# runs are numbered in raster order of their first voxel, row (z, y) by row. Only runs are
# unioned, never voxels: each run with the runs of the already-visited rows next to it (the
# rows of ``_common.row_neighbours``: (dz, dy, ext), ext = 1 where diagonal neighbours along x
# count, so runs touching at a corner join). The forest keeps parent[r] <= r, so a root is the
# first run of its component in raster order and holds the component's first voxel: numbering
# the roots 1, 2, ... in run order is scipy.ndimage.label's numbering. Slabs of planes are
# unioned in parallel (each touches only its own runs), then the planes between the slabs.


@njit(**_PAR)
def _count_runs(mask, counts):
    """counts[row] = the number of runs of nonzero voxels in each row (z, y) of ``mask``."""
    depth, height, width = mask.shape
    for r in prange(depth * height):
        z = r // height
        y = r - z * height
        n = 0
        previous = False
        for x in range(width):
            v = mask[z, y, x] != 0
            if v and not previous:
                n += 1
            previous = v
        counts[r] = n


@njit(**_PAR)
def _fill_runs(mask, row_start, starts, ends):
    """Each row's runs as [start, end) along x, stored from row_start[row] on."""
    depth, height, width = mask.shape
    for r in prange(depth * height):
        z = r // height
        y = r - z * height
        k = row_start[r]
        x = 0
        while x < width:
            if mask[z, y, x] != 0:
                s = x
                while x < width and mask[z, y, x] != 0:
                    x += 1
                starts[k] = s
                ends[k] = x
                k += 1
            else:
                x += 1


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
def _union_rows(parent, starts, ends, a0, a1, b0, b1, ext):
    """Union the runs a0..a1 of one row with the runs b0..b1 of a neighbour row they touch: a
    merge walk over two sorted lists, each pair looked at once."""
    i = a0
    j = b0
    while i < a1 and j < b1:
        if ends[j] + ext <= starts[i]:
            j += 1
        elif ends[i] + ext <= starts[j]:
            i += 1
        else:
            _union(parent, i, j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1


@njit(**_SER)  # not inlined: compiled once for the slabs and the seams
def _union_plane(row_start, starts, ends, parent, neighbours, height, z, z_min):
    for y in range(height):
        r = z * height + y
        a0 = row_start[r]
        a1 = row_start[r + 1]
        if a0 == a1:
            continue
        for k in range(neighbours.shape[0]):
            zz = z + neighbours[k, 0]
            yy = y + neighbours[k, 1]
            if zz < z_min or yy < 0 or yy >= height:
                continue
            q = zz * height + yy
            b0 = row_start[q]
            b1 = row_start[q + 1]
            _union_rows(parent, starts, ends, a0, a1, b0, b1, neighbours[k, 2])


@njit(**_PAR)
def _union_slabs(row_start, starts, ends, parent, neighbours, depth, height, slabs):
    for s in prange(slabs):
        z0 = s * depth // slabs
        z1 = (s + 1) * depth // slabs
        for i in range(row_start[z0 * height], row_start[z1 * height]):
            parent[i] = i
        for z in range(z0, z1):
            _union_plane(row_start, starts, ends, parent, neighbours, height, z, z0)


@njit(**_SER)
def _join_and_number(row_start, starts, ends, parent, neighbours, depth, height, slabs):
    """Join the slabs, then number the roots 1..n in run order (parent[r] < r is numbered
    before r, so one pass does). Returns n; ``parent`` then holds each run's label."""
    for s in range(1, slabs):
        z = s * depth // slabs
        _union_plane(row_start, starts, ends, parent, neighbours, height, z, z - 1)
    n = 0
    for r in range(parent.size):
        p = parent[r]
        if p == r:
            n += 1
            parent[r] = n
        else:
            parent[r] = parent[p]  # p < r: already replaced by its root's label
    return n


def runs(mask: np.ndarray, neighbours: np.ndarray, threads: int) -> tuple:
    """The runs of ``mask`` (uint8, C-contiguous, 3-D) and their components, using at most
    ``threads`` slabs: (row_start int64 [rows + 1], starts int32, ends int32, label int32 per
    run, n). Row (z, y)'s runs are row_start[z * height + y] up to the next row's start."""
    if mask.size >= 2**31:
        raise ValueError("connected components: volumes of 2**31 voxels or more are not supported")
    depth, height, _ = mask.shape
    counts = np.zeros(depth * height + 1, np.int64)
    _count_runs(mask, counts[1:])
    row_start = np.cumsum(counts)
    total_runs = int(row_start[-1])
    starts = np.empty(total_runs, np.int32)
    ends = np.empty(total_runs, np.int32)
    _fill_runs(mask, row_start, starts, ends)
    labels = np.empty(total_runs, np.int32)
    slabs = max(1, min(depth, threads))
    _union_slabs(row_start, starts, ends, labels, neighbours, depth, height, slabs)
    n = _join_and_number(row_start, starts, ends, labels, neighbours, depth, height, slabs)
    return row_start, starts, ends, labels, int(n)


@njit(**_PAR)
def paint_runs(row_start, starts, ends, values, background, out):
    """out[z, y, x] = values[run] on each run's voxels, ``background`` elsewhere."""
    depth, height, width = out.shape
    for r in prange(depth * height):
        z = r // height
        y = r - z * height
        x = 0
        for k in range(row_start[r], row_start[r + 1]):
            s = starts[k]
            while x < s:
                out[z, y, x] = background
                x += 1
            v = values[k]
            e = ends[k]
            while x < e:
                out[z, y, x] = v
                x += 1
        while x < width:
            out[z, y, x] = background
            x += 1


@njit(**_SER)
def run_label_sizes(starts, ends, labels, count):
    """Voxels per label 0..count (label 0, the background, stays 0)."""
    sizes = np.zeros(count + 1, np.int64)
    for k in range(labels.size):
        sizes[labels[k]] += ends[k] - starts[k]
    return sizes


@njit(**_SER)
def border_run_labels(row_start, starts, ends, labels, shape, count):
    """uint8 per label 0..count: 1 where the component touches a face of the volume."""
    depth, height, width = shape
    touches = np.zeros(count + 1, np.uint8)
    for r in range(depth * height):
        z = r // height
        y = r - z * height
        edge_row = z == 0 or z == depth - 1 or y == 0 or y == height - 1
        for k in range(row_start[r], row_start[r + 1]):
            if edge_row or starts[k] == 0 or ends[k] == width:
                touches[labels[k]] = 1
    return touches
