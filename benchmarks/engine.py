"""Benchmark of the local executor (``dataflow.execution.local``) against plain multiprocessing.

Run from the repository root::

    .venv/bin/python benchmarks/engine.py --quick                 # about two minutes
    .venv/bin/python benchmarks/engine.py --json benchmarks/results/engine-DATE.json

Every pipeline runs twice side by side, round after round: through the engine
(``LocalExecutor``: warm worker processes, a coordinator, the shared-memory store) and through
the naive baseline a user would write (``mp-queue``: one ``multiprocessing`` process per stage
replica, ``multiprocessing.Queue``\\s between them carrying NumPy arrays, pickled). Stages are in
``benchmarks/engine_stages.py``. Measured:

* **Per-hop overhead**: ``source -> N x no-op -> sink`` for N = 1, 2, 4, 8, with 4 KiB and
  64 MiB uint8 tensors. The source fills a tensor (in shared memory for the engine); a no-op
  returns its input array as it is (what a stage author naturally writes: the engine copies it
  into a new store object, as it has no zero-copy pass-through); the sink returns the first
  element, so no tensor leaves the pipeline. *Latency*: one job in flight at a time
  (``Limits(max_jobs=1)``; the baseline sends the next job when the previous one is out), the
  median interval between consecutive results. *Throughput*: the engine's default limits
  (8 jobs in flight, 4 items per edge), the baseline with at most 8 jobs in flight and queues of
  4 items; items/s between two results in the steady state. Per hop: ``(x(8) - x(1)) / 7``
  for latency, for time per item at full load (``1 / throughput``) and for CPU per item.
* **Pipeline efficiency**: stages that spin 20, 4, 4 and 4 ms of CPU per item (4 KiB
  tensors): throughput / the throughput of the 20 ms stage alone (a one-stage pipeline, same
  run). Goal: at least 0.9.
* **Replicas**: ``source -> sleep 50 ms`` (I/O, a remote model server) with 1 and 2 replicas
  of the sleeping stage: the speed-up (ideal 2).
* **Context**: a store request's round trip and a 64 MiB NumPy copy, in this process.

Each configuration runs several times (``--quick``: fewer, and fewer jobs); we report the
median of the runs (and their values). CPU time is read from ``/proc`` over the measured
window: the whole machine's, and per role (coordinator, store server, workers; the baseline's
driver and stage processes). ``--json PATH`` writes the records (a list of dicts with
``case``, ``system``, ``value``, ``unit`` and extra fields) and the run's provenance next to
it (``PATH`` with ``.provenance.json`` for ``.json``). The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common as common  # noqa: E402  (benchmarks/ is not a package)
import engine_stages  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = (4 * KiB, 64 * MiB)
CHAIN = (1, 2, 4, 8)
SMALL = 4 * KiB  # the tensor of the efficiency and replica pipelines
PIPELINE_MS = (20.0, 4.0, 4.0, 4.0)
SLEEP_MS = 50.0
MAX_JOBS = 8  # the engine's default Limits (max_jobs=8, edge_items=4); the baseline mirrors it
QUEUE_ITEMS = 4
STORE_BUDGET = 2 * GiB  # 8 jobs x (a value on an edge + one being written) x 64 MiB = 1 GiB
SYSTEMS = ("engine", "mp-queue")


@dataclasses.dataclass(frozen=True)
class Load:
    jobs: int  # per run
    warmup: int | None = None  # results before the measured window (default: a tenth, >= 2)


def _both(full: Load, quick: Load) -> dict[str, tuple[Load, Load]]:
    return {"engine": (full, quick), "mp-queue": (full, quick)}


#: (size or group, mode) -> {system: (full, quick)}. The baseline runs more 4 KiB jobs (it is
#: faster: a window long enough for /proc/stat, whose unit is 10 ms) and fewer 64 MiB ones (a
#: 64 MiB hop takes it about 0.2 s). The engine's 64 MiB throughput runs skip 60 (quick: 40)
#: results: until then workers still take page faults mapping arena pages they have not
#: touched yet (see the notes in results/engine.md).
LOADS = {
    (4 * KiB, "latency"): _both(Load(300), Load(80)),
    (4 * KiB, "throughput"): {
        "engine": (Load(1500), Load(400)),
        "mp-queue": (Load(6000), Load(1600)),
    },
    (64 * MiB, "latency"): {
        "engine": (Load(30), Load(10)),
        "mp-queue": (Load(10, 1), Load(6, 1)),
    },
    (64 * MiB, "throughput"): {
        "engine": (Load(150, 60), Load(64, 40)),
        "mp-queue": (Load(16), Load(8)),
    },
    ("efficiency", "throughput"): _both(Load(150), Load(50)),
    ("replicas", "throughput"): _both(Load(120), Load(30)),
}
#: runs per configuration (full, quick); medians are over these
RUNS = {"default": (5, 2), 64 * MiB: (3, 1)}
#: A run during which processes outside the benchmark used more than this many cores on average
#: (other people's work on a shared machine) is measured again, at most RETRIES times.
DISTURBED_CORES = 0.15
RETRIES = 2

now = time.perf_counter


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


# ------------------------------------------------------------------------------ pipelines


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # source | noop | spin | sleep | sink (see engine_stages)
    arg: float = 0.0  # milliseconds for source (spin), spin and sleep
    replicas: int = 1


def chain(n: int) -> tuple[Step, ...]:
    return (Step("source"), *(Step("noop") for _ in range(n)), Step("sink"))


def spin_pipeline(ms: tuple[float, ...]) -> tuple[Step, ...]:
    return (Step("source", ms[0]), *(Step("spin", m) for m in ms[1:]))


def replica_pipeline(replicas: int) -> tuple[Step, ...]:
    return (Step("source"), Step("sleep", SLEEP_MS, replicas))


def engine_stage_defs(steps: tuple[Step, ...], nbytes: int):
    from dataflow.execution.local import StageDef

    defs, previous = [], None
    for i, step in enumerate(steps):
        name = f"s{i}-{step.kind}"
        outputs = ("data",)
        if step.kind == "source":
            cls, args = engine_stages.Source, {"nbytes": nbytes, "spin_ms": step.arg}
        elif step.kind == "noop":
            cls, args = engine_stages.Noop, {}
        elif step.kind == "spin":
            cls, args = engine_stages.Spin, {"ms": step.arg}
        elif step.kind == "sleep":
            cls, args = engine_stages.Sleep, {"ms": step.arg}
        elif step.kind == "sink":
            cls, args, outputs = engine_stages.Sink, {}, ("first",)
        else:
            raise ValueError(step.kind)
        inputs = {"payload": None} if previous is None else {"data": (previous, "data")}
        defs.append(StageDef(name, cls, inputs, outputs, arguments=args, replicas=step.replicas))
        previous = name
    return defs


# ------------------------------------------------------------------------------ measuring


def window(jobs: int, in_flight: int, warmup: int | None) -> tuple[int, int]:
    """Indices of the first and last result of the steady state: ``warmup`` results (default:
    the first tenth, at least 2) are skipped, and with several jobs in flight the last tenth
    (1 to 8 results) too, the drain."""
    first = max(2, jobs // 10) if warmup is None else warmup
    drain = 0 if in_flight == 1 else max(1, min(in_flight, jobs // 10))
    return first, jobs - 1 - drain


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, in ns (``/proc/PID/task/TID/schedstat``)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_snapshot(roles: dict[str, list[int]]) -> dict[str, float]:
    snap = {role: sum(_cpu_ns(p) for p in pids) / 1e9 for role, pids in roles.items()}
    snap["machine"] = common.machine_busy()[0]
    return snap


@dataclasses.dataclass
class Run:
    times: list[float]  # when each result arrived
    startup_s: float  # from starting the run to the first result
    cpu_s: dict[str, float]  # CPU seconds over the window, per role and for the whole machine
    failures: list[str]
    window: tuple[int, int]

    def span(self) -> tuple[int, int]:
        return self.window

    def latency(self) -> tuple[float, float]:
        """Median and p90 of the intervals between results (one job in flight: its latency)."""
        s, e = self.span()
        gaps = sorted(b - a for a, b in zip(self.times[s:e], self.times[s + 1 : e + 1]))
        return statistics.median(gaps), gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]

    def throughput(self) -> float:
        s, e = self.span()
        return (e - s) / (self.times[e] - self.times[s])

    def warmup_throughput(self) -> float | None:
        """Items/s from the first result to the start of the window."""
        s = self.span()[0]
        return s / (self.times[s] - self.times[0]) if s > 0 else None

    def cpu_ms_per_item(self) -> dict[str, float]:
        s, e = self.span()
        return {role: 1e3 * sec / (e - s) for role, sec in self.cpu_s.items()}

    def outside_cores(self) -> float:
        """CPU used outside this run's processes during the window, in cores (0.0 to 2.0)."""
        s, e = self.span()
        other = self.cpu_s["machine"] - sum(v for k, v in self.cpu_s.items() if k != "machine")
        return max(0.0, other) / (self.times[e] - self.times[s])

    def cpu_other_ms_per_item(self) -> float:
        """The machine's CPU time per item not spent in this run's processes (other work on
        the machine, interrupts; /proc/stat counts in 10 ms ticks: coarse)."""
        cpu = self.cpu_ms_per_item()
        return cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")


def run_engine(steps, nbytes: int, jobs: list, max_jobs: int, warmup, tmp: Path) -> Run:
    from dataflow.execution.local import LocalExecutor
    from dataflow.execution.state import Limits

    executor = LocalExecutor(
        engine_stage_defs(steps, nbytes),
        output_root=tmp / "out",
        limits=Limits(max_jobs=max_jobs),
        store_budget=STORE_BUDGET,
        extra_sys_path=[str(HERE)],
    )
    s, e = window(len(jobs), max_jobs, warmup)
    times: list[float] = []
    marks: dict[int, dict[str, float]] = {}
    failures: list[str] = []

    def roles() -> dict[str, list[int]]:
        return {
            "coordinator": [os.getpid()],
            "store": [executor.store.pid],
            "workers": [p.process.pid for p in executor.procs.values()],
        }

    def on_result(result) -> None:
        times.append(now())
        if not result.ok:
            failures.append(f"{result.job}: {result.stage}: {result.reason}")
        if len(times) - 1 in (s, e):
            marks[len(times) - 1] = cpu_snapshot(roles())

    started = now()
    executor.run(jobs, on_result)
    cpu = {k: marks[e][k] - marks[s][k] for k in marks[s]}
    return Run(times, times[0] - started, cpu, failures, (s, e))


def run_baseline(steps, nbytes: int, jobs: int, in_flight: int, warmup) -> Run:
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue(QUEUE_ITEMS) for _ in steps] + [ctx.Queue()]  # the last: results
    control = ctx.Queue()
    procs = []
    s, e = window(jobs, in_flight, warmup)
    times: list[float] = []
    marks: dict[int, dict[str, float]] = {}
    started = now()
    try:
        for i, step in enumerate(steps):
            for _ in range(step.replicas):
                proc = ctx.Process(
                    target=engine_stages.baseline_main,
                    args=(step.kind, step.arg, nbytes, queues[i], queues[i + 1], control),
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
        for _ in procs:
            control.get(timeout=120)
        roles = {"coordinator": [os.getpid()], "workers": [p.pid for p in procs]}
        submitted = done = 0
        while done < jobs:
            while submitted < jobs and submitted - done < in_flight:
                queues[0].put((submitted, None))
                submitted += 1
            queues[-1].get(timeout=600)
            times.append(now())
            done += 1
            if done - 1 in (s, e):
                marks[done - 1] = cpu_snapshot(roles)
    finally:
        for i, step in enumerate(steps):
            for _ in range(step.replicas):
                queues[i].put(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in [*queues, control]:
            q.close()
            q.join_thread()
    cpu = {k: marks[e][k] - marks[s][k] for k in marks[s]}
    return Run(times, times[0] - started, cpu, [], (s, e))


class Quiet:
    """Waits, before each run, until the machine has been idle for a moment (at most
    ``max_wait_s``); a run that starts on a busy machine anyway is counted."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s
        self.runs = self.noisy = 0
        self.waited_s = 0.0
        self.repeated = 0  # runs disturbed by outside work, measured again
        self.kept_disturbed = 0  # ... and still disturbed after RETRIES more attempts

    def wait(self) -> None:
        self.runs += 1
        idle, waited = common.wait_for_idle(self.max_wait_s)
        self.noisy += not idle
        self.waited_s += waited

    def summary(self) -> dict:
        return {
            "runs": self.runs,
            "started_on_a_busy_machine": self.noisy,
            "wait_s": round(self.waited_s, 1),
            "disturbed_runs_repeated": self.repeated,
            "disturbed_runs_kept": self.kept_disturbed,
            "disturbed_threshold_cores": DISTURBED_CORES,
        }


# ------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Config:
    group: str  # chain | efficiency | replicas
    label: str  # what varies: "n4", "pipeline", "dominant", "r2"
    steps: tuple[Step, ...]
    nbytes: int
    mode: str  # latency | throughput
    loads: dict[str, Load]  # per system
    repeats: int
    runs: dict[str, list[Run]] = dataclasses.field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return 1 if self.mode == "latency" else MAX_JOBS


def plan(quick: bool, groups: set[str], sizes: tuple[int, ...]) -> list[Config]:
    pick = 1 if quick else 0

    def config(group, label, steps, nbytes, key) -> Config:
        loads = {system: both[pick] for system, both in LOADS[key].items()}
        repeats = RUNS.get(key[0], RUNS["default"])[pick]
        return Config(group, label, steps, nbytes, key[1], loads, repeats)

    configs = []
    if "chain" in groups:
        for nbytes in sizes:
            for n in CHAIN:
                for mode in ("latency", "throughput"):
                    configs.append(config("chain", f"n{n}", chain(n), nbytes, (nbytes, mode)))
    if "efficiency" in groups:
        key = ("efficiency", "throughput")
        configs.append(config("efficiency", "pipeline", spin_pipeline(PIPELINE_MS), SMALL, key))
        configs.append(config("efficiency", "dominant", spin_pipeline(PIPELINE_MS[:1]), SMALL, key))
    if "replicas" in groups:
        for r in (1, 2):
            key = ("replicas", "throughput")
            configs.append(config("replicas", f"r{r}", replica_pipeline(r), SMALL, key))
    return configs


def execute_plan(configs: list[Config], systems: list[str], runs: int | None, quiet: Quiet) -> None:
    """Round after round, each configuration by each system in turn (the order of the systems
    alternates from round to round); ``runs`` overrides each configuration's own count."""
    for config in configs:
        if runs is not None:
            config.repeats = runs
    rounds = max(c.repeats for c in configs)
    most = max(c.loads["engine"].jobs for c in configs)
    with tempfile.TemporaryDirectory(prefix="dataflow-engine-bench-") as tmp:
        root = Path(tmp)
        jobs = []
        for i in range(most):
            folder = root / "in" / f"job{i}"  # the job's input (its payload folder)
            folder.mkdir(parents=True)
            jobs.append((f"job{i}", folder))
        for round_ in range(rounds):
            order = systems if round_ % 2 == 0 else systems[::-1]
            for config in configs:
                if round_ >= config.repeats:
                    continue
                for system in order:
                    for attempt in range(1 + RETRIES):
                        quiet.wait()
                        t0 = now()
                        run = _run_once(config, system, jobs, root)
                        outside = run.outside_cores()
                        disturbed = outside > DISTURBED_CORES
                        _print_run(config, system, run, round_, now() - t0, outside)
                        if not disturbed:
                            break
                        if attempt < RETRIES:
                            quiet.repeated += 1
                            print("    disturbed by work outside the benchmark: once more")
                        else:
                            quiet.kept_disturbed += 1
                    config.runs.setdefault(system, []).append(run)


def _run_once(config: Config, system: str, jobs: list, root: Path) -> Run:
    load = config.loads[system]
    if system == "engine":
        run = run_engine(
            config.steps, config.nbytes, jobs[: load.jobs], config.in_flight, load.warmup, root
        )
        shutil.rmtree(root / "out", ignore_errors=True)
        return run
    return run_baseline(config.steps, config.nbytes, load.jobs, config.in_flight, load.warmup)


def _print_run(config: Config, system: str, run: Run, round_: int, took: float, outside) -> None:
    if run.failures:
        print(f"  {system} {config.label}: {len(run.failures)} jobs failed: {run.failures[0]}")
    value = (
        f"{run.latency()[0] * 1e3:.3f} ms"
        if config.mode == "latency"
        else f"{run.throughput():,.1f} items/s"
    )
    print(
        f"  run {round_ + 1}/{config.repeats} {config.group:<10} {config.label:<8}"
        f" {size_label(config.nbytes):>6} {config.mode:<10} {system:<8} {value:<18}"
        f" ({took:.1f} s; outside CPU {outside:.2f} cores)",
        flush=True,
    )


# ------------------------------------------------------------------------------ records


def median(values):
    return statistics.median(values)


def config_records(configs: list[Config]) -> list[dict]:
    records = []
    for c in configs:
        for system, runs in c.runs.items():
            cpu = {
                role: round(median([r.cpu_ms_per_item()[role] for r in runs]), 3)
                for role in runs[0].cpu_s
            }
            base = {
                "system": system,
                "group": c.group,
                "label": c.label,
                "size": size_label(c.nbytes),
                "nbytes": c.nbytes,
                "stages": [dataclasses.asdict(s) for s in c.steps],
                "jobs": c.loads[system].jobs,
                "in_flight": c.in_flight,
                "window": list(runs[0].span()),
                "startup_s": round(median([r.startup_s for r in runs]), 3),
                "cpu_ms_per_item": cpu,
                # per run: machine CPU outside this benchmark's processes (other work, kernel)
                "runs_cpu_other_ms_per_item": [round(r.cpu_other_ms_per_item(), 3) for r in runs],
                "failures": sum(len(r.failures) for r in runs),
            }
            if c.group == "chain":
                base["n"] = int(c.label[1:])
            if c.mode == "latency":
                values = [r.latency()[0] * 1e3 for r in runs]
                p90 = median([r.latency()[1] * 1e3 for r in runs])
                records.append({
                    "case": f"{c.group}-latency-{size_label(c.nbytes)}-{c.label}",
                    "value": round(median(values), 4), "unit": "ms", "p90": round(p90, 4),
                    "runs": [round(v, 4) for v in values], **base,
                })  # fmt: skip
            else:
                values = [r.throughput() for r in runs]
                case = (
                    f"chain-throughput-{size_label(c.nbytes)}-{c.label}"
                    if c.group == "chain"
                    else f"{c.group}-{c.label}"
                )
                warm = [r.warmup_throughput() for r in runs]
                records.append({
                    "case": case, "value": round(median(values), 3), "unit": "items/s",
                    "runs": [round(v, 3) for v in values],
                    "warmup_items_per_s": None if None in warm else round(median(warm), 3),
                    **base,
                })  # fmt: skip
    return records


def derive(records: list[dict], systems: list[str]) -> list[dict]:
    """Per-hop figures from the chain records, and the goals."""
    out = []
    find = {(r["case"], r["system"]): r for r in records}
    lo, hi = CHAIN[0], CHAIN[-1]
    for nbytes in SIZES:
        size = size_label(nbytes)
        for system in systems:
            lat = [find.get((f"chain-latency-{size}-n{n}", system)) for n in (lo, hi)]
            thr = [find.get((f"chain-throughput-{size}-n{n}", system)) for n in (lo, hi)]
            what = f"(x(N={hi}) - x(N={lo})) / {hi - lo}"
            if all(lat):
                per_hop = (lat[1]["value"] - lat[0]["value"]) / (hi - lo) * 1e3
                out.append({
                    "case": f"per-hop-latency-{size}", "system": system, "size": size,
                    "value": round(per_hop, 1), "unit": "us", "what": f"latency {what}",
                })  # fmt: skip
            if all(thr):
                per_item = [1e6 / r["value"] for r in thr]
                cost = (per_item[1] - per_item[0]) / (hi - lo)
                cpu = [r["cpu_ms_per_item"]["machine"] for r in thr]
                out.append({
                    "case": f"per-hop-time-at-load-{size}", "system": system, "size": size,
                    "value": round(cost, 1), "unit": "us",
                    "what": f"1/throughput {what}: wall time per item per extra hop at full load",
                })  # fmt: skip
                out.append({
                    "case": f"per-hop-cpu-{size}", "system": system, "size": size,
                    "value": round((cpu[1] - cpu[0]) / (hi - lo) * 1e3, 1), "unit": "us",
                    "what": f"machine CPU per item {what}",
                    "cpu_per_role_us": {
                        role: round(
                            (thr[1]["cpu_ms_per_item"][role] - thr[0]["cpu_ms_per_item"][role])
                            / (hi - lo) * 1e3, 1,
                        )
                        for role in thr[0]["cpu_ms_per_item"]
                    },
                })  # fmt: skip
                out.append({
                    "case": f"hops-per-second-{size}-n{hi}", "system": system, "size": size,
                    "value": round(thr[1]["value"] * hi, 1), "unit": "hops/s",
                    "what": f"no-op hops per second: throughput(N={hi}) x {hi}",
                })  # fmt: skip
    for system in systems:
        pipe = find.get(("efficiency-pipeline", system))
        dom = find.get(("efficiency-dominant", system))
        if pipe and dom:
            ratio = pipe["value"] / dom["value"]
            ms = "-".join(f"{m:g}" for m in PIPELINE_MS)
            out.append({
                "case": "goal-pipeline-efficiency", "system": system, "value": round(ratio, 3),
                "unit": "ratio", "goal": ">= 0.9", "met": ratio >= 0.9,
                "what": f"{ms} ms pipeline / the {PIPELINE_MS[0]:g} ms stage alone",
                "ideal_items_per_s": round(1e3 / PIPELINE_MS[0], 1),
            })  # fmt: skip
            ideal = 1e3 / PIPELINE_MS[0]
            out.append({
                "case": "context-pipeline-vs-ideal", "system": system,
                "value": round(pipe["value"] / ideal, 3), "unit": "ratio",
                "what": f"the pipeline / {ideal:g} items/s (1 / the {PIPELINE_MS[0]:g} ms stage)",
            })  # fmt: skip
        r1 = find.get(("replicas-r1", system))
        r2 = find.get(("replicas-r2", system))
        if r1 and r2:
            ratio = r2["value"] / r1["value"]
            out.append({
                "case": "goal-replica-speedup", "system": system, "value": round(ratio, 3),
                "unit": "ratio", "goal": "2 (ideal)", "met": None,
                "what": f"2 replicas / 1 replica of a {SLEEP_MS:g} ms sleeping stage",
            })  # fmt: skip
    return out


def context_records(quick: bool) -> list[dict]:
    """A store request's round trip (``contains``) and a 64 MiB copy, in this process."""
    from dataflow.store import Store

    records = []
    with Store.start(budget="64MiB") as store:
        rates = []
        for _ in range(3 if quick else 5):
            t0, k = now(), 0
            while now() - t0 < 0.3:
                store.contains("nothing")
                k += 1
            rates.append((now() - t0) / k * 1e6)
        records.append({
            "case": "context-store-roundtrip", "system": "store", "value": round(median(rates), 1),
            "unit": "us", "runs": [round(r, 1) for r in rates],
            "what": "one store request (contains) from this process, round trip",
        })  # fmt: skip
    src = np.full(64 * MiB, 7, np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)
    times = []
    for _ in range(10):
        t0 = now()
        np.copyto(dst, src)
        times.append((now() - t0) * 1e3)
    records.append({
        "case": "context-copy-64MiB", "system": "numpy", "value": round(median(times), 2),
        "unit": "ms", "what": "np.copyto of 64 MiB into a warm buffer, median of 10",
    })  # fmt: skip
    return records


# ------------------------------------------------------------------------------ printing


def print_tables(records: list[dict], systems: list[str]) -> None:
    find = {(r["case"], r["system"]): r for r in records}

    def cell(case: str, system: str, fmt: str) -> str:
        r = find.get((case, system))
        return "-" if r is None else format(r["value"], fmt)

    for nbytes in SIZES:
        size = size_label(nbytes)
        if not any(f"chain-latency-{size}-n{n}" in {c for c, _ in find} for n in CHAIN):
            continue
        print(f"\nsource -> N x no-op -> sink, {size} tensors")
        head = "  N  " + "".join(f"{'ms latency ' + s:>20}" for s in systems)
        head += "".join(f"{'items/s ' + s:>20}" for s in systems)
        head += "".join(f"{'CPU ms/item ' + s:>22}" for s in systems)
        print(head)
        for n in CHAIN:
            line = f"  {n:<3}"
            for s in systems:
                r = find.get((f"chain-latency-{size}-n{n}", s))
                lat = "-" if r is None else f"{r['value']:.3f} (p90 {r['p90']:.2f})"
                line += f"{lat:>20}"
            for s in systems:
                line += f"{cell(f'chain-throughput-{size}-n{n}', s, ',.1f'):>20}"
            for s in systems:
                r = find.get((f"chain-throughput-{size}-n{n}", s))
                cpu = "-" if r is None else f"{r['cpu_ms_per_item']['machine']:.2f}"
                line += f"{cpu:>22}"
            print(line)
        for case in ("per-hop-latency", "per-hop-time-at-load", "per-hop-cpu"):
            values = "   ".join(f"{s}: {cell(f'{case}-{size}', s, ',.1f')} us" for s in systems)
            print(f"  {case:<22} {values}")
    if any(r["group"] == "efficiency" for r in records if "group" in r):
        print("\nPipeline efficiency (items/s)")
        for label in ("pipeline", "dominant"):
            values = "   ".join(f"{s}: {cell(f'efficiency-{label}', s, ',.2f')}" for s in systems)
            print(f"  {label:<10} {values}")
    if any(r["group"] == "replicas" for r in records if "group" in r):
        print("\nReplicas of a 50 ms sleeping stage (items/s)")
        for label in ("r1", "r2"):
            values = "   ".join(f"{s}: {cell(f'replicas-{label}', s, ',.2f')}" for s in systems)
            print(f"  {label:<10} {values}")
    goals = [r for r in records if r["case"].startswith(("goal-", "context-"))]
    if goals:
        print("\nGoals and context")
        for r in goals:
            met = {True: "met", False: "NOT MET", None: ""}[r.get("met")]
            print(
                f"  {r['case']:<26} {r['system']:<9} {r['value']:>9.3f} {r['unit']:<6}"
                f" {r.get('goal', ''):<10} {met:<8} {r['what']}"
            )


# ------------------------------------------------------------------------------ provenance


def provenance(args) -> dict:
    """Where and on what the run happens; taken at the start."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "dataflow").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return {
        **common.run_header(),
        "engine_source_matches_commit": common.git(
            "status", "--porcelain", "--", "dataflow/execution", "dataflow/store",
            "dataflow/stage.py",
        ) == "",
        "dataflow_source_sha256": digest.hexdigest(),
        **common.mode_and_argv(args),
        **common.machine(),
        **common.module_versions(("numpy", "pyarrow", "structlog")),
        "start_method": "spawn",
        "store_budget_bytes": STORE_BUDGET,
        "engine_limits": {"max_jobs": MAX_JOBS, "edge_items": 4, "edge_bytes": GiB},
        "baseline": {"queue_items": QUEUE_ITEMS, "in_flight": MAX_JOBS},
        "loadavg_1min_at_start": common.loadavg(),
    }  # fmt: skip


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and jobs (~2 minutes)")
    parser.add_argument("--json", metavar="PATH", help="write the records here")
    parser.add_argument(
        "--only", default="chain,efficiency,replicas",
        help="comma-separated subset of: chain, efficiency, replicas (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of: engine, mp-queue"
    )
    parser.add_argument("--sizes", default="4KiB,64MiB", help="chain tensor sizes: 4KiB,64MiB")
    parser.add_argument(
        "--runs", type=int, help="runs per configuration (default: 5, 64 MiB chain 3; quick 2, 1)"
    )
    args = parser.parse_args(argv)
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    sizes = tuple(n for n in SIZES if size_label(n) in args.sizes.split(","))
    meta = provenance(args)
    started = time.perf_counter()
    print(f"engine benchmark ({meta['mode']}), {meta['cores']} cores, commit {meta['commit']:.10}")
    if meta["loadavg_1min_at_start"] > 0.5:
        print(f"warning: the machine is busy (load {meta['loadavg_1min_at_start']}): noisy")

    configs = plan(args.quick, set(args.only.split(",")), sizes)
    quiet = Quiet(max_wait_s=3.0 if args.quick else 10.0)
    execute_plan(configs, systems, args.runs, quiet)
    meta["quiet"] = quiet.summary()
    records = config_records(configs)
    records += derive(records, systems)
    records += context_records(args.quick)
    print_tables(records, systems)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_1min_at_end"] = common.loadavg()
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    if args.json:
        common.write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
