"""``benchmarks/load_figures.py`` against a real ``dataflow serve`` and ``storescp`` (tiny
studies): its records hold the end-to-end latency with the grouping wait apart, a throughput
step and the knee; ``--soak`` samples the service's processes; ``benchmarks/report.py`` draws
both. Numbers are reported, never asserted against a bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from deadlines import LONG_HANG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "load_figures.py"


def run(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--slices", "8", "--size", "32", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=4 * LONG_HANG)


def test_figures_and_soak_are_measured_and_reported(private_network, tmp_path):
    results = tmp_path / "results"
    done = run(
        "--latency-studies",
        2,
        "--rates",
        30,
        "--grouping",
        0.5,
        "--json",
        results / "load-2026-01-01.json",
        "--markdown",
        results / "load-2026-01-01.md",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads((results / "load-2026-01-01.json").read_text())
    cases = [r["case"] for r in records]
    assert cases == ["warmup", "e2e-latency", "throughput", "knee"]
    e2e = records[1]
    assert e2e["studies"] == 2 and e2e["failed"] == 0 and len(e2e["per_study"]) == 2
    for study in e2e["per_study"]:
        assert study["grouping_wait"] > 0.4  # the receiver waited its timeout (0.5 s)
        assert study["latency"] >= study["grouping_wait"] + study["ran"]
    assert e2e["after_grouping_p50_s"] == pytest.approx(
        e2e["latency_p50_s"] - e2e["parts_p50_s"]["grouping_wait"], abs=0.5
    )
    assert "seg" in e2e["stages"] and e2e["stages"]["load"]["run_s"] > 0
    step = records[2]
    assert step["offered_per_hour"] == 1800 and step["failed"] == 0 and step["studies"] >= 4
    meta = json.loads((results / "load-2026-01-01.provenance.json").read_text())
    assert meta["machine"]["cores"] and "loadavg_at_end" in meta
    assert "## End-to-end latency" in (results / "load-2026-01-01.md").read_text()

    done = run(
        "--soak",
        0.5,
        "--soak-rate",
        8,
        "--soak-slices",
        8,
        "--soak-size",
        32,
        "--sample",
        2,
        "--json",
        results / "load-soak-2026-01-01.json",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    soak = json.loads((results / "load-soak-2026-01-01.json").read_text())
    summary, samples = soak[0], soak[1:]
    assert summary["case"] == "soak-summary" and summary["count"] == 4
    assert summary["value"] == 4 and summary["every_study_ended"]
    assert len(samples) >= 3
    roles = set().union(*(s["by_role"] for s in samples))
    assert {"service", "store", "worker"} <= roles
    for s in samples:
        assert s["rss_bytes"] > 0 and s["open_files"] > 0 and s["threads"] > 0
    assert samples[-1]["pacs_files"] == 4  # one SEG per study

    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "report.py"),
            "--results",
            str(results),
            "--out",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=LONG_HANG,
    )
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    for name in ("load-latency.png", "load-throughput.png", "soak.png"):
        assert f"src='{name}'" in page and (tmp_path / "report" / name).is_file()
    assert "load-soak-2026-01-01.json" in page
