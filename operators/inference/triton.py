"""A Triton Inference Server backend with ``tritonclient``: HTTP or gRPC, shared memory.

The server and model are named as in Clara: ``url`` (``host:port``, with or without
``http://``) defaults to ``NVIDIA_TRITON_HTTPURI`` (``protocol: http``) or
``NVIDIA_TRITON_GRPCURI`` (``protocol: grpc``) when set, else ``127.0.0.1:8000`` / ``:8001``.
Connecting waits up to ``timeout`` seconds for the server and the model to be ready, then fails
naming both.

Tensors travel in the request (``shared_memory: none``), through **system shared memory**
(``system``; what ``auto`` picks when the server is on this host: 127.0.0.1, localhost, this
host's name), or through **CUDA shared memory** on ``device`` (``cuda``; needs a GPU, the server
on the same machine, and ``cuda-python`` for tritonclient's CUDA helpers). Regions are created
for a batch, grown when a larger one comes, and unregistered and freed by ``close``.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from typing import Any

import numpy as np

from operators.inference.backends import Backend, InferenceError, TensorInfo, check_batch, pick

__all__ = ["PROTOCOLS", "SHARED_MEMORY", "TritonBackend", "default_url"]

PROTOCOLS = ("http", "grpc")
SHARED_MEMORY = ("auto", "none", "system", "cuda")
ENV_URL = {"http": "NVIDIA_TRITON_HTTPURI", "grpc": "NVIDIA_TRITON_GRPCURI"}
DEFAULT_PORT = {"http": 8000, "grpc": 8001}
_TO_NUMPY = {
    "FP32": "float32", "FP16": "float16", "FP64": "float64", "UINT8": "uint8", "INT8": "int8",
    "INT16": "int16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
}  # fmt: skip
_regions = itertools.count()
_UNREGISTER_WAIT = 10.0  # seconds: how long a region in use is asked for again


def default_url(protocol: str) -> str:
    """``NVIDIA_TRITON_HTTPURI`` / ``NVIDIA_TRITON_GRPCURI`` if set, else 127.0.0.1:800x."""
    return os.environ.get(ENV_URL[protocol]) or f"127.0.0.1:{DEFAULT_PORT[protocol]}"


def _strip(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    return url.rstrip("/")


def _is_local(host: str) -> bool:
    if host in ("127.0.0.1", "localhost", "::1", "[::1]", socket.gethostname()):
        return True
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


class _Region:
    """A shared-memory region registered with the server (system or CUDA)."""

    def __init__(self, backend: TritonBackend, role: str, size: int) -> None:
        self.backend, self.size = backend, size
        self.name = f"dataflow_{os.getpid()}_{next(_regions)}_{role}"
        client = backend.client
        if backend.shared_memory == "system":
            from tritonclient.utils import shared_memory as shm

            self.key = f"/{self.name}"
            self.handle = shm.create_shared_memory_region(self.name, self.key, size)
            client.register_system_shared_memory(self.name, self.key, size)
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            self.handle = cudashm.create_shared_memory_region(self.name, size, backend.device)
            raw = cudashm.get_raw_handle(self.handle)
            client.register_cuda_shared_memory(self.name, raw, backend.device, size)

    def write(self, array: np.ndarray) -> None:
        if self.backend.shared_memory == "system":
            from tritonclient.utils import shared_memory as shm
        else:
            from tritonclient.utils import cuda_shared_memory as shm
        shm.set_shared_memory_region(self.handle, [array])

    def read(self, dtype: str, shape: list[int]) -> np.ndarray:
        if self.backend.shared_memory == "system":
            from tritonclient.utils import shared_memory as shm

            return np.array(shm.get_contents_as_numpy(self.handle, np.dtype(dtype), shape))
        from tritonclient.utils import cuda_shared_memory as cudashm

        return cudashm.get_contents_as_numpy(self.handle, np.dtype(dtype), shape)

    def free(self) -> None:
        client = self.backend.client
        if self.backend.shared_memory == "system":
            unregister = client.unregister_system_shared_memory
        else:
            unregister = client.unregister_cuda_shared_memory
        # Triton counts the requests that hold a region and refuses to unregister it while
        # one does ("it is currently in use"): the last request's release can come just after
        # its response, so ask again for a while. Any other failure (the server gone) ends
        # the asking; the local region goes either way.
        deadline = time.monotonic() + _UNREGISTER_WAIT
        pause = 0.005
        while True:
            try:
                unregister(self.name)
                break
            except Exception as exc:
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        if self.backend.shared_memory == "system":
            from tritonclient.utils import shared_memory as shm
        else:
            from tritonclient.utils import cuda_shared_memory as shm
        shm.destroy_shared_memory_region(self.handle)


class TritonBackend(Backend):
    """The model ``model_name`` (version ``model_version``, '' for the server's choice) on the
    Triton server at ``url``. See the module docstring for the other arguments."""

    def __init__(
        self,
        model_name: str,
        *,
        url: str | None = None,
        protocol: str = "http",
        model_version: str = "",
        shared_memory: str = "auto",
        device: int | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InferenceError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
        if shared_memory not in SHARED_MEMORY:
            raise InferenceError(
                f"shared_memory must be one of {SHARED_MEMORY}; got {shared_memory!r}"
            )
        if not model_name:
            raise InferenceError("the triton backend needs model_name")
        self.protocol, self.model_name, self.model_version = protocol, model_name, model_version
        self.url = _strip(url or default_url(protocol))
        self.model = f"{model_name!r} at {protocol}://{self.url}"
        host = self.url.rsplit(":", 1)[0] if ":" in self.url else self.url
        if shared_memory == "auto":
            shared_memory = "system" if _is_local(host) else "none"
        if shared_memory == "cuda" and device is None:
            raise InferenceError("shared_memory 'cuda' needs a GPU (device) for the regions")
        self.shared_memory, self.device = shared_memory, device
        try:
            if protocol == "http":
                import tritonclient.http as client_module
            else:
                import tritonclient.grpc as client_module
        except ImportError as exc:
            raise InferenceError(
                f"the triton backend needs tritonclient[{protocol}]: pip install 'dataflow[triton]'"
            ) from exc
        self._module = client_module
        self.client = client_module.InferenceServerClient(self.url)
        self._regions: dict[str, _Region] = {}
        self._closed = False
        try:
            self._wait_ready(timeout)
            self._read_metadata()
        except BaseException:
            self.client.close()
            raise
        self.input = pick(self.inputs, input_name, "input", self.model)
        self.output = pick(self.outputs, output_name, "output", self.model)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        problem = "no answer"
        while True:
            try:
                if not self.client.is_server_ready():
                    problem = "the server is not ready"
                elif self.client.is_model_ready(self.model_name, self.model_version):
                    return
                else:
                    problem = self._model_problem()
            except Exception as exc:  # connection refused, DNS, timeouts: all mean 'not yet'
                problem = f"cannot connect ({type(exc).__name__}: {str(exc)[:200]})"
            if time.monotonic() >= deadline:
                raise InferenceError(
                    f"Triton at {self.protocol}://{self.url} did not make model "
                    f"{self.model_name!r} ready within {timeout:g} s: {problem}"
                )
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _model_problem(self) -> str:
        try:
            index = self.client.get_model_repository_index()
        except Exception:
            return "the model is not ready"
        if self.protocol == "grpc":
            entries = [{"name": m.name, "state": m.state, "reason": m.reason} for m in index.models]
        else:
            entries = index
        mine = [e for e in entries if e.get("name") == self.model_name]
        if not mine:
            names = ", ".join(sorted(str(e.get("name")) for e in entries)) or "none"
            return f"the server has no model {self.model_name!r} (its models: {names})"
        entry = mine[0]
        return f"model state {entry.get('state') or 'unknown'} {entry.get('reason') or ''}".strip()

    def _read_metadata(self) -> None:
        if self.protocol == "grpc":
            meta = self.client.get_model_metadata(self.model_name, self.model_version, as_json=True)
        else:
            meta = self.client.get_model_metadata(self.model_name, self.model_version)

        def infos(entries: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
            return tuple(
                TensorInfo(
                    e["name"],
                    _TO_NUMPY.get(e["datatype"], e["datatype"]),
                    tuple(int(d) for d in e.get("shape", [])),
                )
                for e in entries
            )

        self.inputs = infos(meta.get("inputs", []))
        self.outputs = infos(meta.get("outputs", []))

    def _region(self, role: str, size: int) -> _Region:
        region = self._regions.get(role)
        if region is not None and region.size >= size:
            return region
        if region is not None:
            region.free()
        self._regions[role] = region = _Region(self, role, size)
        return region

    def _output_bytes(self, batch: np.ndarray) -> int | None:
        """The output's size for this batch if the metadata tells it: fixed dimensions as
        given, dynamic ones as the input's (batch and spatial); None when it cannot."""
        out, inp = self.output.shape, self.input.shape
        if len(out) != len(inp):
            return None
        dims = [
            d if d != -1 else (s if i != 1 else -1)
            for i, (d, s) in enumerate(zip(out, batch.shape))
        ]
        if -1 in dims:
            return None
        return math.prod(dims) * np.dtype(self.output.dtype).itemsize

    def infer(self, batch: np.ndarray) -> np.ndarray:
        data = check_batch(batch, self.input, self.model)
        m = self._module
        datatype = next(k for k, v in _TO_NUMPY.items() if v == self.input.dtype)
        tensor = m.InferInput(self.input.name, list(data.shape), datatype)
        if self.protocol == "http":
            wanted = m.InferRequestedOutput(self.output.name, binary_data=True)
        else:
            wanted = m.InferRequestedOutput(self.output.name)
        out_region = None
        try:
            if self.shared_memory != "none":
                region = self._region("in", data.nbytes)
                region.write(data)
                tensor.set_shared_memory(region.name, data.nbytes)
                size = self._output_bytes(data)
                if size is not None:
                    out_region = self._region("out", size)
                    wanted.set_shared_memory(out_region.name, size)
            elif self.protocol == "http":
                tensor.set_data_from_numpy(data, binary_data=True)
            else:
                tensor.set_data_from_numpy(data)
            result = self.client.infer(
                self.model_name, [tensor], model_version=self.model_version, outputs=[wanted]
            )
            if out_region is None:
                return result.as_numpy(self.output.name)
            described = result.get_output(self.output.name)
            if self.protocol == "grpc":
                shape = [int(d) for d in described.shape]
            else:
                shape = [int(d) for d in described["shape"]]
            return out_region.read(self.output.dtype, shape)
        except InferenceError:
            raise
        except Exception as exc:  # InferenceServerException and transport errors
            raise InferenceError(
                f"Triton model {self.model} failed on a batch of shape {list(data.shape)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        for region in self._regions.values():
            region.free()
        self._regions.clear()
        if not self._closed:
            self._closed = True
            self.client.close()
