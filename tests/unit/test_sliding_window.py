"""Sliding-window inference: MONAI's window placement, blending, padding and batching."""

from __future__ import annotations

import numpy as np
import pytest

from operators.inference.sliding_window import (
    SlidingWindowError,
    argmax_labels,
    count_windows,
    importance_map,
    scan_interval,
    sliding_window_inference,
    window_starts,
)


def pointwise(batch):
    """A voxel-wise 'model': two channels, x and 1 - x (so blending must return them exactly)."""
    assert batch.ndim == 5 and batch.shape[1] == 1
    return np.concatenate([batch, 1.0 - batch], axis=1)


def test_windows_step_by_the_overlap_and_the_last_one_ends_at_the_edge():
    assert scan_interval((100, 64, 10), (32, 64, 10), 0.25) == (24, 64, 10)
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]
    assert window_starts(32, 32, 32) == [0]
    assert window_starts(10, 32, 1) == [0]
    assert scan_interval((10,), (3,), 0.9) == (1,)  # int(3 * 0.1) == 0 -> at least 1
    assert count_windows((100, 64, 10), (32, 64, 10), 0.25) == 4


def test_gaussian_importance_is_one_at_the_centre_and_clamped_at_the_border():
    w = importance_map((9, 9, 9), "gaussian", 0.125)
    assert w.dtype == np.float32 and w.shape == (9, 9, 9)
    assert w[4, 4, 4] == pytest.approx(1.0)
    assert w.min() == pytest.approx(1e-3)  # exp(-(4 / 1.125)^2 / 2)^3 is smaller: clamped
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])
    assert (importance_map((4, 5, 6), "constant") == 1).all()
    with pytest.raises(SlidingWindowError, match="blend mode"):
        importance_map((4, 4, 4), "median")


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("batch", [1, 3, 100])
def test_blended_windows_equal_whole_volume_inference(mode, batch):
    rng = np.random.default_rng(0)
    volume = rng.random((21, 30, 17), dtype=np.float32)
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return pointwise(x)

    out = sliding_window_inference(
        volume, model, (8, 16, 16), sw_batch_size=batch, overlap=0.5, mode=mode
    )
    assert out.shape == (2, 21, 30, 17) and out.dtype == np.float32
    np.testing.assert_allclose(out, pointwise(volume[None, None])[0], atol=1e-5)
    windows = count_windows((21, 30, 17), (8, 16, 16), 0.5)
    assert sum(calls) == windows and max(calls) == min(batch, windows)


@pytest.mark.parametrize("padding_mode", ["constant", "edge"])
def test_a_volume_smaller_than_the_window_is_padded_and_cropped_back(padding_mode):
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    seen = []

    def model(x):
        seen.append(x.copy())
        return pointwise(x)

    out = sliding_window_inference(
        volume, model, 8, padding_mode=padding_mode, cval=-1.0, mode="gaussian"
    )
    np.testing.assert_allclose(out[0], volume, rtol=1e-6)
    (window,) = seen
    assert window.shape == (1, 1, 8, 8, 8)
    # padded half before, half after: 5 -> 1 + 5 + 2 along D
    np.testing.assert_array_equal(window[0, 0, 1:6, 1:7, 0:7], volume)
    border = window[0, 0, 0, 1, 0]
    assert border == (-1.0 if padding_mode == "constant" else volume[0, 0, 0])


def test_a_window_dimension_of_zero_or_minus_one_spans_the_volume():
    volume = np.zeros((4, 9, 9), np.float32)
    shapes = []

    def model(x):
        shapes.append(x.shape)
        return pointwise(x)

    sliding_window_inference(volume, model, (-1, 0, 5), overlap=0.0)
    assert {s[2:] for s in shapes} == {(4, 9, 5)}


def test_a_model_that_changes_the_window_size_is_named():
    with pytest.raises(SlidingWindowError, match=r"returned shape \[1, 2, 4, 4, 4\]"):
        sliding_window_inference(
            np.zeros((8, 8, 8), np.float32), lambda x: np.zeros((1, 2, 4, 4, 4)), 8
        )


def test_bad_settings_are_refused():
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(SlidingWindowError, match="overlap"):
        sliding_window_inference(volume, pointwise, 4, overlap=1.0)
    with pytest.raises(SlidingWindowError, match="sw_batch_size"):
        sliding_window_inference(volume, pointwise, 4, sw_batch_size=0)
    with pytest.raises(SlidingWindowError, match="3D"):
        sliding_window_inference(volume[0], pointwise, 4)
    with pytest.raises(SlidingWindowError, match="padding_mode"):
        sliding_window_inference(volume, pointwise, 16, padding_mode="reflect")


def test_argmax_labels_and_single_channel_threshold():
    scores = np.zeros((3, 2, 2, 2), np.float32)
    scores[2, 0], scores[1, 1] = 1, 1
    labels = argmax_labels(scores)
    assert labels.dtype == np.uint8 and (labels[0] == 2).all() and (labels[1] == 1).all()
    one = np.full((1, 2, 2, 2), 0.7, np.float32)
    one[0, 0] = 0.2
    np.testing.assert_array_equal(argmax_labels(one)[:, 0, 0], [0, 1])
