"""Only the process that owns the outbox recovers and sends; another process (``dataflow
exports``, a script) opening it while the owner sends only reads and asks (issue 9, item 7:
a second ``Outbox(...)`` used to turn the running task back to pending and 50 of 64 instances
were sent twice)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from deadlines import HANG, wait_until
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from connectors.dicom.export.exporter import Destination, Exporter, Outbox, RetryPolicy
from operators.dicom.phantom import write_ct_series

pytestmark = pytest.mark.integration

FAST = RetryPolicy(initial_delay=0.2, factor=2.0, max_delay=0.5, deadline=300.0, jitter=0.0)

GUEST = """
import sys
from connectors.dicom.export.outbox import Outbox
box = Outbox(sys.argv[1])
running = box.get(sys.argv[3])
print(box.owner, running.state, box.requeue(sys.argv[2]).state, box.requested())
box.close()
"""


class SlowPeer:
    """A pynetdicom storage SCP on 127.0.0.1 that answers each C-STORE after ``delay`` seconds,
    holds every answer after the first ``hold_after`` until :attr:`gate` is set (so that the
    test acts while a task is surely in progress), and counts every SOP Instance UID."""

    def __init__(self, delay: float, hold_after: int) -> None:
        self.delay, self.received, self._lock = delay, Counter(), threading.Lock()
        self.hold_after, self.gate = hold_after, threading.Event()
        ae = AE(ae_title="SLOWPEER")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        time.sleep(self.delay)
        if self.total() >= self.hold_after:
            self.gate.wait(HANG)
        with self._lock:
            self.received[event.request.AffectedSOPInstanceUID] += 1
        return 0x0000

    def total(self) -> int:
        with self._lock:
            return sum(self.received.values())


def test_a_second_process_neither_resends_the_running_task_nor_sends_itself(tmp_path):
    running_series = write_ct_series(tmp_path / "running", slices=24, size=16, seed=1)
    dead_series = write_ct_series(tmp_path / "dead", slices=3, size=16, seed=2)
    peer = SlowPeer(delay=0.05, hold_after=2)
    outbox = Outbox(tmp_path / "outbox", policy=FAST)
    pacs = Destination("pacs", "SLOWPEER", "127.0.0.1", peer.port, max_associations=2)
    exporter = Exporter(outbox, [pacs], poll_interval=0.05)
    try:
        dead = outbox.enqueue(dead_series.files, "pacs", task_id="dead-letter")
        outbox.mark_dead(dead.id, "pacs: refused for the test")
        running = exporter.enqueue(running_series.files, "pacs", task_id="running")
        exporter.start()
        wait_until(lambda: peer.total() >= 2, "the first instances at the peer")
        guest = subprocess.run(
            [sys.executable, "-c", GUEST, str(tmp_path / "outbox"), dead.id, running.id],
            capture_output=True, text=True, timeout=HANG, check=False,
        )  # fmt: skip
        peer.gate.set()
        assert guest.returncode == 0, guest.stderr
        # the guest saw the task in progress, left it so, and only asked for the re-send
        assert guest.stdout.split() == ["False", "in-progress", "dead", "['dead-letter']"]
        wait_until(
            lambda: {t.state for t in outbox.tasks()} == {"succeeded"}, "both tasks delivered"
        )
        assert outbox.requested() == []  # the owner carried the request out
        expected = set(running_series.sop_instance_uids) | set(dead_series.sop_instance_uids)
        assert set(peer.received) == expected
        assert [uid for uid, n in peer.received.items() if n > 1] == []  # none sent twice
    finally:
        peer.gate.set()
        exporter.stop()
        outbox.close()
        peer.server.shutdown()
