"""`dataflow` as a user types it, for the tests: ``python -m dataflow.cli ARGS`` in a clean
environment (no container engine, a plain PATH), from the repository root by default."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from deadlines import LONG_HANG, wait_until

ROOT = Path(__file__).parents[1]


def dataflow(
    *args, cwd: str | Path = ROOT, timeout: float = LONG_HANG
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataflow.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={"DATAFLOW_CONTAINER_ENGINE": "none", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def jobs(config: str | Path) -> list[dict]:
    """``dataflow jobs CONFIG --json``: every job record, newest first."""
    import json

    out = dataflow("jobs", config, "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wait_serving(predicate, timeout: float, what: str, proc: subprocess.Popen):
    """Poll ``predicate`` until it is truthy (returned), while ``proc`` (``dataflow serve``)
    runs; AssertionError if it exits first or ``timeout`` passes."""

    def reached():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"dataflow serve exited ({proc.returncode}) before {what}")
        return predicate()

    return wait_until(reached, what, timeout, poll=0.25)


def serve(
    config: str | Path, log: str | Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``dataflow serve CONFIG ARGS`` in the background, its output appended to ``log``;
    ``env``: variables set for it on top of this process's."""
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dataflow.cli", "serve", str(config), *args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip


@contextlib.contextmanager
def study_sent(config: Path, study_files, port: int, called: str, state: str,
               env: dict[str, str] | None = None):  # fmt: skip
    """``dataflow serve CONFIG`` (output in ``serve.log`` beside it) receiving
    ``study_files`` from dcmtk's storescu on ``port`` for ``called``; yields (the process, the
    study's job record once it is in ``state``), and stops the service after the block."""
    from dicom_peers import storescu, wait_for_port

    proc = serve(config, Path(config).with_name("serve.log"), env=env)
    try:
        wait_for_port(port, proc=proc, timeout=LONG_HANG)
        sent = storescu("127.0.0.1", port, study_files, called=called)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        (record,) = wait_serving(
            lambda: [r for r in jobs(config) if r["state"] == state], LONG_HANG,
            f"the study's job to be {state}", proc,
        )  # fmt: skip
        yield proc, record
    finally:
        proc.terminate()
        proc.wait(timeout=LONG_HANG)
