"""The store server: one process that owns the arena and talks to the store's clients.

It is started by :meth:`dataflow.store.Store.start` (never by hand) and lives exactly as long
as its owner: it exits when the owner asks, on SIGTERM, or when the owner process dies. The
arena is a ``memfd`` (anonymous shared memory), so nothing is ever created in ``/dev/shm``:
when the last process that maps it exits, the kernel frees the memory, whatever crashed.

The server is the IO shell around the object table (:mod:`dataflow.store.table`, a sans-IO
core): a single-threaded ``selectors`` loop that accepts connections, reads and decodes
requests, hands them to the table with the time, and sends the replies the table returns. It
never touches object bytes (small objects kept inline live in the table). A connection's
close, which is how a client killed with SIGKILL is detected, tells the table to release all
the client held.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time

from dataflow.errors import StoreError
from dataflow.store import protocol
from dataflow.store.table import Client, Object, ObjectTable, Reply

log = logging.getLogger("dataflow.store.server")

MEMFD_PREFIX = "dataflow-store:"


@dataclasses.dataclass(slots=True, eq=False)
class _Conn:
    """One client connection: its socket, the bytes read but not yet handled, its table entry."""

    sock: socket.socket
    client: Client = None  # type: ignore[assignment]
    rbuf: bytearray = dataclasses.field(default_factory=bytearray)
    closed: bool = False


class StoreServer:
    def __init__(
        self,
        address: str,
        budget: int,
        inline_threshold: int,
        owner_pid: int | None = None,
    ) -> None:
        self.address = address
        self.budget = budget
        self.inline_threshold = inline_threshold
        self.owner_pid = owner_pid
        self.uid = os.getuid()

        # The name only labels the mapping in /proc/<pid>/maps ("/memfd:dataflow-store:...").
        label = f"{MEMFD_PREFIX}{address.replace('/', '_')}"[:240]
        self.fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # Every client maps the arena: its fd goes with the reply to hello.
            self.table = ObjectTable(
                budget, inline_threshold, arena=self.fd, server_pid=os.getpid()
            )
            os.ftruncate(self.fd, budget)
            # Nobody may shrink the arena under others' mappings (that would SIGBUS them).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(self.fd)
            raise

        self.clients: dict[socket.socket, _Conn] = {}
        self.backlog: set[_Conn] = set()  # buffered requests that _settle left for the loop
        self._scratch = bytearray(1 << 16)
        self._scratch_view = memoryview(self._scratch)
        self.running = False

        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(protocol.parse_address(address))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        # A signal handler only sets a flag; this pipe wakes the select() so it is seen.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if owner_pid is not None:
            self.owner_fd = os.pidfd_open(owner_pid)
            self.sel.register(self.owner_fd, selectors.EVENT_READ, "owner")

    @property
    def objects(self) -> dict[str, Object]:
        return self.table.objects

    # ------------------------------------------------------------------ loop

    def serve_forever(self) -> None:
        self.running = True
        table = self.table
        try:
            while self.running and not table.shutdown:
                timeout = None
                if table.deadlines:
                    timeout = max(0.0, table.deadlines[0][0] - time.monotonic())
                for key, _ in self.sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        os.read(self._wake_r, 512)
                    elif key.data == "owner":
                        log.warning("store owner %s exited; shutting down", self.owner_pid)
                        self.running = False
                    else:
                        self._readable(key.data)
                while self.backlog:  # requests read early by _settle, still to handle
                    conn = self.backlog.pop()
                    if not conn.closed:
                        self._process(conn)
                if table.deadlines:
                    self._deliver(table.tick(time.monotonic()))
        finally:
            self.close()

    def close(self) -> None:
        for conn in list(self.clients.values()):
            self._disconnect(conn)
        self.sel.close()
        self.listener.close()
        if self.address.startswith("/"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass
        os.close(self.fd)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != self.uid and uid != 0:
            log.warning("refused store connection from uid %d (pid %d)", uid, pid)
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        conn.client = self.table.connect(pid, conn)
        self.clients[sock] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn, one_way_only: bool = False) -> None:
        try:
            # Into a reused buffer: recv(n) would allocate (and for big n, mmap) n bytes each time.
            n = conn.sock.recv_into(self._scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._disconnect(conn)
            return
        conn.rbuf += self._scratch_view[:n]
        self._process(conn, one_way_only)

    def _process(self, conn: _Conn, one_way_only: bool = False) -> None:
        """Handle the complete requests in the connection's buffer, in order.

        ``one_way_only``: stop at the first request that wants a reply and leave it (and what
        follows) for the main loop; see :meth:`_settle`.
        """
        buf = conn.rbuf
        header = protocol.HEADER
        table = self.table
        now = time.monotonic()
        while len(buf) >= header.size:
            (size,) = header.unpack_from(buf)
            end = header.size + size
            if len(buf) < end:
                break
            request = protocol.decode(memoryview(buf)[header.size : end])
            if one_way_only and request[0] not in protocol.ONE_WAY:
                self.backlog.add(conn)
                return
            del buf[:end]
            replies = table.handle(conn.client, request, now)
            if replies is None:  # a lookup: first apply the one-way requests sent before it
                self._settle()
                if conn.closed:
                    return
                replies = table.handle(conn.client, request, now, settled=True)
            for client, message, fds in replies:
                self._send(client.handle, message, fds)
            if conn.closed:
                return

    def _settle(self) -> None:
        """Apply every one-way request (seal, release) already sent to us.

        A producer's ``seal`` is one-way: it returns once the request is in our socket buffer.
        If the producer then tells a consumer (by any channel) and the consumer asks us, the
        seal is in a buffer we may not have read yet. Before answering "not there", read it.
        """
        for key, _ in self.sel.select(0):
            if isinstance(key.data, _Conn):
                self._readable(key.data, one_way_only=True)
        for conn in list(self.clients.values()):
            if conn.rbuf and conn not in self.backlog:
                self._process(conn, one_way_only=True)

    def _deliver(self, replies: list[Reply]) -> None:
        for client, message, fds in replies:
            self._send(client.handle, message, fds)

    def _send(self, conn: _Conn, message: tuple, fds: tuple[int, ...] = ()) -> None:
        if conn.closed:
            return
        frame = protocol.encode(message)
        sock = conn.sock
        try:
            if fds:
                sent = socket.send_fds(sock, [frame], list(fds))
            else:
                sent = sock.send(frame)  # replies are small: this nearly always sends all
            if sent < len(frame):  # the client is slow to read: finish, blocking
                sock.setblocking(True)
                sock.sendall(memoryview(frame)[sent:])
                sock.setblocking(False)
        except BlockingIOError:
            sock.setblocking(True)
            try:
                sock.sendall(frame)
            except OSError:
                self._disconnect(conn)
                return
            sock.setblocking(False)
        except OSError:
            self._disconnect(conn)

    def _disconnect(self, conn: _Conn) -> None:
        """Forget a connection (closed, crashed or killed): the table releases all it held."""
        if conn.closed:
            return
        conn.closed = True
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.clients.pop(conn.sock, None)
        self._deliver(self.table.disconnect(conn.client))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataflow.store.server")
    parser.add_argument("--address", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--inline-threshold", type=int, required=True)
    parser.add_argument("--owner-pid", type=int)
    parser.add_argument("--ready-fd", type=int, help="write 'ready' here once listening")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="dataflow.store: %(message)s")
    try:
        server = StoreServer(args.address, args.budget, args.inline_threshold, args.owner_pid)
    except (OSError, StoreError) as exc:
        print(f"dataflow.store: cannot start at {args.address!r}: {exc}", file=sys.stderr)
        sys.exit(1)

    def stop(signum, frame):
        server.running = False

    signal.set_wakeup_fd(server._wake_w)
    # With an owner, the owner stops us (a shutdown request, or its exit): systemd's SIGTERM
    # to every process of a service must not take the objects of the jobs it lets finish.
    signal.signal(signal.SIGTERM, stop if args.owner_pid is None else signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the owner, which stops us
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    server.serve_forever()


if __name__ == "__main__":
    main()
