"""Sliding-window inference over a 3D volume, with MONAI's ``sliding_window_inference`` semantics.

A float32 [D, H, W] volume is cut into windows of ``roi_size`` that overlap by ``overlap`` (a
fraction of the window); ``predictor`` gets them in batches of up to ``sw_batch_size`` as
[N, 1, d, h, w] and returns [N, C, d, h, w]. Each window's output is weighted by an importance
map (``constant``: ones; ``gaussian``: a Gaussian of sigma ``sigma_scale`` x the window size,
centred, normalised to 1 at the centre, clamped below at max(min, 1e-3)) and accumulated; the sum
divided by the summed weights is the result [C, D, H, W].

As in MONAI: a window dimension of 0 or -1 (or larger than the volume) takes the volume's
size; a volume smaller than the window is padded (``padding_mode`` ``constant`` with ``cval``,
or ``edge``), half before and half after, and the result is cropped back; windows step by
``int(roi * (1 - overlap))`` (at least 1) and the last window of each axis is shifted back to end
at the volume's edge, so every voxel is covered and no window leaves the volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dataflow.errors import DataflowError

__all__ = [
    "BLEND_MODES",
    "PADDING_MODES",
    "SlidingWindowError",
    "argmax_labels",
    "check_settings",
    "count_windows",
    "importance_map",
    "scan_interval",
    "sliding_window_inference",
    "window_starts",
]

BLEND_MODES = ("constant", "gaussian")
PADDING_MODES = ("constant", "edge")

Predictor = Callable[[np.ndarray], np.ndarray]


class SlidingWindowError(DataflowError, ValueError):
    """Bad sliding-window settings, or a predictor whose output does not fit."""


def _triple(value: int | Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    values = [int(value)] * 3 if np.isscalar(value) else [int(v) for v in value]  # type: ignore[arg-type]
    if len(values) != 3:
        raise SlidingWindowError(f"roi_size needs 1 or 3 values; got {list(values)}")
    return tuple(s if v <= 0 else v for v, s in zip(values, size))  # type: ignore[return-value]


def scan_interval(image: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The step between windows along each axis: the window itself where it spans the image,
    else ``int(roi * (1 - overlap))``, at least 1."""
    if not 0.0 <= overlap < 1.0:
        raise SlidingWindowError(f"overlap must be in [0, 1); got {overlap}")
    steps = []
    for size, window in zip(image, roi):
        step = window if window == size else int(window * (1.0 - overlap))
        steps.append(max(step, 1))
    return tuple(steps)


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Start indices along one axis: ``0, step, 2 step...`` until a window reaches the end,
    the last one moved back to end exactly at ``size``."""
    if window >= size:
        return [0]
    count = next(n for n in range(1, size + 2) if (n - 1) * step + window >= size)
    return [min(i * step, size - window) for i in range(count)]


def importance_map(
    roi: Sequence[int], mode: str = "constant", sigma_scale: float = 0.125
) -> np.ndarray:
    """The weight of each voxel of a window (float32, shape ``roi``)."""
    if mode == "constant":
        return np.ones(tuple(roi), np.float32)
    if mode != "gaussian":
        raise SlidingWindowError(f"blend mode must be one of {BLEND_MODES}; got {mode!r}")
    if sigma_scale <= 0:
        raise SlidingWindowError(f"sigma_scale must be positive; got {sigma_scale}")
    weights = np.ones((), np.float64)
    for n in roi:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (n * sigma_scale) ** 2))
        weights = np.multiply.outer(weights, g)
    weights /= weights.max()
    return np.maximum(weights, max(weights.min(), 1e-3)).astype(np.float32)


def check_settings(settings: Mapping[str, Any]) -> None:
    """Raise SlidingWindowError for settings (keyword arguments of
    :func:`sliding_window_inference`, ``roi_size`` included) that it would refuse."""
    roi_size = settings.get("roi_size", 1)
    overlap = settings.get("overlap", 0.25)
    sw_batch_size = settings.get("sw_batch_size", 1)
    mode = settings.get("mode", "constant")
    sigma_scale = settings.get("sigma_scale", 0.125)
    padding_mode = settings.get("padding_mode", "constant")
    roi = [roi_size] if np.isscalar(roi_size) else list(roi_size)  # type: ignore[arg-type]
    if len(roi) not in (1, 3) or not all(isinstance(v, (int, np.integer)) for v in roi):
        raise SlidingWindowError(f"roi_size must be an int or 3 ints; got {roi_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise SlidingWindowError(f"overlap must be in [0, 1); got {overlap}")
    if sw_batch_size < 1:
        raise SlidingWindowError(f"sw_batch_size must be at least 1; got {sw_batch_size}")
    if mode not in BLEND_MODES:
        raise SlidingWindowError(f"blend mode must be one of {BLEND_MODES}; got {mode!r}")
    if sigma_scale <= 0:
        raise SlidingWindowError(f"sigma_scale must be positive; got {sigma_scale}")
    if padding_mode not in PADDING_MODES:
        raise SlidingWindowError(
            f"padding_mode must be one of {PADDING_MODES}; got {padding_mode!r}"
        )


def _pad(volume: np.ndarray, roi: Sequence[int], mode: str, cval: float):
    widths = []
    for size, window in zip(volume.shape, roi):
        diff = max(window - size, 0)
        widths.append((diff // 2, diff - diff // 2))
    if not any(a or b for a, b in widths):
        return volume, None
    if mode == "constant":
        padded = np.pad(volume, widths, mode="constant", constant_values=cval)
    else:
        padded = np.pad(volume, widths, mode="edge")
    crop = tuple(slice(a, a + size) for (a, _), size in zip(widths, volume.shape))
    return padded, crop


def sliding_window_inference(
    volume: np.ndarray,
    predictor: Predictor,
    roi_size: int | Sequence[int],
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "constant",
    sigma_scale: float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Run ``predictor`` over ``volume`` [D, H, W] window by window; returns [C, D, H, W] float32.

    ``out``: an optional float32 [C, D, H, W] array to write the result into (shared memory)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise SlidingWindowError(f"the volume must be 3D [D, H, W]; got shape {list(volume.shape)}")
    settings = {"roi_size": roi_size, "sw_batch_size": sw_batch_size, "overlap": overlap}
    check_settings(
        {**settings, "mode": mode, "sigma_scale": sigma_scale, "padding_mode": padding_mode}
    )
    roi = _triple(roi_size, volume.shape)
    weights = importance_map(roi, mode, sigma_scale)
    padded, crop = _pad(volume.astype(np.float32, copy=False), roi, padding_mode, cval)
    steps = scan_interval(padded.shape, roi, overlap)
    starts = list(
        itertools.product(*(window_starts(s, w, t) for s, w, t in zip(padded.shape, roi, steps)))
    )
    total: np.ndarray | None = None
    count = np.zeros(padded.shape, np.float32)
    batch = np.empty((min(sw_batch_size, len(starts)), 1, *roi), np.float32)
    for first in range(0, len(starts), sw_batch_size):
        chunk = starts[first : first + sw_batch_size]
        windows = [tuple(slice(a, a + w) for a, w in zip(start, roi)) for start in chunk]
        for i, where in enumerate(windows):
            batch[i, 0] = padded[where]
        result = np.asarray(predictor(batch[: len(chunk)]))
        expected = (len(chunk), None, *roi)
        if result.ndim != 5 or result.shape[0] != len(chunk) or result.shape[2:] != tuple(roi):
            raise SlidingWindowError(
                f"the model returned shape {list(result.shape)} for a batch of "
                f"{list(batch[: len(chunk)].shape)}; expected [{expected[0]}, C, "
                f"{', '.join(map(str, roi))}] (same window size, one batch entry per window)"
            )
        if total is None:
            total = np.zeros((result.shape[1], *padded.shape), np.float32)
        elif result.shape[1] != total.shape[0]:
            raise SlidingWindowError(
                f"the model returned {result.shape[1]} channels after {total.shape[0]}"
            )
        for i, where in enumerate(windows):
            total[(slice(None), *where)] += result[i] * weights
            count[where] += weights
    assert total is not None  # at least one window
    total /= count
    if crop is not None:
        total = total[(slice(None), *crop)]
    if out is None:
        return np.ascontiguousarray(total)
    if out.shape != total.shape:
        raise SlidingWindowError(
            f"out has shape {list(out.shape)}; the result is {list(total.shape)}"
        )
    out[...] = total
    return out


def argmax_labels(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The channel of the highest score at each voxel: [C, D, H, W] -> uint8 [D, H, W].

    A single channel is taken as a foreground probability: label 1 where it exceeds 0.5."""
    if scores.ndim != 4:
        raise SlidingWindowError(f"scores must be [C, D, H, W]; got shape {list(scores.shape)}")
    if scores.shape[0] > 256:
        raise SlidingWindowError(f"{scores.shape[0]} channels do not fit uint8 labels")
    if out is None:
        out = np.empty(scores.shape[1:], np.uint8)
    if scores.shape[0] == 1:
        np.greater(scores[0], 0.5, out=out, casting="unsafe")
    else:
        out[...] = np.argmax(scores, axis=0)
    return out


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows cover ``shape`` (for logs and tests)."""
    steps = scan_interval(shape, roi, overlap)
    return math.prod(len(window_starts(s, w, t)) for s, w, t in zip(shape, roi, steps))
