"""Small stages for the executor's tests (imported by worker processes by module name)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dataflow.stage import Port, Stage, Tensor, function_stage

VEC = Port("array", element_type="int64", shape=(-1,))
PAYLOAD = Port("stream", element_type="job-folder")
FOREVER = 24 * 3600  # seconds: a stage that sleeps this long never returns, as far as a test goes


class Load(Stage):
    """Reads the job folder's n.txt and makes a vector of n ones."""

    inputs = {"payload": PAYLOAD}
    outputs = {"vec": VEC}

    def execute(self, ctx, payload: Path):
        n = int((payload / "n.txt").read_text())
        out = ctx.allocate("vec", (n,))  # computed in place in shared memory
        out[:] = 1
        return Tensor(out, {"n": n, "job": ctx.job_id})


class Scale(Stage):
    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, factor: int = 2, fail_on: int = -1, crash_on: int = -1, sleep_on: int = -1):
        self.factor, self.fail_on, self.crash_on, self.sleep_on = (
            factor,
            fail_on,
            crash_on,
            sleep_on,
        )
        self.jobs_seen = 0

    def execute(self, ctx, vec):
        n = len(vec)
        self.jobs_seen += 1
        if n == self.fail_on:
            raise ValueError(f"cannot scale a vector of {n}")
        if n == self.crash_on:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == self.sleep_on:
            time.sleep(FOREVER)
        return vec * self.factor


@function_stage(inputs={"a": VEC, "b": VEC}, outputs={"total": Port("int64")})
def total(a, b):
    return int(a.sum() + b.sum())


class Slow(Stage):
    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def __init__(self, seconds: float = 0.2, mark: str = "", until: str = ""):
        self.seconds, self.mark = seconds, mark  # mark: a file made when a job begins
        self.until = until  # a file: the job ends once it exists (``seconds`` at most)

    def execute(self, ctx, vec):
        if self.mark:
            Path(self.mark).touch()
        if not self.until:
            time.sleep(self.seconds)
        end = time.monotonic() + self.seconds
        while self.until and not Path(self.until).exists() and time.monotonic() < end:
            time.sleep(0.01)
        return vec + 0


class BrokenPrepare(Stage):
    inputs = {"vec": VEC}
    outputs = {"vec": VEC}

    def prepare(self, ctx):
        raise RuntimeError("model file missing")

    def execute(self, ctx, vec):
        return vec


@function_stage(inputs={"vec": VEC}, outputs={"where": Port("string")})
def whereami(vec, ctx):
    """Reports the GPUs this worker may see and the device the scheduler assigned. With
    ``MEET_IN`` (a folder), ``MEET_COUNT`` and ``MEET_DEADLINE`` in its environment, each
    replica's first job waits there (until the deadline, in seconds) until that many replicas
    have one: all of them work."""
    meet = os.environ.get("MEET_IN")
    if meet:
        Path(meet, str(os.getpid())).touch()
        count = int(os.environ["MEET_COUNT"])
        end = time.monotonic() + float(os.environ["MEET_DEADLINE"])
        while len(os.listdir(meet)) < count and time.monotonic() < end:
            time.sleep(0.01)
    return f"{os.environ.get('CUDA_VISIBLE_DEVICES')}|{ctx.device}"


def make_jobs(root: Path, sizes):
    jobs = []
    for i, n in enumerate(sizes):
        folder = root / f"job{i}"
        folder.mkdir(parents=True)
        (folder / "n.txt").write_text(str(n))
        jobs.append((f"job{i}", folder))
    return jobs


if __name__ == "__main__":  # a run to interrupt (see test_executor.py)
    import sys

    from dataflow.execution.local import LocalExecutor, StageDef

    root = Path(sys.argv[1])
    stages = [
        StageDef("load", Load, {"payload": None}, ("vec",)),
        StageDef(
            "slow",
            Slow,
            {"vec": ("load", "vec")},
            ("vec",),
            arguments={"seconds": FOREVER, "mark": str(root / "busy")},
        ),
    ]
    executor = LocalExecutor(stages, output_root=root / "out")
    print("running", flush=True)
    try:
        executor.run(make_jobs(root / "in", [3, 4]))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
