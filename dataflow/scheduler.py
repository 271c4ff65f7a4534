"""Where each stage replica runs: a pure placement of replicas on the machine's inventory
(:mod:`dataflow.machine` looks at the machine).

Clara Deploy left placement to Kubernetes ``requests``: a job that asked for more GPUs than the
cluster had stayed queued forever. Here a whole pipeline is placed before anything starts, and
what cannot be placed is refused at once, with every reason (``docs/scheduler.md``).

``place(requests, inventory)`` is pure and deterministic: plain data in, a ``Plan`` out. GPUs
and memory are hard limits; CPU is a soft one (oversubscription is a warning).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dataflow.machine import Gpu, Inventory, SchedulerError, SchedulerValueError
from dataflow.units import is_int, plural

__all__ = [
    "Assignment",
    "Gpu",
    "Inventory",
    "PlacementError",
    "Plan",
    "ReplicaRequest",
    "SchedulerError",
    "SchedulerValueError",
    "place",
]


class PlacementError(SchedulerError):
    """The replicas do not fit the machine; ``problems`` lists every reason, one line each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    def __reduce__(self):  # keep ``problems`` across processes
        return type(self), (str(self), self.problems)


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
            (is_int(self.replica) and self.replica >= 0, "replica is an int >= 0", self.replica),
            (cpu_ok, "cpu is a number of cores >= 0", cpu),
            (is_int(gpu) and gpu >= 0, "gpu is a number of whole GPUs >= 0", gpu),
            (
                gpu_mb is None or (is_int(gpu_mb) and gpu_mb >= 1),
                "gpu_memory_mb is MiB >= 1",
                gpu_mb,
            ),
            (is_int(mem) and mem >= 0, "memory_mb is MiB >= 0", mem),
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
        lines.append(f"requested: {_num(cpu)} of {plural(inv.cpus, 'CPU')}, {memory} of")
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
            f"together {plural(len(fitting), 'replica')} need {memory} MiB of memory; the machine "
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
        head = f"cannot place {plural(len(reqs), 'replica')} on this machine"
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
        wants = f"{r.label} needs {plural(r.gpu, 'exclusive GPU')}"
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
