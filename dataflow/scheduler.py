"""Where each stage replica runs: the machine's inventory, and a pure placement of replicas on it.

Clara Deploy left placement to Kubernetes ``requests``: a job that asked for more GPUs than the
cluster had stayed queued forever. Here a whole pipeline is placed before anything starts, and
what cannot be placed is refused at once, with every reason (``docs/scheduler.md``).

- ``Inventory.detect()`` is the only code that looks at the machine: CPU affinity and cgroup
  limits, ``/proc/meminfo``, NVML; ``DATAFLOW_GPUS`` / ``DATAFLOW_CPUS`` / ``DATAFLOW_MEMORY``
  override it and ``CUDA_VISIBLE_DEVICES`` narrows its GPUs.
- ``place(requests, inventory)`` is pure and deterministic: plain data in, a ``Plan`` out.
  GPUs and memory are hard limits; CPU is a soft one (oversubscription is a warning).

All ``*_mb`` quantities are MiB (2**20 bytes), as NVML and ``/proc/meminfo`` count them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflow.errors import DataflowError
from dataflow.units import parse_bytes

__all__ = [
    "Assignment",
    "Gpu",
    "Inventory",
    "PlacementError",
    "Plan",
    "ReplicaRequest",
    "SchedulerError",
    "SchedulerValueError",
    "gpu_usage",
    "oom_kills",
    "parse_gpus",
    "place",
    "visible_gpus",
]

MIB = 1 << 20
_EXAMPLES = "write e.g. 2x16GiB, 0:16GiB,1:24GiB or none"


class SchedulerError(DataflowError):
    """Something about the machine or the placement of replicas on it."""


class SchedulerValueError(SchedulerError, ValueError):
    """A bad declaration: DATAFLOW_GPUS/CPUS/MEMORY, CUDA_VISIBLE_DEVICES or a replica request."""


class PlacementError(SchedulerError):
    """The replicas do not fit the machine; ``problems`` lists every reason, one line each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    def __reduce__(self):  # keep ``problems`` across processes
        return type(self), (str(self), self.problems)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class Gpu:
    """One GPU: its NVML (PCI-order) index, model name, memory in MiB and UUID when known."""

    index: int
    name: str
    memory_mb: int
    uuid: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.index) or self.index < 0:
            raise SchedulerValueError(f"a GPU index is an int >= 0; got {self.index!r}")
        if not _is_int(self.memory_mb) or self.memory_mb < 1:
            raise SchedulerValueError(
                f"GPU {self.index} needs memory_mb >= 1; got {self.memory_mb!r}"
            )


@dataclass(frozen=True)
class Inventory:
    """What replicas may use: CPUs, memory (MiB), GPUs; ``gpu_source`` says where GPUs came from."""

    cpus: int
    memory_mb: int
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(sorted(self.gpus, key=lambda g: g.index)))
        if not _is_int(self.cpus) or self.cpus < 1:
            raise SchedulerValueError(f"an inventory needs cpus >= 1; got {self.cpus!r}")
        if not _is_int(self.memory_mb) or self.memory_mb < 1:
            raise SchedulerValueError(f"an inventory needs memory_mb >= 1; got {self.memory_mb!r}")
        indices = [g.index for g in self.gpus]
        if len(set(indices)) != len(indices):
            raise SchedulerValueError(f"GPU indices must be unique; got {indices}")

    def gpu(self, index: int) -> Gpu:
        return next(g for g in self.gpus if g.index == index)

    def describe_gpus(self) -> str:
        """``'1 GPU (0: 16384 MiB)'``, ``'no GPU'``."""
        if not self.gpus:
            return "no GPU"
        sizes = ", ".join(f"{g.index}: {g.memory_mb} MiB" for g in self.gpus)
        return f"{_plural(len(self.gpus), 'GPU')} ({sizes})"

    def describe(self) -> str:
        """One line for messages: CPUs, memory, GPUs and where the GPUs came from."""
        text = f"{_plural(self.cpus, 'CPU')}, {self.memory_mb} MiB memory, {self.describe_gpus()}"
        return f"{text}; GPUs: {self.gpu_source}" if self.gpu_source else text

    @classmethod
    def detect(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        gpus: str | Sequence[Gpu] | None = None,
        cpus: int | None = None,
        memory_mb: int | None = None,
        root: str | os.PathLike[str] = "/",
    ) -> Inventory:
        """This machine, as far as we may use it. Arguments beat ``DATAFLOW_*`` variables, which
        beat what the machine reports. GPUs, declared or from NVML, are then narrowed to those
        ``CUDA_VISIBLE_DEVICES`` lists when it is set. ``root`` relocates /proc and /sys (tests).
        """
        base = Path(root)
        if cpus is None:
            text = environ.get("DATAFLOW_CPUS", "").strip()
            if text:
                if not text.isdigit() or int(text) < 1:
                    raise SchedulerValueError(
                        f"DATAFLOW_CPUS={text!r} is not a number of CPUs; write e.g. 4"
                    )
                cpus = int(text)
            else:
                cpus = _machine_cpus(base)
        if memory_mb is None:
            text = environ.get("DATAFLOW_MEMORY", "").strip()
            memory_mb = (
                _size_mib("DATAFLOW_MEMORY", text, text, "write e.g. 16GiB")
                if text
                else _machine_mib(base)
            )
        if gpus is not None and not isinstance(gpus, str):
            found, source = tuple(gpus), "given"
        elif gpus is not None:
            found, source = parse_gpus(gpus, name="gpus"), f"declared as {gpus!r}"
        elif environ.get("DATAFLOW_GPUS", "").strip():
            text = environ["DATAFLOW_GPUS"]
            found, source = parse_gpus(text), f"declared by DATAFLOW_GPUS={text!r}"
        else:
            found, source = _nvml_gpus()
        if "CUDA_VISIBLE_DEVICES" in environ:
            found, note = visible_gpus(found, environ["CUDA_VISIBLE_DEVICES"])
            source = f"{source}; {note}"
        return cls(cpus=cpus, memory_mb=memory_mb, gpus=found, gpu_source=source)


_COUNT_SIZE = re.compile(r"^(\d+)\s*[x×]\s*(\S.*)$", re.IGNORECASE)
_INDEX_SIZE = re.compile(r"^(\d+)\s*:\s*(\S.*)$")


def _size_mib(name: str, value: str, size: str, examples: str = _EXAMPLES) -> int:
    try:
        nbytes = parse_bytes(size)
    except ValueError:
        raise SchedulerValueError(
            f"{name}={value!r}: {size!r} is not a size ({examples})"
        ) from None
    if nbytes < MIB:
        raise SchedulerValueError(
            f"{name}={value!r}: {size!r} is {nbytes} bytes, under 1 MiB; give a unit, e.g. 16GiB"
        )
    return nbytes // MIB


def parse_gpus(text: str, *, name: str = "DATAFLOW_GPUS") -> tuple[Gpu, ...]:
    """Declared GPUs: ``none``; ``2x16GiB`` (GPUs 0 and 1); ``16GiB,24GiB``; ``0:16GiB,3:24GiB``.

    Items are either all ``INDEX:SIZE`` or all ``[COUNTx]SIZE`` (numbered from 0 in order).
    ``name`` is the variable or argument named in errors.
    """
    spec = text.strip()
    if spec.lower() == "none":
        return ()
    found: list[Gpu] = []
    explicit: set[bool] = set()
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise SchedulerValueError(f"{name}={text!r} has an empty entry ({_EXAMPLES})")
        if match := _INDEX_SIZE.match(item):
            explicit.add(True)
            indices, size = [int(match[1])], match[2]
        else:
            explicit.add(False)
            match = _COUNT_SIZE.match(item)
            count, size = (int(match[1]), match[2]) if match else (1, item)
            if count < 1:
                raise SchedulerValueError(
                    f"{name}={text!r}: {item!r} declares no GPU ({_EXAMPLES})"
                )
            indices = list(range(len(found), len(found) + count))
        if len(explicit) > 1:
            raise SchedulerValueError(
                f"{name}={text!r} mixes INDEX:SIZE with SIZE entries; use one form ({_EXAMPLES})"
            )
        for index in indices:
            if any(g.index == index for g in found):
                raise SchedulerValueError(f"{name}={text!r} declares GPU {index} twice")
            found.append(Gpu(index, "declared", _size_mib(name, text, size)))
    return tuple(sorted(found, key=lambda g: g.index))


def visible_gpus(gpus: Sequence[Gpu], value: str) -> tuple[tuple[Gpu, ...], str]:
    """The GPUs that ``CUDA_VISIBLE_DEVICES=value`` leaves us, and a note saying so.

    Entries are indices or ``GPU-<uuid prefix>``. Like CUDA, reading stops at the first entry
    that names no GPU (so ``-1`` or ``""`` hide them all). MIG instances are refused.
    """
    kept: list[Gpu] = []
    stopped = ""
    for entry in (part.strip() for part in value.split(",")):
        if entry.upper().startswith("MIG-"):
            raise SchedulerValueError(
                f"CUDA_VISIBLE_DEVICES={value!r} names MIG instance {entry!r}: the scheduler does "
                "not place replicas on MIG slices yet; unset it and declare DATAFLOW_GPUS instead"
            )
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        elif entry.upper().startswith("GPU-"):
            match = [g for g in gpus if g.uuid and g.uuid.lower().startswith(entry.lower())]
        else:
            match = []
        if len(match) != 1 or match[0] in kept:
            stopped = entry
            break
        kept.append(match[0])
    indices = ", ".join(str(g.index) for g in kept) or "none"
    note = f"CUDA_VISIBLE_DEVICES={value!r} keeps {indices}"
    if stopped and value.strip():
        note += f" (CUDA ignores {stopped!r} and what follows: it names no GPU of ours)"
    return tuple(sorted(kept, key=lambda g: g.index)), note


def _nvml_gpus() -> tuple[tuple[Gpu, ...], str]:
    try:
        import pynvml
    except ImportError:
        return (), (
            "none found (nvidia-ml-py is not installed: pip install 'dataflow[gpu]', "
            "or declare them with DATAFLOW_GPUS)"
        )

    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), f"none found (NVML: {exc})"
    found: list[Gpu] = []
    skipped: list[str] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                found.append(
                    Gpu(
                        index=index,
                        name=text(pynvml.nvmlDeviceGetName(handle)),
                        memory_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // MIB,
                        uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
                    )
                )
            except pynvml.NVMLError as exc:
                skipped.append(f"GPU {index} skipped: {exc}")
    except pynvml.NVMLError as exc:
        skipped.append(f"NVML: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return tuple(found), "; ".join(["NVML", *skipped])


_NO_NVML = False


def gpu_usage() -> list[dict[str, Any]]:
    """Each GPU's use now, from NVML (``dataflow[gpu]``): ``index``, ``name``, ``uuid``,
    ``memory_used``, ``memory_total`` (bytes), ``utilization`` (0-1, the compute engine's
    busy share over NVML's last sample period), ``processes`` (pids using it); an empty list
    without NVML or a GPU. For the service's metrics and Clara's ``Utilization``."""
    global _NO_NVML
    if _NO_NVML:
        return []
    try:
        import pynvml
    except ImportError:
        _NO_NVML = True  # not installed: not looked for again every few seconds
        return []

    def text(value: str | bytes) -> str:
        return value.decode() if isinstance(value, bytes) else value

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    out: list[dict[str, Any]] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                out.append({
                    "index": index, "name": text(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": text(pynvml.nvmlDeviceGetUUID(handle)),
                    "memory_used": int(memory.used), "memory_total": int(memory.total),
                    "utilization": float(rates.gpu) / 100.0,
                    "processes": sorted(int(p.pid) for p in procs),
                })  # fmt: skip
            except pynvml.NVMLError:
                continue  # a GPU that does not answer is left out, the others reported
    except pynvml.NVMLError:
        pass
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, controller: str) -> list[tuple[bool, Path]]:
    """(is_v2, directory) for every cgroup bounding this process, leaf to mount, v2 and v1."""
    dirs: list[tuple[bool, Path]] = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        v2 = parts[0] == "0" and not parts[1]
        if not v2 and controller not in parts[1].split(","):
            continue
        mount = root / "sys/fs/cgroup" / ("" if v2 else controller)
        here = mount / parts[2].lstrip("/")
        dirs += [(v2, d) for d in (here, *here.parents) if d.is_relative_to(mount)]
    return dirs


def oom_kills(root: Path = Path("/")) -> int:
    """How many processes the kernel's out-of-memory killer has killed in the memory cgroups
    bounding this process (``oom_kill`` of ``memory.events``, v2, or ``memory.oom_control``,
    v1; summed over the levels, so it only says whether it rose). 0 when none is readable."""
    total = 0
    for v2, directory in _cgroup_dirs(root, "memory"):
        text = _read(directory / ("memory.events" if v2 else "memory.oom_control")) or ""
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        total += int(match[1]) if match else 0
    return total


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.lstrip("-").isdigit() else None


def _machine_cpus(root: Path) -> int:
    cores: float = len(os.sched_getaffinity(0))
    for v2, directory in _cgroup_dirs(root, "cpu"):
        if v2:
            quota, _, period = (_read(directory / "cpu.max") or "").partition(" ")
        else:
            quota = _read(directory / "cpu.cfs_quota_us") or ""
            period = _read(directory / "cpu.cfs_period_us") or ""
        q, p = _int_or_none(quota), _int_or_none(period)
        if q and p and q > 0 and p > 0:
            cores = min(cores, q / p)
    return max(1, math.ceil(cores))


def _machine_mib(root: Path) -> int:
    meminfo = _read(root / "proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if not match:
        raise SchedulerError(
            f"cannot read MemTotal from {root / 'proc/meminfo'}; set DATAFLOW_MEMORY"
        )
    nbytes = int(match[1]) * 1024
    for v2, directory in _cgroup_dirs(root, "memory"):
        limit = _int_or_none(_read(directory / ("memory.max" if v2 else "memory.limit_in_bytes")))
        if limit and limit > 0:
            nbytes = min(nbytes, limit)
    return max(1, nbytes // MIB)


@dataclass(frozen=True)
class ReplicaRequest:
    """What one replica of a stage asks for (Clara's ``requests``, plus a GPU-memory share).

    ``gpu``: whole GPUs under exclusive control. ``gpu_memory_mb``: MiB of one GPU, which it may
    share with others whose shares fit beside it. ``cpu``: cores (soft). ``memory_mb``: host MiB.
    """

    stage: str
    replica: int
    cpu: float = 1
    gpu: int = 0
    gpu_memory_mb: int | None = None
    memory_mb: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage:
            raise SchedulerValueError(f"a replica request needs a stage name; got {self.stage!r}")
        cpu, gpu, gpu_mb, mem = self.cpu, self.gpu, self.gpu_memory_mb, self.memory_mb
        cpu_ok = isinstance(cpu, int | float) and not isinstance(cpu, bool) and 0 <= cpu < math.inf
        for ok, what, value in [
            (_is_int(self.replica) and self.replica >= 0, "replica is an int >= 0", self.replica),
            (cpu_ok, "cpu is a number of cores >= 0", cpu),
            (_is_int(gpu) and gpu >= 0, "gpu is a number of whole GPUs >= 0", gpu),
            (
                gpu_mb is None or (_is_int(gpu_mb) and gpu_mb >= 1),
                "gpu_memory_mb is MiB >= 1",
                gpu_mb,
            ),
            (_is_int(mem) and mem >= 0, "memory_mb is MiB >= 0", mem),
        ]:
            if not ok:
                raise SchedulerValueError(f"{self.label}: {what}; got {value!r}")
        if gpu and gpu_mb is not None:
            raise SchedulerValueError(
                f"{self.label} asks for gpu: {gpu} (whole GPUs, exclusive) and gpu_memory_mb: "
                f"{gpu_mb} (a share of one GPU); ask for one or the other"
            )

    @property
    def label(self) -> str:
        return f"stage {self.stage!r} replica {self.replica}"


@dataclass(frozen=True)
class Assignment:
    """Where one replica runs. ``gpu_memory_mb`` is its share of a shared GPU (None: exclusive)."""

    stage: str
    replica: int
    gpus: tuple[int, ...]
    cpu: float
    memory_mb: int
    gpu_memory_mb: int | None = None

    @property
    def env(self) -> dict[str, str]:
        """Variables for the replica's process: only its GPUs are visible ("" hides them all)."""
        if not self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ""}
        visible = ",".join(str(index) for index in self.gpus)
        return {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def describe_gpus(self) -> str:
        if not self.gpus:
            return "-"
        indices = ",".join(str(index) for index in self.gpus)
        if self.gpu_memory_mb is None:
            return f"{indices} (exclusive)"
        return f"{indices} ({self.gpu_memory_mb} MiB shared)"


@dataclass(frozen=True)
class Plan:
    """One ``Assignment`` per replica, in the order requested, and warnings (CPU)."""

    assignments: tuple[Assignment, ...]
    warnings: tuple[str, ...]
    inventory: Inventory

    def assignment(self, stage: str, replica: int) -> Assignment:
        for item in self.assignments:
            if item.stage == stage and item.replica == replica:
                return item
        raise KeyError(f"no replica {replica} of stage {stage!r} in this plan")

    def format(self) -> str:
        """A table for ``dataflow plan``: stage, replica, gpus, cpu, memory; then totals."""
        rows = [("stage", "replica", "gpus", "cpu", "memory")]
        rows += [
            (a.stage, str(a.replica), a.describe_gpus(), f"{a.cpu:g}", f"{a.memory_mb} MiB")
            for a in self.assignments
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows]
        cpu = sum(a.cpu for a in self.assignments)
        memory = sum(a.memory_mb for a in self.assignments)
        inv = self.inventory
        lines.append(f"requested: {_num(cpu)} of {_plural(inv.cpus, 'CPU')}, {memory} of")
        lines[-1] += f" {inv.memory_mb} MiB memory"
        lines.append(f"machine: {inv.describe()}")
        named = [f"{g.index}: {g.name}" for g in inv.gpus if g.name != "declared"]
        if named:
            lines.append(f"GPU models: {', '.join(named)}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def place(
    requests: Sequence[ReplicaRequest],
    inventory: Inventory,
    *,
    allow_cpu_oversubscription: bool = True,
) -> Plan:
    """Place every replica on ``inventory`` or raise ``PlacementError`` listing all that can't be.

    Pure and deterministic: the same requests (in any order) on the same inventory get the same
    GPUs. Exclusive GPUs first (largest requests first, lowest free indices), then GPU-memory
    shares (largest first; spread over GPUs, or packed best-fit when spreading leaves one out),
    then memory (a hard limit) and CPU (a warning; a refusal if not ``allow_cpu_oversubscription``).
    """
    reqs = tuple(requests)
    seen: set[tuple[str, int]] = set()
    for r in reqs:
        if (r.stage, r.replica) in seen:
            raise SchedulerValueError(f"{r.label} is requested twice")
        seen.add((r.stage, r.replica))
    problems: dict[int, list[str]] = defaultdict(list)
    gpus_of, owner = _place_exclusive(reqs, inventory, problems)
    gpus_of |= _place_shared(reqs, inventory, owner, problems)
    for i, r in enumerate(reqs):
        if r.memory_mb > inventory.memory_mb:
            has = f"the machine has {inventory.memory_mb} MiB"
            problems[i].append(f"{r.label} needs {r.memory_mb} MiB of memory; {has}")
    totals: list[str] = []
    fitting = [r for r in reqs if r.memory_mb <= inventory.memory_mb]
    memory = sum(r.memory_mb for r in fitting)
    if memory > inventory.memory_mb:
        totals.append(
            f"together {_plural(len(fitting), 'replica')} need {memory} MiB of memory; the machine "
            f"has {inventory.memory_mb} MiB ({_by_stage(fitting, 'memory_mb', ' MiB')})"
        )
    cpu_notes = [
        f"{r.label} asks for {_num(r.cpu)} CPUs; the machine has {inventory.cpus}"
        for r in reqs
        if r.cpu > inventory.cpus
    ]
    cpu = sum(r.cpu for r in reqs)
    if cpu > inventory.cpus:
        cpu_notes.append(
            f"CPU requests add up to {_num(cpu)} cores on a machine with {inventory.cpus} "
            f"({_by_stage(reqs, 'cpu', '')}): replicas will share cores (slower, not wrong)"
        )
    if not allow_cpu_oversubscription:
        totals += cpu_notes
    if problems or totals:
        lines = [p for i in sorted(problems) for p in problems[i]] + totals
        head = f"cannot place {_plural(len(reqs), 'replica')} on this machine"
        head += f" ({inventory.describe()}):"
        raise PlacementError("\n  - ".join([head, *lines]), lines)
    assignments = tuple(
        Assignment(r.stage, r.replica, gpus_of.get(i, ()), r.cpu, r.memory_mb, r.gpu_memory_mb)
        for i, r in enumerate(reqs)
    )
    return Plan(assignments, tuple(cpu_notes), inventory)


def _order(reqs: Sequence[ReplicaRequest], which: Sequence[int]) -> list[int]:
    """Largest request first; ties by stage name and replica, so input order does not matter."""

    def key(i: int) -> tuple[int, str, int]:
        r = reqs[i]
        return -(r.gpu or r.gpu_memory_mb or 0), r.stage, r.replica

    return sorted(which, key=key)


def _place_exclusive(
    reqs: Sequence[ReplicaRequest], inventory: Inventory, problems: dict[int, list[str]]
) -> tuple[dict[int, tuple[int, ...]], dict[int, str]]:
    """Whole GPUs, lowest free indices first: request -> GPUs, and GPU -> label of its holder."""
    gpus_of: dict[int, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    free = [g.index for g in inventory.gpus]
    for i in _order(reqs, [i for i, r in enumerate(reqs) if r.gpu]):
        r = reqs[i]
        wants = f"{r.label} needs {_plural(r.gpu, 'exclusive GPU')}"
        wants += f"; the machine has {inventory.describe_gpus()}"
        if r.gpu > len(inventory.gpus):
            problems[i].append(wants)
        elif r.gpu > len(free):
            held = _holders(owner, several=len(inventory.gpus) > 1)
            are = "is" if len(free) == 1 else "are"
            gone = f"; only {len(free)} {are} free, the others went to"
            problems[i].append(f"{wants}{gone if free else ', already given to'} {held}")
        else:
            gpus_of[i], free = tuple(free[: r.gpu]), free[r.gpu :]
            owner.update(dict.fromkeys(gpus_of[i], r.label))
    return gpus_of, owner


def _place_shared(
    reqs: Sequence[ReplicaRequest],
    inventory: Inventory,
    owner: Mapping[int, str],
    problems: dict[int, list[str]],
) -> dict[int, tuple[int, ...]]:
    """GPU-memory shares on the GPUs nobody holds exclusively: request -> (GPU,)."""
    order = _order(reqs, [i for i, r in enumerate(reqs) if r.gpu_memory_mb])
    free = [g.index for g in inventory.gpus if g.index not in owner]
    placed, left = _share(reqs, order, inventory, free, spread=True)
    if len(placed) < len(order):
        placed, left = _share(reqs, order, inventory, free, spread=False)
    largest = max((g.memory_mb for g in inventory.gpus), default=0)
    for i in order:
        r = reqs[i]
        if i in placed:
            continue
        wants = f"{r.label} needs {r.gpu_memory_mb} MiB on one GPU"
        wants += f"; the machine has {inventory.describe_gpus()}"
        if (r.gpu_memory_mb or 0) <= largest:  # it would fit alone: say who holds what
            state = [f"GPU {g} is given to {owner[g]}" for g in sorted(owner)]
            for g in free:
                users = [f"{reqs[j].label} ({reqs[j].gpu_memory_mb} MiB)" for j in order]
                users = [u for j, u in zip(order, users) if placed.get(j) == g]
                beside = f" beside {', '.join(users)}" if users else ""
                state.append(f"GPU {g} has {left[g]} MiB left{beside}")
            wants += ", and " + "; ".join(state)
        problems[i].append(wants)
    return {i: (g,) for i, g in placed.items()}


def _share(
    reqs: Sequence[ReplicaRequest],
    order: Sequence[int],
    inventory: Inventory,
    free: Sequence[int],
    *,
    spread: bool,
) -> tuple[dict[int, int], dict[int, int]]:
    """Request -> GPU, and MiB left per GPU. ``spread`` prefers the GPU with the fewest replicas
    of the same stage, then the fewest replicas; both then take the best fit (least room left).
    """
    left = {g: inventory.gpu(g).memory_mb for g in free}
    placed: dict[int, int] = {}
    for i in order:
        need, stage = reqs[i].gpu_memory_mb or 0, reqs[i].stage
        ranks = []
        for g in (g for g in free if left[g] >= need):
            on_g = [j for j, h in placed.items() if h == g]
            same = sum(1 for j in on_g if reqs[j].stage == stage)
            ranks.append(((same, len(on_g)) if spread else ()) + (left[g] - need, g))
        if ranks:
            placed[i] = min(ranks)[-1]
            left[placed[i]] -= need
    return placed, left


def _holders(owner: Mapping[int, str], *, several: bool) -> str:
    """``"stage 'a' replica 0 (GPU 0) and stage 'b' replica 0 (GPUs 1, 2)"``."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for index in sorted(owner):
        grouped[owner[index]].append(index)
    parts = []
    for label, indices in grouped.items():
        where = f" (GPU{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))})"
        parts.append(label + (where if several else ""))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _by_stage(reqs: Sequence[ReplicaRequest], attr: str, unit: str) -> str:
    """``"stage 'a': 2 x 4096 MiB, stage 'b': 1 x 512 MiB"`` (counted per stage and size)."""
    counts: dict[tuple[str, float], int] = defaultdict(int)
    for r in reqs:
        counts[r.stage, getattr(r, attr)] += 1
    return ", ".join(f"stage {s!r}: {n} x {_num(v)}{unit}" for (s, v), n in counts.items())


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"
