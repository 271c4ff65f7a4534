"""Stages and baseline processes for ``benchmarks/engine.py``.

Worker processes (``spawn``) import this module by name, so it must stay importable on its
own: the benchmark passes ``extra_sys_path=[benchmarks dir]`` to the executor.

Engine stages (what a stage author would naturally write):

- ``Source(nbytes, spin_ms)``: makes a uint8 tensor of ``nbytes`` in shared memory
  (``ctx.allocate``), fills it, then spins ``spin_ms`` of CPU;
- ``Noop``: returns its input array as it is. The input is a read-only view of the store; the
  worker copies a returned array that it did not allocate into a new store object, so every
  no-op hop costs a copy of the tensor (there is no zero-copy pass-through);
- ``Spin(ms)``: burns ``ms`` of this thread's CPU time (not wall time), then returns its input;
- ``Sleep(ms)``: ``time.sleep`` (waiting on I/O or a remote server), then returns its input;
- ``Sink``: returns the tensor's first element as a number (so no tensor leaves the pipeline).

The baseline (``baseline_main``) is the naive equivalent: one ``multiprocessing`` process per
stage, connected by ``multiprocessing.Queue``\\s carrying NumPy arrays (pickled).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from dataflow.stage import Port, Stage

DATA = Port("array", element_type="uint8", shape=(-1,))
PAYLOAD = Port("stream", element_type="job-folder")
FILL = 7


def spin(ms: float) -> None:
    """Burn ``ms`` milliseconds of this thread's CPU time (busy compute, not a sleep)."""
    if ms <= 0:
        return
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass


class Source(Stage):
    inputs = {"payload": PAYLOAD}
    outputs = {"data": DATA}

    def __init__(self, nbytes: int = 4096, spin_ms: float = 0.0):
        self.nbytes, self.spin_ms = nbytes, spin_ms

    def execute(self, ctx, payload: Path):
        out = ctx.allocate("data", (self.nbytes,))
        out.fill(FILL)
        spin(self.spin_ms)
        return out


class Noop(Stage):
    inputs = {"data": DATA}
    outputs = {"data": DATA}

    def execute(self, ctx, data):
        return data


class Spin(Stage):
    inputs = {"data": DATA}
    outputs = {"data": DATA}

    def __init__(self, ms: float = 4.0):
        self.ms = ms

    def execute(self, ctx, data):
        spin(self.ms)
        return data


class Sleep(Stage):
    inputs = {"data": DATA}
    outputs = {"data": DATA}

    def __init__(self, ms: float = 50.0):
        self.ms = ms

    def execute(self, ctx, data):
        time.sleep(self.ms / 1000.0)
        return data


class Sink(Stage):
    inputs = {"data": DATA}
    outputs = {"first": Port("uint8")}

    def execute(self, ctx, data):
        return int(data[0])


# ------------------------------------------------------------------------------ the baseline


def _baseline_step(kind: str, arg: float, nbytes: int, item):
    if kind == "source":
        array = np.full(nbytes, FILL, dtype=np.uint8)
        spin(arg)
        return array
    if kind == "noop":
        return item
    if kind == "spin":
        spin(arg)
        return item
    if kind == "sleep":
        time.sleep(arg / 1000.0)
        return item
    if kind == "sink":
        return int(item[0])
    raise ValueError(kind)


def baseline_main(kind: str, arg: float, nbytes: int, inbox, outbox, control) -> None:
    """One baseline stage process: ``(job, item)`` from ``inbox``, ``(job, result)`` to
    ``outbox``, until it gets ``None`` (the driver sends one per process once all jobs are
    done)."""
    control.put(("ready", os.getpid()))
    while True:
        message = inbox.get()
        if message is None:
            break
        job, item = message
        outbox.put((job, _baseline_step(kind, arg, nbytes, item)))
