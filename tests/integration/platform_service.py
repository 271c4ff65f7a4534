"""A real ``Service`` with its platform API on a free loopback port, for the platform tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from dataflow.service import Service, load_config
from tests.deadlines import SCALE

HANG = 300.0 * SCALE  # seconds: only a hang takes this long (DATAFLOW_TEST_DEADLINE_SCALE)


@contextlib.contextmanager
def platform_service(
    tmp: Path, pipelines: dict[str, Path], api: str = "", *, grpc: bool = False
) -> Iterator[Service]:
    """The service over ``pipelines`` (name -> file) with ``api: {rest-port: 0, ...api}``;
    ``grpc``: Clara's gRPC API on a free port too (``service.platform.urls["grpc"]``)."""
    path = tmp / "service.yaml"
    lines = "".join(f"  {name}: {file}\n" for name, file in pipelines.items())
    extra = f", {api}" if api else ""
    grpc_port = 0 if grpc else "null"
    path.write_text(f"state: {tmp / 'state'}\npipelines:\n{lines}"
                    f"api: {{rest-port: 0, grpc-port: {grpc_port}{extra}}}\n")  # fmt: skip
    service = Service(load_config(path))
    service.start()
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def api_client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.platform.urls["rest"], timeout=HANG) as client:
        yield client


def start_job(client: httpx.Client, pipeline: str, files: dict[str, bytes]) -> str:
    """A job of ``pipeline`` made, its input files uploaded and started through the REST
    API, as another system would; its id."""
    made = client.post("/api/v1/jobs", json={"pipeline": pipeline}).json()
    for name, data in files.items():
        client.put(
            f"/api/v1/payloads/{made['payload_id']}/files/input/{name}", content=data
        ).raise_for_status()
    client.post(f"/api/v1/jobs/{made['job_id']}/start").raise_for_status()
    return made["job_id"]


def folder_files(folder: Path) -> dict[str, bytes]:
    """The files of ``folder`` by name, in name order (a study to upload)."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}
