"""GPU objects: CUDA IPC between processes (marked gpu), and the store's bookkeeping for them.

The bookkeeping tests run everywhere: they publish descriptors the way ``DevicePool`` does
(without a GPU the descriptor's bytes are never opened) and check what the store promises
for device memory: readers hold references, host-budget eviction never drops a GPU object,
and a producer's objects go when the producer does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from deadlines import HANG, wait_until

from dataflow.errors import StoreValueError
from dataflow.store import Store
from dataflow.store.client import DEVICE_KIND
from dataflow.store.cuda import DESCRIPTOR

pytestmark = pytest.mark.integration
SPAWN = mp.get_context("spawn")
MiB = 1 << 20


def _publish_descriptor(client, oid):
    """Publish a GPU object's descriptor exactly as DeviceObject.seal does."""
    desc = DESCRIPTOR.pack(b"\x01" * 64, 0, 4096, 0, os.getpid())
    client._request("put_inline", oid, DEVICE_KIND, len(desc), "float32", (1024,), "{}", desc, 0)


def _producer(client, oid, ready):
    _publish_descriptor(client, oid)
    ready.set()
    time.sleep(600)


def wait_for(predicate, timeout=HANG):
    wait_until(predicate, "condition met", timeout, poll=0.01)


def test_gpu_objects_are_counted_never_evicted_and_die_with_their_producer():
    with Store.start(budget="8MiB") as store:
        ready = SPAWN.Event()
        producer = SPAWN.Process(target=_producer, args=(store, "seg-gpu", ready))
        producer.start()
        assert ready.wait(HANG)
        view = store.get("seg-gpu")
        assert view.kind == DEVICE_KIND and view.shape == (1024,)
        assert DESCRIPTOR.unpack(view.buffer.to_pybytes())[4] == producer.pid
        assert store.stats()["references"] == 1  # readers of device memory hold a reference
        with pytest.raises(StoreValueError, match="lives on a GPU"):
            view.array  # noqa: B018
        for i in range(12):  # host pressure evicts host objects, never the GPU object
            store.put(np.zeros(MiB, np.uint8), object_id=f"host-{i}")
        assert store.contains("seg-gpu")
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(HANG)
        wait_for(lambda: not store.contains("seg-gpu"))  # deleted with its producer...
        assert any(r["id"] == "seg-gpu" for r in store.list())  # ...but still held by us
        del view
        wait_for(lambda: not any(r["id"] == "seg-gpu" for r in store.list()))


# ----------------------------------------------------------------------- real GPU (marked)


def _gpu_consumer(client, oids, out):
    from dataflow.store.cuda import ipc_cache_info

    sums = []
    for oid in oids:
        view = client.get(oid, timeout=HANG)
        array = view.device_array()
        sums.append(float(array.sum()))
        del view, array
    out.put((sums, ipc_cache_info()))


@pytest.mark.gpu
def test_cuda_ipc_handoff_between_processes_with_cached_handles():
    import cupy

    from dataflow.store.cuda import DevicePool

    with Store.start(budget="64MiB") as store:
        pool = DevicePool(store, "256MiB")
        oids = []
        for i in range(100):
            with pool.create((256, 256), "float32", metadata={"i": i}) as obj:
                obj.array[...] = cupy.full((256, 256), i, dtype=cupy.float32)
            oids.append(obj.id)
        out = SPAWN.Queue()
        consumer = SPAWN.Process(target=_gpu_consumer, args=(store, oids, out))
        consumer.start()
        sums, cache = out.get(timeout=HANG)
        consumer.join(HANG)
        assert sums == [float(i * 256 * 256) for i in range(100)]
        assert cache["misses"] == 1 and cache["hit_rate"] >= 0.99  # one open per pool
        pool.close()


@pytest.mark.gpu
def test_device_pool_reuses_memory_only_after_readers_let_go():
    import cupy

    from dataflow.errors import StoreFull
    from dataflow.store.cuda import DevicePool

    with Store.start(budget="16MiB") as store:
        pool = DevicePool(store, 4 * MiB)
        first = pool.put(cupy.ones(MiB // 4, dtype=cupy.float32) * 7)  # 1 MiB
        held = store.get(first).device_array()
        for _ in range(3):
            pool.put(cupy.zeros(MiB // 4, dtype=cupy.float32))
        # Full: unreferenced objects are evicted oldest first; the held one survives.
        pool.put(cupy.zeros(MiB // 2, dtype=cupy.float32))
        assert store.contains(first) and float(held[0]) == 7.0
        with pytest.raises(StoreFull, match="device pool of 4.0 MiB"):
            pool.create((MiB,), "float32", timeout=0.1)  # 4 MiB: blocked by the held view
        del held
        pool.create((MiB // 2,), "float32").abort()
        pool.close()
