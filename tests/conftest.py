"""Shared test setup: markers, the GPU switch, the private network, and the leak check.

- The whole session runs in a private network namespace holding only a loopback interface,
  when it can (root, or user namespaces): servers that cannot bind 127.0.0.1 (dcmtk's
  ``storescp``, Orthanc) then listen on an interface nothing outside can reach. Tests that start
  such servers use the ``private_network`` fixture, which skips (fails under ``CI=true``)
  where the namespace could not be made. ``DATAFLOW_TEST_NETNS=0`` turns it off.
- ``gpu`` tests skip when no CUDA GPU is usable and fail under ``--require-gpu``.
- When the session ends, nothing of ours may remain: no store server process and no file of
  ours in ``/dev/shm``. A leak fails the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deadlines import HANG

SHM = Path("/dev/shm")


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_network: dict[str, str] = {}


def _enter_private_network() -> str:
    """Move this process (before any thread starts) into a new network namespace and bring
    its loopback up; '' on success, else why not. Children inherit the namespace."""
    import ctypes
    import fcntl
    import socket
    import struct

    if os.environ.get("DATAFLOW_TEST_NETNS", "1") == "0":
        return "DATAFLOW_TEST_NETNS=0"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
    return ""


def pytest_configure(config: pytest.Config) -> None:
    _network["why_not"] = _enter_private_network()


@pytest.fixture(scope="session")
def private_network() -> None:
    """The test talks to servers listening on every interface: only in the private one."""
    why = _network.get("why_not", "not set up")
    if why:
        message = f"no private network namespace for servers bound to all interfaces ({why})"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-gpu",
        action="store_true",
        help="fail (instead of skip) tests marked gpu when no GPU is usable",
    )


def gpu_available() -> tuple[bool, str]:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1 simulates kernels but cannot share device memory"
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install '.[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True, ""
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        return False, f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return False, "no CUDA device"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    ok, why = _gpu_status()
    if ok:
        return
    if item.config.getoption("--require-gpu"):
        pytest.fail(f"--require-gpu was given but {why}", pytrace=False)
    pytest.skip(why)


_gpu_cache: list[tuple[bool, str]] = []


def _gpu_status() -> tuple[bool, str]:
    if not _gpu_cache:
        _gpu_cache.append(gpu_available())
    return _gpu_cache[0]


def _our_shm_files() -> list[str]:
    if not SHM.is_dir():
        return []
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(("dataflow", "psm_df")))


def _our_server_processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "dataflow.store.server" not in cmdline:
            continue
        # Ours: owned by this session, or orphaned (a server must die with its owner).
        # Stores owned by other live processes (a benchmark running beside) are not.
        args = cmdline.split()
        owner = int(args[args.index("--owner-pid") + 1]) if "--owner-pid" in args else -1
        if owner == os.getpid() or not Path(f"/proc/{owner}").exists():
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._dataflow_shm_before = set(_our_shm_files())  # type: ignore[attr-defined]
    session.config._dataflow_procs_before = set(_our_server_processes())  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import time

    before_shm = session.config._dataflow_shm_before  # type: ignore[attr-defined]
    before_procs = session.config._dataflow_procs_before  # type: ignore[attr-defined]
    deadline = time.monotonic() + HANG
    while True:  # servers of just-finished tests may take a moment to exit (longer when busy)
        shm = set(_our_shm_files()) - before_shm
        procs = set(_our_server_processes()) - before_procs
        if not (shm or procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if shm or procs:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"/dev/shm: {name}" for name in sorted(shm)] + [f"process {p}" for p in procs]
        if reporter is not None:
            reporter.write_line("LEAK CHECK FAILED: left behind after the test session:", red=True)
            for line in lines:
                reporter.write_line("  " + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
