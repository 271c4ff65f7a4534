"""The Triton backend against a real Triton Inference Server (CPU, python backend).

The server comes from the ``nvidia-pytriton`` wheel in a venv of its own (numpy < 2), built
once and cached (see triton_server.py); it serves the demo ONNX model through onnxruntime, so
every answer must equal the embedded ONNX backend's on the same batch.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from deadlines import HANG
from triton_server import build_venv, model_repository, run_server

from dataflow.stage import Tensor
from dataflow.testing import run_stage
from operators.inference import Inference, InferenceError, OnnxBackend, sliding_window_inference
from operators.inference.demo_model import INPUT_NAME, OUTPUT_NAME, save_demo_model
from operators.inference.triton import TritonBackend, default_url

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "demo_lung"


@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory):
    return save_demo_model(tmp_path_factory.mktemp("model") / "demo.onnx")


@pytest.fixture(scope="session")
def triton(tmp_path_factory, demo_onnx):
    venv, seconds = build_venv()  # fails loudly if pip cannot get a package
    print(f"\nTriton venv {venv}: built in {seconds:.1f} s" if seconds else f"\nTriton venv {venv}")
    root = tmp_path_factory.mktemp("triton")
    repository = model_repository(
        root / "models", MODEL, demo_onnx, input=INPUT_NAME, output=OUTPUT_NAME,
        in_dims=[-1, 1, -1, -1, -1], out_dims=[-1, 2, -1, -1, -1],
    )  # fmt: skip
    t0 = time.monotonic()
    with run_server(venv, repository, root / "tritonserver.log") as server:
        print(f"tritonserver ready in {time.monotonic() - t0:.1f} s")
        yield server
    assert server.process.returncode is not None  # stopped by SIGTERM


@pytest.fixture(scope="session")
def volume():
    rng = np.random.default_rng(7)
    hu = rng.choice(np.array([-1000, -800, 40, 700], np.float32), size=(12, 20, 20))
    return hu + rng.normal(0, 20, hu.shape).astype(np.float32)


@pytest.mark.parametrize(
    ("protocol", "shared_memory"),
    [("http", "none"), ("grpc", "none"), ("http", "system"), ("grpc", "system")],
)
def test_triton_answers_equal_the_embedded_backends(triton, demo_onnx, volume, protocol,
                                                    shared_memory):  # fmt: skip
    url = triton.http_url if protocol == "http" else triton.grpc_url
    onnx = OnnxBackend(demo_onnx)
    with TritonBackend(MODEL, url=url, protocol=protocol, shared_memory=shared_memory) as remote:
        assert remote.input.name == INPUT_NAME and remote.output.shape == (-1, 2, -1, -1, -1)
        batch = np.stack([volume[None, :8, :16, :16], volume[None, 4:, 4:, 4:]])
        np.testing.assert_allclose(remote.infer(batch), onnx.infer(batch), atol=1e-6)
        windows = sliding_window_inference(volume, remote.infer, (8, 16, 16), sw_batch_size=3)
        if shared_memory == "system":
            status = remote.client.get_system_shared_memory_status()
            names = [r["name"] for r in status] if protocol == "http" else list(status.regions)
            assert sorted(r.name for r in remote._regions.values()) == sorted(names)
            assert len(names) == 2  # input and output travelled through shared memory
    expected = sliding_window_inference(volume, onnx.infer, (8, 16, 16), sw_batch_size=3)
    np.testing.assert_allclose(windows, expected, atol=1e-6)


def test_closing_unregisters_and_frees_the_regions(triton, volume):
    backend = TritonBackend(MODEL, url=triton.http_url, shared_memory="system")
    backend.infer(volume[None, None])
    backend.infer(np.concatenate([volume[None, None]] * 2))  # the regions grow
    assert len(backend.client.get_system_shared_memory_status()) == 2
    backend.close()
    with TritonBackend(MODEL, url=triton.http_url) as other:
        assert other.client.get_system_shared_memory_status() == []


def test_the_stage_uses_triton_with_clara_environment_variables(triton, volume, monkeypatch):
    monkeypatch.setenv("NVIDIA_TRITON_GRPCURI", triton.grpc_url)
    assert default_url("grpc") == triton.grpc_url
    arguments = {"backend": "triton", "protocol": "grpc", "model_name": MODEL, "roi_size": 16}
    out = run_stage(Inference, {"volume": Tensor(volume, {})}, arguments=arguments)
    local = run_stage(Inference, {"volume": volume}, arguments={"model": "demo", "roi_size": 16})
    np.testing.assert_array_equal(out["labels"], local["labels"])


def test_a_missing_model_is_named_with_the_server(triton):
    with pytest.raises(InferenceError) as info:
        TritonBackend("spleen", url=triton.http_url, timeout=1)
    message = str(info.value)
    assert f"Triton at http://{triton.http_url}" in message and "'spleen'" in message
    assert f"the server has no model 'spleen' (its models: {MODEL})" in message


def test_a_wrong_shape_is_refused_before_sending(triton):
    backend = TritonBackend(MODEL, url=triton.grpc_url, protocol="grpc")
    with backend, pytest.raises(InferenceError, match=r"does not accept a batch of shape \[1, 3"):
        backend.infer(np.zeros((1, 3, 4, 4, 4), np.float32))


def test_a_server_that_is_down_is_named_after_the_wait():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(InferenceError, match=rf"Triton at grpc://127.0.0.1:{port} did not make "
                       r"model 'demo' ready within 1 s: cannot connect"):  # fmt: skip
        TritonBackend("demo", url=f"127.0.0.1:{port}", protocol="grpc", timeout=1)
    assert 1 <= time.monotonic() - t0 < HANG  # it waited its 1 s, then gave up (no hang)


@pytest.mark.gpu
def test_cuda_shared_memory_on_a_gpu(triton, demo_onnx, volume):
    """Needs a GPU, and a Triton with CUDA support on the same machine (not on CI)."""
    with TritonBackend(MODEL, url=triton.http_url, shared_memory="cuda", device=0) as remote:
        batch = volume[None, None]
        np.testing.assert_allclose(remote.infer(batch), OnnxBackend(demo_onnx).infer(batch),
                                   atol=1e-6)  # fmt: skip
