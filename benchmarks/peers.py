"""Benchmark against the peers a user would pick instead: MONAI Deploy App SDK for the whole job,
SciPy and SimpleITK for the connected-component kernels.

Run from the repository root (the project's venv, with the ``bench`` extra for SimpleITK)::

    .venv/bin/python benchmarks/peers.py --json benchmarks/results/peers-DATE.json
    .venv/bin/python benchmarks/peers.py --only kernels --quick      # a minute, no MONAI

Two parts, each measured side by side in one run, the systems taking turns round after round
(the order rotates each round; round 0 is a warm-up, reported apart, not in any median):

* **kernels**: ``label``, ``connected_components`` (keep the largest) and ``fill_holes`` of
  ``operators.kernels`` (CPU, Numba's default threads, and ``ours-1t`` on one thread) against
  ``scipy.ndimage`` (``label``; ``label`` + ``bincount`` + ``argmax``; ``binary_fill_holes``)
  and SimpleITK (``ConnectedComponent``; ``RelabelComponent`` == 1; ``BinaryFillhole``), in
  this process, on the masks of the phantom that ct-segmentation meets: the tissue mask (the
  phantom smoothed with sigma 1 mm, >= -500 HU: the body, one giant component, and the table)
  for label and connected_components (26-connectivity), and the body (its largest component)
  for fill_holes (6-connected background), at 64 x 192^2 and 200 x 512^2 voxels (``--quick``:
  the small one only). Every system's result is compared with ours: labels as partitions (the
  numbering may differ), masks voxel by voxel.

* **pipelines** (skipped when MONAI Deploy's venv cannot be built): ``dataflow run
  pipelines/ct-segmentation.yaml`` (a new process, as a user runs it) against the same job
  built from MONAI Deploy App SDK 4.0.0's stock operators (``benchmarks/peers_monai_app.py``,
  a new process with MONAI's own venv), on the same generated studies (oblique, shuffled
  phantoms): one 64 x 192^2 study one-shot; one 200 x 512^2 study one-shot; ten 64 x 192^2
  studies, ours in one run and MONAI in one process looping over them; the steady state,
  seconds per study between the first and the last result of the ten; and the small study
  again with an empty Numba cache for ours (its first run on a machine: every kernel
  compiled). Wall time of the whole command. Ratios are paired per round: ours /
  MONAI, below 1 we are faster. The SEGs are compared frame by frame (by referenced source
  instance): Dice per segment.

MONAI Deploy's venv is built on first use in ``benchmarks/.peers/monai-venv`` (gitignored):
``pip install torch==2.13.0`` first (the CPU wheel on this machine's disk, not a CUDA build from
the index), then ``monai-deploy-app-sdk==4.0.0 highdicom scipy monai pydicom``; a failed install
is recorded with pip's last lines and the pipelines part skipped. Studies are generated into
``benchmarks/.peers/studies`` once (the phantom is deterministic per seed).

``--json PATH`` writes the records and, next to it, the provenance (machine, load average and
busy CPU at the start and the end, versions, commit). Run it under
alone on the machine (e.g. under a ``flock`` the other benchmark runs share); it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    machine,
    machine_busy,
    module_versions,
    run_footer,
    run_header,
    single_thread,
    write_results,
)

PEERS = HERE / ".peers"
MONAI_VENV = PEERS / "monai-venv"
MONAI_PYTHON = MONAI_VENV / "bin" / "python"
MONAI_APP = HERE / "peers_monai_app.py"
STUDIES = PEERS / "studies"
MONAI_PACKAGES = ["monai-deploy-app-sdk==4.0.0", "highdicom", "scipy", "monai", "pydicom"]
SEGMENTS = {1: "body", 2: "lung", 3: "bone"}


def now() -> float:
    return time.perf_counter()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rotate(items: list, r: int) -> list:
    return items[r % len(items) :] + items[: r % len(items)]


# ------------------------------------------------------------------------------ kernels


def body_masks(slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, body) uint8 masks of the phantom, as ct-segmentation's stages make them."""
    from operators import kernels
    from operators.dicom.phantom import hu_at, scan_geometry

    geometry = scan_geometry(slices, size)
    volume = np.empty((slices, size, size), np.float32)
    rng = np.random.default_rng(0)
    for k in range(slices):
        volume[k] = hu_at(geometry.points(k))
        volume[k] += rng.standard_normal((size, size), dtype=np.float32) * np.float32(20.0)
    spacing = (geometry.slice_spacing, *geometry.pixel_spacing)
    smooth = kernels.gaussian_smooth(volume, 1.0, spacing)
    tissue = kernels.threshold(smooth, -500.0)
    body = kernels.connected_components(tissue, 26, keep_largest=True)
    return tissue, body


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label volumes split the voxels the same way (numbering aside)."""
    a, b = a.reshape(-1).astype(np.int64), b.reshape(-1).astype(np.int64)
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(a * (int(b.max()) + 1) + b)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def kernel_systems(tissue: np.ndarray, body: np.ndarray) -> dict[str, dict[str, Callable]]:
    """Per kernel: {system: () -> result as NumPy (converted untimed for SimpleITK)}."""
    from scipy import ndimage

    from operators import kernels

    full = ndimage.generate_binary_structure(3, 3)
    faces = ndimage.generate_binary_structure(3, 1)

    def scipy_largest() -> np.ndarray:
        labels = ndimage.label(tissue, full)[0]
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return (labels == int(np.argmax(sizes))).view(np.uint8)

    systems = {
        "label": {
            "ours": lambda: kernels.label(tissue, 26)[0],
            "scipy": lambda: ndimage.label(tissue, full)[0],
        },
        "connected_components": {
            "ours": lambda: kernels.connected_components(tissue, 26, keep_largest=True),
            "scipy": scipy_largest,
        },
        "fill_holes": {
            "ours": lambda: kernels.fill_holes(body, 6),
            "scipy": lambda: ndimage.binary_fill_holes(body, faces).view(np.uint8),
        },
    }
    try:
        import SimpleITK as sitk
    except ImportError:
        return systems
    tissue_image, body_image = sitk.GetImageFromArray(tissue), sitk.GetImageFromArray(body)
    systems["label"]["simpleitk"] = lambda: sitk.ConnectedComponent(tissue_image, True)
    systems["connected_components"]["simpleitk"] = lambda: (
        sitk.RelabelComponent(sitk.ConnectedComponent(tissue_image, True), 0, True) == 1
    )
    systems["fill_holes"]["simpleitk"] = lambda: sitk.BinaryFillhole(body_image, False, 1)
    return systems


def as_array(result: Any) -> np.ndarray:
    if isinstance(result, np.ndarray):
        return result
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(result)


def kernel_records(sizes: list[tuple[int, int]], rounds: int) -> list[dict]:
    from operators import kernels

    jit = kernels.warmup("label", "connected_components", "fill_holes", "threshold")
    print(f"kernels compiled or loaded in {sum(jit.values()):.1f} s")
    records = []
    for slices, size in sizes:
        shape = f"{slices}x{size}x{size}"
        t0 = now()
        tissue, body = body_masks(slices, size)
        print(f"{shape}: masks made in {now() - t0:.1f} s (tissue {tissue.mean():.1%} of voxels)")
        for kernel, systems in kernel_systems(tissue, body).items():
            systems = {
                "ours": systems["ours"],
                "ours-1t": single_thread(systems["ours"]),
                **{k: v for k, v in systems.items() if k != "ours"},
            }
            times: dict[str, list[float]] = {name: [] for name in systems}
            first: dict[str, float] = {}
            results: dict[str, np.ndarray] = {}
            for r in range(rounds + 1):
                for name in rotate(list(systems), r):
                    start = now()
                    result = systems[name]()
                    elapsed = now() - start
                    if r == 0:
                        first[name] = elapsed
                        results[name] = as_array(result)
                    else:
                        times[name].append(elapsed)
            ours = results["ours"]
            for name, runs in times.items():
                other = results[name]
                if kernel == "label":
                    agrees = same_partition(ours, other)
                else:
                    agrees = bool(np.array_equal(ours, other.astype(np.uint8)))
                record = {
                    "case": f"kernel-{kernel}",
                    "shape": shape,
                    "system": name,
                    "value": round(median(runs) * 1e3, 3),
                    "unit": "ms",
                    "runs_ms": [round(t * 1e3, 3) for t in runs],
                    "first_ms": round(first[name] * 1e3, 3),
                    "same_result_as_ours": agrees,
                }
                if name not in ("ours", "ours-1t"):
                    record["ratio_ours_over_it"] = round(median(times["ours"]) / median(runs), 4)
                records.append(record)
            line = ", ".join(f"{n} {median(t) * 1e3:.1f} ms" for n, t in times.items())
            print(f"  {kernel}: {line}")
    return records


CONTENTION_KERNELS = ("gaussian_smooth", "threshold", "connected_components", "fill_holes")


def contention_worker(policy: str, reps: int) -> None:
    """One process of the contention case: make the 64 x 192^2 inputs, say "ready", wait for
    "go" on stdin, time each kernel ``reps`` times, print the mean ms per kernel as JSON."""
    from operators import kernels
    from operators.dicom.phantom import hu_at, scan_geometry

    if policy == "all-threads":
        kernels.SERIAL_BELOW_VOXELS = 0  # the old behaviour: every input on every thread
    geometry = scan_geometry(64, 192)
    volume = np.stack([hu_at(geometry.points(k)) for k in range(64)]).astype(np.float32)
    spacing = (geometry.slice_spacing, *geometry.pixel_spacing)
    kernels.warmup(*CONTENTION_KERNELS)
    smooth = kernels.gaussian_smooth(volume, 1.0, spacing)
    tissue = kernels.threshold(smooth, -500.0)
    body = kernels.connected_components(tissue, 26, keep_largest=True)
    calls = {
        "gaussian_smooth": lambda: kernels.gaussian_smooth(volume, 1.0, spacing),
        "threshold": lambda: kernels.threshold(smooth, -500.0),
        "connected_components": lambda: kernels.connected_components(tissue, 26, keep_largest=True),
        "fill_holes": lambda: kernels.fill_holes(body, 6),
    }
    print("ready", flush=True)
    sys.stdin.readline()
    result = {}
    for name, call in calls.items():
        start = now()
        for _ in range(reps):
            call()
        result[name] = (now() - start) / reps * 1e3
    print(json.dumps(result), flush=True)


def contention_records(rounds: int, reps: int = 30) -> list[dict]:
    """Kernels on 64 x 192^2 in one process alone and in two processes at once (as two kernel
    stages of a pipeline on this machine's cores), with inputs this small on one thread
    ("sized", the default) or on every thread ("all-threads")."""
    configs = [(policy, procs) for policy in ("sized", "all-threads") for procs in (1, 2)]
    times: dict[tuple, dict[str, list[float]]] = {c: {k: [] for k in CONTENTION_KERNELS}
                                                  for c in configs}  # fmt: skip
    for r in range(rounds):
        for policy, procs in rotate(configs, r):
            cmd = [sys.executable, __file__, "--contention-worker", policy, str(reps)]
            workers = [subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
                       for _ in range(procs)]  # fmt: skip
            for w in workers:
                assert w.stdout is not None and w.stdout.readline().strip() == "ready"
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            for w in workers:
                out, _ = w.communicate()
                for kernel, ms in json.loads(out.strip().splitlines()[-1]).items():
                    times[(policy, procs)][kernel].append(ms)
        print(f"  contention round {r + 1}/{rounds} done", flush=True)
    records = []
    for (policy, procs), per_kernel in times.items():
        for kernel, values in per_kernel.items():
            records.append({"case": f"contention-{kernel}", "shape": "64x192x192",
                            "system": policy, "processes": procs,
                            "value": round(median(values), 3), "unit": "ms per call",
                            "runs_ms": [round(v, 3) for v in values]})  # fmt: skip
    for kernel in CONTENTION_KERNELS:
        print(f"  {kernel}: " + ", ".join(
            f"{p} x{n} {median(times[(p, n)][kernel]):.1f} ms" for p, n in configs))  # fmt: skip
    return records


# ------------------------------------------------------------------------------ MONAI Deploy


def build_monai_venv() -> dict:
    """Create MONAI Deploy's venv if it is not there; {"ok": bool, "log": last lines}."""
    if MONAI_PYTHON.exists():
        check = subprocess.run(
            [str(MONAI_PYTHON), "-c", "import monai.deploy, holoscan, highdicom, scipy"],
            capture_output=True,
            text=True,
        )
        if check.returncode == 0:
            return {"ok": True, "log": "existing venv"}
    PEERS.mkdir(exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(MONAI_VENV)],
        [str(MONAI_PYTHON), "-m", "pip", "install", "-q", "torch==2.13.0"],
        [str(MONAI_PYTHON), "-m", "pip", "install", "-q", *MONAI_PACKAGES],
    ]
    for step in steps:
        print("  $", " ".join(step), flush=True)
        done = subprocess.run(["nice", "-n", "10", *step], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            return {"ok": False, "log": "\n".join([" ".join(step), *tail])}
    return {"ok": True, "log": "built"}


def monai_versions() -> dict:
    code = (
        "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
        "['monai-deploy-app-sdk', 'holoscan-cu13', 'torch', 'monai', 'highdicom', 'pydicom', "
        "'scipy', 'numpy']}))"
    )
    done = subprocess.run([str(MONAI_PYTHON), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def make_studies() -> dict[str, Path]:
    """Input folders (each holding study folders): small1, small10, large1."""
    folders = {"small1": STUDIES / "small1", "small10": STUDIES / "small10",
               "large1": STUDIES / "large1"}  # fmt: skip
    wanted = [("small10", f"study-{i}", 64, 192, i) for i in range(1, 11)]
    wanted += [("large1", "study-1", 200, 512, 1)]
    for folder, name, slices, size, seed in wanted:
        target = folders[folder] / name
        if not target.exists():
            subprocess.run(
                [sys.executable, "-m", "operators.dicom.phantom", str(target), "--slices",
                 str(slices), "--size", str(size), "--oblique", "--shuffle", "--seed", str(seed)],
                check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
            )  # fmt: skip
    if not (folders["small1"] / "study-1").exists():
        shutil.copytree(folders["small10"] / "study-1", folders["small1"] / "study-1")
    return folders


def timed_command(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall seconds and output."""
    start = now()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = now() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
        )
    return {"wall_s": wall, "output": done.stdout + done.stderr}


_SUCCEEDED = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+)Z?\s.*job_succeeded", re.M)


def ours(inputs: Path, output: Path, cold: bool = False) -> dict:
    """``dataflow run`` as a user runs it; ``cold``: with an empty Numba cache (a first run)."""
    shutil.rmtree(output, ignore_errors=True)
    env = None
    if cold:
        cache = output.with_name(output.name + "-numba-cache")
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    dataflow = str(Path(sys.executable).with_name("dataflow"))
    cmd = [dataflow, "run", "pipelines/ct-segmentation.yaml", "--input", str(inputs),
           "--output", str(output)]  # fmt: skip
    run = timed_command(cmd, ROOT, env)
    import datetime

    stamps = [
        datetime.datetime.fromisoformat(m.group(1)).timestamp()
        for m in _SUCCEEDED.finditer(run["output"])
    ]
    run["results_s"] = [s - stamps[0] for s in stamps]
    run["segs"] = {p.parts[-4]: p for p in output.glob("*/seg/seg/*.dcm")}  # study -> SEG
    return run


def monai(inputs: Path, output: Path, cold: bool = False) -> dict:
    """The MONAI Deploy app, one process for every study of ``inputs`` (``cold`` is ignored:
    it compiles nothing; Python's bytecode caches are warm for both systems)."""
    shutil.rmtree(output, ignore_errors=True)
    studies = sorted(p for p in inputs.iterdir() if p.is_dir())
    cmd = [str(MONAI_PYTHON), str(MONAI_APP), str(output), *map(str, studies)]
    run = timed_command(cmd, PEERS)
    done = [json.loads(line) for line in run["output"].splitlines() if line.startswith("{")]
    finished = [d["done_s"] for d in done if "done_s" in d]
    run["results_s"] = [t - finished[0] for t in finished]
    run["imports_s"] = next((d["imports_s"] for d in done if "imports_s" in d), None)
    run["segs"] = {p.parent.name: p for p in output.glob("*/*.dcm")}
    return run


def seg_frames(path: Path) -> dict[tuple[int, str], np.ndarray]:
    """{(segment number, referenced source SOP Instance UID): frame as bool} of a SEG."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    frames = {}
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frames[(segment, str(source.ReferencedSOPInstanceUID))] = pixels[i] != 0
    return frames


def dice(a: Path, b: Path) -> dict[str, float]:
    """Dice per segment of two SEGs of the same series (missing frames are empty)."""
    fa, fb = seg_frames(a), seg_frames(b)
    scores = {}
    for number, name in SEGMENTS.items():
        keys = {k for k in (*fa, *fb) if k[0] == number}
        both = total = 0
        for key in keys:
            x, y = fa.get(key), fb.get(key)
            sx = int(x.sum()) if x is not None else 0
            sy = int(y.sum()) if y is not None else 0
            if x is not None and y is not None:
                both += int((x & y).sum())
            total += sx + sy
        scores[name] = round(2.0 * both / total, 6) if total else 1.0
    return scores


def pipeline_records(folders: dict[str, Path], rounds: int, quick: bool) -> list[dict]:
    cases = [("one-shot-64x192x192", "small1", False), ("one-shot-200x512x512", "large1", False),
             ("ten-studies-64x192x192", "small10", False),
             ("one-shot-64x192x192-empty-numba-cache", "small1", True)]  # fmt: skip
    if quick:
        cases = cases[:1]
    records: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        for case, folder, cold in cases:
            runs: dict[str, list[dict]] = {"ours": [], "monai": []}
            systems = {"ours": ours, "monai": monai}
            for r in range(rounds + 1):
                for name in rotate(list(systems), r):
                    run = systems[name](folders[folder], work / f"{case}-{name}", cold)
                    run["round"] = r
                    if r == 0:  # keep the first SEGs: later rounds write over the output
                        run["segs"] = keep_segs(run["segs"], work / "segs" / case / name)
                    runs[name].append(run)
                    print(f"  {case} round {r} {name}: {run['wall_s']:.1f} s", flush=True)
            records += case_records(case, runs)
            first = runs["ours"][0]["segs"]
            other = runs["monai"][0]["segs"]
            for study in sorted(first):
                if study in other:
                    records.append({"case": case, "system": "monai", "study": study,
                                    "value": dice(first[study], other[study]),
                                    "unit": "dice per segment, ours vs monai"})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return records


def keep_segs(segs: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {study: Path(shutil.copy(path, folder / f"{study}.dcm")) for study, path in segs.items()}


def case_records(case: str, runs: dict[str, list[dict]]) -> list[dict]:
    records = []
    timed = {name: [r for r in rs if r["round"] > 0] for name, rs in runs.items()}
    for name, rs in runs.items():
        record = {
            "case": case,
            "system": name,
            "value": round(median([r["wall_s"] for r in timed[name]]), 3),
            "unit": "s wall (whole command)",
            "runs_s": [round(r["wall_s"], 3) for r in timed[name]],
            "warmup_round_s": round(rs[0]["wall_s"], 3),
        }
        if name == "monai":
            record["imports_s"] = [r.get("imports_s") for r in timed[name]]
        records.append(record)
    pairs = [o["wall_s"] / m["wall_s"] for o, m in zip(timed["ours"], timed["monai"])]
    records.append({"case": case, "system": "ratio", "value": round(median(pairs), 4),
                    "unit": "ours / monai, wall, paired per round (< 1: ours faster)",
                    "pairs": [round(p, 4) for p in pairs]})  # fmt: skip
    if case.startswith("ten-studies"):
        steady = {}
        for name in runs:
            per = [r["results_s"][-1] / (len(r["results_s"]) - 1) for r in timed[name]
                   if len(r["results_s"]) > 1]  # fmt: skip
            steady[name] = per
            records.append({"case": "steady-state-64x192x192", "system": name,
                            "value": round(median(per), 4),
                            "unit": "s per study, first to last of ten results",
                            "runs_s": [round(p, 4) for p in per]})  # fmt: skip
        pairs = [o / m for o, m in zip(steady["ours"], steady["monai"])]
        records.append({"case": "steady-state-64x192x192", "system": "ratio",
                        "value": round(median(pairs), 4),
                        "unit": "ours / monai, paired per round (< 1: ours faster)",
                        "pairs": [round(p, 4) for p in pairs]})  # fmt: skip
    return records


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, fewer rounds")
    parser.add_argument(
        "--only", choices=("kernels", "contention", "pipelines"), help="one part only"
    )
    parser.add_argument("--contention-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7 kernels / 3 jobs)")
    parser.add_argument("--json", help="write the records here (and .provenance.json)")
    args = parser.parse_args()
    if args.contention_worker:
        contention_worker(args.contention_worker[0], int(args.contention_worker[1]))
        return
    started, busy = now(), machine_busy()
    meta: dict[str, Any] = {
        **run_header(),
        "machine": machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "argv": sys.argv,
        "versions": module_versions(["numpy", "scipy", "numba", "SimpleITK", "pydicom"]),
    }
    records: list[dict] = []
    if args.only in (None, "kernels"):
        sizes = [(64, 192)] if args.quick else [(64, 192), (200, 512)]
        records += kernel_records(sizes, args.rounds or (3 if args.quick else 7))
    if args.only in (None, "contention"):
        records += contention_records(args.rounds or (1 if args.quick else 3))
    if args.only in (None, "pipelines"):
        venv = build_monai_venv()
        meta["monai_venv"] = venv
        if venv["ok"]:
            meta["monai_versions"] = monai_versions()
            folders = make_studies()
            records += pipeline_records(folders, args.rounds or (1 if args.quick else 3),
                                        args.quick)  # fmt: skip
        else:
            print(f"MONAI Deploy could not be installed; pipelines skipped:\n{venv['log']}")
    meta.update(run_footer(started, busy))
    if args.json:
        write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
