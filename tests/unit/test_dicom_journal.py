"""The receiver's ingest journal without a network (``connectors/dicom/receive/journal.py``):
instances placed through it, a clean close, and the replay after a real kill -9 of the process
that wrote it: what the index and the folders lost comes back, a torn last record stops the
replay, a record never acknowledged is not made up, the disk reserve and a rolled-back batch
leave no valid record."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import pytest
from deadlines import HANG, returns_before_a_hang, wait_until

from connectors.dicom.config import CalledAE
from connectors.dicom.receive import journal as journal_module
from connectors.dicom.receive.groups import GroupStore, Placement
from connectors.dicom.receive.journal import (
    JOURNAL_DIR,
    Journal,
    Staging,
    read_segment,
    recover,
)
from connectors.dicom.receive.spool import Header, write_temp

CT = "1.2.840.10008.5.1.4.1.1.2"


class JournaledSpool:
    """A spool whose instances go through a journal, as the receiver's committer does."""

    def __init__(self, root: Path, duplicates: str = "overwrite", **kw) -> None:
        self.root = root
        self.store = GroupStore(root, duplicates)
        self.journal = Journal(root, **kw)
        self.called = CalledAE("AE", routes=["p"], timeout=1)
        (root / ".incoming").mkdir(exist_ok=True)

    def item(self, sop: str, data: bytes, series: str = "1.3") -> Placement:
        temp = write_temp(self.root / ".incoming", [data], sync=False)
        header = Header(CT, sop, "1.2", series)
        return Placement(header, temp, len(data), self.called, "SCU", "127.0.0.1")

    def put(self, sop: str = "1.1", data: bytes = b"x", series: str = "1.3") -> Placement:
        item = self.item(sop, data, series)
        self.store.place([item], self.journal)
        return item


def contents(store: GroupStore) -> dict[str, bytes]:
    """SOP Instance UID -> bytes over every group, each group's files checked against its
    rows and its count."""
    got = {}
    for group in store.groups():
        rows = store.instances(group.id)
        assert group.instances == len(rows)
        assert sorted(group.folder.rglob("*.dcm")) == sorted(p for _, p in rows)
        got.update({sop: path.read_bytes() for sop, path in rows})
    return got


def segments(root: Path) -> list[Path]:
    return sorted((root / JOURNAL_DIR).glob("*/*.seg"))


def test_instances_land_and_a_clean_close_leaves_no_journal(tmp_path):
    spool = JournaledSpool(tmp_path)
    items = [spool.put(sop=f"1.1.{k}", data=f"data {k}".encode()) for k in range(3)]
    assert {i.status for i in items} == {0} and len({i.group_id for i in items}) == 1
    (segment,) = segments(tmp_path)
    _, _, records = read_segment(segment)
    assert [r.meta["sop"] for r in records] == ["1.1.0", "1.1.1", "1.1.2"]
    assert contents(spool.store) == {f"1.1.{k}": f"data {k}".encode() for k in range(3)}
    assert not list((tmp_path / ".incoming").iterdir())
    spool.journal.close()
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []
    assert contents(spool.store) == {f"1.1.{k}": f"data {k}".encode() for k in range(3)}


def test_an_idle_journal_is_checkpointed_and_its_segment_reused(tmp_path):
    spool = JournaledSpool(tmp_path, idle=0.05)
    spool.put(sop="1.1.1")
    wait_until(lambda: spool.journal.checkpoints, "an idle checkpoint", HANG, poll=0.01)
    assert spool.journal.checkpoints == 1 and segments(tmp_path) == []
    spool.put(sop="1.1.2")  # into a spare: blocks already written
    (segment,) = segments(tmp_path)
    assert [r.meta["sop"] for r in read_segment(segment)[2]] == ["1.1.2"]
    spool.journal.close()


def test_full_segments_beyond_the_backlog_are_checkpointed_at_once(tmp_path):
    spool = JournaledSpool(tmp_path, segment_size=4096, idle=3600, backlog=2)
    for k in range(3):  # each record fills its own segment
        spool.put(sop=f"1.1.{k}", data=bytes(3000))
    wait_until(lambda: spool.journal.checkpoints, "a checkpoint of the backlog", HANG, poll=0.01)
    assert [read_segment(p)[0] for p in segments(tmp_path)] == [3]  # the open one waits
    assert len(contents(spool.store)) == 3
    spool.journal.close()


WRITE_AND_DIE = """
import json, os, signal, sys
from pathlib import Path
sys.path[:0] = [{tests!r}, {shared!r}]
from test_dicom_journal import JournaledSpool
spool = JournaledSpool(Path({root!r}), {duplicates!r})
for sop, data in json.loads({puts!r}):
    spool.put(sop=sop, data=data.encode())
os.kill(os.getpid(), signal.SIGKILL)  # no checkpoint, no close
"""


def write_and_die(root: Path, puts: list[tuple[str, str]], duplicates: str = "overwrite"):
    here = Path(__file__).parent
    script = WRITE_AND_DIE.format(tests=str(here), shared=str(here.parent), root=str(root),
                                  puts=json.dumps(puts), duplicates=duplicates)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=HANG)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def lose_index_and_folders(root: Path) -> None:
    """What a power cut may do to what was written behind the acknowledgement: the index's
    rows and groups, and the folder files, gone."""
    store = GroupStore(root)
    for group in store.groups():
        for _, path in store.instances(group.id):
            path.unlink()
    store._db.execute("DELETE FROM instances")
    store._db.execute("DELETE FROM groups")
    store.close()


def test_replay_puts_back_what_the_index_and_the_folders_lost(tmp_path):
    write_and_die(tmp_path, [("1.1.1", "one"), ("1.1.2", "two"), ("1.1.3", "three")])
    before = GroupStore(tmp_path)
    (group,) = before.groups()
    before.close()
    lose_index_and_folders(tmp_path)
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 3
    assert contents(store) == {"1.1.1": b"one", "1.1.2": b"two", "1.1.3": b"three"}
    (again,) = store.groups("pending")
    assert (again.id, again.folder, again.uid) == (group.id, group.folder, group.uid)
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []
    assert recover(tmp_path, store) == 0  # nothing left to replay


def test_replay_after_kill_9_changes_nothing_that_is_already_there(tmp_path):
    write_and_die(tmp_path, [("1.1.1", "one"), ("1.1.2", "two")])
    store = GroupStore(tmp_path)
    (group,) = store.groups()
    assert recover(tmp_path, store) == 2
    assert contents(store) == {"1.1.1": b"one", "1.1.2": b"two"}
    assert [g.id for g in store.groups()] == [group.id] and store.groups()[0].instances == 2


@pytest.mark.parametrize("index_lost", [False, True])
def test_a_torn_last_record_stops_the_replay(tmp_path, index_lost):
    write_and_die(tmp_path, [("1.1.1", "one"), ("1.1.2", "two"), ("1.1.3", "three" * 1000)])
    (segment,) = segments(tmp_path)
    _, _, records = read_segment(segment)
    last = records[-1]
    os.truncate(segment, last.offset + last.size // 2)  # the third append torn half-way
    if index_lost:
        lose_index_and_folders(tmp_path)
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 2
    # the third was never acknowledged (its record is not whole): neither row nor file stays
    assert contents(store) == {"1.1.1": b"one", "1.1.2": b"two"}
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []


def test_a_replaced_copy_is_not_brought_back(tmp_path):
    write_and_die(tmp_path, [("1.1.1", "first"), ("1.1.1", "second"), ("1.1.1", "third")])
    lose_index_and_folders(tmp_path)
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 3
    assert contents(store) == {"1.1.1": b"third"}


def test_two_copies_in_one_batch_replay_as_they_were_written(tmp_path):
    spool = JournaledSpool(tmp_path, idle=3600)
    batch = [spool.item("1.1.1", b"first"), spool.item("1.1.1", b"second")]
    spool.store.place(batch, spool.journal)  # one transaction: the same time for both
    assert contents(spool.store) == {"1.1.1": b"second"}
    os.close(spool.journal._lock_fd)  # as if the process died: its journal is let go
    with spool.journal._cv:  # and its checkpoint thread ends
        spool.journal._stopping = True
        spool.journal._cv.notify()
    spool.store.close()
    lose_index_and_folders(tmp_path)
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 2
    assert contents(store) == {"1.1.1": b"second"}


def staged_item(spool: JournaledSpool, sop: str, data: bytes) -> Placement:
    """An instance the direct C-STORE path kept in memory: no temp file."""
    staging = Staging(capacity=1 << 20)
    staging.reset()
    staging.add(data)
    header = Header(CT, sop, "1.2", "1.3")
    return Placement(header, None, len(data), spool.called, "SCU", "127.0.0.1",
                     crc=zlib.crc32(data), staged=staging)  # fmt: skip


def test_a_batch_of_instances_in_memory_is_written_whole_across_segments(tmp_path):
    """A batch's records from memory go to the device together (one pwritev per run of
    records), also when the batch fills a segment and goes on in the next: every record is
    whole, with its bytes, before the batch is answered."""
    spool = JournaledSpool(tmp_path, segment_size=5 * 4096, idle=3600)  # 4 blocks for records
    sent = {f"1.1.{k}": os.urandom(3000 + 1000 * k) for k in range(5)}
    batch = [staged_item(spool, sop, data) for sop, data in sent.items()]
    spool.store.place(batch, spool.journal)
    assert {item.status for item in batch} == {0}
    found = {}
    for path in segments(tmp_path):
        for record in read_segment(path)[2]:  # whole records only (their data's CRC checked)
            with open(record.path, "rb") as fp:
                fp.seek(record.offset)
                found[record.meta["sop"]] = fp.read(record.size)
    assert found == sent
    assert len(segments(tmp_path)) == 4  # 2 records, then 1 each (their data: 2 or 3 blocks)
    for item in batch:
        os.close(item.fd)
        spool.journal.release(item.segment, True)
    spool.journal.close()


def test_an_instance_in_memory_gets_its_folder_file_after_its_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "HOLD_WAIT", 0.05)
    spool = JournaledSpool(tmp_path, idle=3600)
    item = staged_item(spool, "1.1.1", b"in memory")
    spool.store.place([item], spool.journal)
    assert item.status == 0 and item.fd is not None
    ((_, path),) = spool.store.instances(item.group_id)
    assert path.read_bytes() == b""  # made in the commit, written after the answer
    (segment,) = segments(tmp_path)
    ((record),) = read_segment(segment)[2]  # the record came from memory, whole
    assert (record.meta["sop"], record.size) == ("1.1.1", len(b"in memory"))
    assert record.offset % journal_module.BLOCK == 0
    spool.journal.checkpoint()  # not reclaimed while its folder file is not written
    assert segments(tmp_path) == [segment]
    item.staged.write_file(item.fd, item.direct)  # as the receiver does after the answer
    os.close(item.fd)
    spool.journal.release(item.segment, True)
    spool.journal.checkpoint()
    assert segments(tmp_path) == []
    assert contents(spool.store) == {"1.1.1": b"in memory"}
    spool.journal.close()
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []


@pytest.mark.parametrize("size", [1, 4096, 5000, 525 * 1024])
def test_a_staged_instance_is_written_whole_into_its_folder_file(tmp_path, size):
    """Whole blocks with O_DIRECT (where the file system takes it), cut to the size: not a
    byte of padding, nor of the previous instance the buffer held, is left in the file."""
    data = os.urandom(size)
    staging = Staging(capacity=1 << 20)
    staging.reset()
    staging.add(os.urandom(600 * 1024))  # the previous instance's bytes, still in memory
    staging.reset()
    staging.add(data)
    fd, direct = journal_module.create_file(tmp_path / "one.dcm")
    staging.write_file(fd, direct)
    os.close(fd)
    assert (tmp_path / "one.dcm").read_bytes() == data


def test_a_refused_direct_write_is_done_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that opens files with O_DIRECT but refuses the write (EINVAL)."""
    data = os.urandom(5000)
    staging = Staging(capacity=1 << 20)
    staging.reset()
    staging.add(data)
    real, calls = journal_module._write_all, []

    def refusing(fd, view, offset):
        calls.append(len(view))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, view, offset)

    monkeypatch.setattr(journal_module, "_write_all", refusing)
    fd = os.open(tmp_path / "one.dcm", os.O_WRONLY | os.O_CREAT, 0o640)
    staging.write_file(fd, True)
    os.close(fd)
    assert calls == [8192, 5000] and (tmp_path / "one.dcm").read_bytes() == data


def test_a_group_is_not_completed_before_its_folder_files_are_written(tmp_path):
    """Acknowledged from memory, the folder file is written just after the answer: until
    it is (or, where that write failed, until the next start's replay writes it), neither
    the quiet time nor the association's release completes the group."""
    spool = JournaledSpool(tmp_path, idle=3600)
    item = staged_item(spool, "1.1.1", b"acknowledged")
    spool.store.place([item], spool.journal)
    (group,) = spool.store.groups("pending")
    later = group.last_arrival + 3600
    assert spool.store.complete_due(later, 0) == [] and spool.store.complete([group.id]) == []
    item.staged.write_file(item.fd, item.direct)
    os.close(item.fd)
    spool.journal.release(item.segment, True)
    assert spool.store.complete_due(later, 0) == [group.id]
    (path,) = [p for _, p in spool.store.instances(group.id)]
    assert path.read_bytes() == b"acknowledged"
    spool.journal.close()


def test_a_folder_file_not_written_after_its_answer_comes_back_at_the_next_start(tmp_path):
    spool = JournaledSpool(tmp_path, idle=3600)
    item = staged_item(spool, "1.1.1", b"acknowledged")
    spool.store.place([item], spool.journal)
    os.close(item.fd)  # the write failed (a full disk, say): the file stays empty
    spool.journal.release(item.segment, False)
    spool.journal.close()  # kept for replay, and let go
    assert segments(tmp_path) != []
    spool.store.close()
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 1
    assert contents(store) == {"1.1.1": b"acknowledged"}
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []


def test_a_flush_that_fails_after_the_commit_leaves_the_journal_for_replay(tmp_path, monkeypatch):
    """The commit went through but the journal's fdatasync failed: no Success, the folder
    file is let go, and the journal is kept (the instance's fate is the replay's to say)."""
    from types import SimpleNamespace

    from connectors.dicom.config import ReceiverConfig
    from connectors.dicom.receive.store import StoreSteps

    config = ReceiverConfig(spool=tmp_path, port=0, called_aes=[CalledAE("AE", timeout=1)])
    store = GroupStore(tmp_path)
    steps = StoreSteps(config, store, lambda: False)
    steps.start()
    spool = SimpleNamespace(called=config.called_aes[0])
    staged = staged_item(spool, "1.1.1", b"bytes").staged
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="SCU", address="127.0.0.1"))

    def failing(self, upto=None):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Journal, "sync", failing)
    with pytest.raises(OSError):
        steps.place(assoc, spool.called, Header(CT, "1.1.1", "1.2", "1.3"), None, 5,
                    zlib.crc32(b"bytes"), staged)  # fmt: skip
    assert staged.deferred is None  # nothing for the intake to write
    monkeypatch.undo()
    # the folder file let go: the stop does not wait for it to be written (it never will)
    monkeypatch.setattr(journal_module, "HOLD_WAIT", 100 * HANG)
    returns_before_a_hang(steps.stop)  # the journal is kept, not removed
    assert segments(tmp_path) != []
    store.close()
    again = GroupStore(tmp_path)
    assert recover(tmp_path, again) == 1
    assert contents(again) == {"1.1.1": b"bytes"}


class GatedStore(GroupStore):
    """A real GroupStore whose commits wait while ``gate`` is closed, and whose batches are
    counted (and fail with EIO while ``failing``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate, self.batches, self.failing = threading.Event(), [], False

    def place(self, batch, journal=None, appended=None) -> None:
        self.batches.append(len(batch))
        assert self.gate.wait(HANG), "the test did not open the gate"
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super().place(batch, journal, appended)


def test_writers_in_flight_share_one_commit_and_each_gets_its_own_answer(tmp_path):
    """Group commit (the receiver's committer): while one commit runs, the writers that
    arrive ride along in the next, one batch; each gets its own answer, a failed batch's
    writers get its error, and the next batch goes on."""
    from connectors.dicom.receive.store import _Committer

    spool = JournaledSpool(tmp_path)
    store = GatedStore(tmp_path)
    committer = _Committer(store, spool.journal)
    answers: dict[str, BaseException | None] = {}

    def submit(item: Placement) -> None:
        try:
            committer.submit(item)
            answers[item.header.sop_instance_uid] = None
        except BaseException as exc:  # what the writer is answered
            answers[item.header.sop_instance_uid] = exc

    def together(items: list[Placement]) -> None:
        """The first commits alone (held at the gate) while the others queue behind it."""
        before = len(store.batches)
        threads = [threading.Thread(target=submit, args=(item,)) for item in items]
        threads[0].start()
        wait_until(lambda: len(store.batches) > before, "the first commit", HANG, poll=0.005)
        for thread in threads[1:]:
            thread.start()
        queued = len(items) - 1
        wait_until(lambda: len(committer._queue) == queued, "writers queued", HANG, poll=0.005)
        store.gate.set()
        for thread in threads:
            returns_before_a_hang(thread.join)
        store.gate.clear()

    items = [spool.item(f"1.1.{k}", f"data {k}".encode()) for k in range(8)]
    together(items)
    assert store.batches == [1, 7]
    assert answers == {f"1.1.{k}": None for k in range(8)}
    assert {item.status for item in items} == {0}
    assert contents(store) == {f"1.1.{k}": f"data {k}".encode() for k in range(8)}

    store.failing = True  # both batches fail: each of their writers gets the error
    together([spool.item(f"1.2.{k}", b"late") for k in range(3)])
    assert store.batches == [1, 7, 1, 2]
    assert [getattr(answers[f"1.2.{k}"], "errno", None) for k in range(3)] == [errno.EIO] * 3
    store.failing = False
    store.gate.set()
    again = spool.item("1.3.1", b"again")
    committer.submit(again)  # the committer goes on
    assert again.status == 0 and contents(store)["1.3.1"] == b"again"
    committer.stop()


def test_a_segment_of_the_previous_format_is_replayed(tmp_path):
    """DFJSEG01 (before 2026-12-05): records back to back from byte 64, no padding."""
    write_and_die(tmp_path, [("1.1.1", "one"), ("1.1.2", "two" * 3000)])
    (segment,) = segments(tmp_path)
    raw = segment.read_bytes()
    head = b"DFJSEG01" + raw[8:32]  # magic, seq, journal id; then their CRC-32
    old = bytearray(head + struct.pack("<I", zlib.crc32(head))).ljust(64, b"\0")
    for record in read_segment(segment)[2]:
        at = record.offset - journal_module.BLOCK  # the front block: header, metadata
        meta_len = struct.unpack_from("<I", raw, at + 12)[0]
        old += raw[at : at + journal_module.REC_HEADER + meta_len]
        old += raw[record.offset : record.offset + record.size]
    segment.write_bytes(bytes(old))
    lose_index_and_folders(tmp_path)
    store = GroupStore(tmp_path)
    assert recover(tmp_path, store) == 2
    assert contents(store) == {"1.1.1": b"one", "1.1.2": b"two" * 3000}


def test_a_rolled_back_batch_leaves_no_valid_record(tmp_path):
    spool = JournaledSpool(tmp_path)
    spool.put(sop="1.1.1", data=b"kept")
    first = spool.item("1.1.2", b"rolled back")
    second = spool.item("1.1.3", b"missing")
    second.temp.unlink()  # its copy into the journal fails
    with pytest.raises(FileNotFoundError):
        spool.store.place([first, second], spool.journal)
    (segment,) = segments(tmp_path)
    assert [r.meta["sop"] for r in read_segment(segment)[2]] == ["1.1.1"]
    assert contents(spool.store) == {"1.1.1": b"kept"}
    assert spool.put(sop="1.1.4", data=b"next").status == 0
    assert [r.meta["sop"] for r in read_segment(segment)[2]] == ["1.1.1", "1.1.4"]
    spool.journal.close()


def test_a_segment_beyond_the_disk_reserve_is_refused(tmp_path):
    spool = JournaledSpool(tmp_path, reserve_ok=lambda nbytes: False)
    with pytest.raises(OSError) as err:
        spool.put(sop="1.1.1")
    assert err.value.errno == errno.ENOSPC
    assert segments(tmp_path) == [] and spool.store.groups() == []
    assert not list((tmp_path / ".incoming").iterdir())
    spool.journal.close()


def test_a_full_disk_when_preallocating_is_enospc_and_nothing_is_written(tmp_path, monkeypatch):
    def full(fd, size, written=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module, "allocate", full)  # the spare's zeros too
    spool = JournaledSpool(tmp_path)
    with pytest.raises(OSError) as err:
        spool.put(sop="1.1.1")
    assert err.value.errno == errno.ENOSPC
    assert segments(tmp_path) == [] and spool.store.groups() == []
    spool.journal.close()


def test_a_live_journal_is_not_replayed(tmp_path):
    spool = JournaledSpool(tmp_path)
    spool.put(sop="1.1.1")
    other = GroupStore(tmp_path)
    assert recover(tmp_path, other) == 0 and len(segments(tmp_path)) == 1
    spool.journal.close()
