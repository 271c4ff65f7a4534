"""Test stages for the service's start-up checks: ``Prepared`` leaves a file named by its
``marker`` argument when a worker has started and prepared it (so a test sees whether any
worker was started at all); ``NeedsAbsent`` needs a module installed nowhere."""

from pathlib import Path

from dataflow.stage import Port, Stage

JOB = Port("stream", element_type="folder")


class Prepared(Stage):
    inputs = {"job": JOB}
    outputs = {"job": JOB}

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def prepare(self, ctx) -> None:
        self.marker.touch()

    def execute(self, ctx, job: Path) -> Path:
        return job


class NeedsAbsent(Prepared):
    requires = {"dataflow_test_surely_absent": "dataflow-test-extras[absent]"}
