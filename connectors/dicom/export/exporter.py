"""Export (Clara's Results Service and SCU exporter): outbox tasks C-STOREd to destinations.

::

    exporter = Exporter(Outbox(state_dir / "export"), [Destination("pacs", "ORTHANC", host, 4242)])
    exporter.start()                                  # worker thread; or run_once() in tests
    exporter.enqueue_registered(job_dir / "register/task")   # task.json + files/ of RegisterResults
    exporter.enqueue(files, "pacs", job_id="j1")       # or any files / folder
    exporter.stop()

Each destination builds its transport once (:mod:`connectors.dicom.export.transport`: DIMSE
C-STORE, STOW-RS, or the in-memory test double :mod:`connectors.dicom.export.memory`); the
exporter calls nothing else of it than ``send`` (and ``echo``, where it has one). A worker loop
claims due tasks, at most ``max_associations`` at a time per destination (each attempt is one
``send`` on its own thread), so a destination that is down or hangs delays only its own tasks.
An attempt ends with the task succeeded, pending again after the backoff, or dead (see
:mod:`connectors.dicom.export.outbox`). ``stop()`` is bounded: attempts
still sending after ``timeout / 2`` have their associations aborted; interrupted tasks go back
to pending without counting an attempt, their delivered files remembered.

The loop also carries out what other processes asked of the outbox (``Outbox.take_requests``:
a dead letter to re-send, from ``dataflow exports --resend``), and ``on_progress(task_id,
destination, state, detail)`` hears each task become ``pending`` (queued, or re-queued),
``sent`` or ``dead`` (``detail``: why). A destination whose attempts keep failing (no instance
accepted, ``DOWN_AFTER`` attempts in a row) is *down* in :meth:`Exporter.destination_status`
until an attempt gets through. :class:`OutboxAdmin` is the outbox seen from another process:
its listing, and re-sending a dead letter.

Logs (``connectors.dicom.export.exporter``) carry task and job IDs, destination names, counts and
status codes: no UIDs or patient data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from dataflow.registered import Registration

from ..net import fastnet
from ..net.association import Cancel
from .outbox import Outbox, OutboxBusy, RetryPolicy, Task
from .sender import Destination
from .stow import WebDestination
from .transport import (
    DestinationError,
    EchoResult,
    Endpoint,
    ExportError,
    TransientExportError,
    Transport,
    Verifier,
)

__all__ = [
    "Destination",
    "DestinationError",
    "EchoResult",
    "ExportError",
    "Exporter",
    "Outbox",
    "OutboxAdmin",
    "OutboxBusy",
    "ResendRefused",
    "RetryPolicy",
    "Task",
    "TransientExportError",
    "WebDestination",
]

log = structlog.get_logger("connectors.dicom.export.exporter")

DOWN_AFTER = 3  # failed attempts in a row after which a destination is said to be down
# the outbox's task states as an operator reads them (dataflow exports, the metrics)
EXPORT_STATE = {"pending": "pending", "in-progress": "sending", "succeeded": "sent",
                "dead": "dead"}  # fmt: skip
EXPORT_STATES = ("pending", "sending", "sent", "dead")
Progress = Callable[[str, str, str, str], None]


class Exporter:
    """Delivers the tasks of ``outbox`` to ``destinations`` (by name)."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Iterable[Endpoint] | Mapping[str, Endpoint],
        *,
        poll_interval: float = 1.0,
        on_progress: Progress | None = None,
    ) -> None:
        values = destinations.values() if isinstance(destinations, Mapping) else destinations
        self.destinations: dict[str, Endpoint] = {}
        self._transports: dict[str, Transport] = {}
        for destination in values:
            if destination.name in self.destinations:
                raise DestinationError(f"destination {destination.name!r} is configured twice")
            self.destinations[destination.name] = destination
            self._transports[destination.name] = destination.transport()
        self.outbox = outbox
        self.poll_interval = poll_interval
        self.on_progress = on_progress
        self._failing: dict[str, dict] = {
            name: {"attempts": 0, "since": None, "error": "", "failed_total": 0}
            for name in self.destinations
        }
        fastnet.tune_malloc()  # as the receiver does: reused pages for every file sent
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._active: dict[str, int] = dict.fromkeys(self.destinations, 0)
        self._workers: dict[str, threading.Thread] = {}  # task id -> its attempt's thread
        self._cancels: dict[str, Cancel] = {}  # task id -> how to stop its attempt
        self._loop: threading.Thread | None = None
        for task in outbox.tasks("pending"):
            self._check_destination(task)

    # -- queueing ----------------------------------------------------------------------
    def enqueue(
        self,
        source: str | Path | Iterable[str | Path],
        destination: str,
        *,
        job_id: str = "",
        task_id: str | None = None,
        deadline: float | None = None,
    ) -> Task:
        """Queue ``source`` (task folder, folder, file or files) for ``destination``; returns
        once durable. An unknown destination gives a dead task saying so (nothing is lost)."""
        task = self.outbox.enqueue(
            source, destination, job_id=job_id, task_id=task_id, deadline=deadline
        )
        log.info(
            "export_task_queued", task=task.id, job_id=job_id, destination=destination,
            files=task.files,
        )  # fmt: skip
        task = self._check_destination(task)
        self._progress(task)
        self._wake.set()
        return task

    def enqueue_registered(
        self, task_dir: str | Path, *, job_id: str | None = None, deadline: float | None = None
    ) -> list[Task]:
        """One task per destination of a RegisterResults folder (``task.json`` + ``files/``),
        with the ID ``<taskId>-<destination>``. Idempotent: a destination already queued (before
        a restart, say) is not queued twice; its task is returned as it is. A ``task.json``
        that cannot be used raises :class:`~dataflow.registered.RegistrationError`."""
        record = Registration.read(task_dir)
        if not record.destinations:
            raise ExportError(f"{task_dir}: task.json names no destination")
        job_id = record.job_id if job_id is None else job_id
        base = record.task_id
        tasks = []
        for name in record.destinations:
            task = self.outbox.get(f"{base}-{name}")
            if task is None:
                task = self.enqueue(
                    task_dir, name, job_id=job_id, task_id=f"{base}-{name}", deadline=deadline
                )
            tasks.append(task)
        return tasks

    def _check_destination(self, task: Task) -> Task:
        if task.destination in self.destinations:
            return task
        known = ", ".join(sorted(self.destinations)) or "none"
        reason = f"destination {task.destination!r} is not configured (configured: {known})"
        self.outbox.mark_dead(task.id, reason)
        log.error("export_task_dead", task=task.id, job_id=task.job_id, reason=reason)
        return self.outbox.get(task.id)  # type: ignore[return-value]

    # -- inspection --------------------------------------------------------------------
    def tasks(self, state: str | None = None) -> list[Task]:
        return self.outbox.tasks(state)

    def dead_letters(self) -> list[Task]:
        return self.outbox.dead_letters()

    def destination_status(self) -> dict[str, dict]:
        """Per destination: ``attempts`` failed in a row (0 once one gets through), ``since``
        (clock time of the first of them), ``error`` (the last), ``failed_total``, ``down``."""
        with self._lock:
            return {
                name: {**entry, "down": entry["attempts"] >= DOWN_AFTER}
                for name, entry in self._failing.items()
            }

    def report_all(self, recent: float = 24 * 3600.0) -> None:
        """Tell ``on_progress`` where every task stands (at a start: what a crash may have left
        unsaid); succeeded tasks only if they finished within ``recent`` seconds."""
        since = self.outbox.clock() - recent
        for task in self.outbox.tasks():
            if task.state != "succeeded" or task.updated >= since:
                self._progress(task)

    def _progress(self, task: Task) -> None:
        if self.on_progress is None:
            return
        state = EXPORT_STATE[task.state] if task.state != "in-progress" else "pending"
        detail = task.last_error if state == "dead" else ""
        try:
            self.on_progress(task.id, task.destination, state, detail)
        except Exception:  # the service is stopping, say: it hears again at the next start
            log.exception("export_progress_not_reported", task=task.id, state=state)

    def serve_requests(self) -> list[Task]:
        """Carry out what other processes asked (re-send a dead letter); the tasks requeued."""
        if not self.outbox.owner:
            return []
        tasks = self.outbox.take_requests()
        for task in tasks:
            log.info("export_task_requeued", task=task.id, job_id=task.job_id,
                     destination=task.destination, files=task.files, by="request")  # fmt: skip
            self._progress(task)
        if tasks:
            self._wake.set()
        return tasks

    def echo(self, name: str) -> EchoResult:
        """Verify the destination called ``name`` (C-ECHO, or its transport's counterpart)."""
        if name not in self.destinations:
            raise DestinationError(f"no destination {name!r}")
        transport = self._transports[name]
        if not isinstance(transport, Verifier):
            raise DestinationError(f"destination {name!r} cannot be verified")
        return transport.echo()

    # -- the worker --------------------------------------------------------------------
    def _dispatch(self, exclude: set[str] | None = None) -> list[str]:
        """Start an attempt for each due task that has a free association slot."""
        started = []
        for name, destination in self.destinations.items():
            while not self._stopping.is_set():
                with self._lock:
                    if self._active[name] >= destination.max_associations:
                        break
                    task = self.outbox.claim(name, exclude or ())
                    if task is None:
                        break
                    self._active[name] += 1
                    thread = threading.Thread(
                        target=self._attempt, args=(task, destination), daemon=True,
                        name=f"export-{name}-{task.id[:8]}",
                    )  # fmt: skip
                    self._workers[task.id] = thread
                    self._cancels[task.id] = Cancel()
                thread.start()
                started.append(task.id)
        return started

    def _attempt(self, task: Task, destination: Endpoint) -> None:
        started, error = time.monotonic(), ""
        with self._lock:
            cancel = self._cancels[task.id]
            if self._stopping.is_set():
                cancel.request()
        files = self.outbox.pending_files(task.id)
        transport = self._transports[destination.name]
        try:
            transport.send(files, lambda result: self.outbox.record(task.id, result), cancel)
        except TransientExportError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or an unexpected peer: the task must not vanish
            error = f"{type(exc).__name__}: {exc}"
            log.exception("export_attempt_error", task=task.id, destination=destination.name)
        try:
            if self._stopping.is_set() and self._unfinished(task.id):
                self.outbox.release(task.id)
                log.info("export_attempt_interrupted", task=task.id, destination=destination.name)
            else:
                if not error and self._unfinished(task.id):
                    error = self._last_file_error(task.id)
                self._count_failure(destination.name, error)
                self._report(self.outbox.finish_attempt(task.id, error), time.monotonic() - started)
        finally:
            with self._lock:
                self._active[destination.name] -= 1
                self._workers.pop(task.id, None)
                self._cancels.pop(task.id, None)
            self._wake.set()

    def _count_failure(self, name: str, error: str) -> None:
        with self._lock:
            entry = self._failing[name]
            was_down = entry["attempts"] >= DOWN_AFTER
            if not error:
                entry.update(attempts=0, since=None, error="")
        if not error:
            if was_down:
                log.info("export_destination_up", destination=name)
            return
        with self._lock:
            entry["attempts"] += 1
            entry["failed_total"] += 1
            entry["error"] = error
            if entry["since"] is None:
                entry["since"] = self.outbox.clock()
            down = entry["attempts"] == DOWN_AFTER
        if down:
            log.error("export_destination_down", destination=name, attempts=DOWN_AFTER, error=error)

    def _unfinished(self, task_id: str) -> bool:
        return any(record.state == "pending" for record in self.outbox.files(task_id))

    def _last_file_error(self, task_id: str) -> str:
        errors = [r.error for r in self.outbox.files(task_id) if r.state == "pending" and r.error]
        return errors[-1] if errors else "instances left unsent"

    def _report(self, task: Task, seconds: float) -> None:
        fields = dict(
            task=task.id, job_id=task.job_id, destination=task.destination, files=task.files,
            delivered=task.delivered, failed=task.failed, attempts=task.attempts,
            seconds=round(seconds, 3),
        )  # fmt: skip
        if task.state == "succeeded":
            log.info("export_task_succeeded", **fields)
            self._progress(task)
        elif task.state == "dead":
            log.error("export_task_dead", reason=task.last_error, **fields)
            self._progress(task)
        else:
            retry_in = round(max(0.0, task.next_attempt - self.outbox.clock()), 3)
            log.warning("export_attempt_failed", error=task.last_error, retry_in=retry_in, **fields)

    def run_once(self, timeout: float | None = None) -> int:
        """Attempt every task due now (each at most once, within the concurrency limits) and
        wait for the attempts to end; returns how many were made. For tests and tools."""
        attempted: set[str] = set()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._wake.clear()
            attempted.update(self._dispatch(attempted))
            with self._lock:
                busy = bool(self._workers)
            if not busy:
                return len(attempted)
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"export attempts still running after {timeout} s")
            self._wake.wait(0.05)

    def start(self) -> None:
        """Run the worker loop in a thread until :meth:`stop`."""
        if self._loop is not None:
            return
        fastnet.start("exporter")  # as the receiver does (off: said at WARNING, with why)
        self._stopping.clear()
        self._loop = threading.Thread(target=self._run, name="export-loop", daemon=True)
        self._loop.start()
        log.info("exporter_started", destinations=sorted(self.destinations))

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.serve_requests()
                self._dispatch()
            except Exception:  # e.g. the database is busy: log and try again
                log.exception("export_dispatch_error")
            due, now = self.outbox.next_due(), self.outbox.clock()
            wait = self.poll_interval
            if due is not None and due > now:
                wait = min(wait, due - now)
            self._wake.wait(max(wait, 0.005))
            self._wake.clear()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and the attempts in flight within about ``timeout`` seconds."""
        self._stopping.set()
        self._wake.set()
        half, end = time.monotonic() + timeout / 2, time.monotonic() + timeout
        if self._loop is not None:
            self._loop.join(timeout / 2)
            self._loop = None
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:  # stop between two files
            cancel.request()
        for thread in self._threads():
            thread.join(max(0.0, half - time.monotonic()))
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:  # still sending or associating: abort
            cancel.abort()
        for thread in self._threads():
            thread.join(max(0.0, end - time.monotonic()))
        log.info("exporter_stopped", still_running=len(self._threads()))

    def _threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._workers.values())


class ResendRefused(ExportError):
    """A re-send that cannot be done (unknown task, not a dead letter, destination gone)."""


class OutboxAdmin:
    """The outbox at ``root`` as another process (``dataflow exports``) sees it: it lists, and
    re-sends a dead letter by asking the process that owns the outbox (the running service),
    or, when none does, by re-queueing it itself under the outbox's lock."""

    def __init__(self, root: Path, destinations: Iterable[str], policy: RetryPolicy) -> None:
        self.root, self.destinations, self.policy = Path(root), sorted(destinations), policy

    def exports(self, state: str | None = None) -> list[dict]:
        """The tasks (oldest first), as ``task_id, job_id, destination, state`` (pending,
        sending, sent, dead), ``attempts, instances, last_error, updated`` and
        ``resend_requested``."""
        if state is not None and state not in EXPORT_STATES:
            raise ResendRefused(
                f"unknown export state {state!r}: one of {', '.join(EXPORT_STATES)}"
            )
        if not (self.root / "outbox.sqlite").is_file():
            return []
        box = Outbox(self.root, policy=self.policy, owner=False)  # reads: never takes the lock
        try:
            requested = set(box.requested())
            rows = [
                {
                    "task_id": t.id, "job_id": t.job_id, "destination": t.destination,
                    "state": EXPORT_STATE[t.state], "attempts": t.attempts, "instances": t.files,
                    "last_error": t.last_error, "updated": t.updated,
                    "resend_requested": t.id in requested,
                }
                for t in box.tasks()
            ]  # fmt: skip
        finally:
            box.close()
        return [row for row in rows if state is None or row["state"] == state]

    def resend(self, task_id: str) -> str:
        """Re-send the dead letter ``task_id``; a message saying what happens. Raises
        :class:`ResendRefused` naming the reason when it cannot be."""
        if not (self.root / "outbox.sqlite").is_file():
            raise ResendRefused(f"no export task {task_id!r}: the outbox {self.root} is empty")
        box = Outbox(self.root, policy=self.policy)  # owns it only if no service does
        try:
            task = box.get(task_id)
            if task is None:
                raise ResendRefused(
                    f"no export task {task_id!r} in {self.root} "
                    "(dataflow exports CONFIG lists them)"
                )
            if task.state != "dead":
                raise ResendRefused(
                    f"export task {task_id!r} is {EXPORT_STATE[task.state]}: only a dead letter "
                    "is re-sent"
                )
            if task.destination not in self.destinations:
                known = ", ".join(self.destinations) or "none"
                raise ResendRefused(
                    f"export task {task_id!r}: its destination {task.destination!r} is not "
                    f"configured (configured: {known})"
                )
            box.requeue(task_id)
            what = f"{task_id}: {task.files} instance(s) to {task.destination}"
            if box.owner:
                return f"{what} queued again; no service is running: sent when it starts"
            return (
                f"{what}: re-send asked of the running service (process {box.owner_pid()}); "
                "dataflow exports CONFIG shows when it is sent"
            )
        finally:
            box.close()
