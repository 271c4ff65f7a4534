"""The figures of issue 15 §2, measured with ``dataflow load`` against a real ``dataflow serve``.

```
.venv/bin/python benchmarks/load_figures.py --quick
.venv/bin/python benchmarks/load_figures.py --json benchmarks/results/load-$(date +%F).json
.venv/bin/python benchmarks/load_figures.py --only latency \
    --json benchmarks/results/load-latency-$(date +%F).json
.venv/bin/python benchmarks/load_figures.py --soak 10 \
    --json benchmarks/results/load-soak-$(date +%F).json
```

One service (``dataflow serve``: ct-segmentation behind the AE title ``DATAFLOW-SEG``, the SEG
exported to dcmtk's ``storescp`` as the PACS) is started in a private network namespace
(``storescp`` listens on every interface; the script moves itself into one as root, like
``dicom.py``), and ``dataflow load`` is run against it:

- **end-to-end latency**: after one warm-up study, studies of ``--slices`` x ``--size``² CT
  (200 x 512²) sent one at a time (the next only after the last one's SEG is in the PACS):
  last instance acknowledged → SEG acknowledged by the PACS, with the grouping wait (the
  receiver's ``timeout`` after the last instance) shown apart;
- **throughput against offered load**: ``dataflow load --rate R`` for rising rates (studies a
  minute), a few studies per step, until the latency climbs (p50 over twice the one-at-a-time
  latency) or the service falls behind the offer; the knee is the last rate it kept up with,
  the bottleneck the part of the study's path (receive, grouping, queue, a stage, export) whose
  time grew most from the lowest rate to the first rate past the knee;
- **soak** (``--soak MINUTES``): studies at a low rate for that long (a bounded count), with
  every process of the service's tree sampled every ``--sample`` seconds (RSS, shared memory
  resident, open files, threads), the state folder's size and the PACS's file count.

Records (``case``, ``value``, ``unit`` ...) go to ``--json PATH`` and the provenance (machine,
load before and after, commit) beside it; ``--markdown`` writes the summary table.
``benchmarks/report.py`` draws the figures from these files. The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, machine_busy, run_footer, run_header, write_results
from dicom import DCMTK_ENV, enter_private_network, free_port

PY = sys.executable
CALLED = "DATAFLOW-SEG"
SPANS = ("receive", "grouping_wait", "queued", "ran", "export")
HANG = 120.0
WATCHED = ("rss_bytes", "open_files", "threads", "state_bytes", "store_used_bytes")


# ---------------------------------------------------------------------------- the service


class Service:
    """``dataflow serve`` with ct-segmentation, results to a ``storescp`` PACS, in ``folder``."""

    def __init__(
        self, folder: Path, grouping: float, modalities: int, retention: float | None = None
    ) -> None:
        self.folder = folder
        self.pacs_dir = folder / "pacs"
        self.pacs_dir.mkdir(parents=True)
        self.port, pacs_port = free_port(), free_port()
        self.pacs_log = open(folder / "storescp.log", "w")  # noqa: SIM115 (held while it runs)
        self.pacs = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(self.pacs_dir), "-pm", "+xa", str(pacs_port)],
            env=DCMTK_ENV,
            stdout=self.pacs_log,
            stderr=self.pacs_log,
        )
        service = {
            "state": str(folder / "state"),
            "pipelines": {"ct-segmentation": str(ROOT / "pipelines" / "ct-segmentation.yaml")},
            "api": {"rest-port": 0, "grpc-port": None},
            "dicom": {
                "receivers": [{"name": "plain", "host": "127.0.0.1", "port": self.port}],
                "ae-titles": {
                    CALLED: {
                        "pipelines": ["ct-segmentation"],
                        "group-by": "study",
                        "timeout": grouping,
                    }
                },
                "allow": [{"ae": f"LOAD{k}"} for k in range(1, modalities + 1)],
                "destinations": {"PACS": {"ae": "PACS", "host": "127.0.0.1", "port": pacs_port}},
                "export": {"retry-initial": 0.5, "retry-max": 2, "deadline": 300},
            },
        }
        if retention is not None:  # a finished job's files removed after that long
            service["retention"] = {
                "succeeded": retention,
                "failed": retention,
                "interval": max(1.0, retention / 4),
            }
        self.config = folder / "service.yaml"
        self.config.write_text(json.dumps(service, indent=1))  # JSON is YAML
        self.log = open(folder / "serve.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "dataflow.cli", "serve", str(self.config)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        api_file = folder / "state" / "api.json"
        deadline = time.monotonic() + HANG
        while not api_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (folder / "serve.log").read_text()[-3000:]
                raise SystemExit(f"dataflow serve did not start its API:\n{tail}")
            time.sleep(0.2)
        self.api = json.loads(api_file.read_text())["rest"]

    def load(self, results: Path, *args: Any, timeout: float) -> dict[str, Any]:
        """``dataflow load`` over DICOM with ``args``; the results file read back."""
        cmd = [
            PY,
            "-m",
            "dataflow.cli",
            "load",
            "--dicom",
            f"127.0.0.1:{self.port}",
            "--called",
            CALLED,
            "--api",
            self.api,
            "--results",
            str(results),
            *map(str, args),
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 2 or not results.is_file():
            raise SystemExit(f"dataflow load failed ({done.returncode}):\n{done.stderr[-3000:]}")
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        return {"run": lines[0], "studies": lines[1:-1], "summary": lines[-1]}

    def tree(self) -> list[int]:
        """The service's process and every process under it."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def stop(self) -> None:
        for proc in (self.proc, self.pacs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.proc, self.pacs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()
        self.pacs_log.close()


# ---------------------------------------------------------------------------- what a run says


def spans(study: dict[str, Any]) -> dict[str, float | None]:
    """The parts of one study's path, in seconds."""
    out = {name: study.get(name) for name in SPANS if name != "receive"}
    began, sent = study.get("began"), study.get("sent")
    out["receive"] = None if began is None or sent is None else round(sent - began, 6)
    return out


def stage_times(studies: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each stage's mean run (end - start) and mean wait before it (start - the latest end of
    a stage that had ended by then, or the job's start), seconds, over ``studies``."""
    runs: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    for s in studies:
        stages = sorted(s.get("stages") or [], key=lambda x: x["start"])
        for st in stages:
            before = [o["end"] for o in stages if o["end"] <= st["start"]]
            ready = max(before) if before else (s.get("started") or st["start"])
            runs.setdefault(st["stage"], []).append(st["end"] - st["start"])
            waits.setdefault(st["stage"], []).append(max(0.0, st["start"] - ready))
    return {
        name: {
            "run_s": round(statistics.fmean(runs[name]), 4),
            "wait_s": round(statistics.fmean(waits[name]), 4),
        }
        for name in runs
    }


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def describe(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency percentiles and each part's median over the studies that ended well."""
    ok = [s for s in studies if s["ok"]]
    lat = sorted(s["latency"] for s in ok if s.get("latency") is not None)
    parts = {name: p50([v for s in ok if (v := spans(s)[name]) is not None]) for name in SPANS}
    after = [
        s["latency"] - s["grouping_wait"]
        for s in ok
        if s.get("latency") is not None and s.get("grouping_wait") is not None
    ]
    return {
        "studies": len(studies),
        "failed": len(studies) - len(ok),
        "latency_s": lat,
        "latency_p50_s": p50(lat),
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4) if lat else None,
        "after_grouping_p50_s": p50(after),
        "parts_p50_s": parts,
        "stages": stage_times(ok),
    }


def completion_rate(studies: list[dict[str, Any]]) -> float | None:
    """Studies an hour between the first and the last result (n - 1 gaps)."""
    ends = sorted(s.get("pacs") or s.get("finished") for s in studies if s["ok"])
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return round((len(ends) - 1) / (ends[-1] - ends[0]) * 3600, 1)


def bottleneck(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """What grew most from the lowest rate to the first one past the knee: a part of the
    path, and within ``ran``, the stage whose wait plus run grew most."""
    growth = {
        name: round((high["parts_p50_s"][name] or 0) - (low["parts_p50_s"][name] or 0), 4)
        for name in SPANS
    }
    stage_growth = {
        name: round(
            t["run_s"]
            + t["wait_s"]
            - low["stages"].get(name, {}).get("run_s", 0)
            - low["stages"].get(name, {}).get("wait_s", 0),
            4,
        )
        for name, t in high["stages"].items()
    }
    part = max(growth, key=lambda k: growth[k])
    stage = max(stage_growth, key=lambda k: stage_growth[k]) if stage_growth else None
    slowest = max(high["stages"], key=lambda k: high["stages"][k]["run_s"], default=None)
    return {
        "part": part,
        "part_growth_s": growth,
        "stage": stage,
        "stage_growth_s": stage_growth,
        "slowest_stage": slowest,
    }


# ---------------------------------------------------------------------------- the soak sampler


def sample(service: Service, started: float) -> dict[str, Any]:
    """One look at the service's tree, state folder and PACS."""
    procs = []
    for pid in service.tree():
        try:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError):
            continue  # it ended meanwhile
        role = (
            "store"
            if "dataflow.store.server" in cmd
            else "service"
            if pid == service.proc.pid
            else "worker"
        )
        procs.append(
            {
                "pid": pid,
                "role": role,
                "rss_bytes": int(status.get("VmRSS", "0 kB").split()[0]) * 1024,
                "shmem_bytes": int(status.get("RssShmem", "0 kB").split()[0]) * 1024,
                "threads": int(status.get("Threads", "0")),
                "open_files": fds,
            }
        )
    try:  # the store's own count of its budget in use, per pipeline (GET /api/v1/health)
        with urllib.request.urlopen(f"{service.api}/api/v1/health", timeout=30) as answer:
            health = json.load(answer)
        stores = [p.get("store") or {} for p in health.get("pipelines", {}).values()]
        store_used = sum(int(x.get("used", 0)) for x in stores)
        store_objects = sum(int(x.get("objects", 0)) for x in stores)
    except (OSError, ValueError):
        store_used = store_objects = None
    state = service.folder / "state"
    state_bytes = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    return {
        "case": "soak-sample",
        "t_s": round(time.monotonic() - started, 1),
        "processes": len(procs),
        "rss_bytes": sum(p["rss_bytes"] for p in procs),
        "store_shmem_bytes": sum(p["shmem_bytes"] for p in procs if p["role"] == "store"),
        "store_used_bytes": store_used,
        "store_objects": store_objects,
        "open_files": sum(p["open_files"] for p in procs),
        "threads": sum(p["threads"] for p in procs),
        "state_bytes": state_bytes,
        "state_files": sum(1 for p in state.rglob("*") if p.is_file()),
        "pacs_files": sum(1 for p in service.pacs_dir.rglob("*") if p.is_file()),
        "by_role": {
            role: {
                k: sum(p[k] for p in procs if p["role"] == role)
                for k in ("rss_bytes", "open_files", "threads")
            }
            for role in sorted({p["role"] for p in procs})
        },
        "loadavg": os.getloadavg()[0],
    }


def soak(service: Service, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Studies at ``--soak-rate`` a minute for ``--soak`` minutes, sampled meanwhile."""
    count = max(1, int(args.soak * args.soak_rate))
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append(sample(service, started))
            stop.wait(args.sample)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        out = service.load(
            work / "soak.jsonl",
            "--count",
            count,
            "--rate",
            args.soak_rate,
            "--slices",
            args.soak_slices,
            "--size",
            args.soak_size,
            "--timeout",
            300,
            timeout=args.soak * 60 + 900,
        )
    finally:
        stop.set()
        thread.join()
    samples.append(sample(service, started))
    summary = describe(out["studies"])
    # a result in the PACS, or a failure on record (the job failed, the export is dead);
    # not a study the generator gave up on (timed out, not finished)
    ended = [
        s
        for s in out["studies"]
        if s["ok"] or s.get("state") in ("failed", "cancelled") or s.get("reason") == "export dead"
    ]
    first, last = samples[0], samples[-1]
    half = [s for s in samples if s["t_s"] >= last["t_s"] / 2] or samples
    record = {
        "case": "soak-summary",
        "minutes": args.soak,
        "rate_per_min": args.soak_rate,
        "count": count,
        "slices": args.soak_slices,
        "size": args.soak_size,
        "value": summary["studies"] - summary["failed"],
        "unit": "studies done",
        "failed": summary["failed"],
        "failures": out["summary"]["failures"],
        "every_study_ended": len(ended) == len(out["studies"]),
        "latency_p50_s": summary["latency_p50_s"],
        "latency_p95_s": summary["latency_p95_s"],
        "samples": len(samples),
        # growth over the second half of the run (after warm-up): should be ~0
        "retention_s": args.retention,
        "growth_second_half": {k: (half[-1][k] or 0) - (half[0][k] or 0) for k in WATCHED},
        "first": {k: first[k] for k in WATCHED},
        "last": {k: last[k] for k in WATCHED},
    }
    return [record, *samples]


# ---------------------------------------------------------------------------- the run


def measure(service: Service, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    size = ["--slices", args.slices, "--size", args.size, "--timeout", 300]
    print(f"warm-up: one study of {args.slices} x {args.size}²", flush=True)
    warm = service.load(work / "warm.jsonl", "--count", 1, *size, timeout=900)
    records.append(
        {
            "case": "warmup",
            **describe(warm["studies"]),
            "value": describe(warm["studies"])["latency_p50_s"],
            "unit": "s",
        }
    )

    print(f"end-to-end latency: {args.latency_studies} studies, one at a time", flush=True)
    one: list[dict[str, Any]] = []
    for k in range(args.latency_studies):
        one += service.load(work / f"one-{k}.jsonl", "--count", 1, *size, timeout=900)["studies"]
    alone = describe(one)
    records.append(
        {
            "case": "e2e-latency",
            "system": "ours",
            "value": alone["latency_p50_s"],
            "unit": "s",
            "what": "last instance acknowledged -> SEG acknowledged by the PACS, one at a time",
            "grouping_timeout_s": args.grouping,
            "slices": args.slices,
            "size": args.size,
            "per_study": [
                {name: spans(s)[name] for name in SPANS} | {"latency": s["latency"]}
                for s in one
                if s["ok"]
            ],
            **alone,
        }
    )
    print(f"  p50 {alone['latency_p50_s']} s (after grouping {alone['after_grouping_p50_s']} s)")

    if args.only == "latency":
        return records
    base = alone["latency_p50_s"] or 1.0
    steps: list[dict[str, Any]] = []
    for rate in args.rates:
        count = max(args.step_min, round(rate * args.step_minutes))
        print(f"offered {rate}/min: {count} studies", flush=True)
        began, busy = time.monotonic(), machine_busy()[0]
        out = service.load(
            work / f"rate-{rate}.jsonl",
            "--count",
            count,
            "--rate",
            rate,
            "--modalities",
            args.modalities,
            *size,
            timeout=count * 60 / rate + 900,
        )
        d = describe(out["studies"])
        achieved = completion_rate(out["studies"])
        step = {
            "case": "throughput",
            "system": "ours",
            "offered_per_min": rate,
            "offered_per_hour": rate * 60,
            "value": achieved,
            "unit": "studies/h",
            "summary_studies_per_hour": out["summary"]["studies_per_hour"],
            "loadavg": os.getloadavg()[0],
            # every process's CPU over the step (/proc/stat), the service's and everyone else's
            "machine_busy_cores": round((machine_busy()[0] - busy) / (time.monotonic() - began), 2),
            **d,
        }
        steps.append(step)
        records.append(step)
        print(
            f"  done {d['studies'] - d['failed']}/{d['studies']}, {achieved} studies/h, "
            f"latency p50 {d['latency_p50_s']} s",
            flush=True,
        )
        behind = achieved is not None and achieved < 0.85 * rate * 60
        if d["failed"] or (d["latency_p50_s"] or 0) > 2 * base or behind:
            break
    kept = [
        s
        for s in steps
        if not s["failed"]
        and (s["latency_p50_s"] or 0) <= 2 * base
        and (s["value"] is None or s["value"] >= 0.85 * s["offered_per_hour"])
    ]
    knee = kept[-1] if kept else None
    past = steps[len(kept)] if len(kept) < len(steps) else None
    record = {
        "case": "knee",
        "system": "ours",
        "value": knee["offered_per_hour"] if knee else None,
        "unit": "studies/h offered",
        "reached": past is not None,
        "what": "the highest offered rate kept up with (latency p50 <= 2x one at a time, "
        "results >= 0.85x the offer, no failure)",
        "past_knee_offered_per_hour": past["offered_per_hour"] if past else None,
    }
    if past is not None:
        record["bottleneck"] = bottleneck(steps[0], past)
    records.append(record)
    return records


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The summary table of a run."""
    m = meta["machine"]
    lines = [
        f"# Load figures ({meta['date'][:10]}, commit {meta['commit'][:7]})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other sessions), "
        f"{m['memory_bytes'] / 2**30:.0f} GiB; load average {meta['loadavg_at_start'][0]:.2f} "
        f"at the start, {meta['loadavg_at_end'][0]:.2f} at the end; busy CPU over the run "
        f"{meta['machine_busy_cpu_s']} s in {meta['elapsed_s']} s. "
        f"`{' '.join(meta['argv'])}`.",
        "",
    ]
    for r in records:
        if r["case"] == "e2e-latency":
            lines += [
                "## End-to-end latency (one study at a time, warm pipeline, CPU only)",
                "",
                f"{r['slices']} slices of {r['size']}², ct-segmentation, {r['studies']} studies "
                f"({r['failed']} failed); grouping timeout {r['grouping_timeout_s']} s.",
                "",
                "| | p50 (s) |",
                "|---|---|",
                f"| last instance → SEG in the PACS | {r['latency_p50_s']} |",
                f"| of which grouping wait | {r['parts_p50_s']['grouping_wait']} |",
                f"| after the grouping wait | {r['after_grouping_p50_s']} |",
                f"| queued | {r['parts_p50_s']['queued']} |",
                f"| pipeline ran | {r['parts_p50_s']['ran']} |",
                f"| export to the PACS | {r['parts_p50_s']['export']} |",
                f"| (sending the study, first → last instance) | {r['parts_p50_s']['receive']} |",
                "",
                "Stages (mean run, s): "
                + ", ".join(f"{k} {v['run_s']}" for k, v in r["stages"].items()),
                "",
                f"Goal: under 2 s plus the grouping wait: "
                f"{'met' if (r['after_grouping_p50_s'] or 99) < 2 else 'not met'}.",
                "",
            ]
    steps = [r for r in records if r["case"] == "throughput"]
    if steps:
        lines += [
            "## Throughput against offered load",
            "",
            "| offered /h | results /h | latency p50 (s) | p95 (s) | failed | busy cores |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['offered_per_hour']} | {s['value']} | {s['latency_p50_s']} | "
            f"{s['latency_p95_s']} | {s['failed']} | {s['machine_busy_cores']} |"
            for s in steps
        ]
        lines.append("")
    for r in records:
        if r["case"] == "knee":
            if r["value"] is None:
                lines.append("Knee: not even the lowest rate was kept up with.")
            else:
                lines.append(f"Knee: {r['value']} studies/h offered.")
            if "bottleneck" in r:
                b = r["bottleneck"]
                lines.append(
                    f"Past it ({r['past_knee_offered_per_hour']}/h) the time grew most "
                    f"in `{b['part']}`; the stage whose wait + run grew most: "
                    f"`{b['stage']}`; the slowest stage: `{b['slowest_stage']}`."
                )
            elif r["value"] is not None:
                lines.append("The highest rate tried was still kept up with: the knee is above.")
            lines.append("")
        if r["case"] == "soak-summary":
            lines += [
                f"## Soak ({r['minutes']} min, {r['rate_per_min']} studies/min, "
                f"{r['slices']} x {r['size']}²)",
                "",
                f"{r['value']} of {r['count']} studies done, {r['failed']} failed "
                f"({r['failures']}); every study ended: {r['every_study_ended']}. "
                f"Latency p50 {r['latency_p50_s']} s, p95 {r['latency_p95_s']} s. The service "
                f"kept a finished job's files {r.get('retention_s')} s (its retention).",
                "",
                "| | first sample | last sample | growth over the second half |",
                "|---|---|---|---|",
            ]
            for k in WATCHED:
                lines.append(
                    f"| {k} | {r['first'][k]} | {r['last'][k]} | {r['growth_second_half'][k]} |"
                )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer studies and rates (< 5 min)")
    parser.add_argument("--json", type=Path, help="write the records here (and provenance)")
    parser.add_argument("--markdown", type=Path, help="write the summary table here")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--grouping", type=float, default=2.0, help="the receiver's grouping timeout, seconds"
    )
    parser.add_argument("--latency-studies", type=int, default=None)
    parser.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="offered rates, studies a minute, rising",
    )
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=("latency",),
        help="latency: only the end-to-end latency figure (no throughput steps)",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="minutes of soak instead of the latency and throughput figures",
    )
    parser.add_argument("--soak-rate", type=float, default=2.0, help="studies a minute")
    parser.add_argument("--soak-slices", type=int, default=48)
    parser.add_argument("--soak-size", type=int, default=256)
    parser.add_argument(
        "--retention",
        type=float,
        default=120.0,
        help="soak: seconds a finished job's files are kept (the service's "
        "retention; without one the state folder grows with every study)",
    )
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.latency_studies is None:
        args.latency_studies = 3 if args.quick else 6
    if args.rates is None:
        args.rates = [4.0, 12.0, 24.0] if args.quick else [2.0, 8.0, 16.0, 24.0, 32.0, 40.0, 48.0]
    args.step_min = 3 if args.quick else 4
    args.step_minutes = 0.5 if args.quick else 1.0
    if shutil.which("storescp") is None:
        raise SystemExit("dcmtk's storescp is not installed (apt-get install dcmtk)")
    enter_private_network()

    meta = {
        **run_header(),
        "mode": "soak" if args.soak else (args.only or ("quick" if args.quick else "full")),
        "argv": sys.argv,
        "machine": machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
    }
    meta["settings"] = json.loads(json.dumps(meta["settings"], default=str))
    started, busy = time.perf_counter(), machine_busy()
    work = Path(tempfile.mkdtemp(prefix="dataflow-load-figures-"))
    retention = args.retention if args.soak else None
    service = Service(work, args.grouping, max(args.modalities, 1), retention)
    try:
        records = soak(service, args, work) if args.soak else measure(service, args, work)
    finally:
        service.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta.update(run_footer(started, busy))
    text = markdown(records, meta)
    print(text)
    if args.json:
        write_results(args.json, records, meta)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
