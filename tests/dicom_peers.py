"""Real DICOM peers for the tests: dcmtk tools and Orthanc, started on free ports.

- Always the Debian tools by absolute path (:func:`dcmtk`): the venv's ``storescu`` and
  ``storescp`` are pynetdicom's own scripts, not dcmtk's.
- Every dcmtk and Orthanc process gets ``TCP_NODELAY=1`` (machine notes: without it each
  instance waits ~45 ms for a delayed ACK).
- ``storescp`` and Orthanc listen on every interface: start them only in tests that use the
  ``private_network`` fixture (the session's loopback-only namespace, see conftest.py).

Use::

    from dicom_peers import start_orthanc, start_storescp, storescu

    with start_storescp(tmp_path / "sink") as sink:
        storescu("127.0.0.1", sink.port, files, called=sink.aet)
        assert len(sink.files()) == len(files)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from deadlines import HANG, LONG_HANG

__all__ = [
    "DCMTK_ENV",
    "Orthanc",
    "StoreSCP",
    "dcmtk",
    "echoscu",
    "free_port",
    "start_orthanc",
    "start_storescp",
    "storescu",
    "wait_for_port",
]

DCMTK_BIN = Path("/usr/bin")
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    """The absolute path of a dcmtk tool; skips the test if dcmtk is not installed."""
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.skip(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = HANG, proc=None):
    """Until something accepts connections on ``port`` (or ``proc`` exits: an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def storescu(
    host: str,
    port: int,
    files: Iterable[str | Path],
    *,
    calling: str = "STORESCU",
    called: str = "ANY-SCP",
    extra: Sequence[str] = (),
    timeout: float = LONG_HANG,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """dcmtk ``storescu`` sending ``files`` (``-R``: only the contexts needed, so SEG and
    other SOP classes outside its default list go too)."""
    args = [dcmtk("storescu"), "-aet", calling, "-aec", called, "-R", *extra, host, str(port)]
    return subprocess.run(
        [*args, *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True,
        timeout=timeout, check=check,
    )  # fmt: skip


def echoscu(
    host: str, port: int, *, calling: str = "ECHOSCU", called: str = "ANY-SCP", extra=()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, *extra, host, str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=HANG,
    )  # fmt: skip


@dataclasses.dataclass
class StoreSCP:
    """A running dcmtk ``storescp`` writing what it receives into ``folder``."""

    port: int
    aet: str
    folder: Path
    proc: subprocess.Popen
    log: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_storescp(
    folder: str | Path,
    *,
    aet: str = "STORESCP",
    port: int | None = None,
    compressed: bool = True,
    extra: Sequence[str] = (),
) -> StoreSCP:
    """dcmtk ``storescp`` on ``port`` (free if None), accepting every storage SOP class
    (``--promiscuous``) and every transfer syntax it knows (``+xa``), or with
    ``compressed=False`` only the uncompressed ones (its default: a PACS that cannot take
    JPEG or RLE). Its verbose log is ``folder/../storescp-PORT.log``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder.parent / f"storescp-{port}.log"
    accept = ["+xa"] if compressed else []
    args = [dcmtk("storescp"), "-aet", aet, "-od", str(folder), "-pm", *accept, "-v", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen([*args, str(port)], env=DCMTK_ENV, stdout=out, stderr=out)
    wait_for_port(port, proc=proc)
    return StoreSCP(port, aet, folder, proc, log)


@dataclasses.dataclass
class Orthanc:
    """A running Orthanc: DICOM on ``dicom_port`` as ``aet``, REST on ``http_port``."""

    aet: str
    dicom_port: int
    http_port: int
    storage: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, body: Any = None, timeout: float = HANG) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def instances(self) -> list[str]:
        """Orthanc's instance IDs (not SOP Instance UIDs)."""
        return self.rest("GET", "/instances")

    def sop_instance_uids(self) -> set[str]:
        tags = (self.rest("GET", f"/instances/{i}/simplified-tags") for i in self.instances())
        return {t["SOPInstanceUID"] for t in tags}

    def store_to(self, modality: str, resources: list[str]) -> Any:
        """Orthanc sends ``resources`` (instance/series/study IDs) to ``modality`` (C-STORE)."""
        return self.rest("POST", f"/modalities/{modality}/store", resources, timeout=LONG_HANG)

    def upload(self, path: str | Path) -> Any:
        request = urllib.request.Request(
            self.url + "/instances", data=Path(path).read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=HANG) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        _stop(self.proc, timeout=30)  # Orthanc can take > 3 s to exit

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_orthanc(
    folder: str | Path,
    *,
    aet: str = "ORTHANC",
    dicom_port: int | None = None,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Orthanc:
    """Orthanc as a plain process (never the packaged service) with its own storage in
    ``folder``; ``dicom_port``: its DICOM port (a free one if None: give one when a sender
    was configured with it before Orthanc starts); ``modalities``: name -> (AE title, host,
    port) it may send to."""
    if not ORTHANC_BIN.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = dicom_port or free_port(), free_port()
    settings = {
        "Name": "dataflow-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "Plugins": [],
        "StableAge": 1,
        **(config or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(settings, indent=2))
    log = open(folder / "orthanc.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(ORTHANC_BIN), str(folder / "orthanc.json")],
        env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    try:
        wait_for_port(http_port, proc=proc)
        wait_for_port(dicom_port, proc=proc)
    except Exception:
        _stop(proc)
        raise RuntimeError((folder / "orthanc.log").read_text()[-3000:]) from None
    return Orthanc(aet, dicom_port, http_port, folder, proc)


@contextlib.contextmanager
def running(*peers: StoreSCP | Orthanc) -> Iterator[None]:
    try:
        yield
    finally:
        for peer in peers:
            peer.stop()


def copy_files(files: Iterable[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, folder / f.name)) for f in files]
