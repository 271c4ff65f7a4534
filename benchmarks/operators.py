"""Benchmark of the medical operators (``operators``) against NumPy, SciPy and naive pydicom.

Run from the repository root::

    .venv/bin/python benchmarks/operators.py --quick                 # about two minutes
    .venv/bin/python benchmarks/operators.py --json benchmarks/results/operators-DATE.json

Measured, side by side in one process, round after round (the systems of a case take turns
within each round, in a rotating order; we report the median of the rounds):

* **Kernels** (``operators.kernels``, CPU versions: Numba ``parallel=True``, every core) on a
  noisy CT phantom (the analytic phantom of ``operators.dicom.phantom``, plus Gaussian noise of
  60 HU) of 256³ and 512 × 512 × 300 float32 voxels (``--quick``: 256³ only), against what a
  user would write instead: ``numpy`` (vectorised, with in-place operations where natural;
  single-threaded, as NumPy is), ``scipy`` (``scipy.ndimage``, single-threaded) and
  ``simpleitk`` when ``import SimpleITK`` works (its filters on an image converted beforehand,
  untimed). ``ours-1t`` is our kernel on one Numba thread: the part of the speed-up that is
  not parallelism. Kernels and their baselines:

  - ``window_level`` (centre 40, width 400): ``clip((v - low) / width, 0, 1)``;
  - ``normalize-zscore`` / ``normalize-minmax``: ``(v - mean) / std``, ``(v - min) / range``;
  - ``resample`` to 1 mm isotropic (trilinear): NumPy interpolates axis by axis (trilinear is
    separable); SciPy ``affine_transform(order=1)`` with the diagonal matrix target/spacing,
    which samples exactly where ``map_coordinates(order=1)`` would at the coordinates
    ``j * target / spacing``, without building them (``zoom`` spaces samples differently);
  - ``gaussian_smooth`` (sigma 1.5 mm, truncate 3, edge 'nearest'): NumPy adds shifted,
    weighted slices of an edge-padded copy per axis; SciPy ``gaussian_filter``;
  - ``threshold`` (-500 to 300 HU): ``(v >= lo) & (v <= hi)``;
  - ``label`` (26-connectivity) of the bone mask (>= 200 HU: the spine and the noise's
    speckle): ``scipy.ndimage.label``; NumPy has none;
  - ``connected_components`` keep-largest of that mask: ``label`` + ``np.bincount`` +
    ``argmax`` + ``labels == largest``.

  Every system's result is compared with ours in the same run (``max_abs_diff``; for labels
  and masks also the number of differing voxels). The first call of each system (round 0:
  page faults, caches; for us also the first use of the thread pool) is not timed into the
  median and is reported as ``first_ms``; the JIT compilation (``kernels.warmup()``, before
  any round) is reported separately (``jit-*`` records). Goal: at least 3x NumPy per kernel
  (for ``label`` and ``connected_components``, which NumPy cannot do, against SciPy).

* **Series -> volume**: ``operators.dicom.load_series`` against naive pydicom (``dcmread``
  every file, sort by position along the slice normal, stack ``pixel_array * slope +
  intercept`` as float32) on a shuffled phantom series of 300 (quick: 64) slices of 512²,
  uncompressed; the files are in the page cache (read once before the rounds). Slices/s and
  MB/s (file bytes).

* **ct-segmentation end to end**: when ``pipelines/ct-segmentation.yaml`` exists,
  ``dataflow.run.run_pipeline_file`` over 4 (quick: 2) generated oblique, shuffled phantom
  studies; series per minute (whole run, worker start included; and steady state, between the
  first and the last result). Without the file the case is skipped, and no record written.

CPU time (this process, all threads) is measured per call, so ``cores_used`` shows how
parallel each system is, and ``outside_cores`` the CPU that other processes used meanwhile (a
timed call during which they used more than 0.3 cores is made again, once).
``--json PATH`` writes the records (a list of dicts with ``case``, ``system``, ``value`` and
``unit`` and extra fields) and the run's provenance (machine, load before and after, Numba
threading layer and threads, versions, BLAS environment variables) next to it, as ``PATH``
with the suffix ``.provenance.json`` for ``.json``. The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is named operators.py: with its folder first on sys.path (as `python FILE` puts
# it), `import operators` would import this script. The repository root goes first and this
# folder last (for _common); spawned workers inherit the order.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]

import _common as common  # noqa: E402  (benchmarks/ is not a package)
import numpy as np  # noqa: E402

#: label -> (slices, rows = columns); "64^3" is for trying the benchmark out (--sizes 64^3)
SIZES = {"256^3": (256, 256), "512x512x300": (300, 512), "64^3": (64, 64)}
DEFAULT_SIZES = ("256^3", "512x512x300")
RUNS = {"256^3": (7, 3), "512x512x300": (5, 2), "64^3": (3, 2)}  # timed rounds (full, quick)
NOISE_HU = 60.0
WINDOW = (40.0, 400.0)  # centre, width
THRESHOLD = (-500.0, 300.0)
BONE_HU = 200.0  # the label / keep-largest mask: v >= BONE_HU
CONNECTIVITY = 26
SIGMA_MM = 1.5
TRUNCATE = 3.0
TARGET_MM = (1.0, 1.0, 1.0)
GOAL_VS_NUMPY = 3.0
#: A timed call during which other processes used more than this many cores (other people's
#: work on a shared machine) is made again, at most RETRIES times; the last attempt counts.
DISTURBED_CORES = 0.3
RETRIES = 1
LOAD_SLICES = (300, 64)  # full, quick; 512 x 512 each
LOAD_RUNS = (5, 3)
CT_STUDIES = {False: (6, 200, 512), True: (2, 48, 256)}  # quick -> (studies, slices, size)
CT_PIPELINE = ROOT / "pipelines" / "ct-segmentation.yaml"
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "DATAFLOW_NUMBA_CACHE",
    "PYTHONPATH",
)

now = time.perf_counter


# ------------------------------------------------------------------------------ timing


@dataclasses.dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # this process, every thread
    outside_cores: float  # CPU used by other processes meanwhile, in cores


def timed(fn: Callable[[], Any]) -> tuple[Any, Sample]:
    busy0, cpu0, t0 = common.machine_busy()[0], time.process_time(), now()
    result = fn()
    wall = now() - t0
    cpu = time.process_time() - cpu0
    outside = max(0.0, common.machine_busy()[0] - busy0 - cpu) / wall if wall > 0 else 0.0
    return result, Sample(wall, cpu, outside)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclasses.dataclass
class Case:
    """One measurement: the same work done by several systems, compared with ``ours``."""

    name: str  # the record's case
    group: str  # kernel | load
    kernel: str  # what is compared (window_level, ..., load-series)
    size: str
    systems: dict[str, Callable[[], Any]]
    compare: Callable[[Any, Any], dict]
    extra: dict = dataclasses.field(default_factory=dict)
    first: dict[str, Sample] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    checks: dict[str, dict] = dataclasses.field(default_factory=dict)

    def median_s(self, system: str) -> float:
        return median([s.wall_s for s in self.samples.get(system, [])])


class Quiet:
    """Waits before each round until the machine is idle for a moment (at most
    ``max_wait_s``); counts the rounds that started on a busy machine anyway."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s
        self.rounds = self.noisy = 0
        self.waited_s = 0.0
        self.repeated = 0  # timed calls disturbed by outside work, made again
        self.kept_disturbed = 0  # ... and still disturbed on the last attempt

    def wait(self) -> None:
        self.rounds += 1
        idle, waited = common.wait_for_idle(self.max_wait_s)
        self.noisy += not idle
        self.waited_s += waited

    def summary(self) -> dict:
        return {
            "rounds": self.rounds,
            "started_on_a_busy_machine": self.noisy,
            "wait_s": round(self.waited_s, 1),
            "disturbed_calls_repeated": self.repeated,
            "disturbed_calls_kept": self.kept_disturbed,
            "disturbed_threshold_cores": DISTURBED_CORES,
        }


def run_rounds(cases: list[Case], runs: int, quiet: Quiet, label: str) -> None:
    """Round 0 calls every system once (untimed into the median; the results are compared
    with ours), then ``runs`` timed rounds; within a round the systems of each case take
    turns in an order that rotates from round to round. A timed call disturbed by other
    processes (see DISTURBED_CORES) is made again, once."""
    for r in range(runs + 1):
        if r:
            quiet.wait()
        started = now()
        for case in cases:
            names = list(case.systems)
            order = names[r % len(names) :] + names[: r % len(names)]
            results = {}
            for system in order:
                for attempt in range(RETRIES + 1):
                    result, sample = timed(case.systems[system])
                    if r == 0 or sample.outside_cores <= DISTURBED_CORES:
                        break
                    if attempt == RETRIES:
                        quiet.kept_disturbed += 1
                        break
                    quiet.repeated += 1
                    result = None  # free it before the next attempt
                if r == 0:
                    case.first[system] = sample
                    results[system] = result
                else:
                    case.samples.setdefault(system, []).append(sample)
                del result
            if r == 0:
                for system, result in results.items():
                    if system != "ours":
                        case.checks[system] = case.compare(results["ours"], result)
            del results
        what = "warm-up round" if r == 0 else f"round {r}/{runs}"
        print(f"  {label}: {what} took {now() - started:.1f} s", flush=True)


# ------------------------------------------------------------------------------ kernels


def phantom_volume(slices: int, size: int, seed: int = 0) -> tuple[np.ndarray, tuple]:
    """The analytic CT phantom plus N(0, NOISE_HU²), float32, and its spacing [D, H, W] mm."""
    from operators.dicom.phantom import noisy_volume

    return noisy_volume(slices, size, NOISE_HU, seed)


def np_window_level(v: np.ndarray, center: float, width: float) -> np.ndarray:
    out = v - np.float32(center - width / 2)
    out *= np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def np_zscore(v: np.ndarray) -> np.ndarray:
    mean, std = v.mean(dtype=np.float64), v.std(dtype=np.float64)
    out = v - np.float32(mean)
    out *= np.float32(1.0 / std if std > 0 else 0.0)
    return out


def np_minmax(v: np.ndarray) -> np.ndarray:
    lo, hi = v.min(), v.max()
    out = v - lo
    out *= np.float32(1.0 / (float(hi) - float(lo)) if hi > lo else 0.0)
    return out


def np_threshold(v: np.ndarray, lower: float, upper: float) -> np.ndarray:
    return ((v >= np.float32(lower)) & (v <= np.float32(upper))).view(np.uint8)


def np_resample(v: np.ndarray, spacing: tuple, target: tuple, shape: tuple) -> np.ndarray:
    """Trilinear as three linear passes; output j of an axis samples input index j * t / s."""
    out = v
    for axis in range(3):
        n, m = v.shape[axis], shape[axis]
        x = np.minimum(np.arange(m) * (target[axis] / spacing[axis]), n - 1)
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (x - i0).astype(np.float32).reshape([m if a == axis else 1 for a in range(3)])
        a, b = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
        b -= a
        b *= w
        a += b
        out = a
    return out


def gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x * x / (sigma * sigma))
    return (phi / phi.sum()).astype(np.float32)


def np_gaussian(v: np.ndarray, sigma_vox: tuple, truncate: float) -> np.ndarray:
    """Separable: per axis, the weighted sum of shifted slices of an edge-padded copy."""
    out = v
    scratch = np.empty_like(v)
    for axis, sigma in enumerate(sigma_vox):
        w = gaussian_taps(sigma, truncate)
        r = (w.size - 1) // 2
        if r == 0:
            continue
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in range(3)], mode="edge")
        acc = np.zeros_like(v)
        for k in range(w.size):
            index = tuple(slice(k, k + v.shape[a]) if a == axis else slice(None) for a in range(3))
            np.multiply(padded[index], w[k], out=scratch)
            acc += scratch
        out = acc
    return out


def scipy_resample(v: np.ndarray, spacing: tuple, target: tuple, shape: tuple) -> np.ndarray:
    from scipy import ndimage

    matrix = np.array(target, np.float64) / np.array(spacing, np.float64)
    return ndimage.affine_transform(
        v, matrix, output_shape=shape, order=1, mode="nearest", prefilter=False
    )


def scipy_keep_largest(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == np.argmax(sizes)).view(np.uint8)


def diff_float(ours: np.ndarray, other: np.ndarray) -> dict:
    if ours.shape != other.shape:
        return {"shape_mismatch": [list(ours.shape), list(other.shape)]}
    return {"max_abs_diff": float(np.max(np.abs(ours - other.astype(np.float32))))}


def diff_mask(ours: np.ndarray, other: np.ndarray) -> dict:
    if ours.shape != other.shape:
        return {"shape_mismatch": [list(ours.shape), list(other.shape)]}
    differing = int(np.count_nonzero(ours != other))
    return {"max_abs_diff": float(min(differing, 1)), "differing_voxels": differing}


def diff_labels(ours: tuple, other: tuple) -> dict:
    (a, n), (b, m) = ours, other
    if a.shape != b.shape:
        return {"shape_mismatch": [list(a.shape), list(b.shape)]}
    differing = int(np.count_nonzero(a != b))
    d = float(np.max(np.abs(a.astype(np.int64) - b))) if differing else 0.0
    return {"max_abs_diff": d, "differing_voxels": differing, "components": [n, int(m)]}


def diff_partition(ours: tuple, other: tuple) -> dict:
    """For labels numbered in another order (SimpleITK): the count and the foreground."""
    (a, n), (b, m) = ours, other
    differing = int(np.count_nonzero((a > 0) != (b > 0)))
    return {"components": [n, int(m)], "foreground_differing_voxels": differing}


def simpleitk_systems(v: np.ndarray, mask: np.ndarray, spacing: tuple, shape: tuple) -> dict:
    """Per kernel, a SimpleITK callable on images made beforehand (untimed) that returns the
    output image (converted to NumPy by :func:`from_simpleitk`, untimed); empty when SimpleITK
    does not import."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return {}
    image = sitk.GetImageFromArray(v)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # ITK: x, y, z
    mask_image = sitk.GetImageFromArray(mask)
    lo, hi = WINDOW[0] - WINDOW[1] / 2, WINDOW[0] + WINDOW[1] / 2

    def resample() -> Any:
        f = sitk.ResampleImageFilter()
        f.SetOutputSpacing(tuple(reversed(TARGET_MM)))
        f.SetSize([int(n) for n in reversed(shape)])
        f.SetOutputOrigin(image.GetOrigin())
        f.SetOutputDirection(image.GetDirection())
        f.SetInterpolator(sitk.sitkLinear)
        return f.Execute(image)

    return {
        "window_level": lambda: sitk.IntensityWindowing(image, lo, hi, 0.0, 1.0),
        "normalize-zscore": lambda: sitk.Normalize(image),
        "normalize-minmax": lambda: sitk.RescaleIntensity(image, 0.0, 1.0),
        "resample": resample,
        # sigma in mm (the image has its spacing); an IIR filter, not a truncated kernel
        "gaussian_smooth": lambda: sitk.SmoothingRecursiveGaussian(image, [SIGMA_MM] * 3),
        "threshold": lambda: sitk.BinaryThreshold(image, *THRESHOLD, 1, 0),
        "label": lambda: sitk.ConnectedComponent(mask_image, True),  # fully connected: 26
        "connected_components": lambda: (
            sitk.RelabelComponent(sitk.ConnectedComponent(mask_image, True), 0, True) == 1
        ),
    }


def from_simpleitk(compare: Callable[[Any, Any], dict], kernel: str) -> Callable[[Any, Any], dict]:
    """``compare`` for a SimpleITK result: the image is copied to NumPy first."""

    def run(ours: Any, image: Any) -> dict:
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)
        if kernel == "label":  # numbered in another order: compare the count and foreground
            return diff_partition(ours, (array, int(array.max())))
        if kernel in ("threshold", "connected_components"):
            array = array.astype(np.uint8)
        return compare(ours, array)

    return run


def kernel_cases(size: str) -> list[Case]:
    from scipy import ndimage

    from operators import kernels as K

    slices, rows = SIZES[size]
    t0 = now()
    v, spacing = phantom_volume(slices, rows)
    v.flags.writeable = False  # as a stage's input from the store
    mask = (v >= np.float32(BONE_HU)).view(np.uint8)
    mask.flags.writeable = False
    print(f"  {size}: phantom volume made in {now() - t0:.1f} s, spacing {spacing} mm")
    shape = K.resample_shape(v.shape, spacing, TARGET_MM)
    sigma_vox = tuple(SIGMA_MM / s for s in spacing)
    structure = ndimage.generate_binary_structure(3, 3)
    center, width = WINDOW
    lower, upper = THRESHOLD
    table: dict[str, tuple[str, dict[str, Callable[[], Any]], Callable, dict]] = {
        "window_level": ("window_level", {
            "ours": lambda: K.window_level(v, center, width, device="cpu"),
            "numpy": lambda: np_window_level(v, center, width),
        }, diff_float, {"center": center, "width": width}),
        "normalize-zscore": ("normalize", {
            "ours": lambda: K.normalize(v, "zscore", device="cpu"),
            "numpy": lambda: np_zscore(v),
        }, diff_float, {}),
        "normalize-minmax": ("normalize", {
            "ours": lambda: K.normalize(v, "minmax", device="cpu"),
            "numpy": lambda: np_minmax(v),
        }, diff_float, {}),
        "resample": ("resample", {
            "ours": lambda: K.resample(v, spacing, TARGET_MM, device="cpu"),
            "numpy": lambda: np_resample(v, spacing, TARGET_MM, shape),
            "scipy": lambda: scipy_resample(v, spacing, TARGET_MM, shape),
        }, diff_float, {"target_mm": TARGET_MM, "output_shape": list(shape)}),
        "gaussian_smooth": ("gaussian_smooth", {
            "ours": lambda: K.gaussian_smooth(v, SIGMA_MM, spacing, truncate=TRUNCATE,
                                              device="cpu"),
            "numpy": lambda: np_gaussian(v, sigma_vox, TRUNCATE),
            "scipy": lambda: ndimage.gaussian_filter(v, sigma_vox, mode="nearest",
                                                     truncate=TRUNCATE),
        }, diff_float, {"sigma_mm": SIGMA_MM, "sigma_voxels": [round(s, 3) for s in sigma_vox],
                        "taps": [gaussian_taps(s, TRUNCATE).size for s in sigma_vox]}),
        "threshold": ("threshold", {
            "ours": lambda: K.threshold(v, lower, upper, device="cpu"),
            "numpy": lambda: np_threshold(v, lower, upper),
        }, diff_mask, {"lower": lower, "upper": upper}),
        "label": ("label", {
            "ours": lambda: K.label(mask, CONNECTIVITY, device="cpu"),
            "scipy": lambda: ndimage.label(mask, structure=structure),
        }, diff_labels, {"connectivity": CONNECTIVITY, "mask": f"v >= {BONE_HU} HU"}),
        "connected_components": ("connected_components", {
            "ours": lambda: K.connected_components(mask, CONNECTIVITY, keep_largest=True,
                                                   device="cpu"),
            "scipy": lambda: scipy_keep_largest(mask, structure),
        }, diff_mask, {"connectivity": CONNECTIVITY, "keep_largest": True}),
    }  # fmt: skip
    sitk = simpleitk_systems(v, mask, spacing, shape)
    cases = []
    for name, (kernel, systems, compare, extra) in table.items():
        systems["ours-1t"] = common.single_thread(systems["ours"])
        if name in sitk:
            systems["simpleitk"] = sitk[name]
            compare = _with_simpleitk(compare, from_simpleitk(compare, name))
        info = {"shape": list(v.shape), "spacing_mm": [round(s, 4) for s in spacing], **extra}
        info["jit_record"] = f"jit-{kernel}"
        cases.append(Case(f"{name}-{size}", "kernel", name, size, systems, compare, info))
    return cases


def _with_simpleitk(compare: Callable, simpleitk: Callable) -> Callable[[Any, Any], dict]:
    def run(ours: Any, other: Any) -> dict:
        plain = isinstance(other, (np.ndarray, tuple))
        return compare(ours, other) if plain else simpleitk(ours, other)

    return run


def jit_records() -> tuple[list[dict], dict]:
    """Time the Numba import and the compilation of every CPU kernel (``kernels.warmup``)."""
    t0 = now()
    from operators.kernels import cpu  # noqa: F401  (imports numba)

    imported = now() - t0
    from operators import kernels as K

    times = K.warmup(device="cpu")
    import numba

    records = [
        {"case": f"jit-{name}", "system": "ours", "value": round(s, 3), "unit": "s",
         "what": "first call on a 4x4x4 volume: Numba compilation (warmup())"}
        for name, s in times.items()
    ]  # fmt: skip
    records.append(
        {"case": "jit-numba-import", "system": "ours", "value": round(imported, 3), "unit": "s",
         "what": "import operators.kernels.cpu (imports numba)"}
    )  # fmt: skip
    numba_info = {
        "threading_layer": numba.threading_layer(),
        "num_threads": numba.get_num_threads(),
        "default_num_threads": numba.config.NUMBA_DEFAULT_NUM_THREADS,
        "version": numba.__version__,
    }
    return records, numba_info


# ------------------------------------------------------------------------------ series load


def naive_load(folder: Path) -> np.ndarray:
    """What a user writes with pydicom: read every file, sort along the normal, stack."""
    import pydicom

    datasets = [pydicom.dcmread(folder / name) for name in os.listdir(folder)]
    orientation = np.asarray(datasets[0].ImageOrientationPatient, np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, float)))
    return np.stack(
        [
            ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope)
            + np.float32(ds.RescaleIntercept)
            for ds in datasets
        ]
    )


def load_case(quick: bool, tmp: Path) -> Case:
    from operators.dicom import load_series
    from operators.dicom.phantom import write_ct_series

    slices = LOAD_SLICES[quick]
    t0 = now()
    series = write_ct_series(tmp / "series", slices=slices, size=512, shuffle=True)
    nbytes = sum(f.stat().st_size for f in series.files)
    for f in series.files:
        f.read_bytes()  # into the page cache
    print(f"  wrote {slices} slices of 512² ({nbytes / 1e6:.0f} MB) in {now() - t0:.1f} s")
    folder = series.directory
    return Case(
        f"load-series-{slices}x512x512",
        "load",
        "load-series",
        f"{slices}x512x512",
        {"ours": lambda: load_series(folder)[0], "pydicom-naive": lambda: naive_load(folder)},
        diff_float,
        {
            "slices": slices,
            "file_bytes": nbytes,
            "transfer_syntax": "Explicit VR Little Endian",
            "files_in_page_cache": True,
        },
    )


# ------------------------------------------------------------------------------ end to end


def run_ct_segmentation(
    pipeline: Path, studies: int, slices: int, size: int, tmp: Path
) -> tuple[list[dict], dict]:
    if not pipeline.exists():
        why = f"{pipeline.relative_to(ROOT) if pipeline.is_relative_to(ROOT) else pipeline}"
        why += " does not exist (yet)"
        print(f"\nct-segmentation end to end: skipped, {why}; no record written")
        return [], {"skipped": why}
    from dataflow.run import run_pipeline_file
    from operators.dicom.phantom import write_ct_series

    print(f"\nct-segmentation end to end: {studies} studies of {slices} x {size}² ({pipeline})")
    inputs = tmp / "studies"
    for k in range(studies):
        write_ct_series(inputs / f"study{k:02d}", slices=slices, size=size, oblique=True,
                        shuffle=True, seed=k)  # fmt: skip
    arrivals: list[float] = []
    t0 = now()
    try:
        summary = run_pipeline_file(
            pipeline, inputs, output=tmp / "ct-output", store_budget="4GiB",
            on_result=lambda result: arrivals.append(now()),
        )  # fmt: skip
    except Exception as exc:  # the pipeline is someone else's work in progress
        why = f"the run failed: {type(exc).__name__}: {exc}"
        print(f"  skipped: {why}; no record written")
        return [], {"skipped": why}
    wall = now() - t0
    failed = [f"{r.job}: {getattr(r, 'error', None)}" for r in summary.failed]
    stage_seconds = {k: round(s, 2) for k, s in summary.stage_seconds.items()}
    info = {"studies": studies, "slices": slices, "size": size, "failed": failed,
            "engine_seconds": round(summary.seconds, 2), "wall_s": round(wall, 2),
            "stage_seconds": stage_seconds}  # fmt: skip
    if failed:
        print(f"  {len(failed)} job(s) failed: {failed}")
    ok = studies - len(failed)
    if ok == 0:
        return [], {**info, "skipped": "every job failed"}
    steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) * 60 if len(arrivals) > 1 else None
    record = {
        "case": f"ct-segmentation-{slices}x{size}x{size}", "system": "engine",
        "value": round(ok / wall * 60, 3), "unit": "series/min",
        "steady_series_per_min": round(steady, 3) if steady else None,
        "first_result_s": round(arrivals[0] - t0, 2) if arrivals else None, **info,
    }  # fmt: skip
    print(f"  {record['value']:.2f} series/min (steady state {steady or float('nan'):.2f}),"
          f" {wall:.1f} s in all")  # fmt: skip
    return [record], info


# ------------------------------------------------------------------------------ records


def case_records(case: Case) -> list[dict]:
    records = []
    for system, samples in case.samples.items():
        wall = [s.wall_s for s in samples]
        cpu = median([s.cpu_s for s in samples])
        record = {
            "case": case.name,
            "system": system,
            "value": round(median(wall) * 1e3, 3),
            "unit": "ms",
            "group": case.group,
            "kernel": case.kernel,
            "size": case.size,
            "runs_ms": [round(w * 1e3, 3) for w in wall],
            "first_ms": round(case.first[system].wall_s * 1e3, 3),
            "cpu_ms": round(cpu * 1e3, 3),
            "cores_used": round(cpu / median(wall), 2),
            "outside_cores": round(median([s.outside_cores for s in samples]), 2),
            **case.extra,
            **({"vs_ours": case.checks[system]} if system in case.checks else {}),
        }
        records.append(record)
        if case.group == "load":
            seconds = median(wall)
            slices, nbytes = case.extra["slices"], case.extra["file_bytes"]
            for unit, value in (("slices/s", slices / seconds), ("MB/s", nbytes / 1e6 / seconds)):
                records.append({**record, "value": round(value, 2), "unit": unit})
    return records


def goal_records(cases: list[Case]) -> list[dict]:
    """Speed-ups (baseline median / ours median) per case, with the 3x-NumPy goal."""
    records = []
    for case in cases:
        ours = case.median_s("ours")
        for system in case.samples:
            if system == "ours":
                continue
            ratio = case.median_s(system) / ours
            record = {
                "case": f"speedup-{case.name}-vs-{system}",
                "system": "ours",
                "value": round(ratio, 3),
                "unit": "x",
                "kernel": case.kernel,
                "size": case.size,
                "against": system,
            }
            goal_baseline = "numpy" if "numpy" in case.samples else "scipy"
            if case.group == "kernel" and system == goal_baseline:
                record["goal"] = f">= {GOAL_VS_NUMPY:g}x {system}"
                record["met"] = ratio >= GOAL_VS_NUMPY
            records.append(record)
    return records


def print_tables(cases: list[Case], goals: list[dict]) -> None:
    systems = ("ours", "ours-1t", "numpy", "scipy", "simpleitk", "pydicom-naive")
    speedups = {(g["case"].split("-vs-")[0].removeprefix("speedup-"), g["against"]): g
                for g in goals}  # fmt: skip
    print("\nMedian ms per call (x: baseline / ours; diff: max |baseline - ours|)")
    head = f"  {'case':<34}" + "".join(f"{s:>14}" for s in systems)
    print(head)
    for case in cases:
        cells = []
        for s in systems:
            if s not in case.samples:
                cells.append(f"{'':>14}")
                continue
            cell = f"{case.median_s(s) * 1e3:.1f}"
            if (case.name, s) in speedups:
                cell += f" ({speedups[case.name, s]['value']:.1f}x)"
            cells.append(f"{cell:>14}")
        print(f"  {case.name:<34}" + "".join(cells))
        checks = ", ".join(f"{s}: {c}" for s, c in case.checks.items())
        print(f"  {'':<34}   diff vs ours: {checks}")
    print("\nGoals" if any("goal" in g for g in goals) else "")
    for g in goals:
        if "goal" in g:
            met = "met" if g["met"] else "NOT MET"
            print(f"  {g['case']:<58} {g['value']:>7.2f}x  {g['goal']:<14} {met}")


# ------------------------------------------------------------------------------ provenance


def _module_file(name: str) -> str | None:
    try:
        return str(Path(__import__(name).__file__).parent)
    except ImportError:
        return None


def provenance(args) -> dict:
    """Where and on what the run happens; taken at the start."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "operators").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    numpy_config: dict = {}
    try:
        config = np.show_config(mode="dicts")
        numpy_config = {
            "blas": config["Build Dependencies"]["blas"],
            "simd": config["SIMD Extensions"],
        }
    except (TypeError, KeyError, AttributeError):
        pass
    return {
        **common.run_header(),
        "operators_source_matches_commit": common.git("status", "--porcelain", "--", "operators")
        == "",
        "operators_source_sha256": digest.hexdigest(),
        **common.mode_and_argv(args),
        **common.machine(),
        **common.module_versions(("numpy", "scipy", "numba", "pydicom", "SimpleITK")),
        "numpy_config": numpy_config,
        "simpleitk_from": _module_file("SimpleITK"),  # not a dependency: wherever it was found
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "loadavg_at_start": list(os.getloadavg()),
        "parameters": {
            "noise_hu": NOISE_HU, "window": WINDOW, "threshold": THRESHOLD, "bone_hu": BONE_HU,
            "connectivity": CONNECTIVITY, "sigma_mm": SIGMA_MM, "truncate": TRUNCATE,
            "target_mm": TARGET_MM,
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256³ only, fewer runs (~3 minutes)")
    parser.add_argument("--json", metavar="PATH", help="write the records here")
    parser.add_argument(
        "--only", default="kernels,load,ct",
        help="comma-separated subset of: kernels, load, ct (default: all)",
    )  # fmt: skip
    parser.add_argument("--sizes", help=f"kernel volume sizes, of: {', '.join(SIZES)}")
    parser.add_argument("--runs", type=int, help="timed rounds (default: see RUNS, LOAD_RUNS)")
    parser.add_argument("--pipeline", type=Path, default=CT_PIPELINE, help="the ct pipeline")
    parser.add_argument(
        "--ct-studies", metavar="N,SLICES,SIZE",
        help="ct-segmentation studies: how many, slices, rows (default: 6,200,512; quick 2,48,256)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    sizes = args.sizes.split(",") if args.sizes else list(DEFAULT_SIZES[: 1 if args.quick else 2])
    meta = provenance(args)
    started = time.perf_counter()
    busy_at_start = common.machine_busy()
    print(
        f"operators benchmark ({meta['mode']}), {meta['cores']} cores, commit {meta['commit']:.10}"
    )
    if meta["loadavg_at_start"][0] > 0.5:
        print(f"warning: the machine is busy (load {meta['loadavg_at_start'][0]}): noisy")
    quiet = Quiet(max_wait_s=3.0 if args.quick else 10.0)
    records: list[dict] = []
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="operators-bench-") as tmp:
        if "kernels" in only:
            jit, meta["numba"] = jit_records()
            records += jit
            print("JIT: " + ", ".join(f"{r['case']} {r['value']:.2f} s" for r in jit))
            for size in sizes:
                size_cases = kernel_cases(size)
                run_rounds(size_cases, args.runs or RUNS[size][args.quick], quiet, size)
                cases += size_cases
                for case in size_cases:  # free the volumes and results of this size
                    case.systems.clear()
        if "load" in only:
            case = load_case(args.quick, Path(tmp))
            run_rounds([case], args.runs or LOAD_RUNS[args.quick], quiet, "series load")
            cases.append(case)
        if "ct" in only:
            studies = CT_STUDIES[args.quick]
            if args.ct_studies:
                studies = tuple(int(n) for n in args.ct_studies.split(","))
            ct_records, meta["ct_segmentation"] = run_ct_segmentation(
                args.pipeline, *studies, Path(tmp)
            )
            records += ct_records
    for case in cases:
        records += case_records(case)
    goals = goal_records(cases)
    records += goals
    print_tables(cases, goals)
    meta["quiet"] = quiet.summary()
    common.end_of_run(meta, started, busy_at_start)
    if args.json:
        common.write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
