"""The export outbox's state machine, backoff and durability, on a fake clock (no network)."""

from __future__ import annotations

import random
import shutil

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from connectors.dicom.export.exporter import Exporter
from connectors.dicom.export.outbox import Outbox, RetryPolicy
from connectors.dicom.export.sender import Destination, plan_contexts
from connectors.dicom.export.transport import (
    DestinationError,
    ExportError,
    FileResult,
    classify_status,
    describe_file,
)
from operators.dicom.phantom import write_ct_series
from operators.register import register_files


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


POLICY = RetryPolicy(initial_delay=1.0, factor=2.0, max_delay=5.0, deadline=60.0, jitter=0.0)


@pytest.fixture
def series(tmp_path):
    write_ct_series(tmp_path / "series", slices=3, size=16, seed=1)
    return sorted((tmp_path / "series").iterdir())


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def outbox(tmp_path, clock):
    box = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    yield box
    box.close()


def test_backoff_is_exponential_capped_and_jittered():
    assert [POLICY.delay(n) for n in range(1, 7)] == [1, 2, 4, 5, 5, 5]
    jittered = RetryPolicy(initial_delay=10, jitter=0.1)
    delays = [jittered.delay(1, random.Random(k)) for k in range(50)]
    assert all(9 <= d <= 11 for d in delays) and len(set(delays)) > 1


def test_enqueue_copies_the_files_and_survives_reopening(tmp_path, series, clock):
    box = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    task = box.enqueue(series, "pacs", job_id="job-1")
    assert (task.state, task.files, task.attempts, task.deadline) == ("pending", 3, 0, 1060.0)
    shutil.rmtree(series[0].parent)  # the job's folder may go: the outbox has its own copy
    box.close()
    box = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    assert [t.id for t in box.tasks("pending")] == [task.id]
    assert all(info.path.is_file() for _, info in box.pending_files(task.id))
    assert {info.sop_class for _, info in box.pending_files(task.id)} == {CTImageStorage}
    box.close()


def test_enqueue_of_a_registered_task_folder(tmp_path, series, outbox):
    record = register_files(
        series[0].parent, tmp_path / "task", agent="ClaraSCU", destinations=["pacs"], job_id="j"
    )
    task = outbox.enqueue(tmp_path / "task", "pacs", job_id="j")
    assert [r.name for r in outbox.files(task.id)] == record["uris"]


def test_a_file_that_is_not_dicom_queues_nothing(tmp_path, series, outbox):
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ExportError, match=r"notes\.txt: not a DICOM file"):
        outbox.enqueue([*series, tmp_path / "notes.txt"], "pacs")
    assert outbox.tasks() == [] and list(outbox.folder.iterdir()) == []


def test_claim_follows_due_time_and_destination(series, outbox, clock):
    first = outbox.enqueue(series[:1], "a")
    clock.t += 1
    second = outbox.enqueue(series[1:], "b")
    assert outbox.claim("b").id == second.id
    assert outbox.claim("b") is None  # in progress now
    assert outbox.claim(exclude=[first.id]) is None
    claimed = outbox.claim()
    assert (claimed.id, claimed.state) == (first.id, "in-progress")


def test_in_progress_tasks_are_pending_again_after_a_restart(tmp_path, series, outbox, clock):
    task = outbox.enqueue(series, "pacs")
    outbox.claim()
    outbox.record(task.id, FileResult(0, "delivered", 0))
    outbox.close()
    clock.t += 5
    box = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    resumed = box.get(task.id)
    assert (resumed.state, resumed.next_attempt, resumed.delivered) == ("pending", 1005.0, 1)
    assert [index for index, _ in box.pending_files(task.id)] == [1, 2]  # not resent
    box.close()


def test_failed_attempts_back_off_until_the_deadline_then_die(series, outbox, clock):
    task = outbox.enqueue(series, "pacs", deadline=20.0)
    waits = []
    while True:
        assert outbox.claim().id == task.id
        task = outbox.finish_attempt(task.id, "pacs: connection refused")
        if task.state == "dead":
            break
        waits.append(task.next_attempt - clock.t)
        assert outbox.claim() is None  # not due yet
        clock.t = task.next_attempt
    assert waits == [1, 2, 4, 5, 5, 3]  # the last wait ends at the deadline itself
    assert task.attempts == 7 and clock.t == 1020.0
    assert task.last_error == "deadline passed after 7 attempts: pacs: connection refused"
    assert outbox.dead_letters() == [task]


def test_max_attempts_dead_letters_with_the_reason(tmp_path, series, clock):
    box = Outbox(tmp_path / "o", policy=RetryPolicy(max_attempts=2, jitter=0), clock=clock)
    task = box.enqueue(series, "pacs")
    box.claim()
    assert box.finish_attempt(task.id, "refused").state == "pending"
    clock.t = box.get(task.id).next_attempt
    box.claim()
    task = box.finish_attempt(task.id, "refused")
    assert (task.state, task.last_error) == ("dead", "gave up after 2 attempts: refused")
    box.close()


def test_progress_per_file_then_success_removes_the_files(series, outbox, clock):
    task = outbox.enqueue(series, "pacs")
    outbox.claim()
    outbox.record(task.id, FileResult(0, "delivered", 0))
    outbox.record(task.id, FileResult(1, "delivered", 0xB000))
    outbox.record(task.id, FileResult(2, "transient", 0xA700, "C-STORE status 0xA700"))
    task = outbox.finish_attempt(task.id, "C-STORE status 0xA700")
    assert (task.state, task.delivered, task.attempts) == ("pending", 2, 1)
    assert [index for index, _ in outbox.pending_files(task.id)] == [2]
    clock.t = task.next_attempt
    outbox.claim()
    outbox.record(task.id, FileResult(2, "delivered", 0))
    task = outbox.finish_attempt(task.id)
    assert (task.state, task.delivered, task.last_error) == ("succeeded", 3, "")
    assert not (outbox.folder / task.id).exists()
    clock.t += 100
    assert outbox.prune(older_than=50) == 1 and outbox.tasks() == []


def test_a_refused_instance_dead_letters_the_task_and_requeue_retries_it(series, outbox):
    task = outbox.enqueue(series, "pacs")
    outbox.claim()
    outbox.record(task.id, FileResult(0, "delivered", 0))
    outbox.record(task.id, FileResult(1, "permanent", 0xA900, "C-STORE status 0xA900"))
    outbox.record(task.id, FileResult(2, "delivered", 0))
    task = outbox.finish_attempt(task.id)
    assert task.state == "dead" and task.failed == 1
    assert task.last_error == "1 of 3 instance(s) refused: file #1: C-STORE status 0xA900"
    assert (outbox.folder / task.id).is_dir()  # kept for inspection or replay
    with pytest.raises(ExportError, match="only a dead task"):
        outbox.requeue(outbox.enqueue(series, "pacs").id)
    again = outbox.requeue(task.id)
    assert (again.state, again.attempts, again.failed) == ("pending", 0, 0)
    assert [index for index, _ in outbox.pending_files(task.id)] == [1]
    with pytest.raises(ExportError, match="only finished tasks"):
        outbox.delete(task.id)


def test_unknown_destination_is_dead_at_once(series, outbox):
    exporter = Exporter(outbox, [Destination("pacs", "PACS", "127.0.0.1", 104)])
    task = exporter.enqueue(series, "nowhere")
    assert task.state == "dead"
    assert "destination 'nowhere' is not configured (configured: pacs)" in task.last_error


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, "delivered"), (0xB000, "delivered"), (0x0001, "delivered"),
        (0xA900, "permanent"), (0xC123, "permanent"), (0x0122, "permanent"),
        (0xA700, "transient"), (0x0110, "transient"), (0xFE00, "transient"),
    ],
)  # fmt: skip
def test_status_classes(status, outcome):
    assert classify_status(status) == outcome


def test_contexts_offer_the_stored_syntax_and_uncompressed(tmp_path):
    write_ct_series(tmp_path / "rle", slices=1, size=16, transfer_syntax=RLELossless)
    write_ct_series(tmp_path / "raw", slices=1, size=16, seed=2)
    infos = [describe_file(p) for p in sorted(tmp_path.rglob("*.dcm"))]
    uncompressed = [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]
    assert plan_contexts(infos) == [
        [(CTImageStorage, [RLELossless]), (CTImageStorage, uncompressed)]
    ]
    assert plan_contexts(infos, "uncompressed") == [[(CTImageStorage, uncompressed)]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"port": 0}, "port 0"),
        ({"max_associations": 0}, "max_associations"),
        ({"tls_key": "k.pem"}, "tls_key needs tls_cert"),
        ({"transfer_syntax": "jpeg"}, "transfer_syntax"),
    ],
)
def test_destination_checks(kwargs, message):
    args = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, **kwargs}
    with pytest.raises(DestinationError, match=message):
        Destination(**args)


def test_registered_results_one_task_per_destination_once(tmp_path, series, outbox):
    record = register_files(
        series[0].parent, tmp_path / "task", agent="ClaraSCU", destinations=["pacs", "x"],
        job_id="job-7",
    )  # fmt: skip
    exporter = Exporter(outbox, [Destination("pacs", "PACS", "127.0.0.1", 104)])
    pacs, unknown = exporter.enqueue_registered(tmp_path / "task")
    assert (pacs.id, pacs.job_id, pacs.state) == (f"{record['taskId']}-pacs", "job-7", "pending")
    assert unknown.state == "dead"
    assert exporter.enqueue_registered(tmp_path / "task") == [pacs, unknown]  # not twice
    assert len(outbox.tasks()) == 2


@pytest.mark.parametrize("task_id", ["../x", "a/b", ".hidden", "x.partial"])
def test_task_ids_are_folder_names_and_checked(series, outbox, task_id):
    with pytest.raises(ExportError, match="task ID"):
        outbox.enqueue(series, "pacs", task_id=task_id)
    assert outbox.tasks() == []
