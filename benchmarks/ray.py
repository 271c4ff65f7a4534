"""The Ray executor against the local executor on this machine (issue 14).

Three measurements and a model:

- **ct-segmentation** (``pipelines/ct-segmentation.yaml``, 12 stages) over phantom studies
  through ``dataflow.run.run_pipeline_file``, with the local executor and with the Ray
  executor (a Ray runtime started for the run on loopback, as ``dataflow run --executor
  ray`` does): series per minute (whole run, and steady state between the first and the last
  result), the machine's CPU seconds per study in the steady state, and each stage's median
  time per study (from the jobs' timelines). What Ray costs here is the difference.
- **bytes per study between stages**: during the Ray run, every value a stage is handed is
  counted (array bytes per edge; the job's input folder and stream outputs are files on a
  shared file system): what would cross between nodes if producer and consumer were on two
  nodes, per edge, so that any placement's traffic is a sum of rows.
- **per-hop cost**: ``source -> N x no-op -> sink`` (``engine_stages``, as in
  ``benchmarks/engine.py``) for N = 1 and 4, one job in flight, with 4 KiB, 1 MiB and 64 MiB
  arrays; per hop = (latency(4) - latency(1)) / 3. Systems: ``local`` (worker processes,
  our shared-memory store), ``ray-node`` (every actor on one node of a two-node
  ``ray.cluster_utils.Cluster`` on loopback: our store on that node, the Ray executor's
  default) and ``ray-across`` (the stages alternate between the two nodes: every hop crosses
  nodes, through Ray's object store); each also as ``*-objstore``, the arrays in Ray's object
  store only (``RayExecutor(shm=False)``). ct-segmentation runs on both paths too.
- **the model** predicting series per minute on N nodes from the per-study CPU cost, the
  longest stage, and the bytes crossing nodes (see the results' markdown).

Two cores cannot show scaling: both "nodes" share them, and a transfer between them is a copy
through loopback. The results' markdown says what they do show.

    .venv/bin/python benchmarks/ray.py --quick                 # under 5 minutes
    .venv/bin/python benchmarks/ray.py --json benchmarks/results/ray-$(date +%F).json

It first moves itself into a private network namespace holding only a loopback interface
(as ``benchmarks/dicom.py`` does; root, or where user namespaces are allowed). Run it on a
quiet machine (on a shared machine, under a ``flock`` the other benchmark runs share).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file is ray.py: with its folder first on sys.path, `import ray` would import it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
sys.path.append(str(HERE))

import _common as common  # noqa: E402  (benchmarks/ is not a package)
import engine  # noqa: E402  (its pipelines: source -> no-ops -> sink)

KiB, MiB, GiB = common.KiB, common.MiB, common.GiB
CT_PIPELINE = ROOT / "pipelines" / "ct-segmentation.yaml"
CT_STUDIES = {False: (24, 96, 256), True: (12, 48, 128)}  # quick -> (studies, slices, size)
#: studies of the serial run (one job in flight: each stage's own time, uncontended)
SERIAL_STUDIES = {False: 4, True: 3}
#: results left out of the steady state: the first admission (Limits.max_jobs, 8) arrives
#: as a burst after the start-up
STEADY_SKIP = 8
SIZES = (4 * KiB, 1 * MiB, 64 * MiB)
CHAIN = (1, 4)
#: jobs per run (full, quick), one in flight; the first WARMUP results are not counted
JOBS = {4 * KiB: (40, 15), 1 * MiB: (40, 15), 64 * MiB: (24, 10)}
WARMUP = 3
ROUNDS = (3, 1)  # rounds of every configuration (full, quick): medians over them
#: ``ray-*``: arrays in our store on each node (the Ray executor's default);
#: ``ray-*-objstore``: in Ray's object store (``shm=False``, as before 2026-12-04's change)
SYSTEMS = ("local", "ray-node", "ray-node-objstore", "ray-across", "ray-across-objstore")
#: each node's object store: small enough that it recycles memory it has touched after a few
#: 64 MiB objects (first touch of fresh memory is slow on these VMs: machine-notes.md)
NODE = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": 8,
        "object_store_memory": 384 * MiB}  # fmt: skip

now = time.perf_counter


# ------------------------------------------------------------------------- ct-segmentation


def ct_segmentation(executor: str, inputs: Path, tmp: Path, serial: bool = False) -> dict:
    """One run of the pipeline over every study under ``inputs`` (``serial``: one job in
    flight); its figures."""
    import numpy as np

    from dataflow.execution.state import Limits
    from dataflow.run import run_pipeline_file

    arrivals: list[tuple[float, float]] = []  # (when, machine busy CPU s) per result
    stages: dict[str, list[float]] = collections.defaultdict(list)
    edges: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    leaves: list[int] = []
    failed: list[str] = []

    def on_start(jobs, graph, runner) -> None:
        if not executor.startswith("ray"):
            return
        dispatch = runner._dispatch  # counted on the way: what each stage is handed

        def counting(action) -> None:
            for port, value in action.inputs.items():
                source = runner.stages[action.stage].inputs.get(port)
                producer = f"{source[0]}.{source[1]}" if source else "job input"
                kind = type(value.ref).__name__
                key = (f"{producer} -> {action.stage}.{port}", kind)
                edges[key].append(value.nbytes)
            dispatch(action)

        runner._dispatch = counting

    def on_result(result) -> None:
        arrivals.append((now(), common.machine_busy()[0]))
        if not result.ok:
            failed.append(f"{result.job}: {result.stage}: {result.reason}")
        for run in result.stages:
            stages[run["stage"]].append(run["end"] - run["start"])
        for value in result.outputs.values():
            if isinstance(value, tuple) and isinstance(value[0], np.ndarray):
                leaves.append(int(value[0].nbytes))

    t0, busy0 = now(), common.machine_busy()[0]
    arrays = "ray" if executor == "ray-objstore" else "store"  # where the Ray executor keeps them
    os.environ["DATAFLOW_RAY_ARRAYS"] = arrays
    try:
        summary = run_pipeline_file(
            CT_PIPELINE, inputs, output=tmp / f"out-{executor}", overwrite=True,
            store_budget="2GiB", executor=executor.split("-")[0], on_start=on_start,
            on_result=on_result, limits=Limits(max_jobs=1) if serial else None,
        )  # fmt: skip
    finally:
        del os.environ["DATAFLOW_RAY_ARRAYS"]
    wall, busy = now() - t0, common.machine_busy()[0] - busy0
    n = len(arrivals)
    skip = 1 if serial else min(STEADY_SKIP, n // 3)
    (first, busy_first), (last, busy_last) = arrivals[skip], arrivals[-1]
    steady = n - 1 - skip
    studies = len(summary.results)
    record: dict[str, Any] = {
        "case": "ct-segmentation-serial" if serial else "ct-segmentation",
        "system": executor, "studies": studies, "failed": failed, "wall_s": round(wall, 2),
        "series_per_min": round(studies / wall * 60, 2),
        "steady_results": steady,
        "steady_series_per_min": round(steady / (last - first) * 60, 2) if steady else None,
        "first_result_s": round(arrivals[0][0] - t0, 2),
        "cpu_s_per_study_whole_run": round(busy / studies, 3),
        "steady_cpu_s_per_study": round((busy_last - busy_first) / steady, 3) if steady else None,
        # the first study's stages compile and warm up: left out
        "stage_median_s": {k: round(statistics.median(v[1:] or v), 4) for k, v in stages.items()},
    }  # fmt: skip
    if executor.startswith("ray"):
        per_study = {
            f"{edge} [{kind}]": round(sum(sizes) / studies)
            for (edge, kind), sizes in sorted(edges.items())
        }
        record["bytes_per_study_per_edge"] = per_study
        record["leaf_array_bytes_per_study"] = round(sum(leaves) / studies)
    print(
        f"  {record['case']} {executor}: {record['series_per_min']} series/min whole run, "
        f"{record['steady_series_per_min']} steady; {record['steady_cpu_s_per_study']} CPU s "
        f"per study (steady); first result after {record['first_result_s']} s"
        + (f"; FAILED {failed}" if failed else "")
    )
    return record


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_ct(quick: bool, tmp: Path) -> list[dict]:
    from operators.dicom.phantom import write_ct_series

    studies, slices, size = CT_STUDIES[quick]
    print(f"ct-segmentation: {studies} oblique phantom studies of {slices} x {size}²")
    inputs = tmp / "studies"
    for k in range(studies):
        write_ct_series(inputs / f"study{k:02d}", slices=slices, size=size, oblique=True,
                        shuffle=True, seed=k)  # fmt: skip
    serial = tmp / "serial"
    serial.mkdir()
    for k in range(SERIAL_STUDIES[quick]):
        (serial / f"study{k:02d}").symlink_to(inputs / f"study{k:02d}")
    common.wait_for_idle(30)
    records = [ct_segmentation("local", serial, tmp, serial=True)]
    for executor in ("local", "ray", "ray-objstore"):
        common.wait_for_idle(30)
        records.append(ct_segmentation(executor, inputs, tmp))
    study_bytes = files_bytes(inputs) / studies
    out = tmp / "out-ray"
    written = (files_bytes(out) - (out / "summary.json").stat().st_size) / studies
    for record in records:
        record.update(slices=slices, size=size, input_file_bytes_per_study=round(study_bytes),
                      output_file_bytes_per_study=round(written))  # fmt: skip
    return records


# ------------------------------------------------------------------------------ per hop


def chain_latency(system: str, n: int, nbytes: int, jobs: list, tmp: Path) -> float:
    """Median seconds between results with one job in flight (its latency), the first
    WARMUP results left out."""
    from dataflow.execution.local import LocalExecutor
    from dataflow.execution.rayexec import RayExecutor, RayResources
    from dataflow.execution.state import Limits

    defs = engine.engine_stage_defs(engine.chain(n), nbytes)
    limits = Limits(max_jobs=1)
    if system == "local":
        runner = LocalExecutor(defs, output_root=tmp / "out", limits=limits,
                               store_budget=1 * GiB, extra_sys_path=[str(HERE)])  # fmt: skip
    else:
        node = (lambda i: "head") if system.startswith("ray-node") else (
            lambda i: ("head", "second")[i % 2])  # fmt: skip
        resources = {d.name: RayResources(num_cpus=1, memory=0, custom={node(i): 1})
                     for i, d in enumerate(defs)}  # fmt: skip
        runner = RayExecutor(defs, output_root=tmp / "out", limits=limits,
                             resources=resources, extra_sys_path=[str(HERE)],
                             shm=not system.endswith("-objstore"))  # fmt: skip
    times: list[float] = []
    failures: list[str] = []

    def on_result(result) -> None:
        times.append(now())
        if not result.ok:
            failures.append(f"{result.job}: {result.stage}: {result.reason}")

    runner.run(jobs, on_result)
    if failures:
        raise RuntimeError(f"{system} chain {n} {nbytes} B: {failures[0]}")
    gaps = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :])]
    return statistics.median(gaps)


def run_hops(quick: bool, tmp: Path) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    print("\nper hop: source -> N x no-op -> sink, one job in flight")
    cluster = Cluster(initialize_head=True,
                      head_node_args={**NODE, "resources": {"head": 100}})  # fmt: skip
    cluster.add_node(**NODE, resources={"second": 100})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    most = max(full for full, _ in JOBS.values())
    jobs = []
    for i in range(most):
        folder = tmp / "in" / f"job{i}"
        folder.mkdir(parents=True)
        jobs.append((f"job{i}", folder))
    samples: dict[tuple[str, int, int], list[float]] = collections.defaultdict(list)
    try:
        for round_ in range(ROUNDS[quick]):
            for nbytes in SIZES:
                count = JOBS[nbytes][quick]
                order = SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    for n in CHAIN:
                        common.wait_for_idle(10)
                        latency = chain_latency(system, n, nbytes, jobs[:count], tmp)
                        samples[(system, nbytes, n)].append(latency)
                        print(f"  round {round_}: {system:10} {engine.size_label(nbytes):>6} "
                              f"N={n}: {latency * 1e3:8.2f} ms per job")  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    records = []
    for system in SYSTEMS:
        for nbytes in SIZES:
            lat = {n: statistics.median(samples[(system, nbytes, n)]) for n in CHAIN}
            hop = (lat[CHAIN[-1]] - lat[CHAIN[0]]) / (CHAIN[-1] - CHAIN[0])
            records.append({
                "case": f"per-hop-{engine.size_label(nbytes)}", "system": system,
                "value": round(hop * 1e3, 3), "unit": "ms",
                "latency_ms": {str(n): round(v * 1e3, 3) for n, v in lat.items()},
                "runs_ms": {str(n): [round(v * 1e3, 3) for v in samples[(system, nbytes, n)]]
                            for n in CHAIN},
            })  # fmt: skip
    return records


# ------------------------------------------------------------------------------- model


def model(ct: list[dict], hops: list[dict]) -> dict[str, Any]:
    """Series per minute on N nodes of C cores each (see the markdown)::

        series/min = 60 / max((W + k * X(N)) / (N * C), S / r, X(N) / (N * B))

    W: CPU seconds per study (the Ray run's steady state); S: the longest stage's own time
    per study (the serial run: one study in flight), r its replicas (a replica runs one study
    at a time); X(N): bytes crossing nodes per study, spread over the N nodes' links (each
    node has its own, B each way, behind a switch that does not block); k: the time a byte
    crossing costs beyond a hop within a node (measured: the 64 MiB hop across the loopback
    cluster's nodes less the one within a node; counted as CPU: an upper bound). Two
    layouts: ``as-is`` (one replica per stage, as the pipeline file says: r = 1, stages spread
    over the nodes) and ``replicated`` (every stage has a replica on every node: r = N; a
    study's next stage is on another node with probability (N - 1) / N). A crossing also adds
    its per-hop cost to a study's latency (not to the throughput)."""
    ray_run = next(r for r in ct if r["system"] == "ray")
    local_run = next(r for r in ct if r["case"] == "ct-segmentation" and r["system"] == "local")
    serial = next(r for r in ct if r["case"] == "ct-segmentation-serial")
    arrays = {k: v for k, v in ray_run["bytes_per_study_per_edge"].items()
              if "ArrayRef" in k or "ShmRef" in k}  # fmt: skip
    every_edge = sum(arrays.values())
    hop = {(r["system"], r["case"]): r["value"] / 1e3 for r in hops}
    crossing = hop[("ray-across", "per-hop-64MiB")]
    k = max(0.0, crossing - hop[("ray-node", "per-hop-64MiB")]) / (64 * MiB)
    w = ray_run["steady_cpu_s_per_study"] or 0.0
    s = max(serial["stage_median_s"].values())
    out: dict[str, Any] = {
        "W_cpu_s_per_study": {"local": local_run["steady_cpu_s_per_study"], "ray": w},
        "S_longest_stage_s": s,
        "longest_stage": max(serial["stage_median_s"], key=serial["stage_median_s"].get),
        "sum_of_stages_serial_s": round(sum(serial["stage_median_s"].values()), 3),
        "X_every_edge_bytes_per_study": every_edge,
        "loopback_crossing_bytes_per_s": round(64 * MiB / crossing) if crossing > 0 else None,
        "k_crossing_s_per_byte": k,
        "check_n1": {
            "predicted_series_per_min": round(60 / max(w / (os.cpu_count() or 1), s), 1),
            "measured_ray_steady": ray_run["steady_series_per_min"],
            "measured_local_steady": local_run["steady_series_per_min"],
        },
        "predictions": [],
    }  # fmt: skip
    for layout in ("as-is", "replicated"):
        for cores in (2, 16):
            for nodes in (1, 2, 4, 8):
                for bandwidth, label in ((1.25e9, "10 GbE"), (12.5e9, "100 GbE")):
                    replicas = 1 if layout == "as-is" else nodes
                    x = every_edge * (nodes - 1) / nodes  # spread: crossings on average
                    bounds = {"CPU": (w + k * x) / (nodes * cores), "longest stage": s / replicas,
                              "network": x / (nodes * bandwidth)}  # fmt: skip
                    which = max(bounds, key=bounds.get)
                    out["predictions"].append({
                        "layout": layout, "nodes": nodes, "cores_per_node": cores,
                        "network": label, "bound": which,
                        "series_per_min": round(60 / bounds[which], 1) if bounds[which] else None,
                    })  # fmt: skip
    return out


# ------------------------------------------------------------------------------ report


def print_tables(ct: list[dict], hops: list[dict], fitted: dict[str, Any]) -> None:
    print("\nct-segmentation")
    for r in ct:
        print(f"  {r['case']}")
        steady, cpu = r["steady_series_per_min"], r["steady_cpu_s_per_study"]
        print(f"  {r['system']:6} {r['series_per_min']:6} series/min whole run, "
              f"{steady} steady, {cpu} CPU s/study")  # fmt: skip
    print("\nper hop (ms)")
    print("  " + "".join(f"{s:>12}" for s in ("size", *SYSTEMS)))
    for nbytes in SIZES:
        label = engine.size_label(nbytes)
        cells = [next(r["value"] for r in hops if r["system"] == s and r["case"].endswith(label))
                 for s in SYSTEMS]  # fmt: skip
        print("  " + f"{label:>12}" + "".join(f"{c:12.3f}" for c in cells))
    print("\nmodel inputs:", {k: v for k, v in fitted.items() if k != "predictions"})


def provenance(args, started: float, busy: tuple[float, float]) -> dict[str, Any]:
    import ray

    meta = {**common.run_header(), **common.mode_and_argv(args), "machine": common.machine(),
            "versions": {**common.module_versions(["numpy", "numba"]), "ray": ray.__version__},
            "loadavg_at_start": args.loadavg_at_start,
            "ct_studies": dict(zip(("studies", "slices", "size"), CT_STUDIES[args.quick])),
            "jobs_per_hop_run": {engine.size_label(k): v[args.quick] for k, v in JOBS.items()},
            "rounds": ROUNDS[args.quick], "cluster_nodes": NODE}  # fmt: skip
    meta.update(common.run_footer(started, busy))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, under 5 minutes")
    parser.add_argument("--json", help="write the records here (and .provenance.json)")
    parser.add_argument("--only", choices=("ct", "hops"), help="one part only (no model)")
    parser.add_argument(
        "--model-from", metavar="JSON",
        help="measure nothing: compute the model again from the records of an earlier run "
        "and write them back to that file (the model's record replaced)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.model_from:
        path = Path(args.model_from)
        records = [r for r in json.loads(path.read_text()) if r["case"] != "model"]
        ct = [r for r in records if r["case"].startswith("ct-segmentation")]
        hops = [r for r in records if r["case"].startswith("per-hop")]
        fitted = model(ct, hops)
        path.write_text(json.dumps([*records, {"case": "model", **fitted}], indent=1) + "\n")
        print_tables(ct, hops, fitted)
        return
    # loopback only, as the tests run Ray: with a default route, Ray 2.60 rewrites the
    # cluster's 127.0.0.1 to the host's outward address and the second node cannot join
    from dicom import enter_private_network

    enter_private_network()
    args.loadavg_at_start = list(os.getloadavg())
    started, busy = now(), common.machine_busy()
    with tempfile.TemporaryDirectory(prefix="dataflow-ray-bench-") as tmp:
        ct = run_ct(args.quick, Path(tmp)) if args.only in (None, "ct") else []
        hops = run_hops(args.quick, Path(tmp)) if args.only in (None, "hops") else []
    records = [*ct, *hops]
    if ct and hops:
        fitted = model(ct, hops)
        records.append({"case": "model", **fitted})
        print_tables(ct, hops, fitted)
    meta = provenance(args, started, busy)
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    if args.json:
        common.write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
