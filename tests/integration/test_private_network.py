"""The test session's private network (tests/conftest.py): loopback only, so servers that
bind every interface (storescp, Orthanc) are reachable from nothing outside the session."""

from __future__ import annotations

import socket
import subprocess

import pytest

pytestmark = pytest.mark.integration


def test_the_session_sees_only_a_loopback_interface_that_is_up(private_network):
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))  # what storescp and Orthanc do
        server.listen()
        with socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5):
            pass


def test_child_processes_share_the_private_network(private_network):
    out = subprocess.run(
        ["python3", "-c", "import socket; print([n for _, n in socket.if_nameindex()])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "['lo']"
