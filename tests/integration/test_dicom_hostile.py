"""The receiver against hostile peers (issue 9, item 4): raw sockets that send PDU headers
claiming 4 GiB, garbage, one byte and then nothing, connect-and-close floods, strangers
holding slots; beside them a real dcmtk ``storescu`` (``TCP_NODELAY=1``) that must get
through. Memory is measured on a receiver process of its own, run under ``RLIMIT_AS`` so
that a regression fails instead of taking the machine's memory."""

from __future__ import annotations

import random
import re
import resource
import socket
import threading
import time
from pathlib import Path

import pytest
from deadlines import HANG
from dicom_peers import storescu
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from test_dicom_receiver import (
    AET,
    HOST,
    _certificate,
    config,
    ct,
    receiver_process,
    receiving,
    wait_for,
)

from connectors.dicom.config import TLSConfig

pytestmark = [pytest.mark.integration, pytest.mark.dicom_wire]

ADDRESS_SPACE = 2560 * 1024**2  # RLIMIT_AS of the receiver process: 4 GiB cannot be had
PEAK_GROWTH = 160 * 1024**2  # a claim of 512 MiB honoured would pass this


def closed_by_receiver(sock: socket.socket, timeout: float = HANG) -> bool:
    """Whether the receiver closes ``sock`` (after an A-ABORT, say) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=HANG)
    if data:
        sock.sendall(data)
    return sock


def send_files(port: int, files: list[Path], calling: str = "STORESCU"):
    return storescu(HOST, port, files, called=AET, calling=calling)


def stored_sops(spool: Path) -> int:
    return len(list(spool.rglob("*.dcm")))


# -- memory: PDU lengths are claims -----------------------------------------------------------


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def associated(port: int, network_timeout: float = HANG):
    """An association of a pynetdicom SCU (calling STORESCU) and its raw socket."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = network_timeout
    assoc = ae.associate(HOST, port, ae_title=AET)
    assert assoc.is_established
    return assoc, assoc.dul.socket.socket


def ended(assoc) -> bool:
    return wait_for(lambda: not assoc.is_established and not assoc.is_alive(), HANG)


def test_pdu_length_claims_allocate_nothing(tmp_path):
    files = ct(tmp_path / "ct", 4)
    cfg = config(tmp_path, network_timeout=2.0)
    log = tmp_path / "receiver.log"
    with receiver_process(cfg, log) as (proc, port):
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        assert send_files(port, files[:1]).returncode == 0  # warm: pages touched once
        before = peak_rss(proc.pid)
        claims = [  # before any association: an A-ASSOCIATE-RQ, a P-DATA, an A-RELEASE-RQ
            connect(port, b"\x01\x00\xff\xff\xff\xff"),
            connect(port, b"\x01\x00\x20\x00\x00\x00"),  # 512 MiB: allocatable, still refused
            connect(port, b"\x04\x00\xff\xff\xff\xff"),
            connect(port, b"\x05\x00\xff\xff\xff\xff"),
        ]
        garbage = connect(port, random.Random(9).randbytes(64 * 1024))
        inside = []  # in an established association: A-RELEASE-RQ, P-DATA, and a cut header
        for pdu in (b"\x05\x00\xff\xff\xff\xff", b"\x04\x00\xff\xff\xff\xff", b"\x04\x00\x00"):
            assoc, raw = associated(port)
            raw.sendall(pdu)
            inside.append(assoc)
        inside.append(associated(port)[0])  # established, then silent: the idle timer
        result = send_files(port, files[1:])  # a legitimate transfer beside them
        assert result.returncode == 0, result.stdout + result.stderr
        for sock in [*claims, garbage]:
            assert closed_by_receiver(sock)
            sock.close()
        for assoc in inside:
            assert ended(assoc)
        growth = peak_rss(proc.pid) - before
        assert proc.poll() is None
    assert growth < PEAK_GROWTH, f"peak RSS grew by {growth >> 20} MiB"
    assert stored_sops(cfg.spool) == len(files)
    refused = [line for line in log.read_text().splitlines() if "pdu_refused" in line]
    assert len(refused) >= 6 and all("peer_host=127.0.0.1" in line for line in refused)
    assert "limit=262144" in " ".join(refused)  # the association phase's bound


# -- ARTIM, slots, floods ---------------------------------------------------------------------


def acceptor_threads() -> int:
    return sum(t.name.startswith("AcceptorThread") for t in threading.enumerate())


def test_connections_awaiting_their_request_hold_no_slot(tmp_path):
    files = ct(tmp_path / "ct", 4)
    cfg = config(tmp_path, max_associations=2, reserved_associations=0, artim_timeout=600)
    with receiving(cfg) as rx:
        idle = [connect(rx.port, b"\x01") for _ in range(6)]
        wait_for(lambda: acceptor_threads() >= 6, HANG)  # the receiver has them all
        result = send_files(rx.port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        assert stored_sops(cfg.spool) == len(files)
        for sock in idle:
            sock.close()


def test_artim_closes_connections_that_send_no_complete_request(tmp_path):
    files = ct(tmp_path / "ct", 4)
    cfg = config(tmp_path, max_associations=2, artim_timeout=1.0)
    with receiving(cfg) as rx:
        slow = [
            connect(rx.port),  # nothing at all
            connect(rx.port, b"\x01"),  # one byte
            connect(rx.port, b"\x01\x00\x00\x00"),  # part of a header
            connect(rx.port, b"\x01\x00\x00\x00\x01\x00" + b"\x00\x01" * 5),  # part of a body
        ]
        for sock in slow:
            assert closed_by_receiver(sock)
            sock.close()
        # counted by the association's thread, which may run after the PDU reader closed the
        # connection at the same deadline: wait for the count, do not read it at once
        wait_for(lambda: rx.stats()["association_request_timeouts"] == len(slow), HANG)
        result = send_files(rx.port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: acceptor_threads() == 0, HANG)


def test_artim_bounds_a_tls_handshake_that_trickles(tmp_path):
    key, cert = _certificate(tmp_path, "server")
    cfg = config(tmp_path, tls=TLSConfig(cert=cert, key=key), artim_timeout=1.0)
    with receiving(cfg) as rx:
        sock = connect(rx.port, b"\x16\x03\x01\x02\x00")  # a ClientHello's record header...
        deadline = time.monotonic() + HANG
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"\x01")  # ... and its body, a byte every 0.2 s
                sock.settimeout(0.2)
                closed = sock.recv(4096) == b""
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        sock.close()
        assert closed, "the handshake was never cut off"
        assert rx.stats()["association_request_timeouts"] == 0  # no association was created


def hold(port: int, calling: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate(HOST, port, ae_title=AET)


def established(port: int, calling: str):
    assoc = hold(port, calling)
    return assoc if assoc.is_established else None


def test_allowed_peers_get_in_when_strangers_hold_every_other_slot(tmp_path):
    files = ct(tmp_path / "ct", 4)
    cfg = config(tmp_path, max_associations=3, reserved_associations=1, allow_unknown_peers=True)
    with receiving(cfg) as rx:
        strangers = [hold(rx.port, f"STRANGER{k}") for k in range(3)]
        assert [a.is_established for a in strangers] == [True, True, False]
        assert strangers[2].is_rejected  # transient: local limit exceeded
        result = send_files(rx.port, files)  # an allowed calling AE: the reserved slot
        assert result.returncode == 0, result.stdout + result.stderr
        assert stored_sops(cfg.spool) == len(files)
        mine = [hold(rx.port, "STORESCU"), hold(rx.port, "STORESCU")]
        assert [a.is_established for a in mine] == [True, False]  # 3 in use: the limit
        assert rx.stats()["associations"] == 3 and rx.stats()["associations_over_limit"] == 2
        for assoc in strangers[:2] + mine[:1]:
            assoc.release()
        again = wait_for(lambda: established(rx.port, "STRANGER9"), HANG)  # the slots come back
        again.release()


def test_a_connect_and_close_flood_leaves_no_thread_behind(tmp_path):
    files = ct(tmp_path / "ct", 4)
    cfg = config(tmp_path, max_associations=2, artim_timeout=600, acse_timeout=600)
    with receiving(cfg) as rx:
        baseline = threading.active_count()
        for k in range(300):
            sock = connect(rx.port, b"\x01" if k % 3 == 0 else b"")
            sock.close()
        wait_for(lambda: acceptor_threads() == 0 and threading.active_count() <= baseline, HANG)
        result = send_files(rx.port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: threading.active_count() <= baseline, HANG)
