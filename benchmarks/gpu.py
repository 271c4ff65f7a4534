"""GPU benchmark: our CUDA kernels against our CPU kernels, and GPU handoffs through the store.

Needs an NVIDIA GPU, numba-cuda and CuPy (``pip install -e '.[gpu]'``); without one it says so
and exits with status 2. Run from the repository root::

    python benchmarks/gpu.py --quick --json benchmarks/results/gpu-DATE.json

Measured in one process, round after round, the systems of a case taking turns (median of the
rounds; the first call of each system is reported apart as ``first_ms``):

* **Kernels** (``operators.kernels``) on the noisy CT phantom of ``benchmarks/operators.py``
  (256³; full: also 512 × 512 × 300 float32), three ways: ``cpu`` (Numba ``parallel=True`` on
  every core of the machine), ``cuda-resident`` (input already on the GPU, output left there:
  what a chain of GPU stages would pay per kernel) and ``cuda-host`` (NumPy in, NumPy out: the
  copies to and from the GPU included, which is what a GPU stage pays today, since the worker
  hands arrays between stages through host shared memory). Every CUDA result is compared with
  the CPU result of the same run (``max_abs_diff``, differing voxels).

* **Handoff between two processes** of an array that lives on the GPU, per size (4 KiB, 1 MiB,
  64 MiB, 256 MiB): ``cuda-ipc`` (``dataflow.store.cuda.DevicePool``: the producer writes into
  its pool, the consumer opens the CUDA IPC handle, cached per pool, and reads in place),
  against ``via-host`` (device -> host copy, the host store's shared memory, host -> device in
  the consumer: the path without IPC) and, for reference, ``host-shm`` (a host array through
  the host store, no GPU). Each is a round trip: the producer publishes, the consumer reads
  the object's first element on the GPU (or host) and answers through a pipe.

* **ct-segmentation end to end** (``dataflow.run.run_pipeline_file``): 3 studies of 200 × 512²
  (quick: 2 of 64 × 256²), the reference pipeline as it is (every stage on the CPU) against the
  same pipeline with ``requests: {gpu: 1}`` on its smoothing stage (the scheduler gives that
  stage's worker the GPU; the stage then runs its CUDA kernel, copying its input to the GPU
  and its output back). Wall time of the whole run (worker start included) and per study after
  the first; the two runs' label volumes (read back from the SEGs) are compared voxel by voxel.

Writes ``--json`` (records) and ``.provenance.json`` beside it (machine, GPU, versions, load).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]

import _common as common  # noqa: E402  (benchmarks/ is not a package)
import numpy as np  # noqa: E402

SIZES = {"256": (256, 256), "512x300": (300, 512)}  # name: (slices, rows = columns)
NOISE_HU = 60.0
HANDOFF_SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20, "256MiB": 256 << 20}
now = time.perf_counter


def gpu_or_exit() -> str:
    try:
        import cupy
        from numba import cuda
    except ImportError as exc:
        sys.exit(f"gpu.py needs numba-cuda and CuPy ({exc}); pip install -e '.[gpu]'")
    if not cuda.is_available() or cupy.cuda.runtime.getDeviceCount() == 0:
        print("no usable CUDA GPU here: nothing to measure", file=sys.stderr)
        sys.exit(2)
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def phantom_volume(slices: int, size: int, seed: int = 0) -> tuple[np.ndarray, tuple]:
    """The analytic CT phantom plus N(0, NOISE_HU²), float32, and its spacing [D, H, W] mm."""
    from operators.dicom.phantom import noisy_volume

    return noisy_volume(slices, size, NOISE_HU, seed)


def host(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(host(part) for part in x)
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return x


def compare(got: Any, want: Any) -> dict:
    got, want = host(got), host(want)
    if isinstance(want, tuple):  # label: (labels, count)
        return {"count_equal": int(got[1]) == int(want[1]), **compare(got[0], want[0])}
    if got.shape != want.shape:
        return {"shape_mismatch": [list(got.shape), list(want.shape)]}
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "differing": int(np.count_nonzero(diff > 1e-4 * max(1.0, float(np.abs(want).max())))),
    }


def kernel_records(size: str, rounds: int) -> list[dict]:
    import cupy
    from numba import cuda

    from operators import kernels as K

    slices, rows = SIZES[size]
    t0 = now()
    v, spacing = phantom_volume(slices, rows)
    mask = (v >= np.float32(200.0)).view(np.uint8)  # bone and the noise's speckle
    body = (v >= np.float32(-500.0)).view(np.uint8)
    print(f"  {size}: phantom made in {now() - t0:.1f} s", flush=True)
    dv, dmask, dbody = cupy.asarray(v), cupy.asarray(mask), cupy.asarray(body)
    target = (1.0, 1.0, 1.0)
    calls: dict[str, Callable[[Any, Any, Any, str], Any]] = {
        "window_level": lambda v, m, b, d: K.window_level(v, 40.0, 400.0, device=d),
        "normalize-zscore": lambda v, m, b, d: K.normalize(v, "zscore", device=d),
        "resample": lambda v, m, b, d: K.resample(v, spacing, target, device=d),
        "gaussian_smooth": lambda v, m, b, d: K.gaussian_smooth(v, 1.5, spacing, device=d),
        "threshold": lambda v, m, b, d: K.threshold(v, -500.0, 300.0, device=d),
        "label-26": lambda v, m, b, d: K.label(m, 26, device=d),
        "connected_components-keep-largest": lambda v, m, b, d: K.connected_components(
            m, 26, keep_largest=True, device=d
        ),
        "fill_holes": lambda v, m, b, d: K.fill_holes(b, 6, device=d),
    }
    records = []
    for kernel, call in calls.items():
        systems = {
            "cpu": lambda call=call: call(v, mask, body, "cpu"),
            "cuda-resident": lambda call=call: call(dv, dmask, dbody, "cuda"),
            "cuda-host": lambda call=call: call(v, mask, body, "cuda"),
        }
        times: dict[str, list[float]] = {name: [] for name in systems}
        first: dict[str, float] = {}
        results: dict[str, Any] = {}
        order = list(systems)
        for r in range(rounds + 1):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                cuda.synchronize()
                t = now()
                out = systems[name]()
                cuda.synchronize()
                elapsed = now() - t
                if r == 0:
                    first[name], results[name] = elapsed, out
                else:
                    times[name].append(elapsed)
                del out
        cpu_ms = statistics.median(times["cpu"]) * 1e3
        for name in systems:
            ms = statistics.median(times[name]) * 1e3
            record = {
                "case": "kernel",
                "size": size,
                "kernel": kernel,
                "system": name,
                "median_ms": round(ms, 3),
                "first_ms": round(first[name] * 1e3, 1),
                "speedup_vs_cpu": round(cpu_ms / ms, 2),
                "rounds": rounds,
            }
            if name != "cpu":
                record.update(compare(results[name], results["cpu"]))
            records.append(record)
            print(
                f"    {kernel:36s} {name:14s} {ms:9.2f} ms  x{cpu_ms / ms:6.1f}"
                f"  { ({k: record[k] for k in record if k in ('max_abs_diff', 'differing')}) }",
                flush=True,
            )
        del results
        cupy.get_default_memory_pool().free_all_blocks()
    return records


# ------------------------------------------------------------------ handoffs


def _consumer(store, conn) -> None:
    import cupy

    while True:
        msg = conn.recv()
        if msg is None:  # the end: this process's CUDA IPC handle cache
            from dataflow.store.cuda import ipc_cache_info

            conn.send(ipc_cache_info())
            return
        way, oid = msg
        view = store.get(oid, timeout=60)
        if way == "cuda-ipc":
            first = float(view.device_array()[0])  # a kernel on the GPU reads it in place
        elif way == "via-host":
            first = float(cupy.asarray(view.array)[0])  # host -> device, then read
        else:
            first = float(view.array[0])
        del view
        conn.send(first)


def handoff_records(sizes: list[str], rounds: int) -> list[dict]:
    import cupy

    from dataflow.store import Store
    from dataflow.store.cuda import DevicePool

    records = []
    spawn = mp.get_context("spawn")
    biggest = max(HANDOFF_SIZES[s] for s in sizes)
    with Store.start(budget=4 * biggest) as store:
        pool = DevicePool(store, 4 * biggest)
        parent, child = spawn.Pipe()
        consumer = spawn.Process(target=_consumer, args=(store, child), daemon=True)
        consumer.start()
        for size in sizes:
            n = HANDOFF_SIZES[size] // 4
            source = cupy.arange(n, dtype=cupy.float32) + 1
            host_source = source.get()

            def cuda_ipc(n: int = n, source: Any = source) -> str:
                with pool.create((n,), "float32") as obj:
                    obj.array[...] = source
                return obj.id

            def via_host(source: Any = source) -> str:
                return store.put(cupy.asnumpy(source))

            def host_shm(host_source: Any = host_source) -> str:
                return store.put(host_source)

            ways = {"cuda-ipc": cuda_ipc, "via-host": via_host, "host-shm": host_shm}
            times: dict[str, list[float]] = {w: [] for w in ways}
            order = list(ways)
            for r in range(rounds + 1):
                for way in order[r % 3 :] + order[: r % 3]:
                    cupy.cuda.Device().synchronize()
                    t = now()
                    oid = ways[way]()
                    parent.send((way, oid))
                    assert parent.recv() == 1.0
                    elapsed = now() - t
                    if r:
                        times[way].append(elapsed)
                    store.delete(oid)
            base = statistics.median(times["via-host"])
            for way, values in times.items():
                ms = statistics.median(values) * 1e3
                records.append(
                    {
                        "case": "handoff",
                        "size": size,
                        "bytes": HANDOFF_SIZES[size],
                        "system": way,
                        "median_ms": round(ms, 4),
                        "speedup_vs_via_host": round(base * 1e3 / ms, 2),
                        "rounds": rounds,
                    }
                )
                print(f"    {size:7s} {way:9s} {ms:9.3f} ms  x{base * 1e3 / ms:6.1f}", flush=True)
        parent.send(None)
        records.append({"case": "handoff-ipc-cache", "process": "consumer", **parent.recv()})
        consumer.join(60)
        pool.close()
    return records


def _seg_labels(folder: Path) -> dict[str, np.ndarray]:
    import pydicom

    labels = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.Modality == "SEG":
            labels[path.relative_to(folder).parts[0]] = ds.pixel_array
    return labels


def e2e_records(quick: bool, tmp: Path) -> list[dict]:
    import yaml

    from dataflow.run import run_pipeline_file
    from operators.dicom.phantom import write_ct_series

    studies, slices, size = (2, 64, 256) if quick else (3, 200, 512)
    pipeline = ROOT / "pipelines" / "ct-segmentation.yaml"
    spec = yaml.safe_load(pipeline.read_text())
    for op in spec["operators"]:
        if op["name"] == "smooth":
            op["requests"] = {"gpu": 1}
    gpu_pipeline = tmp / "ct-segmentation-gpu.yaml"
    gpu_pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    inputs = tmp / "studies"
    for k in range(studies):
        write_ct_series(inputs / f"study{k:02d}", slices=slices, size=size, oblique=True,
                        shuffle=True, seed=k)  # fmt: skip
    records, outputs = [], {}
    for system, path in (("cpu", pipeline), ("smooth-on-gpu", gpu_pipeline)):
        arrivals: list[float] = []
        t0 = now()
        summary = run_pipeline_file(
            path, inputs, output=tmp / system, store_budget="4GiB",
            on_result=lambda result, arrivals=arrivals: arrivals.append(now()),
        )  # fmt: skip
        wall = now() - t0
        outputs[system] = _seg_labels(tmp / system)
        steady = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None
        records.append({
            "case": "e2e", "system": system, "studies": studies, "slices": slices, "size": size,
            "wall_s": round(wall, 2), "per_study_steady_s": steady and round(steady, 3),
            "failed": len(summary.failed), "segs": len(outputs[system]),
            "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items()},
        })  # fmt: skip
        print(f"    e2e {system:14s} {wall:7.2f} s  steady {steady} s/study", flush=True)
    cpu, gpu = outputs["cpu"], outputs["smooth-on-gpu"]
    records.append({
        "case": "e2e-compare", "studies_compared": len(set(cpu) & set(gpu)),
        "differing_voxels": {k: int(np.count_nonzero(cpu[k] != gpu[k])) for k in cpu if k in gpu
                             and cpu[k].shape == gpu[k].shape},
    })  # fmt: skip
    print(f"    e2e compare {records[-1]}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256³ only, fewer rounds")
    parser.add_argument("--json", default=None, help="results file (and .provenance.json)")
    parser.add_argument("--only", choices=["kernels", "handoff", "e2e"], default=None)
    args = parser.parse_args()
    gpu = gpu_or_exit()
    started, busy = now(), common.machine_busy()
    meta = {
        **common.run_header(),
        **common.mode_and_argv(args),
        "machine": common.machine(),
        "gpu": gpu,
        "versions": common.module_versions(["numpy", "numba", "cupy", "pyarrow"]),
        "loadavg_at_start": list(__import__("os").getloadavg()),
    }
    print(f"GPU: {gpu}", flush=True)
    records: list[dict] = []
    if args.only in (None, "kernels"):
        from operators import kernels as K

        t = now()
        jit = {"cpu": K.warmup(device="cpu"), "cuda": K.warmup(device="cuda")}
        print(f"  JIT (both devices) {now() - t:.1f} s", flush=True)
        records.append(
            {"case": "jit", **{f"{d}_s": round(sum(v.values()), 2) for d, v in jit.items()}}
        )
        for size in ["256"] if args.quick else list(SIZES):
            records += kernel_records(size, 3 if args.quick else 5)
    if args.only in (None, "handoff"):
        sizes = list(HANDOFF_SIZES)
        records += handoff_records(sizes, 10 if args.quick else 30)
    if args.only in (None, "e2e"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="gpu-e2e-") as tmp:
            records += e2e_records(args.quick, Path(tmp))
    meta.update(common.run_footer(started, busy))
    if args.json:
        common.write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
