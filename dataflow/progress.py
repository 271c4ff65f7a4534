"""Start-up progress: which stages are starting and how many workers are ready.

Starting a pipeline means starting its workers (a process each: imports, Numba kernels loaded
or compiled, a model read). :class:`StartupProgress` follows that from the executor's facts — a
worker started, came up, or could not start — and turns them into events, in this order:

- ``stage_starting`` (``stage``, ``workers``): the first worker of a stage is being started;
- ``stage_ready`` (``stage``, ``ready``, ``total``): every worker of that stage is up;
  ``ready``/``total`` count the pipeline's workers up so far;
- ``stage_failed`` (``stage``, ``ready``, ``total``): a worker of that stage could not start;
- ``pipeline_ready`` (``ready``, ``total``, ``failed``): every worker has started or failed.

Only the first start is followed: a worker restarted later is the executor's business
(``worker_died``, ``stage_recovered``). Pure: no clock, no I/O; :func:`log_event` writes an event
as a structured log line, :meth:`StartupProgress.line` is the one-line status a terminal shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["ProgressEvent", "StartupProgress", "log_event"]


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    name: str  # stage_starting | stage_ready | stage_failed | pipeline_ready
    stage: str | None
    ready: int  # workers up
    total: int  # workers in the pipeline
    failed: tuple[str, ...] = ()  # stages that could not start

    def fields(self) -> dict[str, Any]:
        """The event's fields for a structured log line."""
        out: dict[str, Any] = {"ready": self.ready, "total": self.total}
        if self.stage is not None:
            out = {"stage": self.stage, **out}
        if self.failed:
            out["failed"] = list(self.failed)
        return out


class StartupProgress:
    """Follows the first start of each stage's workers (``stages``: name -> replicas)."""

    def __init__(self, stages: Mapping[str, int]) -> None:
        self.replicas = dict(stages)
        self.total = sum(self.replicas.values())
        self.started: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.up: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.failed: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.done = False

    @property
    def ready(self) -> int:
        return sum(self.up.values())

    def _settled(self, stage: str) -> bool:
        return self.up[stage] + self.failed[stage] >= self.replicas[stage]

    def worker_starting(self, stage: str) -> list[ProgressEvent]:
        if self.done or stage not in self.replicas:
            return []
        if self.started[stage] >= self.replicas[stage]:
            return []  # a restart during start-up: its stage already said it is starting
        self.started[stage] += 1
        if self.started[stage] > 1:
            return []
        return [ProgressEvent("stage_starting", stage, self.ready, self.total)]

    def worker_ready(self, stage: str) -> list[ProgressEvent]:
        if self.done or stage not in self.replicas or self._settled(stage):
            return []
        self.up[stage] += 1
        events = []
        if self.up[stage] == self.replicas[stage]:
            events.append(ProgressEvent("stage_ready", stage, self.ready, self.total))
        return events + self._finished()

    def worker_failed(self, stage: str) -> list[ProgressEvent]:
        """A worker of ``stage`` could not start (it reported why, or died starting)."""
        if self.done or stage not in self.replicas or self._settled(stage):
            return []
        self.failed[stage] += 1
        events = [ProgressEvent("stage_failed", stage, self.ready, self.total)]
        return events + self._finished()

    def _finished(self) -> list[ProgressEvent]:
        if not all(self._settled(s) for s in self.replicas):
            return []
        self.done = True
        failed = tuple(s for s, n in self.failed.items() if n)
        return [ProgressEvent("pipeline_ready", None, self.ready, self.total, failed)]

    def starting(self) -> list[str]:
        """Stages with a worker started and not yet up, in pipeline order."""
        return [s for s in self.replicas if self.started[s] and not self._settled(s)]

    def line(self) -> str:
        """``starting workers: 5/12 ready; starting smooth, tissue (+3)``."""
        if self.done:
            failed = [s for s, n in self.failed.items() if n]
            tail = f"; could not start: {', '.join(failed)}" if failed else ""
            return f"workers ready: {self.ready}/{self.total}{tail}"
        waiting = self.starting()
        shown = ", ".join(waiting[:4]) + (f" (+{len(waiting) - 4})" if len(waiting) > 4 else "")
        return f"starting workers: {self.ready}/{self.total} ready" + (
            f"; starting {shown}" if shown else ""
        )


def log_event(event: ProgressEvent, logger: Any = None, **context: Any) -> None:
    """Write ``event`` as a structured log line (info; ``stage_failed`` at warning: the
    executor logs the reason as ``worker_failed_to_start``)."""
    if logger is None:
        import structlog

        logger = structlog.get_logger("dataflow.progress")
    method = logger.warning if event.name == "stage_failed" else logger.info
    method(event.name, **context, **event.fields())
