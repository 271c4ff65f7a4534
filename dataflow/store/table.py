"""The store's object table: a sans-IO core that the store server (``server.py``) drives.

All the safety of the store lives here: reference counts, LRU eviction, requests that wait (a
``get`` for a seal, a ``create`` for room) with their deadlines, sealing and aborting, and
reclaiming what a dead client held. It never touches a socket, a clock or memory: the server
decodes a request and calls :meth:`ObjectTable.handle` with the time, and sends the replies it
gets back. Events in, replies out::

    client = table.connect(pid, handle)          # a connection was accepted
    replies = table.handle(client, request, now) # a decoded request (None: settle first)
    replies = table.tick(now)                    # deadlines passed: timeouts
    replies = table.disconnect(client)           # the connection closed (or the client died)

A reply is ``(client, message, fds)``: ``message`` is the wire tuple (``("ok", value)`` or
``("err", class_name, text)``); ``fds`` the opaque handles to pass with it (the arena's file
descriptor, given to the constructor, goes with the reply to ``hello``). One request may answer
other clients too: a seal satisfies the gets waiting for it, a release makes room for a waiting
create.

Seals are one-way: a producer's ``seal`` returns once the request is in the server's socket
buffer. If the producer then tells a consumer (by any channel) and the consumer asks about the
object, the seal may still be unread. So a ``get`` or ``contains`` of an object not sealed
answers ``None`` instead of replies: the server then applies every one-way request already
sent to it ("settles") and hands the same request back with ``settled=True``.

The arena's bookkeeping is an injected :class:`BlockAllocator` (the first-fit
:class:`~dataflow.store.allocator.Allocator` by default, itself pure bookkeeping).

:meth:`ObjectTable.validate` checks every invariant (as dask's ``validate_state``); the unit
tests call it after every event.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from collections import Counter
from typing import Protocol

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

__all__ = [
    "DEVICE_KIND",
    "MAX_ID_LENGTH",
    "BlockAllocator",
    "Client",
    "Object",
    "ObjectTable",
    "Reply",
]

MAX_ID_LENGTH = 255
DEVICE_KIND = "cuda"  # a descriptor of device memory shared by CUDA IPC (dataflow.store.cuda)


class BlockAllocator(Protocol):
    """Where objects go in the arena: offsets only, never memory."""

    allocated: int  # bytes handed out

    def allocate(self, nbytes: int) -> int | None: ...
    def free(self, offset: int) -> None: ...
    def largest_free(self) -> int: ...


@dataclasses.dataclass(slots=True, eq=False)
class Object:
    oid: str
    kind: str
    nbytes: int
    dtype: str | None
    shape: tuple | None
    metadata: str
    offset: int | None = None  # in the arena; None when inline
    data: bytes | None = None  # inline payload
    sealed: bool = False
    creator: Client | None = None  # while unsealed
    refs: int = 0
    deleted: bool = False
    owner: Client | None = None  # GPU objects: the producer whose device memory it is
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

    def story(self) -> str:
        """The object's state in one line, for invariant errors."""
        where = "inline" if self.data is not None else f"arena offset {self.offset}"
        creator = f", creator {self.creator.label()}" if self.creator is not None else ""
        return (
            f"object {self.oid!r} ({self.kind}, {self.nbytes} bytes, {where}, "
            f"{'sealed' if self.sealed else 'unsealed'}{', deleted' if self.deleted else ''}, "
            f"refs {self.refs}{creator})"
        )


@dataclasses.dataclass(slots=True, eq=False)
class Client:
    """One connection's state: what it holds and what it is creating."""

    cid: int  # the client ID other clients may transfer references to
    pid: int = 0
    handle: object = None  # the server's connection; opaque here
    name: str = "?"
    refs: Counter = dataclasses.field(default_factory=Counter)
    created: set = dataclasses.field(default_factory=set)
    devices: set = dataclasses.field(default_factory=set)  # GPU objects whose memory it owns
    closed: bool = False

    def label(self) -> str:
        return f"{self.name} (pid {self.pid})"


@dataclasses.dataclass(slots=True, eq=False)
class Waiter:
    """A client blocked in a request: a get waiting for a seal, or a create waiting for room."""

    deadline: float
    client: Client
    request: tuple  # ("get", oid) or ("create", Object)
    timeout: float = 0.0  # what the caller asked for: errors name it, not the jittery wait
    done: bool = False


#: ``(client, message, fds)``: a wire message to send to a client, with handles to pass.
Reply = tuple[Client, tuple, tuple]


class _Deferred:
    """Marker: the handler replies later (or already did)."""


_DEFERRED = _Deferred()
_UNSETTLED = _Deferred()  # marker: a lookup to answer only once one-way requests are applied


class ObjectTable:
    """The objects of one store and the clients' references to them (see the module doc)."""

    def __init__(
        self,
        budget: int,
        inline_threshold: int,
        allocator: BlockAllocator | None = None,
        *,
        arena: object = None,
        server_pid: int = 0,
    ) -> None:
        if budget < 4096:
            raise StoreValueError(f"store budget must be at least 4096 bytes; got {budget}")
        self.budget = budget
        self.inline_threshold = inline_threshold
        self.alloc = Allocator(budget) if allocator is None else allocator
        self._hello_fds = () if arena is None else (arena,)
        self.server_pid = server_pid

        self.objects: dict[str, Object] = {}
        self.evictable: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU
        self.inline_bytes = 0
        self.get_waiters: dict[str, list[Waiter]] = collections.defaultdict(list)
        self.create_waiters: collections.deque[Waiter] = collections.deque()
        self.deadlines: list[tuple[float, int, Waiter]] = []  # heap
        self._tie = itertools.count()
        self.clients: dict[int, Client] = {}  # by client ID, in order of connection
        self.counters = Counter()
        self._cids = itertools.count(1)
        self.shutdown = False  # a client asked the server to stop
        self._out: list[Reply] = []
        self._now = 0.0
        self._settled = False
        self._ops = {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    # ---------------------------------------------------------------- events

    def connect(self, pid: int = 0, handle: object = None) -> Client:
        """A new connection from process ``pid``; ``handle`` comes back in its replies."""
        client = Client(next(self._cids), pid=pid, handle=handle)
        self.clients[client.cid] = client
        return client

    def handle(
        self, client: Client, request: tuple, now: float, settled: bool = False
    ) -> list[Reply] | None:
        """Apply one decoded request from ``client`` at time ``now``; the replies to send.

        None: the request asks about an object not sealed; apply the one-way requests already
        sent (see the module doc), then hand it back with ``settled=True``.
        """
        out = self._out = []
        if client.closed:
            return out
        self._now = now
        self._settled = settled
        op = request[0]
        handler = self._ops.get(op)
        try:
            if handler is None:
                raise StoreError(f"unknown store operation {op!r}")
            # The common short requests are called with their arguments spelled out: a call
            # with *args costs as much as the rest of a request's handling here (~0.3 us).
            n = len(request)
            if n == 2:  # release, discard, contains, delete, abort, seal
                result = handler(client, request[1])
            elif n == 3:  # get
                result = handler(client, request[1], request[2])
            elif n == 4:  # seal with its options
                result = handler(client, request[1], request[2], request[3])
            else:
                result = handler(client, *request[1:])
        except StoreError as exc:
            if op not in protocol.ONE_WAY:
                out.append((client, ("err", type(exc).__name__, str(exc)), ()))
            return out
        if result is not _DEFERRED and op not in protocol.ONE_WAY:
            if result is _UNSETTLED:
                return None
            out.append((client, ("ok", result), ()))
        return out

    def tick(self, now: float) -> list[Reply]:
        """Time out the waiters whose deadline is ``now`` or earlier."""
        out = self._out = []
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
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: only when a request comes)."""
        return self.deadlines[0][0] if self.deadlines else None

    def disconnect(self, client: Client) -> list[Reply]:
        """Forget a client (closed, crashed or killed): release all it held, in this order."""
        out = self._out = []
        if client.closed:
            return out
        client.closed = True
        self.clients.pop(client.cid, None)
        # 1. Its waiting requests: nothing may be handed to it while it is torn down.
        for waiter in self.create_waiters:
            if waiter.client is client:
                waiter.done = True
        for oid, queue in list(self.get_waiters.items()):
            for waiter in queue:
                if waiter.client is client:
                    waiter.done = True
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
        return out

    # ------------------------------------------------------------- requests

    def op_hello(self, client: Client, pid: int, name: str) -> object:
        client.pid, client.name = pid, name
        info = {
            "budget": self.budget,
            "arena_size": self.budget,
            "inline_threshold": self.inline_threshold,
            "server_pid": self.server_pid,
            "client_id": client.cid,
        }
        self._out.append((client, ("ok", info), self._hello_fds))
        return _DEFERRED

    def op_create(self, client, oid, kind, nbytes, dtype, shape, metadata, timeout) -> object:
        self._check_new(oid, nbytes)
        obj = Object(oid, kind, nbytes, dtype, shape, metadata, creator=client)
        return self._create(client, obj, timeout)

    def op_put_inline(
        self, client, oid, kind, nbytes, dtype, shape, metadata, data, timeout, transfer_to=None
    ):
        """Create and seal a small object in one step; the bytes live in the server.

        ``transfer_to``: a client ID that gets a reference to the new object (see op_seal)."""
        self._check_new(oid, nbytes)
        if nbytes > self.inline_threshold or len(data) != nbytes:
            raise StoreValueError(f"inline object {oid!r}: {len(data)} bytes, expected {nbytes}")
        obj = Object(oid, kind, nbytes, dtype, shape, metadata, data=bytes(data))
        obj.transfer_to = transfer_to
        return self._create(client, obj, timeout)

    def _create(self, client: Client, obj: Object, timeout: float | None) -> object:
        """Place ``obj`` now, or queue it behind the creates already waiting for room."""
        waiter = self._waiter(timeout, client, ("create", obj))
        if self.create_waiters or not self._try_create(waiter):
            self._wait(waiter, self.create_waiters)
        return _DEFERRED

    def op_seal(
        self, client: Client, oid: str, transfer_to: int | None = None, metadata: str | None = None
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
        # The gets waiting for it first: dropping the creator's reference (to a client that
        # has gone) may make room for waiting creates, which must not evict it from under them.
        for waiter in self.get_waiters.pop(oid, ()):
            if not waiter.done:
                waiter.done = True
                self._hand_out(waiter.client, obj)
        if transfer_to is not None:
            client.refs[oid] -= 1
            if not client.refs[oid]:
                del client.refs[oid]
            target = self.clients.get(transfer_to)
            if target is not None and not target.closed:
                target.refs[oid] += 1
            else:
                self._unref(obj)

    def op_abort(self, client: Client, oid: str) -> None:
        obj = self._own_unsealed(client, oid, "abort")
        client.created.discard(oid)
        client.refs[oid] -= 1
        if not client.refs[oid]:
            del client.refs[oid]
        obj.refs -= 1
        self._free(obj)
        self._retry_creates()

    def op_get(self, client: Client, oid: str, timeout: float | None) -> object:
        obj = self.objects.get(oid)
        if obj is None or not obj.sealed:
            if not self._settled:
                return _UNSETTLED
        elif not obj.deleted:
            return self._hand_out(client, obj, reply=False)
        if timeout is not None and timeout <= 0:
            raise ObjectNotFound(self._missing(oid, obj, 0.0))
        waiter = self._waiter(timeout, client, ("get", oid))
        self._wait(waiter, self.get_waiters[oid])
        return _DEFERRED

    def op_release(self, client: Client, oid: str) -> None:
        if client.refs.get(oid, 0) <= 0:
            return  # releasing what one does not hold is a no-op (e.g. after fork)
        client.refs[oid] -= 1
        if not client.refs[oid]:
            del client.refs[oid]
        self._unref(self.objects[oid])

    def op_delete(self, client: Client, oid: str) -> None:
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

    def op_discard(self, client: Client, oid: str) -> None:
        """Delete ``oid`` if it is still there and drop the reference ``client`` holds on it:
        a consumer done with a result it was handed (one way: never waited for; an object
        already gone is no error)."""
        obj = self.objects.get(oid)
        if obj is not None and obj.sealed and not obj.deleted:
            self.op_delete(client, oid)
        self.op_release(client, oid)

    def op_contains(self, client: Client, oid: str) -> object:
        obj = self.objects.get(oid)
        if (obj is None or not obj.sealed) and not self._settled:
            return _UNSETTLED
        return obj is not None and obj.sealed and not obj.deleted

    def op_present(self, client: Client, oids: list[str]) -> list[str]:
        """The subset of ``oids`` still holding memory (sealed or not, deleted but referenced)."""
        return [oid for oid in oids if oid in self.objects]

    def op_evict_unused(self, client: Client, oid: str) -> bool:
        """Evict ``oid`` if nobody holds it (a device pool making room); True if it is gone."""
        obj = self.objects.get(oid)
        if obj is None:
            return True
        if not obj.sealed or obj.refs:
            return False
        self._evict(oid)
        return True

    def op_list(self, client: Client) -> list[dict]:
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

    def op_stats(self, client: Client) -> dict:
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

    def op_shutdown(self, client: Client) -> None:
        self.shutdown = True

    # -------------------------------------------------------------- helpers

    @property
    def used(self) -> int:
        return self.alloc.allocated + self.inline_bytes

    def _reply_error(self, client: Client, exc: StoreError) -> None:
        self._out.append((client, ("err", type(exc).__name__, str(exc)), ()))

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

    def _own_unsealed(self, client: Client, oid: str, verb: str) -> Object:
        obj = self.objects.get(oid)
        if obj is None or obj.deleted:
            raise ObjectNotFound(f"cannot {verb} object {oid!r}: not in the store")
        if obj.sealed:
            raise ObjectSealed(f"cannot {verb} object {oid!r}: it is already sealed")
        if obj.creator is not client:
            raise StoreError(f"cannot {verb} object {oid!r}: it was created by another client")
        return obj

    def _waiter(self, timeout: float | None, client: Client, request: tuple) -> Waiter:
        if timeout is None:
            return Waiter(float("inf"), client, request)
        timeout = max(0.0, timeout)
        return Waiter(self._now + timeout, client, request, timeout)

    def _wait(self, waiter: Waiter, queue) -> None:
        queue.append(waiter)
        if waiter.deadline != float("inf"):
            heapq.heappush(self.deadlines, (waiter.deadline, next(self._tie), waiter))

    def _missing(self, oid: str, obj: Object | None, waited: float) -> str:
        if obj is not None and not obj.sealed:
            return (
                f"object {oid!r} exists but was not sealed within {waited:.3g} s "
                f"(its creator is {obj.creator.label()})"
            )
        if waited:
            return f"object {oid!r} is not in the store (waited {waited:.3g} s)"
        return f"object {oid!r} is not in the store"

    def _full_message(self, obj: Object, waited: float) -> str:
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

    def _try_create(self, waiter: Waiter) -> bool:
        """Place the waiter's object, evicting LRU objects as needed; reply if placed."""
        obj: Object = waiter.request[1]
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
            target = self.clients.get(obj.transfer_to) if obj.transfer_to is not None else None
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
            self._out.append((client, ("ok", None), ()))
        else:
            client.created.add(obj.oid)
            client.refs[obj.oid] += 1
            obj.refs = 1
            self._out.append((client, ("ok", obj.offset), ()))
        return True

    def _retry_creates(self) -> None:
        """Place waiting creates in arrival order, stopping at the first that does not fit."""
        while self.create_waiters:
            waiter = self.create_waiters.popleft()
            if waiter.done:
                continue
            if not self._try_create(waiter):
                self.create_waiters.appendleft(waiter)
                return

    def _hand_out(self, client: Client, obj: Object, reply: bool = True) -> tuple | None:
        """Give ``client`` a reference to a sealed object (none needed for inline copies)."""
        if obj.counted:
            client.refs[obj.oid] += 1
            obj.refs += 1
            self.evictable.pop(obj.oid, None)
        elif obj.oid in self.evictable:
            self.evictable.move_to_end(obj.oid)
        if reply:
            self._out.append((client, ("ok", obj.record()), ()))
            return None
        return obj.record()

    def _unref(self, obj: Object) -> None:
        obj.refs -= 1
        if obj.refs:
            return
        if obj.deleted or not obj.sealed:
            self._free(obj)
        else:
            self._make_evictable(obj)
        self._retry_creates()

    def _make_evictable(self, obj: Object) -> None:
        # GPU objects cost the host budget a few bytes; their own pool evicts them.
        if obj.kind != DEVICE_KIND:
            self.evictable[obj.oid] = None

    def _evict(self, oid: str) -> None:
        obj = self.objects[oid]
        self.counters["evicted"] += 1
        self._free(obj)

    def _free(self, obj: Object) -> None:
        del self.objects[obj.oid]
        self.evictable.pop(obj.oid, None)
        if obj.creator is not None:  # unsealed and released (a dropped WritableObject)
            obj.creator.created.discard(obj.oid)
        if obj.owner is not None:
            obj.owner.devices.discard(obj)
        if obj.data is not None:
            self.inline_bytes -= obj.nbytes
        elif obj.offset is not None:
            self.alloc.free(obj.offset)
        self.counters["freed"] += 1

    # ------------------------------------------------------------ invariants

    def validate(self) -> None:
        """Assert every invariant of the table; each error tells the story of the item.

        For tests (as dask's ``validate_state``): it walks everything, so it is never called
        on the server's hot path.
        """
        objects, clients = self.objects, self.clients
        # Bytes: the allocator's and the inline count agree with the objects' footprints.
        arena = [o for o in objects.values() if o.data is None]
        inline = [o for o in objects.values() if o.data is not None]
        arena_bytes = sum(o.footprint for o in arena)
        assert arena_bytes == self.alloc.allocated, (
            f"arena objects' footprints sum to {arena_bytes} bytes but the allocator has "
            f"{self.alloc.allocated} allocated: {[o.story() for o in arena]}"
        )
        inline_bytes = sum(o.nbytes for o in inline)
        assert inline_bytes == self.inline_bytes, (
            f"inline objects hold {inline_bytes} bytes but the table counts {self.inline_bytes}"
        )
        assert self.used <= self.budget, f"{self.used} bytes used, over the budget {self.budget}"
        spans = sorted((o for o in arena if o.offset is not None), key=lambda o: o.offset)
        for a, b in itertools.pairwise(spans):
            assert a.offset + a.footprint <= b.offset, f"{a.story()} overlaps {b.story()}"
        if spans:
            last = spans[-1]
            assert last.offset + last.footprint <= self.budget, (
                f"{last.story()} ends past the arena"
            )

        # References: an object's count is the sum of its clients' references.
        held: Counter = Counter()
        for cid, client in clients.items():
            assert client.cid == cid and not client.closed, (
                f"client {client.label()} is registered as {cid} (its ID {client.cid}, "
                f"closed {client.closed})"
            )
            for oid, count in client.refs.items():
                assert count > 0, f"client {client.label()} holds {count} references to {oid!r}"
                assert oid in objects, (
                    f"client {client.label()} holds {count} references to {oid!r}, "
                    "which is not in the table"
                )
                held[oid] += count
            for oid in client.created:
                obj = objects.get(oid)
                assert obj is not None and obj.creator is client and not obj.sealed, (
                    f"client {client.label()} is creating {oid!r} but the table has "
                    f"{obj.story() if obj else 'no such object'}"
                )
            for obj in client.devices:
                assert objects.get(obj.oid) is obj and obj.owner is client, (
                    f"client {client.label()} owns the device memory of {obj.story()}, "
                    "which is not in the table as its own"
                )
        for oid, obj in objects.items():
            assert obj.oid == oid, f"{obj.story()} is filed under {oid!r}"
            assert obj.refs == held[oid], (
                f"{obj.story()}: its count is {obj.refs} but clients hold {held[oid]} "
                f"({[(c.label(), c.refs[oid]) for c in clients.values() if oid in c.refs]})"
            )
            if obj.sealed:
                assert obj.creator is None, f"{obj.story()} is sealed but still has a creator"
            else:
                creator = obj.creator
                assert obj.data is None and not obj.deleted, f"{obj.story()} cannot be unsealed"
                assert creator is not None and clients.get(creator.cid) is creator, (
                    f"{obj.story()} is unsealed but its creator is not a live client"
                )
                assert oid in creator.created and creator.refs[oid] >= 1, (
                    f"{obj.story()}: its creator {creator.label()} does not hold it"
                )
            if obj.data is None:
                assert obj.offset is not None, f"{obj.story()} has no place in the arena"
            if obj.owner is not None and not obj.deleted:
                assert obj.kind == DEVICE_KIND and obj in obj.owner.devices, (
                    f"{obj.story()} names {obj.owner.label()} as owner, which does not own it"
                )
                assert clients.get(obj.owner.cid) is obj.owner, (
                    f"{obj.story()} is alive but its owner {obj.owner.label()} is gone"
                )

        # Eviction: exactly the sealed, undeleted, unreferenced host objects, in LRU order.
        expected = {
            oid
            for oid, o in objects.items()
            if o.sealed and not o.deleted and o.refs == 0 and o.kind != DEVICE_KIND
        }
        assert set(self.evictable) == expected, (
            f"evictable {sorted(self.evictable)} but the sealed unreferenced objects are "
            f"{sorted(expected)}"
        )

        # Waiters: every pending one belongs to a live client and is findable by its deadline.
        timed = {id(w) for _, _, w in self.deadlines}
        pending = [w for w in self.create_waiters if not w.done]
        for oid, queue in self.get_waiters.items():
            assert queue, f"an empty queue of gets is left for {oid!r}"
            obj = objects.get(oid)
            assert obj is None or not obj.sealed or obj.deleted, (
                f"gets wait for {obj.story()}, which is there to hand out"
            )
            for waiter in queue:
                assert not waiter.done and waiter.request == ("get", oid), (
                    f"a get by {waiter.client.label()} in the queue of {oid!r} is "
                    f"{waiter.request[0]} ({'done' if waiter.done else 'pending'})"
                )
            pending += queue
        for waiter in pending:
            client, what = waiter.client, waiter.request
            name = what[1].oid if what[0] == "create" else what[1]
            assert clients.get(client.cid) is client, (
                f"a {what[0]} of {name!r} waits for {client.label()}, which is gone"
            )
            assert waiter.deadline == float("inf") or id(waiter) in timed, (
                f"a {what[0]} of {name!r} by {client.label()} has a deadline nobody watches"
            )
        first = next((w for w in self.create_waiters if not w.done), None)
        if first is not None:
            obj = first.request[1]
            assert not self.evictable, (
                f"the create of {obj.oid!r} by {first.client.label()} waits although "
                f"{sorted(self.evictable)} could be evicted"
            )
