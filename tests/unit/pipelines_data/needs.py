"""Stages that need modules beyond dataflow's own (``Stage.requires``), for the tests of what
validation says when one is missing. ``dataflow_test_surely_absent`` is installed nowhere."""

from __future__ import annotations

from dataflow.stage import Port, Stage

VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1))


class NeedsAbsent(Stage):
    """Needs a module that no machine has (what a stage with an uninstalled extra is)."""

    inputs = {"image": VOLUME}
    outputs = {"image": VOLUME}
    requires = {"dataflow_test_surely_absent": "dataflow-test-extras[absent]"}

    def execute(self, ctx, image):
        import dataflow_test_surely_absent  # noqa: F401  (fails: the validation's point)

        return image


class NeedsPresent(Stage):
    """Needs numpy, which every machine running dataflow has."""

    inputs = {"image": VOLUME}
    outputs = {"image": VOLUME}
    requires = {"numpy": "numpy"}

    def execute(self, ctx, image):
        return image


class BadRequires(Stage):
    """Declares its needs wrongly (a list): the stage author's mistake, named."""

    inputs = {"image": VOLUME}
    outputs = {"image": VOLUME}
    requires = ["nibabel"]  # type: ignore[assignment]

    def execute(self, ctx, image):
        return image
