"""CUDA kernels against the CPU kernels: under the Numba CUDA simulator, and on a real GPU.

The simulator has to be switched on before ``numba.cuda`` is first imported, so the simulated
checks run in a subprocess (this file run as a script, ``NUMBA_ENABLE_CUDASIM=1``) on tiny
volumes — the simulator runs every GPU thread as a Python thread. The same checks run on a real
GPU in this process on larger volumes (marked ``gpu``: skipped without one).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from deadlines import HANG

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# Volumes for the checks: tiny ones for the simulator (more than one 256-thread block, a
# partial last block), larger ones on a GPU (a several-level prefix sum in the labelling).
SIMULATED = {"volume": (5, 9, 13), "mask": (4, 9, 11)}
REAL = {"volume": (40, 56, 48), "mask": (48, 64, 72)}


# ------------------------------------------------------------------ the checks


def _host(x):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    return x.get()  # CuPy


def _compare(got, want, what: str, *, exact: bool = False, rtol: float = 1e-5) -> str:
    got = _host(got)
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{what}: got {got.dtype} {got.shape}, want {want.dtype} {want.shape}"
    if exact:
        bad = int(np.count_nonzero(got != want))
        return f"{what}: {bad} elements differ" if bad else ""
    if got.size == 0:
        return ""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want).max())
    return f"{what}: max error {err:.3g} (scale {scale:.3g})" if err > rtol * scale else ""


def _checks(K, cuda, shapes) -> dict[str, Callable[[], str]]:
    rng = np.random.default_rng(7)
    volume = (rng.normal(size=shapes["volume"]) * 200).astype(np.float32)
    mask = (rng.random(shapes["mask"]) < 0.3).astype(np.uint8)
    dense = (rng.random(shapes["mask"]) < 0.55).astype(np.uint8)
    spacing = (2.0, 0.7, 0.9)

    def window_level():
        want = K.window_level(volume, 10.0, 300.0)
        host = K.window_level(volume, 10.0, 300.0, device="cuda")
        dev = K.window_level(cuda.to_device(volume), 10.0, 300.0)  # auto: stays on the device
        on_device = "" if not isinstance(dev, np.ndarray) else "device input came back on host"
        return _compare(host, want, "host") or _compare(dev, want, "device") or on_device

    def normalize_zscore():
        return _compare(K.normalize(volume, device="cuda"), K.normalize(volume), "zscore")

    def normalize_minmax():
        want = K.normalize(volume, "minmax")
        return _compare(K.normalize(volume, "minmax", device="cuda"), want, "minmax")

    def normalize_constant():
        constant = np.full((2, 3, 4), 5.0, np.float32)
        zeros = np.zeros_like(constant)
        return _compare(
            K.normalize(constant, device="cuda"), zeros, "zscore", exact=True
        ) or _compare(K.normalize(constant, "minmax", device="cuda"), zeros, "minmax", exact=True)

    def threshold():
        want = K.threshold(volume, -50.0, 120.0)
        got = K.threshold(volume, -50.0, 120.0, device="cuda")
        return _compare(got, want, "bounded", exact=True) or _compare(
            K.threshold(volume, upper=0.0, device="cuda"), K.threshold(volume, upper=0.0), "open"
        )

    def resample():
        want = K.resample(volume, spacing, (1.0, 1.1, 0.5))
        got = K.resample(volume, spacing, (1.0, 1.1, 0.5), device="cuda")
        same = K.resample(volume, spacing, spacing, device="cuda")
        return _compare(got, want, "anisotropic") or _compare(same, volume, "identity", exact=True)

    def gaussian():
        want = K.gaussian_smooth(volume, (1.5, 0.0, 1.0), spacing)
        got = K.gaussian_smooth(volume, (1.5, 0.0, 1.0), spacing, device="cuda")
        iso = K.gaussian_smooth(volume, 1.0, device="cuda")
        return _compare(got, want, "two passes") or _compare(
            iso, K.gaussian_smooth(volume, 1.0), "three passes"
        )

    def label(connectivity, m):
        def check():
            want, n = K.label(m, connectivity)
            got, count = K.label(m, connectivity, device="cuda")
            wrong = f"n={count}, want {n}" if count != n else ""
            return wrong or _compare(got, want, f"labels {connectivity}", exact=True)

        return check

    def connected_components(connectivity):
        def check():
            problems = []
            for kwargs in (
                {"keep_largest": True},
                {"min_size": 3},
                {"keep_largest": True, "min_size": 4},
            ):
                want = K.connected_components(mask, connectivity, **kwargs)
                got = K.connected_components(mask, connectivity, device="cuda", **kwargs)
                problems.append(_compare(got, want, f"{connectivity} {kwargs}", exact=True))
            return "; ".join(p for p in problems if p)

        return check

    def fill_holes(connectivity):
        def check():
            problems = []
            for m in (mask, dense, 1 - dense):
                want = K.fill_holes(m, connectivity)
                got = K.fill_holes(m, connectivity, device="cuda")
                problems.append(_compare(got, want, f"fill {connectivity}", exact=True))
            return "; ".join(p for p in problems if p)

        return check

    def empty_and_background():
        empty = np.zeros((0, 3, 4), np.float32)
        background = np.zeros((3, 4, 5), np.uint8)
        labels, n = K.label(background, 26, device="cuda")
        return (
            _compare(K.window_level(empty, 0, 1, device="cuda"), empty, "empty window")
            or _compare(K.gaussian_smooth(empty, 1.0, device="cuda"), empty, "empty gaussian")
            or _compare(
                K.label(empty.astype(np.uint8), device="cuda")[0],
                empty.astype(np.int32),
                "empty label",
            )
            or (f"background: n={n}" if n else "")
            or _compare(labels, np.zeros(background.shape, np.int32), "background", exact=True)
        )

    def out_arguments():
        want = K.threshold(volume, 0.0)
        host_out = np.empty(volume.shape, np.uint8)
        got = K.threshold(volume, 0.0, out=host_out, device="cuda")
        dev_out = cuda.device_array(volume.shape, np.uint8)
        got_dev = K.threshold(cuda.to_device(volume), 0.0, out=dev_out)
        return (
            ("" if got is host_out else "host out= not returned")
            or _compare(host_out, want, "host out", exact=True)
            or ("" if got_dev is dev_out else "device out= not returned")
            or _compare(dev_out, want, "device out", exact=True)
        )

    return {
        "window_level": window_level,
        "normalize_zscore": normalize_zscore,
        "normalize_minmax": normalize_minmax,
        "normalize_constant": normalize_constant,
        "threshold": threshold,
        "resample": resample,
        "gaussian": gaussian,
        "label_6": label(6, mask),
        "label_26": label(26, mask),
        "label_6_dense": label(6, dense),
        "connected_components_6": connected_components(6),
        "connected_components_26": connected_components(26),
        "fill_holes_6": fill_holes(6),
        "fill_holes_26": fill_holes(26),
        "empty_and_background": empty_and_background,
        "out_arguments": out_arguments,
    }


CHECKS = [
    "window_level",
    "normalize_zscore",
    "normalize_minmax",
    "normalize_constant",
    "threshold",
    "resample",
    "gaussian",
    "label_6",
    "label_26",
    "label_6_dense",
    "connected_components_6",
    "connected_components_26",
    "fill_holes_6",
    "fill_holes_26",
    "empty_and_background",
    "out_arguments",
]


def run_checks(shapes) -> Iterator[tuple[str, str]]:
    """(check, problem) as each check ends ('' when the CUDA version agrees); any warning
    counts as a problem."""
    from numba import cuda

    from operators import kernels as K

    for name, check in _checks(K, cuda, shapes).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                problem = check()
            except Exception as exc:  # reported per check, with the exception
                problem = f"{type(exc).__name__}: {exc}"
        yield name, problem


def _lock_simulated_shared_arrays() -> None:
    """Work around a race in numba-cuda's simulator (seen in 0.30.4): a block's shared array is
    created lazily by whichever thread gets there first, with a check-then-set, so two threads
    arriving together can each get their own array and one's writes are lost (a wrong block
    sum, now and then). Same lookup as ``FakeCUDAShared.array``, made atomic by setdefault."""
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic/aligned: not used by our kernels
            return original(self, shape, dtype, alignment)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # as the original does
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        found = self._allocations.get(caller)
        if found is None:
            found = self._allocations.setdefault(caller, np.empty(shape, dtype))
        return found

    kernelapi.FakeCUDAShared.array = array


def main() -> None:  # the simulator side: python test_kernels_cuda.py
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
    sys.setswitchinterval(1e-4)  # simulated threads meet at barriers: switch often
    _lock_simulated_shared_arrays()
    for name, problem in run_checks(SIMULATED):
        print(json.dumps([name, problem]), flush=True)  # one line per check, as it ends


# ------------------------------------------------------------------ simulator (subprocess)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, str]:
    """{check: problem} from this file run under the simulator. Each check prints its line as
    it ends: the deadline is per check (no line for HANG seconds is a hang), not a limit on
    the whole run, which a busy machine stretches (all checks: ~40 s on one quiet core)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONWARNINGS": "error"}
    paths = [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]  # tests/: deadlines
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    errors = tmp_path_factory.mktemp("cudasim") / "stderr.txt"
    with open(errors, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=stderr, text=True,
        )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    results: dict[str, str] = {}
    try:
        while len(results) < len(CHECKS) and (reader.is_alive() or not lines.empty()):
            try:
                line = lines.get(timeout=HANG)
            except queue.Empty:
                pytest.fail(f"simulator hung: no check ended for {HANG:.0f} s after {results}")
            name, problem = json.loads(line)
            results[name] = problem
        assert proc.wait(HANG) == 0, errors.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return results


@pytest.mark.parametrize("check", CHECKS)
def test_cuda_kernel_matches_cpu_under_the_simulator(simulated, check):
    assert simulated[check] == ""


def test_every_check_ran_under_the_simulator(simulated):
    assert sorted(simulated) == sorted(CHECKS)


# ------------------------------------------------------------------ real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("check", CHECKS)
def test_cuda_kernel_matches_cpu_on_the_gpu(check):
    from numba import cuda

    from operators import kernels as K

    assert K.cuda_available()
    assert _checks(K, cuda, REAL)[check]() == ""


@pytest.mark.gpu
def test_cupy_arrays_stay_cupy_arrays_on_the_gpu():
    import cupy

    from operators import kernels as K

    volume = np.random.default_rng(3).normal(size=(20, 30, 40)).astype(np.float32)
    got = K.gaussian_smooth(cupy.asarray(volume), 1.2, (2.0, 1.0, 1.0))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(
        got.get(), K.gaussian_smooth(volume, 1.2, (2.0, 1.0, 1.0)), atol=1e-5
    )
    mask = K.threshold(cupy.asarray(volume), 0.5)
    labels, n = K.label(mask, 26)
    want, want_n = K.label(K.threshold(volume, 0.5), 26)
    assert isinstance(labels, cupy.ndarray) and n == want_n
    np.testing.assert_array_equal(labels.get(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_labelling_under_contention_on_the_gpu(connectivity):
    """Near the percolation threshold: huge components, many concurrent unions."""
    from operators import kernels as K

    mask = (np.random.default_rng(connectivity).random((96, 128, 128)) < 0.32).astype(np.uint8)
    got, n = K.label(mask, connectivity, device="cuda")
    want, want_n = K.label(mask, connectivity)
    assert n == want_n
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_stages_use_the_gpu_when_the_worker_has_one():
    from dataflow.stage import StageContext, Tensor
    from operators import kernels as K
    from operators.image_stages import Resample

    volume = np.random.default_rng(5).normal(size=(12, 20, 20)).astype(np.float32)
    stage = Resample(spacing=[1.0, 1.0, 1.0])
    ctx = StageContext(stage="resample", device=0)
    stage.prepare(ctx)
    assert stage.use_cuda
    ctx.begin_job("j", "j", metadata={"volume": {"spacing": [2.0, 0.5, 0.5]}})
    out = stage.execute(ctx, volume=volume)
    assert isinstance(out, Tensor) and out.metadata["spacing"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(out.array, K.resample(volume, (2.0, 0.5, 0.5), 1.0), atol=1e-5)


if __name__ == "__main__":
    main()
