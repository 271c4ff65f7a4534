"""One process owns an outbox (an flock on outbox.lock): only it recovers and claims; another
process is a guest whose re-send is a request the owner carries out (issue 9, item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from deadlines import HANG

from connectors.dicom.export.outbox import Outbox, OutboxBusy, RetryPolicy
from operators.dicom.phantom import write_ct_series

POLICY = RetryPolicy(initial_delay=1.0, deadline=60.0, jitter=0.0)

HOLDER = """
import sys
from connectors.dicom.export.outbox import Outbox
box = Outbox(sys.argv[1], owner=True)
print("owner", box.owner, flush=True)
sys.stdin.read()  # holds the outbox until killed or its stdin closes
"""


@pytest.fixture
def series(tmp_path):
    write_ct_series(tmp_path / "series", slices=2, size=16, seed=1)
    return sorted((tmp_path / "series").iterdir())


@pytest.fixture
def holder(tmp_path):
    """Another process owning ``tmp_path/outbox``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "outbox")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().split() == ["owner", "True"]
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=HANG)
    proc.stdin.close()
    proc.stdout.close()


def test_a_guest_neither_recovers_nor_claims_and_its_requeue_is_a_request(tmp_path, series, holder):
    box = Outbox(tmp_path / "outbox", policy=POLICY)
    sending = box.enqueue(series, "pacs", task_id="sending")
    dead = box.enqueue(series, "pacs", task_id="dead")
    box.mark_dead(dead.id, "refused")
    assert not box.owner
    box._write("UPDATE tasks SET state='in-progress' WHERE id='sending'")  # as the owner does
    box.close()
    guest = Outbox(tmp_path / "outbox", policy=POLICY)
    assert not guest.owner and guest.owner_pid() == str(holder.pid)
    assert guest.get(sending.id).state == "in-progress"  # not recovered: it is being sent
    with pytest.raises(OutboxBusy, match=f"process {holder.pid}"):
        guest.claim()
    assert guest.requeue(dead.id).state == "dead"
    assert guest.requested() == [dead.id]
    guest.close()
    holder.kill()  # the owner dies: the kernel frees the lock at once
    holder.wait(timeout=HANG)
    owner = Outbox(tmp_path / "outbox", policy=POLICY, owner=True)
    assert owner.get(sending.id).state == "pending"  # the new owner recovers
    (requeued,) = owner.take_requests()
    assert (requeued.id, requeued.state, owner.requested()) == (dead.id, "pending", [])
    assert owner.take_requests() == []  # each request once
    owner.close()


def test_owner_true_waits_for_the_lock_then_names_the_owner(tmp_path, holder):
    with pytest.raises(OutboxBusy, match=f"owned by process {holder.pid}"):
        Outbox(tmp_path / "outbox", owner=True, lock_timeout=0.2)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=HANG)
    box = Outbox(tmp_path / "outbox", owner=True, lock_timeout=HANG)
    assert box.owner
    box.close()
    again = Outbox(tmp_path / "outbox")
    assert again.owner  # closing released it
    again.close()
