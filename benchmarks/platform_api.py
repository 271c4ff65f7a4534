"""benchmarks/platform_api.py (not platform.py: that name would shadow the standard library
module for every script in this folder): the platform API's own overhead, inside a real
``dataflow serve``.

```bash
.venv/bin/python benchmarks/platform_api.py --quick        # about half a minute
.venv/bin/python benchmarks/platform_api.py                # the full sizes (500 MB payload)
```

It starts the real service (``Service`` with an ``api:`` section on a free loopback port; one
pipeline of two empty stages, ``benchmarks/platform-empty.yaml``) and measures with httpx:

- **jobs per second** through the API on the empty pipeline: create, upload one small file,
  start, and poll the status (every 2 ms) until it ends, sequentially (one client) and with 8
  clients at once: what the platform adds to a job (Clara spent seconds per job starting
  containers);
- **API latency** p50 / p99 of ``GET /api/v1/jobs/{id}`` and ``GET /api/v1/jobs`` with 50
  concurrent clients;
- **upload and download** of one big file (500 MB, 64 MB with ``--quick``) through the API,
  against ``cp`` of the same file on the same disk.

It prints a table and writes the records (``--json``, default
``benchmarks/results/platform_api-<date>.json``, with ``.provenance.json``: the machine, commit,
load). It asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ROOT,
    machine,
    machine_busy,
    run_footer,
    run_header,
    write_results,
)

PIPELINE = Path(__file__).resolve().parent / "platform-empty.yaml"
MiB = 1 << 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_job(client: Any) -> float:
    """Create, upload, start and wait for one job; seconds it took."""
    began = time.perf_counter()
    created = client.post("/api/v1/jobs", json={"pipeline": "empty"}).json()
    client.put(f"/api/v1/payloads/{created['payload_id']}/files/input/x.bin", content=b"x" * 64)
    client.post(f"/api/v1/jobs/{created['job_id']}/start")
    while client.get(f"/api/v1/jobs/{created['job_id']}").json()["state"] not in (
        "succeeded", "failed"):  # fmt: skip
        time.sleep(0.002)
    return time.perf_counter() - began


def jobs_per_second(base: str, jobs: int, clients: int) -> dict[str, Any]:
    import httpx

    def worker(count: int) -> list[float]:
        with httpx.Client(base_url=base, timeout=300) as client:
            return [one_job(client) for _ in range(count)]

    share = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for part in pool.map(worker, share) for t in part]
    elapsed = time.perf_counter() - began
    return {"jobs": jobs, "clients": clients, "value": jobs / elapsed, "unit": "jobs/s",
            "job_p50_ms": 1000 * _percentile(times, 0.5),
            "job_p99_ms": 1000 * _percentile(times, 0.99)}  # fmt: skip


def latency(base: str, path: str, clients: int, each: int) -> dict[str, Any]:
    import httpx

    start = threading.Barrier(clients)

    def worker(_: int) -> list[float]:
        with httpx.Client(base_url=base, timeout=300) as client:
            client.get(path)  # connect first
            start.wait()
            out = []
            for _ in range(each):
                began = time.perf_counter()
                client.get(path).raise_for_status()
                out.append(time.perf_counter() - began)
            return out

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for part in pool.map(worker, range(clients)) for t in part]
    elapsed = time.perf_counter() - began
    return {"path": path, "clients": clients, "requests": len(times),
            "value": 1000 * _percentile(times, 0.5), "unit": "ms p50",
            "p99_ms": 1000 * _percentile(times, 0.99),
            "requests_per_s": len(times) / elapsed}  # fmt: skip


def transfer(base: str, work: Path, size: int) -> list[dict[str, Any]]:
    import httpx

    source = work / "big.bin"
    with open(source, "wb") as out:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            out.write(block)
    os.sync()
    records = []
    began = time.perf_counter()
    shutil.copyfile(source, work / "copy.bin")
    os.sync()
    cp = time.perf_counter() - began
    subprocess.run(["cp", str(source), str(work / "copy2.bin")], check=True)  # warm
    began = time.perf_counter()
    subprocess.run(["cp", str(source), str(work / "copy3.bin")], check=True)
    os.sync()
    cp_cmd = time.perf_counter() - began
    records.append({"case": "cp", "bytes": size, "value": size / MiB / cp_cmd, "unit": "MiB/s",
                    "python_copyfile_mib_s": size / MiB / cp})  # fmt: skip
    with httpx.Client(base_url=base, timeout=600) as client:
        created = client.post("/api/v1/jobs", json={"pipeline": "empty"}).json()
        url = f"/api/v1/payloads/{created['payload_id']}/files/input/big.bin"

        def chunks():
            with open(source, "rb") as handle:
                while chunk := handle.read(MiB):
                    yield chunk

        began = time.perf_counter()
        client.put(url, content=chunks()).raise_for_status()
        os.sync()
        up = time.perf_counter() - began
        records.append({"case": "upload", "bytes": size, "value": size / MiB / up,
                        "unit": "MiB/s", "vs_cp": cp_cmd / up})  # fmt: skip
        began = time.perf_counter()
        with client.stream("GET", url) as response, open(work / "down.bin", "wb") as out:
            for chunk in response.iter_bytes(MiB):
                out.write(chunk)
        os.sync()
        down = time.perf_counter() - began
        records.append({"case": "download", "bytes": size, "value": size / MiB / down,
                        "unit": "MiB/s", "vs_cp": cp_cmd / down})  # fmt: skip
        client.delete(f"/api/v1/payloads/{created['payload_id']}")
    same = (work / "down.bin").stat().st_size == size
    records[-1]["bytes_equal"] = same
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs, a 64 MB payload")
    parser.add_argument("--json", default=None, help="results file (.json)")
    args = parser.parse_args()
    from dataflow.logs import configure_logging
    from dataflow.service import Service, load_config

    configure_logging("warning")
    started, busy0 = time.perf_counter(), machine_busy()
    meta: dict[str, Any] = {**run_header(), "mode": "quick" if args.quick else "full",
                            "argv": sys.argv, "machine": machine(),
                            "loadavg_at_start": list(os.getloadavg())}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="platform-bench-", dir=ROOT / "benchmarks"))
    records: list[dict[str, Any]] = []
    try:
        config = work / "service.yaml"
        config.write_text(f"state: {work / 'state'}\npipelines:\n  empty: {PIPELINE}\n"
                          "api: {rest-port: 0, grpc-port: null, max-upload: 2GiB}\n")  # fmt: skip
        service = Service(load_config(config))
        service.start()
        try:
            base = service.platform.urls["rest"]
            jobs = 40 if args.quick else 200
            jobs_per_second(base, 5, 1)  # warm-up, not recorded
            for clients in (1, 8):
                record = {"case": "jobs-per-second", **jobs_per_second(base, jobs, clients)}
                records.append(record)
                print(record, flush=True)
            some = service.jobs.list(limit=1)[0].id
            for path in (f"/api/v1/jobs/{some}", "/api/v1/jobs?limit=50"):
                record = {"case": "latency", **latency(base, path, 50, 4 if args.quick else 20)}
                records.append(record)
                print(record, flush=True)
            size = (64 if args.quick else 500) * MiB
            for record in transfer(base, work, size):
                records.append(record)
                print(record, flush=True)
        finally:
            service.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta.update(run_footer(started, busy0))
    target = Path(args.json or ROOT / "benchmarks" / "results" /
                  f"platform_api-{datetime.date.today()}.json")  # fmt: skip
    write_results(target, records, meta)


if __name__ == "__main__":
    main()
