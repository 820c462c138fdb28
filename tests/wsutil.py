"""Helpers for tests that drive an in-process WebSocketServer on 127.0.0.1.

Running ``async def`` tests, waiting for a condition, ``websockets`` clients
with bounded timeouts, and raw HTTP/WebSocket bytes for clients that must
misbehave more than ``websockets`` lets them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect

from enjent import WebSocketServer

HOST = "127.0.0.1"
TEST_TIMEOUT = 10.0
#: The sample nonce of RFC 6455 §1.3.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="

AsyncTest = Callable[..., Awaitable[None]]


def async_test_within(timeout: float) -> Callable[[AsyncTest], Callable[..., None]]:
    """A decorator that runs an ``async def`` test on a fresh event loop,
    failing it after ``timeout`` seconds.

    A test with a ``loop_kind`` parameter runs on that loop ("asyncio" or
    "uvloop", the loop ``server.run`` uses); others on asyncio's.
    """

    def decorate(fn: AsyncTest) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            factory = uvloop.new_event_loop if kwargs.get("loop_kind") == "uvloop" else None
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(asyncio.wait_for(fn(*args, **kwargs), timeout))

        return wrapper

    return decorate


#: Run an ``async def`` test on a fresh event loop, bounded by ``TEST_TIMEOUT``.
async_test = async_test_within(TEST_TIMEOUT)


async def eventually(predicate: Callable[[], object], timeout: float = 3.0) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def ws_connect(server: WebSocketServer | int, path: str = "/", **kwargs: Any) -> connect:
    """A ``websockets`` client for ``server`` (or a port on ``HOST``), with bounded
    timeouts, no keepalive and no compression unless ``kwargs`` say otherwise."""
    port = server if isinstance(server, int) else server.port
    options: dict[str, Any] = {
        "open_timeout": 3,
        "close_timeout": 2,
        "ping_interval": None,
        "compression": None,
        "proxy": None,
    }
    options.update(kwargs)
    return connect(f"ws://{HOST}:{port}{path}", **options)


async def recv(ws: ClientConnection, timeout: float = 2.0) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


def upgrade_request(path: str = "/", *extra: str, version: str = "13", host: str = HOST) -> bytes:
    """The bytes of an opening handshake request, with ``extra`` header lines."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        f"Sec-WebSocket-Version: {version}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_headers(lines: list[str]) -> dict[str, str]:
    """``Name: value`` lines as a dict keyed by lower-case name."""
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP response: ``(status, headers, body)``."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    return status, parse_headers(lines[1:]), body


async def raw_http(
    port: int, data: bytes, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes, parse the HTTP response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_response(response)


def parse_server_frames(data: bytes, *, strict: bool = False) -> list[tuple[int, bytes]]:
    """Parse unmasked server frames: ``[(opcode, payload), ...]``.

    ``strict``: assert that every frame is final, without RSV bits and unmasked,
    and that ``data`` ends where the last frame does (no partial frame).
    """
    frames = []
    pos = 0
    while len(data) - pos >= 2:
        first, second = data[pos], data[pos + 1]
        if strict:
            assert first & 0xF0 == 0x80, "server frames are final, without RSV bits"
            assert not second & 0x80, "server frames are unmasked"
        length = second & 0x7F
        pos += 2
        if length == 126:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        frames.append((first & 0x0F, data[pos : pos + length]))
        pos += length
    if strict:
        assert pos == len(data)
    return frames
