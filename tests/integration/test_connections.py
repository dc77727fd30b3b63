"""Connections the server must not keep forever: a peer that stops mid-message and answers no
ping, a peer that never finishes its handshake, and a connection idle with no call.

The hostile peers speak raw HTTP/2 over a socket, written by hand, so nothing in them answers
the server's pings the way a real client library would.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lstm_serve.client import Client, SessionStream
from tests.helpers.server import ServerThread, serve, xs

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, no Huffman (short strings only)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def half_sent_stream_call() -> bytes:
    headers = b"".join(
        literal(k, v)
        for k, v in [
            (":method", "POST"), (":scheme", "http"), (":path", "/lstm_serve.v1.LstmServe/Stream"),
            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ]
    )  # fmt: skip
    # A gRPC message announcing 1000 bytes, of which 10 are sent.
    data = b"\x00" + struct.pack(">I", 1000) + b"\x0a" * 10
    return (
        PREFACE
        + frame(0x4, 0, 0, b"")  # SETTINGS
        + frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + frame(0x0, 0, 1, data)  # DATA, stream left open
    )


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Read (and ignore) what the server sends, never answering; the time until it closed."""
    sock.settimeout(0.2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(
        tiny_repo, keepalive_time_s=0.5, keepalive_timeout_s=0.5, handshake_timeout_s=1.0,
        max_connection_idle_s=1.0,
    )  # fmt: skip


def _connect(srv: ServerThread) -> socket.socket:
    host, port = srv.target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_a_half_open_connection_with_a_half_sent_message_is_closed(server: ServerThread) -> None:
    with _connect(server) as sock:
        sock.sendall(half_sent_stream_call())
        took = closed_within(sock, 15)
    assert took is not None, "the server kept a silent half-open connection"


def test_a_connection_that_never_handshakes_is_closed(server: ServerThread) -> None:
    with _connect(server) as sock:  # TCP only: no HTTP/2 preface ever
        took = closed_within(sock, 15)
    assert took is not None


def test_an_idle_connection_is_closed_and_clients_reconnect(server: ServerThread) -> None:
    with Client(server.target) as c:
        assert c.predict("tiny", "idle-conn", xs(1, 1), seq=0).next_seq == 1
        time.sleep(2.5)  # past max_connection_idle: the server sent GOAWAY
        assert c.predict("tiny", "idle-conn", xs(2, 1), seq=1).next_seq == 2


def test_live_streams_are_not_cut_by_keepalive(server: ServerThread) -> None:
    """A real client answers pings: a stream quiet for several keepalive periods and longer
    than max_connection_idle (it has an open call, so it is not idle) lives on."""
    with Client(server.target) as c, SessionStream(c, "tiny", "quiet") as stream:
        assert stream.send(xs(3, 1)).next_seq == 1
        time.sleep(2.5)
        assert stream.send(xs(4, 1)).next_seq == 2
        assert stream.reconnects == 0
