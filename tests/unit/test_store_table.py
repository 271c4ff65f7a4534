"""The store's object table (its sans-IO core) driven event by event: no sockets, no clock.

The arena's bookkeeping is the real first-fit ``Allocator`` (it is pure bookkeeping, so no
fake is needed) and the arena's file descriptor is a plain string handed back with ``hello``.
Every event is followed by ``ObjectTable.validate()``.
"""

import random

import pytest

from dataflow.store.table import DEVICE_KIND, ObjectTable

KIB = 1024


class Harness:
    """Drives an ObjectTable as the store server does, with a clock of its own."""

    def __init__(self, budget=16 * KIB, inline_threshold=256, clients=()):
        self.table = ObjectTable(budget, inline_threshold, arena="arena-fd", server_pid=1)
        self.now = 0.0
        self.clients = {}
        self.replies = []  # every (client name, message, fds) sent so far
        self.settled = []  # the requests the table wanted one-way requests applied before
        for name in clients:
            self.connect(name)

    def record(self, replies):
        self.table.validate()
        sent = [(client.handle, message, fds) for client, message, fds in replies]
        self.replies += sent
        return [(name, message) for name, message, _ in sent]

    def connect(self, name, pid=None):
        client = self.table.connect(pid or 100 + len(self.clients), handle=name)
        self.clients[name] = client
        self.record([])
        (reply,) = self.do(name, "hello", client.pid, name)
        return reply[1][1]  # the info sent with hello

    def do(self, name, *request):
        client = self.clients[name]
        replies = self.table.handle(client, request, self.now)
        if replies is None:  # settle first: there are no socket buffers here to read
            self.settled.append(request)
            replies = self.table.handle(client, request, self.now, settled=True)
        return self.record(replies)

    def call(self, name, *request):
        """A request that answers at once: its reply to ``name``."""
        replies = self.do(name, *request)
        assert replies and replies[0][0] == name, f"{request} got {replies}"
        return replies[0][1]

    def tick(self, seconds):
        self.now += seconds
        return self.record(self.table.tick(self.now))

    def disconnect(self, name):
        return self.record(self.table.disconnect(self.clients[name]))

    def create(self, name, oid, nbytes, timeout=0.0):
        return self.do(name, "create", oid, "bytes", nbytes, None, None, "{}", timeout)

    def put(self, name, oid, data=b"x" * 10, transfer_to=None, kind="bytes", timeout=0.0):
        return self.do(
            name, "put_inline", oid, kind, len(data), None, None, "{}", data, timeout, transfer_to
        )

    def made(self, name, oid, nbytes=4 * KIB):
        """``oid`` created and sealed by ``name``, which still holds its reference."""
        [(who, (status, _offset))] = self.create(name, oid, nbytes)
        assert (who, status) == (name, "ok")
        assert self.do(name, "seal", oid) == []  # one-way: no reply

    def refs(self, oid):
        return self.table.objects[oid].refs

    def stats(self):
        live = next(name for name, client in self.clients.items() if not client.closed)
        return self.call(live, "stats")[1]


def error(reply):
    """``(class name, message)`` of an error reply."""
    assert reply[0] == "err", reply
    return reply[1], reply[2]


@pytest.fixture
def h():
    return Harness(clients=("producer", "consumer"))


def test_hello_passes_the_arena_handle_and_the_client_id():
    h = Harness()
    h.connect("a")
    info = h.connect("b")
    assert info == {
        "budget": 16 * KIB,
        "arena_size": 16 * KIB,
        "inline_threshold": 256,
        "server_pid": 1,
        "client_id": 2,
    }
    assert h.replies[-1][2] == ("arena-fd",)


def test_create_seal_get_release(h):
    assert h.create("producer", "vol", 5000) == [("producer", ("ok", 0))]
    assert h.refs("vol") == 1
    assert h.do("producer", "seal", "vol") == []
    assert h.call("consumer", "get", "vol", 0) == (
        "ok",
        ("bytes", 0, 5000, None, None, "{}", None),
    )
    assert h.refs("vol") == 2  # the creator's and the consumer's
    assert h.do("producer", "release", "vol") == []
    assert h.do("consumer", "release", "vol") == []
    assert list(h.table.evictable) == ["vol"]  # kept until room is needed
    assert h.stats()["used"] == 5056  # aligned to 64 bytes
    # The next object goes after the first: 5000 bytes round up to 5056.
    assert h.create("producer", "next", 10) == [("producer", ("ok", 5056))]


def test_a_waiting_get_is_answered_by_the_seal(h):
    h.create("producer", "vol", 4 * KIB)
    assert h.do("consumer", "get", "vol", 30.0) == []  # waits
    assert h.stats()["waiting_gets"] == 1
    replies = h.do("producer", "seal", "vol")
    assert replies == [("consumer", ("ok", ("bytes", 0, 4096, None, None, "{}", None)))]
    assert h.refs("vol") == 2
    assert h.tick(60) == []  # the answered get's deadline passes unnoticed


def test_a_get_that_waits_for_an_object_not_yet_created_gets_it_when_sealed(h):
    assert h.do("consumer", "get", "later", None) == []  # no timeout: waits for ever
    assert h.table.next_deadline() is None
    h.create("producer", "later", 100)
    assert h.do("producer", "seal", "later")[0][0] == "consumer"


def test_a_get_times_out_on_tick_naming_what_it_waited_for(h):
    assert h.do("consumer", "get", "vol", 5.0) == []
    assert h.table.next_deadline() == 5.0
    assert h.tick(4.9) == []
    [(who, reply)] = h.tick(0.1)
    assert who == "consumer"
    assert error(reply) == ("ObjectNotFound", "object 'vol' is not in the store (waited 5 s)")
    assert h.stats()["waiting_gets"] == 0


def test_a_get_of_an_unsealed_object_names_its_creator_when_it_times_out(h):
    h.create("producer", "vol", 100)
    h.do("consumer", "get", "vol", 2.5)
    [(_, reply)] = h.tick(3)
    assert error(reply) == (
        "ObjectNotFound",
        "object 'vol' exists but was not sealed within 2.5 s (its creator is producer (pid 100))",
    )
    assert error(h.call("consumer", "get", "vol", 0))[1] == (
        "object 'vol' exists but was not sealed within 0 s (its creator is producer (pid 100))"
    )


def test_a_get_without_waiting_answers_at_once(h):
    assert error(h.call("consumer", "get", "nothing", 0)) == (
        "ObjectNotFound",
        "object 'nothing' is not in the store",
    )


def test_a_lookup_of_an_object_not_sealed_asks_for_one_way_requests_first(h):
    t, producer = h.table, h.clients["producer"]
    assert t.handle(producer, ("get", "vol", 0), 0.0) is None
    assert t.handle(producer, ("contains", "vol"), 0.0) is None
    h.create("producer", "vol", 100)
    assert t.handle(producer, ("get", "vol", 0), 0.0) is None  # created, not sealed
    h.do("producer", "seal", "vol")
    assert t.handle(producer, ("contains", "vol"), 0.0) == [(producer, ("ok", True), ())]
    assert t.handle(producer, ("release", "other"), 0.0) == []
    assert t.handle(producer, ("stats",), 0.0) is not None


def test_a_create_waits_for_room_and_eviction_makes_it():
    h = Harness(8 * KIB, clients=("a", "b", "c"))
    h.made("a", "one")
    h.made("b", "two")
    assert h.create("c", "three", 4 * KIB, timeout=10.0) == []  # the store is full
    assert h.stats()["waiting_creates"] == 1
    assert h.do("b", "release", "two") == [("c", ("ok", 4096))]  # "two" is evicted for it
    assert set(h.table.objects) == {"one", "three"}
    assert h.stats()["evicted_total"] == 1
    assert h.tick(20) == []


def test_eviction_takes_the_least_recently_used_first():
    h = Harness(12 * KIB, clients=("p",))
    for oid in ("old", "mid", "new"):
        h.made("p", oid)
        h.do("p", "release", oid)
    h.call("p", "get", "old", 0)  # used again: now the most recent once released
    h.do("p", "release", "old")
    assert list(h.table.evictable) == ["mid", "new", "old"]
    h.create("p", "big", 8 * KIB)
    assert set(h.table.objects) == {"old", "big"}


def test_creates_that_wait_are_placed_in_arrival_order():
    h = Harness(8 * KIB, clients=("a", "b", "c"))
    h.made("a", "one")
    h.made("a", "two")
    assert h.create("b", "big", 8 * KIB, timeout=10.0) == []
    assert h.create("c", "small", 64, timeout=10.0) == []  # would fit, but waits its turn
    assert h.do("a", "release", "one") == []  # 4 KiB is not enough for "big"
    replies = h.do("a", "release", "two")
    assert replies == [("b", ("ok", 0))]  # "big" takes it all; "small" still waits
    [(who, reply)] = h.tick(10)
    assert who == "c" and error(reply)[0] == "StoreFull"


def test_a_create_waits_for_a_free_block_not_only_for_free_bytes():
    h = Harness(12 * KIB, clients=("p", "q"))
    for oid in ("left", "middle", "right"):
        h.made("p", oid)
    h.do("p", "release", "left")
    h.do("p", "release", "right")
    # Evicting both frees 8 KiB, but in two blocks on either side of "middle".
    assert h.create("q", "big", 8 * KIB, timeout=1.0) == []
    assert set(h.table.objects) == {"middle"}
    assert h.stats()["largest_free_block"] == 4 * KIB
    assert h.do("p", "release", "middle") == [("q", ("ok", 0))]


def test_a_create_that_cannot_get_room_says_who_holds_the_store():
    h = Harness(budget=8 * KIB)
    h.connect("reader", pid=7)
    h.connect("writer", pid=8)
    h.made("reader", "held")
    h.create("writer", "unsealed", 4 * KIB)
    assert h.create("writer", "more", 100, timeout=2.0) == []
    [(who, reply)] = h.tick(2)
    assert who == "writer"
    assert error(reply) == (
        "StoreFull",
        "store is full: could not make room for object 'more' of 100 B within 2 s. "
        "Budget 8.0 KiB, 8.0 KiB in use by 2 objects, none of them evictable "
        "(largest free block 0 B). Largest holders: 'held' 4.0 KiB sealed, held by reader "
        "(pid 7); 'unsealed' 4.0 KiB unsealed, held by writer (pid 8)",
    )
    assert h.stats()["waiting_creates"] == 0


def test_an_object_larger_than_the_store_is_refused_at_once(h):
    assert error(h.create("producer", "huge", 17 * KIB, timeout=None)[0][1]) == (
        "StoreFull",
        "object 'huge' of 17.0 KiB can never fit: the store budget is 16.0 KiB",
    )


def test_a_dead_clients_references_are_reclaimed_and_its_unsealed_objects_aborted(h):
    h.made("producer", "sealed")
    h.create("producer", "half-written", 4 * KIB)
    h.call("consumer", "get", "sealed", 0)
    assert h.disconnect("producer") == []
    assert "half-written" not in h.table.objects  # aborted: its memory is free
    assert h.refs("sealed") == 1  # the consumer's view stays valid
    stats = h.stats()
    assert (stats["clients_lost_total"], stats["unsealed_reclaimed_total"]) == (1, 1)
    assert stats["refs_reclaimed_total"] == 2
    assert stats["clients"] == 1
    h.disconnect("consumer")
    assert list(h.table.evictable) == ["sealed"]


def test_a_dead_clients_waiting_requests_are_dropped():
    h = Harness(8 * KIB, clients=("a", "b", "c"))
    h.made("a", "full", 8 * KIB)
    h.create("b", "later", 4 * KIB, timeout=10.0)
    h.do("b", "get", "x", 5.0)
    h.disconnect("b")
    assert h.do("c", "get", "x", 30.0) == []  # another client now waits for the same object
    assert h.tick(5) == []  # the dead client's deadline passes: no reply, no error
    assert h.do("a", "release", "full") == []  # nothing is created for the dead client
    assert "later" not in h.table.objects
    h.create("a", "x", 10)
    assert h.do("a", "seal", "x")[0][0] == "c"


def test_a_transfer_to_a_client_that_has_gone_leaves_the_object_unreferenced():
    h = Harness(clients=("p", "orchestrator"))
    orchestrator = h.clients["orchestrator"].cid
    h.create("p", "a", 100)
    h.do("p", "seal", "a", orchestrator)
    assert h.table.clients[orchestrator].refs == {"a": 1}
    assert "a" not in h.clients["p"].refs
    h.disconnect("orchestrator")
    h.create("p", "b", 100)
    h.do("p", "seal", "b", orchestrator, '{"new": 1}')
    assert list(h.table.evictable) == ["a", "b"]
    assert h.table.objects["b"].metadata == '{"new": 1}'


def test_a_seal_for_a_client_that_has_gone_serves_waiting_gets_before_waiting_creates():
    h = Harness(8 * KIB, clients=("p", "orchestrator", "getter", "creator"))
    gone = h.clients["orchestrator"].cid
    h.disconnect("orchestrator")
    h.made("p", "held")
    h.create("p", "x", 4 * KIB)
    assert h.create("creator", "y", 4 * KIB, timeout=10.0) == []  # no room
    assert h.do("getter", "get", "x", 10.0) == []
    replies = h.do("p", "seal", "x", gone)  # the orchestrator's reference has nobody to go to
    assert [who for who, _ in replies] == ["getter"]  # "x" is not evicted for "y"
    assert h.refs("x") == 1 and "y" not in h.table.objects
    assert h.do("getter", "release", "x") == [("creator", ("ok", 4096))]  # now it may go


def test_an_unsealed_object_released_by_its_creator_is_freed_and_forgotten(h):
    h.create("producer", "x", 100)
    assert h.do("producer", "release", "x") == []  # a WritableObject dropped without a seal
    assert "x" not in h.table.objects
    h.create("consumer", "x", 100)  # the ID is free again; another client creates it
    h.disconnect("producer")  # the first creator's end leaves the new object alone
    assert h.do("consumer", "seal", "x") == []
    assert h.table.objects["x"].sealed


def test_delete_of_a_referenced_object_frees_it_when_the_last_reference_goes(h):
    h.made("producer", "vol")
    h.call("consumer", "get", "vol", 0)
    h.do("producer", "release", "vol")
    assert h.call("producer", "delete", "vol") == ("ok", None)
    assert h.call("producer", "contains", "vol") == ("ok", False)
    assert h.call("producer", "present", ["vol", "other"]) == ("ok", ["vol"])  # still mapped
    assert error(h.call("producer", "delete", "vol")) == (
        "ObjectNotFound",
        "cannot delete object 'vol': not in the store",
    )
    assert h.do("consumer", "release", "vol") == []
    assert h.call("producer", "present", ["vol"]) == ("ok", [])
    assert h.stats()["deleted_total"] == 1


def test_an_unsealed_object_cannot_be_deleted_and_only_its_creator_aborts_it(h):
    h.create("producer", "vol", 100)
    assert error(h.call("consumer", "delete", "vol")) == (
        "StoreError",
        "cannot delete object 'vol': it is not sealed yet (its creator producer (pid 100) "
        "may abort it)",
    )
    assert error(h.call("consumer", "abort", "vol")) == (
        "StoreError",
        "cannot abort object 'vol': it was created by another client",
    )
    assert h.call("producer", "abort", "vol") == ("ok", None)
    assert h.table.objects == {} and h.stats()["used"] == 0


def test_a_second_release_of_one_reference_changes_nothing(h):
    h.made("producer", "vol")
    h.call("consumer", "get", "vol", 0)
    h.do("consumer", "release", "vol")
    assert h.do("consumer", "release", "vol") == []  # one-way: no error sent, none raised
    assert h.refs("vol") == 1  # the producer's reference is intact


def test_misuse_of_one_way_requests_gets_no_reply_and_changes_nothing(h):
    assert h.do("consumer", "seal", "missing") == []
    assert h.do("consumer", "release", "missing") == []
    h.made("producer", "vol")
    assert h.do("producer", "seal", "vol") == []  # already sealed
    assert h.refs("vol") == 1


def test_errors_for_bad_requests(h):
    assert error(h.call("producer", "frobnicate")) == (
        "StoreError",
        "unknown store operation 'frobnicate'",
    )
    assert error(h.create("producer", "", 10)[0][1])[0] == "StoreValueError"
    assert error(h.create("producer", "a", -1)[0][1]) == (
        "StoreValueError",
        "object size must be a non-negative int; got -1",
    )
    h.made("producer", "a")
    assert error(h.create("consumer", "a", 10)[0][1]) == (
        "ObjectExists",
        "object 'a' already exists in the store",
    )
    assert error(h.put("producer", "b", b"x" * 300)[0][1]) == (
        "StoreValueError",
        "inline object 'b': 300 bytes, expected 300",
    )


def test_a_create_that_waited_finds_its_id_taken():
    h = Harness(8 * KIB, clients=("a", "b", "c"))
    h.made("a", "full", 8 * KIB)
    h.create("b", "x", 4 * KIB, timeout=10.0)
    h.create("c", "x", 4 * KIB, timeout=10.0)  # the same ID, also waiting
    replies = h.do("a", "release", "full")
    assert replies[0] == ("b", ("ok", 0))
    assert replies[1][0] == "c"
    assert error(replies[1][1]) == ("ObjectExists", "object 'x' already exists")


def test_inline_objects_are_copied_out_without_references(h):
    assert h.put("producer", "small", b"hello") == [("producer", ("ok", None))]
    record = h.call("consumer", "get", "small", 0)[1]
    assert record[6] == b"hello" and record[1] is None
    assert h.refs("small") == 0 and list(h.table.evictable) == ["small"]
    assert h.stats()["inline_bytes"] == 5


def test_an_inline_object_can_be_put_for_an_orchestrator_and_answers_waiting_gets(h):
    h.do("consumer", "get", "small", 10.0)
    orchestrator = h.clients["consumer"].cid
    replies = h.put("producer", "small", b"hello", transfer_to=orchestrator)
    assert [who for who, _ in replies] == ["consumer", "producer"]
    assert h.clients["consumer"].refs == {"small": 1}  # the orchestrator's; none for the copy
    assert h.refs("small") == 1 and not h.table.evictable


def test_gpu_objects_die_with_their_producer_once_unreferenced(h):
    h.put("producer", "gpu", b"descriptor", kind=DEVICE_KIND)
    assert not h.table.evictable  # their own device pool evicts them
    h.call("consumer", "get", "gpu", 0)
    assert h.refs("gpu") == 1  # readers of device memory hold references
    h.disconnect("producer")
    assert h.table.objects["gpu"].deleted  # its memory is gone with the producer...
    assert h.call("consumer", "contains", "gpu") == ("ok", False)
    h.do("consumer", "release", "gpu")
    assert "gpu" not in h.table.objects  # ...and the record with the last reader


def test_evict_unused_only_evicts_what_nobody_holds(h):
    h.put("producer", "gpu", b"descriptor", kind=DEVICE_KIND)
    h.call("consumer", "get", "gpu", 0)
    assert h.call("producer", "evict_unused", "gpu") == ("ok", False)
    h.do("consumer", "release", "gpu")
    assert h.call("producer", "evict_unused", "gpu") == ("ok", True)
    assert h.call("producer", "evict_unused", "gpu") == ("ok", True)  # already gone
    assert h.stats()["evicted_total"] == 1


def test_list_and_shutdown(h):
    h.made("producer", "vol", 100)
    [entry] = h.call("consumer", "list")[1]
    assert entry == {
        "id": "vol",
        "kind": "bytes",
        "nbytes": 100,
        "dtype": None,
        "shape": None,
        "sealed": True,
        "deleted": False,
        "refs": 1,
        "inline": False,
    }
    assert not h.table.shutdown
    assert h.call("consumer", "shutdown") == ("ok", None)
    assert h.table.shutdown


def test_a_closed_client_is_not_served(h):
    client = h.clients["consumer"]
    h.disconnect("consumer")
    h.made("producer", "vol")
    assert h.table.handle(client, ("get", "vol", 0), h.now) == []
    assert h.refs("vol") == 1
    assert h.table.disconnect(client) == []  # twice is harmless


def test_validate_tells_the_story_of_a_broken_count(h):
    h.made("producer", "vol", 100)
    h.table.objects["vol"].refs += 1  # a bug that lost a release
    with pytest.raises(AssertionError, match=r"object 'vol' .*refs 2.* clients hold 1"):
        h.table.validate()


def test_validate_finds_an_evictable_object_someone_holds(h):
    h.made("producer", "vol", 100)
    h.table.evictable["vol"] = None
    with pytest.raises(AssertionError, match=r"evictable \['vol'\]"):
        h.table.validate()


def test_validate_finds_bytes_the_allocator_lost(h):
    h.made("producer", "vol", 100)
    h.table.alloc.allocate(64)  # a block no object owns
    with pytest.raises(AssertionError, match="footprints sum to 128 bytes"):
        h.table.validate()


@pytest.mark.parametrize("seed", range(5))
def test_any_sequence_of_requests_keeps_the_invariants(seed):
    """A seeded random walk over every request, deaths and timeouts included."""
    rng = random.Random(seed)
    h = Harness(8 * KIB, inline_threshold=64, clients=("a", "b", "c"))
    oids = [f"o{i}" for i in range(8)]
    for step in range(1500):
        name = rng.choice(list(h.clients))
        oid = rng.choice(oids)
        timeout = rng.choice([0, 0.5, 3.0, None])
        roll = rng.random()
        if roll < 0.2:
            h.create(name, oid, rng.choice([10, 1000, 3000, 5000]), timeout)
        elif roll < 0.3:
            h.put(name, oid, b"x" * rng.randrange(65), kind=rng.choice(["bytes", DEVICE_KIND]))
        elif roll < 0.45:
            target = rng.choice([None, None, 1, 2, 3, 99])
            h.do(name, "seal", oid, target)
        elif roll < 0.6:
            h.do(name, "get", oid, timeout)
        elif roll < 0.75:
            h.do(name, "release", oid)
        elif roll < 0.8:
            h.do(name, "abort", oid)
        elif roll < 0.85:
            h.do(name, "delete", oid)
        elif roll < 0.88:
            h.do(name, "evict_unused", oid)
        elif roll < 0.95:
            h.tick(rng.choice([0.1, 1.0, 5.0]))
        else:
            h.disconnect(name)
            h.connect(f"{name[0]}{step}")  # a new process takes its place
            del h.clients[name]
    h.tick(10)
    for name in list(h.clients):
        h.disconnect(name)
    t = h.table
    assert not t.clients and not t.get_waiters and not any(not w.done for w in t.create_waiters)
    assert all(o.sealed and o.refs == 0 for o in t.objects.values())


def test_discard_deletes_and_drops_the_reference_handed_over_one_way(h):
    [(_, (status, _offset))] = h.create("producer", "result", 4 * KIB)
    assert status == "ok"
    assert h.do("producer", "seal", "result", h.clients["consumer"].cid, None) == []
    assert h.refs("result") == 1  # the consumer's, taken over from the producer
    held = h.call("producer", "get", "result", 0)  # a reader still holding it
    assert held[0] == "ok"
    assert h.do("consumer", "discard", "result") == []  # one-way: no reply
    assert h.call("producer", "contains", "result") == ("ok", False)  # deleted at once...
    assert h.call("producer", "present", ["result"]) == ("ok", ["result"])  # ...freed later
    assert h.do("producer", "release", "result") == []
    assert h.call("producer", "present", ["result"]) == ("ok", [])
    # an object already gone, or never there: nothing happens, nothing is answered
    assert h.do("consumer", "discard", "result") == []
    assert h.do("consumer", "discard", "never-there") == []
    assert h.stats()["deleted_total"] == 1
