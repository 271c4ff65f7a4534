"""Latency histograms kept by the coordinator (a stage's time per job, a pipeline's per job),
read by the service's metrics as Prometheus histograms: cumulative counts per upper bound."""

from __future__ import annotations

import bisect
from typing import Any

__all__ = ["BUCKETS", "Latency"]

#: upper bounds, seconds: from a light stage on a small study to a slow model on a large one
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Latency:
    """Counts per bucket, their sum and count (one thread writes; a snapshot is a copy, made
    again only after an observation: the executor takes one per stage at every step)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self._snapshot: tuple[int, dict[str, Any]] | None = None  # (count when made, it)

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum", "count"}``
        (shared by the snapshots until the next observation: read it, do not change it)."""
        count, cached = self.count, self._snapshot
        if cached is not None and cached[0] == count:
            return cached[1]
        total, buckets = 0, []
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self._counts, strict=True):
            total += n
            buckets.append([bound, total])
        snapshot = {"buckets": buckets, "sum": self.sum, "count": total}
        self._snapshot = (count, snapshot)
        return snapshot
