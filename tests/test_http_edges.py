"""HTTP and close edges that proxies, probes and clients hit (RFC 9112, RFC 6455).

Real sockets on 127.0.0.1: HEAD and HTTP/1.0 health probes, the absolute
form of the request target, the close handshake ending with FIN (never a
reset), the close frame echoed, ``max_message_size`` measured after
decompression, and ``allowed_origins`` with clients that send no Origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import zlib

import pytest
from wsutil import HOST, async_test, parse_response, raw_http, upgrade_request, ws_connect

from enjent import WebSocketServer
from enjent.frames import encode_close_payload


def masked(opcode: int, payload: bytes, *, rsv1: bool = False, fin: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 §5.3 requires)."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def echo_server(**options: object) -> WebSocketServer:
    server = WebSocketServer(**options)  # type: ignore[arg-type]
    server.on_message(lambda client, message: client.send(message))
    return server


def read_http_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {data!r}"
        data += chunk
    return data


# ----------------------------------------------------------- health probes


@async_test
async def test_head_on_the_health_path_has_no_body() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0):
        status, headers, body = await raw_http(
            server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        get_status, _, get_body = await raw_http(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert (status, body) == (200, b"")
    assert headers["content-type"] == "application/json"
    assert get_status == 200 and json.loads(get_body)["status"] == "ok"
    assert int(headers["content-length"]) > 0  # what a GET would carry


@async_test
async def test_head_elsewhere_is_405_without_a_body() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0):
        status, headers, body = await raw_http(server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (405, b"")
    assert headers["allow"] == "GET"


@async_test
async def test_http_1_0_probe_of_the_health_path() -> None:
    """HAProxy's default httpchk speaks HTTP/1.0; an upgrade still needs HTTP/1.1."""
    server = WebSocketServer()
    async with server.serve(HOST, 0):
        status, _, body = await raw_http(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        upgrade = upgrade_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        refused, _, _ = await raw_http(server.port, upgrade)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert refused == 505


@async_test
async def test_absolute_form_upgrade_gets_101() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        target = f"http://{HOST}:{server.port}/chat?room=a".encode()
        request = upgrade_request("/chat?room=a").replace(b"/chat?room=a", target, 1)
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(b"\r\n" + request)  # an empty line first, too (RFC 9112 §2.2)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        finally:
            writer.close()
        await asyncio.sleep(0.05)
        paths = [client.request.path for client in server.local_clients]
    assert head.startswith(b"HTTP/1.1 101 ")
    assert paths in ([], ["/chat"])  # the client may already be gone


# -------------------------------------------------------- the close handshake


def close_then_stray_frame(port: int) -> tuple[bytes, bool]:
    """Close from the client, then send one more frame (as websocket-client does).

    Returns the server's close frame and whether the connection was reset.
    """
    with socket.create_connection((HOST, port), timeout=3) as sock:
        sock.sendall(upgrade_request())
        assert read_http_head(sock).startswith(b"HTTP/1.1 101 ")
        sock.sendall(masked(0x8, encode_close_payload(1000, "bye")))
        reply = b""
        reset = False
        try:
            while len(reply) < 2 or len(reply) < 2 + reply[1]:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            sock.sendall(masked(0x8, encode_close_payload(1000, "bye again")))
            sock.settimeout(3)
            while sock.recv(4096):
                pass
            # the server's FIN came, our second frame is read: wait for a late reset
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            reset = True
        return reply, reset


@pytest.mark.timeout(60)
@async_test
async def test_client_close_followed_by_a_stray_frame_ends_with_fin() -> None:
    """30 of 30 client-initiated closes end with FIN, none with a reset."""
    server = echo_server()
    async with server.serve(HOST, 0):
        loop = asyncio.get_running_loop()
        results = [await loop.run_in_executor(None, close_then_stray_frame, server.port)
                   for _ in range(30)]  # fmt: skip
        await asyncio.sleep(0.1)
        assert server.client_count == 0
    resets = sum(reset for _, reset in results)
    assert resets == 0, f"{resets} of 30 closes ended with a reset"
    # the close frame echoes the peer's code and reason
    assert all(reply == b"\x88\x05" + encode_close_payload(1000, "bye") for reply, _ in results)


@async_test
async def test_close_reply_echoes_code_and_reason() -> None:
    server = echo_server()
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        await ws.close(4001, "see you")
        received = ws.protocol.close_rcvd
        assert received is not None
        assert (received.code, received.reason) == (4001, "see you")


# --------------------------------------------------- limits after inflation


def deflate_offer_request() -> bytes:
    return upgrade_request(
        "/", "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover"
    )


def send_compressed(port: int, payload: bytes) -> tuple[int, bytes]:
    """Send one compressed binary message; return (opcode of the reply, its payload)."""
    compressor = zlib.compressobj(0, zlib.DEFLATED, -15)  # level 0: stored, bigger than input
    body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff") and len(body) - 4 > len(payload)
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(deflate_offer_request())
        head = read_http_head(sock)
        assert b"permessage-deflate" in head
        rest = head.partition(b"\r\n\r\n")[2]
        sock.sendall(masked(0x2, body[:-4], rsv1=True))
        data = rest
        while True:
            if len(data) >= 2:
                length = data[1] & 0x7F
                offset = 2 if length < 126 else (4 if length == 126 else 10)
                if length == 126 and len(data) >= 4:
                    length = struct.unpack("!H", data[2:4])[0]
                elif length == 127 and len(data) >= 10:
                    length = struct.unpack("!Q", data[2:10])[0]
                if len(data) >= offset + length and (length < 126 or offset > 2):
                    return data[0] & 0x0F, data[offset : offset + length]
            chunk = sock.recv(65536)
            if not chunk:
                return -1, data
            data += chunk


@async_test
async def test_max_message_size_is_measured_after_decompression() -> None:
    """A message of exactly max_message_size, compressed to more bytes, is accepted."""
    limit = 64 * 1024
    server = echo_server(max_message_size=limit)
    payload = os.urandom(limit)
    async with server.serve(HOST, 0):
        loop = asyncio.get_running_loop()
        opcode, _ = await loop.run_in_executor(None, send_compressed, server.port, payload)
        assert opcode == 0x2  # echoed (compressed or not), not closed with 1009
        too_big = os.urandom(limit + 1)
        opcode, reply = await loop.run_in_executor(None, send_compressed, server.port, too_big)
        assert opcode == 0x8 and reply[:2] == (1009).to_bytes(2, "big")


# ---------------------------------------------------------- allowed origins


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        (["https://a.example"], None, 403),
        (["https://a.example", None], None, 101),
        (["https://a.example", None], "https://b.example", 403),
        (["https://a.example"], "https://a.example", 101),
        (None, None, 101),
    ],
)
@async_test
async def test_allowed_origins_and_a_missing_origin(
    allowed: list[str | None] | None, origin: str | None, status: int
) -> None:
    server = echo_server(allowed_origins=allowed)
    extra = [f"Origin: {origin}"] if origin else []
    async with server.serve(HOST, 0):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(upgrade_request("/", *extra))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            body = await asyncio.wait_for(reader.read(), 2) if status != 101 else b""
        finally:
            writer.close()
    got, _, _ = parse_response(head)
    assert got == status
    if status == 403 and origin is None:
        assert b"without Origin" in body


# ------------------------------------------------------- HTTP strictness


@pytest.mark.parametrize(
    ("extra", "drop_host"),
    [
        (["Content-Length: 5"], False),
        (["Content-Length: 0", "Content-Length: 0"], False),
        (["Content-Length: 0", "Transfer-Encoding: chunked"], False),
        (["Transfer-Encoding: chunked"], False),
        (["Host: second.example"], False),
        (["Host: bad host"], True),
        (["Host: a/b"], True),
        (["Origin: https://a.example", "Origin: https://b.example"], False),
    ],
)
@async_test
async def test_upgrades_with_a_body_or_ambiguous_host_or_origin_are_400(
    extra: list[str], drop_host: bool
) -> None:
    server = echo_server()
    request = upgrade_request("/", *extra)
    if drop_host:
        request = request.replace(f"Host: {HOST}\r\n".encode(), b"")
    async with server.serve(HOST, 0):
        status, _, _ = await raw_http(server.port, request)
        # the server is still fine
        async with ws_connect(server) as ws:
            await ws.send("still")
            assert await ws.recv() == "still"
    assert status == 400


@async_test
async def test_an_upgrade_with_content_length_zero_is_accepted() -> None:
    """JDK's java.net.http sends ``Content-Length: 0`` on its upgrade GET (RFC 9112 §6.3:
    no body); the frames that follow the head are read as frames, not as a body."""
    server = echo_server()
    async with server.serve(HOST, 0):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(upgrade_request("/", "Content-Length: 0"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 101 ")
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"jdk"))
            writer.write(b"\x81\x83" + mask + payload)
            assert await asyncio.wait_for(reader.readexactly(5), 2) == b"\x81\x03jdk"
        finally:
            writer.close()


def test_a_response_with_framing_headers_is_refused_at_construction() -> None:
    from enjent import Response

    for name in ("Content-Length", "transfer-encoding"):
        with pytest.raises(ValueError, match="leave it out"):
            Response(200, "x", headers=[(name, "5")])
    with pytest.raises(ValueError):
        Response(200, "x", headers=[("X-A", "a\r\nInjected: yes")])


@async_test
async def test_only_token_subprotocols_are_offered_to_hooks() -> None:
    from enjent import Accept, Request

    seen: list[list[str]] = []
    server = echo_server()

    @server.on_handshake
    def pick_first(request: Request) -> Accept | None:
        from enjent.handshake import offered_subprotocols

        offered = offered_subprotocols(request)
        seen.append(offered)
        return Accept(subprotocol=offered[0]) if offered else None

    long_name = "x" * 8000
    async with server.serve(HOST, 0):
        request = upgrade_request("/", f"Sec-WebSocket-Protocol: a b, {long_name}, chat.v1")
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        finally:
            writer.close()
    assert seen == [["chat.v1"]]
    assert b"Sec-WebSocket-Protocol: chat.v1\r\n" in head and long_name.encode() not in head
