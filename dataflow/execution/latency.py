"""Latency histograms kept by the coordinator (a stage's time per job, a pipeline's per job),
read by the service's metrics as Prometheus histograms: cumulative counts per upper bound."""

from __future__ import annotations

import bisect
from typing import Any

__all__ = ["BUCKETS", "Latency"]

#: upper bounds, seconds: from a light stage on a small study to a slow model on a large one
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Latency:
    """Counts per bucket, their sum and count (one thread writes; a snapshot is a copy)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum", "count"}``."""
        total, buckets = 0, []
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self._counts, strict=True):
            total += n
            buckets.append([bound, total])
        return {"buckets": buckets, "sum": self.sum, "count": total}
