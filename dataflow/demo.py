"""The store demonstration that ``dataflow demo`` runs (until pipelines replace it).

A producer process computes a synthetic CT volume straight into shared memory; consumer
processes (started with ``spawn``, attaching to the store by address) get zero-copy views
and each computes a statistic over the whole volume. The same volume also goes through a
``multiprocessing.Queue`` (pickle) to show what zero-copy saves.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import numpy as np

from dataflow.store import Store, StoreClient

__all__ = ["run_demo"]


def _produce(client: StoreClient, object_id: str, shape: tuple[int, ...], ready) -> None:
    with client.create(
        shape, "int16", object_id=object_id,
        metadata={"spacing": [1.0, 0.7, 0.7], "axes": "DHW", "modality": "CT"},
    ) as obj:  # fmt: skip
        vol = obj.array
        z = np.arange(shape[0], dtype=np.int16)[:, None, None]
        y = np.arange(shape[1], dtype=np.int16)[None, :, None]
        vol[...] = (z + y) % 2000 - 1000  # HU-like values, written in place: no copy
        sealing_at = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        obj.seal()
    ready.put(sealing_at)


def _consume(client: StoreClient, object_id: str, results) -> None:
    view = client.get(object_id, timeout=60)  # waits until the producer seals
    volume = view.array  # zero-copy, read-only
    got = time.monotonic()
    results.put((got, float(volume.mean()), view.metadata["spacing"]))


def _pickle_consume(queue, results) -> None:
    t0 = time.perf_counter()
    volume = queue.get()
    results.put((time.perf_counter() - t0, float(volume.mean())))


def run_demo(slices: int = 200, consumers: int = 2, echo=print) -> dict[str, Any]:
    shape = (slices, 512, 512)
    nbytes = int(np.prod(shape)) * 2
    ctx = mp.get_context("spawn")
    echo(f"Starting a store and handing a {slices}x512x512 int16 CT volume "
         f"({nbytes / 2**20:.0f} MiB) to {consumers} consumer processes...")  # fmt: skip
    with Store.start(budget=max(4 * nbytes, 1 << 28)) as store:
        ready, results = ctx.Queue(), ctx.Queue()
        producer = ctx.Process(target=_produce, args=(store, "ct-volume", shape, ready))
        producer.start()
        readers = [
            ctx.Process(target=_consume, args=(store, "ct-volume", results))
            for _ in range(consumers)
        ]
        for reader in readers:
            reader.start()
        sealed_at = ready.get(timeout=120)
        out = [results.get(timeout=120) for _ in readers]
        for proc in (producer, *readers):
            proc.join(30)
        stats = store.stats()

    for i, (got_at, mean, spacing) in enumerate(out):
        seconds = got_at - sealed_at
        echo(
            f"  consumer {i}: had a zero-copy view {seconds * 1e3:.2f} ms after the producer "
            f"sealed it; mean {mean:.1f} HU, spacing {spacing}"
        )

    queue, results = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_pickle_consume, args=(queue, results))
    reader.start()
    volume = np.zeros(shape, dtype=np.int16)
    t0 = time.perf_counter()
    queue.put(volume)
    pickle_seconds, _ = results.get(timeout=120)
    pickle_seconds = max(pickle_seconds, time.perf_counter() - t0)
    reader.join(30)
    echo(f"  the same volume pickled through multiprocessing.Queue: {pickle_seconds * 1e3:.1f} ms")
    echo(f"Store stopped; {stats['refs_reclaimed_total']} references were reclaimed from "
         "processes that exited without releasing; nothing is left in /dev/shm.")  # fmt: skip
    return {"zero_copy_seconds": [r[0] - sealed_at for r in out], "pickle_seconds": pickle_seconds}
