"""Micro-benchmark of ct-segmentation's two slowest stages, before and after, in one run.

```
.venv/bin/python benchmarks/seg_smooth.py [--slices 200] [--size 512] [--rounds 5]
```

On a phantom study (``operators.dicom.phantom.write_ct_series``, ``--slices`` x ``--size``²),
round after round, the two versions of a case take turns (in alternating order), each into
freshly allocated outputs as a stage's are; we report the median and the first round apart:

- ``smooth``: ``gaussian_smooth`` (sigma 1 mm) as three passes through a volume-sized
  temporary (before) and as the fused sweep (after); the results are compared bit for bit;
- ``paint``: PaintLabels' painting of a mask into the labels within label 1 (the lungs into
  the body), as NumPy (before: two comparisons, a copy, a boolean-mask assignment) and as
  ``kernels.paint_labels`` (after: one parallel pass);
- ``counts``: the SEG writer's look at which label values are present, ``np.unique`` (before)
  and ``kernels.value_counts`` (after), on the labels painted above.

The benchmark asserts nothing but that both versions of a case give the same result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import kernels
from operators.dicom.phantom import write_ct_series
from operators.dicom.series import find_files, load_series
from operators.kernels import _common, cpu


def smooth_passes(volume: np.ndarray, spacing) -> np.ndarray:
    """Before: the three passes, ping-ponging through one temporary."""
    plan = _common.gaussian_plan(1.0, spacing)
    passes = (cpu.gaussian_axis0, cpu.gaussian_axis1, cpu.gaussian_axis2)
    out, tmp = np.empty(volume.shape, np.float32), np.empty(volume.shape, np.float32)
    src = volume
    for (axis, weights), into_out in zip(plan, _common.pass_targets(len(plan))):
        dst = out if into_out else tmp
        passes[axis](src, weights, dst)
        src = dst
    return out


def smooth_fused(volume: np.ndarray, spacing) -> np.ndarray:
    """After: ``kernels.gaussian_smooth`` (the fused sweep when every axis is filtered)."""
    return kernels.gaussian_smooth(volume, 1.0, spacing, out=np.empty(volume.shape, np.float32))


def paint_numpy(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Before: PaintLabels in NumPy."""
    out = np.empty(labels.shape, np.uint8)
    where = mask != 0
    where &= labels == 1
    np.copyto(out, labels)
    out[where] = 2
    return out


def paint_kernel(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """After: ``kernels.paint_labels``."""
    return kernels.paint_labels(labels, mask, 2, 1, out=np.empty(labels.shape, np.uint8))


def side_by_side(
    name: str, versions: dict[str, Callable[[], Any]], rounds: int, same: Callable
) -> dict[str, Any]:
    times: dict[str, list[float]] = {v: [] for v in versions}
    results: dict[str, Any] = {}
    order = list(versions)
    for r in range(rounds + 1):
        for v in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            results[v] = versions[v]()
            times[v].append(time.perf_counter() - start)
    first, *others = versions
    agree = all(same(results[first], results[o]) for o in others)
    row = {"case": name, "same_result": agree, "load_average": round(os.getloadavg()[0], 2)}
    for v, t in times.items():
        row[f"{v}_first_s"] = round(t[0], 3)
        row[f"{v}_median_s"] = round(statistics.median(t[1:]), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dataflow-seg-smooth-") as work:
        study = Path(work) / "study"
        write_ct_series(study, slices=args.slices, size=args.size)
        volume, metadata = load_series(find_files(study))
        spacing = metadata["spacing"]
        kernels.warmup("gaussian_smooth", "paint_labels", "value_counts")
        body = (volume > -500).view(np.uint8)
        low = (volume < -400).view(np.uint8)
        rows = [
            side_by_side(
                "smooth",
                {
                    "passes": lambda: smooth_passes(volume, spacing),
                    "fused": lambda: smooth_fused(volume, spacing),
                },
                args.rounds,
                np.array_equal,
            ),
            side_by_side(
                "paint",
                {
                    "numpy": lambda: paint_numpy(body, low),
                    "kernel": lambda: paint_kernel(body, low),
                },
                args.rounds,
                np.array_equal,
            ),
        ]
        labels = paint_kernel(body, low)
        rows.append(
            side_by_side(
                "counts",
                {
                    "unique": lambda: {int(v) for v in np.unique(labels)},
                    "kernel": lambda: set(np.flatnonzero(kernels.value_counts(labels)).tolist()),
                },
                args.rounds,
                lambda a, b: a == b,
            )
        )
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
