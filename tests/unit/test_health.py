"""health.json and metrics.prom as an operator and Prometheus read them, and what
``dataflow health`` concludes from them and from the service lock."""

from __future__ import annotations

import json
import time

from prometheus_client.parser import text_string_to_metric_families

from dataflow.service.health import HealthWriter, ServiceLock, check


def report_parts(stage_state="ok", dead=0, problems=()):
    return {
        "pipelines": {
            "ct": {
                "stages": {
                    "reader": {"state": "ok", "reason": "", "workers": 1, "live": 1, "restarts": 0},
                    "segment": {
                        "state": stage_state,
                        "reason": "worker died 4 times in a row" if stage_state == "broken" else "",
                        "workers": 2,
                        "live": 0,
                        "restarts": 4,
                    },
                },
                "counters": {"worker_died": 4, "worker_oom": 1, "stage_broken": 1},
                "in_flight": {"job-1": ["segment"]},
            }
        },
        "jobs": [
            {"pipeline": "ct", "state": "succeeded", "count": 7},
            {"pipeline": "ct", "state": "failed", "count": 2},
        ],
        "deliveries": [{"destination": "PACS", "state": "sent", "count": 5}]
        + ([{"destination": "PACS", "state": "dead", "count": dead}] if dead else []),
        "connectors": {
            "dicom": {
                "problems": list(problems),
                "metrics": [
                    {
                        "name": "dataflow_dicom_associations",
                        "help": "open associations",
                        "type": "gauge",
                        "labels": {"receiver": "plain"},
                        "value": 3,
                    },
                    {
                        "name": "dataflow_dicom_instances_received",
                        "help": "instances stored",
                        "type": "counter",
                        "labels": {"receiver": "plain"},
                        "value": 120,
                    },
                ],
            }
        },
    }


def metrics(state) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families((state / "metrics.prom").read_text()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_a_broken_stage_dead_letters_and_connector_problems_are_reported(tmp_path):
    parts = report_parts("broken", dead=2, problems=["receiver plain: disk reserve reached"])
    writer = HealthWriter(tmp_path, lambda: parts)
    report = writer.write()
    assert report["status"] == "problems"
    assert report["problems"] == [
        "pipeline ct: stage segment is broken: worker died 4 times in a row",
        "destination PACS: 2 result(s) dead-lettered (dataflow exports CONFIG --state dead)",
        "dicom: receiver plain: disk reserve reached",
    ]
    assert json.loads((tmp_path / "health.json").read_text())["problems"] == report["problems"]
    m = metrics(tmp_path)
    assert m[("dataflow_worker_died_total", (("pipeline", "ct"),))] == 4
    assert m[("dataflow_worker_oom_total", (("pipeline", "ct"),))] == 1
    assert m[("dataflow_stage_broken_total", (("pipeline", "ct"),))] == 1
    assert m[("dataflow_stage_timeouts_total", (("pipeline", "ct"),))] == 0
    broken = (("pipeline", "ct"), ("stage", "segment"), ("state", "broken"))
    assert m[("dataflow_stage_state", broken)] == 1
    assert m[("dataflow_jobs", (("pipeline", "ct"), ("state", "failed")))] == 2
    assert m[("dataflow_exports", (("destination", "PACS"), ("state", "dead")))] == 2
    assert m[("dataflow_dead_letters", (("destination", "PACS"),))] == 2
    assert m[("dataflow_dicom_associations", (("receiver", "plain"),))] == 3
    assert m[("dataflow_dicom_instances_received_total", (("receiver", "plain"),))] == 120
    assert m[("dataflow_problems", ())] == 3
    assert m[("dataflow_up", ())] == 1
    writer.stop()  # the service stopped: its last figures stay, and say so
    assert metrics(tmp_path)[("dataflow_up", ())] == 0
    assert json.loads((tmp_path / "health.json").read_text())["status"] == "stopped"


def test_health_check_exit_codes_follow_the_lock_and_the_report(tmp_path):
    assert check(tmp_path, max_age=30)[0] == 2  # nothing ever ran here
    lock = ServiceLock(tmp_path)
    assert lock.acquire()
    try:
        assert not ServiceLock(tmp_path).acquire()  # one service per state folder
        code, _, summary = check(tmp_path, max_age=30)
        assert code == 2 and "missing" in summary  # started, nothing written yet
        HealthWriter(tmp_path, report_parts).write()
        assert check(tmp_path, max_age=30)[:1] == (0,)
        HealthWriter(tmp_path, lambda: report_parts("degraded")).write()
        code, report, _ = check(tmp_path, max_age=30)
        assert code == 1 and report["problems"] == ["pipeline ct: stage segment is degraded"]
        stale = {**report, "time": time.time() - 3600}  # written an hour ago: hung
        (tmp_path / "health.json").write_text(json.dumps(stale))
        code, _, summary = check(tmp_path, max_age=30)
        assert code == 2 and summary.startswith("stale: ") and "holds the lock" in summary
    finally:
        lock.release()
    code, _, summary = check(tmp_path, max_age=30)
    assert code == 2 and summary.startswith("not running")


def test_gpu_use_from_nvml_becomes_metrics(monkeypatch):
    """A FAKE pynvml (no GPU on this machine or on CI): two GPUs, the second not answering;
    the real NVML path runs on a GPU machine (benchmarks/results when the device is lent)."""
    import sys
    import types

    import dataflow.machine as machine
    from dataflow.service.health import metric_families

    class NVMLError(Exception):
        pass

    def handle(index):
        if index == 1:
            raise NVMLError("GPU is lost")
        return index

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetUUID=lambda h: "GPU-1234",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=141 << 30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42, memory=7),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=7)],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(machine, "_NO_NVML", False)
    gpus = machine.gpu_usage()
    assert gpus == [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1234",
                     "memory_used": 3 << 30, "memory_total": 141 << 30, "utilization": 0.42,
                     "processes": [7]}]  # fmt: skip
    report = {"time": 0.0, "problems": [], "pipelines": {}, "jobs": [], "deliveries": [],
              "connectors": {}, "gpus": gpus}  # fmt: skip
    samples = {(s.name, s.labels.get("gpu")): s.value
               for family in metric_families(report) for s in family.samples}  # fmt: skip
    assert samples[("dataflow_gpu_memory_used_bytes", "0")] == 3 << 30
    assert samples[("dataflow_gpu_utilization_ratio", "0")] == 0.42
    assert ("dataflow_gpu_memory_used_bytes", "1") not in samples
