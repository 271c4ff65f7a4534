"""Export against real peers: dcmtk storescp, Orthanc, and a pynetdicom SCP that counts
associations. Backoffs are short here (0.2 s doubling, capped at 0.5 s)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from deadlines import HANG, returns_before_a_hang, wait_until
from dicom_peers import free_port, start_orthanc, start_storescp
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt

from connectors.dicom.export.direct import DirectStore, dataset_offset
from connectors.dicom.export.exporter import Destination, Exporter, Outbox, RetryPolicy
from connectors.dicom.export.sender import echo, send_files
from connectors.dicom.export.stow import WebDestination
from connectors.dicom.export.transport import FileResult, TransientExportError, describe_file
from connectors.dicom.net.association import _Checkpoint, associate, pause_reactor
from connectors.dicom.net.pdu import c_store_rsp_status
from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.dicom_wire]

FAST = RetryPolicy(initial_delay=0.2, factor=2.0, max_delay=0.5, deadline=30.0, jitter=0.0)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def destination(name: str, port: int, aet: str = "STORESCP", **kwargs) -> Destination:
    timeouts = {"connection_timeout": 2, "acse_timeout": 5, "dimse_timeout": 10}
    return Destination(name, aet, "127.0.0.1", port, **{**timeouts, **kwargs})


def exporter_for(tmp_path, *destinations, policy=FAST, poll=0.05) -> Exporter:
    return Exporter(Outbox(tmp_path / "outbox", policy=policy), destinations, poll_interval=poll)


def wait_for(exporter: Exporter, task_id: str, states: set[str]):
    def reached():
        task = exporter.outbox.get(task_id)
        return task if task.state in states else None

    return wait_until(reached, f"task {task_id} {' or '.join(sorted(states))}", poll=0.05)


def pixels(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array  # decodes RLE too


def assert_same_series(received, series) -> None:
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in received}
    assert set(by_uid) == set(series.sop_instance_uids)
    for path in series.files:
        uid = pydicom.dcmread(path).SOPInstanceUID
        np.testing.assert_array_equal(pixels(by_uid[uid]), pixels(path))


@pytest.mark.parametrize(
    ("syntax", "sink_compressed", "expected"),
    [
        (ExplicitVRLittleEndian, True, {ExplicitVRLittleEndian}),
        (RLELossless, True, {RLELossless}),  # sent as stored
        (RLELossless, False, UNCOMPRESSED),  # the sink takes only uncompressed: decompressed
    ],
)
def test_series_to_storescp(private_network, tmp_path, syntax, sink_compressed, expected):
    series = write_ct_series(tmp_path / "series", slices=5, size=64, seed=3, transfer_syntax=syntax)
    with start_storescp(tmp_path / "sink", compressed=sink_compressed) as sink:
        exporter = exporter_for(tmp_path, destination("sink", sink.port))
        task = exporter.enqueue(series.files, "sink", job_id="job-1")
        assert exporter.run_once(timeout=HANG) == 1
        done = exporter.outbox.get(task.id)
        assert (done.state, done.delivered, done.attempts) == ("succeeded", 5, 1), done.last_error
        received = sink.files()
        assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in received} <= expected
        assert_same_series(received, series)
        exporter.outbox.close()


def test_series_to_orthanc_as_stored(private_network, tmp_path):
    series = write_ct_series(tmp_path / "s", slices=4, size=64, seed=4, transfer_syntax=RLELossless)
    with start_orthanc(tmp_path / "orthanc") as orthanc:
        exporter = exporter_for(tmp_path, destination("pacs", orthanc.dicom_port, orthanc.aet))
        assert exporter.echo("pacs").ok
        task = exporter.enqueue(series.files, "pacs", job_id="job-2")
        exporter.run_once(timeout=HANG)
        assert exporter.outbox.get(task.id).state == "succeeded"
        assert orthanc.sop_instance_uids() == set(series.sop_instance_uids)
        stored = tmp_path / "from-orthanc"
        stored.mkdir()
        for k, instance in enumerate(orthanc.instances()):
            (stored / f"{k}.dcm").write_bytes(orthanc_file(orthanc, instance))
        received = sorted(stored.iterdir())
        assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in received} == {RLELossless}
        by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in received}
        for path in series.files:
            original = pydicom.dcmread(path)
            assert by_uid[original.SOPInstanceUID].PixelData == original.PixelData  # same bytes
        exporter.outbox.close()


def orthanc_file(orthanc, instance: str) -> bytes:
    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance}/file", timeout=HANG) as r:
        return r.read()


def test_destination_down_then_back(private_network, tmp_path):
    series = write_ct_series(tmp_path / "series", slices=3, size=32, seed=5)
    port = free_port()
    exporter = exporter_for(tmp_path, destination("sink", port))
    exporter.start()
    try:
        task = exporter.enqueue(series.files, "sink")
        failing = wait_until(
            lambda: (t := exporter.outbox.get(task.id)).attempts >= 2 and t, "second attempt"
        )
        assert failing.state in ("pending", "in-progress") and failing.attempts >= 2
        assert f"127.0.0.1:{port}" in failing.last_error
        with start_storescp(tmp_path / "sink", port=port) as sink:
            done = wait_for(exporter, task.id, {"succeeded", "dead"})
            assert done.state == "succeeded" and done.attempts >= 3
            assert_same_series(sink.files(), series)
    finally:
        exporter.stop()
        exporter.outbox.close()


def test_destination_never_back_is_dead_lettered(tmp_path):
    series = write_ct_series(tmp_path / "series", slices=2, size=16, seed=6)
    exporter = exporter_for(tmp_path, destination("sink", free_port()))
    exporter.start()
    try:
        task = exporter.enqueue(series.files, "sink", deadline=1.5)
        dead = wait_for(exporter, task.id, {"dead", "succeeded"})
    finally:
        exporter.stop()
    assert dead.state == "dead" and dead.attempts >= 3
    assert dead.last_error.startswith(f"deadline passed after {dead.attempts} attempts: sink (")
    assert exporter.dead_letters() == [dead]
    assert len(list((exporter.outbox.folder / task.id).iterdir())) == 2  # files kept
    exporter.outbox.close()


def test_restarted_outbox_resumes_without_resending(private_network, tmp_path):
    series = write_ct_series(tmp_path / "series", slices=4, size=32, seed=7)
    with start_storescp(tmp_path / "sink") as sink:
        first = Outbox(tmp_path / "outbox", policy=FAST)
        crashed = first.enqueue(series.files, "sink")
        queued = first.enqueue(series.files[:1], "sink")
        first.claim()  # crashed mid-send: two instances were acknowledged before
        first.record(crashed.id, FileResult(0, "delivered", 0))
        first.record(crashed.id, FileResult(1, "delivered", 0))
        first.close()

        exporter = exporter_for(tmp_path, destination("sink", sink.port))  # a new Outbox
        assert exporter.run_once(timeout=HANG) == 2
        assert {t.state for t in exporter.tasks()} == {"succeeded"}
        assert exporter.outbox.get(queued.id).delivered == 1
        received = {pydicom.dcmread(p).SOPInstanceUID for p in sink.files()}
        assert received == set(series.sop_instance_uids[:1] + series.sop_instance_uids[2:])
        exporter.outbox.close()


class CountingSCP:
    """A pynetdicom storage SCP on 127.0.0.1 that counts simultaneous associations."""

    def __init__(self, delay: float = 0.15, statuses=None, abort_on=(), gate=None) -> None:
        self.open = self.most = self.stored = 0
        self.statuses = statuses  # SOP Instance UID -> the statuses to answer, in turn
        self.abort_on = set(abort_on)  # SOP Instance UIDs: A-ABORT instead of answering (once)
        self._lock = threading.Lock()
        self.delay = delay
        self.gate = gate  # a threading.Event: no answer before it is set (a peer that hangs)
        ae = AE(ae_title="COUNTER")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_CONN_CLOSE, self._closed),
            (evt.EVT_C_STORE, self._store),
        ]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _opened(self, event) -> None:
        with self._lock:
            self.open += 1
            self.most = max(self.most, self.open)

    def _closed(self, event) -> None:
        with self._lock:
            self.open -= 1

    def _store(self, event) -> int:
        time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(HANG)
        with self._lock:
            if event.request.AffectedSOPInstanceUID in self.abort_on:
                self.abort_on.discard(event.request.AffectedSOPInstanceUID)
                event.assoc.abort()
                return 0x0000
            answers = (self.statuses or {}).get(event.request.AffectedSOPInstanceUID)
            if answers:
                return answers.pop(0)
            self.stored += 1
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def test_concurrency_cap_and_a_hanging_destination_blocks_only_itself(tmp_path):
    series = write_ct_series(tmp_path / "series", slices=10, size=16, seed=8)
    counter = CountingSCP()
    hang = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never answers: hangs
    try:
        exporter = exporter_for(
            tmp_path,
            destination("counted", counter.port, "COUNTER", max_associations=2),
            # it would answer "no" after 2 HANG: a stop that waits for it fails the test
            destination("hanging", hang.getsockname()[1], "HANG", acse_timeout=2 * HANG),
        )
        exporter.start()
        stuck = exporter.enqueue(series.files[:1], "hanging")
        tasks = [exporter.enqueue(series.files[k : k + 2], "counted") for k in range(0, 10, 2)]
        for task in tasks:
            assert wait_for(exporter, task.id, {"succeeded", "dead"}).state == "succeeded"
        assert (counter.stored, counter.most) == (10, 2)
        assert exporter.outbox.get(stuck.id).state == "in-progress"  # still waiting for an answer
        returns_before_a_hang(exporter.stop, timeout=2)  # not held by the hanging peer
        released = exporter.outbox.get(stuck.id)
        assert (released.state, released.attempts) == ("pending", 0)  # not counted, not lost
        exporter.outbox.close()
    finally:
        hang.close()
        counter.close()


def test_echo_ok_and_failing(private_network, tmp_path):
    with start_storescp(tmp_path / "sink") as sink:
        assert echo(destination("sink", sink.port)).ok
        wrong = echo(destination("sink", sink.port, calling_ae_title="X" * 16, aet="A"))
        assert wrong.ok  # storescp answers any called AE title by default
    down = echo(destination("sink", free_port()))
    assert not down.ok and "127.0.0.1" in down.error


def test_refused_and_out_of_resources_instances(tmp_path):
    """0xA700 (out of resources) is retried; 0xA900 (does not match the SOP class) and an
    SOP class the peer does not take are refused for good: the task dies saying which."""
    series = write_ct_series(tmp_path / "series", slices=4, size=16, seed=9)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.save_as(tmp_path / "mr.dcm")
    uids = series.sop_instance_uids
    counter = CountingSCP(delay=0, statuses={uids[1]: [0xA700, 0xA700], uids[2]: [0xA900]})
    try:
        exporter = exporter_for(tmp_path, destination("counted", counter.port, "COUNTER"))
        task = exporter.enqueue([*series.files, tmp_path / "mr.dcm"], "counted")
        exporter.run_once(timeout=HANG)
        first = exporter.outbox.get(task.id)
        assert (first.state, first.delivered, first.failed) == ("pending", 2, 2)
        assert first.last_error == "C-STORE status 0xA700"
        for _ in range(2):  # each retry once its back-off is over
            retry = exporter.outbox.get(task.id).next_attempt
            wait_until(lambda r=retry: exporter.outbox.clock() >= r, "retry due")
            exporter.run_once(timeout=HANG)
        dead = exporter.outbox.get(task.id)
        assert (dead.state, dead.delivered, dead.failed, dead.attempts) == ("dead", 3, 2, 3)
        assert dead.last_error == (
            "2 of 5 instance(s) refused: file #2: C-STORE status 0xA900; "
            "file #4: SOP class not accepted by the peer"
        )
        assert counter.stored == 3
        exporter.outbox.close()
    finally:
        counter.close()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1, used by both sides (and as their CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(key), str(cert)


def test_tls_to_storescp(private_network, tmp_path, certificate):
    key, cert = certificate
    series = write_ct_series(tmp_path / "series", slices=2, size=16, seed=10)
    tls = ["+tls", key, cert, "+cf", cert, "-rc"]  # storescp requires our certificate
    with start_storescp(tmp_path / "sink", extra=tls) as sink:
        secure = destination("sink", sink.port, tls_ca=cert, tls_cert=cert, tls_key=key)
        assert echo(secure).ok
        exporter = exporter_for(tmp_path, secure)
        task = exporter.enqueue(series.files, "sink")
        exporter.run_once(timeout=HANG)
        assert exporter.outbox.get(task.id).state == "succeeded"
        assert_same_series(sink.files(), series)
        exporter.outbox.close()
        plain = echo(destination("sink", sink.port))
        assert not plain.ok


class SlowWaking(_Checkpoint):
    """The reactor descheduled for 20 ms each time its wait returns (as under CPU load)."""

    def wait(self, timeout=None):
        woke = super().wait(timeout)
        time.sleep(0.02)
        return woke


def test_the_reactor_is_parked_before_each_request(tmp_path):
    """pynetdicom pauses the reactor on a flag that stays True for a moment after the reactor
    wakes; under CPU load the reactor then took C-STORE responses off the queue (seen here:
    'Received unexpected C-STORE service message', then a DIMSE timeout). pause_reactor waits
    until the reactor is really blocked."""
    series = write_ct_series(tmp_path / "series", slices=6, size=16, seed=12)
    counter = CountingSCP(delay=0)
    contexts = [(CTImageStorage, [ExplicitVRLittleEndian])]
    assoc = associate(
        "DATAFLOW", ("127.0.0.1", counter.port), "COUNTER", contexts, timeouts={"dimse_timeout": 5}
    )
    try:
        assert isinstance(assoc._reactor_checkpoint, _Checkpoint)
        assoc._reactor_checkpoint = SlowWaking()
        for path in series.files:
            pause_reactor(assoc)
            assert assoc._reactor_checkpoint.parked and not assoc._reactor_checkpoint.is_set()
            assert assoc.send_c_store(path).Status == 0x0000
            assert assoc._reactor_checkpoint.is_set()  # pynetdicom resumed it
        assert counter.stored == 6
    finally:
        if assoc.is_established:
            pause_reactor(assoc)
            assoc.release()
        counter.close()


# ------------------------------------------------------------------ the direct C-STORE path


def dataset_bytes(path) -> bytes:
    return Path(path).read_bytes()[dataset_offset(path) :]


@pytest.mark.dicom_wire(off="DirectStore is the fast path's")
def test_files_as_stored_go_direct_and_the_rest_through_pynetdicom(
    private_network, tmp_path, monkeypatch
):
    """A batch into a PACS that takes only uncompressed: the uncompressed files go over the
    direct path byte for byte, the RLE ones are decompressed and sent by pynetdicom, on the
    same association, in their order."""
    series = write_ct_series(tmp_path / "series", slices=6, size=600, seed=13)  # 2 PDUs each
    files = list(series.files)
    for k in (1, 4):
        ds = pydicom.dcmread(files[k])
        ds.compress(RLELossless, generate_instance_uid=False)
        files[k] = tmp_path / f"rle{k}.dcm"
        ds.save_as(files[k], enforce_file_format=True)
    direct, real_store = [], DirectStore.store
    monkeypatch.setattr(
        DirectStore,
        "store",
        lambda self, path, *a: direct.append(path) or real_store(self, path, *a),
    )
    results: list[FileResult] = []
    with start_storescp(tmp_path / "sink", compressed=False, extra=["--max-pdu", "65536"]) as sink:
        infos = [(i, describe_file(p)) for i, p in enumerate(files)]
        send_files(destination("sink", sink.port), infos, results.append)
        received = {pydicom.dcmread(p).SOPInstanceUID: p for p in sink.files()}
    assert [(r.index, r.outcome) for r in results] == [(i, "delivered") for i in range(6)]
    assert direct == [files[k] for k in (0, 2, 3, 5)]
    for k, path in enumerate(series.files):
        got = received[series.sop_instance_uids[k]]
        if k in (1, 4):
            np.testing.assert_array_equal(pixels(got), pixels(path))
        else:
            assert dataset_bytes(got) == dataset_bytes(path)


@pytest.mark.dicom_wire(off="DirectStore is the fast path's")
def test_a_peer_that_aborts_mid_run_leaves_the_rest_for_the_next_attempt(tmp_path):
    series = write_ct_series(tmp_path / "series", slices=5, size=16, seed=14)
    counter = CountingSCP(delay=0, abort_on={series.sop_instance_uids[2]})
    infos = [(i, describe_file(p)) for i, p in enumerate(series.files)]
    results: list[FileResult] = []
    try:
        with pytest.raises(TransientExportError, match="broke off during C-STORE"):
            send_files(destination("counted", counter.port, "COUNTER"), infos, results.append)
        assert [r.outcome for r in results] == ["delivered", "delivered", "transient"]
        assert results[2].error == "no C-STORE response"
        results.clear()
        send_files(destination("counted", counter.port, "COUNTER"), infos[2:], results.append)
        assert [r.outcome for r in results] == ["delivered"] * 3
        assert counter.stored == 5
    finally:
        counter.close()


def test_no_response_within_the_dimse_timeout_aborts_the_association(tmp_path):
    series = write_ct_series(tmp_path / "series", slices=2, size=16, seed=15)
    answer = threading.Event()  # the peer answers only once the test is over
    counter = CountingSCP(delay=0, gate=answer)
    results: list[FileResult] = []
    try:
        with pytest.raises(TransientExportError, match="broke off during C-STORE"):
            returns_before_a_hang(
                send_files,
                destination("slow", counter.port, "COUNTER", dimse_timeout=0.5),
                [(i, describe_file(p)) for i, p in enumerate(series.files)],
                results.append,
            )
        assert not answer.is_set()  # gave up on the peer while it still had not answered
        assert [(r.index, r.outcome) for r in results] == [(0, "transient")]
    finally:
        answer.set()
        counter.close()


def test_status_of_a_response_and_where_a_dataset_starts(tmp_path):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0xA700
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CTImageStorage, "1.2.3"
    rsp.ErrorComment = "disk reserve reached"
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 16384)
    command = pdata.presentation_data_value_list[0][1][1:]
    assert c_store_rsp_status(command, 7) == 0xA700
    assert c_store_rsp_status(command, 8) is None  # another request's
    assert c_store_rsp_status(command[:-3], 7) is None  # cut off
    series = write_ct_series(tmp_path / "series", slices=1, size=16, seed=16)
    path = series.files[0]
    data = path.read_bytes()
    assert (
        pydicom.dcmread(path).file_meta and data[dataset_offset(path) :][:4] == b"\x08\x00\x05\x00"
    )
    no_length = tmp_path / "no-group-length.dcm"  # (0002,0000) missing: pydicom finds the end
    ds = pydicom.dcmread(path)
    del ds.file_meta.FileMetaInformationGroupLength
    ds.save_as(no_length, enforce_file_format=False)
    assert dataset_bytes(no_length) == data[dataset_offset(path) :]


# ------------------------------------------------------------------ DICOMweb STOW-RS

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def start_orthanc_dicomweb(folder, lua: str | None = None):
    """Orthanc with its DICOMweb plugin (Debian's orthanc-dicomweb), optionally a Lua script."""
    if not DICOMWEB_PLUGIN.exists():
        if os.environ.get("CI"):
            pytest.fail("orthanc-dicomweb is not installed (.ci/run installs it)")
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    config = {
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if lua is not None:
        script = Path(folder) / "filter.lua"
        Path(folder).mkdir(parents=True, exist_ok=True)
        script.write_text(lua)
        config["LuaScripts"] = [str(script)]
    return start_orthanc(folder, config=config)


def web(orthanc, **kwargs) -> WebDestination:
    return WebDestination("web", f"{orthanc.url}/dicom-web", **kwargs)


def test_stow_rs_to_orthanc_as_stored_through_the_exporter(private_network, tmp_path):
    series = write_ct_series(tmp_path / "series", slices=5, size=64, seed=17)
    files = list(series.files)
    ds = pydicom.dcmread(files[2])
    ds.compress(RLELossless, generate_instance_uid=False)
    files[2] = tmp_path / "rle.dcm"
    ds.save_as(files[2], enforce_file_format=True)
    with start_orthanc_dicomweb(tmp_path / "orthanc") as orthanc:
        assert web(orthanc).transport().echo().ok
        exporter = exporter_for(tmp_path, web(orthanc, batch_files=2))  # 3 requests
        task = exporter.enqueue(files, "web")
        exporter.run_once(timeout=HANG)
        done = exporter.outbox.get(task.id)
        assert (done.state, done.delivered) == ("succeeded", 5)
        assert orthanc.sop_instance_uids() == set(series.sop_instance_uids)
        for i in orthanc.instances():
            tags = orthanc.rest("GET", f"/instances/{i}/simplified-tags")
            with urllib.request.urlopen(
                f"{orthanc.url}/instances/{i}/metadata/TransferSyntax"
            ) as r:
                syntax = r.read().decode()
            rle = tags["SOPInstanceUID"] == series.sop_instance_uids[2]
            assert (syntax == RLELossless) == rle  # each as it was stored
        exporter.outbox.close()


class FakeStowServer:
    """A STOW-RS endpoint that answers with a chosen status and per-instance outcomes. A fake,
    because no server that can run here refuses single instances: Orthanc 1.10 acknowledges
    (HTTP 200, Referenced SOP Sequence) even the instances its Lua filter drops."""

    def __init__(self, status: int, failed: dict[str, int], referenced: set[str]) -> None:
        import http.server

        outer = self
        self.requests: list[bytes] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                item = lambda uid, extra: {"00081155": {"vr": "UI", "Value": [uid]}, **extra}  # noqa: E731
                body = {
                    "00081198": {"vr": "SQ", "Value": [
                        item(u, {"00081197": {"vr": "US", "Value": [r]}}) for u, r in failed.items()
                    ]},
                    "00081199": {"vr": "SQ", "Value": [item(u, {}) for u in referenced]},
                }  # fmt: skip
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_stow_rs_outcomes_per_instance(tmp_path):
    series = write_ct_series(tmp_path / "series", slices=5, size=16, seed=18)
    uids = series.sop_instance_uids
    infos = [(i, describe_file(p)) for i, p in enumerate(series.files)]
    fake = FakeStowServer(202, {uids[1]: 0xA900, uids[2]: 0xA700}, {uids[0], uids[4]})
    try:
        results: list[FileResult] = []
        web = WebDestination("web", fake.url, username="dataflow", password="s3cret")
        web.transport().send(infos, results.append)
        outcomes = [(r.index, r.outcome, r.error) for r in results]
        assert outcomes == [
            (0, "delivered", ""),
            (1, "permanent", "STOW-RS failure 0xA900"),
            (2, "transient", "STOW-RS failure 0xA700"),
            (3, "permanent", "HTTP 202: not acknowledged"),
            (4, "delivered", ""),
        ]
        (request,) = fake.requests  # one multipart request, the files' own bytes in it
        assert all(path.read_bytes() in request for path in series.files)
    finally:
        fake.close()
    conflict = FakeStowServer(409, {uids[1]: 0xC000}, set())
    try:
        results = []
        WebDestination("web", conflict.url).transport().send(infos[:3], results.append)
        assert [r.outcome for r in results] == ["transient", "permanent", "transient"]
    finally:
        conflict.close()


def test_stow_rs_to_a_server_that_is_down_or_a_wrong_url(private_network, tmp_path):
    series = write_ct_series(tmp_path / "series", slices=1, size=16, seed=19)
    infos = [(0, describe_file(series.files[0]))]
    down = WebDestination("web", f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(TransientExportError, match="ConnectionRefused"):
        down.transport().send(infos, lambda r: None)
    assert not down.transport().echo().ok
    with start_orthanc_dicomweb(tmp_path / "orthanc") as orthanc:
        wrong = WebDestination("web", f"{orthanc.url}/no-such-root")
        with pytest.raises(TransientExportError, match="HTTP 404"):
            wrong.transport().send(infos, lambda r: None)
        exporter = exporter_for(tmp_path, down)
        task = exporter.enqueue(series.files, "web")
        exporter.run_once(timeout=HANG)
        pending = exporter.outbox.get(task.id)
        assert pending.state == "pending" and "ConnectionRefused" in pending.last_error
        exporter.outbox.close()
