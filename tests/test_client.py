"""WebSocketClient through real sockets: identity, request, addresses, send, close.

Also the custom client types: ``client_class`` and ``client_factory`` (the
original's ClientInitializationStrategy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from wsutil import HOST, async_test, eventually, recv, ws_connect

from enjent import (
    ConnectionClosedError,
    HandshakeRejected,
    Request,
    WebSocketClient,
    WebSocketServer,
)


class Collected:
    """The clients a server accepted and the disconnections it reported."""

    def __init__(self, server: WebSocketServer) -> None:
        self.clients: list[Any] = []
        self.disconnected: list[tuple[Any, int, str]] = []
        self.errors: list[BaseException] = []
        server.on_connect(self.clients.append)
        server.on_disconnect(lambda c, code, reason: self.disconnected.append((c, code, reason)))
        server.on_error(lambda client, exc: self.errors.append(exc))


async def connected_client(
    server: WebSocketServer, collected: Collected, path: str = "/", **kwargs: Any
) -> tuple[ClientConnection, Any]:
    """Open a connection; return it and the server's client object for it."""
    count = len(collected.clients)
    ws = await ws_connect(server, path, **kwargs)
    await eventually(lambda: len(collected.clients) > count)
    return ws, collected.clients[count]


# ---------------------------------------------------------------- identity


@async_test
async def test_identity_and_request() -> None:
    server = WebSocketServer()
    collected = Collected(server)
    async with server.serve(HOST, 0):
        before = time.time()
        ws, client = await connected_client(
            server,
            collected,
            "/chat/room%201?user=ada&tag=a&tag=b&empty=",
            additional_headers={"Cookie": "session=abc; theme=dark", "X-Custom": "1"},
        )
        _, other = await connected_client(server, collected)
        async with ws:
            assert isinstance(client, WebSocketClient)
            assert client.id and other.id and client.id != other.id
            assert before - 1 <= client.connected_at <= time.time()
            request = client.request
            assert isinstance(request, Request)
            assert request.method == "GET"
            assert request.path == "/chat/room 1"
            assert request.query["user"] == "ada"
            assert request.query.get_all("tag") == ["a", "b"]
            assert request.query["empty"] == ""
            assert request.query_string == "user=ada&tag=a&tag=b&empty="
            assert request.headers["x-custom"] == "1"
            assert request.cookies == {"session": "abc", "theme": "dark"}
            assert client.subprotocol is None
            assert client.data is None
            assert client.is_open
            assert client.id in repr(client)


# ---------------------------------------------------------- remote_address


@pytest.mark.parametrize(
    "trusted, headers, expected",
    [
        ((), {}, HOST),
        ((), {"X-Forwarded-For": "203.0.113.7"}, HOST),  # untrusted peer: ignored
        ((), {"X-Real-Ip": "203.0.113.7"}, HOST),
        (("127.0.0.1",), {}, HOST),
        (("127.0.0.1",), {"X-Forwarded-For": "203.0.113.7"}, "203.0.113.7"),
        (("127.0.0.1",), {"X-Real-Ip": "203.0.113.8"}, "203.0.113.8"),
        # the rightmost address that is not itself a trusted proxy
        (
            ("127.0.0.0/8", "10.0.0.0/8"),
            {"X-Forwarded-For": "6.6.6.6, 1.2.3.4, 10.0.0.5"},
            "1.2.3.4",
        ),
        (("10.0.0.0/8",), {"X-Forwarded-For": "203.0.113.7"}, HOST),  # peer not trusted
    ],
)
@async_test
async def test_remote_address(
    trusted: tuple[str, ...], headers: dict[str, str], expected: str
) -> None:
    server = WebSocketServer(trusted_proxies=trusted)
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected, additional_headers=headers)
        async with ws:
            assert client.remote_address == expected
            assert client.request.remote_address[0] == HOST


# -------------------------------------------------------------------- send


@async_test
async def test_send_returns_true_then_false_once_closed() -> None:
    server = WebSocketServer()
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected)
        async with ws:
            assert client.send("text") is True
            assert client.send(b"bytes") is True
            assert client.send(bytearray(b"array")) is True
            assert client.send(memoryview(b"view")) is True
            assert [await recv(ws) for _ in range(4)] == ["text", b"bytes", b"array", b"view"]
            assert client.send("é" * 70_000) is True  # 64-bit length form
            assert await recv(ws) == "é" * 70_000
            with pytest.raises(TypeError):
                client.send(42)  # type: ignore[arg-type]
        await eventually(lambda: collected.disconnected)
        assert client.is_open is False
        assert client.send("late") is False
        await client.drain()  # returns at once on a closed client
        client.close()  # a no-op once closed


def test_an_unconnected_client() -> None:
    client = WebSocketClient(Request("GET", "/x?y=1", enjent_headers()))
    assert client.send("x") is False
    assert client.is_open is False
    assert client.remote_address is None
    client.close()
    with pytest.raises(ConnectionClosedError):
        client.drain()
    with pytest.raises(RuntimeError):
        client.join("room")
    client.leave("room")
    assert client.rooms == frozenset()


def enjent_headers() -> Any:
    from enjent import Headers

    return Headers([("Host", "x")])


@async_test
async def test_drain_waits_for_a_busy_client_to_read() -> None:
    server = WebSocketServer(write_limit=64 * 1024)
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected, max_size=None)
        async with ws:
            # far over write_limit, and more than the kernel takes in one send on
            # loopback: its send buffer alone may take 4 MiB at once (seen on Linux 6.18)
            size = 16 * 1024 * 1024
            assert client.send(b"x" * size) is True
            drained = client.drain()
            assert not drained.done()  # over the limit: drain waits for the peer to read
            received = await recv(ws, timeout=10)
            await asyncio.wait_for(drained, 5)
            assert len(received) == size
            assert client.send("after") is True  # not a slow consumer: it drained first
            assert await recv(ws) == "after"


# ------------------------------------------------------------------- close


@pytest.mark.parametrize(
    "args, code, reason",
    [((), 1000, ""), ((1001,), 1001, ""), ((4000, "custom"), 4000, "custom")],
)
@async_test
async def test_close_reaches_the_peer_and_on_disconnect(
    args: tuple[Any, ...], code: int, reason: str
) -> None:
    server = WebSocketServer()
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected)
        client.close(*args)
        assert client.is_open is False
        assert client.send("after close") is False
        await asyncio.wait_for(ws.wait_closed(), 3)
        assert (ws.close_code, ws.close_reason) == (code, reason)
        await eventually(lambda: collected.disconnected)
        await asyncio.sleep(0.05)
    assert collected.disconnected == [(client, code, reason)]


@async_test
async def test_close_with_an_unsendable_code_is_refused() -> None:
    server = WebSocketServer()
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected)
        async with ws:
            with pytest.raises(ValueError):
                client.close(1006)
            assert client.is_open
            long_reason = "x" * 200  # cut to fit a control frame
            client.close(4002, long_reason)
            await asyncio.wait_for(ws.wait_closed(), 3)
            assert ws.close_code == 4002
            assert long_reason.startswith(ws.close_reason)
            assert len(ws.close_reason.encode()) == 123


# ------------------------------------------------------------------- rooms


@async_test
async def test_join_leave_and_rooms() -> None:
    server = WebSocketServer()
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected)
        async with ws:
            assert client.rooms == frozenset()
            client.join("a")
            client.join("b")
            client.join("a")
            assert client.rooms == {"a", "b"}
            assert client in server.room("a")
            client.leave("a")
            client.leave("never-joined")
            assert client.rooms == {"b"}
            assert client not in server.room("a")
        await eventually(lambda: collected.disconnected)
        assert server.rooms == []
        assert len(server.room("b")) == 0
        client.join("c")  # a disconnected client cannot join (it would never leave)
        assert len(server.room("c")) == 0
        assert server.rooms == []


# ----------------------------------------------------- custom client types


class UserClient(WebSocketClient):
    __slots__ = ("user",)

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.user = request.query.get("user", "anonymous")


@async_test
async def test_client_class() -> None:
    server = WebSocketServer(client_class=UserClient)
    collected = Collected(server)

    @server.on_message
    def greet(client: UserClient, message: str | bytes) -> None:
        client.send(f"{client.user}: {message}")

    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected, "/?user=ada")
        async with ws:
            assert type(client) is UserClient
            assert client.user == "ada"
            assert not hasattr(client, "__dict__")  # __slots__ all the way down
            await ws.send("hi")
            assert await recv(ws) == "ada: hi"
            assert server.get_client(client.id) is client


@async_test
async def test_client_factory_builds_from_the_request() -> None:
    built: list[Request] = []

    def factory(request: Request) -> WebSocketClient:
        built.append(request)
        if request.query.get("user") == "banned":
            raise HandshakeRejected(403, "banned")
        return UserClient(request)

    server = WebSocketServer(client_factory=factory)
    collected = Collected(server)
    async with server.serve(HOST, 0):
        ws, client = await connected_client(server, collected, "/?user=grace")
        async with ws:
            assert isinstance(client, UserClient)
            assert client.user == "grace"
            assert client.id
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(server, "/?user=banned")
            assert info.value.response.status_code == 403
    assert [request.query["user"] for request in built] == ["grace", "banned"]
    assert len(collected.clients) == 1


@pytest.mark.parametrize("factory", [lambda request: object(), lambda request: 1 / 0])
@async_test
async def test_a_broken_client_factory_is_a_500(factory: Callable[[Request], Any]) -> None:
    server = WebSocketServer(client_factory=factory)
    collected = Collected(server)
    async with server.serve(HOST, 0):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(server)
        assert info.value.response.status_code == 500
        assert server.client_count == 0
    assert len(collected.errors) == 1
    assert collected.clients == []
