"""``benchmarks/report.py`` builds one HTML page with PNG plots from a small set of results
files: every section is named, each figure is a valid PNG naming its data's file, date and
commit, a benchmark without results says "not measured yet" (never a crash), and the same
inputs give the same bytes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).parents[2]
REPORT = ROOT / "benchmarks" / "report.py"
SECTIONS = (
    "Sizing a deployment: the three questions",
    "Each benchmark against its peers",
    "Store: handoff latency against size",
    "DICOM: ingest and export against DCMTK, Orthanc and pynetdicom",
    "Kernel speed-ups: CPU and GPU",
    "dataflow load: end-to-end latency and throughput",
    "Soak: memory and file counts over time",
    "Ray: the same pipeline on a cluster, and what a hop costs",
    "The machines and the load on them during each run",
)


def meta(date: str, commit: str = "abcdef0123456789", **more) -> dict:
    return {
        "date": date,
        "commit": commit,
        "mode": "full",
        "cpu": "Test CPU",
        "cores": 2,
        "loadavg_at_start": [0.5, 0.4, 0.3],
        "loadavg_at_end": [1.5, 1.0, 0.5],
        "elapsed_s": 100.0,
        "machine_busy_cpu_s": 120.0,
        "steal_cpu_s": 0.1,
        **more,
    }


def write(folder: Path, name: str, records: list[dict], provenance: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / f"{name}.provenance.json").write_text(json.dumps(provenance))


def results(folder: Path) -> Path:
    """A small set: store, dicom, operators, gpu and load results; no soak."""
    folder.mkdir()
    store = []
    for size, nbytes in (("4KiB", 4096), ("1MiB", 1 << 20), ("64MiB", 64 << 20)):
        for system, us in (("ours", 90.0), ("shm-pipe", 60.0), ("pickle-queue", 900.0)):
            store.append(
                {
                    "case": f"handoff-{size}",
                    "system": system,
                    "unit": "us",
                    "size_bytes": nbytes,
                    "value": us * (1 + nbytes / 2**20),
                }
            )
    write(folder, "store-2026-11-01", store, meta("2026-11-01T10:00:00+00:00"))
    # an older store file is not the one shown
    write(folder, "store-2026-10-01", store[:3], meta("2026-10-01T10:00:00+00:00", "0ld0ld0"))
    dicom = [
        {"case": case, "system": system, "value": v, "unit": "instances/s"}
        for case in ("ingest-1", "export-1")
        for system, v in (("ours", 100.0), ("storescp", 300.0), ("orthanc", 90.0))
    ]
    write(folder, "dicom-2026-11-02", dicom, meta("2026-11-02T10:00:00+00:00"))
    ops = [
        {
            "case": "speedup-threshold-256^3-vs-numpy",
            "system": "ours",
            "value": 3.4,
            "unit": "x",
            "kernel": "threshold",
            "size": "256^3",
            "against": "numpy",
        }
    ]
    write(folder, "operators-2026-11-03", ops, meta("2026-11-03T10:00:00+00:00"))
    gpu = [
        {
            "case": "kernel",
            "size": "256",
            "kernel": "threshold",
            "system": s,
            "median_ms": 1.0,
            "speedup_vs_cpu": x,
        }
        for s, x in (("cpu", 1.0), ("cuda-resident", 8.0), ("cuda-host", 0.2))
    ]
    write(folder, "gpu-2026-11-04", gpu, meta("2026-11-04T10:00:00+00:00", gpu="Test GPU"))
    parts = {"receive": 1.0, "grouping_wait": 2.0, "queued": 0.01, "ran": 1.5, "export": 0.3}
    load = [
        {
            "case": "e2e-latency",
            "system": "ours",
            "value": 3.8,
            "unit": "s",
            "slices": 200,
            "size": 512,
            "grouping_timeout_s": 2.0,
            "latency_p50_s": 3.8,
            "after_grouping_p50_s": 1.8,
            "parts_p50_s": parts,
            "per_study": [{**parts, "latency": 3.8 + k / 10} for k in range(4)],
        },
        *(
            {
                "case": "throughput",
                "system": "ours",
                "offered_per_hour": r,
                "value": v,
                "unit": "studies/h",
                "latency_p50_s": lat,
                "failed": 0,
                "latency_s": [lat - 0.2, lat, lat + 0.5],
            }
            for r, v, lat in ((60, 61, 3.8), (240, 236, 4.0), (480, 300, 12.0))
        ),
        {
            "case": "knee",
            "system": "ours",
            "value": 240,
            "unit": "studies/h offered",
            "past_knee_offered_per_hour": 480,
            "bottleneck": {"part": "queued", "stage": "smooth", "slowest_stage": "smooth"},
        },
    ]
    write(folder, "load-2026-11-05", load, meta("2026-11-05T10:00:00+00:00"))
    return folder


def build(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPORT), "--results", str(folder), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def valid_png(path: Path) -> bool:
    """The PNG signature, then chunks whose CRCs hold, ending with IEND."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    at, kinds = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        kinds.append(kind)
        at += 12 + length
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND"


def test_the_report_names_every_section_with_valid_pngs_and_is_the_same_twice(tmp_path):
    folder = results(tmp_path / "results")
    first = build(folder, tmp_path / "one")
    assert first.returncode == 0, first.stderr
    page = (tmp_path / "one" / "index.html").read_text()
    for title in SECTIONS:
        assert title in page, title
    pngs = sorted((tmp_path / "one").glob("*.png"))
    names = {p.name for p in pngs}
    assert {
        "store-handoff.png",
        "dicom-rates.png",
        "kernels-cpu.png",
        "kernels-gpu.png",
        "load-latency.png",
        "load-throughput.png",
        "ratios-store.png",
        "machine-load.png",
    } <= names
    for png in pngs:
        assert valid_png(png), png
        assert f"src='{png.name}'" in page
    # where each figure's data came from: the latest file, its date and commit
    assert "store-2026-11-01.json, 2026-11-01T10:00:00+00:00, commit abcdef0" in page
    assert "store-2026-10-01.json" not in page.split("machines and the load")[0]
    assert "0ld0ld0" not in page
    # the soak was not measured: said, not a crash
    soak = page.split(">Soak: memory and file counts over time</h2>")[1].split("<h2")[0]
    assert "not measured yet" in soak
    assert "Knee: 240 studies/h offered" in page and "<code>smooth</code>" in page
    assert "How many studies an hour: 240 offered" in page and "3.8 s (p50" in page
    # the same inputs, the same bytes
    second = build(folder, tmp_path / "two")
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    for path in (tmp_path / "one").iterdir():
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name


def test_missing_results_say_not_measured(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "store-2026-11-01.json").write_text("{not json")  # unreadable: skipped, named
    run = build(empty, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert "store-2026-11-01.json" in run.stderr
    page = (tmp_path / "out" / "index.html").read_text()
    for title in SECTIONS:
        section = page.split(f">{title}</h2>")[1].split("<h2")[0]
        assert "not measured yet" in section, title
    assert not list((tmp_path / "out").glob("*.png"))


def test_run_mode_plans_every_benchmark_with_its_json_in_the_run_folder(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = report  # its dataclasses look themselves up there
    try:
        spec.loader.exec_module(report)
    finally:
        del sys.modules[spec.name]
    runs = dict(report.plan("quick", tmp_path, "2026-01-01"))
    for kind in ("store", "engine", "operators", "dicom", "startup", "platform_api", "load"):
        assert kind in runs, kind
    assert "peers" in runs or "peers-kernels" in runs
    for kind, cmd in runs.items():
        assert Path(cmd[1]).is_file(), cmd  # the script exists
        assert "--quick" in cmd
        assert cmd[-2:] == ["--json", str(tmp_path / f"{kind}-2026-01-01.json")]
    assert report.NAME.match("load-soak-2026-01-01.json")["kind"] == "load-soak"
    assert report.NAME.match("load-soak-60-2026-01-01.json")["kind"] == "load-soak-60"
    assert report.NAME.match("store-2026-11-25-final.json")["kind"] == "store"


def soak(minutes: float, rss_growth: int) -> list[dict]:
    samples = [
        {"case": "soak-sample", "t_s": t * 60.0, "rss_bytes": 2**30, "open_files": 200}
        for t in range(int(minutes) + 1)
    ]
    summary = {
        "case": "soak-summary",
        "minutes": minutes,
        "count": 4,
        "value": 4,
        "failed": 0,
        "rate_per_min": 1,
        "every_study_ended": True,
        "retention_s": 60,
        "growth_second_half": {"rss_bytes": rss_growth, "open_files": 0, "threads": 0},
    }
    return [*samples, summary]


def test_each_figure_takes_the_newest_or_longest_run_that_measured_it(tmp_path):
    """A latency measured alone after the whole load run, an ingest-only run after the whole
    DICOM benchmark, the longest soak, and the Ray results: each shown, with its file."""
    folder = results(tmp_path / "results")
    later = meta("2026-11-06T10:00:00+00:00", mode="latency")
    parts = {"grouping_wait": 2.0, "queued": 0.0, "ran": 1.2, "export": 0.1}
    latency = {
        "case": "e2e-latency",
        "value": 3.3,
        "slices": 200,
        "size": 512,
        "grouping_timeout_s": 2.0,
        "latency_p50_s": 3.3,
        "after_grouping_p50_s": 1.3,
        "parts_p50_s": parts,
        "per_study": [{**parts, "latency": 3.3}],
    }
    write(folder, "load-latency-2026-11-06", [latency], later)
    ingest = [
        {"case": "ingest-1", "system": s, "value": v, "unit": "instances/s"}
        for s, v in (("ours", 200.0), ("orthanc", 100.0), ("storescp", 300.0))
    ]
    write(folder, "ingest-journal-2026-11-06", ingest, later)
    write(folder, "load-soak-2026-11-07", soak(10, 5 * 2**20), meta("2026-11-07T10:00:00+00:00"))
    write(folder, "load-soak-60-2026-11-06", soak(60, 7 * 2**20), later)
    hops = [
        {"case": f"per-hop-{size}", "system": system, "value": ms, "unit": "ms"}
        for size, ms in (("4KiB", 0.5), ("1MiB", 1.0), ("64MiB", 10.0))
        for system in ("local", "ray-node", "ray-across")
    ]
    runs = [
        {
            "case": "ct-segmentation",
            "system": s,
            "steady_series_per_min": v,
            "slices": 96,
            "size": 256,
        }
        for s, v in (("local", 180.0), ("ray", 170.0))
    ]
    model = {
        "case": "model",
        "predictions": [
            {"layout": "replicated", "network": "10 GbE", "nodes": n, "cores_per_node": 2,
             "series_per_min": 200.0 * n, "bound": "CPU"}
            for n in (1, 2, 4)
        ],
    }  # fmt: skip
    write(folder, "ray-2026-11-06", [*runs, *hops, model], later)
    run = build(folder, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    page = (tmp_path / "out" / "index.html").read_text()
    answers = page.split("the three questions</h2>")[1].split("<h2")[0]
    assert "3.3 s (p50" in answers and "after it 1.3 s" in answers
    assert "How many studies an hour: 240 offered" in answers  # still the whole load run
    assert "stores 200 instances/s on one association, 3,600 studies" in answers
    assert "a 60-minute soak" in answers and "RSS grew 7.0 MiB" in answers
    load = page.split("end-to-end latency and throughput</h2>")[1].split("<h2")[0]
    assert "load-latency-2026-11-06.json" in load and "load-2026-11-05.json" in load
    assert "Goal (under 2 s plus the grouping wait): met" in load
    dicom = page.split("DCMTK, Orthanc and pynetdicom</h2>")[1].split("<h2")[0]
    assert "ingest-journal-2026-11-06.json" in dicom and "dicom-2026-11-02.json" in dicom
    assert "<td>ours</td><td>ingest-1</td><td>2 (met)</td><td>0.67 (met)</td>" in dicom
    soak_part = page.split("file counts over time</h2>")[1].split("<h2")[0]
    assert "load-soak-60-2026-11-06.json" in soak_part and "over 60 minutes" in soak_part
    ray = page.split("what a hop costs</h2>")[1].split("<h2")[0]
    assert "src='ray.png'" in ray and valid_png(tmp_path / "out" / "ray.png")
    assert "<td>4</td><td>2</td><td>800</td><td>CPU</td>" in ray
