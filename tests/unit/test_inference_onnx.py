"""The embedded ONNX Runtime backend and the Inference stages, on models the tests build."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dataflow.stage import ParameterError, Tensor
from dataflow.testing import run_stage
from operators.dicom.phantom import LUNG_LEFT, LUNG_RIGHT, labels_at, write_ct_series
from operators.dicom.series import load_series
from operators.inference import (
    Inference,
    InferenceError,
    InferenceProbabilities,
    OnnxBackend,
    sliding_window_inference,
)
from operators.inference.demo_model import main as demo_main


def pointwise_model(path, *, shape=("N", 1, "D", "H", "W")):
    """Two channels per voxel: sigmoid(x) and sigmoid(-x) (1x1x1 convolution + Sigmoid)."""
    weight = numpy_helper.from_array(np.array([1, -1], np.float32).reshape(2, 1, 1, 1, 1), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["z"], kernel_shape=[1, 1, 1]),
            helper.make_node("Sigmoid", ["z"], ["y"]),
        ],
        "pointwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 2, *shape[2:]])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected(volume):
    s = 1.0 / (1.0 + np.exp(-volume.astype(np.float64)))
    return np.stack([s, 1.0 - s])


@pytest.fixture
def model(tmp_path):
    return pointwise_model(tmp_path / "pointwise.onnx")


def test_the_backend_describes_its_tensors(model):
    backend = OnnxBackend(model)
    assert [(i.name, i.dtype, i.shape) for i in backend.inputs] == [
        ("x", "float32", (-1, 1, -1, -1, -1))
    ]
    assert backend.outputs[0].shape == (-1, 2, -1, -1, -1)
    assert backend.providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_sliding_window_agrees_with_whole_volume_inference(model, batch, blend):
    volume = np.random.default_rng(1).normal(0, 3, (19, 33, 26)).astype(np.float32)
    backend = OnnxBackend(model)
    whole = backend.infer(volume[None, None])[0]
    windows = sliding_window_inference(
        volume, backend.infer, (8, 16, 16), sw_batch_size=batch, overlap=0.25, mode=blend
    )
    np.testing.assert_allclose(windows, whole, atol=1e-6)
    np.testing.assert_allclose(whole, expected(volume), atol=1e-6)


def test_a_volume_smaller_than_the_window_is_padded_at_the_edges(model):
    volume = np.linspace(-3, 3, 3 * 5 * 4, dtype=np.float32).reshape(3, 5, 4)
    out = sliding_window_inference(volume, OnnxBackend(model).infer, 16, padding_mode="edge")
    assert out.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(out, expected(volume), atol=1e-6)


def test_a_missing_or_broken_model_file_is_named(tmp_path):
    with pytest.raises(InferenceError, match=r"model file not found: .*nope\.onnx"):
        OnnxBackend(tmp_path / "nope.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InferenceError, match=r"cannot load ONNX model .*broken\.onnx"):
        OnnxBackend(broken)
    with pytest.raises(InferenceError, match="model file not found: nope.onnx"):
        run_stage(Inference, {"volume": np.zeros((4, 4, 4), np.float32)},
                  arguments={"model": "nope.onnx"})  # fmt: skip


def test_a_batch_of_the_wrong_shape_is_named_with_the_model(tmp_path):
    fixed = pointwise_model(tmp_path / "fixed.onnx", shape=(1, 1, 8, 8, 8))
    backend = OnnxBackend(fixed)
    with pytest.raises(InferenceError, match=r"input 'x' float32 \[1, 1, 8, 8, 8\] does not "
                       r"accept a batch of shape \[2, 1, 8, 8, 8\]"):  # fmt: skip
        backend.infer(np.zeros((2, 1, 8, 8, 8), np.float32))
    with pytest.raises(InferenceError, match=r"fixed\.onnx.*\[1, 1, 4, 4, 4\]"):
        sliding_window_inference(np.zeros((8, 8, 8), np.float32), backend.infer, 4)
    with pytest.raises(InferenceError, match="has no output 'z' \\(its outputs: 'y'\\)"):
        OnnxBackend(fixed, output_name="z")


def test_a_gpu_request_without_the_cuda_provider_falls_back_to_the_cpu(model):
    import onnxruntime as ort

    backend = OnnxBackend(model, device=0)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert backend.providers[0] == "CUDAExecutionProvider"
    else:
        assert backend.fell_back and backend.providers == ("CPUExecutionProvider",)


def test_stage_parameters_are_checked_when_the_pipeline_loads():
    with pytest.raises(ParameterError, match="backend must be one of"):
        Inference(backend="tensorflow")
    with pytest.raises(ParameterError, match="needs model_name"):
        Inference(backend="triton")
    with pytest.raises(ParameterError, match=r"overlap must be in \[0, 1\)"):
        Inference(overlap=1.5)
    with pytest.raises(ParameterError, match="blend must be one of"):
        Inference(blend="max")
    with pytest.raises(ParameterError, match="roi_size must be an int or 3 ints"):
        Inference(roi_size=[32, 32])
    assert Inference.check_parameters({"roi_size": [8, 16, 16], "sw_batch_size": "4"}) == {
        "roi_size": [8, 16, 16], "sw_batch_size": 4,
    }  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    study = write_ct_series(tmp_path_factory.mktemp("study"), slices=24, size=64).directory
    return load_series(study)


def lung_truth(meta, shape):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    direction = np.asarray(meta["direction"], float).reshape(3, 3)
    points = np.asarray(meta["origin"]) + (index * np.asarray(meta["spacing"])) @ direction.T
    return np.isin(labels_at(points), [LUNG_LEFT, LUNG_RIGHT])


def dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_the_demo_model_segments_the_phantom_lungs(phantom, tmp_path):
    volume, meta = phantom
    path = tmp_path / "demo.onnx"
    assert demo_main([str(path)]) == 0
    out = run_stage(
        Inference,
        {"volume": Tensor(volume, meta)},
        arguments={"model": str(path), "roi_size": [16, 32, 32], "sw_batch_size": 4},
    )
    labels = out["labels"]
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    assert set(np.unique(labels)) == {0, 1}
    assert dice(labels == 1, lung_truth(meta, volume.shape)) > 0.95


def test_probabilities_keep_the_geometry_and_sum_to_one(phantom):
    volume, meta = phantom
    out = run_stage(
        InferenceProbabilities,
        {"volume": Tensor(volume, meta)},
        arguments={"model": "demo", "roi_size": 32, "overlap": 0.5, "blend": "constant"},
    )
    assert isinstance(out["probabilities"], Tensor)
    probabilities, carried = out["probabilities"].array, out["probabilities"].metadata
    assert carried["channels"] == 2
    assert carried["sop_instance_uids"] == meta["sop_instance_uids"]
    assert carried["spacing"] == meta["spacing"]
    assert probabilities.shape == (2, *volume.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    lung = probabilities[1] > 0.5
    assert dice(lung, lung_truth(meta, volume.shape)) > 0.95
