"""`dataflow` as a user types it, for the tests: ``python -m dataflow.cli ARGS`` in a clean
environment (no container engine, a plain PATH), from the repository root by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def dataflow(*args, cwd: str | Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataflow.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={"DATAFLOW_CONTAINER_ENGINE": "none", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
