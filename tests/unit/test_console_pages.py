"""The console's words for people: jobs that need a look (running past half their
pipeline's job-timeout, waiting too long to start), durations, sizes, and where a sign-in may
lead back to."""

from __future__ import annotations

from dataflow.platform.console.pages import (
    WAITING_TOO_LONG,
    inside,
    open_associations,
    overdue,
    size,
    took,
)

NOW = 1_800_000_000.0


def job(name: str, state: str, pipeline: str = "ct", created: float = NOW, started=None):
    return {"name": name, "state": state, "pipeline": pipeline, "created": created,
            "started": started}  # fmt: skip


def test_jobs_past_half_their_timeout_or_waiting_too_long_need_a_look():
    jobs = [
        job("fast", "running", started=NOW - 899),  # under half of 30 min
        job("slow", "running", started=NOW - 901),
        job("free", "running", pipeline="nolimit", started=NOW - 10 * 86400),
        job("queued-long", "queued", created=NOW - WAITING_TOO_LONG - 1),
        job("pending-now", "pending", created=NOW - 5),
    ]
    said = overdue(jobs, {"ct": 1800.0, "nolimit": None}, NOW)
    assert said == [
        "job slow (ct) has been running for 15 min 01 s; its job-timeout is 30 min 00 s",
        f"job queued-long (ct) has been queued for {took(NOW - WAITING_TOO_LONG - 1, NOW)}",
    ]
    assert overdue([], {}, NOW) == []


def test_durations_and_sizes_read_as_people_read_them():
    assert took(NOW, NOW + 0.25) == "250 ms"
    assert took(NOW, NOW + 12.34) == "12.3 s"
    assert took(NOW, NOW + 245) == "4 min 05 s"
    assert took(NOW, NOW + 7800) == "2 h 10 min"
    assert took(None, NOW) == "–"
    assert (size(512), size(1536), size(5 * 2**30), size(None)) == (
        "512 B", "1.5 KiB", "5.0 GiB", "–")  # fmt: skip


def test_signing_in_leads_back_inside_the_console_only():
    assert inside("/console/jobs?state=failed") == "/console/jobs?state=failed"
    for elsewhere in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "", None):
        assert inside(elsewhere) == "/console/"


def test_open_associations_are_summed_over_the_receivers_from_the_health_report():
    def figure(name, value, receiver):
        return {"name": name, "value": value, "labels": {"receiver": receiver}}

    health = {"connectors": {"dicom": {"metrics": [
        figure("dataflow_dicom_receiver_associations", 2, "plain"),
        figure("dataflow_dicom_receiver_associations", 1, "tls"),
        figure("dataflow_dicom_groups", 7, "plain"),
    ]}}}  # fmt: skip
    assert open_associations(health) == 3
    assert open_associations({"connectors": {}}) is None  # no DICOM receiver: not shown
