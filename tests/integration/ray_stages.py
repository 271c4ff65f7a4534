"""Stages for the Ray executor's tests (imported in Ray's actors by module name), and a
helper to compare two runs' files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from engine_stages import PAYLOAD, VEC

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


class HoldJob(Stage):
    """Logs each run (``job pid``, one line each) in ``log``; the first run of job ``hold``
    waits for the file ``go`` (``seconds`` at most: the test kills the node meanwhile)."""

    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, log: str, hold: str, go: str, seconds: float):
        self.log, self.hold, self.go, self.seconds = Path(log), hold, Path(go), seconds

    def execute(self, ctx, vec):
        seen = self.log.read_text().split("\n") if self.log.exists() else []
        first = not any(line.startswith(f"{ctx.job_id} ") for line in seen)
        with self.log.open("a") as f:
            f.write(f"{ctx.job_id} {os.getpid()}\n")
        end = time.monotonic() + self.seconds
        while ctx.job_id == self.hold and first and not self.go.exists():
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        return vec * 10


class Fill(Stage):
    """A vector of n (n.txt) values n, allocated with ``ctx.allocate``; ``shared``: whether
    that memory is shared memory (NumPy does not own it); a file in ``done`` per job."""

    inputs = {"payload": PAYLOAD}
    outputs = {"vec": VEC, "shared": Port("uint8")}

    def __init__(self, done: str):
        self.done = Path(done)

    def execute(self, ctx, payload: Path):
        n = int((payload / "n.txt").read_text())
        out = ctx.allocate("vec", (n,))
        out[:] = n
        owner = out
        while isinstance(owner, np.ndarray) and not owner.flags.owndata:
            owner = owner.base
        (self.done / ctx.job_id).touch()
        owned = isinstance(owner, np.ndarray)
        return {"vec": out, "shared": int(not owned)}


class LateReader(Stage):
    """Ready only once ``count`` files are in ``done`` (``seconds`` at most); then says
    whether each vector it gets holds its length everywhere."""

    inputs = {"vec": VEC}
    outputs = {"intact": Port("uint8")}

    def __init__(self, done: str, count: int, seconds: float):
        self.done, self.count, self.seconds = Path(done), count, seconds

    def prepare(self, ctx):
        end = time.monotonic() + self.seconds
        while len(list(self.done.iterdir())) < self.count and time.monotonic() < end:
            time.sleep(0.01)

    def execute(self, ctx, vec):
        return int((vec == len(vec)).all())


def without_times(provenance: bytes) -> bytes:
    """A job's provenance record without what differs between two runs of it: when it was
    submitted and when each stage ran."""
    record = json.loads(provenance)
    record.pop("submitted")
    for stage in record["stages"]:
        del stage["start"], stage["end"]
    return json.dumps(record, sort_keys=True).encode()
