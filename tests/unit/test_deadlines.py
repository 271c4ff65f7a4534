"""The tests' own deadline helpers (tests/deadlines.py)."""

from __future__ import annotations

import importlib
import threading

import deadlines
import pytest


def test_wait_until_returns_the_first_truthy_value():
    answers = iter([None, 0, [], "ready"])
    assert deadlines.wait_until(lambda: next(answers), "an answer", poll=0) == "ready"


def test_wait_until_names_what_never_happened():
    with pytest.raises(AssertionError, match=r"hung: no file written after 0 s"):
        deadlines.wait_until(lambda: False, "file written", deadline=0.01, poll=0.001)


def test_returns_before_a_hang_gives_back_the_value_or_the_exception():
    assert deadlines.returns_before_a_hang(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        deadlines.returns_before_a_hang(lambda: 1 / 0)


def test_returns_before_a_hang_fails_on_a_call_that_does_not_return(monkeypatch):
    monkeypatch.setattr(deadlines, "HANG", 0.01)
    never = threading.Event()
    try:
        with pytest.raises(AssertionError, match="wait still running"):
            deadlines.returns_before_a_hang(never.wait)
    finally:
        never.set()  # let the helper's thread end


@pytest.mark.parametrize(("raw", "hang"), [("1", 120.0), ("3", 360.0), ("0.25", 30.0)])
def test_the_scale_stretches_every_deadline(monkeypatch, raw, hang):
    monkeypatch.setenv("DATAFLOW_TEST_DEADLINE_SCALE", raw)
    try:
        module = importlib.reload(deadlines)
        assert (hang, hang * 5) == (module.HANG, module.LONG_HANG)
    finally:
        monkeypatch.delenv("DATAFLOW_TEST_DEADLINE_SCALE")
        importlib.reload(deadlines)


@pytest.mark.parametrize("raw", ["slow", "0", "-2"])
def test_a_scale_that_is_not_a_positive_number_is_refused(monkeypatch, raw):
    monkeypatch.setenv("DATAFLOW_TEST_DEADLINE_SCALE", raw)
    try:
        with pytest.raises(ValueError, match=rf"DATAFLOW_TEST_DEADLINE_SCALE='{raw}'"):
            importlib.reload(deadlines)
    finally:
        monkeypatch.delenv("DATAFLOW_TEST_DEADLINE_SCALE")
        importlib.reload(deadlines)
