"""The Grafana dashboard in examples/ draws only metrics the service exports: every metric
name in its queries is written by the health file (dataflow.service.health), the DICOM
connector or the REST API (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dataflow.service.health import COUNTERS

ROOT = Path(__file__).parents[2]
SOURCES = ("dataflow/service/health.py", "connectors/dicom/service.py", "dataflow/platform/rest.py")
NAME = re.compile(r"\bdataflow_[a-z_]+")


def exported() -> set[str]:
    names = {f"dataflow_{counter}_total" for counter in COUNTERS}
    for source in SOURCES:
        names |= set(NAME.findall((ROOT / source).read_text()))
    # prometheus-client adds _total to counters and _bucket/_sum/_count to histograms
    return names | {n + "_total" for n in names} | {n + "_bucket" for n in names}


def test_every_panel_queries_metrics_the_service_exports():
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used - exported() == set()
    assert {"dataflow_jobs", "dataflow_api_request_seconds_bucket"} <= used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
