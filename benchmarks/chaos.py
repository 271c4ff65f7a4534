"""Chaos benchmark: the faults of issue 9 against a running ``dataflow serve``.

Run from the repository root, as root (or where user namespaces are allowed)::

    .venv/bin/python benchmarks/chaos.py --quick                      # about 8 minutes
    .venv/bin/python benchmarks/chaos.py --scenario worker-kill --scenario hostile-peers
    .venv/bin/python benchmarks/chaos.py --json benchmarks/results/chaos-$(date +%F).json

Each scenario starts its own ``dataflow serve`` (a subprocess, a fresh temporary state
folder) with a service file made from ``examples/service.yaml``: free ports, the PACS a dcmtk
``storescp`` (``+uf``: every copy it receives is kept, so duplicates can be counted), and two
pipelines: ``ct-segmentation`` (the reference pipeline, its ``load`` stage wrapped so that its
worker notes its pid: the one the scenarios kill) and ``chaos-light`` (one stage that lists
the study, or hangs while a marker file names the study). Studies are phantom CT series
(``operators.dicom.phantom.write_ct_series``) sent with dcmtk's ``storescu``. Like
``dicom.py``, the script first moves itself into a private network namespace with only a
loopback interface (storescp listens on every interface); every dcmtk process gets
``TCP_NODELAY=1``.

Nothing may endanger the machine: the service's process tree runs in a memory cgroup of
``--memory-cap`` (6 GiB; ``prlimit --as`` per process where no cgroup can be made), every wait
has a deadline, and everything the script started is killed in ``finally`` blocks (Ctrl-C
included). Scenarios (``--scenario NAME``, repeatable; all by default):

1. ``worker-kill``: kill -9 of the ``load`` worker 5 times in a row (each new worker as soon
   as it is up, a study in flight), then normal studies: each must succeed without a restart
   of the service;
2. ``poison``: a study with one deflated instance that inflates to 3 GiB of zeros, and one with
   RescaleSlope NaN / RescaleIntercept inf, then normal studies: the poison jobs fail with a
   reason and export nothing, the service stays within its cap, the normal studies succeed;
3. ``hang``: a stage that hangs (under ``--stage-timeout``), the innocent study behind it; then
   SIGTERM while a study hangs: seconds to exit, and what happens to that job at the restart;
4. ``hostile-peers``: PDU headers claiming 0xFFFFFFFF bytes before an association and inside
   one, idle one-byte connections, connect-and-close floods; the service's memory and threads,
   whether a legitimate ``storescu`` gets through and how long it takes, when the idle ones
   are closed;
5. ``duplicates``: a study re-sent (changed bytes, same UIDs) with kill -9 of the service
   mid-transfer, several times; on disk one file per SOP Instance UID holding a version that
   was acknowledged; one SOP Instance UID in two series;
6. ``dead-letter``: the PACS down past the export deadline, the dead letter listed by
   ``dataflow exports --state dead``, the PACS up, ``--resend``: delivered once;
7. ``service-kill``: results not yet delivered (PACS down), kill -9 of the service, PACS up,
   restart: every result delivered once.

Figures per scenario: studies sent, instances acknowledged, results at the PACS, job states
and failure reasons, duplicates at the PACS (files received per SOP Instance UID), peak
memory per process of the service's tree (VmHWM, sampled from ``/proc`` every 0.2 s) and of
its cgroup, seconds to recover, and whether the guarantee held (``pass``). ``--json PATH``
writes the records and the provenance (machine, load before and after, commit) next to it;
``--markdown PATH`` the report (a table, then each scenario). This is a benchmark, not a
test: pytest does not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]
sys.path.append(str(ROOT / "tests"))  # dicom_peers: free ports, waiting for a listener

import _common as common  # noqa: E402  (benchmarks/ is not a package)
import yaml  # noqa: E402
from dicom import enter_private_network  # noqa: E402
from dicom_peers import DCMTK_ENV, free_port, wait_for_port  # noqa: E402

__all__ = ["main"]

PYTHON = sys.executable
STORESCU = "/usr/bin/storescu"  # dcmtk's; .venv/bin/storescu is pynetdicom's script
STORESCP = "/usr/bin/storescp"
SCENARIOS = (
    "worker-kill", "poison", "hang", "hostile-peers", "duplicates", "dead-letter",
    "service-kill",
)  # fmt: skip
SEG_AE, LIGHT_AE, PACS_AE, CALLING = "DATAFLOW-SEG", "CHAOS-LIGHT", "PACS", "STORESCU"
GiB, MiB = common.GiB, common.MiB
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

# A stage module written next to the generated pipelines: ``Load`` is the reference reader
# noting its worker's pid (so that a scenario can kill it); ``Probe`` lists a study, or hangs
# while CHAOS_DIR/hang-<StudyInstanceUID> exists (noting started-<uid> first).
STAGES = """
import os, time
from pathlib import Path

import pydicom

from dataflow.stage import Port, Stage
from operators.dicom import SeriesToVolume

MARKS = Path(os.environ["CHAOS_DIR"])


class Load(SeriesToVolume):
    def prepare(self, ctx):
        (MARKS / f"load-{os.getpid()}").touch()
        parent = getattr(super(), "prepare", None)
        if parent is not None:
            parent(ctx)


class Probe(Stage):
    inputs = {"study": Port("stream", element_type="dicom")}
    outputs = {"listing": Port("stream", element_type="text")}

    def execute(self, ctx, study):
        files = sorted(Path(study).rglob("*.dcm"))
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        (MARKS / f"started-{uid}").touch()
        while (MARKS / f"hang-{uid}").exists():
            time.sleep(0.1)
        out = ctx.output_dir("listing")
        (out / "listing.txt").write_text("\\n".join(p.name for p in files))
        return out
"""

LIGHT_PIPELINE = """api-version: 0.5.0
name: chaos-light
operators:
- name: probe
  stage: chaos_stages:Probe
  input:
  - name: study
  output:
  - name: listing
"""


# ------------------------------------------------------------------------ settings


@dataclass
class Settings:
    quick: bool
    work: Path
    memory_cap: int
    stage_timeout: str
    slices: int = 24
    size: int = 64
    normal_studies: int = 4
    kills: int = 5
    bomb_bytes: int = 3 * GiB
    idle_connections: int = 50
    floods: int = 300
    duplicate_rounds: int = 4
    export_deadline: int = 12
    deadline: float = 300.0  # seconds any one wait may take before the scenario gives up

    @classmethod
    def make(cls, args: argparse.Namespace, work: Path) -> Settings:
        s = cls(args.quick, work, args.memory_cap, args.stage_timeout)
        if args.quick:
            s.slices, s.size, s.normal_studies, s.kills = 16, 64, 3, 5
            s.idle_connections, s.floods, s.duplicate_rounds = 24, 300, 2
        return s


# ------------------------------------------------------------------------ processes


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def status_kib(pid: int, *keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def threads_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class MemoryCap:
    """A memory cgroup (v1 or v2) of ``limit`` bytes for the service's tree; where none can be
    made, ``prlimit --as`` of the same size on each process (inherited by its children)."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.path, self.kind = limit, None, "prlimit --as"
        for base in self._bases():
            path = base / name
            try:
                path.mkdir()
                limit_file = "memory.max" if (base / "cgroup.controllers").exists() else (
                    "memory.limit_in_bytes")  # fmt: skip
                (path / limit_file).write_text(str(limit))
                self.path, self.kind = (
                    path,
                    f"cgroup {'v2' if limit_file == 'memory.max' else 'v1'}",
                )
                break
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()

    @staticmethod
    def _bases() -> Iterator[Path]:
        """Our own memory cgroup (v1) or cgroup (v2), where children can be made."""
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, where = line.split(":", 2)
                if "memory" in controllers.split(","):
                    yield Path("/sys/fs/cgroup/memory") / where.lstrip("/")
                elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                    yield Path("/sys/fs/cgroup") / where.lstrip("/")

    def preexec(self) -> Callable[[], None] | None:
        if self.path is not None:
            return None
        import resource

        limit = self.limit
        return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def add(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def peak(self) -> int | None:
        """Peak memory of the cgroup since the last :meth:`reset` (bytes), if known."""
        if self.path is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int | None:
        if self.path is None:
            return None
        for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
            with contextlib.suppress(OSError):
                for line in (self.path / name).read_text().splitlines():
                    if line.startswith(key + " "):
                        return int(line.split()[1])
        return None

    def reset(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            with contextlib.suppress(OSError):
                self.path.rmdir()
                return
            time.sleep(0.1)


class Sampler:
    """Samples the peak memory (VmHWM, else VmRSS) and threads of every process below a
    root pid every ``interval`` s; a process keeps its role (from :meth:`role`) once seen."""

    def __init__(self, role: Callable[[int], str], interval: float = 0.2) -> None:
        self.role, self.interval = role, interval
        self.roots: list[int] = []
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, peak KiB)
        self.max_threads: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        for root in list(self.roots):
            if not alive(root):
                continue
            for pid in descendants(root):
                kib = status_kib(pid, "VmHWM", "VmRSS")
                peak = max(kib.values(), default=0)
                role = self.role(pid)  # again each time: a forked child execs later
                if role == "gone" and pid in self.peaks:
                    role = self.peaks[pid][0]
                old = self.peaks.get(pid, (role, 0))[1]
                self.peaks[pid] = (role, max(old, peak))
                if pid == root:
                    self.max_threads["serve"] = max(self.max_threads.get("serve", 0),
                                                    threads_of(pid))  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a process gone between two reads
                self.sample()

    def by_role(self) -> dict[str, dict[str, float]]:
        """Per role: peak MiB of its biggest process and how many processes had it."""
        out: dict[str, dict[str, float]] = {}
        for role, kib in self.peaks.values():
            entry = out.setdefault(role, {"peak_mib": 0.0, "processes": 0})
            entry["peak_mib"] = max(entry["peak_mib"], round(kib / 1024, 1))
            entry["processes"] += 1
        return dict(sorted(out.items()))


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group (the service runs in a session of its own) and any
    process left below it."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------ the PACS


class Pacs:
    """dcmtk ``storescp`` as the PACS: ``+uf`` keeps every copy it receives under a name of
    its own, so that a second delivery of one SOP Instance UID shows. Stop and start it at
    will: its port stays the same."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)
        self._seen: dict[Path, dict[str, str]] = {}

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        args = [STORESCP, "-aet", PACS_AE, "-od", str(self.folder), "-pm", "+xa", "+uf",
                "--fork", str(self.port)]  # fmt: skip
        log = open(self.folder.parent / "pacs.log", "a")  # noqa: SIM115 - lives with the proc
        self.proc = subprocess.Popen(args, env=DCMTK_ENV, stdout=log, stderr=log,
                                     start_new_session=True)  # fmt: skip
        log.close()
        wait_for_port(self.port, proc=self.proc, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(10)
            self.proc = None

    def received(self) -> list[dict[str, str]]:
        """One entry per file received: SOP class and instance, study."""
        import pydicom

        out = []
        for path in sorted(self.folder.iterdir()):
            if path not in self._seen:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    self._seen[path] = {"sop_class": str(ds.SOPClassUID),
                                        "sop": str(ds.SOPInstanceUID),
                                        "study": str(ds.StudyInstanceUID)}  # fmt: skip
                except Exception:  # still being written
                    continue
            out.append(self._seen[path])
        return out

    def results(self) -> dict[str, Any]:
        """SEGs at the PACS: files, distinct instances, duplicates, and distinct per study."""
        segs = [r for r in self.received() if r["sop_class"] == SEG_SOP_CLASS]
        distinct = {r["sop"] for r in segs}
        per_study: dict[str, set[str]] = {}
        for r in segs:
            per_study.setdefault(r["study"], set()).add(r["sop"])
        return {"files": len(segs), "distinct": len(distinct),
                "duplicates": len(segs) - len(distinct),
                "per_study": {k: len(v) for k, v in per_study.items()}}  # fmt: skip


# ------------------------------------------------------------------------ the service


class Service:
    """``dataflow serve`` over a service file made from ``examples/service.yaml``."""

    def __init__(self, settings: Settings, name: str, pacs: Pacs, **overrides: Any) -> None:
        self.settings = settings
        self.dir = settings.work / name
        self.marks = self.dir / "marks"
        self.marks.mkdir(parents=True)
        self.state = self.dir / "state"
        self.port = free_port()
        self.log = self.dir / "serve.log"
        self.config = self.dir / "service.yaml"
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []
        self.limits_dropped = False
        self.exports_error = ""  # why the last `dataflow exports` failed
        self.told_to_exit = False  # kill9() or terminate() since the last start
        self.cap = MemoryCap(settings.memory_cap, f"dataflow-chaos-{os.getpid()}-{name}")
        self.sampler = Sampler(self._role)
        self.sampler.start()
        self._write_files(pacs, overrides)

    def _write_files(self, pacs: Pacs, overrides: dict[str, Any]) -> None:
        (self.dir / "chaos_stages.py").write_text(STAGES)
        reference = yaml.safe_load((ROOT / "pipelines" / "ct-segmentation.yaml").read_text())
        for op in reference["operators"]:
            if op["name"] == "load":
                op["stage"] = "chaos_stages:Load"  # SeriesToVolume, noting its worker's pid
        (self.dir / "ct-segmentation.yaml").write_text(yaml.safe_dump(reference))
        (self.dir / "chaos-light.yaml").write_text(LIGHT_PIPELINE)
        config = yaml.safe_load((ROOT / "examples" / "service.yaml").read_text())
        config["state"] = str(self.state)
        config["pipelines"] = {
            "ct-segmentation": str(self.dir / "ct-segmentation.yaml"),
            "chaos-light": {"file": str(self.dir / "chaos-light.yaml")},
        }
        config["log"] = {"level": "info", "format": "json"}
        config.pop("retention", None)
        limits = config.setdefault("limits", {})
        limits["stage-timeout"] = self.settings.stage_timeout
        dicom = config["dicom"]
        dicom["receivers"] = [{"name": "plain", "host": "127.0.0.1", "port": self.port}]
        ae_titles = dicom["ae-titles"]
        seg = ae_titles.pop(SEG_AE)
        seg["timeout"] = 2
        light = {"pipelines": ["chaos-light"], "group-by": "study", "timeout": 2}
        dicom["ae-titles"] = {SEG_AE: seg, LIGHT_AE: light}
        dicom["allow"] = [{"ae": CALLING, "host": "127.0.0.1"}]
        dicom["destinations"] = {"PACS": {"ae": PACS_AE, "host": "127.0.0.1",
                                          "port": pacs.port, "calling-ae": "DATAFLOW",
                                          "max-associations": 2}}  # fmt: skip
        dicom["export"] = {"retry-initial": 1, "retry-max": 4, "deadline": 3600}
        for dotted, value in overrides.items():
            where = config
            *path, last = dotted.split(".")
            for key in path:
                where = where.setdefault(key, {})
            where[last] = value
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))

    # roles of processes in the tree, for the memory figures
    def _role(self, pid: int) -> str:
        if self.proc is not None and pid == self.proc.pid:
            return "serve (main)"
        if (self.marks / f"load-{pid}").exists():
            return "worker: load"
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return "gone"
        if not cmd:
            return "gone"
        if "resource_tracker" in cmd:
            return "resource tracker"
        if "spawn_main" in cmd:
            return "child (worker, receiver or store)"
        words = cmd.split()
        if "-m" in words[:-1]:
            return words[words.index("-m") + 1]  # e.g. a receiver process
        return Path(words[0]).name if words else "other"

    def start(self, *, wait: bool = True) -> None:
        """Start ``dataflow serve``; with ``wait``, until it listens. A service older than
        the ``limits`` section refuses it at start: then it starts again without it (and
        ``limits_dropped`` says so)."""
        self._spawn()
        if not wait:
            return
        try:
            self.wait_ready()
        except RuntimeError as exc:
            if "limits" not in str(exc) or not self._drop_limits():
                raise
            self._spawn()
            self.wait_ready()

    def _drop_limits(self) -> bool:
        config = yaml.safe_load(self.config.read_text())
        found = config.pop("limits", None) is not None
        for entry in config["pipelines"].values():
            if isinstance(entry, dict):
                found = entry.pop("limits", None) is not None or found
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.limits_dropped = found
        return found

    def _spawn(self) -> None:
        env = {**os.environ, "CHAOS_DIR": str(self.marks), "DATAFLOW_CONTAINER_ENGINE": "none"}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "dataflow.cli", "serve", str(self.config)], cwd=ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self.cap.preexec(),
            )  # fmt: skip
        self.cap.add(self.proc.pid)
        self.sampler.roots.append(self.proc.pid)
        self.starts.append(time.monotonic())
        self.told_to_exit = False

    def wait_ready(self) -> float:
        """Seconds from the start until the DICOM port accepts connections."""
        assert self.proc is not None
        try:
            wait_for_port(self.port, proc=self.proc, timeout=self.settings.deadline)
        except Exception as exc:
            raise RuntimeError(f"dataflow serve did not start: {exc}\n{self.tail()}") from None
        return time.monotonic() - self.starts[-1]

    def died(self) -> bool:
        """Whether the service exited without being told to (killed by the kernel...)."""
        return self.proc is not None and self.proc.poll() is not None and not self.told_to_exit

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> list[int]:
        """kill -9 of the main process only (as a crash would); its children that are still
        alive 10 s later are killed too and returned."""
        assert self.proc is not None
        pid, self.told_to_exit = self.proc.pid, True
        below = [p for p in descendants(pid) if p != pid]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in below):
            time.sleep(0.2)
        lingering = [p for p in below if alive(p)]
        kill_tree(pid)
        for p in lingering:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        return lingering

    def terminate(self, timeout: float = 120) -> float | None:
        """SIGTERM; seconds until it exited (None: it did not within ``timeout``: killed)."""
        if not self.running():
            return 0.0
        assert self.proc is not None
        t0, self.told_to_exit = time.monotonic(), True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return time.monotonic() - t0
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait(30)
            return None

    def close(self) -> None:
        """Stop everything this service started (SIGTERM, then SIGKILL of its whole tree)."""
        try:
            if self.running():
                self.terminate(60)
            if self.proc is not None:
                kill_tree(self.proc.pid)
        finally:
            self.sampler.stop()

    # what the service says
    def health(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.state / "health.json").read_text())
        return {}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "dataflow.cli", *args], cwd=ROOT, capture_output=True, text=True,
            timeout=timeout, env={**os.environ, "DATAFLOW_CONTAINER_ENGINE": "none"},
        )  # fmt: skip

    def jobs(self) -> list[dict[str, Any]]:
        done = self.cli("jobs", str(self.config), "--json")
        if done.returncode != 0:
            raise RuntimeError(f"dataflow jobs failed: {done.stderr[-2000:]}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def exports(self, *args: str) -> list[dict[str, Any]]:
        """``dataflow exports CONFIG --json ARGS``: the outbox's tasks ([] where the command
        is missing or fails)."""
        self.exports_error = ""
        done = self.cli("exports", str(self.config), "--json", *args)
        if done.returncode != 0:
            lines = [line.strip(" │╭╮╰╯─") for line in done.stderr.splitlines()]
            said = [line for line in lines if line[:1].isalnum()]
            self.exports_error = said[-1][:300] if said else f"exit {done.returncode}"
            return []
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def outbox(self) -> list[dict[str, Any]]:
        """The outbox's tasks: ``dataflow exports``, or where that fails (the command is
        older than the outbox's listing) the outbox's database, read only."""
        records = self.exports()
        if not self.exports_error:
            return records
        import sqlite3

        db = self.state / "dicom" / "outbox" / "outbox.sqlite"
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT id, job_id, destination, state, attempts, last_error "
                                "FROM tasks").fetchall()  # fmt: skip
        return [{**dict(row), "read_from": "outbox.sqlite"} for row in rows]

    def jobs_of(self, study: str, pipeline: str | None = None) -> list[dict[str, Any]]:
        return [j for j in self.jobs() if j["source"].get("group_uid") == study
                and (pipeline is None or j["pipeline"] == pipeline)]  # fmt: skip

    def log_events(self) -> dict[str, int]:
        """How many times each event at warning level or above, and each of a few info
        events of interest, appears in the service's JSON log."""
        of_interest = {"stage_recovered", "export_task_succeeded", "job_cut_short",
                       "receiver_worker_started", "service_started"}  # fmt: skip
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    event = record.get("event")
                    if record.get("level") in ("warning", "error", "critical") or (
                        event in of_interest
                    ):
                        counts[event] = counts.get(event, 0) + 1
        return dict(sorted(counts.items()))

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def load_worker(self, not_in: set[int] = frozenset()) -> int | None:
        """The pid of a live ``load`` worker (the newest), other than ``not_in``."""
        found = []
        for mark in self.marks.glob("load-*"):
            pid = int(mark.name.split("-")[1])
            if pid not in not_in and alive(pid):
                found.append((mark.stat().st_mtime, pid))
        return max(found)[1] if found else None


# ------------------------------------------------------------------------ studies and senders


@dataclass
class Study:
    uid: str
    files: list[Path]
    sops: list[str]


def make_study(settings: Settings, name: str, seed: int) -> Study:
    from operators.dicom.phantom import write_ct_series

    series = write_ct_series(settings.work / "studies" / name, slices=settings.slices,
                             size=settings.size, seed=seed, oblique=True)  # fmt: skip
    return Study(series.study_instance_uid, list(series.files), list(series.sop_instance_uids))


@dataclass
class Sent:
    returncode: int
    acknowledged: list[str]  # files answered Success, in order
    failed: int  # responses other than Success
    in_flight: str | None  # the file sent last without an answer
    seconds: float
    output: str = ""


def storescu(port: int, files: list[Path], called: str, *, timeout: float = 300,
             on_ack: Callable[[int], None] | None = None) -> Sent:  # fmt: skip
    """dcmtk ``storescu -v``: which files were answered Success (``on_ack(n)`` after each)."""
    args = [STORESCU, "-v", "-aet", CALLING, "-aec", called, "-R", "127.0.0.1", str(port),
            *map(str, files)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=DCMTK_ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    acked, failed, current, lines = [], 0, None, []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("I: Sending file: "):
                current = line.split(": ", 2)[2].strip()
            elif "Received Store Response" in line:
                if "(Success)" in line and current is not None:
                    acked.append(current)
                    if on_ack is not None:
                        on_ack(len(acked))
                else:
                    failed += 1
                current = None
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Sent(proc.returncode, acked, failed, current, time.monotonic() - t0,
                "".join(lines[-20:]))  # fmt: skip


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               service: Service | None = None, interval: float = 1.0) -> Any:  # fmt: skip
    """Poll ``predicate`` until truthy (returned); TimeoutError naming ``what`` after
    ``timeout`` s, RuntimeError if ``service`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if service is not None and not service.running():
            raise RuntimeError(f"dataflow serve exited while waiting for {what}\n{service.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


def job_states(service: Service, studies: list[Study], pipeline: str) -> dict[str, str]:
    """Study UID -> state of its newest job of ``pipeline`` ("none": no job yet)."""
    by_study: dict[str, str] = {}
    for job in reversed(service.jobs()):  # oldest first: the newest wins
        if job["pipeline"] == pipeline:
            by_study[job["source"].get("group_uid")] = job["state"]
    return {s.uid: by_study.get(s.uid, "none") for s in studies}


def wait_finished(service: Service, studies: list[Study], pipeline: str,
                  timeout: float) -> dict[str, str]:  # fmt: skip
    """Until every study's job has finished; returns the states."""

    def done() -> dict[str, str] | None:
        states = job_states(service, studies, pipeline)
        return states if all(s in ("succeeded", "failed") for s in states.values()) else None

    return wait_until(done, timeout, f"{len(studies)} {pipeline} jobs to finish", service, 2.0)


def count_states(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record.get("state"))] = counts.get(str(record.get("state")), 0) + 1
    return counts


def failures(service: Service) -> list[dict[str, Any]]:
    return [{"job": j["id"], "pipeline": j["pipeline"], "stage": j.get("stage"),
             "error": (j.get("error") or "")[:300]}
            for j in service.jobs() if j["state"] == "failed"]  # fmt: skip


# ------------------------------------------------------------------------ scenarios


@dataclass
class Outcome:
    """What one scenario measured."""

    scenario: str
    guarantee: str
    passed: bool | None = None  # None: not run to the end (see ``note``)
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def check(self, name: str, ok: bool) -> None:
        self.checks[name] = bool(ok)


def run_scenario(name: str, settings: Settings) -> Outcome:
    fn, guarantee = SCENARIO_FUNCTIONS[name]
    outcome = Outcome(name, guarantee)
    pacs = Pacs(settings.work / name / "pacs")
    services: list[Service] = []
    t0 = time.monotonic()
    try:
        fn(settings, pacs, services, outcome)
    except Exception as exc:  # the scenario could not finish: recorded, the next one runs
        outcome.note = f"{type(exc).__name__}: {exc}"[:3000]
        outcome.figures["error_traceback"] = traceback.format_exc()[-3000:]
        for service in services:
            if service.died():
                outcome.check("the service kept running", False)
                outcome.figures["service_exit"] = service.proc.returncode
    finally:
        for service in services:
            with contextlib.suppress(Exception):
                service.close()
            outcome.figures.setdefault("peak_memory", {}).update(
                {f"{role}": v for role, v in service.sampler.by_role().items()}
            )
            peak = service.cap.peak()
            if peak is not None:
                outcome.figures["peak_memory_cgroup_mib"] = round(peak / MiB, 1)
            oom = service.cap.oom_kills()
            if oom:
                outcome.figures["oom_kills_in_cgroup"] = oom
            outcome.figures["max_threads_serve"] = service.sampler.max_threads.get("serve")
            outcome.figures["log_events"] = service.log_events()
            if service.limits_dropped:
                outcome.figures["limits_dropped"] = "this service refused limits: none set"
            service.cap.remove()
        pacs.stop()
    outcome.figures["elapsed_s"] = round(time.monotonic() - t0, 1)
    if outcome.checks and not all(outcome.checks.values()):
        outcome.passed = False
    elif outcome.checks and not outcome.note:
        outcome.passed = True  # else None: not run to the end (skipped, or an error)
    return outcome


def new_service(settings: Settings, name: str, pacs: Pacs, services: list[Service],
                **overrides: Any) -> Service:  # fmt: skip
    service = Service(settings, name, pacs, **overrides)
    services.append(service)
    return service


def start_service(settings: Settings, name: str, pacs: Pacs, services: list[Service], *,
                  pacs_up: bool = True, **overrides: Any) -> Service:  # fmt: skip
    """The PACS (unless ``pacs_up`` is false) and a new service, both started."""
    if pacs_up:
        pacs.start()
    service = new_service(settings, name, pacs, services, **overrides)
    service.start()
    return service


def send_and_count(service: Service, studies: list[Study], called: str) -> tuple[int, int]:
    """Send each study (one storescu each); (instances sent, acknowledged)."""
    sent = acked = 0
    for study in studies:
        result = storescu(service.port, study.files, called)
        sent += len(study.files)
        acked += len(result.acknowledged)
    return sent, acked


def scenario_worker_kill(settings: Settings, pacs: Pacs, services: list[Service],
                         out: Outcome) -> None:  # fmt: skip
    service = start_service(settings, "worker-kill", pacs, services)
    first_pid = service.proc.pid
    warm = make_study(settings, "wk-warm", 100)
    victim = make_study(settings, "wk-victim", 101)
    normal = [make_study(settings, f"wk-{i}", 110 + i) for i in range(settings.normal_studies)]
    sent, acked = send_and_count(service, [warm], SEG_AE)
    wait_finished(service, [warm], "ct-segmentation", settings.deadline)
    # the victim's job reaches load while its worker is killed, again and again
    s2, a2 = send_and_count(service, [victim], SEG_AE)
    sent, acked = sent + s2, acked + a2
    killed: set[int] = set()
    kill_times = []
    heal_wait = 180  # the longest back-off between restarts is 60 s
    came_back = True
    for _ in range(settings.kills):
        try:
            pid = wait_until(lambda: service.load_worker(killed), heal_wait,
                             "a new load worker", service, 0.1)  # fmt: skip
        except TimeoutError:
            came_back = False  # the stage stays broken: the later studies show what that does
            break
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        kill_times.append(time.time())
    last_kill = kill_times[-1]
    health_after_kills = service.health()

    # healed: the stage says ok again with a live worker (nobody restarted anything)
    def healed() -> bool:
        health = service.health()
        if service.load_worker(killed) is None:
            return False
        if not (service.state / "health.json").exists():  # a service without health.json
            return True
        return health.get("time", 0) > last_kill + 1 and load_ok(health)

    healed_s = None
    if came_back:
        with contextlib.suppress(TimeoutError):
            wait_until(healed, heal_wait, "the load stage to heal", service, 0.5)
            healed_s = round(time.time() - last_kill, 1)
    out.check(f"the load stage came back by itself after each of {settings.kills} kills",
              healed_s is not None)  # fmt: skip
    s3, a3 = send_and_count(service, normal, SEG_AE)
    sent, acked = sent + s3, acked + a3
    states = wait_finished(service, normal, "ct-segmentation", settings.deadline)
    wait_until(lambda: sum(pacs.results()["per_study"].get(s.uid, 0) > 0 for s in normal)
               >= sum(v == "succeeded" for v in states.values()), 120,
               "the results at the PACS", service)  # fmt: skip
    time.sleep(3)  # a late duplicate would show
    results = pacs.results()
    victim_state = job_states(service, [victim], "ct-segmentation")[victim.uid]
    out.figures.update({
        "studies_sent": 2 + len(normal), "instances_sent": sent, "instances_acknowledged": acked,
        "kills": len(killed), "victim_job": victim_state, "normal_jobs": list(states.values()),
        "results_at_pacs": results["distinct"], "duplicates_at_pacs": results["duplicates"],
        "failures": failures(service), "recover_s": healed_s,
        "stage_after_kills": stage_states(health_after_kills, "ct-segmentation", "load"),
        "health_problems_after_kills": health_after_kills.get("problems", []),
        "health_at_end": service.health().get("status"),
        "counters": service.health().get("pipelines", {}).get("ct-segmentation", {}).get(
            "counters"),
    })  # fmt: skip
    out.check("service never restarted", service.running() and service.proc.pid == first_pid)
    out.check("every later study succeeded", all(v == "succeeded" for v in states.values()))
    out.check("one result per later study",
              all(results["per_study"].get(s.uid) == 1 for s in normal))  # fmt: skip
    out.check("no duplicates at the PACS", results["duplicates"] == 0)


def load_ok(health: dict[str, Any]) -> bool:
    state = stage_states(health, "ct-segmentation", "load")
    return isinstance(state, dict) and state.get("state") == "ok" and state.get("live", 1) > 0


def stage_states(health: dict[str, Any], pipeline: str, stage: str) -> Any:
    with contextlib.suppress(Exception):
        stages = health["pipelines"][pipeline]["stages"]
        return stages.get(stage, stages) if isinstance(stages, dict) else stages
    with contextlib.suppress(Exception):
        return health["pipelines"][pipeline]
    return None


def scenario_hostile_peers(settings: Settings, pacs: Pacs, services: list[Service],
                           out: Outcome) -> None:  # fmt: skip
    service = start_service(settings, "hostile-peers", pacs, services)
    pid = service.proc.pid
    studies = iter(make_study(settings, f"hp-{i}", 400 + i) for i in range(8))
    steps: dict[str, dict[str, Any]] = {}
    out.figures["steps"] = steps  # kept as far as it got, should the service die

    def main_mib() -> float:
        return round(status_kib(pid, "VmRSS").get("VmRSS", 0) / 1024, 1)

    def tree_mib() -> float:
        return round(sum(status_kib(p, "VmRSS").get("VmRSS", 0)
                         for p in descendants(pid)) / 1024, 1)  # fmt: skip

    def legit(step: str, extra: dict[str, Any] | None = None) -> None:
        study = next(studies)
        before = (main_mib(), tree_mib())
        result = storescu(service.port, study.files, LIGHT_AE, timeout=120)
        service.sampler.sample()
        steps[step] = {
            "legit_acknowledged": f"{len(result.acknowledged)}/{len(study.files)}",
            "legit_s": round(result.seconds, 2), "legit_ok": len(result.acknowledged) == len(
                study.files), "main_rss_mib": [before[0], main_mib()],
            "tree_rss_mib": [before[1], tree_mib()], "threads": threads_of(pid),
            **(extra or {}),
        }  # fmt: skip
        if not steps[step]["legit_ok"]:
            steps[step]["storescu"] = result.output[-600:]

    legit("baseline")
    # 1. three headers claiming 0xFFFFFFFF bytes before any association
    hostile = [raw_connect(service.port) for _ in range(3)]
    for sock in hostile:
        sock.sendall(b"\x01\x00" + struct.pack(">I", 0xFFFFFFFF))
    time.sleep(2)
    legit("3 A-ASSOCIATE-RQ headers of 4 GiB", {"main_rss_mib_held": main_mib()})
    close_all(hostile)
    # 2. an association, then an A-RELEASE-RQ header claiming 0xFFFFFFFF bytes
    sock = raw_connect(service.port)
    accepted = associate(sock, LIGHT_AE)
    sock.sendall(b"\x05\x00" + struct.pack(">I", 0xFFFFFFFF))
    time.sleep(2)
    legit("A-RELEASE-RQ header of 4 GiB inside an association",
          {"association_accepted": accepted, "main_rss_mib_held": main_mib()})  # fmt: skip
    close_all([sock])
    # 3. idle one-byte connections, then a legitimate sender at once
    idle = [raw_connect(service.port) for _ in range(settings.idle_connections)]
    for sock in idle:
        with contextlib.suppress(OSError):
            sock.sendall(b"\x01")
    t_idle = time.monotonic()
    legit(f"{len(idle)} idle one-byte connections")
    closed_after = wait_closed(idle, 60)
    steps[f"{len(idle)} idle one-byte connections"].update({
        "idle_closed_by_service": sum(s is not None for s in closed_after),
        "idle_closed_within_s": round(max((s for s in closed_after if s is not None),
                                          default=0) - 0, 1) if closed_after else None,
        "since_opened_s": round(time.monotonic() - t_idle, 1),
    })  # fmt: skip
    close_all(idle)
    # 4. connect-and-close floods
    t0 = time.monotonic()
    for _ in range(settings.floods):
        with contextlib.suppress(OSError):
            raw_connect(service.port).close()
    flood_s = time.monotonic() - t0
    legit(
        f"{settings.floods} connect-and-close",
        {"flood_s": round(flood_s, 1), "threads_right_after": threads_of(pid)},
    )
    time.sleep(5)
    steps[f"{settings.floods} connect-and-close"]["threads_5s_later"] = threads_of(pid)
    base = steps["baseline"]["main_rss_mib"][1]
    worst = max(max(s["main_rss_mib"] + [s.get("main_rss_mib_held", 0)]) for s in steps.values())
    out.figures.update({"steps": steps, "main_rss_growth_mib": round(worst - base, 1),
                        "studies_sent": len(steps)})  # fmt: skip
    out.check("every legitimate sender got through", all(s["legit_ok"] for s in steps.values()))
    out.check("the service's main process grew < 256 MiB", worst - base < 256)
    idle_step = steps[f"{len(idle)} idle one-byte connections"]
    out.check("idle connections closed by the service within 60 s",
              idle_step["idle_closed_by_service"] == len(idle))  # fmt: skip
    out.check("the service kept running", service.running())


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def wait_closed(socks: list[socket.socket], timeout: float) -> list[float | None]:
    """Seconds until the service closed each connection (None: still open at ``timeout``)."""
    import select

    t0 = time.monotonic()
    closed: list[float | None] = [None] * len(socks)
    while time.monotonic() - t0 < timeout and None in closed:
        waiting = [s for s, c in zip(socks, closed, strict=True) if c is None]
        ready, _, _ = select.select(waiting, [], [], 0.5)
        for sock in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # EOF or reset (an A-ABORT's bytes are read first)
                closed[socks.index(sock)] = time.monotonic() - t0
    return closed


def ae(title: str) -> bytes:
    return title.encode().ljust(16)


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate(sock: socket.socket, called: str) -> bool:
    """A minimal A-ASSOCIATE-RQ (Verification, Implicit VR LE); whether it was accepted."""
    context = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))  # fmt: skip
    user = item(0x50, item(0x51, struct.pack(">I", 16384)))
    body = (struct.pack(">HH", 1, 0) + ae(called) + ae(CALLING) + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)  # fmt: skip
    sock.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
    header = sock.recv(6)
    return len(header) == 6 and header[0] == 0x02


def scenario_service_kill(settings: Settings, pacs: Pacs, services: list[Service],
                          out: Outcome) -> None:  # fmt: skip
    service = start_service(settings, "service-kill", pacs, services, pacs_up=False)
    studies = [make_study(settings, f"sk-{i}", 700 + i) for i in range(settings.normal_studies)]
    sent, acked = send_and_count(service, studies, SEG_AE)
    states = wait_finished(service, studies, "ct-segmentation", settings.deadline)
    outbox = wait_until(lambda: len(service.outbox()) >= len(studies) and service.outbox(), 60,
                        "the results in the outbox", service, 2)  # fmt: skip
    at_pacs_before = pacs.results()["distinct"]
    lingering = service.kill9()
    pacs.start()
    t_restart = time.monotonic()
    service.start()
    ready_s = time.monotonic() - t_restart
    succeeded = [s for s in studies if states[s.uid] == "succeeded"]
    recover_s = None
    with contextlib.suppress(TimeoutError):  # the checks below say what is missing
        wait_until(lambda: all(pacs.results()["per_study"].get(s.uid) for s in succeeded),
                   settings.deadline, "every result at the PACS", service)  # fmt: skip
        recover_s = round(time.monotonic() - t_restart, 1)
    time.sleep(5)  # a second delivery would show
    results = pacs.results()
    out.figures.update({
        "studies_sent": len(studies), "instances_sent": sent, "instances_acknowledged": acked,
        "jobs": list(states.values()), "outbox_at_kill": count_states(outbox),
        "dataflow_exports": service.exports_error or "works",
        "children_alive_10s_after_kill": len(lingering), "restart_to_listening_s":
        round(ready_s, 1), "recover_s": recover_s,
        "results_at_pacs": results["distinct"], "duplicates_at_pacs": results["duplicates"],
        "failures": failures(service),
    })  # fmt: skip
    out.check(
        "results were undelivered at the kill",
        at_pacs_before == 0 and any(t.get("state") in ("pending", "sending") for t in outbox),
    )
    out.check("every study succeeded", len(succeeded) == len(studies))
    out.check("every result delivered once",
              all(results["per_study"].get(s.uid) == 1 for s in succeeded)
              and results["duplicates"] == 0)  # fmt: skip


def write_bomb(source: Path, out: Path, inflated: int) -> None:
    """``source`` (a CT slice) without its pixels, as Deflated Explicit VR Little Endian, then
    a Pixel Data element claiming ``inflated`` bytes of zeros, streamed through zlib: a file
    of about inflated / 1000 bytes that inflates to ``inflated``."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as DICOM has it
    zeros = bytes(16 * MiB)
    with open(out, "wb") as f:
        f.write(bytes(128) + b"DICM")
        write_file_meta_info(f, ds.file_meta)
        f.write(deflate.compress(body.getvalue() + pixel_header))
        for start in range(0, inflated, len(zeros)):
            f.write(deflate.compress(zeros[: min(len(zeros), inflated - start)]))
        f.write(deflate.flush())


def rewrite(files: list[Path], folder: Path, change: Callable[[Any], None]) -> list[Path]:
    """Copies of ``files`` in ``folder`` with ``change(dataset)`` applied (values not
    validated: a NaN is written as it is)."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with pydicom.config.disable_value_validation():
        for path in files:
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(folder / path.name)
            out.append(folder / path.name)
    return out


def send_file_raw(port: int, path: Path, called: str) -> str:
    """pynetdicom C-STORE of ``path`` as it is on disk (its dataset is never decoded: the
    bomb inflates only at the receiver); the status, or why it was not sent."""
    import pydicom
    from pynetdicom import AE

    meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    ae = AE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return "association refused"
    try:
        status = assoc.send_c_store(path)
        return f"0x{status.Status:04X}" if status else "no answer"
    finally:
        assoc.release()


def scenario_poison(settings: Settings, pacs: Pacs, services: list[Service],
                    out: Outcome) -> None:  # fmt: skip
    service = start_service(settings, "poison", pacs, services)
    first_pid = service.proc.pid
    bomb_study = make_study(settings, "po-bomb", 200)
    bomb = settings.work / "studies" / "bomb.dcm"
    t0 = time.monotonic()
    write_bomb(bomb_study.files[0], bomb, settings.bomb_bytes)
    out.figures["bomb"] = {"file_bytes": bomb.stat().st_size,
                           "inflates_to_bytes": settings.bomb_bytes,
                           "written_in_s": round(time.monotonic() - t0, 1)}  # fmt: skip
    nan_source = make_study(settings, "po-nan-source", 201)

    def nan_rescale(ds: Any) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "NaN", "inf"

    nan_files = rewrite(nan_source.files, settings.work / "studies" / "po-nan", nan_rescale)
    nan_study = Study(nan_source.uid, nan_files, nan_source.sops)
    normal = [make_study(settings, f"po-{i}", 210 + i) for i in range(settings.normal_studies)]
    out.figures["bomb"]["store_status"] = send_file_raw(service.port, bomb, SEG_AE)
    rest = storescu(service.port, bomb_study.files[1:], SEG_AE)
    sent, acked = send_and_count(service, [nan_study, *normal], SEG_AE)
    sent += len(bomb_study.files)
    acked += len(rest.acknowledged) + (out.figures["bomb"]["store_status"] == "0x0000")
    poison = [bomb_study, nan_study]
    with contextlib.suppress(TimeoutError):  # a study still running then: the states say so
        wait_finished(service, [*poison, *normal], "ct-segmentation", settings.deadline)
    states = job_states(service, [*poison, *normal], "ct-segmentation")
    succeeded = [s for s in normal if states[s.uid] == "succeeded"]
    with contextlib.suppress(TimeoutError):  # a missing result fails a check below
        wait_until(lambda: all(pacs.results()["per_study"].get(s.uid) for s in succeeded), 120,
                   "the results at the PACS", service)  # fmt: skip
    time.sleep(3)
    results = pacs.results()
    jobs = {j["source"].get("group_uid"): j for j in service.jobs()}
    reasons = {name: (jobs.get(s.uid) or {}).get("error") for name, s in
               (("bomb", bomb_study), ("nan", nan_study))}  # fmt: skip
    out.figures.update({
        "studies_sent": 2 + len(normal), "instances_sent": sent, "instances_acknowledged": acked,
        "poison_jobs": {"bomb": states[bomb_study.uid], "nan": states[nan_study.uid]},
        "poison_reasons": reasons, "normal_jobs": [states[s.uid] for s in normal],
        "results_at_pacs": results["distinct"], "duplicates_at_pacs": results["duplicates"],
        "poison_results_at_pacs": sum(results["per_study"].get(s.uid, 0) for s in poison),
        "failures": failures(service),
    })  # fmt: skip
    out.check("the service kept running", service.running() and service.proc.pid == first_pid)
    out.check("both poison studies failed", all(states[s.uid] == "failed" for s in poison))
    out.check("no result of a poison study reached the PACS",
              out.figures["poison_results_at_pacs"] == 0)  # fmt: skip
    out.check(
        "every failure names its reason (memory or size for the bomb, not a bare signal)",
        all(reasons.values()) and not str(reasons["bomb"]).rstrip(")").endswith("SIGKILL"),
    )
    out.check("every normal study succeeded, once at the PACS", len(succeeded) == len(normal)
              and all(results["per_study"].get(s.uid) == 1 for s in normal))  # fmt: skip


def scenario_hang(settings: Settings, pacs: Pacs, services: list[Service],
                  out: Outcome) -> None:  # fmt: skip
    limits = {"shutdown-grace": "5s"}
    if settings.stage_timeout.lower() not in ("", "none", "default"):
        limits["stage-timeout"] = settings.stage_timeout
    service = start_service(settings, "hang", pacs, services, limits=limits)
    marks = service.marks
    hung, innocent, cut = (make_study(settings, f"ha-{i}", 300 + i) for i in range(3))
    (marks / f"hang-{hung.uid}").touch()
    sent, acked = send_and_count(service, [hung, innocent], LIGHT_AE)
    t_sent = time.time()
    wait_until(lambda: (marks / f"started-{hung.uid}").exists(), 120, "the hung stage", service)
    started = (marks / f"started-{hung.uid}").stat().st_mtime
    with contextlib.suppress(TimeoutError):  # no time-out at all: the states say so
        wait_finished(service, [hung, innocent], "chaos-light", settings.deadline)
    states = job_states(service, [hung, innocent], "chaos-light")
    jobs = {j["source"].get("group_uid"): j for j in service.jobs()}
    hung_job, innocent_job = jobs.get(hung.uid, {}), jobs.get(innocent.uid, {})
    out.figures.update({
        "stage_timeout": limits.get("stage-timeout", "service default"),
        "hung_job": states[hung.uid], "hung_reason": hung_job.get("error"),
        "hung_failed_after_s": round((hung_job.get("finished") or 0) - started, 1)
        if hung_job.get("finished") else None, "innocent_job": states[innocent.uid],
        "innocent_done_after_s": round((innocent_job.get("finished") or 0) - t_sent, 1)
        if innocent_job.get("finished") else None,
    })  # fmt: skip
    out.check("the hung job failed with a time-out", states[hung.uid] == "failed"
              and "time" in str(hung_job.get("error")).lower())  # fmt: skip
    out.check("the innocent study behind it succeeded", states[innocent.uid] == "succeeded")
    # SIGTERM while a stage hangs (a new one; or the first, still hanging without a time-out)
    if states[hung.uid] in ("failed", "succeeded"):
        (marks / f"hang-{cut.uid}").touch()
        s2, a2 = send_and_count(service, [cut], LIGHT_AE)
        sent, acked = sent + s2, acked + a2
        wait_until(lambda: (marks / f"started-{cut.uid}").exists(), 120, "the second hang",
                   service)  # fmt: skip
    else:
        cut = hung
    exit_s = service.terminate(timeout=120)
    for mark in marks.glob("hang-*"):
        mark.unlink()
    service.start()
    with contextlib.suppress(TimeoutError):
        wait_finished(service, [cut], "chaos-light", settings.deadline)
    after = job_states(service, [cut], "chaos-light")
    job = next(iter(service.jobs_of(cut.uid, "chaos-light")), {})
    out.figures.update({
        "studies_sent": 3 if cut is not hung else 2, "instances_sent": sent,
        "instances_acknowledged": acked, "shutdown_grace": limits["shutdown-grace"],
        "sigterm_exit_s": None if exit_s is None else round(exit_s, 1),
        "cut_job_after_restart": after[cut.uid],
        "cut_job_history": [h.get("event") for h in job.get("history") or []],
        "failures": failures(service),
    })  # fmt: skip
    out.check("SIGTERM: exited within the grace + 30 s (killed after 120 s otherwise)",
              exit_s is not None and exit_s < 35)  # fmt: skip
    out.check("the job cut short ran again at the restart and succeeded",
              after[cut.uid] == "succeeded")  # fmt: skip


def scenario_duplicates(settings: Settings, pacs: Pacs, services: list[Service],
                        out: Outcome) -> None:  # fmt: skip
    import pydicom

    service = start_service(settings, "duplicates", pacs, services)
    original = make_study(settings, "du-v1", 500)
    sop_of = {str(f): sop for f, sop in zip(original.files, original.sops, strict=True)}
    first = storescu(service.port, original.files, SEG_AE)
    acked: dict[str, set[str]] = {sop_of[f]: {"v1"} for f in first.acknowledged}
    in_flight: dict[str, set[str]] = {}
    sent, kills = len(original.files), []
    for round_ in range(2, settings.duplicate_rounds + 2):
        version = f"v{round_}"

        def mark(ds: Any, version: str = version) -> None:
            ds.ImageComments = f"chaos {version}"

        files = rewrite(original.files, settings.work / "studies" / f"du-{version}", mark)
        sop_of.update({str(f): sop for f, sop in zip(files, original.sops, strict=True)})
        half = len(files) // 2

        def kill_at(n: int, half: int = half) -> None:
            if n == half:
                kills.append(len(service.kill9()))

        result = storescu(service.port, files, SEG_AE, on_ack=kill_at)
        sent += len(files)
        for f in result.acknowledged:
            acked.setdefault(sop_of[f], set()).add(version)
        if result.in_flight is not None:
            in_flight.setdefault(sop_of[result.in_flight], set()).add(version)
        if not service.running():
            service.start()
    # the same SOP Instance UID in another series of the study
    moved = rewrite(
        original.files[:1],
        settings.work / "studies" / "du-series",
        lambda ds: setattr(ds, "SeriesInstanceUID", ds.SeriesInstanceUID + ".9"),
    )
    other_series = storescu(service.port, moved, SEG_AE)
    time.sleep(5)  # the groups complete; the spool is what we count
    on_disk: dict[str, list[str]] = {}
    for path in (service.state / "dicom" / "spool").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        version = str(ds.get("ImageComments", "chaos v1")).split()[-1]
        on_disk.setdefault(str(ds.SOPInstanceUID), []).append(version)
    latest = older = flight = never = 0
    for sop, versions in on_disk.items():
        for version in versions:
            good = acked.get(sop, set())
            if good and version == max(good, key=lambda v: int(v[1:])):
                latest += 1
            elif version in good:
                older += 1
            elif version in in_flight.get(sop, set()):
                flight += 1
            else:
                never += 1
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not any(state in ("queued", "running") for state in
                                   job_states(service, [original], "ct-segmentation").values()),
                   settings.deadline, "the jobs to finish", service, 2)  # fmt: skip
    time.sleep(3)
    results = pacs.results()
    out.figures.update({
        "studies_sent": 1, "instances_sent": sent + len(moved),
        "instances_acknowledged": sum(len(v) for v in acked.values())
        + len(other_series.acknowledged), "kills": len(kills),
        "files_on_disk": sum(len(v) for v in on_disk.values()), "sops_on_disk": len(on_disk),
        "on_disk": {"latest acknowledged": latest, "older acknowledged": older,
                    "in flight at a kill": flight, "never acknowledged": never},
        "moved_sop_files": len(on_disk.get(original.sops[0], [])),
        "results_at_pacs": results["distinct"], "duplicates_at_pacs": results["duplicates"],
        "jobs": [j["state"] for j in service.jobs()], "failures": failures(service),
    })  # fmt: skip
    out.check("one file per SOP Instance UID on disk",
              all(len(v) == 1 for v in on_disk.values()))  # fmt: skip
    out.check("every acknowledged instance is on disk", set(acked) <= set(on_disk))
    out.check("no file on disk holds bytes never acknowledged", never == 0)
    out.check("no duplicates at the PACS", results["duplicates"] == 0)


def scenario_dead_letter(settings: Settings, pacs: Pacs, services: list[Service],
                         out: Outcome) -> None:  # fmt: skip
    export = {"retry-initial": 1, "retry-max": 2, "deadline": settings.export_deadline}
    service = start_service(settings, "dead-letter", pacs, services, pacs_up=False,
                            **{"dicom.export": export})  # fmt: skip
    study = make_study(settings, "dl", 600)
    sent, acked = send_and_count(service, [study], SEG_AE)
    states = wait_finished(service, [study], "ct-segmentation", settings.deadline)

    def dead() -> list[dict[str, Any]]:
        return [t for t in service.outbox() if t.get("state") == "dead"]

    letters = wait_until(dead, settings.export_deadline + 120, "a dead letter", service, 2)
    listed = service.exports("--state", "dead")
    health = service.cli("health", str(service.config))
    job = next(iter(service.jobs_of(study.uid)), {})
    out.figures.update({
        "studies_sent": 1, "instances_sent": sent, "instances_acknowledged": acked,
        "jobs": list(states.values()), "export_deadline_s": settings.export_deadline,
        "dead_letters": len(letters), "listed_by_dataflow_exports": len(listed),
        "job_exports": [e.get("state") for e in job.get("exports") or []],
        "dataflow_health_exit": health.returncode,
    })  # fmt: skip
    out.check("dataflow jobs shows the export dead", "dead" in out.figures["job_exports"])
    out.check("dataflow health says there is a problem (exit 1)", health.returncode == 1)
    if service.exports_error:  # the command has not landed (or cannot read the outbox)
        out.note = f"skipped the re-send: dataflow exports failed ({service.exports_error})"
        return
    out.check("the dead letter is listed by dataflow exports --state dead", len(listed) == 1)
    if not listed:
        return
    pacs.start()
    t0 = time.monotonic()
    task = listed[0].get("task_id") or listed[0].get("id")
    resend = service.cli("exports", str(service.config), "--resend", str(task))
    out.figures["resend"] = (resend.stdout + resend.stderr).strip()[-300:]
    wait_until(lambda: pacs.results()["per_study"].get(study.uid), 120, "the re-sent result",
               service)  # fmt: skip
    out.figures["recover_s"] = round(time.monotonic() - t0, 1)
    time.sleep(5)
    results = pacs.results()
    out.figures.update({"results_at_pacs": results["distinct"],
                        "duplicates_at_pacs": results["duplicates"]})  # fmt: skip
    out.check("re-sent and delivered once", resend.returncode == 0 and results["files"] == 1)


SCENARIO_FUNCTIONS: dict[str, tuple[Callable[..., None], str]] = {
    "worker-kill": (scenario_worker_kill, "a stage whose worker is killed again and again heals: "
                    "every later study succeeds without a restart of the service"),
    "poison": (scenario_poison, "a poison study (a deflate bomb, NaN rescale values) fails with "
               "its reason, exports nothing and starves no one: later studies succeed"),
    "hang": (scenario_hang, "a hung stage times out and the study behind it succeeds; SIGTERM "
             "stops the service within its grace and the job runs again at the restart"),
    "hostile-peers": (scenario_hostile_peers, "a few hostile bytes or idle connections neither "
                      "grow the service's memory nor lock a legitimate sender out"),
    "duplicates": (scenario_duplicates, "re-sent instances with kill -9 mid-transfer: one file "
                   "per SOP Instance UID on disk, always bytes that were acknowledged"),
    "dead-letter": (scenario_dead_letter, "a dead letter is listed, and once re-sent delivered "
                    "once"),
    "service-kill": (scenario_service_kill, "results not yet delivered when the service is "
                     "killed are delivered once after the restart"),
}  # fmt: skip


# ------------------------------------------------------------------------ report


def markdown(outcomes: list[Outcome], meta: dict[str, Any]) -> str:
    """The summary table, then per scenario its guarantee, checks and figures."""
    m = meta["machine"]
    dirty = " (with uncommitted changes)" if meta["uncommitted_changes"] else ""
    lines = [
        f"# Chaos benchmark: {meta['date']}",
        "",
        f"Commit `{meta['commit'][:12]}`{dirty}, {meta['mode']} mode, `{' '.join(meta['argv'])}`. "
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_bytes'] / GiB:.0f} GiB memory, "
        f"load average {meta['loadavg_at_start'][0]:.2f} before and "
        f"{meta['loadavg_at_end'][0]:.2f} after ({meta['elapsed_s']:.0f} s). The service's "
        f"process tree capped at {meta['memory_cap'] / GiB:.0f} GiB ({meta['cap_kind']}).",
        "",
        "| scenario | result | studies | acknowledged | results at PACS | duplicates at PACS "
        "| failed jobs | recover s | peak MiB: serve / largest child / tree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for o in outcomes:
        f = o.figures
        verdict = {True: "**pass**", False: "**FAIL**", None: "not finished"}[o.passed]
        peaks = f.get("peak_memory", {})
        serve = peaks.get("serve (main)", {}).get("peak_mib")
        worker = max((v["peak_mib"] for k, v in peaks.items() if "worker" in k), default=None)
        tree = f.get("peak_memory_cgroup_mib")
        cells = [o.scenario, verdict, f.get("studies_sent"), f.get("instances_acknowledged"),
                 f.get("results_at_pacs"), f.get("duplicates_at_pacs"),
                 len(f.get("failures") or []), f.get("recover_s"),
                 f"{fmt(serve)} / {fmt(worker)} / {fmt(tree)}"]  # fmt: skip
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    for o in outcomes:
        lines += ["", f"## {o.scenario}", "", f"Guarantee: {o.guarantee}.", ""]
        if o.note:
            lines += [f"Note: {o.note.splitlines()[0][:600]}", ""]
        lines += [f"- {'yes' if ok else '**no**'}: {name}" for name, ok in o.checks.items()]
        details = {k: v for k, v in o.figures.items() if k not in NOT_DETAILED}
        lines += [""] + [f"- {k.replace('_', ' ')}: {fmt(v)}" for k, v in details.items()]
        lines += step_table(o.figures.get("steps"))
        reasons = [f"{x['pipeline']}/{x['stage']}: {x['error'][:240]}" for x in
                   o.figures.get("failures") or []]  # fmt: skip
        if reasons:
            lines += ["", "Failed jobs:", ""] + [f"- {r}" for r in reasons]
        peaks = o.figures.get("peak_memory", {})
        if peaks:
            text = ", ".join(f"{k} {v['peak_mib']:.0f} ({v['processes']} processes)"
                             for k, v in peaks.items())  # fmt: skip
            lines += ["", f"Peak memory (VmHWM, MiB) per process role: {text}."]
    return "\n".join(lines) + "\n"


NOT_DETAILED = ("peak_memory", "failures", "error_traceback", "steps")


def step_table(steps: dict[str, dict[str, Any]] | None) -> list[str]:
    """The hostile peers' steps: what was done, then how the legitimate sender fared."""
    if not steps:
        return []
    lines = ["", "| step | legitimate storescu | its seconds | serve main RSS MiB (before, after; "
             "held) | threads | more |", "|---|---|---|---|---|---|"]  # fmt: skip
    shown = ("legit_acknowledged", "legit_s", "legit_ok", "main_rss_mib", "main_rss_mib_held",
             "threads", "tree_rss_mib", "storescu")  # fmt: skip
    for name, step in steps.items():
        rss = ", ".join(map(str, step["main_rss_mib"]))
        if "main_rss_mib_held" in step:
            rss += f"; {step['main_rss_mib_held']}"
        more = "; ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in step.items()
                         if k not in shown)  # fmt: skip
        lines.append(f"| {name} | {step['legit_acknowledged']} | {step['legit_s']} | {rss} "
                     f"| {step['threads']} | {more} |")  # fmt: skip
    return lines


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        counts: dict[str, int] = {}
        for v in value:
            counts[v] = counts.get(v, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in counts.items())
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, default=str)}`"
    return str(value)


# ------------------------------------------------------------------------ main


def parse_size(text: str) -> int:
    units = {"gib": GiB, "mib": MiB, "g": GiB, "m": MiB}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small studies, fewer repeats")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this scenario (repeatable)")  # fmt: skip
    parser.add_argument("--memory-cap", type=parse_size, default=6 * GiB,
                        help="memory of the service's process tree (default 6GiB)")  # fmt: skip
    parser.add_argument("--stage-timeout", default="20s",
                        help="limits.stage-timeout of the service (default 20s)")  # fmt: skip
    parser.add_argument("--json", help="write the records here (and .provenance.json)")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    enter_private_network()
    names = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    meta: dict[str, Any] = {**common.run_header(), **common.mode_and_argv(args),
                            "machine": common.machine(), "loadavg_at_start": list(os.getloadavg()),
                            "memory_cap": args.memory_cap, "scenarios": names}  # fmt: skip
    started, busy = time.perf_counter(), common.machine_busy()
    work = Path(tempfile.mkdtemp(prefix="dataflow-chaos-"))
    probe = MemoryCap(args.memory_cap, f"dataflow-chaos-{os.getpid()}-probe")
    meta["cap_kind"] = probe.kind
    probe.remove()
    outcomes: list[Outcome] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        settings = Settings.make(args, work)
        for name in names:
            print(f"\n== {name}", flush=True)
            if name not in SCENARIO_FUNCTIONS:
                outcomes.append(Outcome(name, "", note="not written yet"))
                continue
            outcome = run_scenario(name, settings)
            outcomes.append(outcome)
            print(json.dumps({"passed": outcome.passed, "checks": outcome.checks,
                              "note": outcome.note[:500], **{k: v for k, v in
                              outcome.figures.items() if k != "error_traceback"}},
                             indent=1, default=str), flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    meta.update(common.run_footer(started, busy))
    records = [o.__dict__ for o in outcomes]
    print("\n" + markdown(outcomes, meta))
    if args.json:
        common.write_results(args.json, records, meta)
    if args.markdown:
        Path(args.markdown).write_text(markdown(outcomes, meta))
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
