"""``connectors.dicom.net.fastnet`` (pynetdicom without its polling waits) and the receiver's
cheap copies of pynetdicom's presentation contexts."""

from __future__ import annotations

import copy
import socket
import threading

import pynetdicom.association
import pynetdicom.dul
import pytest
from deadlines import HANG
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket

from connectors.dicom.net import fastnet
from connectors.dicom.receive.receiver import _Contexts


def test_installed_on_pynetdicom_3_0():
    assert fastnet.install() is True and fastnet.install() is True  # idempotent
    assert fastnet.installed()
    assert pynetdicom.dul.time.sleep is fastnet._sleep
    assert pynetdicom.association.time.sleep is fastnet._sleep
    assert pynetdicom.dul.time.monotonic is __import__("time").monotonic  # the rest as is
    assert AssociationSocket.recv is fastnet._recv
    assert AssociationSocket.ready.fget is fastnet._ready_or_pushed_back
    assert DIMSEServiceProvider.send_msg is fastnet._fast_send_msg


class _Holder:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


@pytest.mark.parametrize("size", [6, 4096, 131072 + 6, 3 * 1024 * 1024])
def test_recv_reads_exactly_what_was_asked(size):
    a, b = socket.socketpair()
    data = bytes(range(256)) * (size // 256 + 2)
    sender = threading.Thread(target=a.sendall, args=(data,))
    sender.start()
    try:
        got = fastnet._recv(_Holder(b), size)
        assert isinstance(got, bytearray) and got == data[:size]
        assert fastnet._recv(_Holder(b), 6) == data[size : size + 6]
    finally:
        sender.join()
        a.close()
        b.close()


def test_recv_returns_what_there_was_when_the_peer_closes():
    a, b = socket.socketpair()
    a.sendall(b"abcdef")
    a.close()
    try:
        assert fastnet._recv(_Holder(b), 100) == bytearray(b"abcdef")
        assert fastnet._recv(_Holder(b), 100) == bytearray()
    finally:
        b.close()


def test_wakers_are_signalled_by_what_their_loops_wait_for():
    assoc = Association(AE(), "requestor")
    dul_waker = fastnet._Waker(assoc.dul)
    assoc.dul.to_provider_queue.put("primitive")
    assert dul_waker.event.is_set()
    dul_waker.wait(0)
    assert not dul_waker.event.is_set()
    assoc.dul.kill_dul()
    assert dul_waker.event.is_set() and assoc.dul._kill_thread
    assert assoc.dul.to_provider_queue.get_nowait() == "primitive"  # queued as before

    waker = fastnet._Waker(assoc)
    assoc.dimse.msg_queue.put((1, "message"))
    assert waker.event.is_set()
    waker.wait(0)
    assoc.dul.to_user_queue.put("release")
    assert waker.event.is_set()
    assert assoc.dimse.msg_queue.get_nowait() == (1, "message")


def test_sleep_elsewhere_is_a_plain_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(fastnet, "_real_sleep", slept.append)
    fastnet._sleep(0.001)  # the test's own thread: not pynetdicom's
    fastnet._sleep(0.1)
    assert slept == [0.001, 0.1]


def test_context_copies_are_independent_and_equal():
    contexts = _Contexts(copy.deepcopy(AllStoragePresentationContexts[:5]))
    copies = copy.deepcopy(contexts)
    assert type(copies) is list and len(copies) == 5
    for original, clone in zip(contexts, copies, strict=True):
        assert clone is not original and clone.__dict__ == original.__dict__
        assert clone._transfer_syntax is not original._transfer_syntax
    copies[0]._transfer_syntax.append("1.2.3")
    copies[0].context_id = 7
    assert "1.2.3" not in contexts[0].transfer_syntax and contexts[0].context_id is None


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id", "status"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 5, 0x0000),
        ("1.2.3", "1.2.3.45", 65535, 0xA700),
        ("1.2.840.10008.5.1.4.1.1.4", "9" * 64, 1, 0x0111),
    ],
)
def test_c_store_response_bytes_are_pynetdicoms(sop_class, sop_instance, message_id, status):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    expected = [p.presentation_data_value_list for p in message.encode_msg(3, 16384)]
    assert expected == [[(3, b"\x03" + fastnet.c_store_rsp_bytes(rsp))]]  # pynetdicom: tuples
    rsp.ErrorComment = "disk reserve reached"  # anything more: pynetdicom's own path
    assert fastnet.c_store_rsp_bytes(rsp) is None


def test_tune_malloc_on_glibc(monkeypatch):
    assert fastnet.tune_malloc() is True  # these machines run glibc
    monkeypatch.setenv("DATAFLOW_DICOM_FASTNET", "0")
    assert fastnet.tune_malloc() is False


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "message_id"),
    [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 5), ("1.2.3", "9" * 64, 65535)],
)
def test_c_store_request_bytes_are_pynetdicoms(sop_class, sop_instance, message_id):
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_instance
    req.DataSet = __import__("io").BytesIO(b"\x08\x00\x16\x00" + b"\x00" * 4)  # a dataset follows
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    command = next(message.encode_msg(1, 16384)).presentation_data_value_list
    assert command == [(1, b"\x03" + fastnet.c_store_rq_bytes(req))]
    req.MoveOriginatorApplicationEntityTitle = "MOVER"  # pynetdicom's path
    assert fastnet.c_store_rq_bytes(req) is None


def test_pushed_back_bytes_are_read_first_and_make_the_socket_ready():
    fastnet.install()
    a, b = socket.socketpair()
    try:
        sock = AssociationSocket(Association(AE(), "requestor"), client_socket=a)
        assert not sock.ready
        fastnet.push_back(sock, b"\x07\x00")
        assert sock.ready  # nothing on the wire, but something to read
        b.sendall(b"\x00\x00\x00\x04rest")
        assert bytes(sock.recv(1)) == b"\x07"
        assert bytes(sock.recv(9)) == b"\x00\x00\x00\x00\x04rest"
        assert not sock.ready
    finally:
        a.close()
        b.close()


def test_a_held_waker_parks_its_thread_until_released():
    assoc = Association(AE(), "requestor")
    assoc.dul.state_machine.current_state = "Sta6"  # established: parking is allowed
    waker = fastnet.waker(assoc.dul)
    assert fastnet.waker(assoc.dul) is waker  # one per thread
    done = threading.Event()

    def loop():  # a DUL-like loop: short waits until told to stop
        while not done.is_set():
            waker.wait(0.001)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        assert waker.hold(timeout=HANG) and waker.parked
        done.set()
        thread.join(0.1)
        assert thread.is_alive()  # parked: it does not see `done`
        waker.release()
        thread.join(HANG)
        assert not thread.is_alive()
    finally:
        done.set()
        waker.release()
    assert not fastnet.waker(assoc.dul).hold(timeout=0.05)  # nobody waits: not parked
    assert not waker.held


@pytest.mark.parametrize("event", ["aborted", "killed", "queued"])
def test_a_parked_thread_goes_on_when_its_association_needs_it(event):
    """Held, a DUL thread still sends what is queued, runs when told to stop, and runs when
    the association leaves Sta6 (an A-ABORT or A-ASSOCIATE-RJ went out: its timers must run)."""
    assoc = Association(AE(), "requestor")
    assoc.dul.state_machine.current_state = "Sta6"
    waker = fastnet.waker(assoc.dul)
    woke = threading.Event()

    def dul_thread():
        waker.park()
        woke.set()

    thread = threading.Thread(target=dul_thread)
    waker.hold_soon()
    thread.start()
    try:
        assert waker.wait_parked(HANG) and not woke.wait(0.1)
        if event == "aborted":
            assoc.dul.state_machine.current_state = "Sta13"
        elif event == "killed":
            assoc.dul.kill_dul()
        else:
            assoc.dul.to_provider_queue.put("A-ABORT")
        assert woke.wait(HANG)
        assert not waker.park()  # and it does not park again while that lasts
    finally:
        waker.release()
        thread.join(HANG)


def test_with_the_fast_path_off_the_receiver_says_why_in_its_log_and_stats(tmp_path):
    """In a fresh process with DATAFLOW_DICOM_FASTNET=0: nothing is patched at import, the
    receiver's start logs dicom_fast_path_off with the reason, and its stats say 0."""
    import os
    import subprocess
    import sys

    code = (
        "import pynetdicom, connectors.dicom.receive.receiver as r;"
        "import connectors.dicom.net.fastnet as f;"
        "assert not f.installed() and pynetdicom._config.LOG_HANDLER_LEVEL != 'none';"
        "from connectors.dicom.config import ReceiverConfig, CalledAE;"
        f"c = ReceiverConfig(called_aes=[CalledAE('X', ['p'])], spool={str(tmp_path)!r}, port=0);"
        "rec = r.Receiver(c, lambda g: None).start();"
        "print('STATS', rec.stats()['fast_path'], pynetdicom._config.LOG_HANDLER_LEVEL);"
        "rec.stop()"
    )
    env = {**os.environ, "DATAFLOW_DICOM_FASTNET": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "STATS 0 none" in done.stdout
    assert "dicom_fast_path_off" in done.stdout + done.stderr
    assert "DATAFLOW_DICOM_FASTNET=0" in done.stdout + done.stderr


def _pynetdicom_private_names() -> set[str]:
    """Every private name of pynetdicom: module globals, class attributes and the instance
    attributes its constructors set."""
    import importlib
    import inspect
    import pkgutil

    names: set[str] = set()

    def private(found) -> set[str]:
        return {n for n in found if n.startswith("_") and not n.startswith("__")}

    for info in pkgutil.iter_modules(pynetdicom.__path__):
        if info.name in ("tests", "apps", "benchmarks"):
            continue
        module = importlib.import_module(f"pynetdicom.{info.name}")
        names |= private(vars(module))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            for klass in cls.__mro__:
                if klass.__module__.startswith("pynetdicom"):
                    names |= private(vars(klass))
                    init = vars(klass).get("__init__")
                    names |= private(getattr(getattr(init, "__code__", None), "co_names", ()))
    return names


def test_pynetdicoms_private_names_are_used_in_compat_only():
    """``connectors.dicom.net.compat`` is the one place that names pynetdicom's internals: an
    attribute access ``x._name`` (``x`` not ``self``) with a private pynetdicom name anywhere
    else in connectors/dicom fails here (docstrings and comments do not count)."""
    import io
    import tokenize
    from pathlib import Path

    import connectors.dicom

    names = _pynetdicom_private_names()
    assert {"_kill", "_idle_timer", "_read_pdu_data", "_reactor_checkpoint"} <= names
    root = Path(connectors.dicom.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "compat.py":
            continue
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                  if t.type in (tokenize.NAME, tokenize.OP)]  # fmt: skip
        for before, dot, name in zip(tokens, tokens[1:], tokens[2:]):
            if dot.string == "." and name.string in names and before.string != "self":
                found.append(f"{path.relative_to(root)}:{name.start[0]} .{name.string}")
    assert found == []


def test_pynetdicom_logs_no_identifiers_once_a_receiver_or_exporter_starts(monkeypatch):
    """At start (``fastnet.install``, not at import), fast path on or off, pynetdicom's
    logging of C-FIND/GET/MOVE identifiers is off."""
    from pynetdicom import _config

    fastnet.uninstall()
    monkeypatch.setattr(_config, "LOG_REQUEST_IDENTIFIERS", True)
    monkeypatch.setattr(_config, "LOG_RESPONSE_IDENTIFIERS", True)
    monkeypatch.setenv("DATAFLOW_DICOM_FASTNET", "0")
    try:
        assert fastnet.install() is False
        assert not _config.LOG_REQUEST_IDENTIFIERS and not _config.LOG_RESPONSE_IDENTIFIERS
    finally:
        fastnet.uninstall()
    monkeypatch.setattr(_config, "LOG_REQUEST_IDENTIFIERS", True)
    monkeypatch.delenv("DATAFLOW_DICOM_FASTNET")
    assert fastnet.install() is True
    assert not _config.LOG_REQUEST_IDENTIFIERS


def test_uninstall_puts_pynetdicom_back_and_install_decides_again(monkeypatch):
    import time

    fastnet.install()
    fastnet.uninstall()
    try:
        assert not fastnet.installed() and fastnet.why_off() is None
        assert pynetdicom.dul.time is time and pynetdicom.association.time is time
        assert AssociationSocket.recv is not fastnet._recv
        assert not isinstance(AssociationSocket.__dict__["ready"].fget, type(None))
        assert AssociationSocket.ready.fget is not fastnet._ready_or_pushed_back
        assert DIMSEServiceProvider.send_msg is not fastnet._fast_send_msg
        monkeypatch.setenv("DATAFLOW_DICOM_FASTNET", "0")
        assert fastnet.install() is False
        assert fastnet.why_off() == "DATAFLOW_DICOM_FASTNET=0 in the environment"
        assert pynetdicom.dul.time is time  # nothing patched
    finally:
        fastnet.uninstall()
    monkeypatch.delenv("DATAFLOW_DICOM_FASTNET")
    assert fastnet.install() is True and fastnet.installed()


def test_compat_finds_every_internal_it_names_in_this_pynetdicom(monkeypatch):
    """What :func:`compat.check` says before ``install`` patches anything."""
    from connectors.dicom.net import compat

    fastnet.uninstall()
    try:
        assert compat.check() is None
        monkeypatch.delattr(pynetdicom.dul.DULServiceProvider, "_decode_pdu")
        assert compat.check() == (
            f"pynetdicom {pynetdicom.__version__} lacks DULServiceProvider._decode_pdu"
        )
        monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
        assert "pynetdicom 3.1.0 is not the 3.0.x" in compat.check()
    finally:
        monkeypatch.undo()
        fastnet.install()
