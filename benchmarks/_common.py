"""Helpers the benchmarks share: machine load and idleness, provenance pieces, writing results.

``benchmarks/`` is not a package: the scripts import this module by name (their own folder is
on ``sys.path`` when they run as ``python benchmarks/NAME.py``). Nothing here measures anything.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def loadavg() -> float:
    """The 1-minute load average."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds stolen by the hypervisor), from
    ``/proc/stat`` (10 ms ticks: coarse)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_for_idle(max_wait_s: float) -> tuple[bool, float]:
    """Wait until the machine has been idle for 0.3 s (at most one busy tick per 100 ms), for
    at most ``max_wait_s``; returns (whether it got idle, seconds waited)."""
    started = time.perf_counter()
    calm = 0
    busy = machine_busy()[0]
    while time.perf_counter() - started < max_wait_s:
        time.sleep(0.1)
        busy, before = machine_busy()[0], busy
        calm = calm + 1 if busy - before <= 0.011 else 0  # at most a tick in 100 ms
        if calm >= 3:
            return True, time.perf_counter() - started
    return False, time.perf_counter() - started


def single_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run on one Numba thread (the caller's thread count restored after)."""
    import numba

    def run() -> Any:
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return fn()
        finally:
            numba.set_num_threads(threads)

    return run


def git(*cmd: str) -> str:
    """Output of ``git -C ROOT CMD...``, stripped; "unknown" when git fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def cpu_description() -> str:
    """Model, family, MHz and cache of the first processor in ``/proc/cpuinfo``."""
    cpuinfo: dict[str, str] = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            cpuinfo[key.strip()] = value.strip()
    return (
        f"{cpuinfo.get('model name', 'unknown')} (family {cpuinfo.get('cpu family')}, "
        f"model {cpuinfo.get('model')}, {cpuinfo.get('cpu MHz')} MHz, "
        f"cache {cpuinfo.get('cache size')})"
    )


def memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def module_versions(modules: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each module's distribution, None where none is installed.
    Read from the metadata, not by importing: a benchmark's folder first on ``sys.path``
    would give its own ``ray.py`` for ``import ray``."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    versions: dict[str, str | None] = {}
    for module in modules:
        try:
            versions[module] = metadata.version((owners.get(module) or [module])[0])
        except metadata.PackageNotFoundError:
            versions[module] = None
    return versions


def run_header() -> dict[str, Any]:
    """The first provenance entries of every benchmark: date, commit, uncommitted changes."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain").splitlines(),
    }


def machine() -> dict[str, Any]:
    """CPU, cores, memory, /dev/shm, kernel and Python of this machine."""
    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "dev_shm_bytes": shutil.disk_usage("/dev/shm").total,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def mode_and_argv(args: Any) -> dict[str, Any]:
    """``mode`` (quick or full, from ``args.quick``) and the command line."""
    return {"mode": "quick" if args.quick else "full", "argv": sys.argv}


def end_of_run(meta: dict, started: float, busy_at_start: tuple[float, float]) -> None:
    """Add the run's elapsed time (since ``started``, a ``time.perf_counter()``), the machine's
    busy and stolen CPU seconds (since ``busy_at_start``, a :func:`machine_busy`) and the
    load averages at the end to ``meta``, and print the elapsed time."""
    busy, steal = (b - a for a, b in zip(busy_at_start, machine_busy(), strict=True))
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["machine_busy_cpu_s"] = round(busy, 1)
    meta["steal_cpu_s"] = round(steal, 1)
    meta["loadavg_at_end"] = list(os.getloadavg())
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")


def run_footer(started: float, busy_at_start: tuple[float, float]) -> dict[str, Any]:
    """The last provenance entries: elapsed seconds (since ``started``, a
    ``time.perf_counter()``), the machine's busy and stolen CPU seconds since
    ``busy_at_start`` (a :func:`machine_busy`), and the load average now."""
    busy, steal = (b - a for a, b in zip(busy_at_start, machine_busy(), strict=True))
    return {
        "elapsed_s": round(time.perf_counter() - started, 1),
        "machine_busy_cpu_s": round(busy, 1),
        "steal_cpu_s": round(steal, 1),
        "loadavg_at_end": list(os.getloadavg()),
    }


def write_results(json_path: str | Path, records: list[dict], meta: dict) -> tuple[Path, Path]:
    """Write ``records`` to ``json_path`` and ``meta`` next to it (``.provenance.json``)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    side = path.with_name(path.name.removesuffix(".json") + ".provenance.json")
    side.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {path} and {side}")
    return path, side
