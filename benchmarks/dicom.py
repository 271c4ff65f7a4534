"""Benchmark of DICOM ingest (our receiver) and export (our sender) against real peers.

Run from the repository root (as root, or where user namespaces are allowed)::

    .venv/bin/python benchmarks/dicom.py --quick                 # about two minutes
    .venv/bin/python benchmarks/dicom.py --json benchmarks/results/dicom-DATE.json

The benchmark first moves itself into a private network namespace holding only a loopback
interface (``unshare(CLONE_NEWNET)``, as ``tests/conftest.py`` does): dcmtk's ``storescp`` and
Orthanc listen on every interface, and nothing outside may reach them. All traffic goes to
127.0.0.1. It refuses to run when the namespace cannot be made. Every dcmtk and Orthanc
process gets ``TCP_NODELAY=1`` (see ``../shared/reference/machine-notes.md``).

* **Ingest**: a synthetic CT series (``operators.dicom.phantom.write_ct_series``: 500 slices
  of 512 × 512 int16, about 525 kB each; ``--quick``: 100) sent by dcmtk ``/usr/bin/storescu``
  with 1 association, and with 4 at once (the files split between 4 ``storescu`` processes),
  to:

  - ``ours``: ``python -m connectors.dicom.receive.receiver`` (fsync on: a Success means the
    file and its record are durable), one listener process; ``ours-2p``: ``processes: 2``;
    both with the ingest journal (one flush per instance, the default);
    ``ours-nojournal``, ``ours-2p-nojournal``: the same with ``journal: false`` (the previous
    design: the temp file's fsync, then the folder's fsync and the SQLite commit);
  - ``storescp``: dcmtk ``storescp`` writing files (no fsync; ``--fork`` with 4 associations,
    otherwise it serves one association at a time);
  - ``orthanc``: Orthanc as a plain process (SQLite index and files, its defaults);
  - ``pynetdicom-raw``: a stock pynetdicom SCP writing ``event.encoded_dataset()``;
  - ``pynetdicom-save``: a stock pynetdicom SCP decoding and ``save_as`` (``dicom_scp.py``).

  Each server starts afresh (empty storage) before each measurement; the time is that of the
  ``storescu`` runs, from the first start to the last exit; every instance must have arrived
  (counted in the server's storage) or the run is an error. Instances/s and MB/s (file bytes).

* **Export**: the same series into a dcmtk ``storescp`` sink, sent by ``ours``
  (``connectors.dicom.export.sender.send_files``, one association, as the Exporter does) and by
  ``storescu`` (one association), and ``ours-exporter``: an ``Outbox`` task delivered by the
  ``Exporter`` (enqueue to delivered).

Rounds are interleaved: in each round every system of a case runs once, in an order that
rotates from round to round; the tables show medians. Before each round the benchmark waits
for a moment of idleness (at most a few seconds) and records how many rounds started on a
busy machine. Goals (ratios of medians, with met / not met): ingest ≥ 0.5× storescp, ≥ 1×
Orthanc, ≥ 1.5× stock pynetdicom (decode and save); export ≥ 0.5× storescu.

``--json PATH`` writes the records (``case``, ``system``, ``value``, ``unit`` plus ``runs``,
``mb_s``, ``machine_cores`` …) and the provenance (machine, load, versions, settings) next to
it (``.provenance.json``). The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]
sys.path.append(str(ROOT / "tests"))  # dicom_peers: free ports, waiting for a listener

import _common as common  # noqa: E402  (benchmarks/ is not a package)
from dicom_peers import _stop, free_port, wait_for_port  # noqa: E402

__all__ = ["main"]

STORESCU = Path("/usr/bin/storescu")  # dcmtk's; .venv/bin/storescu is pynetdicom's script
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
PYTHON = sys.executable
SLICES = {False: 500, True: 100}  # full, quick
ROUNDS = {False: 3, True: 2}
CONCURRENCY = (1, 4)
INGEST_SYSTEMS = ("ours", "ours-2p", "ours-nojournal", "ours-2p-nojournal", "storescp", "orthanc",
                  "pynetdicom-raw", "pynetdicom-save")  # fmt: skip
EXPORT_SYSTEMS = ("ours", "ours-exporter", "storescu")
GOALS = (  # (case kind, ours vs this system, at least)
    ("ingest", "storescp", 0.5),
    ("ingest", "orthanc", 1.0),
    ("ingest", "pynetdicom-save", 1.5),
    ("export", "storescu", 0.5),
)
AET = "BENCH"
DCMTK_MAX_PDU = 131072  # storescp's and Orthanc's maximum receive PDU: dcmtk's largest

# ------------------------------------------------------------------------ the private network

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def alone_on_loopback() -> bool:
    """Whether this process's network namespace has no interface but ``lo`` (``/proc/net``
    is per namespace; ``/sys/class/net`` is not, until sysfs is remounted)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def enter_private_network() -> None:
    """Move this process (still single-threaded) into a new network namespace with its
    loopback up, unless it is already alone on loopback; raises SystemExit when it cannot."""
    if alone_on_loopback():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise SystemExit(
            f"cannot make a private network namespace ({os.strerror(ctypes.get_errno())}): "
            "storescp and Orthanc listen on every interface, so the benchmark will not run"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
    if not alone_on_loopback():
        raise SystemExit("the new network namespace has more than a loopback interface")


# ------------------------------------------------------------------------ processes and ports


def count_files(folder: Path, suffix: str = "") -> int:
    return sum(1 for p in folder.rglob(f"*{suffix}") if p.is_file())


class Server:
    """A receiver under test: started on a free port with empty storage in ``folder``;
    ``received()`` counts what it stored."""

    def __init__(self, system: str, folder: Path, concurrency: int) -> None:
        self.system, self.folder, self.port = system, folder, free_port()
        self.aet = AET
        folder.mkdir(parents=True)
        self.log = open(folder.parent / f"{folder.name}.log", "w")  # noqa: SIM115
        self.proc = self._start(concurrency)

    def _start(self, concurrency: int) -> subprocess.Popen:
        s, port, folder = self.system, str(self.port), self.folder
        if s.startswith("ours"):
            config = {
                "spool": str(folder), "host": "127.0.0.1", "port": self.port,
                "called_aes": [{"ae_title": AET, "timeout": 60}], "allow_unknown_peers": True,
            }  # fmt: skip
            if s.startswith("ours-2p"):
                config["processes"] = 2
            if s.endswith("-nojournal"):
                config["journal"] = False  # the previous design: two flushes per instance
            args = [
                PYTHON,
                "-m",
                "connectors.dicom.receive.receiver",
                "--config",
                json.dumps(config),
            ]
            proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=self.log)
        elif s == "storescp":
            fork = ["--fork"] if concurrency > 1 else []
            args = [str(STORESCP), "-aet", AET, "-od", str(folder), "-pm", "+xa",
                    "--max-pdu", str(DCMTK_MAX_PDU), *fork, port]  # fmt: skip
            proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=self.log, stderr=self.log)
        elif s == "orthanc":
            self.http = free_port()
            settings = {
                "Name": "bench", "StorageDirectory": str(folder / "storage"),
                "IndexDirectory": str(folder / "index"), "DicomAet": AET,
                "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
                "MaximumPduLength": DCMTK_MAX_PDU,
            }  # fmt: skip
            (folder / "orthanc.json").write_text(json.dumps(settings))
            args = [str(ORTHANC), str(folder / "orthanc.json")]
            proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=self.log, stderr=self.log)
            wait_for_port(self.http, proc=proc, timeout=60)
        else:
            mode = s.removeprefix("pynetdicom-")
            args = [PYTHON, str(HERE / "dicom_scp.py"), port, str(folder), mode]
            proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=self.log)
        wait_for_port(self.port, proc=proc, timeout=60)
        if s.startswith("ours"):  # the port opens before its worker processes start
            self._wait_for_line(proc, "listening ", timeout=60)
        return proc

    def _wait_for_line(self, proc: subprocess.Popen, prefix: str, timeout: float) -> None:
        """Until the server's log has a line starting with ``prefix`` (ours prints
        ``listening PORT`` once every listener process is up)."""
        self.log.flush()
        deadline = time.monotonic() + timeout
        path = Path(self.log.name)
        while not any(line.startswith(prefix) for line in path.read_text().splitlines()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.system} did not start: see {path}")
            time.sleep(0.05)

    def received(self) -> int:
        if self.system.startswith("ours"):
            return count_files(self.folder / AET, ".dcm")
        if self.system == "orthanc":
            url = f"http://127.0.0.1:{self.http}/statistics"
            with urllib.request.urlopen(url, timeout=30) as response:
                return int(json.loads(response.read())["CountInstances"])
        return count_files(self.folder)

    def stop(self) -> None:
        _stop(self.proc, timeout=30)  # SIGTERM, then SIGKILL (Orthanc can take > 3 s)
        self.log.close()


def storescu_args(port: int, files: list[Path], aec: str) -> list[str]:
    return [str(STORESCU), "-aet", "SENDER", "-aec", aec, "-R", "127.0.0.1", str(port),
            *map(str, files)]  # fmt: skip


def run_storescu(port: int, files: list[Path], aec: str, concurrency: int) -> float:
    """``concurrency`` storescu processes, each with its share of ``files``; wall seconds from
    the first start to the last exit. Raises if one of them failed."""
    shares = [files[i::concurrency] for i in range(concurrency)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(storescu_args(port, share, aec), env=DCMTK_ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for share in shares
    ]  # fmt: skip
    errors = [p.communicate(timeout=600)[1] for p in procs]
    wall = time.perf_counter() - started
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exited with {proc.returncode}: {err.decode()[-500:]}")
    return wall


# ------------------------------------------------------------------------ measurements


class Quiet:
    """Waits before each round for a moment of idleness; counts rounds started busy."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s, self.rounds, self.noisy, self.waited = max_wait_s, 0, 0, 0.0

    def wait(self) -> None:
        idle, waited = common.wait_for_idle(self.max_wait_s)
        self.rounds += 1
        self.noisy += not idle
        self.waited += waited

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "started_on_a_busy_machine": self.noisy,
                "wait_s": round(self.waited, 1)}  # fmt: skip


def measure(fn: Callable[[], float]) -> dict[str, float]:
    """Run ``fn`` (returns the timed wall seconds); adds the machine's CPU use meanwhile."""
    busy0 = common.machine_busy()[0]
    t0 = time.perf_counter()
    wall = fn()
    elapsed = time.perf_counter() - t0
    return {"wall_s": wall, "machine_cores": (common.machine_busy()[0] - busy0) / elapsed}


def once(system: str, sink_of: str, concurrency: int, send, expected: int, tmp: Path) -> dict:
    """Start ``sink_of`` afresh, time ``send(server)`` (wall seconds), check that ``expected``
    instances arrived, stop it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=tmp)) / "store"
    server = Server(sink_of, folder, concurrency)
    try:
        time.sleep(0.2)  # let it settle (Orthanc, pynetdicom threads)
        sample = measure(lambda: send(server))
        received = server.received()
    finally:
        server.stop()
        shutil.rmtree(folder.parent, ignore_errors=True)
    if received != expected:
        raise RuntimeError(f"{system}: {received} of {expected} instances arrived")
    return sample


def ingest_once(system: str, concurrency: int, files: list[Path], tmp: Path) -> dict:
    def send(server: Server) -> float:
        return run_storescu(server.port, files, server.aet, concurrency)

    return once(system, system, concurrency, send, len(files), tmp)


def export_once(system: str, files: list[Path], tmp: Path) -> dict:
    def send(sink: Server) -> float:
        if system == "storescu":
            return run_storescu(sink.port, files, sink.aet, 1)
        if system == "ours":
            return send_ours(sink.port, files)
        return export_ours(sink.port, files, sink.folder.parent / "outbox")

    return once(f"export-{system}", "storescp", 1, send, len(files), tmp)


def _destination(port: int):
    from connectors.dicom.export.sender import Destination
    from connectors.dicom.net import fastnet

    fastnet.install()  # as in `dataflow serve` (no-op with DATAFLOW_DICOM_FASTNET=0)
    fastnet.tune_malloc()  # as the receiver and the Exporter do

    return Destination(name="sink", ae_title=AET, host="127.0.0.1", port=port)


def send_ours(port: int, files: list[Path]) -> float:
    """``send_files`` over one association (describing the files is timed too)."""
    from connectors.dicom.export.sender import send_files
    from connectors.dicom.export.transport import describe_file

    failed: list = []
    started = time.perf_counter()
    infos = [(i, describe_file(f)) for i, f in enumerate(files)]
    send_files(_destination(port), infos, lambda r: failed.append(r) if r.error else None)
    wall = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"send_files: {len(failed)} failed, first: {failed[0]}")
    return wall


def export_ours(port: int, files: list[Path], state: Path) -> float:
    """An Outbox task of ``files`` delivered by the Exporter: enqueue to delivered."""
    from connectors.dicom.export.exporter import Exporter
    from connectors.dicom.export.outbox import Outbox

    outbox = Outbox(state)
    exporter = Exporter(outbox, [_destination(port)])
    try:
        started = time.perf_counter()
        exporter.enqueue(files, "sink")
        exporter.run_once(timeout=600)
        wall = time.perf_counter() - started
        tasks = exporter.tasks()
    finally:
        exporter.stop()
        outbox.close()
    if [t.state for t in tasks] != ["succeeded"]:
        raise RuntimeError(f"exporter: task not delivered: {tasks}")
    return wall


def rounds(
    cases: dict[str, dict[str, Callable[[], dict]]], n: int, quiet: Quiet
) -> dict[str, dict[str, list[dict]]]:
    """``n`` rounds; in each, every system of every case once, the order rotating."""
    samples: dict[str, dict[str, list[dict]]] = {c: {s: [] for s in cases[c]} for c in cases}
    for r in range(n):
        quiet.wait()
        for case, systems in cases.items():
            names = list(systems)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                try:
                    sample = systems[name]()
                except Exception as exc:  # a failing peer must not hide the others
                    print(f"  {case} {name}: FAILED: {exc}")
                    sample = {"error": str(exc)[:300]}
                samples[case][name].append(sample)
                if "wall_s" in sample:
                    print(f"  round {r + 1} {case:>9} {name:<16} {sample['wall_s']:6.2f} s "
                          f"(machine {sample['machine_cores']:.2f} cores)", flush=True)  # fmt: skip
    return samples


# ------------------------------------------------------------------------ records and report


def case_records(samples, count: int, nbytes: int) -> list[dict]:
    records = []
    for case, systems in samples.items():
        for system, runs in systems.items():
            walls = [s["wall_s"] for s in runs if "wall_s" in s]
            errors = [s["error"] for s in runs if "error" in s]
            if not walls:
                records.append({"case": case, "system": system, "value": None,
                                "unit": "instances/s", "errors": errors})  # fmt: skip
                continue
            wall = statistics.median(walls)
            records.append({
                "case": case, "system": system, "value": round(count / wall, 1),
                "unit": "instances/s", "mb_s": round(nbytes / wall / 1e6, 1),
                "median_s": round(wall, 3), "instances": count, "bytes": nbytes,
                "runs_s": [round(w, 3) for w in walls],
                "machine_cores": [round(s["machine_cores"], 2) for s in runs if "wall_s" in s],
                "errors": errors,
            })  # fmt: skip
    return records


def goal_records(records: list[dict]) -> list[dict]:
    value = {(r["case"], r["system"]): r["value"] for r in records}
    goals = []
    for case in sorted({r["case"] for r in records}):
        kind = case.split("-")[0]
        ours_systems = [s for c, s in value if c == case and s.startswith("ours")]
        for _, peer, at_least in (g for g in GOALS if g[0] == kind):
            for ours in ours_systems:
                a, b = value.get((case, ours)), value.get((case, peer))
                ratio = round(a / b, 2) if a and b else None
                goals.append({
                    "case": f"goal-{case}", "system": ours, "value": ratio, "unit": "x",
                    "versus": peer, "goal": at_least,
                    "met": None if ratio is None else ratio >= at_least,
                })  # fmt: skip
    return goals


def print_tables(records: list[dict], goals: list[dict]) -> None:
    print(f"\n{'case':<10} {'system':<16} {'instances/s':>12} {'MB/s':>8}  runs (s)")
    for r in records:
        if r["value"] is None:
            print(f"{r['case']:<10} {r['system']:<16} {'failed':>12}")
            continue
        runs = " ".join(f"{w:.2f}" for w in r["runs_s"])
        print(f"{r['case']:<10} {r['system']:<16} {r['value']:>12.1f} {r['mb_s']:>8.1f}  {runs}")
    print(f"\n{'goal':<17} {'ours':<14} {'versus':<16} {'ratio':>6} {'goal':>5}  met")
    for g in goals:
        ratio = "-" if g["value"] is None else f"{g['value']:.2f}"
        print(f"{g['case']:<17} {g['system']:<14} {g['versus']:<16} {ratio:>6} "
              f"{g['goal']:>5}  {g['met']}")  # fmt: skip


def provenance(args, count: int, nbytes: int) -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
        except OSError:
            return "not installed"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else ""

    return {
        **common.run_header(),
        **common.mode_and_argv(args),
        **common.machine(),
        "loadavg_at_start": list(os.getloadavg()),
        "network": "private namespace, loopback only, 127.0.0.1",
        "series": {"instances": count, "bytes": nbytes, "rows": 512, "columns": 512,
                   "bits": 16, "signed": True, "transfer_syntax": "Explicit VR Little Endian"},
        "storescu": version([str(STORESCU), "--version"]),
        "storescp": version([str(STORESCP), "--version"]),
        "orthanc": version([str(ORTHANC), "--version"]),
        "versions": common.module_versions(["pynetdicom", "pydicom"]),
        "settings": {
            "TCP_NODELAY": "1 for storescu, storescp, Orthanc",
            "ours": "connectors.dicom.receive.receiver defaults (max_pdu_size 4 MiB, fsync on, "
            "journal on: one fdatasync per acknowledged instance or group of them)",
            "ours-2p": "the same with processes: 2",
            "ours-nojournal": "journal: false (the file's fsync, then the folder's and SQLite's)",
            "ours-2p-nojournal": "journal: false, processes: 2",
            "storescp": f"-pm +xa --max-pdu {DCMTK_MAX_PDU}, --fork with 4 associations, "
            "no fsync",
            "orthanc": f"package defaults (SQLite index, files, no compression, fsync), "
            f"MaximumPduLength {DCMTK_MAX_PDU}",
            "pynetdicom": "benchmarks/dicom_scp.py: pynetdicom's default maximum_pdu_size",
            "storescu": "-R (only the needed contexts), its default PDU sizes",
            "export": "ours: send_files / Exporter with connectors.dicom.net.fastnet installed "
            "(as in dataflow serve); sink: storescp as above",
            "fastnet": os.environ.get("DATAFLOW_DICOM_FASTNET", "1") != "0",
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 slices, 2 rounds")
    parser.add_argument("--json", metavar="PATH", help="write the records here")
    parser.add_argument("--slices", type=int, help="instances in the series (default 500)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 2)")
    parser.add_argument("--systems", help="comma-separated subset of the ingest systems")
    parser.add_argument("--only", default="ingest,export", help="ingest, export or both")
    parser.add_argument("--concurrency", default="1,4", help="associations (default 1,4)")
    args = parser.parse_args(argv)
    enter_private_network()
    for tool in (STORESCU, STORESCP, ORTHANC):
        if not tool.exists():
            raise SystemExit(f"{tool} is missing: apt-get install dcmtk orthanc")
    from operators.dicom.phantom import write_ct_series

    started = time.perf_counter()
    busy_at_start = common.machine_busy()
    only = set(args.only.split(","))
    systems = args.systems.split(",") if args.systems else list(INGEST_SYSTEMS)
    slices = args.slices or SLICES[args.quick]
    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp_name:
        tmp = Path(tmp_name)
        write_ct_series(tmp / "series", slices=slices, size=512, signed=True)
        files = sorted((tmp / "series").rglob("*.dcm")) or sorted(
            p for p in (tmp / "series").rglob("*") if p.is_file()
        )
        nbytes = sum(f.stat().st_size for f in files)
        meta = provenance(args, len(files), nbytes)
        print(f"dicom benchmark ({meta['mode']}): {len(files)} instances, {nbytes / 1e6:.0f} MB, "
              f"{meta['cores']} cores, load {meta['loadavg_at_start'][0]:.2f}")  # fmt: skip
        cases: dict[str, dict[str, Callable[[], dict]]] = {}
        if "ingest" in only:
            for n in map(int, args.concurrency.split(",")):
                cases[f"ingest-{n}"] = {
                    s: (lambda s=s, n=n: ingest_once(s, n, files, tmp)) for s in systems
                }
        if "export" in only:
            cases["export-1"] = {
                s: (lambda s=s: export_once(s, files, tmp)) for s in EXPORT_SYSTEMS
            }
        quiet = Quiet(max_wait_s=3.0 if args.quick else 10.0)
        samples = rounds(cases, args.rounds or ROUNDS[args.quick], quiet)
    records = case_records(samples, len(files), nbytes)
    goals = goal_records(records)
    print_tables(records, goals)
    meta["quiet"] = quiet.summary()
    meta.update(common.run_footer(started, busy_at_start))
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    if args.json:
        common.write_results(args.json, records + goals, meta)


if __name__ == "__main__":
    main()
