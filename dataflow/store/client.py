"""Store clients: :class:`StoreClient` (attach from any process) and :class:`Store` (the owner).

Large objects live in the arena, a shared-memory file every client maps once (read-write for
objects it creates, read-only for objects it gets). ``get`` hands out NumPy/Arrow views of the
arena itself, so a handoff costs the same for 4 KiB and for 1 GiB. Each view holds a
reference counted by the server; the reference is released when the last NumPy array or Arrow
buffer made from the view is garbage-collected (or at once if the process dies), so nothing
the store does can pull memory out from under a reader. Objects of at most
``inline_threshold`` bytes are copied to and from the server instead, like Ray's inlined
small objects.
"""

from __future__ import annotations

import collections
import itertools
import json
import mmap
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from dataflow.errors import (
    STORE_ERRORS,
    ObjectSealed,
    StoreError,
    StoreNotRunning,
    StoreValueError,
)
from dataflow.store import protocol
from dataflow.tensors import check_shape, dtype_of, element_type_of, encode_metadata
from dataflow.tensors import tensor_to_arrow as _tensor_to_arrow
from dataflow.units import parse_bytes

__all__ = ["ObjectView", "Store", "StoreClient", "WritableObject", "connect"]

DEFAULT_INLINE_THRESHOLD = 64 * 1024
DEVICE_KIND = "cuda"  # as in dataflow.store.table, which this module does not import


def connect(address: str, *, name: str | None = None) -> StoreClient:
    """Attach to the running store at ``address`` (``Store.address``)."""
    return StoreClient(address, name=name)


class _Lease:
    """One server-side reference; released when this object is garbage-collected."""

    __slots__ = ("__weakref__",)


class StoreClient:
    """A connection to a running store. Picklable: a copy reconnects by address.

    One client serialises its requests; a thread blocked in ``get(..., timeout=...)`` holds the
    others back, so give each thread that waits its own client.
    """

    def __init__(self, address: str, *, name: str | None = None) -> None:
        self.address = address
        self.name = name or f"{os.path.basename(sys.argv[0]) or 'python'}"
        self._lock = threading.Lock()
        self._deferred: collections.deque[str] = collections.deque()
        self._sock: socket.socket | None = None
        self._pid = -1
        self._scratch = bytearray(1 << 17)  # replies, inline objects included, fit in one
        self._connect()

    # ----------------------------------------------------------- connection

    def _connect(self) -> None:
        if self._sock is not None:  # inherited through fork: drop our copy of the parent's
            self._sock.close()
            self._sock = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(protocol.parse_address(self.address))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise StoreNotRunning(
                f"no store is running at {self.address!r} ({exc.strerror.lower()})"
            ) from None
        sock.sendall(protocol.encode(("hello", os.getpid(), self.name)))
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 1)
        while len(data) < protocol.HEADER.size or len(data) < (
            protocol.HEADER.size + protocol.HEADER.unpack_from(data)[0]
        ):
            more = sock.recv(1 << 16)
            if not more:
                break
            data += more
        if not fds or not data:
            sock.close()
            raise StoreNotRunning(f"the store at {self.address!r} closed the connection")
        _status, info = protocol.decode(data[protocol.HEADER.size :])
        fd = fds[0]
        try:
            size = info["arena_size"]
            self._rw = mmap.mmap(fd, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._ro = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._ro_address = pa.py_buffer(self._ro).address
        self.info = info
        self.inline_threshold = info["inline_threshold"]
        self._sock = sock
        self._pid = os.getpid()

    def _request(self, *message: Any) -> Any:
        """Send a request and return the server's answer (raising the error it names)."""
        reply = self._send(message, wait=True)
        if reply[0] == "ok":
            return reply[1]
        raise STORE_ERRORS.get(reply[1], StoreError)(reply[2])

    def _send_one_way(self, *message: Any) -> None:
        """A request the server does not answer (ordered before our next request)."""
        self._send(message, wait=False)

    def _send(self, message: tuple, wait: bool) -> tuple | None:
        if self._pid != os.getpid():  # forked: the parent's socket is not ours
            self._connect()
        if self._sock is None:
            raise StoreNotRunning(f"this client of {self.address!r} is closed")
        with self._lock:
            self._flush_deferred()
            try:
                self._sock.sendall(protocol.encode(message))
                reply = protocol.recv_frame(self._sock, self._scratch) if wait else ()
            except OSError:
                reply = None
        if reply is None:
            raise StoreNotRunning(f"the store at {self.address!r} stopped")
        return reply

    def _flush_deferred(self) -> None:
        while self._deferred:
            self._sock.sendall(protocol.encode(("release", self._deferred.popleft())))

    def _release_ref(self, oid: str) -> None:
        """Called when a lease is collected: tell the server, or queue it if we are mid-request."""
        if self._sock is None or self._pid != os.getpid():
            return
        if self._lock.acquire(blocking=False):
            try:
                self._sock.sendall(protocol.encode(("release", oid)))
            except OSError:
                pass
            finally:
                self._lock.release()
        else:
            self._deferred.append(oid)

    def close(self) -> None:
        """Disconnect. References still held by live views are released by the server."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __reduce__(self):
        return (connect, (self.address,), {"name": self.name})

    def __setstate__(self, state: dict) -> None:
        self.name = state["name"]

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address!r}>"

    # -------------------------------------------------------------- objects

    def create(
        self,
        shape: Any,
        dtype: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        object_id: str | None = None,
        timeout: float | None = 0.0,
    ) -> WritableObject:
        """A writable tensor in shared memory for the caller to fill in place, then seal.

        ``timeout`` is how long to wait for room when the store is full (None: forever).
        """
        dt = dtype_of(dtype)
        dims = check_shape(shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        return self._create(
            "tensor", nbytes, element_type_of(dt), dims, metadata, object_id, timeout
        )

    def create_buffer(
        self,
        nbytes: int,
        *,
        kind: str = "bytes",
        metadata: Mapping[str, Any] | None = None,
        object_id: str | None = None,
        timeout: float | None = 0.0,
    ) -> WritableObject:
        """A writable raw buffer (``kind="arrow"`` if you write an Arrow IPC stream into it)."""
        if kind not in ("bytes", "arrow"):
            raise StoreValueError(f"create_buffer kind must be 'bytes' or 'arrow'; got {kind!r}")
        if not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise StoreValueError(f"buffer size must be a non-negative integer; got {nbytes!r}")
        return self._create(kind, int(nbytes), None, None, metadata, object_id, timeout)

    def _create(self, kind, nbytes, dtype, shape, metadata, object_id, timeout) -> WritableObject:
        oid = object_id if object_id is not None else new_object_id()
        meta = encode_metadata(metadata)
        if nbytes <= self.inline_threshold:
            return WritableObject(self, oid, kind, nbytes, dtype, shape, meta, None, timeout)
        offset = self._request("create", oid, kind, nbytes, dtype, shape, meta, timeout)
        return WritableObject(self, oid, kind, nbytes, dtype, shape, meta, offset, timeout)

    def put(
        self,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        object_id: str | None = None,
        timeout: float | None = 0.0,
    ) -> str:
        """Copy a NumPy array, Arrow table/batch/tensor or bytes into the store; returns its ID."""
        if isinstance(value, pa.Tensor):
            value = value.to_numpy()
        if isinstance(value, np.ndarray):
            with self.create(
                value.shape, value.dtype, metadata=metadata, object_id=object_id, timeout=timeout
            ) as obj:
                obj.array[...] = value  # shapes match by construction
            return obj.id
        if isinstance(value, (pa.Table, pa.RecordBatch)):
            sink = pa.MockOutputStream()
            with pa.ipc.new_stream(sink, value.schema) as writer:
                writer.write(value)
            with self.create_buffer(
                sink.size(), kind="arrow", metadata=metadata, object_id=object_id, timeout=timeout
            ) as obj:
                out = pa.FixedSizeBufferWriter(pa.py_buffer(obj.buffer))
                with pa.ipc.new_stream(out, value.schema) as writer:
                    writer.write(value)
            return obj.id
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = memoryview(value).cast("B")
            with self.create_buffer(
                data.nbytes, metadata=metadata, object_id=object_id, timeout=timeout
            ) as obj:
                obj.write(data)
            return obj.id
        raise StoreValueError(
            "put takes a NumPy array, an Arrow Table/RecordBatch/Tensor or bytes; "
            f"got {type(value).__name__}"
        )

    def get(self, object_id: str, *, timeout: float | None = 0.0) -> ObjectView:
        """A zero-copy, read-only view of a sealed object.

        ``timeout``: seconds to wait for the object to be created and sealed (0: do not
        wait; None: wait forever). Raises ObjectNotFound when it is not there in time.
        """
        kind, offset, nbytes, dtype, shape, meta, data = self._request("get", object_id, timeout)
        lease = None
        if data is None or kind == DEVICE_KIND:  # the server counted a reference for us
            lease = _Lease()
            weakref.finalize(lease, self._release_ref, object_id)
        if data is not None:
            buffer = pa.py_buffer(data)
        else:
            buffer = pa.foreign_buffer(self._ro_address + offset, nbytes, base=lease)
        return ObjectView(object_id, kind, buffer, dtype, shape, meta, lease)

    def release(self, view: ObjectView) -> None:
        """Done with a view (same as ``view.release()``)."""
        view.release()

    def delete(self, object_id: str) -> None:
        """Remove a sealed object; its memory is reused once no view of it remains."""
        self._request("delete", object_id)

    def contains(self, object_id: str) -> bool:
        """True if the object is sealed and can be got now."""
        return self._request("contains", object_id)

    def list(self) -> list[dict[str, Any]]:
        """One dict per object: id, kind, nbytes, dtype, shape, sealed, deleted, refs, inline."""
        return self._request("list")

    def stats(self) -> dict[str, Any]:
        """Budget, bytes used, object and reference counts, evictions, lost clients..."""
        return self._request("stats")

    @property
    def client_id(self) -> int:
        """This connection's ID, for ``WritableObject.seal(transfer_to=...)``."""
        return self.info["client_id"]

    def unpin(self, object_ids: list[str]) -> None:
        """Drop references this client holds by ID (taken over with ``transfer_to``)."""
        for oid in object_ids:
            self._send_one_way("release", oid)

    def discard(self, object_ids: list[str]) -> None:
        """Delete objects handed to this client (``transfer_to``) and drop its references,
        without waiting for the store: for a consumer done with them (the executor with a
        job's results); one already gone is no error."""
        for oid in object_ids:
            self._send_one_way("discard", oid)

    def _present(self, object_ids: list[str]) -> list[str]:
        return self._request("present", list(object_ids))


_ids = itertools.count()
_ID_PREFIX = secrets.token_hex(6)


def new_object_id() -> str:
    """A fresh, unique object ID (random per process, then a counter)."""
    return f"{_ID_PREFIX}-{os.getpid()}-{next(_ids)}"


class WritableObject:
    """An object being created: fill ``array`` (tensors) or ``buffer`` (bytes), then seal.

    As a context manager it seals on success and aborts if the block raises. After sealing,
    the object is immutable: ``array`` turns read-only and writing through this object raises
    ObjectSealed. The creator keeps a reference until :meth:`release` (or garbage collection).
    """

    def __init__(self, client, oid, kind, nbytes, dtype, shape, meta, offset, timeout) -> None:
        self.client = client
        self.id = oid
        self.kind = kind
        self.nbytes = nbytes
        self.dtype = dtype
        self.shape = shape
        self._meta = meta
        self._offset = offset
        self._timeout = timeout
        self.sealed = False
        self._aborted = False
        if offset is None:  # small: filled locally, sent to the server on seal
            self._memory: Any = bytearray(nbytes)
            self._buffer = memoryview(self._memory)
        else:
            self._buffer = memoryview(client._rw)[offset : offset + nbytes]
            self._finalizer = weakref.finalize(self, client._release_ref, oid)
        self._array: np.ndarray | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self._meta)

    @property
    def buffer(self) -> memoryview:
        """The writable bytes (raises ObjectSealed after seal)."""
        self._check_writable()
        return self._buffer

    @property
    def array(self) -> np.ndarray:
        """The tensor as a NumPy array over shared memory (read-only after seal)."""
        if self.kind != "tensor":
            raise StoreValueError(f"object {self.id!r} is {self.kind}, not a tensor; use .buffer")
        if self._array is None:
            arr = np.frombuffer(self._buffer, dtype=dtype_of(self.dtype)).reshape(self.shape)
            arr.flags.writeable = not (self.sealed or self._aborted)
            self._array = arr
        return self._array

    def __setitem__(self, key: Any, value: Any) -> None:
        """``obj[...] = values``: write into the tensor, with errors that name the object."""
        self._check_writable()
        try:
            self.array[key] = value
        except ValueError as exc:
            got = getattr(value, "shape", type(value).__name__)
            raise StoreValueError(
                f"cannot write {got} into object {self.id!r} of shape {self.shape}: {exc}"
            ) from None

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy bytes (anything with the buffer protocol) into the object at ``offset``."""
        self._check_writable()
        src = memoryview(data).cast("B")
        if offset < 0 or offset + src.nbytes > self.nbytes:
            raise StoreValueError(
                f"object {self.id!r} is {self.nbytes} bytes; cannot write {src.nbytes} bytes "
                f"at offset {offset}"
            )
        self._buffer[offset : offset + src.nbytes] = src

    def _check_writable(self) -> None:
        if self.sealed:
            raise ObjectSealed(f"object {self.id!r} is sealed: it can no longer be written")
        if self._aborted:
            raise StoreError(f"object {self.id!r} was aborted")

    def seal(
        self, *, transfer_to: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> str:
        """Make the object immutable and visible to every client; returns its ID.

        ``transfer_to``: the ``client_id`` of another client that takes over the creator's
        reference (an orchestrator that will ``unpin`` it when the object is no longer needed).
        ``metadata``: replaces the metadata given at create (known only once computed).
        """
        if self.sealed:
            raise ObjectSealed(f"object {self.id!r} is already sealed")
        self._check_writable()
        new_meta = None
        if metadata is not None:
            self._meta = new_meta = encode_metadata(metadata)
        if self._offset is None:
            self.client._request(
                "put_inline", self.id, self.kind, self.nbytes, self.dtype, self.shape,
                self._meta, bytes(self._memory), self._timeout, transfer_to,
            )  # fmt: skip
        else:
            self.client._send_one_way("seal", self.id, transfer_to, new_meta)
            if transfer_to is not None:
                self._finalizer.detach()  # the reference is no longer ours to release
        self.sealed = True
        if self._array is not None:
            self._array.flags.writeable = False
        return self.id

    def abort(self) -> None:
        """Give up an unsealed object and free its memory."""
        if self.sealed:
            raise ObjectSealed(f"object {self.id!r} is sealed; delete it instead of aborting")
        if self._aborted:
            return
        self._aborted = True
        if self._array is not None:
            self._array.flags.writeable = False
        if self._offset is not None:
            self._finalizer.detach()
            self.client._request("abort", self.id)

    def release(self) -> None:
        """Drop the creator's reference (the sealed object stays in the store)."""
        if self._offset is not None and self.sealed:
            self._finalizer()

    def __enter__(self) -> WritableObject:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.sealed:
                self.seal()
            self.release()
        elif not self.sealed:
            self.abort()

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "aborted" if self._aborted else "open"
        return f"<WritableObject {self.id!r} {self.kind} {self.nbytes} bytes {state}>"


class ObjectView:
    """A read-only, zero-copy view of a sealed object.

    ``array`` (tensors, or bytes as uint8), ``buffer`` (a :class:`pyarrow.Buffer`) and
    ``to_arrow()`` all share the store's memory; each keeps the object alive while it lives.
    """

    __slots__ = ("__weakref__", "_buffer", "_lease", "_meta", "dtype", "id", "kind", "shape")

    def __init__(self, oid, kind, buffer, dtype, shape, meta, lease=None) -> None:
        self.id = oid
        self.kind = kind
        self.dtype = dtype
        self.shape = shape
        self._meta = meta
        self._buffer = buffer
        self._lease = lease  # device objects: arena objects keep it in the buffer instead

    @property
    def nbytes(self) -> int:
        return self.buffer.size

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self._meta)

    @property
    def buffer(self) -> pa.Buffer:
        if self._buffer is None:
            raise StoreError(f"view of object {self.id!r} was released")
        return self._buffer

    @property
    def array(self) -> np.ndarray:
        buffer = self.buffer
        if self.kind == "tensor":
            return np.frombuffer(buffer, dtype=dtype_of(self.dtype)).reshape(self.shape)
        if self.kind == "bytes":
            return np.frombuffer(buffer, dtype=np.uint8)
        if self.kind == DEVICE_KIND:
            raise StoreValueError(f"object {self.id!r} lives on a GPU; use .device_array()")
        raise StoreValueError(f"object {self.id!r} is an Arrow object; use .to_arrow()")

    def device_array(self):
        """A GPU object as a CuPy array over the producer's device memory (CUDA IPC, no copy)."""
        if self.kind != DEVICE_KIND:
            raise StoreValueError(f"object {self.id!r} is a host {self.kind}; use .array")
        from dataflow.store.cuda import open_device_array

        return open_device_array(self)

    def to_arrow(self) -> pa.Table | pa.Buffer:
        """Tensors as the one-row fixed-shape-tensor table of docs/tensors.md; Arrow objects as
        the Table that was put; bytes as a pyarrow Buffer. All zero-copy."""
        if self.kind == "arrow":
            return pa.ipc.open_stream(self.buffer).read_all()
        if self.kind == "tensor":
            return _tensor_to_arrow(self.array, self.metadata)
        return self.buffer

    def release(self) -> None:
        """Done with this view. The reference goes back to the store once no array or Arrow
        object made from it is alive either."""
        self._buffer = None
        self._lease = None

    def __enter__(self) -> ObjectView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        what = f"{self.dtype}{list(self.shape)}" if self.kind == "tensor" else self.kind
        return f"<ObjectView {self.id!r} {what}>"


class Store(StoreClient):
    """The owner of a store: starts its server process and stops it (with everything in it).

    >>> with Store.start(budget="1GiB") as store:      # doctest: +SKIP
    ...     oid = store.put(np.arange(10))
    ...     store.get(oid).array
    """

    def __init__(self, address: str, process: subprocess.Popen, *, name: str | None) -> None:
        self._process = process
        super().__init__(address, name=name)

    @classmethod
    def start(
        cls,
        budget: int | str = "1GiB",
        *,
        address: str | None = None,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
        startup_timeout: float = 15.0,
        name: str | None = "owner",
    ) -> Store:
        """Start a store server owned by this process and connect to it.

        ``address``: an absolute path for a socket file, any other name for a Linux-abstract
        socket (which leaves no file behind). By default a fresh abstract name.
        """
        budget = parse_bytes(budget)
        if address is None:
            address = f"dataflow-store-{os.getpid()}-{secrets.token_hex(4)}"
        elif address.startswith("/"):
            _remove_stale_socket(address)
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable, "-m", "dataflow.store.server",
            "--address", address, "--budget", str(budget),
            "--inline-threshold", str(int(inline_threshold)),
            "--owner-pid", str(os.getpid()), "--ready-fd", str(write_fd),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, start_new_session=True
        )
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], startup_timeout)
            line = os.read(read_fd, 64) if ready else b""
        finally:
            os.close(read_fd)
        if line != b"ready\n":
            process.kill()
            code = process.wait()
            raise StoreError(
                f"store server at {address!r} did not start within {startup_timeout} s "
                f"(exit code {code}); see its message above"
            )
        return cls(address, process, name=name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server. Views other processes still hold stay readable; new requests fail."""
        if self._process.poll() is None:
            try:
                self._request("shutdown")
            except StoreError:
                pass
        self.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    @property
    def pid(self) -> int:
        """The server process's ID."""
        return self._process.pid

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __reduce__(self):  # other processes attach as plain clients
        return (connect, (self.address,), {"name": self.name})


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a crashed store; refuse if a live store answers there."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise StoreError(f"a store is already running at {path!r}")
