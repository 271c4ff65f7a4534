"""CPU kernels (operators.kernels) against NumPy / SciPy references, and their stages."""

from __future__ import annotations

import numpy as np
import pytest

from dataflow.stage import ParameterError, Tensor
from dataflow.testing import run_stage
from operators import kernels as K
from operators.image_stages import (
    ConnectedComponents,
    Crop,
    FillHoles,
    GaussianSmooth,
    Normalize,
    PaintLabels,
    Resample,
    Threshold,
    WindowLevel,
)

STRUCTURE = {6: 1, 18: 2, 26: 3}  # connectivity -> scipy generate_binary_structure rank


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def volume(rng):
    return (rng.normal(size=(7, 11, 9)) * 300).astype(np.float32)


def scipy_ndimage():
    return pytest.importorskip("scipy.ndimage")


def scipy_label(mask, connectivity):
    ndi = scipy_ndimage()
    labels, n = ndi.label(mask, ndi.generate_binary_structure(3, STRUCTURE[connectivity]))
    return labels, n


# ------------------------------------------------------------------ window / level, normalise


def test_window_level_matches_numpy(volume):
    out = K.window_level(volume, 40.0, 400.0)
    expected = np.clip((volume.astype(np.float64) + 160.0) / 400.0, 0.0, 1.0)
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0


def test_window_level_writes_into_out_converts_types_and_keeps_nan(volume):
    out = np.empty(volume.shape, np.float32)
    assert K.window_level(volume, 0.0, 2.0, out=out) is out
    ints = np.array([[[-5, 0, 1, 5]]], np.int16)
    np.testing.assert_array_equal(K.window_level(ints, 0.0, 2.0), [[[0.0, 0.5, 1.0, 1.0]]])
    nan = K.window_level(np.array([[[np.nan, 0.0]]], np.float32), 0.0, 2.0)
    assert np.isnan(nan[0, 0, 0]) and nan[0, 0, 1] == 0.5


def test_window_level_rejects_bad_width_out_and_shape(volume):
    with pytest.raises(K.KernelValueError, match="width must be positive"):
        K.window_level(volume, 0.0, 0.0)
    with pytest.raises(K.KernelValueError, match=r"out must be float32 \[7, 11, 9\]"):
        K.window_level(volume, 0.0, 1.0, out=np.empty(volume.shape, np.float64))
    with pytest.raises(K.KernelValueError, match="3-D"):
        K.window_level(volume[0], 0.0, 1.0)


def test_normalize_zscore_and_minmax_match_numpy(volume):
    v = volume.astype(np.float64)
    np.testing.assert_allclose(K.normalize(volume), (v - v.mean()) / v.std(), atol=1e-6)
    expected = (v - v.min()) / (v.max() - v.min())
    np.testing.assert_allclose(K.normalize(volume, "minmax"), expected, atol=1e-7)


def test_normalize_constant_empty_and_bad_method():
    constant = np.full((2, 3, 4), 7.0, np.float32)
    assert not K.normalize(constant).any()
    assert not K.normalize(constant, "minmax").any()
    assert K.normalize(np.zeros((0, 3, 4), np.float32)).shape == (0, 3, 4)
    with pytest.raises(K.KernelValueError, match="'zscore' or 'minmax'"):
        K.normalize(constant, "l2")


# ------------------------------------------------------------------ threshold


def test_threshold_is_exact_with_inclusive_and_open_bounds(volume):
    np.testing.assert_array_equal(
        K.threshold(volume, -100, 200), ((volume >= -100) & (volume <= 200)).astype(np.uint8)
    )
    np.testing.assert_array_equal(K.threshold(volume, lower=0), (volume >= 0).astype(np.uint8))
    np.testing.assert_array_equal(K.threshold(volume, upper=0), (volume <= 0).astype(np.uint8))
    assert K.threshold(volume).all()
    edges = np.array([[[1.0, 2.0, 3.0, np.nan]]], np.float32)
    np.testing.assert_array_equal(K.threshold(edges, 1.0, 2.0), [[[1, 1, 0, 0]]])
    assert K.threshold(volume, 0).dtype == np.uint8


def test_threshold_rejects_inverted_bounds(volume):
    with pytest.raises(K.KernelValueError, match="lower <= upper"):
        K.threshold(volume, 5, 1)


# ------------------------------------------------------------------ resampling


@pytest.mark.parametrize(
    ("n", "spacing", "target", "expected"),
    [
        (10, 1.0, 0.5, 19),  # extent 9 mm kept exactly
        (10, 1.0, 3.0, 4),  # 0, 3, 6, 9 mm
        (10, 1.0, 4.0, 3),  # 0, 4, 8 mm: extent shrinks by 1 mm < one output voxel
        (11, 0.3, 0.1, 31),  # 10 * 0.3 / 0.1 = 29.999999...: still 31 samples
        (1, 2.0, 0.5, 1),  # a single voxel stays a single voxel
    ],
)
def test_resample_shape_convention(n, spacing, target, expected):
    assert K.resample_shape((n, 1, 1), (spacing, 1, 1), (target, 1, 1))[0] == expected


def test_resample_to_the_same_spacing_is_the_identity(volume):
    np.testing.assert_array_equal(K.resample(volume, (2.0, 0.7, 0.9), (2.0, 0.7, 0.9)), volume)


def test_resample_reproduces_a_linear_field_exactly():
    spacing, target = (2.5, 0.8, 1.1), (1.0, 1.3, 0.45)
    idx = np.indices((6, 9, 8), dtype=np.float64)
    z, y, x = (i * s for i, s in zip(idx, spacing))  # mm from the first voxel centre
    field = (3.0 * z - 2.0 * y + 0.5 * x + 10).astype(np.float32)
    out = K.resample(field, spacing, target)
    assert out.shape == K.resample_shape(field.shape, spacing, target) == (13, 5, 18)
    zz, yy, xx = (i * t for i, t in zip(np.indices(out.shape, dtype=np.float64), target))
    np.testing.assert_allclose(out, 3.0 * zz - 2.0 * yy + 0.5 * xx + 10, rtol=1e-5, atol=1e-4)


def test_resample_matches_scipy_trilinear(volume):
    ndi = scipy_ndimage()
    spacing, target = (2.0, 0.7, 0.9), (1.0, 1.0, 0.5)
    out = K.resample(volume, spacing, target)
    coords = np.meshgrid(
        *(np.arange(m) * (t / s) for m, s, t in zip(out.shape, spacing, target)), indexing="ij"
    )
    expected = ndi.map_coordinates(volume.astype(np.float64), coords, order=1, mode="nearest")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_resample_single_voxel_and_bad_arguments():
    one = np.full((1, 1, 1), 3.0, np.float32)
    np.testing.assert_array_equal(K.resample(one, 1.0, 0.25), one)
    with pytest.raises(K.KernelValueError, match="cannot resample a volume of shape"):
        K.resample(np.zeros((0, 2, 2), np.float32), 1.0, 1.0)
    with pytest.raises(K.KernelValueError, match="target spacing must be finite and positive"):
        K.resample(one, 1.0, (1.0, 0.0, 1.0))


# ------------------------------------------------------------------ Gaussian


@pytest.mark.parametrize(
    ("sigma", "spacing"),
    [(1.0, (1.0, 1.0, 1.0)), (1.5, (3.0, 0.7, 0.8)), ((2.0, 0.0, 0.9), (2.0, 1.0, 0.5))],
)
def test_gaussian_matches_scipy(volume, sigma, spacing):
    ndi = scipy_ndimage()
    out = K.gaussian_smooth(volume, sigma, spacing)
    sigma_vox = np.broadcast_to(np.asarray(sigma, float), 3) / np.asarray(spacing)
    expected = ndi.gaussian_filter(volume, sigma_vox, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_gaussian_edge_cases(volume):
    constant = np.full((3, 4, 5), 2.5, np.float32)
    np.testing.assert_allclose(K.gaussian_smooth(constant, 2.0), constant, rtol=1e-6)
    np.testing.assert_array_equal(K.gaussian_smooth(volume, 0.0), volume)  # no pass: a copy
    one = np.full((1, 1, 1), 4.0, np.float32)
    np.testing.assert_allclose(K.gaussian_smooth(one, 3.0), one, rtol=1e-6)
    assert K.gaussian_smooth(np.zeros((0, 4, 4), np.float32), 1.0).shape == (0, 4, 4)
    with pytest.raises(K.KernelValueError, match="sigma must be finite and non-negative"):
        K.gaussian_smooth(volume, -1.0)


@pytest.mark.parametrize("chunks", [1, 3, 40])  # 40: more chunks than slices
def test_gaussian_fused_sweep_is_the_three_passes_bit_for_bit(rng, chunks):
    from operators.kernels import _common, cpu

    volume = (rng.standard_normal((11, 17, 23)) * 300).astype(np.float32)
    plan = _common.gaussian_plan(1.0, (1.25, 0.7, 0.6))
    assert [axis for axis, _ in plan] == [0, 1, 2]
    src = volume
    for (_, weights), f in zip(plan, (cpu.gaussian_axis0, cpu.gaussian_axis1, cpu.gaussian_axis2)):
        dst = np.empty_like(volume)
        f(src, weights, dst)
        src = dst
    fused = np.empty_like(volume)
    cpu.gaussian_fused(volume, *(w for _, w in plan), chunks, fused)
    np.testing.assert_array_equal(fused, src)
    np.testing.assert_array_equal(K.gaussian_smooth(volume, 1.0, (1.25, 0.7, 0.6)), src)


# ------------------------------------------------------------------ connected components


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("density", [0.15, 0.35, 0.6])
def test_label_matches_scipy_exactly(rng, connectivity, density):
    mask = (rng.random((9, 13, 11)) < density).astype(np.uint8)
    labels, n = K.label(mask, connectivity)
    expected, expected_n = scipy_label(mask, connectivity)
    assert n == expected_n
    np.testing.assert_array_equal(labels, expected)  # same numbering: raster order


def test_label_structured_connectivities():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # corner neighbours
    mask[3, 2, 3] = mask[3, 3, 2] = 1  # edge neighbours
    mask[2, 0, 3] = mask[3, 0, 3] = 1  # face neighbours
    assert K.label(mask, 6)[1] == 5
    assert K.label(mask, 18)[1] == 4
    labels, n = K.label(mask, 26)
    assert n == 3 and labels[1, 1, 1] == labels[0, 0, 0] == 1 and labels.dtype == np.int32


def test_label_spiral_joins_across_slabs():
    """One component that snakes through every plane and back (stresses the slab seams)."""
    mask = np.zeros((16, 5, 5), np.uint8)
    mask[:, 0, 0] = 1
    mask[:, 4, 4] = 1
    mask[15, :, 0] = mask[15, 4, :] = 1
    assert K.label(mask, 6)[1] == 1
    mask[15, 2, 0] = 0
    assert K.label(mask, 6)[1] == 2


def test_label_empty_full_single_and_bool_input():
    labels, n = K.label(np.zeros((3, 4, 5), np.uint8))
    assert n == 0 and not labels.any()
    labels, n = K.label(np.ones((3, 4, 5), bool), 6)
    assert n == 1 and (labels == 1).all()
    assert K.label(np.ones((1, 1, 1), np.uint8))[1] == 1
    assert K.label(np.zeros((0, 4, 5), np.uint8))[1] == 0
    with pytest.raises(K.KernelValueError, match="connectivity must be one of"):
        K.label(np.ones((1, 1, 1), np.uint8), 8)


def _body_with_lungs(rng):
    """One giant component (a body: an elliptic cylinder through every slice) holding two
    cavities (lungs) and a few specks, and the air around it: the shapes label, keep-largest
    and fill_holes meet in a CT."""
    z, y, x = np.mgrid[0:23, 0:41, 0:37]
    body = ((y - 20) / 17.0) ** 2 + ((x - 18) / 15.0) ** 2 <= 1.0
    for cx in (11, 25):
        body &= ~((((y - 20) / 8.0) ** 2 + ((x - cx) / 4.5) ** 2 <= 1.0) & (z > 2) & (z < 20))
    mask = body.astype(np.uint8)
    mask[rng.random(mask.shape) < 0.01] ^= 1  # specks, and pinholes in the body
    return mask


def _shapes(rng):
    checker = (np.indices((6, 7, 8)).sum(axis=0) % 2).astype(np.uint8)  # many tiny parts
    diagonal = np.zeros((9, 9, 9), np.uint8)
    diagonal[np.arange(9), np.arange(9), np.arange(9)] = 1  # joined only through corners
    staircase = np.zeros((3, 4, 12), np.uint8)  # runs that meet end to start along x
    for row in range(4):
        staircase[row % 3, row, 3 * row : 3 * row + 3] = 1
    return {
        "body": _body_with_lungs(rng),
        "checkerboard": checker,
        "diagonal": diagonal,
        "staircase": staircase,
        "row along x": np.ones((1, 1, 50), np.uint8),
        "column along z": np.ones((50, 1, 1), np.uint8),
        "dashed column": (np.arange(40) % 3 != 0).astype(np.uint8).reshape(40, 1, 1),
        "thin sheet": np.pad(np.ones((30, 1, 9), np.uint8), 1),
        "empty": np.zeros((5, 6, 7), np.uint8),
        "full": np.ones((5, 6, 7), np.uint8),
    }


SHAPES = list(_shapes(np.random.default_rng(0)))


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("shape", SHAPES)
def test_label_components_and_holes_match_scipy_on_shapes(shape, connectivity):
    """Labels numbered as scipy's (raster order), connected_components' sizes and fill_holes
    exactly as scipy's, on one giant component, many tiny ones, thin shapes, empty and full."""
    ndi = scipy_ndimage()
    mask = _shapes(np.random.default_rng(0))[shape]
    labels, n = K.label(mask, connectivity)
    expected, expected_n = scipy_label(mask, connectivity)
    assert n == expected_n
    np.testing.assert_array_equal(labels, expected)
    sizes = np.bincount(expected.ravel(), minlength=n + 1)
    if n:
        largest = (expected == int(np.argmax(sizes[1:])) + 1).astype(np.uint8)
        got = K.connected_components(mask, connectivity, keep_largest=True)
        np.testing.assert_array_equal(got, largest)
    kept = np.isin(expected, np.flatnonzero(sizes[1:] >= 2) + 1).astype(np.uint8)
    np.testing.assert_array_equal(K.connected_components(mask, connectivity, min_size=2), kept)
    structure = ndi.generate_binary_structure(3, STRUCTURE[connectivity])
    want = ndi.binary_fill_holes(mask, structure=structure).astype(np.uint8)
    np.testing.assert_array_equal(K.fill_holes(mask, connectivity), want)


def test_label_counts_runs_meeting_at_a_corner_by_connectivity():
    """Two runs of one plane that meet only diagonally (end of one, start of the next) are one
    component with 18 and 26, two with 6; runs in planes that are diagonal in (z, y) are
    one with 26 only."""
    mask = np.zeros((2, 2, 6), np.uint8)
    mask[0, 0, 0:3] = 1
    mask[0, 1, 3:6] = 1
    assert [K.label(mask, k)[1] for k in (6, 18, 26)] == [2, 1, 1]
    mask = np.zeros((2, 2, 6), np.uint8)
    mask[0, 0, 0:3] = 1
    mask[1, 1, 3:6] = 1
    assert [K.label(mask, k)[1] for k in (6, 18, 26)] == [2, 2, 1]
    mask[1, 1, 2] = 1  # now they share x = 2 across the (dz, dy) diagonal: an edge
    assert [K.label(mask, k)[1] for k in (6, 18, 26)] == [2, 1, 1]


@pytest.mark.parametrize("connectivity", [6, 26])
def test_connected_components_keep_largest_and_min_size(rng, connectivity):
    mask = (rng.random((10, 12, 14)) < 0.3).astype(np.uint8)
    labels, n = scipy_label(mask, connectivity)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    largest = K.connected_components(mask, connectivity, keep_largest=True)
    best = int(np.argmax(sizes[1:])) + 1
    np.testing.assert_array_equal(largest, (labels == best).astype(np.uint8))
    kept = K.connected_components(mask, connectivity, min_size=3)
    np.testing.assert_array_equal(kept, np.isin(labels, np.flatnonzero(sizes >= 3)[1:]))
    assert kept.dtype == np.uint8
    nothing = K.connected_components(mask, connectivity, keep_largest=True, min_size=10**6)
    assert not nothing.any()


def test_connected_components_tie_keeps_the_first_in_raster_order():
    mask = np.zeros((2, 3, 7), np.uint8)
    mask[1, 2, 4:6] = 1
    mask[0, 0, 0:2] = 1
    out = K.connected_components(mask, 6, keep_largest=True)
    np.testing.assert_array_equal(np.argwhere(out), [[0, 0, 0], [0, 0, 1]])
    assert not K.connected_components(np.zeros((2, 2, 2), np.uint8), keep_largest=True).any()


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("density", [0.3, 0.6])
def test_fill_holes_matches_scipy(rng, connectivity, density):
    from scipy import ndimage

    mask = (rng.random((9, 11, 13)) < density).astype(np.uint8)
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    want = ndimage.binary_fill_holes(mask, structure=structure).astype(np.uint8)
    got = K.fill_holes(mask, connectivity)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_fill_holes_fills_a_closed_shell_and_not_an_open_one():
    shell = np.ones((5, 5, 5), np.uint8)
    shell[1:4, 1:4, 1:4] = 0
    shell[0] = 0  # the outside: the first slice is background touching the border
    shell[1, :, :] = 1
    assert K.fill_holes(shell).sum() == 4 * 25
    opened = shell.copy()
    opened[2, 2, 0] = 0  # a tunnel from the cavity to the border
    np.testing.assert_array_equal(K.fill_holes(opened), opened)
    assert K.fill_holes(np.zeros((0, 3, 3), np.uint8)).shape == (0, 3, 3)


# ------------------------------------------------------------------ dispatch and warm-up


def test_small_inputs_run_on_one_thread_and_the_callers_threads_are_restored(monkeypatch, rng):
    """Below SERIAL_BELOW_VOXELS a kernel runs on one Numba thread (short kernels of stages
    running at once on few cores were slower on two); the result is the same either way and
    the caller's thread count is back afterwards, also when the kernel raises."""
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads()
    seen = K._threads_by_size(lambda x: numba.get_num_threads())
    small = np.zeros(K.SERIAL_BELOW_VOXELS - 1, np.uint8)
    assert seen(small) == 1 and numba.get_num_threads() == threads
    assert seen(np.zeros(K.SERIAL_BELOW_VOXELS, np.uint8)) == threads
    mask = (rng.random((12, 20, 24)) < 0.4).astype(np.uint8)
    serial = K.label(mask, 26), K.fill_holes(mask), K.connected_components(mask, keep_largest=True)
    monkeypatch.setattr(K, "SERIAL_BELOW_VOXELS", 0)
    parallel = (
        K.label(mask, 26),
        K.fill_holes(mask),
        K.connected_components(mask, keep_largest=True),
    )
    np.testing.assert_array_equal(serial[0][0], parallel[0][0])
    np.testing.assert_array_equal(serial[1], parallel[1])
    np.testing.assert_array_equal(serial[2], parallel[2])
    monkeypatch.undo()
    with pytest.raises(K.KernelValueError):
        K.label(mask, 26, out=np.empty((1, 1, 1), np.int32))
    assert numba.get_num_threads() == threads


def test_device_argument(volume):
    with pytest.raises(K.KernelValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        K.threshold(volume, 0, device="gpu")
    np.testing.assert_array_equal(K.threshold(volume, 0, device="cpu"), K.threshold(volume, 0))
    if not K.cuda_available():
        with pytest.raises(K.KernelValueError, match="no CUDA GPU is usable"):
            K.threshold(volume, 0, device="cuda")


def test_warmup_compiles_named_kernels():
    times = K.warmup("threshold", "window_level")
    assert set(times) == {"threshold", "window_level"} and all(t >= 0 for t in times.values())
    with pytest.raises(K.KernelValueError, match="unknown kernel"):
        K.warmup("sharpen")


# ------------------------------------------------------------------ stages


GEOMETRY = {
    "spacing": [2.5, 0.8, 0.8],
    "origin": [-120.0, -140.5, 30.0],
    "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    "axes": "DHW",
    "modality": "CT",
    "sop_instance_uids": [f"1.2.3.{i}" for i in range(7)],
}


def test_window_level_and_normalize_stages(volume):
    out = run_stage(WindowLevel, {"volume": volume}, arguments={"center": 0, "width": 600})
    np.testing.assert_array_equal(out["volume"], K.window_level(volume, 0, 600))
    out = run_stage(Normalize, {"volume": volume}, arguments={"method": "minmax"})
    np.testing.assert_array_equal(out["volume"], K.normalize(volume, "minmax"))
    with pytest.raises(ParameterError, match="method must be 'zscore' or 'minmax'"):
        run_stage(Normalize, {"volume": volume}, arguments={"method": "l1"})
    with pytest.raises(ParameterError, match="width must be positive"):
        run_stage(WindowLevel, {"volume": volume}, arguments={"width": 0})


def test_resample_stage_updates_spacing_and_keeps_geometry(volume):
    out = run_stage(
        Resample, {"volume": Tensor(volume, dict(GEOMETRY))}, arguments={"spacing": [1.0, 1.6, 1.6]}
    )["volume"]
    assert isinstance(out, Tensor)
    expected = K.resample(volume, GEOMETRY["spacing"], (1.0, 1.6, 1.6))
    np.testing.assert_array_equal(out.array, expected)
    assert out.array.shape == (16, 6, 5)
    assert out.metadata["spacing"] == [1.0, 1.6, 1.6]
    for key in ("origin", "direction", "axes", "modality"):
        assert out.metadata[key] == GEOMETRY[key]
    assert "sop_instance_uids" not in out.metadata  # 7 slices became 16


def test_resample_stage_keeps_slice_uids_when_slices_stay_and_needs_spacing(volume):
    out = run_stage(
        Resample, {"volume": Tensor(volume, dict(GEOMETRY))}, arguments={"spacing": [2.5, 1, 1]}
    )["volume"]
    assert (
        out.array.shape[0] == 7
        and out.metadata["sop_instance_uids"] == GEOMETRY["sop_instance_uids"]
    )
    with pytest.raises(K.KernelValueError, match="input 'volume' has no 'spacing' metadata"):
        run_stage(Resample, {"volume": volume})
    with pytest.raises(ParameterError, match="spacing must be finite and positive"):
        run_stage(Resample, {"volume": volume}, arguments={"spacing": 0})


def test_gaussian_stage_uses_the_spacing_metadata(volume):
    out = run_stage(
        GaussianSmooth, {"volume": Tensor(volume, dict(GEOMETRY))}, arguments={"sigma": 2.0}
    )["volume"]
    np.testing.assert_array_equal(out, K.gaussian_smooth(volume, 2.0, GEOMETRY["spacing"]))
    plain = run_stage(GaussianSmooth, {"volume": volume}, arguments={"sigma": [1.0, 0, 1.0]})
    np.testing.assert_array_equal(plain["volume"], K.gaussian_smooth(volume, (1.0, 0, 1.0)))


def test_threshold_and_connected_components_stages(volume):
    mask = run_stage(Threshold, {"volume": volume}, arguments={"lower": 100})["mask"]
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (volume >= 100).astype(np.uint8))
    out = run_stage(
        ConnectedComponents, {"mask": mask}, arguments={"connectivity": 6, "keep_largest": True}
    )["mask"]
    np.testing.assert_array_equal(out, K.connected_components(mask, 6, keep_largest=True))
    out = run_stage(
        ConnectedComponents, {"mask": mask}, arguments={"keep_largest": False, "min_size": 2}
    )["mask"]
    np.testing.assert_array_equal(out, K.connected_components(mask, 26, min_size=2))
    with pytest.raises(ParameterError, match="connectivity must be one of"):
        run_stage(ConnectedComponents, {"mask": mask}, arguments={"connectivity": 4})
    with pytest.raises(ParameterError, match="lower .* must not exceed upper"):
        run_stage(Threshold, {"volume": volume}, arguments={"lower": 2, "upper": 1})


@pytest.mark.parametrize("within", [None, 1])
def test_paint_labels_is_the_numpy_formulation(rng, within):
    labels = rng.integers(0, 4, (9, 13, 17), dtype=np.uint8)
    mask = rng.integers(0, 3, labels.shape, dtype=np.uint8)  # nonzero is set, not only 1
    where = mask != 0
    if within is not None:
        where &= labels == within
    expected = labels.copy()
    expected[where] = 5
    np.testing.assert_array_equal(K.paint_labels(labels, mask, 5, within), expected)
    in_place = labels.copy()
    K.paint_labels(in_place, mask, 5, within, out=in_place)
    np.testing.assert_array_equal(in_place, expected)
    with pytest.raises(K.KernelValueError, match="labels must be uint8"):
        K.paint_labels(labels.astype(np.int16), mask, 5)


def test_value_counts_is_numpys_bincount(rng):
    labels = rng.integers(0, 7, (9, 13, 17), dtype=np.uint8)
    labels[0, 0, 0] = 255
    np.testing.assert_array_equal(
        K.value_counts(labels), np.bincount(labels.ravel(), minlength=256)
    )
    assert K.value_counts(np.zeros((0, 3, 3), np.uint8)).sum() == 0
    with pytest.raises(K.KernelValueError, match="needs uint8"):
        K.value_counts(labels.astype(np.int16))


def test_fill_holes_stage_and_paint_labels_build_a_label_map():
    body = np.zeros((5, 7, 7), np.uint8)
    body[1:4, 1:6, 1:6] = 1
    body[2, 2:5, 2:5] = 0  # a cavity: the "lung"
    filled = run_stage(FillHoles, {"mask": body})["mask"]
    np.testing.assert_array_equal(filled, K.fill_holes(body))
    low = (body == 0).astype(np.uint8)  # the cavity and the air outside
    labels = run_stage(
        PaintLabels,
        {"labels": filled, "mask": low},
        arguments={"value": 2, "within": 1},
    )["labels"]
    expected = filled.copy()
    expected[2, 2:5, 2:5] = 2  # only inside the body: the air outside stays 0
    np.testing.assert_array_equal(labels, expected)
    everywhere = run_stage(PaintLabels, {"labels": filled, "mask": low}, arguments={"value": 7})
    assert (everywhere["labels"][low == 1] == 7).all()
    with pytest.raises(ParameterError, match="value must be in 0..255"):
        run_stage(PaintLabels, {"labels": body, "mask": body}, arguments={"value": 300})
    with pytest.raises(K.KernelValueError, match="does not match labels"):
        run_stage(PaintLabels, {"labels": body, "mask": body[:2]}, arguments={"value": 1})
    with pytest.raises(ParameterError, match="connectivity must be one of"):
        run_stage(FillHoles, {"mask": body}, arguments={"connectivity": 4})


def _voxel_points(meta, shape):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    direction = np.asarray(meta["direction"], float).reshape(3, 3)
    return np.asarray(meta["origin"]) + (index * np.asarray(meta["spacing"])) @ direction.T


def test_crop_keeps_every_voxel_at_its_patient_position():
    from operators.dicom.phantom import OBLIQUE_ROTATION, hu_at

    direction = OBLIQUE_ROTATION.copy()
    direction[:, 0] = np.cross(direction[:, 2], direction[:, 1])  # a DICOM-like reflection
    meta = {**GEOMETRY, "direction": direction.reshape(-1).tolist(), "spacing": [9.0, 7.0, 6.0]}
    shape = (7, 30, 40)
    volume = hu_at(_voxel_points(meta, shape)).astype(np.float32)
    out = run_stage(
        Crop,
        {"volume": Tensor(volume, meta)},
        arguments={"start": [2, 5, -30], "stop": [6, 99, -3]},
    )["volume"]
    assert out.array.shape == (4, 25, 27)
    np.testing.assert_array_equal(out.array, volume[2:6, 5:, 10:37])
    np.testing.assert_array_equal(hu_at(_voxel_points(out.metadata, out.array.shape)), out.array)
    assert out.metadata["sop_instance_uids"] == GEOMETRY["sop_instance_uids"][2:6]
    assert (
        out.metadata["spacing"] == meta["spacing"]
        and out.metadata["direction"] == meta["direction"]
    )
    with pytest.raises(K.KernelValueError, match="leaves nothing of the volume"):
        run_stage(Crop, {"volume": volume}, arguments={"start": [5, 0, 0], "stop": [5, 9, 9]})
    with pytest.raises(ParameterError, match="start must be three integers"):
        run_stage(Crop, {"volume": volume}, arguments={"start": [1, 2]})
