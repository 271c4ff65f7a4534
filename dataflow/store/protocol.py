"""Wire format between store clients and the store server (one Unix stream socket each).

A frame is a 4-byte little-endian length followed by a pickled tuple. Requests are
``(op, *args)``; replies are ``("ok", value)`` or ``("err", error_class_name, message)``.
Operations in :data:`ONE_WAY` get no reply. The arena's file descriptor travels once, with
the reply to ``hello``, as SCM_RIGHTS ancillary data.

Only processes of the server's own user may connect (checked with SO_PEERCRED), so
unpickling a request gives a peer no power it did not already have.
"""

from __future__ import annotations

import pickle
import socket
import struct

__all__ = ["HEADER", "ONE_WAY", "decode", "encode", "parse_address", "recv_frame"]

HEADER = struct.Struct("<I")
#: Requests the server does not answer. A one-way request is applied before any later
#: request that asks about the same object (the server settles its buffers first).
ONE_WAY = frozenset({"discard", "release", "seal"})
PICKLE_PROTOCOL = 5


def encode(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=PICKLE_PROTOCOL)
    return HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> tuple:
    return pickle.loads(body)


def recv_exact(sock: socket.socket, nbytes: int) -> bytearray | None:
    """Exactly ``nbytes`` from a blocking socket, or None if the peer closed first."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def recv_frame(sock: socket.socket, scratch: bytearray) -> tuple | None:
    """One decoded frame from a blocking socket, or None if the peer closed.

    ``scratch`` is a reusable buffer: most replies arrive whole in one ``recv_into``.
    The peer sends nothing unasked, so no bytes past the frame can arrive with it.
    """
    view = memoryview(scratch)
    got = sock.recv_into(view)
    while got < HEADER.size:
        if got == 0:
            return None
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    end = HEADER.size + HEADER.unpack_from(scratch)[0]
    if end <= len(scratch):
        while got < end:
            n = sock.recv_into(view[got:end])
            if n == 0:
                return None
            got += n
        return decode(view[HEADER.size : end])
    rest = recv_exact(sock, end - got)  # a frame larger than the scratch buffer
    if rest is None:
        return None
    return decode(bytes(view[HEADER.size : got]) + rest)


def parse_address(address: str) -> str | bytes:
    """A socket address: an absolute path is a file; any other name is Linux-abstract."""
    if address.startswith("/"):
        return address
    return b"\0" + address.encode()
