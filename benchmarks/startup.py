"""Cold and warm start of the README's main job and of ``dataflow serve``, before and after.

Measures, for two source trees side by side (``--before REV``, checked out into a temporary
``git worktree``, and this tree), alternating within each round:

- ``run-cold`` / ``run-warm``: the README's main command,
  ``dataflow run pipelines/ct-segmentation.yaml --input samples/ct --output output`` on one
  64x192² phantom study, each in a new process; cold with an empty Numba cache (a fresh
  ``NUMBA_CACHE_DIR``), warm with the cache that tree's earlier run filled. Recorded: end to end
  (process start to exit), time to the job's result (its ``job_succeeded`` log line), time to
  the first job's start (``pipeline_ready``/``stage_ready`` of ``load``, where the tree logs it),
  and the stages' own busy time (``summary.json``);
- ``serve-cold`` / ``serve-warm``: ``dataflow serve examples/service.yaml`` (its two pipelines)
  from process start to ``service_started``, then SIGTERM.

Each record has the machine's 1-minute load average before and after it. Results go to
``--json`` (default ``benchmarks/results/startup-<date>.json``, with ``.provenance.json``) and a
Markdown table to the same name with ``.md``. Asserts nothing. Run it alone (others' CPU use
shows in every figure): a ``flock`` shared with the other benchmark runs when the machine is shared.

    .venv/bin/python benchmarks/startup.py --before ab32be5 --rounds 3
    .venv/bin/python benchmarks/startup.py --quick          # one round, run only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, git, loadavg, machine, machine_busy, run_footer, run_header, write_results

PIPELINE = "pipelines/ct-segmentation.yaml"
SERVICE = "examples/service.yaml"
#: the console script the README runs (it imports ``dataflow`` from PYTHONPATH: the tree's)
DATAFLOW = str(Path(sys.executable).parent / "dataflow")


def _ts(line: dict) -> float | None:
    stamp = line.get("timestamp")
    if not stamp:
        return None
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _env(tree: Path, cache: Path, state: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache)}
    env.pop("DATAFLOW_WORKER_START", None)
    if state is not None:
        env.update(
            DATAFLOW_STATE=str(state), DATAFLOW_LOG_FORMAT="json", DICOM_PORT=str(_free_port())
        )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(tree: Path, cache: Path, samples: Path, work: Path) -> dict[str, Any]:
    """The README's main job in a new process; its figures."""
    out = work / "output"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        DATAFLOW, "run", PIPELINE, "--input", str(samples),
        "--output", str(out), "--log-format", "json", "--no-progress",
    ]  # fmt: skip
    t0 = time.time()
    done = subprocess.run(cmd, cwd=tree, env=_env(tree, cache), capture_output=True, text=True)
    total = time.time() - t0
    lines = _json_lines(done.stderr + done.stdout)
    record: dict[str, Any] = {"ok": done.returncode == 0, "end_to_end_s": round(total, 3)}
    if done.returncode != 0:
        record["error"] = (done.stderr or done.stdout)[-2000:]
        return record
    for line in lines:
        event, at = line.get("event"), _ts(line)
        if at is None:
            continue
        if event == "job_succeeded" and "result_s" not in record:
            record["result_s"] = round(at - t0, 3)
        elif event == "stage_ready" and line.get("stage") == "load":
            record["first_job_start_s"] = round(at - t0, 3)  # load is the job's first stage
        elif event == "pipeline_ready":
            record["pipeline_ready_s"] = round(at - t0, 3)
        elif event == "pipeline_stalled":
            record["stalled_warnings"] = record.get("stalled_warnings", 0) + 1
    summary = json.loads((out / "summary.json").read_text())
    record["busy_s"] = round(sum(s["busy_seconds"] for s in summary["stages"].values()), 3)
    record["end_to_end_over_busy"] = round(total / record["busy_s"], 2)
    return record


def serve_once(tree: Path, cache: Path, work: Path, limit: float) -> dict[str, Any]:
    """``dataflow serve`` from process start to ``service_started``, then SIGTERM."""
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    cmd = [DATAFLOW, "serve", SERVICE]
    log = work / "serve.log"
    t0 = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=tree, env=_env(tree, cache, state), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        record: dict[str, Any] = {"ok": False}
        try:
            deadline = t0 + limit
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
                text = log.read_text()
                if "service_started" in text:
                    record.update(ok=True, service_started_s=round(time.time() - t0, 3))
                    for line in _json_lines(text):
                        if line.get("event") == "service_started" and _ts(line):
                            record["service_started_s"] = round(_ts(line) - t0, 3)
                    break
            if not record["ok"]:
                record["error"] = log.read_text()[-2000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    first_output = next((_ts(line) for line in _json_lines(text) if _ts(line) is not None), None)
    if first_output is not None:
        record["first_log_line_s"] = round(first_output - t0, 3)
    record["progress_events"] = sum(
        line.get("event") in ("stage_starting", "stage_ready", "pipeline_ready")
        for line in _json_lines(text)
    )
    return record


@contextlib.contextmanager
def before_tree(rev: str):
    path = Path(tempfile.mkdtemp(prefix="startup-before-"))
    shutil.rmtree(path)
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)])


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for case in ("run-cold", "run-warm", "serve-cold", "serve-warm"):
        for tree in ("before", "after"):
            mine = [r for r in records if r["case"] == case and r["tree"] == tree]
            if not mine:
                continue
            keys = ["end_to_end_s", "result_s", "first_job_start_s", "busy_s",
                    "end_to_end_over_busy", "service_started_s", "first_log_line_s"]  # fmt: skip
            row = {"case": case, "tree": tree, "n": len(mine), "ok": sum(r["ok"] for r in mine)}
            for key in keys:
                row[key] = _median([r.get(key) for r in mine])
            row["stalled_warnings"] = sum(r.get("stalled_warnings", 0) for r in mine)
            row["load_before"] = [r["load_before"] for r in mine]
            rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    cols = [
        ("case", "case"), ("tree", "tree"), ("n", "n ok"), ("end_to_end_s", "end to end s"),
        ("first_job_start_s", "first job start s"), ("result_s", "result s"),
        ("busy_s", "stages busy s"), ("end_to_end_over_busy", "end to end / busy"),
        ("service_started_s", "service_started s"), ("first_log_line_s", "first log line s"),
        ("stalled_warnings", "stall warnings"), ("load_before", "load avg before each"),
    ]  # fmt: skip
    out = [
        f"# Start-up, {meta['date']}",
        "",
        f"before: `{meta['before']}`, after: `{meta['commit']}` (+ uncommitted: "
        f"{len(meta['uncommitted_changes'])} paths); {meta['machine']['cores']} cores, "
        f"{meta['machine']['cpu']}; load average at start {meta['loadavg_at_start']}, "
        f"at end {meta['loadavg_at_end']}. Medians of {meta['rounds']} alternating round(s).",
        "",
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        cells = []
        for key, _ in cols:
            value = row.get(key)
            if key == "n":
                value = f"{row['n']} {row['ok']}"
            cells.append("–" if value is None else str(value))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=None, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, run cases only")
    parser.add_argument("--no-serve", action="store_true", help="skip the serve cases")
    parser.add_argument("--serve-limit", type=float, default=300.0, help="seconds to wait")
    parser.add_argument("--json", default=None, help="results file (.json)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    serve = not (args.quick or args.no_serve)
    started, busy0 = time.perf_counter(), machine_busy()
    meta: dict[str, Any] = {
        **run_header(), "before": args.before, "rounds": rounds, "argv": sys.argv,
        "machine": machine(), "loadavg_at_start": list(os.getloadavg()),
    }  # fmt: skip
    meta["before_commit"] = git("rev-parse", args.before) if args.before else None
    records: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    with contextlib.ExitStack() as stack:
        trees = {"after": ROOT}
        if args.before:
            trees = {"before": stack.enter_context(before_tree(args.before)), "after": ROOT}
        samples = work / "samples" / "ct"
        subprocess.run(
            [sys.executable, "-m", "operators.dicom.phantom", str(samples / "study-1"),
             "--slices", "64", "--size", "192", "--oblique", "--shuffle"],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        warm = {name: work / f"numba-warm-{name}" for name in trees}
        for name, tree in trees.items():  # fill each tree's warm cache (not measured)
            run_once(tree, warm[name], samples, work / f"prime-{name}")

        def measure(case: str, name: str, fn, *fn_args) -> None:
            load = loadavg()
            record = fn(*fn_args)
            record.update(case=case, tree=name, load_before=load, load_after=loadavg())
            records.append(record)
            figures = {k: v for k, v in record.items() if k.endswith("_s") or k == "ok"}
            print(case, name, figures, flush=True)

        cases = [("run-cold", run_once, "cold"), ("run-warm", run_once, "warm")]
        if serve:
            cases += [("serve-cold", serve_once, "cold"), ("serve-warm", serve_once, "warm")]
        for r in range(rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for case, fn, cache in cases:
                for name in order:
                    job = work / f"{name}-{r}"
                    job.mkdir(parents=True, exist_ok=True)
                    numba = warm[name] if cache == "warm" else job / f"numba-{case}"
                    extra = (samples, job) if fn is run_once else (job, args.serve_limit)
                    measure(case, name, fn, trees[name], numba, *extra)
    shutil.rmtree(work, ignore_errors=True)
    meta.update(run_footer(started, busy0))
    rows = summarize(records)
    target = Path(
        args.json or ROOT / "benchmarks" / "results" / f"startup-{datetime.date.today()}.json"
    )
    write_results(target, records, meta)
    md = markdown(rows, meta)
    target.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
