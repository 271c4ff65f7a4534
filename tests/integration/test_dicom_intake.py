"""The receiver's direct C-STORE path (``connectors.dicom.receive.intake``) where a peer does what
dcmtk's storescu never does: mixes a C-ECHO into C-STOREs, puts a whole message in one PDU,
breaks off in the middle of a dataset, sends a malformed PDU. The SCU side is pynetdicom's
association (negotiation) with its socket taken over by the test, as ``DirectStore`` does."""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path

import pytest
from deadlines import HANG, returns_before_a_hang, wait_until
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from test_dicom_receiver import AET, HOST, config, ct, part10, receiving, sop_uid, stored, wait_for

from connectors.dicom.config import Peer
from connectors.dicom.export.direct import DirectStore, dataset_offset
from connectors.dicom.net import fastnet
from connectors.dicom.net.association import associate, pause_reactor
from connectors.dicom.receive import journal
from connectors.dicom.receive.intake import _Instance
from connectors.dicom.receive.receiver import Receiver
from connectors.dicom.receive.store import StoreSteps

pytestmark = [
    pytest.mark.integration,
    pytest.mark.dicom_wire(off="the direct intake path is the fast path's (pynetdicom serves all"
                           " otherwise: test_dicom_receiver covers it)"),
]  # fmt: skip

CONTEXTS = [(CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian])]


def peer_config(tmp_path: Path):
    return config(tmp_path, peers=[Peer("SCU")])


def connect(port: int, contexts=CONTEXTS):
    return associate("SCU", (HOST, port), AET, contexts, timeouts={"dimse_timeout": HANG})


def command_pdv(info_class: str, info_instance: str, msg_id: int) -> bytes:
    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID, request.Priority = msg_id, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = info_class, info_instance
    return fastnet.c_store_rq_bytes(request)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def pdata(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def ct_context(assoc) -> int:
    return next(
        cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage
    )


def read_response(sock) -> bytes:
    sock.settimeout(HANG)
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
        data += sock.recv(65536)
    return data


def release(assoc) -> None:
    if assoc.is_established:
        pause_reactor(assoc)
        assoc.release()


def stores_around_an_echo(assoc, before, after) -> None:
    """C-STORE ``before``, C-ECHO (given back to pynetdicom), C-STORE ``after``: all Success."""
    try:
        for path in before:
            pause_reactor(assoc)
            assert assoc.send_c_store(path).Status == 0x0000
        pause_reactor(assoc)
        assert assoc.send_c_echo().Status == 0x0000
        for path in after:
            pause_reactor(assoc)
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        release(assoc)


def take_over(assoc) -> tuple[DirectStore, int]:
    """Drive ``assoc``'s socket from the test (its DUL parked, as DirectStore does): the
    DirectStore and the CT context's id. ``direct.release()`` gives it back."""
    direct = DirectStore.open(assoc)
    assert direct is not None and direct.hold()
    return direct, ct_context(assoc)


@contextlib.contextmanager
def driven(port: int, contexts=CONTEXTS):
    """An association whose socket the test drives: (association, DirectStore, the CT
    context's id); released at the end."""
    assoc = connect(port, contexts)
    direct, cx = take_over(assoc)
    try:
        yield assoc, direct, cx
    finally:
        direct.release()
        release(assoc)


def store_then_release(assoc, path) -> None:
    """One C-STORE by pynetdicom (Success), then the release."""
    try:
        pause_reactor(assoc)
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        release(assoc)


def counting(monkeypatch) -> dict[str, int]:
    """How many C-STOREs each path served (both end in the same StoreSteps)."""
    counts = {"intake": 0, "pynetdicom": 0}
    real_finish, real_store_dataset = _Instance.finish, StoreSteps.store_dataset

    def finish(self, assoc):
        counts["intake"] += 1
        return real_finish(self, assoc)

    def store_dataset(self, *args):
        counts["pynetdicom"] += 1
        return real_store_dataset(self, *args)

    monkeypatch.setattr(_Instance, "finish", finish)
    monkeypatch.setattr(StoreSteps, "store_dataset", store_dataset)
    return counts


def test_a_c_echo_among_c_stores_is_pynetdicoms_and_the_rest_still_stored(tmp_path, monkeypatch):
    files = ct(tmp_path / "ct", 4, seed=21)
    counts = counting(monkeypatch)
    with receiving(peer_config(tmp_path)) as rx:
        stores_around_an_echo(connect(rx.port), files[:2], files[2:])
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in files)
        for path in files:
            assert part10(stored(rx)[sop_uid(path)]) == part10(path)  # byte for byte
        # pynetdicom's SCU sends the dataset in the PDUs after the command's: the intake path
        # served the first two; after the C-ECHO was given back, pynetdicom served the rest
        assert counts == {"intake": 2, "pynetdicom": 2}


def store_in_two_fragments(direct, cx: int, msg_id: int, path: Path, cut: int | None,
                           one_pdu: bool) -> int:  # fmt: skip
    """A C-STORE of ``path`` with its dataset in two fragments (cut at ``cut``, else half
    way), all in one P-DATA-TF or the last fragment in a second one; the response's status."""
    data = path.read_bytes()[dataset_offset(path) :]
    cut = len(data) // 2 if cut is None else cut
    command = command_pdv(CTImageStorage, sop_uid(path), msg_id)
    first, last = [pdv(cx, 0x03, command), pdv(cx, 0x00, data[:cut])], pdv(cx, 0x02, data[cut:])
    if one_pdu:
        direct.sock.sendall(pdata(*first, last))
    else:
        direct.sock.sendall(pdata(*first))
        direct.sock.sendall(pdata(last))
    return direct._response(msg_id, cx)


def test_a_whole_message_in_one_pdu_and_several_in_a_row(tmp_path, monkeypatch):
    files = ct(tmp_path / "ct", 3, seed=22)
    counts = counting(monkeypatch)
    with receiving(peer_config(tmp_path)) as rx:
        with driven(rx.port) as (_, direct, cx):
            for msg_id, path in enumerate(files, 1):
                assert store_in_two_fragments(direct, cx, msg_id, path, None, True) == 0x0000
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in files)
        assert part10(stored(rx)[sop_uid(files[1])]) == part10(files[1])
    assert counts == {"intake": 3, "pynetdicom": 0}


def test_an_instance_larger_than_its_staging_buffer_goes_through_a_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "STAGE", 4096)  # a CT slice outgrows it in its first PDV
    files = ct(tmp_path / "ct", 2, seed=26)
    counts = counting(monkeypatch)
    with receiving(peer_config(tmp_path)) as rx:
        with driven(rx.port) as (_, direct, cx):
            for msg_id, path in enumerate(files, 1):
                assert store_in_two_fragments(direct, cx, msg_id, path, 3000, False) == 0x0000
        for path in files:
            assert part10(stored(rx)[sop_uid(path)]) == part10(path)
        assert not list((rx.spool / ".incoming").iterdir())
    assert counts == {"intake": 2, "pynetdicom": 0}


def test_an_association_broken_off_mid_dataset_leaves_nothing(tmp_path, monkeypatch):
    # an instance is kept in memory, and goes to a temp file once it outgrows its buffer:
    # a small buffer, so that the partial instance is seen on disk, then seen removed
    monkeypatch.setattr(journal, "STAGE", 512)
    files = ct(tmp_path / "ct", 2, seed=23)
    with receiving(peer_config(tmp_path)) as rx:
        assoc = connect(rx.port)
        direct, cx = take_over(assoc)
        data = files[0].read_bytes()[dataset_offset(files[0]) :]
        direct.sock.sendall(pdata(pdv(cx, 0x03, command_pdv(CTImageStorage, sop_uid(files[0]), 1))))
        direct.sock.sendall(pdata(pdv(cx, 0x00, data[:1000])))  # the rest never comes
        wait_for(lambda: list((rx.spool / ".incoming").glob("*.part")))  # being written
        direct.release()
        assoc.abort()
        wait_for(lambda: not list((rx.spool / ".incoming").glob("*.part")))
        assert stored(rx) == {}
        store_then_release(connect(rx.port), files[1])  # the receiver goes on
        assert list(stored(rx)) == [sop_uid(files[1])]


def test_a_malformed_pdu_aborts_that_association_only(tmp_path):
    files = ct(tmp_path / "ct", 1, seed=24)
    with receiving(peer_config(tmp_path)) as rx:
        bad = connect(rx.port)
        direct, cx = take_over(bad)
        body = struct.pack(">IBB", 1, cx, 0x03)  # an item length of 1: impossible
        direct.sock.sendall(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        reply = read_response(direct.sock)
        assert reply[0] == 0x07  # A-ABORT
        direct.release()
        wait_for(lambda: not bad.is_established)
        store_then_release(connect(rx.port), files[0])


def test_a_rejected_association_does_not_keep_its_slot(tmp_path):
    """pynetdicom rejects past max_associations after the intake parked the DUL thread: the
    DUL must still send the A-ASSOCIATE-RJ and close, or the slot stays taken for good."""
    from connectors.dicom.net.association import AssociationFailed

    with receiving(config(tmp_path, peers=[Peer("SCU")], max_associations=1)) as rx:
        first = connect(rx.port)
        with pytest.raises(AssociationFailed, match="rejected"):
            connect(rx.port)
        pause_reactor(first)
        first.release()
        wait_for(lambda: not rx._server.active_associations)
        again = connect(rx.port)
        pause_reactor(again)
        again.release()


def test_stop_during_a_transfer_is_prompt_and_acknowledges_nothing_after_the_abort(
    tmp_path, monkeypatch
):
    """A peer that trickles a dataset and never sends its last fragment: the receiver's stop
    does not wait for the transfer (it never ends), it aborts it — asserted by events: the
    stop returns while the peer is still sending, and the peer only ever hears A-ABORTs."""
    import threading

    monkeypatch.setattr(journal, "STAGE", 512)  # to a temp file soon: the transfer is seen

    files = ct(tmp_path / "ct", 1, seed=25, size=128)
    rx = Receiver(peer_config(tmp_path)).start()
    assoc = connect(rx.port)
    direct, cx = take_over(assoc)
    data = files[0].read_bytes()[dataset_offset(files[0]) :]
    direct.sock.sendall(pdata(pdv(cx, 0x03, command_pdv(CTImageStorage, sop_uid(files[0]), 1))))
    stop = threading.Event()

    def trickle():  # a slow peer: a fragment every 50 ms, over and over, never the last
        k = 0
        while not stop.wait(0.05):
            try:
                direct.sock.sendall(pdata(pdv(cx, 0x00, data[k : k + 100])))
            except OSError:  # the receiver closed the connection under it
                return
            k = (k + 100) % (len(data) - 100)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        incoming = tmp_path / "spool" / ".incoming"
        wait_until(lambda: list(incoming.glob("*.part")), "transfer under way at the receiver")
        returns_before_a_hang(rx.stop)  # the transfer never ends: stop must not wait for it
        replies = b""
        direct.sock.settimeout(HANG)
        with contextlib.suppress(OSError):
            while chunk := direct.sock.recv(65536):
                replies += chunk
        kinds, pos = [], 0
        while pos + 6 <= len(replies):
            kinds.append(replies[pos])
            pos += 6 + struct.unpack(">I", replies[pos + 2 : pos + 6])[0]
        assert kinds and set(kinds) == {0x07}  # A-ABORTs (one per PDU it got), no answer
        assert not list(incoming.glob("*.part"))
    finally:
        stop.set()
        sender.join(HANG)
        direct.release()
        assoc.abort()


def test_a_slow_but_steady_peer_is_not_idle(tmp_path):
    files = ct(tmp_path / "ct", 1, seed=26)
    # network_timeout is a timer on the receiver's clock: the gaps leave it 2 s of slack
    with receiving(config(tmp_path, peers=[Peer("SCU")], network_timeout=3.0)) as rx:
        with driven(rx.port) as (_, direct, cx):
            data = files[0].read_bytes()[dataset_offset(files[0]) :]
            command = command_pdv(CTImageStorage, sop_uid(files[0]), 1)
            direct.sock.sendall(pdata(pdv(cx, 0x03, command)))
            fifth = len(data) // 5
            for k in range(4):  # 1 s apart, 4 s in all: longer than the timeout, no gap is
                direct.sock.sendall(pdata(pdv(cx, 0x00, data[k * fifth : (k + 1) * fifth])))
                time.sleep(1.0)
            direct.sock.sendall(pdata(pdv(cx, 0x02, data[4 * fifth :])))
            assert direct._response(1, cx) == 0x0000
        assert list(stored(rx)) == [sop_uid(files[0])]


def test_a_request_with_a_uid_that_is_not_one_is_refused_and_the_association_goes_on(tmp_path):
    files = ct(tmp_path / "ct", 1, seed=27)
    with receiving(peer_config(tmp_path)) as rx:
        with driven(rx.port) as (_, direct, cx):
            data = files[0].read_bytes()[dataset_offset(files[0]) :]
            bad = command_pdv(CTImageStorage, "1.2.3", 1).replace(
                b"1.2.3\0", "1.2.\u00e9".encode("latin-1") + b"\0"
            )
            direct.sock.sendall(pdata(pdv(cx, 0x03, bad), pdv(cx, 0x02, data)))
            assert direct._response(1, cx) == 0xA900
            direct.sock.sendall(
                pdata(
                    pdv(cx, 0x03, command_pdv(CTImageStorage, sop_uid(files[0]), 2)),
                    pdv(cx, 0x02, data),
                )
            )
            assert direct._response(2, cx) == 0x0000
        assert list(stored(rx)) == [sop_uid(files[0])]
        assert not list((tmp_path / "spool" / ".incoming").glob("*.part"))


def test_a_store_on_another_sop_classs_context_is_given_back_with_its_data_unread(tmp_path):
    """The command names MR on the CT context, with the dataset in the same PDU: pynetdicom
    answers it (the DUL reads the rest of that PDU off the socket) and the association goes
    on with the direct path's successor, pynetdicom."""
    files = ct(tmp_path / "ct", 1, seed=28)
    with receiving(peer_config(tmp_path)) as rx:
        assoc = connect(rx.port)
        direct, cx = take_over(assoc)
        data = files[0].read_bytes()[dataset_offset(files[0]) :]
        mr = "1.2.840.10008.5.1.4.1.1.4"
        direct.sock.sendall(
            pdata(pdv(cx, 0x03, command_pdv(mr, sop_uid(files[0]), 1)), pdv(cx, 0x02, data))
        )
        status = direct._response(1, cx)
        direct.release()
        assert status != 0x0000
        store_then_release(assoc, files[0])  # the same association goes on
        assert list(stored(rx)) == [sop_uid(files[0])]


def test_ignored_sop_classes_on_pynetdicoms_path_too(tmp_path, monkeypatch):
    """After a C-ECHO pynetdicom serves the association: an ignored SOP class is dropped there
    as on the direct path."""
    from test_dicom_receiver import SECONDARY_CAPTURE, secondary_capture

    from connectors.dicom.config import CalledAE

    files = ct(tmp_path / "ct", 2, seed=29)
    sc = secondary_capture(files[0], tmp_path / "sc.dcm")
    called = [CalledAE(AET, routes=["ct"], timeout=30, ignored_sop_classes=[SECONDARY_CAPTURE])]
    counts = counting(monkeypatch)
    contexts = [*CONTEXTS, (SECONDARY_CAPTURE, [ExplicitVRLittleEndian])]
    with receiving(config(tmp_path, called=called, peers=[Peer("SCU")])) as rx:
        # the direct path, then pynetdicom's
        stores_around_an_echo(connect(rx.port, contexts), (sc, files[0]), (sc, files[1]))
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in files)
    assert counts == {"intake": 2, "pynetdicom": 2}
