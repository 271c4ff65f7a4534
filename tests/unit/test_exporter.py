"""The exporter's own logic — retries and their backoff, dead letters, partial failures, a stop
while a send hangs, a restart that resumes the outbox — against the in-memory transport
(``connectors.dicom.export.memory``: a fake PACS, because these are the exporter's decisions,
not the wire's; the DIMSE and STOW-RS transports are tested against dcmtk and Orthanc in
tests/integration/test_dicom_export.py). The outbox runs on a fake clock: time moves only when
a test moves it."""

from __future__ import annotations

import contextlib

import pytest
from deadlines import HANG, wait_until

from connectors.dicom.export.exporter import DOWN_AFTER, Exporter
from connectors.dicom.export.memory import MemoryTransport
from connectors.dicom.export.outbox import Outbox, RetryPolicy
from connectors.dicom.export.sender import Destination
from connectors.dicom.export.stow import WebDestination
from connectors.dicom.export.transport import DestinationError, Transport, Verifier
from operators.dicom.phantom import write_ct_series

POLICY = RetryPolicy(initial_delay=1.0, factor=2.0, max_delay=5.0, deadline=60.0, jitter=0.0)


class Clock:
    """The outbox's time: it moves when a test sets ``t``."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def series(tmp_path):
    return write_ct_series(tmp_path / "series", slices=3, size=16, seed=3)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def outbox(tmp_path, clock):
    with contextlib.closing(Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)) as box:
        yield box


@pytest.fixture
def pacs():
    return MemoryTransport("pacs")


@pytest.fixture
def heard():
    return []


@pytest.fixture
def exporter(outbox, pacs, heard):
    exporter = Exporter(outbox, [pacs], on_progress=lambda *event: heard.append(event))
    yield exporter
    exporter.stop(timeout=HANG)


def test_every_destination_builds_a_transport_that_also_verifies(pacs):
    dimse = Destination("pacs", "PACS", "127.0.0.1", 104).transport()
    web = WebDestination("web", "http://127.0.0.1:8042/dicom-web").transport()
    for transport in (dimse, web, pacs.transport()):
        assert isinstance(transport, Transport) and isinstance(transport, Verifier)
    assert pacs.transport() is pacs  # the in-memory one is its own destination


def test_failed_attempts_back_off_and_the_task_is_sent_when_the_peer_is_back(
    series, exporter, pacs, clock, heard
):
    pacs.refuse(4)
    task = exporter.enqueue(series.files, "pacs", job_id="job-1")
    waits = []
    for _ in range(4):
        assert exporter.run_once(timeout=HANG) == 1
        assert exporter.run_once(timeout=HANG) == 0  # not due before its backoff
        task = exporter.outbox.get(task.id)
        assert task.state == "pending"
        assert task.last_error == "pacs (in memory): association rejected"
        waits.append(task.next_attempt - clock.t)
        clock.t = task.next_attempt
    assert waits == [1.0, 2.0, 4.0, 5.0]  # initial * factor^(n-1), capped at max_delay
    assert exporter.run_once(timeout=HANG) == 1
    task = exporter.outbox.get(task.id)
    assert (task.state, task.attempts, task.delivered) == ("succeeded", 5, 3)
    assert [info.sop_instance for info in pacs.delivered] == list(series.sop_instance_uids)
    assert len(pacs.calls) == 5
    assert [event[2] for event in heard] == ["pending", "sent"]


def test_a_destination_that_keeps_refusing_is_down_until_an_attempt_gets_through(
    series, exporter, pacs, clock
):
    pacs.refuse(DOWN_AFTER)
    task = exporter.enqueue(series.files, "pacs")
    for attempt in range(1, DOWN_AFTER + 1):
        exporter.run_once(timeout=HANG)
        status = exporter.destination_status()["pacs"]
        assert (status["attempts"], status["down"]) == (attempt, attempt >= DOWN_AFTER)
        clock.t = exporter.outbox.get(task.id).next_attempt
    exporter.run_once(timeout=HANG)
    status = exporter.destination_status()["pacs"]
    assert (status["attempts"], status["down"], status["failed_total"]) == (0, False, DOWN_AFTER)
    assert exporter.outbox.get(task.id).state == "succeeded"


def test_a_task_dies_at_its_deadline_with_the_reason(series, exporter, pacs, clock, heard):
    pacs.refuse(100)
    task = exporter.enqueue(series.files, "pacs", deadline=6.0)
    attempts_at = []
    while (task := exporter.outbox.get(task.id)).state == "pending":
        attempts_at.append(clock.t - 1000.0)
        exporter.run_once(timeout=HANG)
        clock.t = exporter.outbox.get(task.id).next_attempt
    assert attempts_at == [0.0, 1.0, 3.0, 6.0]  # the last retry at the deadline, not after it
    assert task.state == "dead"
    assert task.last_error == (
        "deadline passed after 4 attempts: pacs (in memory): association rejected"
    )
    assert exporter.dead_letters() == [task]
    assert heard[-1] == (task.id, "pacs", "dead", task.last_error)


def test_an_instance_refused_for_good_dead_letters_the_task_once_the_rest_is_sent(
    series, exporter, pacs
):
    pacs.respond(series.sop_instance_uids[1], 0xA900)
    task = exporter.enqueue(series.files, "pacs")
    exporter.run_once(timeout=HANG)
    task = exporter.outbox.get(task.id)
    assert (task.state, task.delivered, task.failed, task.attempts) == ("dead", 2, 1, 1)
    assert task.last_error == "1 of 3 instance(s) refused: file #1: C-STORE status 0xA900"
    assert pacs.calls == [[0, 1, 2]]  # not retried


def test_a_retry_sends_only_the_instances_not_yet_stored(series, exporter, pacs, clock):
    uids = series.sop_instance_uids
    pacs.respond(uids[1], 0xA700)  # out of resources: try again later
    pacs.respond(uids[2], None)  # no response at all
    task = exporter.enqueue(series.files, "pacs")
    exporter.run_once(timeout=HANG)
    task = exporter.outbox.get(task.id)
    assert (task.state, task.delivered, task.attempts) == ("pending", 1, 1)
    assert task.last_error == "no C-STORE response"  # the last file's error stands for it
    clock.t = task.next_attempt
    exporter.run_once(timeout=HANG)
    task = exporter.outbox.get(task.id)
    assert (task.state, task.delivered, task.attempts) == ("succeeded", 3, 2)
    assert pacs.calls == [[0, 1, 2], [1, 2]]
    assert [info.sop_instance for info in pacs.delivered] == list(uids)


@pytest.mark.parametrize("until", ["request", "abort"])
def test_stop_ends_a_hanging_send_and_a_restart_resumes_the_outbox(tmp_path, series, clock, until):
    """A stop asks the send to end between two files, then aborts it (its socket shut down):
    either way ``stop`` returns, the task is pending again without an attempt counted, and
    the instance already stored is not sent again by the next process."""
    outbox = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    pacs = MemoryTransport("pacs")
    pacs.hang(after=1, until=until)
    exporter = Exporter(outbox, [pacs], poll_interval=0.01)
    exporter.start()
    task = exporter.enqueue(series.files, "pacs")
    assert pacs.hanging.wait(HANG), "the send never reached its hang"
    exporter.stop(timeout=1.0)  # its attempt ends at the request, or is aborted after 0.5 s
    wait_until(lambda: not exporter._threads(), "the end of the interrupted attempt")
    task = outbox.get(task.id)
    assert (task.state, task.attempts, task.delivered) == ("pending", 0, 1)
    outbox.close()

    again = MemoryTransport("pacs")
    restarted = Exporter(Outbox(tmp_path / "outbox", policy=POLICY, clock=clock), [again])
    try:
        assert restarted.run_once(timeout=HANG) == 1
        assert restarted.outbox.get(task.id).state == "succeeded"
        assert again.calls == [[1, 2]]
    finally:
        restarted.outbox.close()


def test_a_task_left_in_progress_by_a_crash_is_resumed_at_the_next_start(tmp_path, series, clock):
    outbox = Outbox(tmp_path / "outbox", policy=POLICY, clock=clock)
    task = outbox.enqueue(series.files, "pacs")
    assert outbox.claim("pacs").state == "in-progress"  # and the process died sending it
    outbox.close()
    pacs = MemoryTransport("pacs")
    exporter = Exporter(Outbox(tmp_path / "outbox", policy=POLICY, clock=clock), [pacs])
    try:
        assert exporter.run_once(timeout=HANG) == 1
        task = exporter.outbox.get(task.id)
        assert (task.state, task.attempts) == ("succeeded", 1)
        assert pacs.calls == [[0, 1, 2]]
    finally:
        exporter.outbox.close()


def test_at_most_max_associations_attempts_per_destination(tmp_path, series, outbox):
    pacs = MemoryTransport("pacs", max_associations=2)
    for _ in range(3):
        pacs.hang(until="request")
    exporter = Exporter(outbox, [pacs])
    for k in range(3):
        exporter.enqueue(series.files[k : k + 1], "pacs", task_id=f"t{k}")
    exporter.start()
    try:  # both attempts hang until the stop: no slot frees for the third
        wait_until(lambda: len(outbox.tasks("in-progress")) == 2, "two attempts in flight")
        assert [t.id for t in outbox.tasks("in-progress")] == ["t0", "t1"]
        assert outbox.get("t2").state == "pending"
    finally:
        exporter.stop(timeout=HANG)
    assert [t.state for t in outbox.tasks()] == ["pending"] * 3


def test_echo_asks_the_transport(exporter, pacs):
    assert exporter.echo("pacs").ok
    pacs.refuse(1)
    assert exporter.echo("pacs").error == "pacs (in memory): association rejected"
    with pytest.raises(DestinationError, match="no destination 'nowhere'"):
        exporter.echo("nowhere")


def test_a_transport_without_echo_cannot_be_verified(outbox):
    class SendOnly:
        def send(self, files, on_result, cancel=None):
            pass

    class Where:
        name, max_associations = "blind", 1

        def describe(self):
            return "blind"

        def transport(self):
            return SendOnly()

    exporter = Exporter(outbox, [Where()])
    with pytest.raises(DestinationError, match="destination 'blind' cannot be verified"):
        exporter.echo("blind")


def test_a_destination_configured_twice_is_refused(outbox):
    with pytest.raises(DestinationError, match="destination 'pacs' is configured twice"):
        Exporter(outbox, [MemoryTransport("pacs"), MemoryTransport("pacs")])
