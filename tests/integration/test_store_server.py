"""The store server driven step by step in-process: orderings too rare to hit with processes."""

from __future__ import annotations

import os
import socket

import pytest

from dataflow.store import protocol
from dataflow.store.server import StoreServer

pytestmark = pytest.mark.integration


@pytest.fixture
def server():
    srv = StoreServer(f"dataflow-test-{os.getpid()}-{id(object())}", 1 << 20, 1024)
    srv.peers = []
    yield srv
    srv.close()
    for sock in srv.peers:
        sock.close()


def attach(srv: StoreServer) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.peers.append(sock)
    sock.connect(protocol.parse_address(srv.address))
    srv._accept()
    return sock, list(srv.clients.values())[-1]  # the connection just accepted


def request(sock, *message):
    sock.sendall(protocol.encode(message))


def reply(sock):
    return protocol.recv_frame(sock, bytearray(1 << 16))


def test_a_get_sees_a_one_way_seal_the_server_has_not_read_yet(server):
    producer, p = attach(server)
    consumer, c = attach(server)
    request(producer, "create", "vol", "bytes", 4096, None, None, "{}", 0)
    server._readable(p)
    assert reply(producer) == ("ok", 0)
    request(producer, "seal", "vol")  # one-way, still unread in the server's socket buffer
    request(consumer, "get", "vol", 0)  # the consumer heard of the seal and asks at once
    server._readable(c)  # the consumer's request is handled first
    status, record = reply(consumer)
    assert status == "ok" and record[0] == "bytes" and record[2] == 4096
    assert server.objects["vol"].refs == 2  # the creator's and the consumer's


def test_settling_leaves_a_request_that_wants_a_reply_for_the_main_loop(server):
    producer, p = attach(server)
    consumer, c = attach(server)
    request(producer, "create", "a", "bytes", 4096, None, None, "{}", 0)
    server._readable(p)
    reply(producer)
    request(producer, "seal", "a")
    request(producer, "contains", "a")  # wants a reply: must stay queued, in order
    request(consumer, "get", "a", 0)
    server._readable(c)
    assert reply(consumer)[0] == "ok"
    assert server.backlog == {p}
    server._process(server.backlog.pop())
    assert reply(producer) == ("ok", True)
