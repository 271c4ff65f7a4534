"""A real Triton Inference Server on CPU for the tests, from the ``nvidia-pytriton`` wheel.

``nvidia-pytriton`` bundles a ``tritonserver`` binary that runs on CPU with the python backend
only. What it needs (see ../shared/reference/machine-notes.md, "A real Triton server on CPU"):

1. its own venv with numpy < 2, built once and cached under ``~/.cache/dataflow/`` (or
   ``$DATAFLOW_TRITON_VENV``), keyed by a hash of the requirements and the Python version;
2. ``LD_LIBRARY_PATH`` with the venv Python's libpython folder and the wheel's
   ``nvidia_pytriton.libs``; the venv's ``bin`` first on ``PATH``; the python backend stub of
   this Python version copied next to the backend (PyTriton does that itself when it runs);
3. a classic model repository (``config.pbtxt`` + ``1/model.py``, ``KIND_CPU``).

The model served is the very ONNX file the test gives, run by onnxruntime inside the python
backend, so its answers can be compared with the embedded backend's. The server listens on
127.0.0.1 only, on free ports, and stops with SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from deadlines import HANG

__all__ = ["REQUIREMENTS", "TritonServer", "build_venv", "model_repository", "run_server"]

REQUIREMENTS = ("numpy<2", "nvidia-pytriton==0.7.0", "onnxruntime>=1.17")
PY = f"{sys.version_info.major}.{sys.version_info.minor}"

MODEL_PY = """\
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(os.path.dirname(__file__), "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "{input}").as_numpy()
            (y,) = self.session.run(["{output}"], {{"{input}": np.ascontiguousarray(x)}})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("{output}", y)]))
        return responses
"""

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "{input}" data_type: TYPE_FP32 dims: [ {in_dims} ] }} ]
output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ {out_dims} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def venv_path() -> Path:
    if os.environ.get("DATAFLOW_TRITON_VENV"):
        return Path(os.environ["DATAFLOW_TRITON_VENV"])
    key = hashlib.sha256("\n".join((PY, *REQUIREMENTS)).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "dataflow" / f"triton-venv-{key}"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PY}" / "site-packages"


_SETNS = """\
import ctypes, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
    why = os.strerror(ctypes.get_errno())
    sys.exit("cannot enter the network namespace %s: %s" % (sys.argv[1], why))
os.close(fd)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_network(argv: list[str]) -> list[str]:
    """``argv`` run in the network namespace pytest was started from, when the session moved
    into a private one (tests/conftest.py does, loopback only): pip must reach the registry."""
    parent = f"/proc/{os.getppid()}/ns/net"
    try:
        if os.readlink("/proc/self/ns/net") == os.readlink(parent):
            return argv
    except OSError:
        return argv
    return [sys.executable, "-c", _SETNS, parent, *argv]


def build_venv() -> tuple[Path, float]:
    """The cached venv (built now if missing); returns (path, seconds spent building).

    A pip failure raises RuntimeError with pip's output: the tests fail loudly, never skip."""
    venv = venv_path()
    done = venv / ".dataflow-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        if done.exists():
            return venv, 0.0
        t0 = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            _with_network(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *REQUIREMENTS]
            ),
        ]
        for argv in steps:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
            if run.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise RuntimeError(
                    f"building the Triton test venv failed: {' '.join(argv[-6:])}\n"
                    "(to build it beforehand: python tests/integration/triton_server.py)\n"
                    f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
                )
        server = _site_packages(venv) / "pytriton" / "tritonserver"
        stub = server / "python_backend_stubs" / PY / "triton_python_backend_stub"
        if not stub.is_file():
            raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {PY}")
        shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
        done.write_text("\n".join(REQUIREMENTS) + "\n")
        return venv, time.monotonic() - t0


def model_repository(
    root: Path, name: str, onnx_file: Path, *, input: str, output: str, in_dims, out_dims
) -> Path:
    """A model repository serving ``onnx_file`` as model ``name`` (python backend, CPU)."""
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx_file, version / "model.onnx")
    (version / "model.py").write_text(MODEL_PY.format(input=input, output=output))
    (root / name / "config.pbtxt").write_text(
        CONFIG.format(
            name=name,
            input=input,
            output=output,
            in_dims=", ".join(map(str, in_dims)),
            out_dims=", ".join(map(str, out_dims)),
        )
    )
    return root


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclasses.dataclass
class TritonServer:
    http_url: str
    grpc_url: str
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def run_server(
    venv: Path, repository: Path, log: Path, timeout: float = HANG
) -> Iterator[TritonServer]:
    """Run tritonserver on ``repository`` until the block ends (SIGTERM, then SIGKILL)."""
    site = _site_packages(venv)
    server = site / "pytriton" / "tritonserver"
    python = venv / "bin" / "python"
    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (libdir, str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")) if p
    )
    env.pop("PYTHONPATH", None)
    http, grpc, metrics = _free_ports(3)
    argv = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={server / 'backends'}",
        f"--cache-directory={server / 'caches'}",
        "--http-address=127.0.0.1", f"--http-port={http}",
        "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
        "--allow-metrics=false", "--exit-timeout-secs=10",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{http}/v2/health/ready", timeout=1
                ) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:  # 400 while models load
                exc.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tritonserver not ready after {timeout} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.25)
        yield TritonServer(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=HANG)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":  # build the cached venv ahead of the tests
    path, seconds = build_venv()
    print(f"{path} ({f'built in {seconds:.0f} s' if seconds else 'already built'})")
