"""Stages for the Ray executor's tests (imported in Ray's actors by module name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine_stages import VEC

from dataflow.stage import Port, Stage


class ExitOnce(Stage):
    """Passes its vector on; its first job ever (``marker`` does not exist yet) ends the
    process at once, as a crash would."""

    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def execute(self, ctx, vec):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return vec + 1


class AlwaysExit(Stage):
    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def execute(self, ctx, vec):
        os._exit(1)


class Attempts(Stage):
    """Counts its runs in ``log`` (one line each); the first run waits for ``until`` (a file
    no one makes: the test kills the actor meanwhile) for ``seconds`` at most."""

    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, log: str, until: str, seconds: float):
        self.log, self.until, self.seconds = Path(log), Path(until), seconds

    def execute(self, ctx, vec):
        first = not self.log.exists()
        with self.log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        end = time.monotonic() + self.seconds
        while first and not self.until.exists() and time.monotonic() < end:
            time.sleep(0.01)
        return vec * 10


class Where(Stage):
    """The Ray node this replica runs on, and the sum of its input."""

    inputs = {"vec": VEC}
    outputs = {"node": Port("string"), "vec": VEC}

    def execute(self, ctx, vec):
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "vec": vec * 3}
