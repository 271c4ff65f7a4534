"""A stage that reports what its worker process inherited (test_worker_start.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dataflow.stage import Port, Stage

PAYLOAD = Port("stream", element_type="job-folder")


class Inherited(Stage):
    """Returns, as JSON: the worker's folder, a variable, Numba's thread count, a draw of
    NumPy's global generator, its pid; and prints a line to stdout and stderr."""

    inputs = {"payload": PAYLOAD}
    outputs = {"report": Port("string")}

    def execute(self, ctx, payload: Path):
        import numba
        import numpy as np

        print(f"stdout of {ctx.stage}", flush=True)
        print(f"stderr of {ctx.stage}", file=sys.stderr, flush=True)
        return json.dumps(
            {
                "cwd": os.getcwd(),
                "mark": os.environ.get("DATAFLOW_TEST_MARK"),
                "variable": os.environ.get("STAGE_VARIABLE"),
                "numba_threads": numba.get_num_threads(),
                "numba_cache_dir": numba.config.CACHE_DIR,
                "draw": float(np.random.random()),
                "pid": os.getpid(),
                "parent": os.getppid(),
            }
        )


class Journaled(Stage):
    """Appends "start NAME" when built and "ready NAME" after ``prepare`` to ``journal`` (one
    write each, O_APPEND: lines from several workers never mix); ``prepare`` raises if
    ``fail``. Passes the job's folder on."""

    inputs = {"payload": PAYLOAD}
    outputs = {"name": Port("string")}

    def __init__(self, journal: str, name: str, fail: bool = False) -> None:
        self.journal, self.name, self.fail = journal, name, fail
        self._write(f"start {name}")

    def _write(self, line: str) -> None:
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)

    def prepare(self, ctx) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self._write(f"ready {self.name}")

    def execute(self, ctx, payload: Path):
        return self.name


class Other(Journaled):
    """The same, as other stage code."""
