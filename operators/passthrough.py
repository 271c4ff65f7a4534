"""The typed pass-through trio, after Clara's FastIO pass-through pipeline.

Clara's sample read a NIfTI file into a typed shared-memory array, wrote the array back to an
``.npz`` file downstream and compared the two. Ours does the same with NumPy files:

``NpyToArray`` (a job folder of ``*.npy`` -> ``volume`` + its ``shape``) ->
``ArrayToNpz`` (checks the shape, writes ``volume.npz``) ->
``Compare`` (the job's ``.npy`` against the ``.npz``; writes ``comparison.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataflow.stage import Port, Stage, StageError, Tensor

__all__ = ["ArrayToNpz", "Compare", "NpyToArray"]

VOLUME = Port("array", element_type="float32", shape=(-1, -1, -1), description="the volume")
SHAPE = Port("array", element_type="int32", shape=(3,), description="the volume's shape")
FOLDER = Port("stream", element_type="npy", description="a folder of .npy files")


def _single_npy(folder: Path) -> Path:
    files = sorted(Path(folder).glob("*.npy"))
    if len(files) != 1:
        raise StageError(f"expected one .npy file in {folder}; found {len(files)}")
    return files[0]


class NpyToArray(Stage):
    """Reads the job folder's one ``.npy`` volume into shared memory as float32."""

    inputs = {"input": FOLDER}
    outputs = {"volume": VOLUME, "shape": SHAPE}

    def execute(self, ctx, input: Path):
        path = _single_npy(input)
        data = np.load(path, mmap_mode="r")
        if data.ndim != 3:
            raise StageError(f"{path.name}: expected a 3-D volume; got shape {data.shape}")
        volume = ctx.allocate("volume", data.shape)  # in shared memory: no copy downstream
        volume[...] = data
        shape = np.asarray(data.shape, dtype=np.int32)
        return {"volume": Tensor(volume, {"source": path.name}), "shape": shape}


class ArrayToNpz(Stage):
    """Checks the volume has the announced shape and writes it to ``volume.npz``."""

    inputs = {"volume": VOLUME, "shape": SHAPE}
    outputs = {"output": Port("stream", element_type="npz")}

    def __init__(self, compressed: bool = False):
        self.save = np.savez_compressed if compressed else np.savez

    def execute(self, ctx, volume, shape):
        if tuple(shape.tolist()) != volume.shape:
            raise StageError(f"volume shape {volume.shape} differs from announced {shape.tolist()}")
        out = ctx.output_dir("output")
        self.save(out / "volume.npz", volume=volume)
        return out


class Compare(Stage):
    """Compares the job's original ``.npy`` with the ``.npz`` written downstream."""

    inputs = {"original": FOLDER, "written": Port("stream", element_type="npz")}
    outputs = {"report": Port("stream", element_type="json")}

    def __init__(self, tolerance: float = 0.0):
        self.tolerance = tolerance

    def execute(self, ctx, original: Path, written: Path):
        expected = np.load(_single_npy(original)).astype(np.float32)
        with np.load(Path(written) / "volume.npz") as npz:
            got = npz["volume"]
        same = got.shape == expected.shape and bool(
            np.allclose(got, expected, atol=self.tolerance, rtol=0)
        )
        out = ctx.output_dir("report")
        report = {"match": same, "shape": list(got.shape), "job": ctx.job_name}
        (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
        if not same:
            raise StageError(f"round trip changed the volume (see {out / 'comparison.json'})")
        return out
