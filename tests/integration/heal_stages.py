"""Stages for the self-healing and limits tests (imported by worker processes by module name)."""

from __future__ import annotations

import numpy as np
from engine_stages import VEC

from dataflow.stage import Stage, Tensor


class Sink(Stage):
    """Takes no constructor arguments: given one, its worker cannot start."""

    inputs = {"vec": VEC}
    outputs: dict = {}

    def execute(self, ctx, vec):
        return {}


class Hog(Stage):
    """Asks for ``mib`` MiB at once on a vector of length ``hog_on`` (never touched: without a
    limit the allocation succeeds and costs nothing); reports its ``ctx.memory_limit``."""

    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, hog_on: int = -1, mib: int = 1024):
        self.hog_on, self.mib = hog_on, mib

    def execute(self, ctx, vec):
        if len(vec) == self.hog_on:
            big = np.empty(self.mib << 20, dtype=np.uint8)
            del big
        return Tensor(vec * 1, {"memory_limit": ctx.memory_limit})
