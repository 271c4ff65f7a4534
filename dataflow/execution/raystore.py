"""Our shared-memory store on each node of a Ray cluster, for the Ray executor's arrays.

Within a node, a hop through our store costs 2-5x less than through Ray's object store as an
actor call returns it (``benchmarks/results/ray-2026-12-04.md``): so, as the issue asks, the
arrays between stages on one node keep going through our store, and only those that cross
nodes go through Ray's.

- :class:`NodeStore` is a Ray actor (no CPU) the executor starts on each live node: it runs
  a store server (:class:`dataflow.store.Store`, which exits with it) and owns what stage
  actors publish there (``seal(transfer_to=...)``), so a value outlives the actor that made
  it, as on one machine; it hands a copy to a reader on another node (:meth:`NodeStore.fetch`,
  through Ray's object store) and frees what the coordinator discards. On the coordinator's
  own node the coordinator's connection owns the values instead, and frees them one way over
  its socket, as the local executor does.
- :class:`ActorData` is a stage actor's side: it finds its node's store by name; array
  outputs of :data:`INLINE` bytes or more are allocated in it (``ctx.allocate``: zero copy)
  and published as a :class:`ShmRef`; an input from its own node is read zero copy, one from
  another node is fetched from that node's store. Smaller arrays go back inline in the
  call's reply, as Ray does (no store round trip is cheaper). On a node without a store (one
  that joined after the run started) it is None, and the actor's arrays go through Ray's
  object store as before.
- :class:`NodeStores` is the coordinator's: it starts and stops the stores, frees values
  (batched for the other nodes), hands a consumer on another node a Ray object being
  fetched from the producer's store (so the copy travels while the call is dispatched), and
  reads a job's leaf arrays.

A node that dies takes its store with it: reading a value that was there raises
:class:`LostInput`, and the executor runs that job again from its payload (as Ray would
rebuild a lost object from its lineage), at most ``Limits.max_restarts`` times.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import structlog

__all__ = ["ActorData", "LostInput", "NodeStore", "NodeStores", "ShmRef", "fetch", "store_name"]

log = structlog.get_logger("dataflow.execution")

#: arrays smaller than this go inline in the call's reply, not through a store (Ray inlines
#: return values up to 100 KiB: ``max_direct_call_object_size``)
INLINE = 100 * 1024
#: the coordinator frees the values of another node's store in batches of this many (or
#: these bytes, or after this long): each batch is one Ray call
DISCARD_BATCH, DISCARD_BYTES, DISCARD_SECONDS = 32, 256 << 20, 0.2


class LostInput(RuntimeError):
    """An array was in the store of a node that is gone."""


class ShmRef(NamedTuple):
    """An array on an edge, in our store on the node that made it: that node's Ray id, the
    object's id in its store, and the metadata the array carries."""

    node: str
    id: str
    metadata: Mapping[str, Any]


def store_name(prefix: str, node: str) -> str:
    """The Ray name of the store actor of one executor (``prefix``) on ``node``."""
    return f"{prefix}-{node}"


class NodeStore:
    """Our store on one node (a Ray actor: see the module)."""

    def __init__(self, budget: int) -> None:
        from dataflow.store import Store

        self.store = Store.start(budget, name="ray node store")
        self.views: dict[str, list[Any]] = defaultdict(list)  # fetched: held until discarded
        self.owner = self.store.client_id

    def address(self) -> tuple[str, int]:
        """(the store's address, the client id values are handed over to)."""
        return self.store.address, self.owner

    def hand_over(self, client_id: int) -> None:
        """Values published from now on are owned by ``client_id`` (the coordinator's
        connection, on its own node)."""
        self.owner = client_id

    def fetch(self, object_id: str) -> np.ndarray:
        """The array ``object_id`` for a reader on another node (Ray copies it there)."""
        view = self.store.get(object_id, timeout=30)
        self.views[object_id].append(view)
        return view.array

    def discard(self, object_ids: list[str]) -> None:
        for oid in object_ids:
            for view in self.views.pop(oid, ()):
                view.release()
        self.store.discard(object_ids)

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def stop(self) -> None:
        self.views.clear()
        self.store.stop()


class ActorData:
    """A stage actor's arrays in its node's store (see the module). Per job: ``allocate``,
    ``read``, ``publish``, then ``end_job``."""

    def __init__(self, prefix: str, node: str) -> None:
        import ray

        from dataflow.store import connect

        self.prefix, self.node = prefix, node
        self.handles: dict[str, Any] = {}
        handle = ray.get_actor(store_name(prefix, node))  # ValueError: no store on this node
        address, self.owner = ray.get(handle.address.remote())
        self.client = connect(address, name=f"ray actor on {node[:12]}")
        self.allocations: dict[int, Any] = {}
        self.views: list[Any] = []

    @classmethod
    def attach(cls, prefix: str | None) -> ActorData | None:
        """This actor's node's store, or None (no ``prefix``: the executor uses none; or no
        store on this node)."""
        if not prefix:
            return None
        import ray

        node = ray.get_runtime_context().get_node_id()
        try:
            return cls(prefix, node)
        except ValueError:  # a node that joined after the stores were started
            log.info("ray_node_without_store", node=node[:12])
            return None

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize < INLINE:
            return np.empty(shape, dtype=dtype)  # inline in the reply
        obj = self.client.create(shape, dtype, timeout=None)
        self.allocations[id(obj.array)] = obj
        return obj.array

    def read(self, ref: ShmRef) -> np.ndarray:
        """The array ``ref`` names: a read-only view of this node's store, or a copy from
        the store of the node that made it."""
        if ref.node == self.node:
            view = self.client.get(ref.id, timeout=30)
            self.views.append(view)
            return view.array
        return fetch(self.handles, self.prefix, ref)

    def publish(self, array: np.ndarray, metadata: Mapping[str, Any]) -> tuple[str, str] | None:
        """``array`` (allocated here, or copied in) sealed and handed to the node's store:
        (node, object id); None if it is small enough to go inline in the reply."""
        obj = self.allocations.pop(id(array), None)
        if obj is None and array.nbytes < INLINE:
            return None
        if obj is None:  # a plain NumPy array: copy it into the store
            obj = self.client.create(array.shape, array.dtype, timeout=None)
            obj.array[...] = array
        obj.seal(transfer_to=self.owner, metadata=dict(metadata))
        return self.node, obj.id

    def end_job(self) -> None:
        """What the job allocated and did not publish is aborted; its input views let go."""
        for obj in self.allocations.values():
            if not obj.sealed:
                with contextlib.suppress(Exception):
                    obj.abort()
        self.allocations.clear()
        for view in self.views:
            with contextlib.suppress(Exception):
                view.release()
        self.views.clear()


def fetch(handles: dict[str, Any], prefix: str, ref: ShmRef) -> np.ndarray:
    """A copy of ``ref``'s array from its node's store (through Ray's object store); a
    clear error if that store (its node) is gone."""
    import ray
    from ray.exceptions import RayActorError

    try:
        handle = handles.get(ref.node) or ray.get_actor(store_name(prefix, ref.node))
        handles[ref.node] = handle
        return ray.get(handle.fetch.remote(ref.id))
    except (ValueError, RayActorError) as exc:
        raise LostInput(
            f"an input array was in the store of node {ref.node[:12]}, which is gone (the "
            f"node died?): {type(exc).__name__}"
        ) from None


class NodeStores:
    """The coordinator's side: a :class:`NodeStore` on each live node (see the module)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.prefix = f"dataflow-store-{secrets.token_hex(4)}"
        self.handles: dict[str, Any] = {}
        self.here: str | None = None  # the coordinator's node, whose values it owns
        self.client: Any = None  # its connection to that node's store
        self._views: dict[str, Any] = {}  # leaf arrays read here, held until discarded
        self._batch: dict[str, list[str]] = defaultdict(list)  # node -> ids to free
        self._batch_bytes, self._batch_since = 0, 0.0
        self._sent: list[Any] = []  # discards sent, their errors collected later

    def start(self, nodes: Iterable[str]) -> None:
        """A store on each of ``nodes`` (Ray node ids), ready before this returns."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dataflow.store import connect

        actor = ray.remote(NodeStore)
        for node in nodes:
            self.handles[node] = actor.options(
                name=store_name(self.prefix, node), num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(self.budget)  # fmt: skip
        addresses = dict(
            zip(self.handles, ray.get([h.address.remote() for h in self.handles.values()]))
        )
        here = ray.get_runtime_context().get_node_id()
        if here in addresses:  # this node's values: owned by this connection
            self.here, self.client = here, connect(addresses[here][0], name="ray coordinator")
            ray.get(self.handles[here].hand_over.remote(self.client.client_id))

    def discard(self, values: Iterable[tuple[ShmRef, int]]) -> None:
        """Free these values (ref, bytes): this node's at once, one way over the socket;
        another node's in batches (one Ray call each, nothing waits on it)."""
        mine = []
        for ref, nbytes in values:
            if ref.node == self.here:
                mine.append(ref.id)
                view = self._views.pop(ref.id, None)
                if view is not None:
                    view.release()
            else:
                if not self._batch:
                    self._batch_since = time.monotonic()
                self._batch[ref.node].append(ref.id)
                self._batch_bytes += nbytes
        if mine:
            self.client.discard(mine)
        if self._batch and (
            sum(map(len, self._batch.values())) >= DISCARD_BATCH
            or self._batch_bytes >= DISCARD_BYTES
            or time.monotonic() - self._batch_since >= DISCARD_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Send the batched discards of the other nodes now."""
        import ray

        for node, ids in self._batch.items():
            handle = self.handles.get(node)
            if handle is not None:
                self._sent.append(handle.discard.remote(ids))
        self._batch.clear()
        self._batch_bytes = 0
        if len(self._sent) > 16:  # let go of those done (a dead store's error ignored)
            done, self._sent = ray.wait(self._sent, num_returns=len(self._sent), timeout=0)
            for ref in done:
                with contextlib.suppress(Exception):
                    ray.get(ref)

    def due(self) -> float | None:
        """Seconds until the batched discards are due (None: none waits)."""
        if not self._batch:
            return None
        return max(0.0, DISCARD_SECONDS - (time.monotonic() - self._batch_since))

    def towards(self, ref: ShmRef, node: str | None) -> Any:
        """What a consumer on ``node`` is handed for ``ref``: ``ref`` itself on its own node
        (or an unknown one: the consumer fetches it if it must), else a Ray object being
        fetched from the producer's store, which Ray moves to the consumer's node while it
        dispatches the call (one round trip instead of two)."""
        if node is None or node == ref.node or ref.node not in self.handles:
            return ref
        return self.handles[ref.node].fetch.remote(ref.id)

    def read(self, ref: ShmRef) -> np.ndarray:
        """A job's leaf array, for its result (read-only: a view of this node's store, held
        until the value is discarded, or of Ray's object store)."""
        if ref.node == self.here:
            view = self._views[ref.id] = self.client.get(ref.id, timeout=30)
            return view.array
        return fetch(self.handles, self.prefix, ref)

    def stop(self) -> None:
        """Every store stopped (what is in them freed) and its actor killed."""
        import ray

        self._views.clear()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        stopping = [handle.stop.remote() for handle in self.handles.values()]
        with contextlib.suppress(Exception):
            ray.wait(stopping, num_returns=len(stopping), timeout=10)
        for handle in self.handles.values():
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.handles.clear()
        self._batch.clear()
        self._sent.clear()
