"""Benchmark of the shared-memory object store (``dataflow.store``) against its peers.

Run from the repository root::

    .venv/bin/python benchmarks/store.py --quick --json /tmp/store.json   # about two minutes
    .venv/bin/python benchmarks/store.py --json benchmarks/results/store-DATE.json

Everything runs side by side in one process tree (``spawn`` start method). Measured:

* **Cross-process handoff latency** for 4 KiB, 1 MiB, 64 MiB, 256 MiB and 1 GiB: a producer
  process makes an array available and a consumer process ends up holding a NumPy array of it
  and has read one element. Systems:

  - ``ours``: the producer ``create``\\s the object, fills it in place, ``seal``\\s and releases
    it and sends the object ID over a ``multiprocessing`` Pipe; the consumer ``get``\\s it and
    reads ``view.array[0]``, then drops the view. The producer deletes the object afterwards,
    untimed, so the next one reuses the same arena memory.
  - ``shm-pipe`` (the floor): ``SharedMemory(create=True)`` + NumPy view in the producer, the
    segment name over the same kind of Pipe, ``SharedMemory(name=...)`` + NumPy view in the
    consumer. Closed and unlinked afterwards, untimed.
  - ``pickle-queue``: the ready array through a ``multiprocessing.Queue`` (pickled).
  - ``ray`` (when ``import ray`` works): a producer actor ``ray.put``\\s the ready array and
    passes the ObjectRef to a consumer actor's method (Ray's own notification channel); the
    consumer ``ray.get``\\s it (zero-copy, read-only NumPy) and reads one element.

  Filling the data is the producer's own work and is never timed: for ``ours`` and the floor
  the latency is ``(t_created - t_start) + (t_read - t_filled)``, i.e. the create step plus
  everything from the end of the fill until the consumer has read the element; for pickle and
  Ray (which cannot create in place) the array is filled before ``t_start``. Timestamps come
  from ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on the machine),
  taken in the producer and in the consumer: a one-way latency, not half a round trip.

  The producer/consumer pairs of all systems stay alive for the whole run and take turns in
  blocks (one warm-up iteration, then timed ones) for each size, round after round, so that
  the systems are compared under the same machine conditions. We report p50, p99 (about the
  maximum when there are few samples), min and mean over all rounds. A control run
  (``handoff-<size>-1page``, ours and the floor) writes one page instead of filling the
  array: the transport alone, without the fill's side effects (cold caches, idle CPUs).

* **Small objects**: create + seal + get + release per second for 1 KiB objects with one
  client (and with a delete, and 1 MiB objects through the arena, for context), next to
  Ray's ``ray.put`` + ``ray.get`` + ``del ref``.

* **Context**: the one-way latency of the notification channels alone (Pipe; Ray actor call),
  and the round trip of one store request next to a bare Python Unix-socket echo with the same
  framing (the least any store request can cost).

* **Goals**, derived from the above and emitted as records of unit ``ratio``.

``--json PATH`` writes the records (a list of dicts with ``case``, ``system``, ``value`` and
``unit`` and extra fields) and the run's provenance next to it, as ``PATH`` with the suffix
``.provenance.json`` for ``.json``. The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

# benchmarks/ is not a package; its folder goes last on sys.path, as `python FILE` puts it
# first: there, benchmarks/ray.py would be what `import ray` finds
HERE = Path(__file__).resolve().parent
sys.path[:] = [*(p for p in sys.path if Path(p or ".").resolve() != HERE), str(HERE)]

import _common as common  # noqa: E402 (after sys.path is set)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = (4 * KiB, 1 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
#: Timed handoffs per size and system over the whole run, and the rounds they are spread over.
REPS = {4 * KiB: 300, 1 * MiB: 200, 64 * MiB: 40, 256 * MiB: 20, 1 * GiB: 10}
REPS_QUICK = {4 * KiB: 60, 1 * MiB: 40, 64 * MiB: 8, 256 * MiB: 6, 1 * GiB: 4}
ROUNDS, ROUNDS_QUICK = 5, 2
WARMUP = 1  # untimed iterations at the start of each block
RAY_WARMUP = 2  # Ray's first puts of 1 GiB are slow even into a pre-populated store
NOTIFY_REPS = 40  # per round
STORE_BUDGET = 3 * GiB
RAY_OBJECT_STORE = 3 * GiB
RAY_PREALLOCATE = "RAY_preallocate_plasma_memory"  # Ray's own spelling of its config variable
SMALL_SECONDS, SMALL_SECONDS_QUICK = 1.0, 0.4  # per round
PAGE = 4096

now = time.monotonic_ns  # CLOCK_MONOTONIC: comparable between processes on Linux


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


# --------------------------------------------------------------------------- handoff: systems
#
# A producer makes one array available per iteration (``handoff``, which returns t_start,
# t_created and t_filled) and cleans up after the consumer has answered (``cleanup``); a
# consumer waits for one array, reads one element and returns (t_read, element).


class Producer:
    def __init__(self, address: str | None, queue) -> None:
        pass

    def prepare(self, nbytes: int) -> None:
        """Before a block of handoffs of ``nbytes``."""

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def cleanup(self) -> None:
        """After each handoff, once the consumer has answered."""

    def finish(self) -> None:
        """After a block."""

    def stop(self, notify) -> None:
        notify.send(None)


class OursProducer(Producer):
    def __init__(self, address: str, queue) -> None:
        from dataflow.store import connect

        self.client = connect(address, name="bench-producer")
        self.oid: str | None = None

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        t_start = now()
        obj = self.client.create((nbytes,), np.uint8)
        arr = obj.array
        t_created = now()
        arr[:fill].fill(value)  # the producer's own work: untimed
        del arr
        t_filled = now()
        obj.seal()
        obj.release()
        notify.send(obj.id)
        self.oid = obj.id
        return t_start, t_created, t_filled

    def cleanup(self) -> None:
        self.client.delete(self.oid)
        # The consumer's release is a one-way message on its own connection: wait until the
        # server has freed the block, so that the next create reuses the same (warm) memory.
        deadline = time.monotonic() + 2.0
        while self.client.stats()["objects"] and time.monotonic() < deadline:
            time.sleep(0.0005)

    def stop(self, notify) -> None:
        notify.send(None)
        self.client.close()


class OursConsumer:
    def __init__(self, address: str, queue) -> None:
        from dataflow.store import connect

        self.client = connect(address, name="bench-consumer")

    def receive(self, notify) -> tuple[int, int] | None:
        oid = notify.recv()
        if oid is None:
            return None
        view = self.client.get(oid, timeout=10)
        element = int(view.array[0])
        t_read = now()
        return t_read, element  # the view goes here: its reference is released


class ShmProducer(Producer):
    """The floor: a fresh POSIX shared-memory segment per handoff, its name over a Pipe.

    All processes of the tree share the resource tracker of the main process (``spawn`` passes
    its descriptor on), so the consumer's attach registers the same name in the same set and
    the producer's ``unlink`` unregisters it once: no leak, no warning, no double unlink.
    """

    def __init__(self, address: str | None, queue) -> None:
        self.shm: shared_memory.SharedMemory | None = None
        self.arr: np.ndarray | None = None

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        t_start = now()
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        arr = np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        t_created = now()
        arr[:fill].fill(value)  # first touch of fresh memory: untimed
        t_filled = now()
        notify.send(shm.name)
        self.shm, self.arr = shm, arr
        return t_start, t_created, t_filled

    def cleanup(self) -> None:
        self.arr = None
        self.shm.close()
        self.shm.unlink()
        self.shm = None


class ShmConsumer:
    def __init__(self, address: str | None, queue) -> None:
        pass

    def receive(self, notify) -> tuple[int, int] | None:
        name = notify.recv()
        if name is None:
            return None
        shm = shared_memory.SharedMemory(name=name)
        arr = np.ndarray((shm.size,), np.uint8, buffer=shm.buf)
        element = int(arr[0])
        t_read = now()
        del arr
        shm.close()
        return t_read, element


class PickleProducer(Producer):
    def __init__(self, address: str | None, queue) -> None:
        self.queue = queue
        self.arr: np.ndarray | None = None

    def prepare(self, nbytes: int) -> None:
        self.arr = np.empty(nbytes, np.uint8)

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        self.arr[:fill].fill(value)  # a ready array: untimed
        t_start = now()
        self.queue.put(self.arr)
        return t_start, t_start, t_start

    def finish(self) -> None:
        self.arr = None

    def stop(self, notify) -> None:
        self.queue.put(None)
        self.queue.close()
        self.queue.join_thread()


class PickleConsumer:
    def __init__(self, address: str | None, queue) -> None:
        self.queue = queue

    def receive(self, notify) -> tuple[int, int] | None:
        arr = self.queue.get()
        if arr is None:
            return None
        element = int(arr[0])
        return now(), element


class NotifyProducer(Producer):
    """The notification channel alone: a small message over the Pipe (context)."""

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        t_start = now()
        notify.send(value)
        return t_start, t_start, t_start


class NotifyConsumer:
    def __init__(self, address: str | None, queue) -> None:
        pass

    def receive(self, notify) -> tuple[int, int] | None:
        value = notify.recv()
        if value is None:
            return None
        return now(), value


SYSTEMS = {
    "ours": (OursProducer, OursConsumer),
    "shm-pipe": (ShmProducer, ShmConsumer),
    "pickle-queue": (PickleProducer, PickleConsumer),
    "pipe-notify": (NotifyProducer, NotifyConsumer),
}


def _producer_main(system, address, queue, notify, results, control) -> None:
    producer = SYSTEMS[system][0](address, queue)
    if results.recv() != "ready":
        raise RuntimeError("consumer did not start")
    control.send("ready")
    while (command := control.recv()) is not None:
        nbytes, reps, warmup, page_only = command
        producer.prepare(nbytes)
        samples, creates, errors = [], [], 0
        for i in range(warmup + reps):
            value = i % 250 + 1
            fill = min(nbytes, PAGE) if page_only else nbytes
            t_start, t_created, t_filled = producer.handoff(nbytes, value, notify, fill)
            t_read, element = results.recv()
            producer.cleanup()
            errors += element != value
            if i >= warmup:
                samples.append((t_created - t_start) + (t_read - t_filled))
                creates.append(t_created - t_start)
        producer.finish()
        control.send((samples, creates, errors))
    producer.stop(notify)


def _consumer_main(system, address, queue, notify, results) -> None:
    consumer = SYSTEMS[system][1](address, queue)
    results.send("ready")
    while (answer := consumer.receive(notify)) is not None:
        results.send(answer)


class Pair:
    """A producer and a consumer process of one system, alive between blocks of handoffs."""

    def __init__(self, system: str, address: str | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.system = system
        notify_r, notify_w = ctx.Pipe(duplex=False)
        results_r, results_w = ctx.Pipe(duplex=False)
        self.control, control_child = ctx.Pipe()
        self.queue = ctx.Queue() if system == "pickle-queue" else None
        self.consumer = ctx.Process(
            target=_consumer_main,
            args=(system, address, self.queue, notify_r, results_w),
            daemon=True,
        )
        self.producer = ctx.Process(
            target=_producer_main,
            args=(system, address, self.queue, notify_w, results_r, control_child),
            daemon=True,
        )
        self.consumer.start()
        self.producer.start()
        for conn in (notify_r, notify_w, results_r, results_w, control_child):
            conn.close()
        self._recv()  # "ready"
        self.samples: dict[tuple[int, bool], list[int]] = {}
        self.creates: dict[tuple[int, bool], list[int]] = {}
        self.errors: dict[tuple[int, bool], int] = {}

    def _recv(self):
        try:
            return self.control.recv()
        except EOFError:
            raise RuntimeError(f"{self.system}: the producer process died") from None

    def block(self, nbytes: int, reps: int, warmup: int = WARMUP, page_only: bool = False):
        """One warm-up + ``reps`` timed handoffs of ``nbytes``; samples accumulate by size."""
        self.control.send((nbytes, reps, warmup, page_only))
        samples, creates, errors = self._recv()
        key = (nbytes, page_only)
        self.samples.setdefault(key, []).extend(samples)
        self.creates.setdefault(key, []).extend(creates)
        self.errors[key] = self.errors.get(key, 0) + errors

    def records(self, rounds: int) -> list[dict]:
        out = []
        for (nbytes, page_only), samples in self.samples.items():
            record = handoff_record(
                self.system, nbytes, samples, self.errors[nbytes, page_only], rounds
            )
            if page_only:
                record["case"] += "-1page"
            if self.system in ("ours", "shm-pipe"):
                creates = self.creates[nbytes, page_only]
                record["create_p50_us"] = round(float(np.median(creates)) / 1e3, 2)
            out.append(record)
        return out

    def close(self) -> None:
        try:
            self.control.send(None)
        except OSError:
            pass
        for proc in (self.producer, self.consumer):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.control.close()
        if self.queue is not None:
            self.queue.close()
            self.queue.join_thread()


def handoff_record(system: str, nbytes: int, samples_ns, errors: int, rounds: int) -> dict:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    p50 = float(np.percentile(us, 50))
    notify = system in ("pipe-notify", "ray-actor-call")
    return {
        "case": "notify-one-way" if notify else f"handoff-{size_label(nbytes)}",
        "system": system,
        "value": round(p50, 2),
        "unit": "us",
        "stat": "p50",
        "size_bytes": nbytes,
        "p50_us": round(p50, 2),
        "p99_us": round(float(np.percentile(us, 99)), 2),
        "min_us": round(float(us.min()), 2),
        "mean_us": round(float(us.mean()), 2),
        "max_us": round(float(us.max()), 2),
        "n": len(us),
        "rounds": rounds,
        "wrong_elements": int(errors),
    }


class Quiet:
    """Waits, before each block, until the machine has been idle for a moment.

    Other processes (a test run, a build) and the kernel's own work make latencies noisy on a
    small machine; a block that starts on a busy machine is counted in ``noisy_blocks``.
    """

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s
        self.waited_s = 0.0
        self.blocks = 0
        self.noisy_blocks = 0

    def wait(self) -> None:
        self.blocks += 1
        idle, waited = common.wait_for_idle(self.max_wait_s)
        self.noisy_blocks += not idle
        self.waited_s += waited

    def summary(self) -> dict:
        return {
            "blocks": self.blocks,
            "noisy_blocks": self.noisy_blocks,
            "quiet_wait_s": round(self.waited_s, 1),
        }


def run_handoffs(systems: list[str], address: str | None, quick: bool, quiet: Quiet) -> list[dict]:
    """All handoff blocks, interleaved: for each round, for each size, each system in turn.

    The order of the zero-copy systems' blocks rotates from round to round; pickle goes last,
    as it allocates and frees the most memory.
    """
    reps = REPS_QUICK if quick else REPS
    rounds = ROUNDS_QUICK if quick else ROUNDS
    pairs = {"pipe-notify": Pair("pipe-notify")}
    try:
        for system in systems:
            pairs[system] = Pair(system, address if system == "ours" else None)
        zero_copy = [s for s in ("ours", "shm-pipe") if s in pairs]
        started = time.perf_counter()
        for rnd in range(rounds):
            quiet.wait()
            pairs["pipe-notify"].block(0, NOTIFY_REPS, warmup=5)
            for nbytes in SIZES:
                per_block = math.ceil(reps[nbytes] / rounds)
                blocks = [(s, per_block, False) for s in zero_copy]
                blocks += [(s, max(4, per_block // 2), True) for s in zero_copy]
                shift = rnd % len(blocks) if blocks else 0
                blocks = blocks[shift:] + blocks[:shift]
                if "pickle-queue" in pairs:
                    blocks.append(("pickle-queue", per_block, False))
                for system, block_reps, page_only in blocks:
                    quiet.wait()
                    pairs[system].block(nbytes, block_reps, page_only=page_only)
            print(
                f"  handoff round {rnd + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        return [rec for pair in pairs.values() for rec in pair.records(rounds)]
    finally:
        for pair in pairs.values():
            pair.close()


# ----------------------------------------------------------------------------- small objects


def ours_small_round(client, nbytes: int, seconds: float, delete: bool) -> float:
    """create + seal + get (read one element) + release, back to back: operations per second.

    Without ``delete`` the objects stay in the store (sealed, unreferenced) until the end of
    the round and are deleted then, untimed. With it, each is deleted at once, as Ray's
    ``del ref`` frees its object.
    """
    shape = (max(1, nbytes // 4),)
    ids = []
    count = 0
    start = time.perf_counter()
    while True:
        for _ in range(100):
            obj = client.create(shape, np.float32)
            obj.array[0] = 1.0
            obj.seal()
            view = client.get(obj.id)
            float(view.array[0])
            view.release()
            obj.release()
            if delete:
                client.delete(obj.id)
            else:
                ids.append(obj.id)
        count += 100
        if (end := time.perf_counter()) >= start + seconds:
            break
    for oid in ids:  # untimed: start every round with an empty store
        client.delete(oid)
    return count / (end - start)


def small_record(case: str, system: str, nbytes: int, rates, ops: str) -> dict:
    p50 = statistics.median(rates)
    return {
        "case": case,
        "system": system,
        "value": round(p50),
        "unit": "ops/s",
        "stat": "median over rounds",
        "size_bytes": nbytes,
        "ops": ops,
        "us_per_op": round(1e6 / p50, 2),
        "best": round(max(rates)),
        "rounds": [round(r) for r in rates],
    }


def roundtrip_round(call, seconds: float) -> float:
    """Requests per second, back to back."""
    count = 0
    start = time.perf_counter()
    while True:
        for _ in range(200):
            call()
        count += 200
        if (end := time.perf_counter()) >= start + seconds:
            break
    return count / (end - start)


def rpc_record(system: str, rates, what: str) -> dict:
    p50 = statistics.median(rates)
    return {
        "case": "rpc-roundtrip",
        "system": system,
        "value": round(1e6 / p50, 2),
        "unit": "us",
        "stat": "median over rounds",
        "what": what,
        "per_second": round(p50),
        "rounds_per_second": [round(r) for r in rates],
    }


FRAME = struct.Struct("<I")  # the store's framing: a little-endian length, then a pickle


def _frame(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return FRAME.pack(len(body)) + body


def _recv_small_frame(sock: socket.socket, scratch: memoryview) -> tuple | None:
    """One frame that fits in ``scratch``, read with as few ``recv_into`` calls as it takes."""
    got = 0
    while got < FRAME.size or got < FRAME.size + FRAME.unpack_from(scratch)[0]:
        n = sock.recv_into(scratch[got:])
        if n == 0:
            return None
        got += n
    return pickle.loads(scratch[FRAME.size : got])


def _echo_main(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    sock, _ = listener.accept()
    scratch = memoryview(bytearray(1 << 16))
    while (request := _recv_small_frame(sock, scratch)) is not None:
        sock.sendall(_frame(("ok", request[0] == "stop")))
    sock.close()
    listener.close()


class EchoPeer:
    """A bare echo process over a blocking Unix socket with the store's framing: the least a
    Python request and its reply can cost here (no selector, dispatch or bookkeeping)."""

    def __init__(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="dataflow-bench-")
        path = os.path.join(self._tmp, "echo.sock")
        self._proc = mp.get_context("spawn").Process(target=_echo_main, args=(path,), daemon=True)
        self._proc.start()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(1000):
            try:
                self._sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
        self._scratch = memoryview(bytearray(1 << 16))
        self._request = _frame(("contains", "no-such-object"))

    def roundtrip(self) -> None:
        self._sock.sendall(self._request)
        _recv_small_frame(self._sock, self._scratch)

    def close(self) -> None:
        self._sock.close()
        self._proc.join(10)
        shutil.rmtree(self._tmp, ignore_errors=True)


def run_small(store, quick: bool) -> list[dict]:
    """Small-object throughput and request round trips, interleaved round by round."""
    seconds = SMALL_SECONDS_QUICK if quick else SMALL_SECONDS
    rounds = ROUNDS_QUICK + 1 if quick else ROUNDS
    variants = {  # case: (nbytes, delete)
        "small-objects-1KiB": (1 * KiB, False),
        "small-objects-1KiB+delete": (1 * KiB, True),
        "small-objects-1MiB+delete": (1 * MiB, True),
    }
    rates: dict[str, list[float]] = {case: [] for case in [*variants, "rpc-ours", "rpc-echo"]}
    echo = EchoPeer()
    try:
        for _ in range(rounds):
            for case, (nbytes, delete) in variants.items():
                rates[case].append(ours_small_round(store, nbytes, seconds, delete))
            rates["rpc-ours"].append(
                roundtrip_round(lambda: store.contains("no-such-object"), seconds)
            )
            rates["rpc-echo"].append(roundtrip_round(echo.roundtrip, seconds))
    finally:
        echo.close()
    records = []
    for case, (nbytes, delete) in variants.items():
        ops = "create+seal+get+release" + ("+delete" if delete else "")
        records.append(small_record(case, "ours", nbytes, rates[case], ops))
    records.append(rpc_record("ours", rates["rpc-ours"], "client.contains(missing id)"))
    records.append(rpc_record("py-unix-socket", rates["rpc-echo"], "blocking echo process"))
    return records


# ------------------------------------------------------------------------------------- Ray


class RayConsumer:
    """Consumer actor: gets the array (zero-copy, read-only NumPy) and reads one element."""

    def consume(self, refs) -> tuple[int, int]:
        import ray

        arr = ray.get(refs[0])
        element = int(arr[0])
        t_read = now()
        del arr
        return t_read, element

    def stamp(self, value: int) -> tuple[int, int]:
        return now(), value


class RayProducer:
    """Producer actor: ``ray.put`` of a ready array, the ObjectRef to the consumer actor."""

    def handoff(self, consumer, nbytes: int, reps: int, warmup: int):
        import ray

        arr = np.empty(nbytes, np.uint8)
        samples, errors = [], 0
        for i in range(warmup + reps):
            value = i % 250 + 1
            arr.fill(value)  # a ready array: untimed
            t_start = now()
            ref = ray.put(arr)
            t_read, element = ray.get(consumer.consume.remote([ref]))
            del ref
            errors += element != value
            if i >= warmup:
                samples.append(t_read - t_start)
        return samples, errors

    def notify(self, consumer, reps: int, warmup: int):
        import ray

        samples = []
        for i in range(warmup + reps):
            t_start = now()
            t_read, _ = ray.get(consumer.stamp.remote(i))
            if i >= warmup:
                samples.append(t_read - t_start)
        return samples, 0


def ray_small_round(nbytes: int, seconds: float) -> float:
    import ray

    arr = np.ones(max(1, nbytes // 4), np.float32)
    count = 0
    start = time.perf_counter()
    while True:
        for _ in range(100):
            ref = ray.put(arr)
            float(ray.get(ref)[0])
            del ref
        count += 100
        if (end := time.perf_counter()) >= start + seconds:
            break
    return count / (end - start)


def run_ray(quick: bool) -> tuple[list, dict]:
    """Everything measured on Ray, on a local single-node cluster started and stopped here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Populate the whole plasma store at start. Otherwise ray.put keeps landing on memory never
    # touched before (it walks the store while frees are in flight) and pays first-touch page
    # faults inside the timing: 64 MiB puts of 40 ms to 300 ms instead of ~22 ms.
    os.environ.setdefault(RAY_PREALLOCATE, "1")
    import ray

    reps = REPS_QUICK if quick else REPS
    seconds = SMALL_SECONDS_QUICK if quick else SMALL_SECONDS
    rounds = ROUNDS_QUICK + 1 if quick else ROUNDS
    temp_dir = tempfile.mkdtemp(prefix="dfray-")
    records: list[dict] = []
    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        object_store_memory=RAY_OBJECT_STORE,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    info: dict = {"init_s": round(time.perf_counter() - started, 2)}
    try:
        consumer = ray.remote(num_cpus=0)(RayConsumer).remote()
        producer = ray.remote(num_cpus=0)(RayProducer).remote()
        ray.get(producer.notify.remote(consumer, 3, 0))  # both actors up
        info["init_and_actors_s"] = round(time.perf_counter() - started, 2)
        samples, _ = ray.get(producer.notify.remote(consumer, 200, 20))
        records.append(handoff_record("ray-actor-call", 0, samples, 0, 1))
        for nbytes in SIZES:
            samples, errors = ray.get(
                producer.handoff.remote(consumer, nbytes, reps[nbytes], RAY_WARMUP)
            )
            records.append(handoff_record("ray", nbytes, samples, errors, 1))
            print(f"  ray handoff {size_label(nbytes)} done", flush=True)
        del consumer, producer
        for nbytes in (1 * KiB, 1 * MiB):
            rates = [ray_small_round(nbytes, seconds) for _ in range(rounds)]
            case = f"small-objects-{size_label(nbytes)}"
            records.append(small_record(case, "ray", nbytes, rates, "put+get+del ref"))
        info["object_store_memory"] = RAY_OBJECT_STORE
        info["preallocate_plasma_memory"] = os.environ[RAY_PREALLOCATE]
    finally:
        ray.shutdown()
        time.sleep(1.0)  # Ray's daemons may write their last log lines while exiting
        shutil.rmtree(temp_dir, ignore_errors=True)
    return records, info


# ----------------------------------------------------------------------------- goals, output


def derive_goals(records: list[dict]) -> list[dict]:
    """The issue's goals as records of unit ``ratio`` (``met`` says whether each is reached).

    Records with ``"goal": "context"`` are not goals: they help read the ones that are.
    """
    by = {(r["case"], r["system"]): r["value"] for r in records}
    goals = []

    def add(case: str, value: float, target: str, met: bool | None, what: str) -> None:
        goals.append(
            {
                "case": case,
                "system": "ours",
                "value": round(value, 3),
                "unit": "ratio",
                "goal": target,
                "met": met,
                "what": what,
            }
        )

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        return by[a] / by[b] if a in by and b in by else None

    if (r := ratio(("handoff-1GiB", "ours"), ("handoff-4KiB", "ours"))) is not None:
        add("goal-zero-copy", r, "<= 2", r <= 2, "ours p50 handoff 1 GiB / 4 KiB")
    if (r := ratio(("handoff-1GiB", "shm-pipe"), ("handoff-4KiB", "shm-pipe"))) is not None:
        add("context-floor-1GiB/4KiB", r, "context", None, "shm-pipe p50 handoff 1 GiB / 4 KiB")
    if (r := ratio(("handoff-1GiB-1page", "ours"), ("handoff-4KiB-1page", "ours"))) is not None:
        add("context-zero-copy-1page", r, "context", None, "same as goal-zero-copy, 1-page fill")
    key = "handoff-256MiB"
    if (r := ratio((key, "pickle-queue"), (key, "ours"))) is not None:
        add("goal-vs-pickle-256MiB", r, ">= 100", r >= 100, "pickle-queue / ours p50 handoff")
    for nbytes in SIZES:
        key = f"handoff-{size_label(nbytes)}"
        if (r := ratio((key, "ours"), (key, "shm-pipe"))) is not None:
            add(f"goal-vs-floor-{size_label(nbytes)}", r, "<= 1.2", r <= 1.2, "ours / shm-pipe p50")
    for nbytes in SIZES:
        key = f"handoff-{size_label(nbytes)}"
        if (r := ratio((key, "ours"), (key, "ray"))) is not None:
            add(f"goal-vs-ray-{size_label(nbytes)}", r, "<= 1", r <= 1, "ours / ray p50 handoff")
    key = "small-objects-1KiB"
    if (r := ratio((key, "ours"), (key, "ray"))) is not None:
        add("goal-vs-ray-small-objects", r, ">= 1", r >= 1, "ours / ray ops per second, 1 KiB")
    return goals


def print_handoff_table(title: str, records: list[dict], suffix: str) -> None:
    systems = ("ours", "shm-pipe", "pickle-queue", "ray")
    cells = {
        (r["system"], r["size_bytes"]): f"{r['p50_us']:,.1f} ({r['p99_us']:,.1f})"
        for r in records
        if r["case"] == f"handoff-{size_label(r.get('size_bytes', 0))}{suffix}"
    }
    systems = [s for s in systems if any(key[0] == s for key in cells)]
    if not systems:
        return
    print(f"\n{title}")
    print(f"{'size':>8}" + "".join(f"{s:>26}" for s in systems))
    for nbytes in SIZES:
        row = [cells.get((s, nbytes), "-") for s in systems]
        print(f"{size_label(nbytes):>8}" + "".join(f"{c:>26}" for c in row))


def print_tables(records: list[dict]) -> None:
    print_handoff_table("Handoff latency, p50 (p99) in microseconds", records, "")
    print_handoff_table(
        "Control: the same with a one-page fill (transport alone), p50 (p99) in microseconds",
        records,
        "-1page",
    )
    other = [r for r in records if not r["case"].startswith(("handoff-", "goal-", "context-"))]
    if other:
        print("\nSmall objects and context")
        for r in other:
            extra = r.get("ops") or r.get("what") or f"p99 {r.get('p99_us')} us"
            print(f"  {r['case']:<26} {r['system']:<15} {r['value']:>10,} {r['unit']:<6} {extra}")
    goals = [r for r in records if r["case"].startswith(("goal-", "context-"))]
    if goals:
        print("\nGoals")
        for r in goals:
            met = {True: "met", False: "NOT MET", None: ""}[r["met"]]
            print(f"  {r['case']:<28} {r['value']:>10.3f}  {r['goal']:<8} {met:<8} {r['what']}")


def provenance(args) -> dict:
    """Where and on what the run happens; taken at the start (the tree may change meanwhile)."""
    store_dir = common.ROOT / "dataflow" / "store"
    digest = hashlib.sha256()
    for path in sorted(store_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        **common.run_header(),
        "store_source_matches_commit": common.git("status", "--porcelain", "--", "dataflow/store")
        == "",
        "store_source_sha256": digest.hexdigest(),
        **common.mode_and_argv(args),
        **common.machine(),
        **common.module_versions(("numpy", "pyarrow", "ray")),
        "start_method": "spawn",
        "clock": "time.monotonic_ns (CLOCK_MONOTONIC)",
        "store_budget_bytes": STORE_BUDGET,
        "loadavg_1min_at_start": common.loadavg(),
    }


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~2 minutes)")
    parser.add_argument("--json", metavar="PATH", help="write the records here")
    parser.add_argument(
        "--systems",
        default="ours,shm-pipe,pickle-queue,ray",
        help="comma-separated subset of: ours, shm-pipe, pickle-queue, ray (default: all)",
    )
    args = parser.parse_args(argv)
    wanted = args.systems.split(",")
    systems = [s for s in ("ours", "shm-pipe", "pickle-queue") if s in wanted]
    meta = provenance(args)
    records: list[dict] = []
    started = time.perf_counter()
    cpu_at_start = common.machine_busy()

    print(f"store benchmark ({meta['mode']}), {meta['cores']} cores, commit {meta['commit']:.10}")
    if meta["loadavg_1min_at_start"] > 0.5:
        print(f"warning: the machine is busy (load {meta['loadavg_1min_at_start']}): noisy")
    store = None
    if "ours" in systems:
        from dataflow.store import Store

        store = Store.start(budget=STORE_BUDGET)
    try:
        quiet = Quiet(max_wait_s=5.0 if args.quick else 10.0)
        records += run_handoffs(systems, store.address if store else None, args.quick, quiet)
        if store is not None:
            quiet.wait()
            records += run_small(store, args.quick)
        meta["quiet"] = quiet.summary()
    finally:
        if store is not None:
            store.stop()

    if "ray" in wanted:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed: skipping it (pip install -e '.[ray]')")
        else:
            ray_records, meta["ray_run"] = run_ray(args.quick)
            records += ray_records

    records += derive_goals(records)
    print_tables(records)
    busy, steal = (b - a for a, b in zip(cpu_at_start, common.machine_busy(), strict=True))
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["machine_busy_cpu_s"] = round(busy, 1)
    meta["steal_cpu_s"] = round(steal, 1)
    meta["loadavg_1min_at_end"] = common.loadavg()
    print(f"\nfinished in {meta['elapsed_s']:.0f} s")
    if args.json:
        common.write_results(args.json, records, meta)


if __name__ == "__main__":
    main()
