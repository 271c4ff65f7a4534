"""The DICOM receiver: a C-ECHO/C-STORE SCP on pynetdicom that acknowledges only what is on disk.

Each C-STORE: cheap header parse (four UIDs), size and disk-reserve checks, the received bytes
(untouched, after a Part-10 file meta header) written to ``<spool>/.incoming``; then the
commit (led by the first waiting writer) appends the instance (its record and bytes) to the
ingest journal, moves the file into its group folder and records it, and one ``fdatasync``
of the journal makes it durable (:mod:`.journal`; with ``journal: false``, the file's fsync,
then the folders' fsyncs and a ``synchronous=FULL`` commit) — several associations'
instances share one transaction and one flush (group commit), each durable before its own
Success goes back.

Hostile peers (see docs/dicom.md, "What a hostile peer gets"): every PDU is bounded before
anything is allocated for it (:func:`fastnet.guard`); a connection must complete its
A-ASSOCIATE-RQ within ``artim_timeout`` seconds or it is closed, and one the peer closes
first is let go at once (:func:`_wait_for_request`); only associations admitted by the
ACSE count against ``max_associations``, of which ``reserved_associations`` are kept for
the calling AE titles of the allow-list (:meth:`Receiver.admit`).

With ``processes: N`` the receiver starts N - 1 worker processes listening on the same port
(SO_REUSEPORT; they only ingest), restarts one that dies, and stops them when it stops.

Run as a process (tests, or one listener of several sharing a port with ``reuse_port``)::

    python -m connectors.dicom.receive.receiver --config CONFIG.json    # or the JSON text itself
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dataflow.logs import configure_logging

from ..config import ReceiverConfig
from ..net import compat, fastnet
from ..net.pdu import Status
from . import journal
from .groups import Group, GroupStore
from .intake import Intake
from .spool import free_bytes
from .store import StoreSteps

__all__ = ["Receiver", "main"]

log = structlog.get_logger("connectors.dicom")

ABORT_GRACE = 2.0  # seconds a peer has to close after our A-ABORT when the receiver stops
UNLIMITED = 1_000_000  # pynetdicom's own association limit, which counts every connection
BACKLOG = 128  # connections the kernel queues before the server accepts them
REQUEST_POLL = 0.1  # how often a connection awaiting its request looks at its socket
ADOPT_EVERY = 5.0  # seconds between two looks for the journal of a worker that died


class _Workers(threading.Thread):
    """The ``processes - 1`` worker listeners of a receiver: started, watched (a dead one is
    started again within a second), stopped. A worker stops by itself if its parent dies."""

    def __init__(self, config: ReceiverConfig, port: int, count: int) -> None:
        super().__init__(name="dicom-workers", daemon=True)
        worker = config.to_dict()
        worker.update(port=port, processes=1, reuse_port=True)
        self._args = [sys.executable, "-m", "connectors.dicom.receive.receiver", "--worker",
                      "--parent-pid", str(os.getpid()), "--config", json.dumps(worker)]  # fmt: skip
        root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        self._env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._drains: list[threading.Thread] = []
        self._halt = threading.Event()
        self.restarts = 0

    def _spawn(self, slot: int, timeout: float = 60.0) -> None:
        proc = subprocess.Popen(self._args, env=self._env, stdout=subprocess.PIPE, text=True)
        self._procs[slot] = proc
        assert proc.stdout is not None
        ready = threading.Event()

        def drain() -> None:  # the first line says it listens; keep the pipe from filling
            with proc.stdout:  # type: ignore[union-attr]
                for line in proc.stdout:  # type: ignore[union-attr]
                    if line.startswith("listening"):
                        ready.set()

        drainer = threading.Thread(target=drain, name=f"dicom-worker-{slot}-out", daemon=True)
        drainer.start()
        self._drains.append(drainer)
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver worker exited ({proc.returncode}) or hung at start")
        log.info("receiver_worker_started", slot=slot, pid=proc.pid)

    def start(self) -> None:
        try:
            for slot in range(len(self._procs)):
                self._spawn(slot)
        except BaseException:
            self.stop()
            raise
        super().start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def run(self) -> None:
        while not self._halt.wait(0.5):
            for slot, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None or self._halt.is_set():
                    continue
                log.warning("receiver_worker_died", slot=slot, pid=proc.pid,
                            returncode=proc.returncode)  # fmt: skip
                self.restarts += 1
                try:
                    self._spawn(slot)
                except Exception:
                    log.exception("receiver_worker_restart_failed", slot=slot)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (each finishes its commits), SIGKILL after ``timeout``."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        live = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for drainer in self._drains:  # their pipes are at EOF now
            drainer.join(timeout=5)


class Receiver:
    """The receiver of one :class:`ReceiverConfig`.

    ``on_group_complete(group)`` is called (from the receiver's completion thread) for every
    complete group not yet dispatched — again after each restart until the service calls
    :meth:`mark_dispatched`. With ``complete_groups=False`` this process only ingests (a
    worker listener next to a main one that completes and hands over).
    """

    def __init__(
        self,
        config: ReceiverConfig,
        on_group_complete: Callable[[Group], Any] | None = None,
        *,
        complete_groups: bool = True,
    ) -> None:
        self.config = config.validate()
        self.on_group_complete = on_group_complete
        self.spool = Path(config.spool)
        self.store = GroupStore(self.spool, config.duplicates)
        self.steps = StoreSteps(self.config, self.store, lambda: self._stop.is_set())
        self.incoming = self.steps.incoming
        self._complete_groups = complete_groups
        self._server: ThreadedAssociationServer | None = None
        self._completer: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._handed: set[int] = set()
        self._started = 0.0
        self._workers: _Workers | None = None
        self._slots = threading.Lock()
        self._admitted: list = []  # associations holding a slot (admitted by the ACSE)
        self.counts = {"association_request_timeouts": 0, "associations_over_limit": 0}

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> Receiver:
        """Recover the spool, listen, and start completing groups; returns ``self``."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        # pynetdicom without its 1 ms polling waits, every PDU bounded (see fastnet.py)
        fastnet.start("receiver")  # off: said at WARNING, with the reason
        fastnet.tune_malloc()  # reuse touched memory for PDUs and datasets (fastnet.py)
        if self._complete_groups:
            for stale in self.incoming.glob("*.part"):  # never acknowledged
                stale.unlink(missing_ok=True)
            replayed = journal.recover(self.spool, self.store)  # before the sweep
            swept = self.store.sweep_pending()
            pending = len(self.store.groups("pending"))
            log.info("receiver_recovered", pending_groups=pending, unrecorded_files=swept,
                     journal_records=replayed)  # fmt: skip
        self._started = time.time()
        self.steps.start()
        self._server = self._make_server()
        if self.config.processes > 1:
            self._workers = _Workers(self.config, self.port, self.config.processes - 1)
            try:
                self._workers.start()
            except BaseException:
                self._workers = None
                self.stop()
                raise
        if self._complete_groups:
            self._completer = threading.Thread(
                target=self._complete_loop, name="dicom-completer", daemon=True
            )
            self._completer.start()
        log.info("receiver_listening", host=self.config.host, port=self.port,
                 called_aes=[c.ae_title for c in self.config.called_aes],
                 tls=self.config.tls is not None,
                 processes=self.config.processes)  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop listening (open associations are aborted), finish pending commits; stop the
        worker processes (each the same way)."""
        self._stop.set()
        self._wake.set()
        if self._workers is not None:
            self._workers.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            _abort_all(self._server.active_associations)
        self.steps.stop()
        if self._completer is not None:
            self._completer.join(timeout=10)
        self.store.close()
        log.info("receiver_stopped", port=self.config.port)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port listened on (the real one when configured as 0)."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def worker_pids(self) -> list[int]:
        """The process IDs of the running worker listeners (``processes - 1`` of them)."""
        return self._workers.pids if self._workers is not None else []

    # -- for the service --------------------------------------------------------------------

    def groups(self, state: str | None = None) -> list[Group]:
        """Groups in the spool (``pending``, ``complete``, ``dispatched``, ``ignored``,
        ``reclaimed``)."""
        return self.store.groups(state)

    def reclaim(self, group_id: int) -> bool:
        """Delete a dispatched group the service needs no more (its retention is over)."""
        done = self.store.reclaim(group_id)
        if done:
            log.info("group_reclaimed", group=group_id)
        return done

    def mark_dispatched(self, group_id: int) -> bool:
        """The service recorded the group's jobs: never hand it over again."""
        self._handed.discard(group_id)
        return self.store.mark_dispatched(group_id)

    def _complete_loop(self) -> None:
        interval = min(0.5, min(c.timeout for c in self.config.called_aes) / 4)
        adopted = time.monotonic()
        while not self._stop.is_set():
            wait = interval
            try:
                checked = time.time()
                for group_id in self.store.complete_due(checked, self._started):
                    log.info("group_complete", group=group_id, reason="quiet timeout")
                self._hand_over()
                if self.config.processes > 1 and time.monotonic() - adopted > ADOPT_EVERY:
                    adopted = time.monotonic()  # a worker killed: its journal made durable
                    journal.recover(self.spool, self.store)
                due = self.store.next_due(self._started)  # woken when the first falls due
                if due is not None and due > checked:  # (due before: a file still written)
                    wait = min(interval, max(0.0, due - time.time()) + 0.002)
            except Exception:
                log.exception("group_completion_failed")
            self._wake.wait(wait)
            self._wake.clear()

    def _hand_over(self) -> None:
        for group in self.store.groups("complete"):
            if group.id in self._handed or self.on_group_complete is None:
                continue
            try:
                self.on_group_complete(group)
            except Exception:
                log.exception("on_group_complete_failed", group=group.id)
                continue  # handed over again at the next round
            self._handed.add(group.id)

    # -- the server -------------------------------------------------------------------------

    def _make_server(self) -> ThreadedAssociationServer:
        config = self.config
        ae = AE(ae_title=config.called_aes[0].ae_title)
        ae.maximum_pdu_size = config.max_pdu_size
        ae.maximum_associations = UNLIMITED  # admit() counts the associations instead
        ae.network_timeout = config.network_timeout
        # pynetdicom's ARTIM timer (its acse_timeout, for an acceptor): a little after ours
        ae.acse_timeout = min(config.acse_timeout, config.artim_timeout + 1.0)
        ae.dimse_timeout = config.dimse_timeout
        ae.require_called_aet = False  # checked by _CheckingACSE, for every called AE
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_C_ECHO, lambda event: Status.SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        compat.attach(ae, "receiver", self)  # the ACSE reads its configuration through the AE
        server = ae.make_server(
            (config.host, config.port),
            ae_title=config.called_aes[0].ae_title,
            ssl_context=self._ssl_context(),
            evt_handlers=handlers,
            server_class=_Server,
            request_handler=_Handler,
            reuse_port=config.reuse_port or config.processes > 1,
        )
        server.artim_timeout = config.artim_timeout
        compat.register_server(ae, server)  # so that ae.shutdown() finds it
        thread = threading.Thread(target=server.serve_forever, name="dicom-server", daemon=True)
        thread.start()
        return server

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.12 / B.10
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(str(tls.ca))
        return context

    # -- event handlers ---------------------------------------------------------------------

    def _on_accepted(self, event) -> None:
        r = event.assoc.requestor
        self.steps.tally(event.assoc)["started"] = time.time()
        log.info("association_accepted", calling_ae=r.ae_title, peer_host=r.address,
                 called_ae=event.assoc.acceptor.ae_title)  # fmt: skip

    def _on_rejected(self, event) -> None:
        r = event.assoc.requestor
        called = compat.attached(event.assoc, "called_ae", "")
        reason = compat.attached(event.assoc, "reject_reason", "limit")
        log.info("association_rejected", calling_ae=r.ae_title, peer_host=r.address,
                 called_ae=called, reason=reason)  # fmt: skip
        now = time.time()
        self._record(called_ae=called, calling_ae=r.ae_title, peer_host=r.address,
                     outcome="rejected", reason=str(reason), started=now, ended=now)  # fmt: skip

    def _finished(self, assoc, how: str) -> dict[str, Any]:
        stats = self.steps.close(assoc)
        r = assoc.requestor
        log.info(f"association_{how}", calling_ae=r.ae_title, peer_host=r.address,
                 stored=stats["stored"], failed=stats["failed"],
                 ignored=stats.get("ignored", 0))  # fmt: skip
        now = time.time()
        self._record(called_ae=assoc.acceptor.ae_title, calling_ae=r.ae_title,
                     peer_host=r.address, outcome=how, started=stats.get("started", now),
                     ended=now, stored=stats["stored"], failed=stats["failed"],
                     ignored=stats.get("ignored", 0))  # fmt: skip
        return stats

    def _record(self, **row: Any) -> None:
        """An association into the spool's history (GET /api/v1/dicom/associations); a
        failure to write it is logged and changes nothing for the association."""
        try:
            row["called_ae"] = str(row["called_ae"]).strip()
            row["calling_ae"] = str(row["calling_ae"]).strip()
            self.store.record_association(**row)
        except Exception as exc:
            log.warning("association_not_recorded", error=repr(exc))

    def _on_released(self, event) -> None:
        self._released(event.assoc, "released")

    def _released(self, assoc, how: str) -> dict[str, Any]:
        stats = self._finished(assoc, how)
        called = self.config.called(assoc.acceptor.ae_title)
        if called is not None and called.complete_on_release and stats["groups"]:
            for group_id in self.store.complete(sorted(stats["groups"])):
                reason = "association released" if how == "released" else "STOW-RS answered"
                log.info("group_complete", group=group_id, reason=reason)
            self._wake.set()
        return stats

    def _on_aborted(self, event) -> None:
        self._finished(event.assoc, "aborted")

    def request_answered(self, request) -> dict[str, Any]:
        """A STOW-RS request (:mod:`.stow`, which stores through :attr:`steps` as an
        association does) was answered: it goes into the history as an association with
        the outcome ``stow``, and its groups complete as at a release where the AE title
        has ``complete_on_release``. Its figures (``stored``, ``failed``, ``groups``...)."""
        return self._released(request, "stow")

    def _on_store(self, event) -> int | Dataset:
        called = self.config.called(event.assoc.acceptor.ae_title)
        request = event.request
        status, note = self.steps.answer(event.assoc, lambda: self.steps.store_dataset(
            event.assoc, called, str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
            request.DataSet,
        ))  # fmt: skip
        if status == Status.SUCCESS:
            return Status.SUCCESS
        reply = Dataset()
        reply.Status = status
        reply.ErrorComment = note[:64]
        return reply

    def stats(self) -> dict[str, int]:
        """Figures for a health check (this listener process; counters since its start):
        ``associations`` (holding a slot now), ``association_request_timeouts`` (closed by
        ARTIM), ``associations_over_limit`` (refused: local limit exceeded) and
        ``pdus_refused`` (longer than their bound)."""
        with self._slots:
            active = sum(_holds_slot(a) for a in self._admitted)
            return {"associations": active, **self.counts, "pdus_refused": fastnet.refused_count(),
                    "fast_path": int(fastnet.installed())}  # fmt: skip

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` of :meth:`stats`."""
        with self._slots:
            self.counts[name] += 1

    def admit(self, assoc, known: bool) -> bool:
        """Take a slot for ``assoc`` (its request was accepted so far): False when
        ``max_associations`` are in use, or for a caller not in the allow-list (not
        ``known``) when all but ``reserved_associations`` are. A slot is held until the
        association is released or aborted (or its thread ends); connections still
        negotiating hold none."""
        config = self.config
        limit = config.max_associations
        if not known:
            limit = max(1, limit - config.reserved_associations)
        with self._slots:
            self._admitted = [a for a in self._admitted if _holds_slot(a)]
            if len(self._admitted) >= limit:
                self.counts["associations_over_limit"] += 1
                return False
            self._admitted.append(assoc)
            return True

    def disk(self) -> dict[str, Any]:
        """The spool's file system now: bytes ``free`` and ``total``, the ``reserve`` kept
        free (``min_free_bytes`` or ``min_free_percent``, the larger), and whether it is
        ``below`` it (instances are then refused with Out of Resources)."""
        free, total = free_bytes(self.spool)
        reserve = self.steps.reserve(total)
        return {"path": str(self.spool), "free": free, "total": total, "reserve": int(reserve),
                "below": free < reserve}  # fmt: skip


def _holds_slot(assoc) -> bool:
    return assoc.is_alive() and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)


def _abort_all(assocs, grace: float = ABORT_GRACE) -> None:
    """A-ABORT every association at once (a connection still awaiting its request is shut
    down: pynetdicom has no abort before the request). pynetdicom then waits for the peer to
    close (or its ARTIM timer); a peer that goes on sending keeps it waiting: after ``grace``
    seconds the connection is shut down under it."""
    for assoc in assocs:
        if not assoc.is_established:
            _shut_down(assoc)
    assocs = [a for a in assocs if a.is_established]
    aborting = [threading.Thread(target=a.abort, name="dicom-abort", daemon=True) for a in assocs]
    for thread in aborting:
        thread.start()
    deadline = time.monotonic() + grace
    for thread in aborting:
        thread.join(max(0.0, deadline - time.monotonic()))
    for assoc, thread in zip(assocs, aborting):
        if thread.is_alive():
            _shut_down(assoc)
    for thread in aborting:
        thread.join(5.0)


def _shut_down(assoc) -> None:
    """Shut the association's connection down (both ways), under whatever reads it."""
    sock = getattr(assoc.dul.socket, "socket", None)
    with contextlib.suppress(OSError, AttributeError, ValueError, TypeError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]


class _CheckingACSE(compat.AcceptorACSE):
    """Rejects an unknown called AE title, and a calling AE (or host) not allowed, with the
    standard reasons, before pynetdicom's own negotiation (which checks the association
    limit and the presentation contexts)."""

    def negotiate(self) -> None:
        receiver: Receiver = compat.attached(self.assoc.ae, "receiver")
        config = receiver.config
        rq = self.requestor.primitive
        called, calling = rq.called_ae_title.strip(), rq.calling_ae_title.strip()
        host = self.assoc.requestor.address
        known = any(
            p.ae_title == calling and (p.host is None or p.host == host) for p in config.peers
        )
        reason = None
        if config.called(called) is None:
            reason, rsd = "called AE title not recognised", (0x01, 0x01, 0x07)
        elif not config.allow_unknown_peers and not known:
            reason, rsd = "calling AE title not recognised", (0x01, 0x01, 0x03)
        elif not receiver.admit(self.assoc, known):  # transient: local limit exceeded
            reason, rsd = "local limit exceeded", (0x02, 0x03, 0x02)
        if reason is not None:
            compat.attach(self.assoc, "called_ae", called)
            compat.attach(self.assoc, "reject_reason", reason)
            self.requestor.ae_title = rq.calling_ae_title
            self.send_reject(*rsd)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.acceptor.ae_title = called
        intake = Intake.prepare(receiver.steps, self.assoc)
        try:
            self.negotiate_as_pynetdicom()
        except BaseException:
            if intake is not None:
                intake.waker.release()
            raise
        if intake is not None:
            intake.run()  # C-STOREs off the socket; pynetdicom's reactor takes the rest


def _wait_for_request(dul, receive, wait: bool = False, timeout: float | None = None):
    """``dul.receive_pdu`` of an acceptor: while the association thread waits for the
    A-ASSOCIATE-RQ, it returns None (pynetdicom then closes the connection and ends the
    association's threads) as soon as the connection is closed with nothing queued, or once
    the association's ``artim_deadline`` passed (the connection is shut down first, so that
    nothing stays blocked on it). Any other call is pynetdicom's."""
    assoc = dul.assoc
    deadline = compat.attached(assoc, "artim_deadline")
    if not wait or deadline is None or assoc.is_established or assoc.requestor.primitive:
        return receive(wait=wait, timeout=timeout)
    if timeout is not None:
        deadline = min(deadline, time.monotonic() + timeout)
    while (left := deadline - time.monotonic()) > 0:
        primitive = receive(wait=True, timeout=min(left, REQUEST_POLL))
        if primitive is not None:
            return primitive
        raw = getattr(dul.socket, "socket", None)
        closed = (raw is None or raw.fileno() == -1) and dul.to_user_queue.empty()
        if closed and time.monotonic() < deadline:
            return None  # closed by the peer (or refused): nothing more will come
    log.info("association_request_timeout", peer_host=assoc.requestor.address)
    compat.attached(assoc.ae, "receiver").count("association_request_timeouts")
    _shut_down(assoc)
    return None


class _Handler(compat.HookedHandler):
    def association_created(self, assoc):
        assoc.acse = _CheckingACSE(assoc)
        compat.attach(assoc, "artim_deadline", self._artim_deadline)  # fastnet's guard too
        dul = assoc.dul
        dul.receive_pdu = functools.partial(_wait_for_request, dul, dul.receive_pdu)
        return assoc

    def handle(self) -> None:
        artim = self.server.artim_timeout
        self._artim_deadline = time.monotonic() + artim
        sock = self.request
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if isinstance(sock, ssl.SSLSocket):  # handshake here, not in the accept loop
                sock.settimeout(artim)  # a deadline for the whole handshake (CPython's _ssl)
                sock.do_handshake()
                sock.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            log.info("tls_handshake_failed", peer_host=self.client_address[0],
                     error=type(exc).__name__)  # fmt: skip
            sock.close()
            return
        super().handle()


class _Contexts(list):
    """The server's supported presentation contexts. pynetdicom ``deepcopy``s them for every
    association (every storage SOP class times every transfer syntax: ~5,000 UID objects
    re-created and re-validated, tens of milliseconds of CPU per association); this copy
    makes new contexts with their own lists of the same (immutable) UIDs, which is all a
    deep copy gives."""

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        return [compat.copy_context(context) for context in self]


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT (several listener processes on one
    port), the TLS handshake moved out of the accepting thread, cheap copies of the
    supported contexts (:class:`_Contexts`), and a listen backlog of :data:`BACKLOG`
    (socketserver's 5 overflows under a connection flood while the accepting thread waits
    for the GIL: the kernel then drops SYNs, and a legitimate peer waits 1, 3, 7 s...)."""

    request_queue_size = BACKLOG

    def __init__(self, *args, reuse_port: bool = False, **kwargs) -> None:
        self._reuse_port = reuse_port
        super().__init__(*args, **kwargs)
        self.contexts = _Contexts(self.contexts)

    def server_bind(self) -> None:
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def main(argv: list[str] | None = None) -> int:
    """Run a receiver until SIGTERM/SIGINT; prints ``listening PORT`` once it listens."""
    parser = argparse.ArgumentParser(prog="python -m connectors.dicom.receive.receiver")
    parser.add_argument("--config", required=True, help="JSON file, or the JSON text itself")
    parser.add_argument("--worker", action="store_true", help="ingest only (no completion)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    text = args.config
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text()
    config = ReceiverConfig.from_dict(json.loads(text))
    configure_logging(args.log_level)
    receiver = Receiver(config, complete_groups=not args.worker).start()
    print(f"listening {receiver.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(1.0 if args.parent_pid else None):
        if os.getppid() != args.parent_pid:  # the main receiver died (kill -9): stop too
            break
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
