"""How long a test may wait: only a hang takes this long.

A test asserts what happened, never how fast. It waits for an event (a file, a log line, a
state, a thread that returned) and gives up only after ``HANG`` seconds — a deadline that a
correct run on a shared 2-core CI machine, ten times slower than a quiet one, never reaches.
How fast something is belongs in ``benchmarks/``.

``DATAFLOW_TEST_DEADLINE_SCALE`` multiplies every deadline (e.g. ``3`` on a machine even busier
than that, ``0.25`` to see a hang sooner while debugging one test).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _scale() -> float:
    raw = os.environ.get("DATAFLOW_TEST_DEADLINE_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"DATAFLOW_TEST_DEADLINE_SCALE={raw!r} is not a number") from None
    if scale <= 0:
        raise ValueError(f"DATAFLOW_TEST_DEADLINE_SCALE={raw!r} must be above 0")
    return scale


SCALE = _scale()
HANG = 120.0 * SCALE  # seconds: a wait for one event (a process up, a job done, a reply)
LONG_HANG = 600.0 * SCALE  # seconds: a whole subprocess run (a pipeline, Numba compiling)


def wait_until(predicate: Callable[[], T], what: str, deadline: float = HANG,
               poll: float = 0.02) -> T:  # fmt: skip
    """``predicate()``'s first truthy value, polled every ``poll`` s; after ``deadline``
    seconds an AssertionError saying what never happened."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"hung: no {what} after {deadline:.0f} s"
        time.sleep(poll)


def returns_before_a_hang(call, *args, **kwargs):
    """``call(*args, **kwargs)`` in a thread: what it returned, or raised; an AssertionError
    when it is still running after HANG (it waited for something that never comes)."""
    outcome: list = []

    def run():
        try:
            outcome.append((True, call(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    assert outcome, f"{getattr(call, '__name__', call)} still running after {HANG:.0f} s"
    returned, value = outcome[0]
    if not returned:
        raise value
    return value
