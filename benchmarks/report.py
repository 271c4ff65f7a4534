"""One benchmark report: an HTML page with PNG plots from the benchmarks' results files.

```
.venv/bin/python benchmarks/report.py                    # from benchmarks/results/ (committed)
.venv/bin/python benchmarks/report.py --run quick        # run every benchmark, then report
.venv/bin/python benchmarks/report.py --results DIR --out DIR/report
```

By default it reads the latest results of each benchmark in ``--results`` (the
``NAME-DATE[TAG].json`` files with their ``.provenance.json``: the latest full run by the
provenance's date, else the latest quick one) and writes ``--out``/index.html (default
``benchmarks/results/report/``) with one PNG per figure beside it:

- each benchmark's ratio against its peers (> 1: ours better, on a log axis);
- the store's handoff latency against size (log-log) with the raw shared-memory floor;
- DICOM ingest and export rates against DCMTK, Orthanc and pynetdicom;
- kernel speed-ups on the CPU (operators.py) and on a GPU (gpu.py);
- ``dataflow load``: the end-to-end latency of each study (its parts) and throughput
  against offered load (load_figures.py); the soak's memory and file counts over time;
- the machine and the load on it during each run (from the provenance).

Every figure names its file, date and commit. A benchmark without results gives a section
that says "not measured yet". The same inputs give the same bytes (no dates in the PNGs, no
time of making in the page), so running it again does not change what is committed.

``--run quick|full`` first runs each benchmark script (store, engine, operators, dicom,
startup, platform_api, peers: kernels, and pipelines when MONAI's venv exists; gpu, skipped
without a GPU; load_figures) with ``--json`` into ``--run-dir`` (default
``benchmarks/results/runs/<UTC time>``) and reports from there, falling back to
``--results`` for a benchmark that wrote nothing. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import datetime
import html
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = re.compile(
    r"^(?P<kind>[a-z_]+(?:-[a-z0-9_]+)*?)-(?P<date>\d{4}-\d{2}-\d{2})(?P<tag>.*)\.json$"
)
LOWER_IS_BETTER = ("us", "ms", "s", "ns")
PNG_META = {"Software": None}  # no matplotlib version; PNGs carry no date anyway
PEER_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
COLOURS = {"ours": "#1f77b4", "peer": "#999999", "floor": "#2ca02c"}


# ---------------------------------------------------------------------------- results files


@dataclass
class Result:
    """One benchmark's results file and its provenance."""

    kind: str
    path: Path
    records: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def source(self) -> str:
        """Where a figure's data came from: file, date, commit."""
        commit = str(self.meta.get("commit", "unknown"))[:7]
        return f"{self.path.name}, {self.meta.get('date', 'date unknown')}, commit {commit}"


def find_results(folder: Path) -> dict[str, Result]:
    """The latest results file of each kind in ``folder``: full runs before quick ones, then
    by the provenance's date, then by name."""
    found: dict[str, list[Result]] = {}
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.name)
        if match is None or path.name.endswith(".provenance.json"):
            continue
        side = path.with_name(path.name.removesuffix(".json") + ".provenance.json")
        try:
            records = json.loads(path.read_text())
            meta = json.loads(side.read_text()) if side.is_file() else {}
        except (OSError, ValueError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(records, list):
            continue
        kind = match["kind"]
        found.setdefault(kind, []).append(Result(kind, path, records, meta))

    def order(r: Result) -> tuple:
        return (r.meta.get("mode") != "quick", str(r.meta.get("date", "")), r.path.name)

    return {kind: max(results, key=order) for kind, results in found.items()}


def newest(
    results: dict[str, Result], kinds: tuple[str, ...], has: Callable[[dict[str, Any]], bool]
) -> Result | None:
    """Of the kinds' latest files, the newest (by the provenance's date) holding a record
    that ``has`` accepts: e.g. the end-to-end latency measured alone (load-latency) after
    the whole load run (load)."""
    found = [r for k in kinds if (r := results.get(k)) and any(map(has, r.records))]
    return max(found, key=lambda r: (str(r.meta.get("date", "")), r.path.name), default=None)


def case_is(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record.get("case") == name


def first_case(result: Result | None, name: str) -> dict[str, Any] | None:
    """``result``'s first record of case ``name``, if any."""
    return next((x for x in (result.records if result else []) if x.get("case") == name), None)


def e2e_latency(results: dict[str, Result]) -> tuple[Result | None, dict[str, Any] | None]:
    """The newest end-to-end latency: measured alone (load-latency) or in a load run."""
    found = newest(results, ("load", "load-latency"), case_is("e2e-latency"))
    return found, first_case(found, "e2e-latency")


def soak_result(results: dict[str, Result]) -> Result | None:
    """The longest soak (load-soak, load-soak-60, ...), the newest of equal length."""
    soaks = [
        (summary.get("minutes") or 0, str(r.meta.get("date", "")), r.path.name, r)
        for kind, r in results.items()
        if kind.startswith("load-soak")
        for summary in r.records
        if summary.get("case") == "soak-summary"
    ]
    return max(soaks, key=lambda x: x[:3])[3] if soaks else None


def ingest_result(results: dict[str, Result]) -> Result | None:
    """The newest DICOM ingest figures: the whole DICOM benchmark or an ingest-only run."""
    return newest(
        results, ("dicom", "ingest-journal"), lambda x: str(x.get("case")).startswith("ingest-")
    )


def value(record: dict[str, Any]) -> float | None:
    v = record.get("value", record.get("median_ms"))
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def ours_better(ours: float, peer: float, unit: str) -> float | None:
    """How many times better ours is than the peer (> 1: ours better), by the unit."""
    if ours <= 0 or peer <= 0:
        return None
    lower = unit.split()[0] in LOWER_IS_BETTER
    return peer / ours if lower else ours / peer


def peer_ratios(result: Result) -> list[tuple[str, float]]:
    """(label, ours-better ratio) of every case where ours and a peer were both measured;
    speed-up records (unit x, against a baseline) are taken as they are."""
    out: list[tuple[str, float]] = []
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in result.records:
        case = str(r.get("case", ""))
        if case.startswith(("goal", "context", "jit", "speedup")) or "1page" in case:
            if case.startswith("speedup") and value(r) and r.get("against"):
                out.append(
                    (f"{r.get('kernel', case)} {r.get('size', '')} vs {r['against']}", value(r))
                )
            continue
        by_case.setdefault(case + str(r.get("shape", "")), []).append(r)
    if out:  # operators: its own speed-ups, one per kernel, size and baseline
        return out
    for case, records in by_case.items():
        ours = next((r for r in records if r.get("system") in ("ours", "engine")), None)
        if ours is None or value(ours) is None:
            continue
        for r in records:
            system = str(r.get("system"))
            if system.startswith("ours") or system in ("engine", "ratio", "None") or r is ours:
                continue
            v = value(r)
            unit = str(ours.get("unit", "ms" if "median_ms" in ours else ""))
            ratio = None if v is None else ours_better(value(ours), v, unit)
            if ratio is not None:
                out.append((f"{case} vs {system}", ratio))
    return out


# ---------------------------------------------------------------------------- figures


class Figures:
    """Makes the PNGs in ``out``, each with its source line, always the same bytes."""

    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matplotlib.rcParams.update(
            {"svg.hashsalt": "dataflow", "font.size": 9, "figure.dpi": 100, "savefig.dpi": 100}
        )
        self.plt, self.out = plt, out

    def save(self, fig: Any, name: str, sources: list[str]) -> str:
        fig.text(
            0.01,
            0.005,
            "data: " + "; ".join(sources),
            fontsize=7,
            color="#555555",
            ha="left",
            va="bottom",
            wrap=True,
        )
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(self.out / name, format="png", metadata=PNG_META)
        self.plt.close(fig)
        return name

    def bars(
        self,
        name: str,
        title: str,
        rows: list[tuple[str, float]],
        xlabel: str,
        sources: list[str],
        log: bool = True,
        line: float | None = 1.0,
    ) -> str:
        height = 1.2 + 0.22 * len(rows)
        fig, ax = self.plt.subplots(figsize=(8, height))
        labels = [label for label, _ in rows]
        values = [v for _, v in rows]
        colours = [COLOURS["ours"] if v >= (line or 0) else "#d62728" for v in values]
        ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        if line is not None:
            ax.axvline(line, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        return self.save(fig, name, sources)


# ---------------------------------------------------------------------------- sections


@dataclass
class Section:
    key: str
    title: str
    text: str  # HTML
    images: list[str]
    sources: list[str]


def not_measured(key: str, title: str, what: str) -> Section:
    return Section(
        key, title, f"<p class='missing'>not measured yet: {html.escape(what)}</p>", [], []
    )


def section_ratios(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "ratios", "Each benchmark against its peers"
    images, sources = [], []
    kinds = [
        k
        for k in (
            "store",
            "engine",
            "operators",
            "dicom",
            "ingest-journal",
            "peers",
            "peers-kernels",
            "peers-pipelines",
            "platform_api",
        )
        if k in results
    ]
    for kind in kinds:
        r = results[kind]
        rows = peer_ratios(r)
        if kind == "platform_api":
            rows = [(f"{x['case']} vs cp", x["vs_cp"]) for x in r.records if x.get("vs_cp")]
        if not rows:
            continue
        images.append(
            fig.bars(
                f"ratios-{kind}.png",
                f"{kind}: ours against peers",
                rows,
                "times better than the peer (> 1: ours better, log)",
                [r.source],
            )
        )
        sources.append(r.source)
    if not images:
        return not_measured(key, title, "no store, engine, operators, dicom or peers results")
    text = (
        "<p>For every case measured with ours and a peer: the peer's time over ours (or our "
        "rate over the peer's). Above 1 (blue) ours is better; red bars are where a peer "
        "wins. Operators: the speed-up of our kernels over NumPy and SciPy.</p>"
    )
    return Section(key, title, text, images, sources)


def section_store(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "store", "Store: handoff latency against size"
    r = results.get("store")
    rows = [
        x
        for x in (r.records if r else [])
        if str(x.get("case", "")).startswith("handoff-") and "1page" not in x["case"]
    ]
    if not rows:
        return not_measured(key, title, "no store results (benchmarks/store.py)")
    f, ax = fig.plt.subplots(figsize=(7, 4.5))
    for system in sorted({x["system"] for x in rows}):
        pts = sorted((x["size_bytes"], x["value"]) for x in rows if x["system"] == system)
        style = {"color": COLOURS["floor"], "linestyle": "--"} if system == "shm-pipe" else {}
        if system == "ours":
            style = {"color": COLOURS["ours"], "linewidth": 2}
        label = "shm-pipe (raw shared memory: the floor)" if system == "shm-pipe" else system
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("object size (bytes)")
    ax.set_ylabel(f"handoff latency p50 ({rows[0]['unit']})")
    ax.set_title("Producer process → consumer process holding the array")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    image = fig.save(f, "store-handoff.png", [r.source])
    return Section(
        key,
        title,
        "<p>Lower is better; the dashed line is the floor: a raw "
        "SharedMemory segment's name over a pipe.</p>",
        [image],
        [r.source],
    )


def grouped(
    fig: Figures,
    ax: Any,
    cases: list[str],
    systems: list[str],
    get: Callable[[str, str], float | None],
) -> None:
    width = 0.8 / max(1, len(systems))
    ours = [x for x in systems if x.startswith("ours")]
    peers = [x for x in systems if not x.startswith("ours")]
    for k, system in enumerate(systems):
        xs = [i + k * width for i in range(len(cases))]
        ys = [get(case, system) or 0 for case in cases]
        if system in ours:  # ours in blues, peers in the cycle's other colours
            colour = ("#1f77b4", "#6baed6", "#9ecae1", "#c6dbef")[min(ours.index(system), 3)]
        else:
            colour = PEER_COLOURS[peers.index(system) % len(PEER_COLOURS)]
        ax.bar(xs, ys, width, label=system, color=colour)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases)
    ax.legend(fontsize=7, ncol=2)


def section_dicom(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "dicom", "DICOM: ingest and export against DCMTK, Orthanc and pynetdicom"
    got = {
        "ingest": ingest_result(results),
        "export": newest(results, ("dicom",), lambda x: str(x.get("case")).startswith("export-")),
    }
    rows = [
        x
        for prefix, r in got.items()
        for x in (r.records if r else [])
        if str(x.get("case", "")).startswith(prefix + "-")
    ]
    if not rows:
        return not_measured(key, title, "no DICOM results (benchmarks/dicom.py)")
    sources = list(dict.fromkeys(r.source for r in got.values() if r is not None))
    f, axes = fig.plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, prefix in zip(axes, ("ingest", "export"), strict=True):
        part = [x for x in rows if x["case"].startswith(prefix)]
        cases = sorted({x["case"] for x in part})
        systems = sorted({x["system"] for x in part}, key=lambda s: (not s.startswith("ours"), s))
        table = {(x["case"], x["system"]): x["value"] for x in part}
        grouped(fig, ax, cases, systems, lambda c, s, t=table: t.get((c, s)))
        ax.set_ylabel("instances/s (higher is better)")
        ax.set_title(f"{prefix} (case: associations)")
    image = fig.save(f, "dicom-rates.png", sources)
    text = (
        "<p>storescp / storescu are DCMTK (storescp does not fsync); orthanc is Orthanc; "
        "pynetdicom-* are pynetdicom SCPs. The number after the case is the number of "
        "associations.</p>"
    )
    goals = ingest_goals(rows)
    if goals:
        cells = "".join(
            f"<tr><td>{html.escape(ours)}</td><td>{html.escape(case)}</td>"
            f"<td>{_ratio(vs_orthanc, 1.0)}</td><td>{_ratio(vs_storescp, 0.5)}</td></tr>"
            for ours, case, vs_orthanc, vs_storescp in goals
        )
        text += (
            "<p>Ingest goals (issue 15 §3: ahead of Orthanc everywhere, at least 0.5x "
            "storescp, with fsync on):</p><table><tr><th>ours</th><th>case</th>"
            f"<th>x Orthanc (goal 1)</th><th>x storescp (goal 0.5)</th></tr>{cells}</table>"
        )
    return Section(key, title, text, [image], sources)


def ingest_goals(rows: list[dict[str, Any]]) -> list[tuple[str, str, float | None, float | None]]:
    """(ours system, case, ours/Orthanc, ours/storescp) for each ingest case, for the systems
    that are ours and on by default (ours, ours-2p; not a previous design kept as baseline)."""
    rate = {(x["case"], x["system"]): value(x) for x in rows if x["case"].startswith("ingest-")}
    out = []
    for case in sorted({c for c, _ in rate}):
        for ours in ("ours", "ours-2p"):
            mine = rate.get((case, ours))
            if not mine:
                continue
            orthanc, storescp = rate.get((case, "orthanc")), rate.get((case, "storescp"))
            out.append(
                (
                    ours,
                    case,
                    round(mine / orthanc, 2) if orthanc else None,
                    round(mine / storescp, 2) if storescp else None,
                )
            )
    return out


def _ratio(ratio: float | None, goal: float) -> str:
    if ratio is None:
        return "<span class='missing'>not measured</span>"
    return f"{ratio:g} ({'met' if ratio >= goal else '<b>not met</b>'})"


def section_kernels(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "kernels", "Kernel speed-ups: CPU and GPU"
    images, sources, notes = [], [], []
    r = results.get("operators")
    rows = [
        (f"{x['kernel']} {x['size']} vs {x['against']}", value(x))
        for x in (r.records if r else [])
        if str(x.get("case", "")).startswith("speedup") and value(x)
    ]
    if rows:
        images.append(
            fig.bars(
                "kernels-cpu.png",
                "CPU: our Numba kernels (every core)",
                rows,
                "speed-up over the baseline (x, log)",
                [r.source],
            )
        )
        sources.append(r.source)
    else:
        notes.append("CPU kernels: not measured yet (benchmarks/operators.py)")
    g = results.get("gpu")
    kern = [
        x
        for x in (g.records if g else [])
        if x.get("case") == "kernel" and x.get("system") in ("cuda-resident", "cuda-host")
    ]
    if kern:
        f, ax = fig.plt.subplots(figsize=(8, 1.2 + 0.22 * len(kern)))
        labels = [
            f"{x['kernel']} {x['size']}{'³' if str(x['size']).isdigit() else ''} {x['system']}"
            for x in kern
        ]
        ax.barh(
            range(len(kern)),
            [x["speedup_vs_cpu"] for x in kern],
            color=[
                COLOURS["ours"] if x["system"] == "cuda-resident" else COLOURS["peer"] for x in kern
            ],
        )
        ax.set_yticks(range(len(kern)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1, color="black", linewidth=0.8)
        ax.set_xlabel("speed-up of the CUDA kernel over our CPU kernel on that machine (x, log)")
        gpu = g.meta.get("gpu", "a GPU")
        ax.set_title(
            f"GPU: {gpu}\nresident: data already on the GPU; host: with the copies", fontsize=9
        )
        images.append(fig.save(f, "kernels-gpu.png", [g.source]))
        sources.append(g.source)
    else:
        notes.append("GPU kernels: not measured yet (benchmarks/gpu.py needs a GPU)")
    if not images:
        return not_measured(key, title, "; ".join(notes))
    text = "".join(f"<p class='missing'>{html.escape(n)}</p>" for n in notes)
    return Section(key, title, text, images, sources)


def section_load(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "load", "dataflow load: end-to-end latency and throughput"
    r = newest(results, ("load",), case_is("throughput"))
    lr, e2e = e2e_latency(results)
    steps = [x for x in (r.records if r else []) if x.get("case") == "throughput"]
    if e2e is None and not steps:
        return not_measured(key, title, "no load results (benchmarks/load_figures.py)")
    images, text = [], ""
    if e2e is not None and e2e.get("per_study"):
        per = e2e["per_study"]
        parts = [
            ("grouping_wait", "grouping wait", "#cccccc"),
            ("queued", "queued", "#ff7f0e"),
            ("ran", "pipeline", COLOURS["ours"]),
            ("export", "export to PACS", "#2ca02c"),
        ]
        f, (ax, hist) = fig.plt.subplots(1, 2, figsize=(10, 4))
        left = [0.0] * len(per)
        for name, label, colour in parts:
            widths = [s.get(name) or 0 for s in per]
            ax.barh(range(len(per)), widths, left=left, label=label, color=colour)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_yticks(range(len(per)), [f"study {k + 1}" for k in range(len(per))])
        ax.invert_yaxis()
        ax.set_xlabel("seconds after the last instance was acknowledged")
        ax.set_title(f"{e2e['slices']} x {e2e['size']}² CT, one at a time")
        ax.legend(fontsize=7)
        curves = [("one at a time", [s["latency"] for s in per])]
        curves += [
            (f"{x['offered_per_hour']:g}/h offered", x.get("latency_s") or []) for x in steps
        ]
        for label, values in curves:
            values = sorted(values)
            if values:
                share = [(k + 1) / len(values) for k in range(len(values))]
                hist.step(values, share, where="post", label=label)
        hist.set_xlabel("latency: last instance → SEG in the PACS (s)")
        hist.set_ylabel("share of studies at or below")
        hist.set_ylim(0, 1.05)
        hist.legend(fontsize=7)
        hist.set_title("latency distribution (each offered load)")
        images.append(
            fig.save(f, "load-latency.png", list(dict.fromkeys(x.source for x in (lr, r) if x)))
        )
        goal = (e2e.get("after_grouping_p50_s") or math.inf) < 2
        text += (
            f"<p>End to end (p50): {e2e['latency_p50_s']} s, of which the grouping wait "
            f"{e2e['parts_p50_s']['grouping_wait']} s (the receiver's timeout "
            f"{e2e['grouping_timeout_s']} s); after it {e2e['after_grouping_p50_s']} s. "
            f"Goal (under 2 s plus the grouping wait): {'met' if goal else 'not met'}.</p>"
        )
    if steps:
        f, ax = fig.plt.subplots(figsize=(7, 4.5))
        offered = [s["offered_per_hour"] for s in steps]
        ax.plot(offered, offered, color=COLOURS["peer"], linestyle=":", label="offered")
        ax.plot(
            offered,
            [s["value"] or 0 for s in steps],
            marker="o",
            color=COLOURS["ours"],
            label="results in the PACS",
        )
        ax.set_xlabel("offered load (studies/h)")
        ax.set_ylabel("results (studies/h)")
        lat = ax.twinx()
        lat.plot(
            offered,
            [s["latency_p50_s"] or 0 for s in steps],
            marker="s",
            color="#d62728",
            label="latency p50 (s)",
        )
        lat.set_ylabel("latency p50 (s)", color="#d62728")
        knee = next((x for x in r.records if x.get("case") == "knee"), None)
        if knee and knee.get("value"):
            ax.axvline(knee["value"], color="black", linestyle="--", linewidth=0.8)
            ax.annotate(
                "knee",
                (knee["value"], 0.97),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                ha="right",
            )
        ax.legend(loc="upper left", fontsize=7)
        ax.set_title("Throughput against offered load")
        images.append(fig.save(f, "load-throughput.png", [r.source]))
        if knee:
            text += f"<p>Knee: {knee.get('value')} studies/h offered"
            b = knee.get("bottleneck")
            if b:
                text += (
                    f"; past it ({knee['past_knee_offered_per_hour']}/h) the time grew "
                    f"most in <code>{html.escape(b['part'])}</code>, the stage whose wait "
                    f"and run grew most: <code>{html.escape(str(b['stage']))}</code>"
                )
            elif knee.get("value"):
                text += "; the highest rate tried was still kept up with"
            text += ".</p>"
    sources = list(dict.fromkeys(x.source for x in (lr, r) if x is not None))
    return Section(key, title, text, images, sources)


def section_soak(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "soak", "Soak: memory and file counts over time"
    r = soak_result(results)
    samples = [x for x in (r.records if r else []) if x.get("case") == "soak-sample"]
    if not samples:
        return not_measured(key, title, "no soak results (benchmarks/load_figures.py --soak)")
    t = [s["t_s"] / 60 for s in samples]
    f, axes = fig.plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    panels = [
        ("rss_bytes", "RSS of the service's processes (MiB)", 2**20),
        ("open_files", "open files (all processes)", 1),
        ("threads", "threads (all processes)", 1),
        ("state_bytes", "state folder (MiB)", 2**20),
        ("store_used_bytes", "store: budget in use (MiB)", 2**20),
        ("pacs_files", "results in the PACS (files)", 1),
    ]
    for ax, (name, label, scale) in zip(axes.flat, panels, strict=True):
        ax.plot(t, [(s.get(name) or 0) / scale for s in samples], color=COLOURS["ours"])
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    image = fig.save(f, "soak.png", [r.source])
    summary = next((x for x in r.records if x.get("case") == "soak-summary"), {})
    text = (
        f"<p>{summary.get('value')} of {summary.get('count')} studies done, "
        f"{summary.get('failed')} failed, over {summary.get('minutes')} minutes at "
        f"{summary.get('rate_per_min')} studies a minute; every study ended (a result or "
        f"a failure record): {summary.get('every_study_ended')}. The service removed a "
        f"finished job's files after {summary.get('retention_s')} s (its retention); the "
        "store's budget in use is sampled between studies, so 0 there means every object "
        "was released.</p>"
    )
    return Section(key, title, text, [image], [r.source])


def section_ray(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "ray", "Ray: the same pipeline on a cluster, and what a hop costs"
    r = results.get("ray")
    runs = [x for x in (r.records if r else []) if x.get("steady_series_per_min")]
    hops = [x for x in (r.records if r else []) if str(x.get("case")).startswith("per-hop-")]
    if not runs and not hops:
        return not_measured(key, title, "no Ray results (benchmarks/ray.py)")
    f, axes = fig.plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    labels = [f"{x['system']} ({x['case']})" for x in runs]
    ax.barh(range(len(runs)), [x["steady_series_per_min"] for x in runs], color=COLOURS["ours"])
    ax.set_yticks(range(len(runs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("series per minute, steady state (higher is better)")
    if runs:
        ax.set_title(f"ct-segmentation, {runs[0].get('slices')} x {runs[0].get('size')}²")
    sizes = {"4KiB": 4096, "1MiB": 1 << 20, "64MiB": 64 << 20}
    for system in sorted({x["system"] for x in hops}):
        pts = sorted(
            (sizes.get(x["case"].removeprefix("per-hop-"), 0), value(x) or 0)
            for x in hops
            if x["system"] == system
        )
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("array size (bytes)")
    axes[1].set_ylabel("one hop between stages (ms, lower is better)")
    axes[1].set_title("Per hop: local, Ray within a node, Ray across nodes")
    axes[1].legend(fontsize=7)
    image = fig.save(f, "ray.png", [r.source])
    text = (
        "<p>local: the local executor; ray: Ray with our shared-memory store between stages "
        "on one node (the default); ray-objstore: Ray's object store only; -node / -across: "
        "a hop within a node / between two nodes (loopback here).</p>"
    )
    model = next((x for x in r.records if x.get("case") == "model"), None)
    predictions = [
        p
        for p in (model or {}).get("predictions", [])
        if p.get("layout") == "replicated" and p.get("network") == "10 GbE"
    ]
    if predictions:
        cells = "".join(
            f"<tr><td>{p['nodes']}</td><td>{p['cores_per_node']}</td>"
            f"<td>{p['series_per_min']:g}</td><td>{html.escape(str(p['bound']))}</td></tr>"
            for p in predictions
        )
        text += (
            "<p>The model's prediction (benchmarks/ray.py: per-stage CPU, the longest stage, "
            "bytes crossing nodes), stages replicated, 10 GbE:</p><table><tr><th>nodes</th>"
            f"<th>cores each</th><th>series/min</th><th>bound by</th></tr>{cells}</table>"
        )
    return Section(key, title, text, [image], [r.source])


def section_machine(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "machine", "The machines and the load on them during each run"
    if not results:
        return not_measured(key, title, "no results files")
    rows, busy = [], []
    for kind in sorted(results):
        r, m = results[kind], results[kind].meta
        mach = m.get("machine") or m
        start = m.get("loadavg_at_start", m.get("loadavg_1min_at_start"))
        end = m.get("loadavg_at_end", m.get("loadavg_1min_at_end"))
        start = start[0] if isinstance(start, list) else start
        end = end[0] if isinstance(end, list) else end
        cores = mach.get("cores")
        elapsed, cpu = m.get("elapsed_s"), m.get("machine_busy_cpu_s")
        used = round(cpu / elapsed, 2) if cpu is not None and elapsed else None
        if used is not None:
            busy.append((kind, used, cores or 0))
        cells = [
            kind,
            r.path.name,
            str(m.get("date", "")),
            str(m.get("commit", ""))[:7],
            str(m.get("mode", "")),
            str(mach.get("cpu", "")),
            str(cores or ""),
            str(mach.get("gpu", m.get("gpu", "")) or ""),
            "" if start is None else f"{start:.2f}",
            "" if end is None else f"{end:.2f}",
            "" if used is None else str(used),
            str(m.get("steal_cpu_s", "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = [
        "benchmark",
        "file",
        "date",
        "commit",
        "mode",
        "CPU",
        "cores",
        "GPU",
        "load at start",
        "load at end",
        "busy cores (avg)",
        "stolen CPU s",
    ]
    text = (
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    images = []
    if busy:
        f, ax = fig.plt.subplots(figsize=(8, 1.2 + 0.25 * len(busy)))
        ax.barh(range(len(busy)), [b[2] for b in busy], color="#eeeeee", label="cores")
        ax.barh(
            range(len(busy)),
            [b[1] for b in busy],
            color=COLOURS["ours"],
            label="busy cores, all processes (average over the run)",
        )
        ax.set_yticks(range(len(busy)), [b[0] for b in busy], fontsize=8)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        ax.set_title("How busy the machine was during each run")
        images.append(fig.save(f, "machine-load.png", ["the provenance files in the table"]))
    sources = [results[k].source for k in sorted(results)]
    return Section(key, title, text, images, sources)


def section_answers(results: dict[str, Result], fig: Figures) -> Section:
    key, title = "answers", "Sizing a deployment: the three questions"
    load, soak = newest(results, ("load",), case_is("knee")), soak_result(results)
    latency, e2e = e2e_latency(results)
    records = load.records if load else []
    knee, summary = first_case(load, "knee"), first_case(soak, "soak-summary")
    missing = "<span class='missing'>not measured yet</span>"
    items = []
    if knee and knee.get("value"):
        above = "" if knee.get("reached") else " (the highest rate tried; the knee is above)"
        steps = {x.get("offered_per_hour"): x for x in records if x.get("case") == "throughput"}
        got = (steps.get(knee["value"]) or {}).get("value")
        past = (steps.get(knee.get("past_knee_offered_per_hour")) or {}).get("value")
        items.append(
            f"How many studies an hour: {knee['value']:g} offered and kept up with"
            + (f" ({got:g} results an hour)" if got else "")
            + above
            + (f"; offered more, the results stay at {past:g} an hour" if past else "")
            + ", on the machine below."
        )
    else:
        items.append(f"How many studies an hour: {missing}.")
    if e2e:
        items.append(
            f"How long from the last slice to the result in the PACS: "
            f"{e2e['latency_p50_s']} s (p50, {e2e['slices']} x {e2e['size']}² CT), of "
            f"which {e2e['parts_p50_s']['grouping_wait']} s is the grouping wait (the "
            f"receiver's timeout {e2e.get('grouping_timeout_s')} s); after it "
            f"{e2e.get('after_grouping_p50_s')} s (goal: under 2 s)."
        )
    else:
        items.append(f"How long from the last slice to the result in the PACS: {missing}.")
    ingest = ingest_result(results)
    one = next(
        (
            x
            for x in (ingest.records if ingest else [])
            if x.get("case") == "ingest-1" and x.get("system") == "ours" and value(x)
        ),
        None,
    )
    if one and e2e:
        per_hour = value(one) * 3600 / e2e["slices"]
        kept = (
            f", against the {knee['value']:g} studies/h the pipeline kept up with"
            if (knee and knee.get("value"))
            else ""
        )
        items.append(
            f"Is the receiver the bottleneck: it stores {value(one):g} instances/s on one "
            f"association, {per_hour:,.0f} studies of {e2e['slices']} slices an hour{kept}."
        )
    text_sources = [ingest.source] if one and e2e else []
    if summary:
        growth = summary.get("growth_second_half", {})
        items.append(
            f"Does it stay healthy: a {summary['minutes']:g}-minute soak, "
            f"{summary['value']} of {summary['count']} studies done, "
            f"{summary['failed']} failed; over its second half RSS grew "
            f"{growth.get('rss_bytes', 0) / 2**20:.1f} MiB, open files "
            f"{growth.get('open_files')}, threads {growth.get('threads')}."
        )
    else:
        items.append(f"Does it stay healthy (a soak): {missing}.")
    text = "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"
    sources = [r.source for r in (load, latency, soak) if r is not None] + text_sources
    return Section(key, title, text, [], list(dict.fromkeys(sources)))


SECTIONS = [
    section_answers,
    section_ratios,
    section_store,
    section_dicom,
    section_kernels,
    section_load,
    section_soak,
    section_ray,
    section_machine,
]


# ---------------------------------------------------------------------------- the page


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
table{border-collapse:collapse;font-size:0.8em}td,th{border:1px solid #ccc;padding:2px 6px}
.missing{color:#a00;font-style:italic}.source{color:#666;font-size:0.85em}"""


def page(sections: list[Section], folder: str) -> str:
    body = [
        f"<h1>dataflow benchmarks</h1><p>From the latest results in "
        f"<code>{html.escape(folder)}</code>. Contents: "
        + ", ".join(f"<a href='#{s.key}'>{html.escape(s.title)}</a>" for s in sections)
        + ".</p>"
    ]
    for s in sections:
        body.append(f"<h2 id='{s.key}'>{html.escape(s.title)}</h2>{s.text}")
        body += [f"<img src='{name}' alt='{html.escape(s.title)}'>" for name in s.images]
        if s.sources:
            body.append(
                "<p class='source'>Data: " + "; ".join(map(html.escape, s.sources)) + "</p>"
            )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>dataflow benchmarks</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def build(results_dir: Path, out: Path, fallback: Path | None = None) -> Path:
    """The report of the latest results in ``results_dir`` (and ``fallback`` for kinds it
    lacks) written to ``out``/index.html; its path."""
    results = find_results(fallback) if fallback else {}
    results.update(find_results(results_dir))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # a figure no longer made must not linger
    fig = Figures(out)
    sections = [make(results, fig) for make in SECTIONS]
    try:
        shown = results_dir.resolve().relative_to(ROOT)
    except ValueError:
        shown = results_dir.name
    index = out / "index.html"
    index.write_text(page(sections, str(shown)))
    return index


# ---------------------------------------------------------------------------- --run


def plan(mode: str, folder: Path, date: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each benchmark to run into ``folder``."""
    quick = ["--quick"] if mode == "quick" else []
    py = sys.executable

    def bench(script: str, kind: str, *extra: str) -> tuple[str, list[str]]:
        out = folder / f"{kind}-{date}.json"
        return kind, [py, str(HERE / script), *quick, *extra, "--json", str(out)]

    runs = [
        bench("store.py", "store"),
        bench("engine.py", "engine"),
        bench("operators.py", "operators"),
        bench("dicom.py", "dicom"),
        bench("startup.py", "startup"),
        bench("platform_api.py", "platform_api"),
    ]
    if (HERE / ".peers" / "monai-venv").is_dir():
        runs.append(bench("peers.py", "peers"))
    else:
        runs.append(bench("peers.py", "peers-kernels", "--only", "kernels"))
    if shutil.which("nvidia-smi"):
        runs.append(bench("gpu.py", "gpu"))
    if importlib.util.find_spec("ray") is not None:
        runs.append(bench("ray.py", "ray"))
    runs.append(bench("load_figures.py", "load"))
    return runs


def run_all(mode: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    for kind, cmd in plan(mode, folder, date):
        print(f"== {kind}: {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            print(
                f"{kind} exited with {done.returncode}; its section may say not measured",
                flush=True,
            )
    if not shutil.which("nvidia-smi"):
        print("gpu skipped: no GPU here (the committed gpu results are used)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=HERE / "results",
        help="the results files (default benchmarks/results)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where index.html and the PNGs go (default RESULTS/report)",
    )
    parser.add_argument(
        "--run",
        choices=["quick", "full"],
        default=None,
        help="run every benchmark first, into --run-dir",
    )
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or args.results / "report"
    if args.run:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M")
        folder = args.run_dir or HERE / "results" / "runs" / stamp
        run_all(args.run, folder)
        index = build(folder, args.out or folder / "report", fallback=args.results)
    else:
        index = build(args.results, out)
    print(f"wrote {index}")


if __name__ == "__main__":
    main()
