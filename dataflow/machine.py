"""The machine stage replicas run on, as dataflow sees it: CPUs, memory and GPUs (the
inventory), what the GPUs are doing now, and the kernel's OOM kills. The only code that
looks at the machine (CPU affinity and cgroup limits, ``/proc/meminfo``, NVML, whether a
docker or podman daemon answers);
``DATAFLOW_GPUS`` / ``DATAFLOW_CPUS`` / ``DATAFLOW_MEMORY`` override it and
``CUDA_VISIBLE_DEVICES`` narrows its GPUs. Placing replicas on it is pure and lives in
:mod:`dataflow.scheduler`.

All ``*_mb`` quantities are MiB (2**20 bytes), as NVML and ``/proc/meminfo`` count them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflow.errors import DataflowError
from dataflow.units import is_int, parse_bytes, plural

__all__ = [
    "ENGINE_ENV",
    "Gpu",
    "Inventory",
    "Machine",
    "SchedulerError",
    "SchedulerValueError",
    "container_engine",
    "gpu_usage",
    "oom_kills",
    "parse_gpus",
    "visible_gpus",
]

MIB = 1 << 20
ENGINE_ENV = "DATAFLOW_CONTAINER_ENGINE"  # docker, podman or none: skip the detection
_EXAMPLES = "write e.g. 2x16GiB, 0:16GiB,1:24GiB or none"


class SchedulerError(DataflowError):
    """Something about the machine or the placement of replicas on it."""


class SchedulerValueError(SchedulerError, ValueError):
    """A bad declaration: DATAFLOW_GPUS/CPUS/MEMORY, CUDA_VISIBLE_DEVICES or a replica request."""


@dataclass(frozen=True)
class Gpu:
    """One GPU: its NVML (PCI-order) index, model name, memory in MiB and UUID when known."""

    index: int
    name: str
    memory_mb: int
    uuid: str | None = None

    def __post_init__(self) -> None:
        if not is_int(self.index) or self.index < 0:
            raise SchedulerValueError(f"a GPU index is an int >= 0; got {self.index!r}")
        if not is_int(self.memory_mb) or self.memory_mb < 1:
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
        if not is_int(self.cpus) or self.cpus < 1:
            raise SchedulerValueError(f"an inventory needs cpus >= 1; got {self.cpus!r}")
        if not is_int(self.memory_mb) or self.memory_mb < 1:
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
        return f"{plural(len(self.gpus), 'GPU')} ({sizes})"

    def describe(self) -> str:
        """One line for messages: CPUs, memory, GPUs and where the GPUs came from."""
        text = f"{plural(self.cpus, 'CPU')}, {self.memory_mb} MiB memory, {self.describe_gpus()}"
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


def container_engine() -> str | None:
    """``docker`` or ``podman`` if one is on the PATH *and its daemon answers* (a client alone,
    as on many CI machines, runs nothing), else None. ``$DATAFLOW_CONTAINER_ENGINE`` decides."""
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced:
        return None if forced == "none" else forced
    return _probe_engines(os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=8)
def _probe_engines(path: str) -> str | None:
    for engine in ("docker", "podman"):
        found = shutil.which(engine, path=path)
        if not found:
            continue
        try:
            probe = subprocess.run([found, "info"], capture_output=True, timeout=15,
                                   stdin=subprocess.DEVNULL)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return engine
    return None


@dataclasses.dataclass(frozen=True)
class Machine:
    """What validating a pipeline needs to know of the machine it will run on, given to the
    validator (which never looks itself): its GPUs (how many, and how that was found) and the
    container engine (None: none, ``no_engine`` says why)."""

    gpus: int = 0
    gpu_source: str = ""
    engine: str | None = None
    no_engine: str = "no docker or podman daemon answers"

    @classmethod
    def detect(cls, environ: Mapping[str, str] = os.environ) -> Machine:
        """This machine: :meth:`Inventory.detect`'s GPUs (none assumed, saying why, when its
        declaration is wrong) and :func:`container_engine`."""
        try:
            inventory = Inventory.detect(environ)
            gpus, how = len(inventory.gpus), inventory.gpu_source
        except SchedulerValueError as exc:
            gpus, how = 0, f"none assumed: {exc}"
        forced = environ.get(ENGINE_ENV, "").strip().lower()
        no_engine = f"{ENGINE_ENV}=none" if forced == "none" else cls.no_engine
        engine = (None if forced == "none" else forced) if forced else container_engine()
        return cls(gpus, how, engine, no_engine)
