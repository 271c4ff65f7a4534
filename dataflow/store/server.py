"""The store server: one process that owns the arena and all bookkeeping.

It is started by :meth:`dataflow.store.Store.start` (never by hand) and lives exactly as long
as its owner: it exits when the owner asks, on SIGTERM, or when the owner process dies. The
arena is a ``memfd`` (anonymous shared memory), so nothing is ever created in ``/dev/shm``:
when the last process that maps it exits, the kernel frees the memory, whatever crashed.

The server is a single-threaded ``selectors`` loop. It never touches object bytes except for
small objects kept inline. State per client connection: the references it holds and the
objects it created but has not sealed; all of it is released when the connection closes,
which is how a client killed with SIGKILL is detected.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fcntl
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import Counter

from dataflow.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectSealed,
    StoreError,
    StoreFull,
    StoreValueError,
)
from dataflow.store import protocol
from dataflow.store.allocator import Allocator, align
from dataflow.units import format_bytes

log = logging.getLogger("dataflow.store.server")

MAX_ID_LENGTH = 255
MEMFD_PREFIX = "dataflow-store:"
DEVICE_KIND = "cuda"  # a descriptor of device memory shared by CUDA IPC (dataflow.store.cuda)


@dataclasses.dataclass(slots=True, eq=False)
class _Object:
    oid: str
    kind: str
    nbytes: int
    dtype: str | None
    shape: tuple | None
    metadata: str
    offset: int | None = None  # in the arena; None when inline
    data: bytes | None = None  # inline payload
    sealed: bool = False
    creator: _Client | None = None  # while unsealed
    refs: int = 0
    deleted: bool = False
    owner: _Client | None = None  # GPU objects: the producer whose device memory it is
    transfer_to: int | None = None  # inline objects: who gets the creator's reference

    def record(self) -> tuple:
        return (
            self.kind,
            self.offset,
            self.nbytes,
            self.dtype,
            self.shape,
            self.metadata,
            self.data,
        )

    @property
    def counted(self) -> bool:
        """Readers hold references: arena objects, and GPU objects (whose memory lives in the
        producer's device pool, which must not reuse it while anyone holds a view)."""
        return self.data is None or self.kind == DEVICE_KIND

    @property
    def footprint(self) -> int:
        return align(self.nbytes) if self.data is None else self.nbytes


@dataclasses.dataclass(slots=True, eq=False)
class _Client:
    sock: socket.socket
    pid: int = 0
    cid: int = 0  # the client ID other clients may transfer references to
    name: str = "?"
    rbuf: bytearray = dataclasses.field(default_factory=bytearray)
    refs: Counter = dataclasses.field(default_factory=Counter)
    created: set = dataclasses.field(default_factory=set)
    devices: set = dataclasses.field(default_factory=set)  # GPU objects whose memory it owns
    closed: bool = False

    def label(self) -> str:
        return f"{self.name} (pid {self.pid})"


@dataclasses.dataclass(slots=True, eq=False)
class _Waiter:
    """A client blocked in a request: a get waiting for a seal, or a create waiting for room."""

    deadline: float
    client: _Client
    request: tuple
    timeout: float = 0.0  # what the caller asked for: errors name it, not the jittery wait
    done: bool = False


class StoreServer:
    def __init__(
        self,
        address: str,
        budget: int,
        inline_threshold: int,
        owner_pid: int | None = None,
    ) -> None:
        if budget < 4096:
            raise StoreValueError(f"store budget must be at least 4096 bytes; got {budget}")
        self.address = address
        self.budget = budget
        self.inline_threshold = inline_threshold
        self.owner_pid = owner_pid
        self.uid = os.getuid()

        # The name only labels the mapping in /proc/<pid>/maps ("/memfd:dataflow-store:...").
        label = f"{MEMFD_PREFIX}{address.replace('/', '_')}"[:240]
        self.fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, budget)
        # Nobody may shrink the arena under another process's mappings (that would SIGBUS them).
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.alloc = Allocator(budget)

        self.objects: dict[str, _Object] = {}
        self.evictable: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU
        self.inline_bytes = 0
        self.get_waiters: dict[str, list[_Waiter]] = collections.defaultdict(list)
        self.create_waiters: collections.deque[_Waiter] = collections.deque()
        self.deadlines: list[tuple[float, int, _Waiter]] = []  # heap
        self._tie = itertools.count()
        self.clients: dict[socket.socket, _Client] = {}
        self.counters = Counter()
        self.backlog: set[_Client] = set()  # buffered requests that _settle left for the loop
        self.by_cid: dict[int, _Client] = {}
        self._scratch = bytearray(1 << 16)
        self._scratch_view = memoryview(self._scratch)
        self._cids = itertools.count(1)
        self.running = False

        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(protocol.parse_address(address))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        # A signal handler only sets a flag; this pipe wakes the select() so it is seen.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if owner_pid is not None:
            self.owner_fd = os.pidfd_open(owner_pid)
            self.sel.register(self.owner_fd, selectors.EVENT_READ, "owner")

    # ------------------------------------------------------------------ loop

    def serve_forever(self) -> None:
        self.running = True
        try:
            while self.running:
                timeout = None
                if self.deadlines:
                    timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
                for key, _ in self.sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        os.read(self._wake_r, 512)
                    elif key.data == "owner":
                        log.warning("store owner %s exited; shutting down", self.owner_pid)
                        self.running = False
                    else:
                        self._readable(key.data)
                while self.backlog:  # requests read early by _settle, still to handle
                    client = self.backlog.pop()
                    if not client.closed:
                        self._process(client)
                self._expire()
        finally:
            self.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._disconnect(client)
        self.sel.close()
        self.listener.close()
        if self.address.startswith("/"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass
        os.close(self.fd)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != self.uid and uid != 0:
            log.warning("refused store connection from uid %d (pid %d)", uid, pid)
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, pid=pid, cid=next(self._cids))
        self.clients[sock] = client
        self.by_cid[client.cid] = client
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _readable(self, client: _Client, one_way_only: bool = False) -> None:
        try:
            # Into a reused buffer: recv(n) would allocate (and for big n, mmap) n bytes each time.
            n = client.sock.recv_into(self._scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._disconnect(client)
            return
        client.rbuf += self._scratch_view[:n]
        self._process(client, one_way_only)

    def _process(self, client: _Client, one_way_only: bool = False) -> None:
        """Handle the complete requests in the client's buffer, in order.

        ``one_way_only``: stop at the first request that wants a reply and leave it (and what
        follows) for the main loop; see :meth:`_settle`.
        """
        buf = client.rbuf
        header = protocol.HEADER
        while len(buf) >= header.size:
            (size,) = header.unpack_from(buf)
            end = header.size + size
            if len(buf) < end:
                break
            request = protocol.decode(memoryview(buf)[header.size : end])
            if one_way_only and request[0] not in protocol.ONE_WAY:
                self.backlog.add(client)
                return
            del buf[:end]
            self._dispatch(client, request)
            if client.closed:
                return

    def _settle(self) -> None:
        """Apply every one-way request (seal, release) already sent to us.

        A producer's ``seal`` is one-way: it returns once the request is in our socket buffer.
        If the producer then tells a consumer (by any channel) and the consumer asks us, the
        seal is in a buffer we may not have read yet. Before answering "not there", read it.
        """
        for key, _ in self.sel.select(0):
            if isinstance(key.data, _Client):
                self._readable(key.data, one_way_only=True)
        for client in list(self.clients.values()):
            if client.rbuf and client not in self.backlog:
                self._process(client, one_way_only=True)

    def _dispatch(self, client: _Client, request: tuple) -> None:
        op = request[0]
        handler = getattr(self, "op_" + op, None)
        try:
            if handler is None:
                raise StoreError(f"unknown store operation {op!r}")
            result = handler(client, *request[1:])
        except StoreError as exc:
            if op not in protocol.ONE_WAY:
                self._reply_error(client, exc)
            return
        if result is not _DEFERRED and op not in protocol.ONE_WAY:
            self._send(client, ("ok", result))

    def _send(self, client: _Client, message: tuple, fds: tuple[int, ...] = ()) -> None:
        if client.closed:
            return
        frame = protocol.encode(message)
        sock = client.sock
        try:
            if fds:
                sent = socket.send_fds(sock, [frame], list(fds))
            else:
                sent = sock.send(frame)  # replies are small: this nearly always sends all
            if sent < len(frame):  # the client is slow to read: finish, blocking
                sock.setblocking(True)
                sock.sendall(memoryview(frame)[sent:])
                sock.setblocking(False)
        except BlockingIOError:
            sock.setblocking(True)
            try:
                sock.sendall(frame)
            except OSError:
                self._disconnect(client)
                return
            sock.setblocking(False)
        except OSError:
            self._disconnect(client)

    def _reply_error(self, client: _Client, exc: StoreError) -> None:
        self._send(client, ("err", type(exc).__name__, str(exc)))

    # ------------------------------------------------------------- requests

    def op_hello(self, client: _Client, pid: int, name: str) -> object:
        client.pid, client.name = pid, name
        info = {
            "budget": self.budget,
            "arena_size": self.budget,
            "inline_threshold": self.inline_threshold,
            "server_pid": os.getpid(),
            "client_id": client.cid,
        }
        self._send(client, ("ok", info), fds=(self.fd,))
        return _DEFERRED

    def op_create(self, client, oid, kind, nbytes, dtype, shape, metadata, timeout) -> object:
        self._check_new(oid, nbytes)
        obj = _Object(oid, kind, nbytes, dtype, shape, metadata, creator=client)
        waiter = self._waiter(timeout, client, ("create", obj))
        if not self.create_waiters and self._try_create(waiter):
            return _DEFERRED
        self._wait(waiter, self.create_waiters)
        return _DEFERRED

    def op_put_inline(
        self, client, oid, kind, nbytes, dtype, shape, metadata, data, timeout, transfer_to=None
    ):
        """Create and seal a small object in one step; the bytes live in the server.

        ``transfer_to``: a client ID that gets a reference to the new object (see op_seal)."""
        self._check_new(oid, nbytes)
        if nbytes > self.inline_threshold or len(data) != nbytes:
            raise StoreValueError(f"inline object {oid!r}: {len(data)} bytes, expected {nbytes}")
        obj = _Object(oid, kind, nbytes, dtype, shape, metadata, data=bytes(data))
        obj.transfer_to = transfer_to
        waiter = self._waiter(timeout, client, ("create", obj))
        if not self.create_waiters and self._try_create(waiter):
            return _DEFERRED
        self._wait(waiter, self.create_waiters)
        return _DEFERRED

    def op_seal(
        self, client: _Client, oid: str, transfer_to: int | None = None, metadata: str | None = None
    ) -> None:
        """Seal; with ``transfer_to``, hand the creator's reference to that client (an
        orchestrator that decides when the object may go), so there is no moment at which the
        object is unreferenced and could be evicted."""
        obj = self._own_unsealed(client, oid, "seal")
        if metadata is not None:
            obj.metadata = metadata
        obj.sealed = True
        obj.creator = None
        client.created.discard(oid)
        self.counters["sealed"] += 1
        if transfer_to is not None:
            client.refs[oid] -= 1
            if not client.refs[oid]:
                del client.refs[oid]
            target = self.by_cid.get(transfer_to)
            if target is not None and not target.closed:
                target.refs[oid] += 1
            else:
                self._unref(obj)
        for waiter in self.get_waiters.pop(oid, ()):
            if not waiter.done:
                waiter.done = True
                self._hand_out(waiter.client, obj)

    def op_abort(self, client: _Client, oid: str) -> None:
        obj = self._own_unsealed(client, oid, "abort")
        client.created.discard(oid)
        client.refs[oid] -= 1
        if not client.refs[oid]:
            del client.refs[oid]
        obj.refs -= 1
        self._free(obj)
        self._retry_creates()

    def op_get(self, client: _Client, oid: str, timeout: float | None) -> object:
        obj = self._lookup(oid)
        if obj is not None and obj.sealed and not obj.deleted:
            return self._hand_out(client, obj, reply=False)
        if timeout is not None and timeout <= 0:
            raise ObjectNotFound(self._missing(oid, obj, 0.0))
        waiter = self._waiter(timeout, client, ("get", oid))
        self._wait(waiter, self.get_waiters[oid])
        return _DEFERRED

    def op_release(self, client: _Client, oid: str) -> None:
        if client.refs.get(oid, 0) <= 0:
            return  # releasing what one does not hold is a no-op (e.g. after fork)
        client.refs[oid] -= 1
        if not client.refs[oid]:
            del client.refs[oid]
        self._unref(self.objects[oid])

    def op_delete(self, client: _Client, oid: str) -> None:
        obj = self.objects.get(oid)
        if obj is None or obj.deleted:
            raise ObjectNotFound(f"cannot delete object {oid!r}: not in the store")
        if not obj.sealed:
            raise StoreError(
                f"cannot delete object {oid!r}: it is not sealed yet "
                f"(its creator {obj.creator.label()} may abort it)"
            )
        obj.deleted = True
        self.evictable.pop(oid, None)
        self.counters["deleted"] += 1
        if obj.refs == 0:
            self._free(obj)
            self._retry_creates()

    def op_contains(self, client: _Client, oid: str) -> bool:
        obj = self._lookup(oid)
        return obj is not None and obj.sealed and not obj.deleted

    def _lookup(self, oid: str) -> _Object | None:
        """The object, if sealed, after applying any seal already sent to us (see _settle)."""
        obj = self.objects.get(oid)
        if obj is None or not obj.sealed:
            self._settle()
            obj = self.objects.get(oid)
        return obj

    def op_present(self, client: _Client, oids: list[str]) -> list[str]:
        """The subset of ``oids`` still holding memory (sealed or not, deleted but referenced)."""
        return [oid for oid in oids if oid in self.objects]

    def op_evict_unused(self, client: _Client, oid: str) -> bool:
        """Evict ``oid`` if nobody holds it (a device pool making room); True if it is gone."""
        obj = self.objects.get(oid)
        if obj is None:
            return True
        if not obj.sealed or obj.refs:
            return False
        self._evict(oid)
        return True

    def op_list(self, client: _Client) -> list[dict]:
        return [
            {
                "id": obj.oid,
                "kind": obj.kind,
                "nbytes": obj.nbytes,
                "dtype": obj.dtype,
                "shape": obj.shape,
                "sealed": obj.sealed,
                "deleted": obj.deleted,
                "refs": obj.refs,
                "inline": obj.data is not None,
            }
            for obj in self.objects.values()
        ]

    def op_stats(self, client: _Client) -> dict:
        objs = self.objects.values()
        return {
            "budget": self.budget,
            "used": self.used,
            "arena_allocated": self.alloc.allocated,
            "inline_bytes": self.inline_bytes,
            "largest_free_block": self.alloc.largest_free(),
            "objects": len(self.objects),
            "sealed": sum(o.sealed for o in objs),
            "unsealed": sum(not o.sealed for o in objs),
            "referenced": sum(o.refs > 0 for o in objs),
            "references": sum(o.refs for o in objs),
            "evictable": len(self.evictable),
            "clients": len(self.clients),
            "waiting_gets": sum(len(w) for w in self.get_waiters.values()),
            "waiting_creates": len(self.create_waiters),
            # running totals since the store started
            **{
                f"{event}_total": self.counters[event]
                for event in (
                    "created",
                    "sealed",
                    "evicted",
                    "deleted",
                    "freed",
                    "clients_lost",
                    "refs_reclaimed",
                    "unsealed_reclaimed",
                )
            },
        }

    def op_shutdown(self, client: _Client) -> None:
        self.running = False

    # -------------------------------------------------------------- helpers

    @property
    def used(self) -> int:
        return self.alloc.allocated + self.inline_bytes

    def _check_new(self, oid: str, nbytes: int) -> None:
        if not isinstance(oid, str) or not 0 < len(oid) <= MAX_ID_LENGTH or not oid.isprintable():
            raise StoreValueError(
                f"object ID must be 1-{MAX_ID_LENGTH} printable characters; got {oid!r}"
            )
        if oid in self.objects:
            raise ObjectExists(f"object {oid!r} already exists in the store")
        if not isinstance(nbytes, int) or nbytes < 0:
            raise StoreValueError(f"object size must be a non-negative int; got {nbytes!r}")
        if align(nbytes) > self.budget:
            raise StoreFull(
                f"object {oid!r} of {format_bytes(nbytes)} can never fit: "
                f"the store budget is {format_bytes(self.budget)}"
            )

    def _own_unsealed(self, client: _Client, oid: str, verb: str) -> _Object:
        obj = self.objects.get(oid)
        if obj is None or obj.deleted:
            raise ObjectNotFound(f"cannot {verb} object {oid!r}: not in the store")
        if obj.sealed:
            raise ObjectSealed(f"cannot {verb} object {oid!r}: it is already sealed")
        if obj.creator is not client:
            raise StoreError(f"cannot {verb} object {oid!r}: it was created by another client")
        return obj

    def _waiter(self, timeout: float | None, client: _Client, request: tuple) -> _Waiter:
        now = time.monotonic()
        if timeout is None:
            return _Waiter(float("inf"), client, request)
        timeout = max(0.0, timeout)
        return _Waiter(now + timeout, client, request, timeout)

    def _wait(self, waiter: _Waiter, queue) -> None:
        queue.append(waiter)
        if waiter.deadline != float("inf"):
            heapq.heappush(self.deadlines, (waiter.deadline, next(self._tie), waiter))

    def _expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self.deadlines)
            if waiter.done:
                continue
            waiter.done = True
            waited = waiter.timeout
            kind, arg = waiter.request
            if kind == "get":
                exc: StoreError = ObjectNotFound(self._missing(arg, self.objects.get(arg), waited))
                queue = self.get_waiters.get(arg)
                if queue is not None:
                    queue.remove(waiter)
                    if not queue:
                        del self.get_waiters[arg]
            else:
                exc = StoreFull(self._full_message(arg, waited))
            self._reply_error(waiter.client, exc)
        # drop finished waiters from the create queue's head
        while self.create_waiters and self.create_waiters[0].done:
            self.create_waiters.popleft()

    def _missing(self, oid: str, obj: _Object | None, waited: float) -> str:
        if obj is not None and not obj.sealed:
            return (
                f"object {oid!r} exists but was not sealed within {waited:.3g} s "
                f"(its creator is {obj.creator.label()})"
            )
        if waited:
            return f"object {oid!r} is not in the store (waited {waited:.3g} s)"
        return f"object {oid!r} is not in the store"

    def _full_message(self, obj: _Object, waited: float) -> str:
        holders = sorted(
            (o for o in self.objects.values() if o.refs or not o.sealed),
            key=lambda o: o.footprint,
            reverse=True,
        )[:5]
        described = []
        for o in holders:
            who = [c.label() for c in self.clients.values() if o.oid in c.refs]
            state = "sealed" if o.sealed else "unsealed"
            described.append(
                f"{o.oid!r} {format_bytes(o.footprint)} {state}, held by {', '.join(who)}"
            )
        return (
            f"store is full: could not make room for object {obj.oid!r} of "
            f"{format_bytes(obj.nbytes)} within {waited:.3g} s. Budget "
            f"{format_bytes(self.budget)}, {format_bytes(self.used)} in use by "
            f"{len(self.objects)} objects, none of them evictable"
            f" (largest free block {format_bytes(self.alloc.largest_free())}). "
            "Largest holders: " + ("; ".join(described) or "none")
        )

    def _try_create(self, waiter: _Waiter) -> bool:
        """Place the waiter's object, evicting LRU objects as needed; reply if placed."""
        obj: _Object = waiter.request[1]
        client = waiter.client
        if client.closed:
            waiter.done = True
            return True
        if obj.oid in self.objects:  # someone else created it while we waited
            waiter.done = True
            self._reply_error(client, ObjectExists(f"object {obj.oid!r} already exists"))
            return True
        while True:
            if self.used + obj.footprint <= self.budget:
                if obj.data is not None:
                    break
                offset = self.alloc.allocate(obj.nbytes)
                if offset is not None:
                    obj.offset = offset
                    break
            if not self.evictable:
                return False
            self._evict(next(iter(self.evictable)))
        waiter.done = True
        self.objects[obj.oid] = obj
        self.counters["created"] += 1
        if obj.data is not None:
            self.inline_bytes += obj.nbytes
            if obj.kind == DEVICE_KIND:
                obj.owner = client
                client.devices.add(obj)
            obj.sealed = True
            obj.creator = None
            target = self.by_cid.get(obj.transfer_to) if obj.transfer_to is not None else None
            if target is not None and not target.closed:
                target.refs[obj.oid] += 1
                obj.refs += 1
            else:
                self._make_evictable(obj)
            self.counters["sealed"] += 1
            for getter in self.get_waiters.pop(obj.oid, ()):
                if not getter.done:
                    getter.done = True
                    self._hand_out(getter.client, obj)
            self._send(client, ("ok", None))
        else:
            client.created.add(obj.oid)
            client.refs[obj.oid] += 1
            obj.refs = 1
            self._send(client, ("ok", obj.offset))
        return True

    def _retry_creates(self) -> None:
        """Place waiting creates in arrival order, stopping at the first that does not fit."""
        while self.create_waiters:
            # Popped before trying: placing one may disconnect a client and re-enter here.
            waiter = self.create_waiters.popleft()
            if waiter.done:
                continue
            if not self._try_create(waiter):
                self.create_waiters.appendleft(waiter)
                return

    def _hand_out(self, client: _Client, obj: _Object, reply: bool = True) -> tuple | None:
        """Give ``client`` a reference to a sealed object (none needed for inline copies)."""
        if obj.counted:
            client.refs[obj.oid] += 1
            obj.refs += 1
            self.evictable.pop(obj.oid, None)
        elif obj.oid in self.evictable:
            self.evictable.move_to_end(obj.oid)
        if reply:
            self._send(client, ("ok", obj.record()))
            return None
        return obj.record()

    def _unref(self, obj: _Object) -> None:
        obj.refs -= 1
        if obj.refs:
            return
        if obj.deleted or not obj.sealed:
            self._free(obj)
        else:
            self._make_evictable(obj)
        self._retry_creates()

    def _make_evictable(self, obj: _Object) -> None:
        # GPU objects cost the host budget a few bytes; their own pool evicts them.
        if obj.kind != DEVICE_KIND:
            self.evictable[obj.oid] = None

    def _evict(self, oid: str) -> None:
        obj = self.objects[oid]
        self.counters["evicted"] += 1
        self._free(obj)

    def _free(self, obj: _Object) -> None:
        del self.objects[obj.oid]
        self.evictable.pop(obj.oid, None)
        if obj.owner is not None:
            obj.owner.devices.discard(obj)
        if obj.data is not None:
            self.inline_bytes -= obj.nbytes
        elif obj.offset is not None:
            self.alloc.free(obj.offset)
        self.counters["freed"] += 1

    def _disconnect(self, client: _Client) -> None:
        """Forget a client (closed, crashed or killed): release all it held, in this order."""
        if client.closed:
            return
        client.closed = True
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self.clients.pop(client.sock, None)
        self.by_cid.pop(client.cid, None)
        # 1. Its waiting requests: nothing may be handed to it while it is torn down.
        for waiter in self.create_waiters:
            if waiter.client is client:
                waiter.done = True
        for oid, queue in list(self.get_waiters.items()):
            queue[:] = [w for w in queue if w.client is not client]
            if not queue:
                del self.get_waiters[oid]
        if client.refs or client.created:
            self.counters["clients_lost"] += 1
        # 2. Objects it was creating: freed with the creator's reference below.
        for oid in client.created:
            obj = self.objects.get(oid)
            if obj is not None and not obj.sealed:
                obj.creator = None
                self.counters["unsealed_reclaimed"] += 1
        # 3. Its references.
        refs, client.refs = client.refs, Counter()
        client.created.clear()
        for oid, count in refs.items():
            obj = self.objects.get(oid)
            if obj is None:
                continue
            self.counters["refs_reclaimed"] += count
            obj.refs -= count - 1
            self._unref(obj)
        # 4. Device memory dies with its producer: its GPU objects go too (once unreferenced).
        for obj in list(client.devices):
            if not obj.deleted:
                obj.deleted = True
                if obj.refs == 0:
                    self._free(obj)
        client.devices.clear()
        self._retry_creates()


class _Deferred:
    """Marker: the handler replies later (or already did)."""


_DEFERRED = _Deferred()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataflow.store.server")
    parser.add_argument("--address", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--inline-threshold", type=int, required=True)
    parser.add_argument("--owner-pid", type=int)
    parser.add_argument("--ready-fd", type=int, help="write 'ready' here once listening")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="dataflow.store: %(message)s")
    try:
        server = StoreServer(args.address, args.budget, args.inline_threshold, args.owner_pid)
    except (OSError, StoreError) as exc:
        print(f"dataflow.store: cannot start at {args.address!r}: {exc}", file=sys.stderr)
        sys.exit(1)

    def stop(signum, frame):
        server.running = False

    signal.set_wakeup_fd(server._wake_w)
    # With an owner, the owner stops us (a shutdown request, or its exit): systemd's SIGTERM
    # to every process of a service must not take the objects of the jobs it lets finish.
    signal.signal(signal.SIGTERM, stop if args.owner_pid is None else signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the owner, which stops us
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    server.serve_forever()


if __name__ == "__main__":
    main()
