"""GPU objects: CuPy device memory shared between processes by CUDA IPC handles.

A producer owns a :class:`DevicePool`: one ``cudaMalloc`` of device memory, exported once as
one IPC handle and sub-allocated per object. Sealing an object puts a small descriptor in the
store (handle, offset, size, device, producer pid) as an object of kind ``"cuda"``; readers
reference-count it like any other object, so the pool never reuses memory a reader still
holds. A consumer's :meth:`ObjectView.device_array` opens the pool's handle once per process
and caches the mapping: opening a handle costs up to hundreds of milliseconds, so it is paid
once per (producer, pool), never per tensor. :func:`ipc_cache_info` reports hits and misses.

Limits: device memory belongs to the producer process. When it exits, the store deletes its
GPU objects; readers must not use device arrays of a producer that is gone. CUDA IPC needs
Linux and two processes on the same machine; a process cannot open its own handle, so a
consumer in the producer's own process is handed the pool's pointer directly.
"""

from __future__ import annotations

import collections
import os
import struct
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dataflow.errors import StoreError, StoreFull
from dataflow.store.allocator import Allocator
from dataflow.store.client import DEVICE_KIND, new_object_id
from dataflow.tensors import check_shape, dtype_of, element_type_of, encode_metadata
from dataflow.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from dataflow.store.client import ObjectView, StoreClient

__all__ = ["DeviceObject", "DevicePool", "close_ipc_handles", "ipc_cache_info"]

# handle (cudaIpcMemHandle_t, 64 bytes), offset, nbytes, device, producer pid
DESCRIPTOR = struct.Struct("<64sQQii")

_local_pools: dict[bytes, int] = {}  # handle -> base pointer, pools of this process
_opened: dict[bytes, tuple[int, int, int]] = {}  # handle -> (base pointer, device, pid)
_cache_stats = collections.Counter()


def _cupy():
    try:
        import cupy
    except ImportError:
        raise StoreError("GPU objects need CuPy: pip install 'dataflow[gpu]'") from None
    return cupy


class DevicePool:
    """Exportable device memory of one producer process, sub-allocated per object.

    >>> pool = DevicePool(client, "2GiB")                      # doctest: +SKIP
    >>> with pool.create((512, 512, 512), "float32") as obj:  # doctest: +SKIP
    ...     my_kernel(obj.array)                              # compute straight into it
    """

    def __init__(self, client: StoreClient, nbytes: int | str, *, device: int | None = None):
        cupy = _cupy()
        self.client = client
        self.nbytes = parse_bytes(nbytes)
        with cupy.cuda.Device(device) as dev:
            self.device = dev.id
            self._memory = cupy.cuda.Memory(self.nbytes)  # one allocation: one handle
            self.handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr))
        self._alloc = Allocator(self.nbytes)
        self._objects: collections.OrderedDict[str, int] = collections.OrderedDict()
        _local_pools[self.handle] = self._memory.ptr

    def create(
        self,
        shape: Any,
        dtype: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        object_id: str | None = None,
        timeout: float | None = 0.0,
    ) -> DeviceObject:
        """A writable CuPy array in the pool; seal it to publish it to other processes."""
        dt = dtype_of(dtype)
        dims = check_shape(shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        offset = self._allocate(nbytes, timeout)
        return DeviceObject(
            self, object_id or new_object_id(), offset, nbytes, element_type_of(dt), dims,
            encode_metadata(metadata),
        )  # fmt: skip

    def put(self, array: Any, **kwargs: Any) -> str:
        """Copy a CuPy or NumPy array into the pool as a sealed GPU object; returns its ID."""
        with self.create(array.shape, array.dtype, **kwargs) as obj:
            if isinstance(array, np.ndarray):
                obj.array.set(array)  # host to device
            else:
                obj.array[...] = array  # device to device
        return obj.id

    def _allocate(self, nbytes: int, timeout: float | None) -> int:
        if nbytes > self.nbytes:
            raise StoreFull(
                f"GPU object of {format_bytes(nbytes)} can never fit in a device pool of "
                f"{format_bytes(self.nbytes)}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            offset = self._alloc.allocate(max(nbytes, 1))
            if offset is not None:
                return offset
            self._reclaim(nbytes)
            offset = self._alloc.allocate(max(nbytes, 1))
            if offset is not None:
                return offset
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreFull(
                    f"device pool of {format_bytes(self.nbytes)} on GPU {self.device} is full: "
                    f"{len(self._objects)} objects, {format_bytes(self._alloc.allocated)} in "
                    f"use, all held by readers; could not place {format_bytes(nbytes)} within "
                    f"{timeout} s"
                )
            time.sleep(0.005)

    def _reclaim(self, nbytes: int) -> None:
        """Free blocks of objects that are gone, then evict unused ones, oldest first."""
        for oid in set(self._objects) - set(self.client._present(list(self._objects))):
            self._alloc.free(self._objects.pop(oid))
        for oid in list(self._objects):
            if self._alloc.largest_free() >= nbytes:
                return
            if self.client._request("evict_unused", oid):
                self._alloc.free(self._objects.pop(oid))

    def _sealed(self, oid: str, offset: int) -> None:
        self._objects[oid] = offset

    def close(self) -> None:
        """Delete this pool's objects from the store and free the device memory.

        Only call it once no reader uses the pool's objects any more."""
        for oid in list(self._objects):
            try:
                self.client.delete(oid)
            except StoreError:
                pass
        self._objects.clear()
        _local_pools.pop(self.handle, None)
        self._memory = None


class DeviceObject:
    """A GPU object being created: fill ``array`` (a CuPy array), then :meth:`seal`."""

    def __init__(self, pool, oid, offset, nbytes, dtype, shape, meta) -> None:
        cupy = _cupy()
        self.pool = pool
        self.id = oid
        self.nbytes = nbytes
        self.dtype = dtype
        self.shape = shape
        self._offset = offset
        self._meta = meta
        self.sealed = False
        memptr = cupy.cuda.MemoryPointer(pool._memory, offset)
        self.array = cupy.ndarray(shape, dtype=dtype_of(dtype), memptr=memptr)

    def seal(self) -> str:
        """Wait for the GPU work on the current stream, then publish the object."""
        if self.sealed:
            raise StoreError(f"GPU object {self.id!r} is already sealed")
        _cupy().cuda.get_current_stream().synchronize()
        descriptor = DESCRIPTOR.pack(
            self.pool.handle, self._offset, self.nbytes, self.pool.device, os.getpid()
        )
        try:
            self.pool.client._request(
                "put_inline", self.id, DEVICE_KIND, len(descriptor), self.dtype, self.shape,
                self._meta, descriptor, 0.0,
            )  # fmt: skip
        except BaseException:
            self.abort()
            raise
        self.sealed = True
        self.pool._sealed(self.id, self._offset)
        return self.id

    def abort(self) -> None:
        if not self.sealed and self._offset is not None:
            self.pool._alloc.free(self._offset)
            self._offset = None

    def __enter__(self) -> DeviceObject:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.seal()
        else:
            self.abort()


def open_device_array(view: ObjectView):
    """The CuPy array behind a GPU object's view (see ``ObjectView.device_array``)."""
    cupy = _cupy()
    handle, offset, nbytes, device, pid = DESCRIPTOR.unpack(view.buffer.to_pybytes())
    base = _open_handle(cupy, handle, device, pid)
    memory = cupy.cuda.UnownedMemory(base + offset, nbytes, owner=view._lease, device_id=device)
    memptr = cupy.cuda.MemoryPointer(memory, 0)
    return cupy.ndarray(view.shape, dtype=dtype_of(view.dtype), memptr=memptr)


def _open_handle(cupy, handle: bytes, device: int, pid: int) -> int:
    if handle in _local_pools:
        _cache_stats["local"] += 1
        return _local_pools[handle]
    cached = _opened.get(handle)
    if cached is not None:
        _cache_stats["hits"] += 1
        return cached[0]
    _cache_stats["misses"] += 1
    _close_stale(cupy)
    t0 = time.perf_counter()
    with cupy.cuda.Device(device):
        base = cupy.cuda.runtime.ipcOpenMemHandle(handle)
    _cache_stats["open_seconds"] += time.perf_counter() - t0
    _opened[handle] = (base, device, pid)
    return base


def _close_stale(cupy) -> None:
    """Unmap handles whose producer process has exited."""
    for handle, (base, device, pid) in list(_opened.items()):
        if not os.path.exists(f"/proc/{pid}"):
            with cupy.cuda.Device(device):
                cupy.cuda.runtime.ipcCloseMemHandle(base)
            del _opened[handle]


def close_ipc_handles() -> None:
    """Unmap every handle this process opened (only when no device array of them is alive)."""
    cupy = _cupy()
    for base, device, _pid in _opened.values():
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.ipcCloseMemHandle(base)
    _opened.clear()


def ipc_cache_info() -> dict[str, float]:
    """Handle-cache counters of this process: hits, misses, local, open_seconds, hit_rate."""
    info = {k: _cache_stats[k] for k in ("hits", "misses", "local", "open_seconds")}
    lookups = info["hits"] + info["misses"]
    info["hit_rate"] = info["hits"] / lookups if lookups else 0.0
    return info
