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
    reads ``view.array[0]``. The producer deletes the object afterwards, untimed.
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
  taken in the producer and in the consumer: a one-way latency, not half a round trip. Each
  size gets warm-up iterations first (untimed), then the timed repetitions; we report p50,
  p99, min and mean.

* **Small objects**: create + seal + get + release per second for 1 KiB objects with one
  client (and the same with a delete, and 1 MiB objects through the arena, for context), next
  to Ray's ``ray.put`` + ``ray.get`` + ``del ref``.

* **Context**: the one-way latency of the notification channels alone (Pipe; Ray actor call),
  and the round trip of one store request next to a bare Python Unix-socket echo with the same
  framing (what any store request costs at least).

* **Goals**, derived from the above and emitted as records of unit ``ratio``.

``--json PATH`` writes the records (a list of dicts with ``case``, ``system``, ``value`` and
``unit`` and extra fields) and the run's provenance next to it as ``PATH`` with the suffix
``.provenance.json``. The benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = (4 * KiB, 1 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
#: Timed repetitions per size (after the warm-up iterations).
REPS = {4 * KiB: 300, 1 * MiB: 200, 64 * MiB: 40, 256 * MiB: 20, 1 * GiB: 10}
REPS_QUICK = {4 * KiB: 50, 1 * MiB: 30, 64 * MiB: 8, 256 * MiB: 4, 1 * GiB: 3}
WARMUP, WARMUP_QUICK = 2, 1
STORE_BUDGET = 3 * GiB
RAY_OBJECT_STORE = 3 * GiB
RAY_PREALLOCATE = "RAY_preallocate_plasma_memory"  # Ray's own spelling of its config variable
SMALL_SECONDS, SMALL_SECONDS_QUICK = 2.0, 0.5
SMALL_ROUNDS, SMALL_ROUNDS_QUICK = 5, 3

PAGE = 4096
now = time.monotonic_ns  # CLOCK_MONOTONIC: comparable between processes on Linux


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


# --------------------------------------------------------------------------- handoff: systems
#
# A producer object makes one array available per iteration (``handoff``) and cleans up after
# the consumer has answered (``cleanup``); a consumer object waits for one array, reads one
# element and returns (t_read, element). ``handoff`` returns (t_start, t_created, t_filled).


class OursProducer:
    def __init__(self, address: str, queue) -> None:
        from dataflow.store import connect

        self.client = connect(address, name="bench-producer")
        self.oid: str | None = None

    def prepare(self, nbytes: int) -> None:
        pass

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


class ShmProducer:
    """The floor: a fresh POSIX shared-memory segment per handoff, its name over a Pipe.

    All processes of the tree share the resource tracker of the main process (``spawn`` passes
    its descriptor on), so the consumer's attach registers the same name in the same set and
    the producer's ``unlink`` unregisters it once: no leak, no warning, no double unlink.
    """

    def __init__(self, address: str | None, queue) -> None:
        self.shm: shared_memory.SharedMemory | None = None
        self.arr: np.ndarray | None = None

    def prepare(self, nbytes: int) -> None:
        pass

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

    def stop(self, notify) -> None:
        notify.send(None)


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


class PickleProducer:
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

    def cleanup(self) -> None:
        pass

    def stop(self, notify) -> None:
        self.arr = None
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


class NotifyProducer:
    """The notification channel alone: a few bytes over the Pipe (context, not a system)."""

    def __init__(self, address: str | None, queue) -> None:
        pass

    def prepare(self, nbytes: int) -> None:
        pass

    def handoff(self, nbytes: int, value: int, notify, fill: int) -> tuple[int, int, int]:
        t_start = now()
        notify.send(value)
        return t_start, t_start, t_start

    def cleanup(self) -> None:
        pass

    def stop(self, notify) -> None:
        notify.send(None)


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


def _producer_main(system, address, queue, plan, warmup, page_only, notify, results, out) -> None:
    producer = SYSTEMS[system][0](address, queue)
    if results.recv() != "ready":
        raise RuntimeError("consumer did not start")
    for nbytes, reps in plan:
        producer.prepare(nbytes)
        samples, creates, errors = [], [], 0
        for i in range(warmup + reps):
            value = i % 250 + 1
            # Warm-up iterations always fill everything (first touch); with page_only the timed
            # ones then write the first page only.
            fill = min(nbytes, PAGE) if page_only and i >= warmup else nbytes
            t_start, t_created, t_filled = producer.handoff(nbytes, value, notify, fill)
            t_read, element = results.recv()
            producer.cleanup()
            errors += element != value
            if i >= warmup:
                samples.append((t_created - t_start) + (t_read - t_filled))
                creates.append(t_created - t_start)
        out.send((nbytes, samples, creates, errors))
    producer.stop(notify)
    out.send(None)


def _consumer_main(system, address, queue, notify, results) -> None:
    consumer = SYSTEMS[system][1](address, queue)
    results.send("ready")
    while (answer := consumer.receive(notify)) is not None:
        results.send(answer)


def run_handoff(
    system: str, plan, warmup: int, address: str | None = None, page_only: bool = False
) -> list[dict]:
    """Spawn a producer and a consumer process and measure ``plan`` [(nbytes, reps)].

    ``page_only``: the control variant; the producer writes one page instead of filling the
    whole array, which leaves the transport alone without the fill's side effects.
    """
    ctx = mp.get_context("spawn")
    notify_r, notify_w = ctx.Pipe(duplex=False)
    results_r, results_w = ctx.Pipe(duplex=False)
    out_r, out_w = ctx.Pipe(duplex=False)
    queue = ctx.Queue() if system == "pickle-queue" else None
    consumer = ctx.Process(
        target=_consumer_main, args=(system, address, queue, notify_r, results_w), daemon=True
    )
    producer = ctx.Process(
        target=_producer_main,
        args=(system, address, queue, plan, warmup, page_only, notify_w, results_r, out_w),
        daemon=True,
    )
    consumer.start()
    producer.start()
    for conn in (notify_r, notify_w, results_r, results_w, out_w):
        conn.close()
    records = []
    try:
        while True:
            try:
                item = out_r.recv()
            except EOFError:
                raise RuntimeError(f"{system}: the producer died") from None
            if item is None:
                break
            nbytes, samples, creates, errors = item
            record = handoff_record(system, nbytes, samples, errors, warmup)
            if page_only:
                record["case"] += "-1page"
            if system in ("ours", "shm-pipe"):
                record["create_p50_us"] = round(float(np.median(creates)) / 1e3, 2)
            records.append(record)
            print_progress(records[-1])
    finally:
        producer.join(60)
        consumer.join(60)
        for proc in (producer, consumer):
            if proc.is_alive():
                proc.kill()
                proc.join()
        if queue is not None:
            queue.close()
            queue.join_thread()
    return records


def handoff_record(system: str, nbytes: int, samples_ns, errors: int, warmup: int) -> dict:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    p50 = float(np.percentile(us, 50))
    case = "notify-one-way" if system in ("pipe-notify", "ray-actor-call") else "handoff"
    return {
        "case": case if case != "handoff" else f"handoff-{size_label(nbytes)}",
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
        "warmup": warmup,
        "wrong_elements": int(errors),
    }


def print_progress(record: dict) -> None:
    print(
        f"  {record['case']:<22} {record['system']:<14} p50 {record['p50_us']:>12,.1f} us"
        f"  p99 {record['p99_us']:>12,.1f} us  min {record['min_us']:>12,.1f} us"
        f"  n={record['n']}",
        flush=True,
    )


# ----------------------------------------------------------------------------- small objects


def ours_small_objects(client, nbytes: int, seconds: float, rounds: int, delete: bool) -> dict:
    """create + seal + get (read one element) + release, back to back, from one client.

    Without ``delete`` the objects stay in the store (sealed, unreferenced) until the end of
    the round; they are deleted then, untimed. With it, each is deleted at once, like Ray's
    ``del ref`` frees its object.
    """
    shape = (max(1, nbytes // 4),)
    rates = []
    for _ in range(rounds):
        ids = []
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
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
            if (end := time.perf_counter()) >= deadline:
                break
        rates.append(count / (end - start))
        for oid in ids:  # untimed: start every round with an empty store
            client.delete(oid)
    what = "create+seal+get+release" + ("+delete" if delete else "")
    case = f"small-objects-{size_label(nbytes)}" + ("+delete" if delete else "")
    return small_record(case, "ours", nbytes, rates, what)


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


def ours_rpc_roundtrip(client, seconds: float, rounds: int) -> dict:
    """One store request and its reply: ``contains`` of a missing ID (no other work)."""
    rates = []
    for _ in range(rounds):
        count = 0
        start = time.perf_counter()
        while True:
            for _ in range(200):
                client.contains("no-such-object")
            count += 200
            if (end := time.perf_counter()) >= start + seconds:
                break
        rates.append(count / (end - start))
    return rpc_record("ours", rates, "client.contains(missing id)")


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


def _echo_main(path: str) -> None:
    from dataflow.store import protocol

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    sock, _ = listener.accept()
    while (request := protocol.recv_frame(sock)) is not None:
        sock.sendall(protocol.encode(("ok", request[0] == "stop")))
    sock.close()
    listener.close()


def socket_floor_roundtrip(seconds: float, rounds: int) -> dict:
    """The same framing (length + pickle) over a blocking Unix socket to a bare echo process."""
    from dataflow.store import protocol

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="dataflow-bench-")
    path = os.path.join(tmp, "echo.sock")
    proc = ctx.Process(target=_echo_main, args=(path,), daemon=True)
    proc.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(500):
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
    rates = []
    message = ("contains", "no-such-object")
    for _ in range(rounds):
        count = 0
        start = time.perf_counter()
        while True:
            for _ in range(200):
                sock.sendall(protocol.encode(message))
                protocol.recv_frame(sock)
            count += 200
            if (end := time.perf_counter()) >= start + seconds:
                break
        rates.append(count / (end - start))
    sock.close()
    proc.join(10)
    shutil.rmtree(tmp, ignore_errors=True)
    return rpc_record("py-unix-socket", rates, "blocking echo, same framing as the store")


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


def ray_small_objects(nbytes: int, seconds: float, rounds: int) -> dict:
    import ray

    arr = np.ones(max(1, nbytes // 4), np.float32)
    rates = []
    for _ in range(rounds):
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
        rates.append(count / (end - start))
    return small_record(
        f"small-objects-{size_label(nbytes)}", "ray", nbytes, rates, "put+get+del ref"
    )


def run_ray(plan, warmup: int, small_seconds: float, small_rounds: int) -> tuple[list, dict]:
    """Everything measured on Ray, on a local single-node cluster started and stopped here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Populate the whole plasma store at start. Otherwise ray.put keeps landing on memory never
    # touched before (it walks the store while frees are in flight) and pays first-touch page
    # faults inside the timing: 64 MiB puts of 40 ms to 300 ms instead of ~22 ms here.
    os.environ.setdefault(RAY_PREALLOCATE, "1")
    import ray

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
    info = {"ray_init_s": round(time.perf_counter() - started, 2)}
    try:
        consumer = ray.remote(num_cpus=0)(RayConsumer).remote()
        producer = ray.remote(num_cpus=0)(RayProducer).remote()
        ray.get(producer.notify.remote(consumer, 3, 0))  # both actors up
        samples, _ = ray.get(producer.notify.remote(consumer, 200, 20))
        records.append(handoff_record("ray-actor-call", 0, samples, 0, 20))
        print_progress(records[-1])
        info["ray_init_and_actors_s"] = round(time.perf_counter() - started, 2)
        for nbytes, reps in plan:
            samples, errors = ray.get(producer.handoff.remote(consumer, nbytes, reps, warmup))
            records.append(handoff_record("ray", nbytes, samples, errors, warmup))
            print_progress(records[-1])
        del consumer, producer
        for nbytes in (1 * KiB, 1 * MiB):
            records.append(ray_small_objects(nbytes, small_seconds, small_rounds))
            print_small(records[-1])
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


def print_small(record: dict) -> None:
    print(
        f"  {record['case']:<26} {record['system']:<14} {record['value']:>10,} ops/s"
        f"  ({record['us_per_op']:.1f} us/op: {record['ops']})",
        flush=True,
    )


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


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def provenance(args, extra: dict) -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    versions = {}
    for module in ("numpy", "pyarrow", "ray"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    root = Path(__file__).resolve().parent.parent
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": run("git", "-C", str(root), "rev-parse", "HEAD"),
        "uncommitted_changes": run("git", "-C", str(root), "status", "--porcelain").splitlines(),
        "mode": "quick" if args.quick else "full",
        "argv": sys.argv,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem_kib * 1024,
        "dev_shm_bytes": shutil.disk_usage("/dev/shm").total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "start_method": "spawn",
        "clock": "time.monotonic_ns (CLOCK_MONOTONIC)",
        "store_budget_bytes": STORE_BUDGET,
        **extra,
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
    systems = set(args.systems.split(","))
    reps = REPS_QUICK if args.quick else REPS
    warmup = WARMUP_QUICK if args.quick else WARMUP
    seconds = SMALL_SECONDS_QUICK if args.quick else SMALL_SECONDS
    rounds = SMALL_ROUNDS_QUICK if args.quick else SMALL_ROUNDS
    plan = [(n, reps[n]) for n in SIZES]
    page_plan = [(n, max(10, reps[n] // 2)) for n in SIZES]
    extra: dict = {"loadavg_1min_at_start": _loadavg()}
    records: list[dict] = []
    started = time.perf_counter()

    print(f"store benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores")
    if extra["loadavg_1min_at_start"] > 0.5:
        print(f"warning: the machine is busy (load {extra['loadavg_1min_at_start']}): noisy")
    records += run_handoff("pipe-notify", [(0, 200)], 20)
    if "shm-pipe" in systems:
        records += run_handoff("shm-pipe", plan, warmup)
        records += run_handoff("shm-pipe", page_plan, warmup, page_only=True)
    if "pickle-queue" in systems:
        records += run_handoff("pickle-queue", plan, warmup)

    if "ours" in systems:
        from dataflow.store import Store

        with Store.start(budget=STORE_BUDGET) as store:
            records += run_handoff("ours", plan, warmup, store.address)
            records += run_handoff("ours", page_plan, warmup, store.address, page_only=True)
            gc.collect()
            for nbytes, delete in ((1 * KiB, False), (1 * KiB, True), (1 * MiB, True)):
                records.append(ours_small_objects(store, nbytes, seconds, rounds, delete))
                print_small(records[-1])
            records.append(ours_rpc_roundtrip(store, seconds, rounds))
        records.append(socket_floor_roundtrip(seconds, rounds))

    if "ray" in systems:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed: skipping it (pip install -e '.[ray]')")
        else:
            ray_records, extra["ray"] = run_ray(plan, warmup, seconds, rounds)
            records += ray_records

    records += derive_goals(records)
    print_tables(records)
    extra["elapsed_s"] = round(time.perf_counter() - started, 1)
    extra["loadavg_1min_at_end"] = _loadavg()
    print(f"\nfinished in {extra['elapsed_s']:.0f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1) + "\n")
        meta = path.with_name(path.name.removesuffix(".json") + ".provenance.json")
        meta.write_text(json.dumps(provenance(args, extra), indent=1) + "\n")
        print(f"wrote {path} and {meta}")


if __name__ == "__main__":
    main()
