"""One job through one stage (dataflow.execution.binding.run_job): the code a stage worker and
dataflow.testing both run. Here it is driven through an Edges of the test's own that keeps
"store objects" in a dict — what a worker does with the real store, minus processes — so the
rules (what metadata a stage sees and passes on, where a stream output goes) are checked on
their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataflow.execution.binding import run_job
from dataflow.stage import Port, PortError, Stage, StageContext, Tensor

VOL = Port("array", "float32", (-1,))


class DictStore:
    """An Edges over a dict of objects, as the worker's is over the store: inputs arrive as
    object ids, outputs are published as new ids; both sides' metadata kept."""

    def __init__(self, objects: dict[str, tuple[np.ndarray, dict]]) -> None:
        self.objects = dict(objects)
        self.reads: list[tuple[str, str]] = []

    def read(self, port, ref, spec):
        self.reads.append((port, spec.type))
        if spec.type == "array":
            array, meta = self.objects[ref]
            return array, meta
        return ref, None

    def write(self, port, value, spec):
        if spec.type != "array":
            return value
        oid = f"obj-{len(self.objects)}"
        self.objects[oid] = (value.array, dict(value.metadata))
        return oid


class Blend(Stage):
    inputs = {"mask": VOL, "image": VOL, "label": Port("string")}
    outputs = {"out": VOL, "notes": Port("stream", element_type="text"), "count": Port("int32")}
    metadata_from = "image"

    def execute(self, ctx, mask, image, label):
        self.seen = dict(ctx.metadata), ctx.job_id, ctx.job_name
        (ctx.output_dir("notes") / "label.txt").write_text(label)
        return {"out": image * mask, "count": int(mask.sum())}


def context(tmp_path: Path) -> StageContext:
    def output_dir(port: str) -> Path:
        path = tmp_path / "job-x" / "blend" / port
        path.mkdir(parents=True, exist_ok=True)
        return path

    return StageContext(stage="blend", scratch_dir=tmp_path, allocator=None, output_dirs=output_dir)


def test_run_job_binds_inputs_through_the_edges_and_publishes_with_inherited_metadata(tmp_path):
    store = DictStore({
        "m": (np.array([1, 0, 1], np.float32), {"spacing": [9.0]}),
        "i": (np.array([2, 3, 4], np.float32), {"spacing": [0.5], "origin": [1.0]}),
    })  # fmt: skip
    stage = Blend()

    returned, published = run_job(
        stage, context(tmp_path), store, {"mask": "m", "image": "i", "label": "left"},
        job_id="j1", job_name="job-x",
    )  # fmt: skip

    # the stage saw every input's metadata, and its job
    assert stage.seen == (
        {"mask": {"spacing": [9.0]}, "image": {"spacing": [0.5], "origin": [1.0]}},
        "j1",
        "job-x",
    )
    assert store.reads == [("mask", "array"), ("image", "array"), ("label", "string")]
    # the plain array output went out with its metadata_from input's metadata, not the first's
    array, meta = store.objects[published["out"]]
    assert array.tolist() == [2.0, 0.0, 4.0] and meta == {"spacing": [0.5], "origin": [1.0]}
    # the stream output the stage left out is its default folder, the value as returned
    assert published["notes"] == tmp_path / "job-x" / "blend" / "notes"
    assert (published["notes"] / "label.txt").read_text() == "left"
    assert published["count"] == 2
    assert returned["out"].tolist() == [2.0, 0.0, 4.0]  # what the stage returned, no metadata


def test_a_tensor_output_keeps_its_own_metadata(tmp_path):
    class Own(Blend):
        def execute(self, ctx, mask, image, label):
            return {"out": Tensor(image, {"spacing": [7.0]}), "count": 0}

    store = DictStore({"m": (np.ones(3, np.float32), {}), "i": (np.ones(3, np.float32), {})})
    _, published = run_job(
        Own(), context(tmp_path), store, {"mask": "m", "image": "i", "label": "x"},
        job_id="j", job_name="job-x",
    )  # fmt: skip
    assert store.objects[published["out"]][1] == {"spacing": [7.0]}


def test_an_output_that_does_not_fit_its_port_is_refused_before_anything_is_published(tmp_path):
    class Wrong(Blend):
        def execute(self, ctx, mask, image, label):
            return {"out": image.astype(np.int64), "count": 0}

    store = DictStore({"m": (np.ones(3, np.float32), {}), "i": (np.ones(3, np.float32), {})})
    with pytest.raises(PortError, match="stage 'blend' output 'out'"):
        run_job(
            Wrong(), context(tmp_path), store, {"mask": "m", "image": "i", "label": "x"},
            job_id="j", job_name="job-x",
        )  # fmt: skip
    assert set(store.objects) == {"m", "i"}
