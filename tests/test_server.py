"""WebSocketServer through real sockets on 127.0.0.1 (the asyncio server layer).

Lifecycle, handlers, the handshake policy, keepalive, limits, slow consumers
and graceful stop, driven by the ``websockets`` client and, where a client
must misbehave more than it can, by raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from wsutil import (
    HOST,
    KEY,
    async_test,
    eventually,
    parse_server_frames,
    raw_http,
    recv,
    upgrade_request,
    ws_connect,
)

import enjent
from enjent import (
    Accept,
    CloseCode,
    EnjentError,
    HandshakeRejected,
    Request,
    Response,
    WebSocketClient,
    WebSocketNegotiationError,
    WebSocketServer,
    WebSocketServerError,
)
from enjent.frames import Opcode, encode_frame

# ------------------------------------------------------------------ helpers


both_loops = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


async def closed_with(ws: ClientConnection, timeout: float = 3.0) -> tuple[int | None, str | None]:
    """Wait for the connection to close; return the close code and reason received."""
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code, ws.close_reason


async def raw_websocket(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    """A raw socket that completes the opening handshake, then does what the test says."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    await loop.sock_sendall(sock, upgrade_request())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 2)
        assert chunk, "the server closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


async def read_until_eof(sock: socket.socket, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def close_code_of(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


class Recorder:
    """Registers one handler for each event of ``server`` and records the calls."""

    def __init__(self, server: WebSocketServer) -> None:
        self.connected: list[WebSocketClient] = []
        self.messages: list[tuple[WebSocketClient, str | bytes]] = []
        self.disconnected: list[tuple[WebSocketClient, int, str]] = []
        self.errors: list[tuple[WebSocketClient | None, BaseException]] = []
        server.on_connect(self.connected.append)
        server.on_message(lambda client, message: self.messages.append((client, message)))
        server.on_disconnect(lambda c, code, reason: self.disconnected.append((c, code, reason)))
        server.on_error(lambda client, exc: self.errors.append((client, exc)))


def make_server(**options: Any) -> tuple[WebSocketServer, Recorder]:
    server = WebSocketServer(**options)
    return server, Recorder(server)


def echo(server: WebSocketServer) -> None:
    server.on_message(lambda client, message: client.send(message))


# -------------------------------------------------------------- public API


def test_public_names_and_exception_tree() -> None:
    for name in ("WebSocketServer", "WebSocketClient", "Room", "Request", "CloseCode"):
        assert hasattr(enjent, name)
    assert issubclass(WebSocketServerError, EnjentError)
    assert issubclass(WebSocketNegotiationError, EnjentError)
    assert issubclass(HandshakeRejected, WebSocketNegotiationError)
    assert CloseCode.GOING_AWAY == 1001


@pytest.mark.parametrize(
    "options",
    [
        {"max_message_size": 0},
        {"write_limit": -1},
        {"max_connections": 0},
        {"ping_timeout": 0},
        {"sweep_interval": 0},
        {"ping_interval": -1.0},
    ],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WebSocketServer(**options)


def test_client_class_must_be_a_websocket_client() -> None:
    with pytest.raises(TypeError):
        WebSocketServer(client_class=object)  # type: ignore[arg-type]


# --------------------------------------------------------------- lifecycle


@both_loops
@async_test
async def test_start_stop_and_port(loop_kind: str) -> None:
    server, events = make_server()
    echo(server)
    await server.start(HOST, 0)
    port = server.port
    try:
        assert port > 0
        assert server.sockets[0].getsockname() == (HOST, port)
        async with ws_connect(server) as ws:
            await ws.send("hello")
            assert await recv(ws) == "hello"
            await ws.send(b"\x00\x01")
            assert await recv(ws) == b"\x00\x01"
    finally:
        await server.stop()
    with pytest.raises(WebSocketServerError):
        _ = server.port
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)
    assert len(events.connected) == 1


@async_test
async def test_serve_context_manager_stops_listening() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0) as served:
        assert served is server
        port = server.port
        async with ws_connect(server):
            pass
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)


@async_test
async def test_start_twice_is_an_error() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0):
        with pytest.raises(WebSocketServerError):
            await server.start(HOST, 0)


@async_test
async def test_port_in_use_names_the_address() -> None:
    first = WebSocketServer()
    async with first.serve(HOST, 0):
        second = WebSocketServer()
        with pytest.raises(WebSocketServerError) as info:
            await second.start(HOST, first.port)
        assert f"{HOST}:{first.port}" in str(info.value)
        assert isinstance(info.value, EnjentError)


RUN_SCRIPT = textwrap.dedent(
    """
    import sys
    from enjent import WebSocketServer

    server = WebSocketServer(close_timeout=2)

    @server.on_disconnect
    def gone(client, code, reason):
        print("disconnect", code, flush=True)

    server.run("127.0.0.1", int(sys.argv[1]))
    print("run returned", flush=True)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@async_test
async def test_run_blocks_until_signal_then_stops_gracefully(signum: int, free_port: int) -> None:
    port = free_port
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                ws = await connect(
                    f"ws://{HOST}:{port}/", open_timeout=2, proxy=None, ping_interval=None
                )
                break
            except OSError:
                assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the server did not start"
                await asyncio.sleep(0.05)
        process.send_signal(signum)
        assert await closed_with(ws) == (1001, "server shutting down")
        returncode = await asyncio.to_thread(process.wait, 5)
        out = process.stdout.read().decode()  # type: ignore[union-attr]
        assert returncode == 0
        assert "disconnect 1001" in out
        assert "run returned" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_run_rejects_bad_workers() -> None:
    with pytest.raises(ValueError):
        WebSocketServer().run(HOST, 0, workers=0)


# ---------------------------------------------------------------- handlers


@pytest.mark.parametrize("use_async", [False, True])
@async_test
async def test_handlers_sync_or_async_get_their_arguments(use_async: bool) -> None:
    server = WebSocketServer()
    calls: list[tuple[Any, ...]] = []

    if use_async:

        @server.on_connect
        async def on_connect(client: WebSocketClient) -> None:
            await asyncio.sleep(0)
            calls.append(("connect", client))

        @server.on_message
        async def on_message(client: WebSocketClient, message: str | bytes) -> None:
            await asyncio.sleep(0)
            calls.append(("message", client, message))
            client.send(message)

        @server.on_disconnect
        async def on_disconnect(client: WebSocketClient, code: int, reason: str) -> None:
            calls.append(("disconnect", client, code, reason))

    else:

        @server.on_connect
        def on_connect(client: WebSocketClient) -> None:
            calls.append(("connect", client))

        @server.on_message
        def on_message(client: WebSocketClient, message: str | bytes) -> None:
            calls.append(("message", client, message))
            client.send(message)

        @server.on_disconnect
        def on_disconnect(client: WebSocketClient, code: int, reason: str) -> None:
            calls.append(("disconnect", client, code, reason))

    assert callable(on_connect) and callable(on_message)  # decorators return the handler
    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send("text")
            assert await recv(ws) == "text"
            await ws.send(b"bin")
            assert await recv(ws) == b"bin"
            await ws.close(1000, "bye")
        await eventually(lambda: len(calls) == 4)
    client = calls[0][1]
    assert isinstance(client, WebSocketClient)
    assert calls == [
        ("connect", client),
        ("message", client, "text"),
        ("message", client, b"bin"),
        ("disconnect", client, 1000, "bye"),
    ]


@async_test
async def test_several_handlers_run_in_registration_order() -> None:
    server = WebSocketServer()
    order: list[str] = []
    for event in ("connect", "message", "disconnect"):
        for index in range(3):
            register = getattr(server, f"on_{event}")
            register(lambda *args, tag=f"{event}{index}": order.append(tag))
    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send("x")
            await asyncio.sleep(0.05)
        await eventually(lambda: len(order) == 9)
    assert order == [
        f"{event}{i}" for event in ("connect", "message", "disconnect") for i in range(3)
    ]


@pytest.mark.parametrize("use_async", [False, True])
@async_test
async def test_handler_exceptions_reach_on_error_and_are_logged(
    use_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server, events = make_server()
    boom = RuntimeError("boom")

    if use_async:

        @server.on_message
        async def failing(client: WebSocketClient, message: str | bytes) -> None:
            await asyncio.sleep(0)
            if message == "fail":
                raise boom

    else:

        @server.on_message
        def failing(client: WebSocketClient, message: str | bytes) -> None:
            if message == "fail":
                raise boom

    echo(server)  # a later handler still runs after a failing one
    caplog.set_level(logging.ERROR, logger="enjent")
    async with server.serve(HOST, 0), ws_connect(server) as ws, ws_connect(server) as other:
        await ws.send("fail")
        assert await recv(ws) == "fail"
        await eventually(lambda: events.errors)
        # the connection and the other client are unharmed
        await ws.send("again")
        assert await recv(ws) == "again"
        await other.send("other")
        assert await recv(other) == "other"
    assert events.errors[0] == (events.connected[0], boom)
    assert len(events.errors) == 1
    assert any(record.exc_info and record.exc_info[1] is boom for record in caplog.records)
    assert server.stats["handler_errors"] == 1


@async_test
async def test_exceptions_in_connect_and_disconnect_handlers_are_reported() -> None:
    server, events = make_server()

    @server.on_connect
    def bad_connect(client: WebSocketClient) -> None:
        raise ValueError("connect")

    @server.on_disconnect
    async def bad_disconnect(client: WebSocketClient, code: int, reason: str) -> None:
        raise KeyError("disconnect")

    echo(server)
    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send("still works")
            assert await recv(ws) == "still works"
        await eventually(lambda: len(events.errors) == 2)
    assert [type(exc) for _, exc in events.errors] == [ValueError, KeyError]
    assert all(client is events.connected[0] for client, _ in events.errors)


@pytest.mark.parametrize("use_async", [False, True])
@async_test
async def test_failing_on_error_handler_does_not_break_anything(use_async: bool) -> None:
    server = WebSocketServer()
    seen: list[BaseException] = []
    bad_calls: list[BaseException] = []

    @server.on_message
    def failing(client: WebSocketClient, message: str | bytes) -> None:
        client.send(message)
        raise RuntimeError("handler")

    if use_async:

        @server.on_error
        async def bad_on_error(client: WebSocketClient | None, exc: BaseException) -> None:
            bad_calls.append(exc)
            raise RuntimeError("on_error itself")  # must not be reported to on_error again

    else:

        @server.on_error
        def bad_on_error(client: WebSocketClient | None, exc: BaseException) -> None:
            bad_calls.append(exc)
            raise RuntimeError("on_error itself")

    server.on_error(lambda client, exc: seen.append(exc))
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        for text in ("a", "b"):
            await ws.send(text)
            assert await recv(ws) == text
        await asyncio.sleep(0.1)
    assert [str(exc) for exc in seen] == ["handler", "handler"]
    assert [str(exc) for exc in bad_calls] == ["handler", "handler"]
    assert server.stats["handler_errors"] == 2


@async_test
async def test_exception_in_handshake_hook_is_a_500_and_reaches_on_error() -> None:
    server, events = make_server()

    @server.on_handshake
    def broken(request: Request) -> None:
        raise ZeroDivisionError

    async with server.serve(HOST, 0):
        status, _, _ = await raw_http(server.port, upgrade_request())
        assert status == 500
        with pytest.raises(InvalidStatus):
            await ws_connect(server)
        assert server.client_count == 0
    assert len(events.errors) == 2
    assert events.errors[0][0] is None
    assert isinstance(events.errors[0][1], ZeroDivisionError)


# --------------------------------------------------------------- handshake


@pytest.mark.parametrize(
    "answer, status",
    [
        (Response(401, "who are you?"), 401),
        (Response(403, b"go away"), 403),
    ],
)
@async_test
async def test_hook_response_refuses(answer: Response, status: int) -> None:
    server, events = make_server()
    requests: list[Request] = []

    @server.on_handshake
    def gate(request: Request) -> Response | None:
        requests.append(request)
        return None if request.query.get("token") == "secret" else answer

    async with server.serve(HOST, 0):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(server, "/room?token=wrong")
        assert info.value.response.status_code == status
        body = answer.body.encode() if isinstance(answer.body, str) else answer.body
        assert info.value.response.body == body
        async with ws_connect(server, "/room?token=secret"):
            await eventually(lambda: server.client_count == 1)
    assert isinstance(requests[0], Request)
    assert requests[0].path == "/room"
    assert len(events.connected) == 1
    assert server.stats["connections_accepted"] == 1


@async_test
async def test_hook_raising_handshake_rejected() -> None:
    server, events = make_server()

    @server.on_handshake
    def gate(request: Request) -> None:
        if "Authorization" not in request.headers:
            raise HandshakeRejected(401, "missing token")

    async with server.serve(HOST, 0):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(server)
        assert info.value.response.status_code == 401
        assert b"missing token" in info.value.response.body
        async with ws_connect(server, additional_headers={"Authorization": "Bearer x"}):
            pass
    assert len(events.connected) == 1
    assert server.stats["handshakes_refused"] == 1


@async_test
async def test_hook_response_serves_a_page_to_plain_http() -> None:
    server = WebSocketServer()

    @server.on_handshake
    def page(request: Request) -> Response | None:
        if request.path == "/" and "upgrade" not in request.headers.get_tokens("Connection"):
            return Response(200, "<h1>hi</h1>", content_type="text/html; charset=utf-8")
        return None

    async with server.serve(HOST, 0):
        status, headers, body = await raw_http(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"<h1>hi</h1>")
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-length"] == str(len(body))
        async with ws_connect(server):  # an upgrade to / still works
            pass


@async_test
async def test_hook_accept_chooses_subprotocol_data_and_headers() -> None:
    server, events = make_server(subprotocols=["chat.v2", "chat.v1"])

    @server.on_handshake
    def choose(request: Request) -> Accept:
        return Accept(subprotocol="chat.v1", data={"user": "ada"}, headers=[("X-Extra", "yes")])

    async with (
        server.serve(HOST, 0),
        ws_connect(server, subprotocols=["chat.v1", "chat.v2"]) as ws,
    ):
        assert ws.subprotocol == "chat.v1"
        assert ws.response.headers["X-Extra"] == "yes"
        await eventually(lambda: events.connected)
    client = events.connected[0]
    assert client.subprotocol == "chat.v1"
    assert client.data == {"user": "ada"}


@async_test
async def test_hook_accept_with_a_subprotocol_not_offered_is_400() -> None:
    server = WebSocketServer()
    server.on_handshake(lambda request: Accept(subprotocol="nope"))
    async with server.serve(HOST, 0):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(server, subprotocols=["chat"])
        assert info.value.response.status_code == 400


@async_test
async def test_hook_returning_a_wrong_type_is_a_500() -> None:
    server, events = make_server()
    server.on_handshake(lambda request: "yes")
    async with server.serve(HOST, 0):
        with pytest.raises(InvalidStatus) as info:
            await ws_connect(server)
        assert info.value.response.status_code == 500
    assert isinstance(events.errors[0][1], TypeError)


@pytest.mark.parametrize(
    "offered, expected",
    [
        (["chat.v1", "chat.v2"], "chat.v2"),  # server preference wins
        (["chat.v1"], "chat.v1"),
        (["other"], None),
        (None, None),
    ],
)
@async_test
async def test_subprotocol_follows_server_preference(
    offered: list[str] | None, expected: str | None
) -> None:
    server, events = make_server(subprotocols=["chat.v2", "chat.v1"])
    async with server.serve(HOST, 0), ws_connect(server, subprotocols=offered) as ws:
        assert ws.subprotocol == expected
        await eventually(lambda: events.connected)
    assert events.connected[0].subprotocol == expected


@async_test
async def test_allowed_origins() -> None:
    server, events = make_server(allowed_origins=["https://good.example"])
    async with server.serve(HOST, 0):
        async with ws_connect(server, origin="https://good.example"):
            pass
        for origin in ("https://evil.example", None):
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(server, origin=origin)
            assert info.value.response.status_code == 403
    assert len(events.connected) == 1


@async_test
async def test_plain_http_gets_426() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0):
        status, headers, _ = await raw_http(server.port, b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 426
    assert headers["upgrade"].lower() == "websocket"


@async_test
async def test_health_path() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0), ws_connect(server), ws_connect(server):
        await eventually(lambda: server.client_count == 2)
        status, headers, body = await raw_http(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == 200
    assert headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health == {"status": "ok", "clients": 2}  # nothing internal by default


@async_test
async def test_health_detail_shows_workers_and_counters() -> None:
    server = WebSocketServer(health_detail=True)
    async with server.serve(HOST, 0), ws_connect(server):
        await eventually(lambda: server.client_count == 1)
        _, _, body = await raw_http(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    health = json.loads(body)
    assert health["clients"] == 1
    assert health["workers"][0]["pid"] == os.getpid()
    assert health["stats"]["connections_accepted"] == 1


@async_test
async def test_health_path_can_be_disabled() -> None:
    server = WebSocketServer(health_path=None)
    async with server.serve(HOST, 0):
        status, _, _ = await raw_http(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 426


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"HELLO\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET noslash HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (upgrade_request().replace(b"Host: 127.0.0.1\r\n", b""), 400),
        (upgrade_request().replace(f"Sec-WebSocket-Key: {KEY}".encode(), b"X: y"), 400),
        (upgrade_request().replace(KEY.encode(), b"short"), 400),
        (upgrade_request().replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400),
        (upgrade_request(version="8"), 426),
    ],
)
@async_test
async def test_malformed_handshakes(request_bytes: bytes, status: int) -> None:
    server, events = make_server()
    async with server.serve(HOST, 0):
        got, headers, _ = await raw_http(server.port, request_bytes)
        # the server is still fine
        async with ws_connect(server):
            pass
    assert got == status
    assert headers.get("connection") == "close"
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    assert len(events.connected) == 1


@async_test
async def test_max_connections_503() -> None:
    server, events = make_server(max_connections=2)
    async with server.serve(HOST, 0):
        async with ws_connect(server), ws_connect(server):
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(server)
            assert info.value.response.status_code == 503
            assert info.value.response.headers["Retry-After"] == "5"
        await eventually(lambda: server.client_count == 0)
        async with ws_connect(server):  # room again once the others left
            pass
    assert len(events.connected) == 3


@async_test
async def test_pipelined_frames_after_the_handshake_are_processed() -> None:
    server, events = make_server()
    async with server.serve(HOST, 0):
        _reader, writer = await asyncio.open_connection(HOST, server.port)
        # masked "hi" (mask 0) right behind the request, in one write
        writer.write(upgrade_request() + b"\x81\x82\x00\x00\x00\x00hi")
        await eventually(lambda: events.messages)
        writer.close()
    assert events.messages[0][1] == "hi"


# ---------------------------------------------------------------- keepalive


@both_loops
@async_test
async def test_keepalive_closes_a_silent_client_with_1011(loop_kind: str) -> None:
    server, events = make_server(
        ping_interval=0.2, ping_timeout=0.3, sweep_interval=0.05, close_timeout=0.5
    )
    async with server.serve(HOST, 0):
        silent = await raw_websocket(server.port)
        async with ws_connect(server) as healthy:  # answers pings automatically
            started = time.monotonic()
            await eventually(lambda: events.disconnected, timeout=3)
            elapsed = time.monotonic() - started
            frames = parse_server_frames(await read_until_eof(silent))
            silent.close()
            assert [opcode for opcode, _ in frames][:1] == [0x9]  # ping first
            assert frames[-1][0] == 0x8
            assert close_code_of(frames[-1][1]) == 1011
            await asyncio.sleep(0.6)  # well past ping_interval + ping_timeout
            await healthy.send("still here")
            assert healthy.state.name == "OPEN"
    assert 0.4 < elapsed < 2.0
    assert len(events.disconnected) == 2
    client, code, _ = events.disconnected[0]
    assert client is events.connected[0]
    assert code == 1011
    assert server.stats["keepalive_timeouts"] == 1


@async_test
async def test_keepalive_disabled_leaves_silent_clients_alone() -> None:
    server, events = make_server(ping_interval=None, sweep_interval=0.05)
    async with server.serve(HOST, 0):
        silent = await raw_websocket(server.port)
        await asyncio.sleep(0.5)
        assert server.client_count == 1
        assert events.disconnected == []
        silent.close()


# -------------------------------------------------------------------- limits


@async_test
async def test_max_message_size_closes_with_1009() -> None:
    server, events = make_server(max_message_size=1024)
    echo(server)
    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send("x" * 1024)
            assert await recv(ws) == "x" * 1024
            await ws.send("x" * 1025)
            code, _ = await closed_with(ws)
        await eventually(lambda: events.disconnected)
    assert code == 1009
    assert events.disconnected[0][1] == 1009
    assert [message for _, message in events.messages] == ["x" * 1024]


@both_loops
@async_test
async def test_handshake_timeout_drops_a_slowloris_client(loop_kind: str) -> None:
    server, events = make_server(handshake_timeout=0.3, sweep_interval=0.05)
    async with server.serve(HOST, 0):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        started = time.monotonic()
        request = upgrade_request()
        dropped = False
        for index in range(60):  # one byte every 50 ms: ~3 s if never dropped
            try:
                writer.write(request[index : index + 1])
                await writer.drain()
                data = await asyncio.wait_for(reader.read(100), 0.05)
            except TimeoutError:
                continue
            except ConnectionError:
                dropped = True
                break
            if data == b"":
                dropped = True
                break
        elapsed = time.monotonic() - started
        writer.close()
        assert dropped
        assert 0.25 < elapsed < 1.5
        assert server.stats["handshake_timeouts"] == 1
        async with ws_connect(server):  # others still get in
            pass
    assert len(events.connected) == 1


@both_loops
@async_test
async def test_slow_consumer_is_closed_and_memory_stays_bounded(loop_kind: str) -> None:
    server, events = make_server(write_limit=64 * 1024, close_timeout=0.5, sweep_interval=0.05)
    process = psutil.Process(os.getpid())
    payload = os.urandom(16 * 1024)
    rounds = 4000  # 64 MiB per client: more than the allowed growth if unbounded
    async with server.serve(HOST, 0):
        non_reader = await raw_websocket(server.port, rcvbuf=4096)
        async with ws_connect(server, max_queue=None) as reader:
            await eventually(lambda: server.client_count == 2)
            normal = next(c for c in server.clients if c is not events.connected[0])
            received = 0

            async def consume() -> None:
                nonlocal received
                async for _ in reader:
                    received += 1

            consumer = asyncio.create_task(consume())
            rss_before = process.memory_info().rss
            refused = 0
            for _ in range(rounds):
                if server.broadcast(payload) < 2:
                    refused += 1
                await normal.drain()  # pace on the reading client only
            growth = process.memory_info().rss - rss_before
            assert growth < 50 * 1024 * 1024, f"RSS grew by {growth >> 20} MiB"
            await eventually(lambda: events.disconnected, timeout=3)
            # the normal client still gets messages promptly
            started = time.monotonic()
            server.broadcast(b"last")
            await eventually(lambda: received == rounds + 1, timeout=3)
            latency = time.monotonic() - started
            consumer.cancel()
        non_reader.close()
    assert refused > rounds / 2
    client, code, _ = events.disconnected[0]
    assert client is events.connected[0]
    assert code == 3008
    assert server.stats["slow_consumers_closed"] == 1
    assert latency < 1.0


@async_test
async def test_one_answer_bigger_than_the_write_limit_is_sent() -> None:
    """The limit is on what is already unsent: with nothing queued, an echo of a
    message over ``write_limit`` (800 KB, under the 1 MiB message limit, against the
    512 KiB write limit: both defaults) goes out (memory per client: about the limit
    plus one message); a second answer in the same read, over the limit, is refused
    (3008)."""
    server = WebSocketServer()
    echo(server)
    big = os.urandom(800_000)
    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send(big)
            assert await recv(ws, timeout=5) == big
        assert server.stats["slow_consumers_closed"] == 0
    twice = WebSocketServer()
    sent: list[bool] = []

    @twice.on_message
    def answer_twice(client: WebSocketClient, message: str | bytes) -> None:
        sent.extend((client.send(big), client.send(big)))

    async with twice.serve(HOST, 0), ws_connect(twice) as ws:
        await ws.send("twice")
        assert await recv(ws, timeout=5) == big
        assert await closed_with(ws) == (3008, "slow consumer")
    assert sent == [True, False]


@both_loops
@async_test
async def test_close_timeout_aborts_a_peer_that_never_answers_the_close(loop_kind: str) -> None:
    server, events = make_server(close_timeout=0.3, sweep_interval=0.05)
    async with server.serve(HOST, 0):
        sock = await raw_websocket(server.port)
        await eventually(lambda: server.client_count == 1)
        started = time.monotonic()
        server.clients[0].close(4000, "bye")
        await eventually(lambda: events.disconnected)
        elapsed = time.monotonic() - started
        frames = parse_server_frames(await read_until_eof(sock))
        sock.close()
    assert 0.25 < elapsed < 1.5
    assert frames[-1][0] == 0x8
    assert close_code_of(frames[-1][1]) == 4000
    assert events.disconnected[0][1] == 4000


# ------------------------------------------------------------ graceful stop


@both_loops
@async_test
async def test_graceful_stop_sends_1001_to_every_client(loop_kind: str) -> None:
    server, events = make_server(close_timeout=2)
    await server.start(HOST, 0)
    clients = [await ws_connect(server) for _ in range(3)]
    await eventually(lambda: server.client_count == 3)
    started = time.monotonic()
    await server.stop()
    elapsed = time.monotonic() - started
    for ws in clients:
        assert await closed_with(ws) == (1001, "server shutting down")
    assert elapsed < 1.0  # every client answered: no need to wait close_timeout
    assert sorted(code for _, code, _ in events.disconnected) == [1001, 1001, 1001]
    assert server.client_count == 0


@both_loops
@async_test
async def test_stop_aborts_clients_that_do_not_answer_within_close_timeout(loop_kind: str) -> None:
    server, events = make_server(close_timeout=0.3)
    await server.start(HOST, 0)
    silent = await raw_websocket(server.port)
    async with ws_connect(server) as polite:
        await eventually(lambda: server.client_count == 2)
        started = time.monotonic()
        await server.stop()
        elapsed = time.monotonic() - started
        assert await closed_with(polite) == (1001, "server shutting down")
    frames = parse_server_frames(await read_until_eof(silent))
    silent.close()
    assert 0.25 < elapsed < 1.5
    assert frames and frames[-1][0] == 0x8 and close_code_of(frames[-1][1]) == 1001
    assert len(events.disconnected) == 2


@async_test
async def test_stop_closes_connections_still_in_the_handshake() -> None:
    server = WebSocketServer(close_timeout=1)
    await server.start(HOST, 0)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(b"GET / HTTP/1.1\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    await server.stop()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


@async_test
async def test_connection_count_covers_handshakes_clients_and_closings() -> None:
    # a client's connection is registered once (in the hub); handshakes and
    # closings that outlive their client are counted and swept as well
    server = WebSocketServer(ping_interval=None, close_timeout=0.3, sweep_interval=0.1)
    async with server.serve(HOST, 0):
        _r, handshaking = await asyncio.open_connection(HOST, server.port)
        handshaking.write(b"GET / HTTP/1.1\r\n")
        await eventually(lambda: server.connection_count == 1)
        async with ws_connect(server):
            await eventually(lambda: (server.connection_count, server.client_count) == (2, 1))
        await eventually(lambda: (server.connection_count, server.client_count) == (1, 0))
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(upgrade_request())
        await reader.readuntil(b"\r\n\r\n")
        await eventually(lambda: (server.connection_count, server.client_count) == (2, 1))
        # close handshake from the client, whose socket then stays open: the
        # server half-closes, the client is gone, the connection lingers
        writer.write(encode_frame(8, (1000).to_bytes(2, "big"), mask=os.urandom(4)))
        frames = parse_server_frames(await asyncio.wait_for(reader.read(), 2))
        assert [opcode for opcode, _ in frames] == [8]
        assert server.client_count == 0
        assert server.connection_count == 2
        # the sweep aborts it after close_timeout, and the stalled handshake
        # after handshake_timeout (10 s) is not due yet
        await eventually(lambda: server.connection_count == 1, timeout=3)
        writer.close()
        handshaking.close()
        await eventually(lambda: server.connection_count == 0)


# -------------------------------------------------- disconnect, close codes


@async_test
async def test_on_disconnect_once_with_1000_on_normal_close() -> None:
    server, events = make_server()
    async with server.serve(HOST, 0):
        async with ws_connect(server):
            pass
        await eventually(lambda: events.disconnected)
        await asyncio.sleep(0.1)
    assert [(c, code) for c, code, _ in events.disconnected] == [(events.connected[0], 1000)]


@both_loops
@async_test
async def test_on_disconnect_once_with_1006_on_tcp_drop(loop_kind: str) -> None:
    server, events = make_server()
    async with server.serve(HOST, 0):
        ws = await ws_connect(server)
        await eventually(lambda: server.client_count == 1)
        ws.transport.abort()
        await eventually(lambda: events.disconnected)
        await asyncio.sleep(0.1)
        assert server.client_count == 0
    assert [(c, code) for c, code, _ in events.disconnected] == [(events.connected[0], 1006)]


@async_test
async def test_client_close_reaches_the_peer_and_on_disconnect() -> None:
    server, events = make_server()

    @server.on_message
    def close_on_request(client: WebSocketClient, message: str | bytes) -> None:
        if message == "close me":
            client.close(4001, "as requested")

    async with server.serve(HOST, 0):
        async with ws_connect(server) as ws:
            await ws.send("close me")
            assert await closed_with(ws) == (4001, "as requested")
        await eventually(lambda: events.disconnected)
    assert events.disconnected == [(events.connected[0], 4001, "as requested")]


@async_test
async def test_protocol_error_closes_with_1002_without_harming_others() -> None:
    server, events = make_server()
    echo(server)
    async with server.serve(HOST, 0), ws_connect(server) as other:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(upgrade_request())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x81\x02hi")  # unmasked client frame: RFC 6455 §5.1
        frames = parse_server_frames(await asyncio.wait_for(reader.read(), 2))
        writer.close()
        await other.send("ok")
        assert await recv(other) == "ok"
    assert close_code_of(frames[-1][1]) == 1002
    assert sorted(code for _, code, _ in events.disconnected) == [1000, 1002]


# --------------------------------------------- broadcast, send, client list


@async_test
async def test_broadcast_send_get_client_and_counts() -> None:
    server, events = make_server()
    async with server.serve(HOST, 0):
        assert server.client_count == 0
        assert server.clients == []
        async with ws_connect(server) as a, ws_connect(server) as b, ws_connect(server) as c:
            await eventually(lambda: server.client_count == 3)
            first, second, third = events.connected
            assert {client.id for client in server.clients} == {first.id, second.id, third.id}
            assert len({first.id, second.id, third.id}) == 3
            assert server.get_client(second.id) is second
            assert server.get_client("no-such-id") is None

            assert server.broadcast("all") == 3
            for ws in (a, b, c):
                assert await recv(ws) == "all"
            assert server.broadcast(b"not b", exclude=second) == 2
            assert await recv(a) == b"not b"
            assert await recv(c) == b"not b"

            assert server.send(second.id, "just b") is True
            assert await recv(b) == "just b"
            assert server.send("no-such-id", "x") is False

            await c.close()
            await eventually(lambda: server.client_count == 2)
            assert server.get_client(third.id) is None
            assert server.send(third.id, "gone") is False
            assert server.broadcast("two left") == 2
            assert await recv(a) == "two left"
            assert await recv(b) == "two left"


def test_broadcast_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        WebSocketServer().broadcast(42)  # type: ignore[arg-type]


@async_test
async def test_stop_from_inside_a_handler_does_not_wait_on_itself() -> None:
    server = WebSocketServer(close_timeout=2)
    after_stop: list[float] = []

    @server.on_message
    async def shutdown(client: WebSocketClient, message: str | bytes) -> None:
        started = time.monotonic()
        await server.stop()
        await asyncio.sleep(0)  # the handler's task is not cancelled by stop()
        after_stop.append(time.monotonic() - started)

    await server.start(HOST, 0)
    async with ws_connect(server) as ws:
        await ws.send("shutdown")
        assert await closed_with(ws) == (1001, "server shutting down")
    await eventually(lambda: after_stop)
    assert after_stop[0] < 1.0  # not close_timeout: stop() did not wait for its own task
    await server.start(HOST, 0)  # stopped for good: it can start again
    await server.stop()


@async_test
async def test_on_connect_may_close_at_once() -> None:
    server, events = make_server()
    server.on_connect(lambda client: client.close(4003, "not today"))
    async with server.serve(HOST, 0):
        ws = await ws_connect(server)
        assert await closed_with(ws) == (4003, "not today")
        await eventually(lambda: events.disconnected)
    assert events.disconnected == [(events.connected[0], 4003, "not today")]


@async_test
async def test_pings_fragments_and_large_messages_from_the_client() -> None:
    server = WebSocketServer()
    echo(server)
    control: list[object] = []
    server.on_control_frame(lambda client, event: control.append(event))
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 2)
        await ws.send(["frag", "men", "ted"])
        assert await recv(ws) == "fragmented"
        big = os.urandom(300_000)  # many reads on the server side
        await ws.send(big)
        assert await recv(ws) == big
    assert control == [enjent.Ping(b"are you there")]


@async_test
async def test_large_messages_pipelined_on_two_connections_come_back_whole() -> None:
    """Large frames are read into their own buffers (and, once a connection's frames
    are large, each read into one of that size) while the other reads share one
    buffer: two clients pipelining big and small messages of changing sizes each
    get every one of their own back, byte for byte, in order."""
    # (a write limit above the largest echo: slow consumers are not what is tested)
    server = WebSocketServer(max_message_size=2 << 20, write_limit=8 << 20)
    echo(server)
    rng = random.Random(18)
    sizes = [300_000, 300_000, 20, 262_144, 262_144, 70_000, 1_500_000, 5, 131_072, 400_000]

    async def client(seed: int) -> None:
        messages: list[str | bytes] = [rng.randbytes(size) for size in sizes]
        messages.insert(3, "ünïcödé " * 40_000)  # text, checked as it arrives
        async with ws_connect(server, max_size=4 << 20, compression=None) as ws:

            async def send_all() -> None:  # sent without waiting for the answers
                for message in messages:
                    await ws.send(message)

            sending = asyncio.ensure_future(send_all())
            for message in messages:
                assert await recv(ws, timeout=10) == message
            await sending

    async with server.serve(HOST, 0):
        await asyncio.wait_for(asyncio.gather(client(1), client(2)), 30)


@async_test
async def test_a_large_frame_cut_by_a_pause_is_read_on_into_its_buffer() -> None:
    """A client that sent large frames has its next read go to a buffer of that size;
    when that read ends inside a frame (the client paused), the frame is read on
    into that same buffer; smaller frames after it go back to the shared one. Every
    echo comes back whole, in order."""
    server = WebSocketServer(max_message_size=2 << 20, write_limit=8 << 20)
    echo(server)
    rng = random.Random(6455)
    payloads = [rng.randbytes(300_000) for _ in range(3)] + [b"small", rng.randbytes(200_000)]
    frames = [encode_frame(Opcode.BINARY, p, mask=b"\x01\x02\x03\x04") for p in payloads]
    async with server.serve(HOST, 0):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(upgrade_request())
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            received = bytearray()

            async def read_echoes(count: int) -> None:  # until these echoes are all here
                size = sum(len(encode_frame(Opcode.BINARY, p)) for p in payloads[:count])
                while len(received) < size:
                    received.extend(await asyncio.wait_for(reader.read(1 << 20), 5))

            writer.write(frames[0])  # the first large frame: the shared buffer, then its own
            await read_echoes(1)
            for frame in frames[1:3]:  # each cut in two by a pause
                writer.write(frame[:100_000])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(frame[100_000:])
            writer.write(frames[3] + frames[4])
            await read_echoes(5)
        finally:
            writer.close()
    assert parse_server_frames(bytes(received), strict=True) == [(2, p) for p in payloads]


@both_loops
@async_test
async def test_a_client_reading_large_frames_still_pauses_and_goes(loop_kind: str) -> None:
    """While large frames are read into their own buffers (the transport lent to a
    buffered reader), the connection still gets the transport's events: a client
    that sends large frames and reads nothing fills the server's buffers and is
    not read from (backpressure); one that hangs up mid-frame is reported gone
    (1006), one that shuts down its side mid-frame (EOF) too."""
    server, events = make_server(max_message_size=2 << 20, write_limit=1 << 20)
    echo(server)
    frame = encode_frame(Opcode.BINARY, os.urandom(300_000), mask=b"\x01\x02\x03\x04")
    loop = asyncio.get_running_loop()
    async with server.serve(HOST, 0):
        flooder = await raw_websocket(server.port, rcvbuf=4096)
        sending = asyncio.ensure_future(loop.sock_sendall(flooder, frame * 60))  # 18 MB
        await eventually(lambda: server.client_count == 1)
        connection = server.local_clients[0].connection
        await eventually(lambda: connection.paused, timeout=5)  # pause_writing reached it
        sending.cancel()
        flooder.close()
        await eventually(lambda: len(events.disconnected) == 1, timeout=5)
        for how in ("close", "shutdown"):
            sock = await raw_websocket(server.port)
            received = server.stats["messages_received"]
            await loop.sock_sendall(sock, frame + frame[:100_000])  # one whole, one not
            await eventually(
                lambda received=received: server.stats["messages_received"] > received, timeout=5
            )
            gone = len(events.disconnected)
            if how == "close":
                sock.close()
            else:
                sock.shutdown(socket.SHUT_WR)
            await eventually(lambda gone=gone: len(events.disconnected) > gone, timeout=5)
            sock.close()
    assert [code for _, code, _ in events.disconnected] == [1006, 1006, 1006]
    assert server.client_count == 0


@async_test
async def test_broadcast_to_compressed_and_uncompressed_clients() -> None:
    server = WebSocketServer()
    async with (
        server.serve(HOST, 0),
        ws_connect(server, compression="deflate") as deflated,
        ws_connect(server, compression=None) as plain,
    ):
        assert deflated.protocol.extensions  # permessage-deflate negotiated
        assert not plain.protocol.extensions
        await eventually(lambda: server.client_count == 2)
        text = "compressible " * 500
        assert server.broadcast(text) == 2
        assert server.broadcast(b"\x00" * 5000) == 2
        for ws in (deflated, plain):
            assert await recv(ws) == text
            assert await recv(ws) == b"\x00" * 5000


TUNING_PROBE = """
import ctypes
from enjent.server.running import tune_allocator
took = tune_allocator()
buffers = [bytearray(1 << 20) for _ in range(4)]  # four 1 MiB buffers, as large messages
with open("/proc/self/maps") as maps:
    heap = [line.split()[0] for line in maps if line.rstrip().endswith("[heap]")]
low, high = (int(part, 16) for part in heap[0].split("-"))
addresses = [ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)) for b in buffers]
print(took, sum(low <= address < high for address in addresses))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(("setting", "took"), [("", True), ("off", False)])
def test_run_tunes_the_allocator_so_large_buffers_come_from_the_heap(
    setting: str, took: bool
) -> None:
    """``tune_allocator()`` (called by ``run()`` and the supervisor): 1 MiB buffers
    no longer get an mmap each; ``ENJENT_MALLOC_TUNING=off`` leaves glibc's defaults."""
    env = {**os.environ, "ENJENT_MALLOC_TUNING": setting}
    completed = subprocess.run(
        [sys.executable, "-c", TUNING_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    reported, in_heap = completed.stdout.split()
    if reported == "False" and took:
        pytest.skip("not glibc: mallopt did not take")
    assert reported == str(took)
    # tuned, the buffers are in the heap; glibc's default maps each one apart
    assert int(in_heap) == (4 if took else 0), completed.stdout
