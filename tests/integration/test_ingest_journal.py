"""The receiver's ingest journal (``connectors/dicom/receive/journal.py``, one device flush per
acknowledged instance) against real processes: kill -9 of ``dataflow serve`` while two dcmtk
``storescu`` send at once, then a restart: every instance storescu saw acknowledged is in the
spool exactly once, byte for byte, and the study's one job processes it; a segment the disk
reserve cannot afford refuses with Out of Resources and leaves nothing; ``journal: false``
keeps the previous design (no journal at all)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from cli import serve, wait_serving
from deadlines import HANG, LONG_HANG, wait_until
from dicom_peers import DCMTK_ENV, dcmtk, free_port, storescu, wait_for_port
from pydicom.filereader import _read_file_meta_info

from connectors.dicom.config import CalledAE, Peer, ReceiverConfig
from connectors.dicom.receive.groups import GroupStore
from connectors.dicom.receive.journal import JOURNAL_DIR
from connectors.dicom.receive.receiver import Receiver
from connectors.dicom.receive.store import StoreSteps
from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration]

DATA = Path(__file__).parent / "service_data"
AET = "INVENTORY"


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after a Part-10 file's meta information."""
    with open(path, "rb") as fp:
        assert fp.read(132)[128:] == b"DICM"
        _read_file_meta_info(fp)
        return fp.read()


def processed(state: Path) -> Counter:
    """SOP Instance UID -> how many jobs' inventories list it."""
    seen: Counter = Counter()
    for path in state.glob("jobs/*/inventory/inventory/uids.json"):
        seen.update(json.loads(path.read_text()))
    return seen


def send_and_count(port: int, files: list[Path], sop_of: dict[str, str], acked: list,
                   lock: threading.Lock, on_ack) -> subprocess.Popen:  # fmt: skip
    """One storescu over ``files``, reading its verbose output: each acknowledged instance's
    UID goes into ``acked`` (``on_ack`` called after each)."""
    args = [dcmtk("storescu"), "-v", "-aet", "SCANNER", "-aec", AET, "127.0.0.1", str(port)]
    scu = subprocess.Popen([*args, *map(str, files)], env=DCMTK_ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    def read() -> None:
        current = None
        for line in scu.stdout:  # type: ignore[union-attr]
            if line.startswith("I: Sending file: "):
                current = line.split(": ", 2)[2].strip()
            elif "Received Store Response (Success)" in line:
                with lock:
                    acked.append(sop_of[current])
                on_ack()

    scu.reader = threading.Thread(target=read, daemon=True)  # type: ignore[attr-defined]
    scu.reader.start()  # type: ignore[attr-defined]
    return scu


@pytest.mark.slow
def test_kill_9_of_dataflow_serve_while_two_storescu_send(tmp_path):
    port = free_port()
    series = write_ct_series(tmp_path / "ct", slices=240, size=64, seed=41)
    files = [Path(f) for f in series.files]
    sop_of = {str(f): uid for f, uid in zip(files, series.sop_instance_uids)}
    config = tmp_path / "service.yaml"
    receiver = {"name": "plain", "host": "127.0.0.1", "port": port}
    called = {"pipelines": ["inventory"], "group-by": "study", "timeout": 1}
    config.write_text(json.dumps({  # JSON is YAML
        "state": str(tmp_path / "state"), "pipelines": {"inventory": str(DATA / "inventory.yaml")},
        "dicom": {"receivers": [receiver], "ae-titles": {AET: called}, "allow-unknown-peers": True},
    }))  # fmt: skip
    log, spool = tmp_path / "serve.log", tmp_path / "state" / "dicom" / "spool" / "plain"
    proc = serve(config, log)
    acked: list[str] = []
    lock = threading.Lock()
    try:
        wait_for_port(port, proc=proc, timeout=LONG_HANG)

        def on_ack() -> None:
            with lock:
                if len(acked) == 80 and proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)  # two associations in flight

        senders = [send_and_count(port, files[k::2], sop_of, acked, lock, on_ack)
                   for k in range(2)]  # fmt: skip
        for scu in senders:
            scu.wait(timeout=LONG_HANG)
            scu.reader.join(timeout=HANG)
            scu.stdout.close()
        assert proc.wait(timeout=HANG) == -signal.SIGKILL
        assert 80 <= len(acked) < len(files), "the service died in the middle"
        assert len(set(acked)) == len(acked)
        journals = list((spool / JOURNAL_DIR).iterdir())
        assert journals, "the killed service left its journal"
        proc = serve(config, log)  # the restart replays it
        wait_serving(lambda: set(acked) <= set(processed(tmp_path / "state")), LONG_HANG,
                     "every acknowledged instance processed", proc)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG)
    output = log.read_text()
    assert "journal_replayed" in output
    seen = processed(tmp_path / "state")
    assert all(seen[uid] == 1 for uid in acked), "an acknowledged instance in two jobs"
    store = GroupStore(spool)
    rows = [(sop, path) for g in store.groups() for sop, path in store.instances(g.id)]
    store.close()
    count = Counter(sop for sop, _ in rows)
    assert all(count[uid] == 1 for uid in acked), "an acknowledged instance stored twice"
    by_uid = dict(rows)
    sent = {uid: Path(f) for f, uid in sop_of.items()}
    for uid in acked:
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(sent[uid])
    assert list((spool / JOURNAL_DIR).iterdir()) == []


def _config(tmp: Path, **kw) -> ReceiverConfig:
    return ReceiverConfig(spool=tmp / "spool", port=0, called_aes=[CalledAE(AET, timeout=30)],
                          peers=[Peer("STORESCU")], **kw)  # fmt: skip


def test_a_segment_beyond_the_disk_reserve_refuses_with_out_of_resources(tmp_path, monkeypatch):
    """The temp file fits the reserve, the journal's segment does not: 0xA700 and nothing
    left, as for the temp file itself."""
    monkeypatch.setattr(StoreSteps, "_keeps_reserve", lambda self, nbytes: False)
    series = write_ct_series(tmp_path / "ct", slices=3, size=64, seed=42)
    rx = Receiver(_config(tmp_path), lambda group: None).start()
    try:
        result = storescu("127.0.0.1", rx.port, series.files, called=AET, extra=["-v", "-nh"])
        output = result.stdout + result.stderr
        assert output.count("Received Store Response (Refused: OutOfResources") == 3, output
        left = [p for p in rx.spool.rglob("*") if p.is_file() and "sqlite" not in p.name]
        assert left == [] and rx.groups() == []
    finally:
        rx.stop()


def test_journal_off_is_the_previous_design(tmp_path):
    series = write_ct_series(tmp_path / "ct", slices=4, size=64, seed=43)
    rx = Receiver(_config(tmp_path, journal=False), lambda group: None).start()
    try:
        result = storescu("127.0.0.1", rx.port, series.files, called=AET)
        assert result.returncode == 0, result.stdout + result.stderr
        (group,) = rx.groups()
        assert group.instances == 4 and not (rx.spool / JOURNAL_DIR).exists()
    finally:
        rx.stop()
    assert not (rx.spool / JOURNAL_DIR).exists()


def test_the_journal_of_a_killed_worker_is_replayed_by_the_main_receiver(tmp_path):
    """``processes: 2``: a worker killed with SIGKILL leaves its journal; the main receiver
    replays and removes it while it runs, and every instance is still there once."""
    series = write_ct_series(tmp_path / "ct", slices=32, size=64, seed=44)
    rx = Receiver(_config(tmp_path, processes=2), lambda group: None).start()
    try:
        for k in range(16):  # 16 associations: the kernel spreads them over both listeners
            sent = storescu("127.0.0.1", rx.port, series.files[k::16], called=AET)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        root = rx.spool / JOURNAL_DIR
        ours = rx.steps._committer._journal.folder.name
        theirs = {p.name for p in root.iterdir()} - {ours}
        assert theirs, "the worker journaled nothing"
        os.kill(rx.worker_pids[0], signal.SIGKILL)
        wait_until(lambda: not theirs & {p.name for p in root.iterdir()},
                   "the dead worker's journal replayed", HANG)  # fmt: skip
        (group,) = rx.groups()
        rows = rx.store.instances(group.id)
        assert group.instances == len(rows) == 32
        assert sorted(sop for sop, _ in rows) == sorted(series.sop_instance_uids)
    finally:
        rx.stop()
