"""The shared-memory store with real processes, real shared memory and real signals."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
from deadlines import HANG, wait_until

from dataflow.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectSealed,
    StoreError,
    StoreFull,
    StoreNotRunning,
    StoreValueError,
)
from dataflow.store import Store, connect
from dataflow.store.server import MEMFD_PREFIX
from dataflow.tensors import ELEMENT_TYPES, tensor_from_arrow

pytestmark = pytest.mark.integration

MiB = 1 << 20
SPAWN = mp.get_context("spawn")


@pytest.fixture
def store():
    with Store.start(budget="64MiB") as s:
        yield s


def wait_for(predicate, timeout=HANG):
    wait_until(predicate, "condition met", timeout, poll=0.01)


def shm_files() -> set[str]:
    """/dev/shm entries, less multiprocessing's own (queues' semaphores, other suites' psm_)."""
    return {n for n in os.listdir("/dev/shm") if not n.startswith(("sem.mp-", "psm_"))}


def arena_mappings(address: str) -> list[str]:
    """Processes that still map the arena of the store at ``address``."""
    label = "memfd:" + MEMFD_PREFIX + address.replace("/", "_")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if any(label in line for line in maps):
                    found.append(pid)
        except OSError:
            continue
    return found


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------- worker processes (spawn)


def _produce(client, oid, shape, seed, delay):
    time.sleep(delay)
    with client.create(shape, "float32", object_id=oid, metadata={"seed": seed}) as obj:
        obj.array[...] = np.random.default_rng(seed).random(shape, dtype=np.float32)


def _get_digest(client, oid, timeout, out):
    view = client.get(oid, timeout=timeout)
    out.put((digest(view.array), view.metadata))


def _hold_view(client, oid, holding, proceed, out):
    """Get a view, say so, wait, then check the data is still intact."""
    view = client.get(oid)
    arr = view.array[::2]  # a derived view keeps the object alive too
    del view
    holding.set()
    proceed.wait(HANG)
    out.put(digest(arr))


def _hold_and_hang(client, oids, created_oid, holding):
    views = [client.get(oid) for oid in oids]
    unsealed = client.create((MiB,), "uint8", object_id=created_oid)
    unsealed.array[:] = 1
    holding.set()
    time.sleep(600)  # killed with SIGKILL long before
    del views, unsealed


def _churn(client, worker, count, out):
    rng = np.random.default_rng(worker)
    sums = {}
    for i in range(count):
        n = int(rng.integers(1, 200_000))
        data = rng.integers(0, 255, n, dtype=np.uint8)
        oid = client.put(data, object_id=f"w{worker}-{i}")
        sums[oid] = digest(data)
    bad = 0
    for oid, expected in sums.items():
        if digest(client.get(oid, timeout=HANG).array) != expected:
            bad += 1
        client.delete(oid)
    out.put((worker, len(sums), bad))


# ------------------------------------------------------------------------- basic semantics


@pytest.mark.parametrize("element_type", sorted(ELEMENT_TYPES))
def test_every_clara_element_type_round_trips(store, element_type):
    dtype = ELEMENT_TYPES[element_type]
    data = (np.arange(3 * 5 * 7) % 2).astype(dtype).reshape(3, 5, 7)
    oid = store.put(data, metadata={"spacing": [1.0, 0.5, 0.5]})
    view = store.get(oid)
    assert view.dtype == element_type and view.shape == (3, 5, 7)
    np.testing.assert_array_equal(view.array, data)
    assert view.metadata == {"spacing": [1.0, 0.5, 0.5]}


def test_large_tensor_is_filled_in_place_and_viewed_without_copy(store):
    with store.create((64, 256, 256), "int16", metadata={"axes": "DHW"}) as obj:
        obj.array[...] = 7
        oid = obj.id
    first, second = store.get(oid).array, store.get(oid).array
    assert not first.flags.writeable
    assert np.shares_memory(first, second)  # both views are the shared arena itself
    assert first.base is not None and first.sum() == 7 * 64 * 256 * 256
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0, 0] = 1


def test_arrow_tables_and_bytes_round_trip_zero_copy(store):
    table = pa.table({"sop": ["1.2.3", "1.2.4"] * 40_000, "z": np.arange(80_000.0)})
    tid = store.put(table, metadata={"study": "x"})
    got = store.get(tid).to_arrow()
    assert got.equals(table)
    assert store.get(tid).metadata == {"study": "x"}
    small = store.put(b"\x00\x01tiny")
    assert bytes(store.get(small).array) == b"\x00\x01tiny"
    blob = os.urandom(200_000)
    bid = store.put(blob)
    assert store.get(bid).to_arrow().to_pybytes() == blob


def test_tensor_as_arrow_follows_the_convention(store):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    oid = store.put(data, metadata={"spacing": [3.0, 1.0, 1.0], "modality": "CT"})
    array, meta = tensor_from_arrow(store.get(oid).to_arrow())
    np.testing.assert_array_equal(array, data)
    assert meta == {"spacing": [3.0, 1.0, 1.0], "modality": "CT"}


def test_contains_list_delete(store):
    oid = store.put(np.zeros(MiB, np.uint8), object_id="volume-1")
    assert oid == "volume-1" and store.contains(oid)
    (record,) = [r for r in store.list() if r["id"] == oid]
    assert record["nbytes"] == MiB and record["sealed"] and not record["inline"]
    store.delete(oid)
    assert not store.contains(oid)
    assert store.stats()["used"] == 0
    with pytest.raises(ObjectNotFound, match="volume-1"):
        store.get(oid)


def test_an_aborted_create_frees_its_memory(store):
    with pytest.raises(RuntimeError), store.create((MiB,), "uint8", object_id="half") as obj:
        obj.array[:10] = 1
        raise RuntimeError("stage failed mid-write")
    assert not store.contains("half")
    assert store.stats()["used"] == 0


# ----------------------------------------------------------------------------- processes


def test_unrelated_process_attaches_by_address(store):
    oid = store.put(np.arange(1000, dtype=np.int64))
    code = textwrap.dedent(f"""
        from dataflow.store import connect
        c = connect({store.address!r})
        print(int(c.get({oid!r}).array.sum()))
        c.put(b"from-child", object_id="child-object")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sum(range(1000)))
    assert bytes(store.get("child-object").array) == b"from-child"


def test_store_attaches_by_socket_path(tmp_path):
    path = str(tmp_path / "store.sock")
    with Store.start(budget="8MiB", address=path) as owner:
        owner.put(np.ones(4), object_id="a")
        with connect(path) as other:
            assert other.get("a").array.sum() == 4
    assert not os.path.exists(path)  # the socket file goes with the store


def test_get_waits_until_a_spawned_producer_seals(store):
    out = SPAWN.Queue()
    consumer = SPAWN.Process(target=_get_digest, args=(store, "late", 30, out))
    producer = SPAWN.Process(target=_produce, args=(store, "late", (128, 128, 16), 3, 0.5))
    consumer.start()
    wait_for(lambda: store.stats()["waiting_gets"] == 1)
    producer.start()
    got, meta = out.get(timeout=HANG)
    producer.join(HANG)
    consumer.join(HANG)
    expected = np.random.default_rng(3).random((128, 128, 16), dtype=np.float32)
    assert got == digest(expected) and meta == {"seed": 3}
    assert producer.exitcode == 0 and consumer.exitcode == 0


def _seal_and_tell(client, count, conn):
    for i in range(count):
        # 80 KiB: above the inline threshold, and 200 of them fit the budget (no eviction)
        obj = client.create((10 * 1024,), "int64", object_id=f"o{i}")
        obj.array[:] = i
        obj.seal()  # one-way: returns before the server has read it
        conn.send(obj.id)
        obj.release()
    conn.close()


def _get_at_once(client, count, conn, out):
    seen = []
    for _ in range(count):
        oid = conn.recv()
        view = client.get(oid, timeout=0)  # must see the seal that happened before
        seen.append(client.contains(oid) and int(view.array[-1]))
        del view
        client.delete(oid)
    out.put(seen)


def test_a_seal_is_visible_to_whoever_hears_of_it_next(store):
    count = 200
    receive, send = SPAWN.Pipe(duplex=False)
    out = SPAWN.Queue()
    consumer = SPAWN.Process(target=_get_at_once, args=(store, count, receive, out))
    producer = SPAWN.Process(target=_seal_and_tell, args=(store, count, send))
    consumer.start()
    producer.start()
    assert out.get(timeout=HANG) == list(range(count))
    producer.join(HANG)
    consumer.join(HANG)


def test_client_pickles_by_address_and_survives_fork(store):
    clone = pickle.loads(pickle.dumps(store))
    assert clone.address == store.address and type(clone).__name__ == "StoreClient"
    store.put(np.full(10, 3, np.int32), object_id="shared")
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited client reconnects on first use
        try:
            value = int(store.get("shared").array.sum())
        except BaseException:
            value = -1
        os.write(write, str(value).encode())
        os._exit(0)
    os.close(write)
    assert os.read(read, 32) == b"30"
    os.waitpid(pid, 0)
    os.close(read)


# ------------------------------------------------------------- references across processes


def test_delete_never_invalidates_a_view_another_process_holds(store):
    data = np.random.default_rng(1).integers(0, 1000, 4 * MiB, dtype=np.int32)
    oid = store.put(data)
    holding, proceed, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    reader = SPAWN.Process(target=_hold_view, args=(store, oid, holding, proceed, out))
    reader.start()
    assert holding.wait(HANG)
    store.delete(oid)
    assert not store.contains(oid)
    # Take all the memory the store can give (holding views, so nothing is evicted): the
    # reader's object must not be handed out again.
    filler = []
    while True:
        try:
            filler.append(store.get(store.put(np.full(MiB, 0x55, np.uint8), timeout=0)))
        except StoreFull:
            break
    assert len(filler) >= 40
    proceed.set()
    assert out.get(timeout=HANG) == digest(data[::2])
    reader.join(HANG)
    wait_for(lambda: store.stats()["objects"] == len(filler))  # the deleted object is freed


def _make_and_hand_over(client, owner_id, done):
    for oid, size in (("big", 4 * MiB), ("small", 100)):
        with client.create((size,), "uint8", object_id=oid) as obj:
            obj.array[:] = 9
            obj.seal(transfer_to=owner_id)
    done.set()
    time.sleep(600)  # killed: the references it handed over must survive it


def test_a_sealed_object_can_be_handed_to_an_orchestrator_that_unpins_it(store):
    done = SPAWN.Event()
    worker = SPAWN.Process(target=_make_and_hand_over, args=(store, store.client_id, done))
    worker.start()
    assert done.wait(HANG)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(HANG)
    wait_for(lambda: store.stats()["clients"] == 1)
    assert store.stats()["references"] == 2  # both held by us, none by the dead worker
    for i in range(80):  # memory pressure evicts nothing we hold
        store.put(np.zeros(MiB, np.uint8), object_id=f"filler-{i}")
    assert store.get("big").array.max() == 9 and store.get("small").array.max() == 9
    store.unpin(["big", "small"])
    assert store.stats()["references"] == 0
    store.put(np.zeros(60 * MiB, np.uint8))  # now they may be evicted
    assert not store.contains("big")


def test_eviction_is_lru_and_spares_referenced_objects(store):
    hold = store.get(store.put(np.zeros(16 * MiB, np.uint8), object_id="pinned"))
    for name in ("a", "b", "c"):
        store.put(np.zeros(16 * MiB, np.uint8), object_id=name)  # the store is now full
    store.get("a")  # a view, dropped at once: "a" is now the most recently used
    store.put(np.zeros(16 * MiB, np.uint8), object_id="d")  # evicts the LRU object: "b"
    assert [store.contains(n) for n in ("pinned", "a", "b", "c", "d")] == [
        True, True, False, True, True,
    ]  # fmt: skip
    store.put(np.zeros(40 * MiB, np.uint8), object_id="e")  # evicts all but "pinned"
    assert [r["id"] for r in store.list()] == ["pinned", "e"]
    assert store.stats()["evicted_total"] == 4
    assert hold.array.shape == (16 * MiB,)


def test_create_applies_backpressure_then_names_the_holders(store):
    holding, proceed, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    big = store.put(np.zeros(40 * MiB, np.uint8), object_id="big-volume")
    reader = SPAWN.Process(target=_hold_view, args=(store, big, holding, proceed, out))
    reader.start()
    assert holding.wait(HANG)
    store.delete(big)  # deleted, but the reader still holds it
    t0 = time.monotonic()
    with pytest.raises(StoreFull) as info:
        store.create((30 * MiB,), "uint8", timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    message = str(info.value)
    assert "64.0 MiB" in message and "40.0 MiB" in message  # the budget, the holder's size
    assert "'big-volume'" in message and "_hold_view" not in message
    assert f"pid {reader.pid}" in message
    # With a timeout, create waits for the reader to let go, then succeeds.
    proceed.set()
    obj = store.create((30 * MiB,), "uint8", timeout=HANG)
    obj.seal()
    reader.join(HANG)
    assert store.contains(obj.id)


def test_object_larger_than_the_budget_fails_at_once(store):
    with pytest.raises(StoreFull, match="can never fit.*64.0 MiB"):
        store.create((65 * MiB,), "uint8", timeout=HANG)


# ----------------------------------------------------------------------------- crashes


def test_sigkilled_client_has_its_references_reclaimed(store):
    oids = [store.put(np.zeros(2 * MiB, np.uint8)) for _ in range(3)]
    holding = SPAWN.Event()
    victim = SPAWN.Process(target=_hold_and_hang, args=(store, oids, "unsealed", holding))
    victim.start()
    assert holding.wait(HANG)
    stats = store.stats()
    assert stats["references"] == 4 and stats["unsealed"] == 1
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(HANG)
    wait_for(lambda: store.stats()["references"] == 0)
    stats = store.stats()
    assert stats["unsealed"] == 0 and stats["clients_lost_total"] == 1
    assert stats["refs_reclaimed_total"] == 4
    assert not any(r["id"] == "unsealed" for r in store.list())
    for oid in oids:  # the objects themselves are untouched
        assert store.get(oid).array.max() == 0


def _hold_then_wait_in_create(client, oid, started):
    held = client.get(oid)  # this client's own reference keeps the store full
    started.set()
    client.create((30 * MiB,), "uint8", object_id="never", timeout=None)
    del held


def test_a_client_killed_while_waiting_leaves_nothing_behind(store):
    big = store.put(np.zeros(40 * MiB, np.uint8))
    started = SPAWN.Event()
    victim = SPAWN.Process(target=_hold_then_wait_in_create, args=(store, big, started))
    victim.start()
    assert started.wait(HANG)
    wait_for(lambda: store.stats()["waiting_creates"] == 1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(HANG)
    # Releasing the victim's reference makes room for its own waiting create, which must
    # not be placed for a dead client.
    wait_for(lambda: store.stats()["clients"] == 1)
    stats = store.stats()
    assert stats["references"] == 0 and stats["unsealed"] == 0 and stats["waiting_creates"] == 0
    assert not any(r["id"] == "never" for r in store.list())
    with store.create((30 * MiB,), "uint8", object_id="never") as obj:
        obj.array[:] = 1
    assert store.get("never").array.sum() == 30 * MiB


def _owner(address_out, path):
    store = Store.start(budget="8MiB", address=path)
    store.put(np.arange(10), object_id="x")
    address_out.put((store.address, store.pid))
    time.sleep(600)


@pytest.mark.parametrize("use_path", [False, True], ids=["abstract", "socket-file"])
def test_store_dies_with_its_owner_and_restarts_cleanly(tmp_path, use_path):
    shm_before = shm_files()
    path = str(tmp_path / "s.sock") if use_path else None
    out = SPAWN.Queue()
    owner = SPAWN.Process(target=_owner, args=(out, path))
    owner.start()
    address, server_pid = out.get(timeout=HANG)
    client = connect(address)
    kept = client.get("x").array  # a reader's view outlives even the store
    os.kill(owner.pid, signal.SIGKILL)
    owner.join(HANG)
    wait_for(lambda: not _alive(server_pid))
    with pytest.raises(StoreNotRunning):
        client.stats()
    with pytest.raises(StoreNotRunning):
        connect(address)
    assert kept.sum() == 45
    assert shm_files() == shm_before
    # The arena's memory goes back to the system once the last reader lets go of it.
    assert arena_mappings(address)
    del kept
    client.close()
    del client
    gc.collect()
    assert arena_mappings(address) == []
    # Starting again where the crashed store was (a stale socket file, for paths) works.
    with Store.start(budget="8MiB", address=path) as again:
        assert not again.contains("x")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_stopped_store_leaves_no_process_and_no_shm(tmp_path):
    shm_before = shm_files()
    store = Store.start(budget="8MiB")
    store.put(np.zeros(MiB))
    server = store.pid
    store.stop()
    assert not _alive(server)
    assert shm_files() == shm_before
    with pytest.raises(StoreNotRunning, match="closed"):
        store.put(b"x")
    address = store.address
    del store
    gc.collect()
    assert arena_mappings(address) == []


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_concurrent_processes_keep_every_object_intact():
    with Store.start(budget="32MiB") as store:
        out = SPAWN.Queue()
        workers = [SPAWN.Process(target=_churn, args=(store, w, 60, out)) for w in range(4)]
        for w in workers:
            w.start()
        results = sorted(out.get(timeout=HANG) for _ in workers)
        for w in workers:
            w.join(HANG)
        assert results == [(w, 60, 0) for w in range(4)]
        wait_for(lambda: store.stats()["objects"] == 0)
        assert store.stats()["used"] == 0


# ---------------------------------------------------------------------------------- misuse


def test_misuse_gets_clear_errors(store):
    with pytest.raises(ObjectNotFound, match="'nope' is not in the store \\(waited 0.2 s\\)"):
        store.get("nope", timeout=0.2)
    unsealed = store.create((MiB,), "uint8", object_id="big")
    with pytest.raises(ObjectNotFound, match="'big' exists but was not sealed within 0.1 s"):
        connect(store.address).get("big", timeout=0.1)
    unsealed.abort()
    obj = store.create((4, 4), "float32", object_id="t")
    with pytest.raises(StoreValueError, match=r"cannot write \(3, 3\) into object 't' of shape"):
        obj[...] = np.ones((3, 3))
    obj.seal()
    with pytest.raises(ObjectSealed, match="already sealed"):
        obj.seal()
    with pytest.raises(ObjectSealed, match="can no longer be written"):
        obj[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        obj.array[0, 0] = 1.0
    with pytest.raises(ObjectExists, match="'t' already exists"):
        store.put(np.zeros(3), object_id="t")
    raw = store.create_buffer(100_000, object_id="raw")
    with pytest.raises(StoreValueError, match="is 100000 bytes; cannot write 100001"):
        raw.write(b"x" * 100_001)
    raw.abort()
    with pytest.raises(StoreValueError, match="unsupported element type 'complex64'"):
        store.create((2,), "complex64")
    with pytest.raises(StoreValueError, match="concrete"):
        store.create((-1, 3), "uint8")
    with pytest.raises(StoreValueError, match="JSON-compatible"):
        store.put(np.zeros(2), metadata={"bad": {1, 2}})
    with pytest.raises(StoreValueError, match="object ID"):
        store.put(np.zeros(2), object_id="")
    with pytest.raises(StoreValueError, match="put takes"):
        store.put([1, 2, 3])
    with pytest.raises(ObjectNotFound, match="cannot delete object 'ghost'"):
        store.delete("ghost")


def test_no_store_running_is_a_clear_error(tmp_path):
    with pytest.raises(StoreNotRunning, match="no store is running at 'dataflow-nothing-here'"):
        connect("dataflow-nothing-here")
    with pytest.raises(StoreNotRunning, match="no store is running"):
        connect(str(tmp_path / "missing.sock"))


def test_a_second_store_on_a_live_socket_path_is_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    with (
        Store.start(budget="8MiB", address=path),
        pytest.raises(StoreError, match="already running"),
    ):
        Store.start(budget="8MiB", address=path)
