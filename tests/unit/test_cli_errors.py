"""The CLI's one error boundary (dataflow.cli): a user's mistake prints its message and exits
2 without a traceback; a bug is not dressed up as a user error: it exits 1 with its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deadlines import LONG_HANG

ROOT = Path(__file__).parents[2]
# `dataflow plan` as a user runs it, with load_graph broken as a bug would break it.
BUGGY = """
import sys
import dataflow.pipeline
from dataflow.cli import app

def load_graph(*args, **kwargs):
    raise KeyError("a bug in load_graph")

dataflow.pipeline.load_graph = load_graph
sys.argv = ["dataflow", *sys.argv[1:]]
app()
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=LONG_HANG,
        env={"DATAFLOW_CONTAINER_ENGINE": "none", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_user_error_exits_2_with_its_message_and_no_traceback():
    # an unknown operator in --replicas was a KeyError, printed as a user error (exit 1)
    out = _run("-m", "dataflow.cli", "plan", "pipelines/passthrough.yaml", "--replicas", "nope=2")
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        "error: --replicas nope=2: pipeline 'passthrough' has no operator 'nope'\n"
    )
    assert out.stdout == ""


def test_a_bug_exits_1_with_its_traceback():
    out = _run("-c", BUGGY, "plan", "pipelines/passthrough.yaml")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "KeyError" in out.stderr
    assert "a bug in load_graph" in out.stderr
    assert "error: " not in out.stderr  # not passed off as the user's mistake
