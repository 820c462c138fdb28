"""permessage-deflate (RFC 7692): negotiation, the codec, and the server around it.

Negotiation and ``PerMessageDeflate`` are tested without sockets; the rest
through a real server on 127.0.0.1, driven by the ``websockets`` client (which
offers permessage-deflate by default) and, to look at RSV1 per frame or send
what no polite client sends (decompression bombs), by a raw client that
negotiates the extension itself.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import wsutil
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from wsutil import HOST, eventually, parse_headers, upgrade_request

import enjent.deflate
from enjent import CloseCode, WebSocketClient, WebSocketServer
from enjent.deflate import DeflateOptions, Negotiated, PerMessageDeflate, negotiate
from enjent.exceptions import ProtocolError

TEST_TIMEOUT = 20.0
TAIL = b"\x00\x00\xff\xff"
MiB = 1 << 20

# ------------------------------------------------------------------ helpers

async_test = wsutil.async_test_within(TEST_TIMEOUT)
recv = functools.partial(wsutil.recv, timeout=5.0)


def echo_server(**options: Any) -> WebSocketServer:
    options.setdefault("ping_interval", None)
    server = WebSocketServer(**options)

    @server.on_message
    def echo(client: WebSocketClient, message: str | bytes) -> None:
        client.send(message)

    return server


def ws_connect(server: WebSocketServer, **kwargs: Any) -> connect:
    """A ``websockets`` client with its default compression (permessage-deflate)."""
    return wsutil.ws_connect(server, **{"compression": "deflate", "max_size": 64 * MiB, **kwargs})


def negotiated_header(ws: ClientConnection) -> str | None:
    assert ws.response is not None
    return ws.response.headers.get("Sec-WebSocket-Extensions")


def deflate_raw(data: bytes, bits: int = 15, level: int = 6) -> bytes:
    """What a client sends: raw deflate, sync-flushed, tail removed (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -bits)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def inflate_raw(data: bytes) -> bytes:
    inflater = zlib.decompressobj(-15)
    return inflater.decompress(data + TAIL)


@functools.cache
def bomb(total: int, chunk: int = 4 * MiB) -> bytes:
    """``total`` zero bytes deflated (level 9), quickly: after a sync flush the output
    is byte-aligned, and a block of zeros that refers back to earlier zeros decodes
    the same wherever it is repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    zeros = bytes(chunk)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    out = first + again * (total // chunk - 1)
    assert out.endswith(TAIL)
    return out[:-4]


def test_bomb_helper() -> None:
    inflater = zlib.decompressobj(-15)
    assert inflater.decompress(bomb(64 * MiB) + TAIL) == bytes(64 * MiB)


class RawClient:
    """A client on raw streams that negotiates permessage-deflate itself."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.head = head
        self.headers = parse_headers(head.split("\r\n")[1:])

    @classmethod
    async def connect(
        cls, port: int, offer: str | None = "permessage-deflate; client_max_window_bits"
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        extra = [] if offer is None else [f"Sec-WebSocket-Extensions: {offer}"]
        writer.write(upgrade_request("/", *extra, host=f"{HOST}:{port}"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer, head.decode("latin-1").rstrip("\r\n"))

    @property
    def extensions(self) -> str | None:
        return self.headers.get("sec-websocket-extensions")

    def send(self, opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> None:
        first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        length = len(payload)
        if length < 126:
            header = bytes((first, 0x80 | length))
        elif length < 1 << 16:
            header = bytes((first, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((first, 0x80 | 127)) + length.to_bytes(8, "big")
        mask = os.urandom(4)
        key = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
            length, "big"
        )
        self.writer.write(header + mask + masked)

    async def recv_frame(self, timeout: float = 5.0) -> tuple[bool, bool, int, bytes]:
        """``(fin, rsv1, opcode, payload)`` of the next server frame."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        assert not head[1] & 0x80, "server frames are never masked"
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return bool(head[0] & 0x80), bool(head[0] & 0x40), head[0] & 0x0F, payload

    async def close_code(self, timeout: float = 5.0) -> int:
        """Read frames until the server's Close; its status code."""
        while True:
            _, _, opcode, payload = await self.recv_frame(timeout)
            if opcode == 8:
                return int.from_bytes(payload[:2], "big")

    async def send_until_closed(
        self, frames: list[tuple[int, bytes, bool, bool]], pause: float = 0.005
    ) -> int:
        """Send ``(opcode, payload, fin, rsv1)`` frames one by one, pausing after
        each, until the server's Close comes; its status code.

        Pacing matters: a server that closes TCP with unread bytes in its
        receive buffer sends a RST, which can beat its Close frame here.
        """
        closed = asyncio.ensure_future(self.close_code())
        try:
            for opcode, payload, fin, rsv1 in frames:
                if closed.done():
                    break
                self.send(opcode, payload, fin=fin, rsv1=rsv1)
                await self.writer.drain()
                await asyncio.wait([closed], timeout=pause)
            return await closed
        finally:
            closed.cancel()

    def close(self) -> None:
        self.writer.close()


def fragments(wire: bytes, size: int, opcode: int = 2) -> list[tuple[int, bytes, bool, bool]]:
    """A compressed message as frames of ``size`` bytes: RSV1 on the first only."""
    pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
    return [
        (opcode if index == 0 else 0, piece, index == len(pieces) - 1, index == 0)
        for index, piece in enumerate(pieces)
    ]


def test_raw_client_masks_correctly() -> None:
    """The test helper's own masking, checked against enjent's unmasking."""
    from enjent.protocol import ServerProtocol

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    for size in (0, 1, 3, 4, 5, 125, 126, 1000, 70000):
        sink = Sink()
        client = RawClient(None, sink, "HTTP/1.1 101 x")  # type: ignore[arg-type]
        payload = os.urandom(size)
        client.send(2, payload)
        assert ServerProtocol().receive_data(sink.data) == [payload]


# ------------------------------------------------------------ negotiation

DEFAULT = DeflateOptions()


def offer(*values: str, options: DeflateOptions = DEFAULT) -> Negotiated | None:
    return negotiate(list(values), options)


@pytest.mark.parametrize(
    "value",
    [
        "permessage-deflate; foo",
        "permessage-deflate; foo=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover; Client_No_Context_Takeover",
        "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=abc",
        "permessage-deflate; server_max_window_bits=09",
        "permessage-deflate; server_max_window_bits=",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=-9",
        "permessage-deflate; server_max_window_bits=1\u00b2",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; client_max_window_bits=09",
        "permessage-deflate; client_max_window_bits=",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=true",
        "permessage-deflate; server_no_context_takeover=",
        "x-webkit-deflate-frame",
        "deflate-frame; no_context_takeover",
        "",
    ],
)
def test_refused_offers(value: str) -> None:
    assert offer(value) is None


def test_default_options_answer_stateless_both_ways() -> None:
    result = offer("permessage-deflate")
    assert result is not None
    assert result.response() == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert result.compress_bits == 15
    assert result.server_max_window_bits is None and result.client_max_window_bits is None
    assert result.no_context_takeover  # so it may be shared


def test_first_invalid_offer_is_skipped_for_the_next_valid_one() -> None:
    result = offer(
        "permessage-deflate; server_max_window_bits=16, "
        "permessage-deflate; server_max_window_bits=10"
    )
    assert result is not None and result.server_max_window_bits == 10
    # the same across two header lines, and after another extension
    result = offer(
        "x-foo, permessage-deflate; bogus", "permessage-deflate; server_max_window_bits=11"
    )
    assert result is not None and result.server_max_window_bits == 11
    assert result.compress_bits == 11


def test_first_valid_offer_wins() -> None:
    result = offer("permessage-deflate; server_max_window_bits=10, permessage-deflate")
    assert result is not None and result.server_max_window_bits == 10


def test_names_and_quoted_values() -> None:
    result = offer('PerMessage-Deflate ; Server_Max_Window_Bits="12" ;client_max_window_bits')
    assert result is not None
    assert result.server_max_window_bits == 12
    assert result.compress_bits == 12


def test_client_max_window_bits_without_value() -> None:
    # the client can limit its window; we do not ask it to
    result = offer("permessage-deflate; client_max_window_bits")
    assert result is not None and result.client_max_window_bits is None
    assert "client_max_window_bits" not in result.response()
    # we ask for 10 bits: only possible because the client said it supports it
    options = DeflateOptions(client_max_window_bits=10)
    result = offer("permessage-deflate; client_max_window_bits", options=options)
    assert result is not None and result.client_max_window_bits == 10
    assert result.response().endswith("; client_max_window_bits=10")


def test_client_max_window_bits_with_value() -> None:
    result = offer("permessage-deflate; client_max_window_bits=12")
    assert result is not None and result.client_max_window_bits == 12
    assert "client_max_window_bits=12" in result.response()
    smaller = DeflateOptions(client_max_window_bits=10)
    result = offer("permessage-deflate; client_max_window_bits=12", options=smaller)
    assert result is not None and result.client_max_window_bits == 10
    larger = DeflateOptions(client_max_window_bits=14)
    result = offer("permessage-deflate; client_max_window_bits=12", options=larger)
    assert result is not None and result.client_max_window_bits == 12


def test_client_max_window_bits_never_sent_unless_offered() -> None:
    # RFC 7692 §7.1.2.2: not in the response when the offer did not have it
    result = offer("permessage-deflate", options=DeflateOptions(client_max_window_bits=9))
    assert result is not None and result.client_max_window_bits is None
    assert "client_max_window_bits" not in result.response()


def test_server_max_window_bits() -> None:
    result = offer("permessage-deflate; server_max_window_bits=9")
    assert result is not None and result.server_max_window_bits == 9 and result.compress_bits == 9
    # ours smaller than the client's limit: ours
    options = DeflateOptions(server_max_window_bits=10)
    result = offer("permessage-deflate; server_max_window_bits=12", options=options)
    assert result is not None and result.server_max_window_bits == 10
    assert result.compress_bits == 10
    # ours smaller and not asked for: said anyway, so the client may use a smaller window
    result = offer("permessage-deflate", options=options)
    assert result is not None and result.server_max_window_bits == 10
    assert "server_max_window_bits=10" in result.response()


def test_server_max_window_bits_8_is_accepted_but_never_compressed() -> None:
    result = offer("permessage-deflate; server_max_window_bits=8")
    assert result is not None
    assert result.server_max_window_bits == 8
    assert "server_max_window_bits=8" in result.response()
    assert result.compress_bits == 0
    extension = PerMessageDeflate(result, DEFAULT, max_message_size=MiB)
    assert not extension.should_compress(10 * MiB)


def test_context_takeover_options() -> None:
    keep = DeflateOptions(server_no_context_takeover=False, client_no_context_takeover=False)
    result = offer("permessage-deflate; client_max_window_bits", options=keep)
    assert result is not None and result.response() == "permessage-deflate"
    # the client may still ask for either
    result = offer(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover", options=keep
    )
    assert result is not None
    assert result.server_no_context_takeover and result.client_no_context_takeover


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_max_window_bits": 8},
        {"server_max_window_bits": 16},
        {"client_max_window_bits": 7},
        {"client_max_window_bits": 16},
        {"memory_level": 0},
        {"memory_level": 10},
        {"level": -1},
        {"level": 10},
        {"min_size": -1},
    ],
)
def test_bad_options(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DeflateOptions(**kwargs)


# ----------------------------------------------------- codec, no sockets


def extension_for(
    value: str = "permessage-deflate", options: DeflateOptions = DEFAULT, limit: int = MiB
) -> PerMessageDeflate:
    negotiated = negotiate([value], options)
    assert negotiated is not None
    return PerMessageDeflate(negotiated, options, max_message_size=limit)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.binary(max_size=5000), min_size=1, max_size=5))
def test_stateless_encode_round_trips_through_a_fresh_raw_inflater(
    messages: list[bytes],
) -> None:
    extension = extension_for()
    for data in messages:
        assert inflate_raw(extension.encode(data)) == data


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    bits=st.integers(9, 15),
)
def test_context_takeover_encode_round_trips_through_one_inflater(
    messages: list[bytes], bits: int
) -> None:
    options = DeflateOptions(server_no_context_takeover=False, server_max_window_bits=bits)
    extension = extension_for(options=options)
    assert not extension.stateless and extension.negotiated.compress_bits == bits
    inflater = zlib.decompressobj(-bits)  # the window we told the client about
    for data in messages:
        assert inflater.decompress(extension.encode(data) + TAIL) == data


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=20000), cuts=st.lists(st.integers(0, 20000), max_size=5))
def test_decode_any_fragmentation(data: bytes, cuts: list[int]) -> None:
    extension = extension_for()
    wire = deflate_raw(data)
    points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
    pieces = [wire[a:b] for a, b in itertools.pairwise(points)] or [b""]
    out = [
        extension.decode(piece, fin=index == len(pieces) - 1, compressed=True)
        for index, piece in enumerate(pieces)
    ]
    assert b"".join(out) == data


def test_decode_with_client_context_takeover() -> None:
    options = DeflateOptions(client_no_context_takeover=False)
    extension = extension_for(options=options)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    for index in range(20):
        data = b"repeated text, repeated text %d " % index * 20
        wire = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert extension.decode(wire[:-4], fin=True, compressed=True) == data
    assert extension._inflater is not None  # kept between messages


def test_decode_stateless_keeps_no_inflater() -> None:
    extension = extension_for()
    assert extension.decode(deflate_raw(b"x" * 500), fin=True, compressed=True) == b"x" * 500
    assert extension._inflater is None


def test_decode_limit_exact_and_one_over() -> None:
    limit = 10_000
    extension = extension_for(limit=limit)
    assert len(extension.decode(deflate_raw(bytes(limit)), fin=True, compressed=True)) == limit
    assert not extension.max_message_size_exceeded()
    with pytest.raises(ProtocolError) as info:
        extension.decode(deflate_raw(bytes(limit + 1)), fin=True, compressed=True)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG
    assert extension.max_message_size_exceeded()


def test_decode_limit_across_fragments() -> None:
    extension = extension_for(limit=10_000)
    wire = deflate_raw(bytes(30_000))
    produced = 0
    with pytest.raises(ProtocolError):
        for start in range(0, len(wire), 4):
            produced += len(extension.decode(wire[start : start + 4], fin=False, compressed=True))
    assert produced <= 10_000


def test_decode_bomb_stops_at_the_limit() -> None:
    extension = extension_for(limit=MiB)
    wire = bomb(256 * MiB)
    with pytest.raises(ProtocolError):
        extension.decode(wire, fin=True, compressed=True)


def test_min_size() -> None:
    extension = extension_for(options=DeflateOptions(min_size=100))
    assert not extension.should_compress(99)
    assert extension.should_compress(100)
    assert extension_for(options=DeflateOptions(min_size=0)).should_compress(0)
    assert inflate_raw(extension.encode(b"")) == b""


def test_shared_compressor_per_setting() -> None:
    a = extension_for("permessage-deflate; server_max_window_bits=10")
    b = extension_for("permessage-deflate; server_max_window_bits=10")
    c = extension_for("permessage-deflate")
    assert a.compress_key() == b.compress_key() != c.compress_key()
    data = b"the same bytes for every connection of a setting " * 50
    assert a.encode(data) == b.encode(data)
    assert inflate_raw(c.encode(data)) == data


# -------------------------------------------------- through a real server


@async_test
async def test_compression_none_sends_no_extension_header() -> None:
    server = echo_server(compression=None)
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        assert raw.extensions is None
        raw.close()
        async with ws_connect(server) as ws:
            assert negotiated_header(ws) is None
            text = "abc " * 1000
            await ws.send(text)
            assert await recv(ws) == text


@async_test
async def test_offer_refused_over_the_wire_then_accepted() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port, "permessage-deflate; server_max_window_bits=16")
        assert raw.extensions is None
        raw.close()
        raw = await RawClient.connect(
            server.port,
            "permessage-deflate; server_max_window_bits=16, permessage-deflate; "
            "server_max_window_bits=10",
        )
        assert raw.extensions == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=10"
        )
        raw.close()


@async_test
async def test_websockets_client_round_trips_large_messages() -> None:
    server = echo_server(max_message_size=8 * MiB)
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        header = negotiated_header(ws)
        assert header is not None and header.startswith("permessage-deflate")
        assert ws.protocol.extensions  # the client took it
        text = "a fairly compressible line of text, again and again\n" * 40_000  # 2 MB
        await ws.send(text)
        assert await recv(ws) == text
        binary = bytes(range(256)) * 12_000  # 3 MB
        await ws.send(binary)
        assert await recv(ws) == binary
        noise = os.urandom(300_000)  # incompressible
        await ws.send(noise)
        assert await recv(ws) == noise
        small = "hi"
        await ws.send(small)
        assert await recv(ws) == small


@async_test
async def test_websockets_client_fragmented_compressed_messages() -> None:
    server = echo_server()
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        assert ws.protocol.extensions
        parts = [f"fragment number {i}, " * 50 for i in range(20)]
        await ws.send(parts)
        assert await recv(ws) == "".join(parts)
        blobs = [bytes([i]) * 10_000 for i in range(10)]
        await ws.send(blobs)
        assert await recv(ws) == b"".join(blobs)


@pytest.mark.parametrize(
    "options",
    [
        DeflateOptions(server_no_context_takeover=False, client_no_context_takeover=False),
        DeflateOptions(server_no_context_takeover=False),
        DeflateOptions(client_no_context_takeover=False),
        DeflateOptions(server_max_window_bits=9, level=1, memory_level=1, min_size=0),
    ],
)
@async_test
async def test_websockets_client_many_messages(options: DeflateOptions) -> None:
    server = echo_server(compression=options)
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        assert ws.protocol.extensions
        for index in range(300):
            message: str | bytes = f"message {index} " * (index % 40 + 1)
            if index % 3 == 0:
                message = message.encode()
            if index % 7 == 0:
                await ws.send([message[:5], message[5:]])
            else:
                await ws.send(message)
            assert await recv(ws) == message


@async_test
async def test_raw_client_sees_rsv1_only_on_big_messages() -> None:
    server = echo_server(compression=DeflateOptions(min_size=128))
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        assert raw.extensions is not None and raw.extensions.startswith("permessage-deflate")
        for size in (0, 10, 127):
            raw.send(2, bytes(size))
            fin, rsv1, opcode, payload = await raw.recv_frame()
            assert (fin, rsv1, opcode, payload) == (True, False, 2, bytes(size))
        for size in (128, 5000):
            raw.send(2, bytes(size))
            fin, rsv1, opcode, payload = await raw.recv_frame()
            assert (fin, rsv1, opcode) == (True, True, 2)
            assert len(payload) < size
            assert inflate_raw(payload) == bytes(size)
        # a compressed text message we send, fragmented: RSV1 on the first frame only
        text = ("déjà vu " * 100).encode()
        wire = deflate_raw(text)
        raw.send(1, wire[:10], fin=False, rsv1=True)
        raw.send(0, wire[10:20], fin=False)
        raw.send(0, wire[20:])
        fin, rsv1, opcode, payload = await raw.recv_frame()
        assert (fin, rsv1, opcode) == (True, True, 1)
        assert inflate_raw(payload) == text
        raw.close()


@async_test
async def test_rsv1_on_continuation_frame_fails_1002() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        wire = deflate_raw(b"x" * 1000)
        raw.send(2, wire[:5], fin=False, rsv1=True)
        raw.send(0, wire[5:], rsv1=True)
        assert await raw.close_code() == CloseCode.PROTOCOL_ERROR
        raw.close()


@async_test
async def test_rsv1_without_negotiation_fails_1002() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port, offer=None)
        assert raw.extensions is None
        raw.send(2, deflate_raw(b"x" * 1000), rsv1=True)
        assert await raw.close_code() == CloseCode.PROTOCOL_ERROR
        raw.close()


@async_test
async def test_corrupt_compressed_data_fails_1007() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        raw.send(2, b"\xff\xff\xff\xff garbage", rsv1=True)
        assert await raw.close_code() == CloseCode.INVALID_PAYLOAD_DATA
        raw.close()


@async_test
async def test_compressed_invalid_utf8_fails_1007() -> None:
    server = echo_server()
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        raw.send(1, deflate_raw(b"ok \xff\xfe not utf-8" * 20), rsv1=True)
        assert await raw.close_code() == CloseCode.INVALID_PAYLOAD_DATA
        raw.close()


@pytest.mark.parametrize("fragment", [0, 64 * 1024, 1000])
@async_test
async def test_bomb_closes_1009_and_the_server_keeps_serving(fragment: int) -> None:
    server = echo_server(max_message_size=MiB)
    wire = bomb(256 * MiB)
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        frames = fragments(wire, fragment or len(wire))
        assert await raw.send_until_closed(frames) == CloseCode.MESSAGE_TOO_BIG
        raw.close()
        async with ws_connect(server) as ws:
            await ws.send("still here " * 100)
            assert await recv(ws) == "still here " * 100


@async_test
async def test_many_small_fragments_inflating_past_the_limit_close_1009() -> None:
    """Each fragment is tiny and inflates to little; together they pass the limit."""
    server = echo_server(max_message_size=MiB)
    wire = deflate_raw(bytes(3 * MiB), level=9)
    frames = fragments(wire, 16)
    assert len(frames) > 20
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        assert await raw.send_until_closed(frames, pause=0.001) == CloseCode.MESSAGE_TOO_BIG
        raw.close()


@async_test
async def test_message_at_the_limit_once_inflated_passes() -> None:
    server = echo_server(max_message_size=100_000)
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        raw.send(2, deflate_raw(bytes(100_000)), rsv1=True)
        _, rsv1, _, payload = await raw.recv_frame()
        assert rsv1 and inflate_raw(payload) == bytes(100_000)
        raw.send(2, deflate_raw(bytes(100_001)), rsv1=True)
        assert await raw.close_code() == CloseCode.MESSAGE_TOO_BIG
        raw.close()


BOMB_SERVER = textwrap.dedent(
    """
    import asyncio, resource, sys
    from enjent import WebSocketServer

    server = WebSocketServer(max_message_size=1 << 20, ping_interval=None)

    @server.on_message
    def answer(client, message):
        if message == "maxrss":  # peak RSS of this process, KiB (Linux)
            client.send(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))

    async def main():
        async with server.serve("127.0.0.1", 0):
            print(server.port, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


@pytest.fixture
def bomb_server() -> Iterator[tuple[int, psutil.Process]]:
    """An enjent server (max_message_size 1 MiB) in its own process: its port and process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BOMB_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port, psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("fragment", [0, 100_000])
def test_gigabyte_bomb_memory_stays_bounded(
    bomb_server: tuple[int, psutil.Process], fragment: int
) -> None:
    """A ~1 MB frame inflating to 1 GiB: close 1009, and the server's peak RSS grows
    by less than 50 MB (its limit is 1 MiB)."""
    port, process = bomb_server
    wire = bomb(1 << 30)
    assert len(wire) < MiB  # under the limit on the wire: the inflater must stop it

    async def scenario() -> tuple[int, int, int, int]:
        async def maxrss() -> int:
            async with connect(f"ws://{HOST}:{port}/", proxy=None, ping_interval=None) as ws:
                await ws.send("maxrss")
                return int(await recv(ws)) * 1024

        before_peak = await maxrss()
        before_rss = process.memory_info().rss
        raw = await RawClient.connect(port)
        code = await raw.send_until_closed(fragments(wire, fragment or len(wire)), pause=0.05)
        raw.close()
        return code, before_peak, before_rss, await maxrss()

    with asyncio.Runner() as runner:
        code, before_peak, before_rss, after_peak = runner.run(
            asyncio.wait_for(scenario(), TEST_TIMEOUT)
        )
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert after_peak - before_peak < 50 * MiB, (before_peak, after_peak)
    assert process.memory_info().rss - before_rss < 50 * MiB


# ------------------------------------------------------------- broadcast


class CallCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shared = 0
        self.encode = 0
        shared = enjent.deflate.SHARED_COMPRESSORS
        original_compress = shared.compress
        original_encode = PerMessageDeflate.encode

        def compress(*args: Any, **kwargs: Any) -> bytes:
            self.shared += 1
            return original_compress(*args, **kwargs)

        def encode(extension: PerMessageDeflate, data: bytes) -> bytes:
            self.encode += 1
            return original_encode(extension, data)

        monkeypatch.setattr(shared, "compress", compress)
        monkeypatch.setattr(PerMessageDeflate, "encode", encode)

    def reset(self) -> None:
        self.shared = self.encode = 0


@async_test
async def test_broadcast_is_compressed_once_for_one_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = echo_server()
    counter = CallCounter(monkeypatch)
    async with server.serve(HOST, 0):
        clients = [await ws_connect(server).__aenter__() for _ in range(6)]
        plain = [await ws_connect(server, compression=None).__aenter__() for _ in range(2)]
        raw_deflate = await RawClient.connect(server.port)
        raw_plain = await RawClient.connect(server.port, offer=None)
        try:
            assert all(ws.protocol.extensions for ws in clients)
            assert not any(ws.protocol.extensions for ws in plain)
            await eventually(lambda: server.client_count == 10)
            text = "a broadcast that compresses well " * 200
            counter.reset()
            assert server.broadcast(text) == 10
            assert counter.shared == 1 and counter.encode == 1  # then cached
            for ws in clients + plain:
                assert await recv(ws) == text
            _, rsv1, opcode, payload = await raw_deflate.recv_frame()
            assert rsv1 and opcode == 1 and inflate_raw(payload).decode() == text
            _, rsv1, opcode, payload = await raw_plain.recv_frame()
            assert not rsv1 and opcode == 1 and payload.decode() == text
            # under min_size: never compressed, for anybody
            counter.reset()
            assert server.broadcast(b"tiny") == 10
            assert counter.shared == 0
            for ws in clients + plain:
                assert await recv(ws) == b"tiny"
            assert (await raw_deflate.recv_frame())[1:] == (False, 2, b"tiny")
        finally:
            raw_deflate.close()
            raw_plain.close()
            for ws in clients + plain:
                await ws.close()


@async_test
async def test_broadcast_is_compressed_once_per_distinct_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = echo_server()
    counter = CallCounter(monkeypatch)
    ten = [ClientPerMessageDeflateFactory(server_max_window_bits=10)]
    async with server.serve(HOST, 0):
        fifteen_clients = [await ws_connect(server).__aenter__() for _ in range(3)]
        ten_clients = [
            await ws_connect(server, compression=None, extensions=ten).__aenter__()
            for _ in range(3)
        ]
        try:
            for ws in ten_clients:
                header = negotiated_header(ws)
                assert header is not None and "server_max_window_bits=10" in header
            await eventually(lambda: server.client_count == 6)
            messages: list[str | bytes] = [
                "text for two settings " * 300,
                bytes(range(256)) * 100,
            ]
            for message in messages:
                counter.reset()
                assert server.broadcast(message) == 6
                assert counter.shared == 2
                for ws in fifteen_clients + ten_clients:
                    assert await recv(ws) == message
        finally:
            for ws in fifteen_clients + ten_clients:
                await ws.close()


@async_test
async def test_broadcast_with_context_takeover_compresses_per_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = DeflateOptions(server_no_context_takeover=False, client_no_context_takeover=False)
    server = echo_server(compression=options)
    counter = CallCounter(monkeypatch)
    async with server.serve(HOST, 0):
        clients = [await ws_connect(server).__aenter__() for _ in range(4)]
        try:
            await eventually(lambda: server.client_count == 4)
            for index in range(30):
                message = f"broadcast {index}: " + "same words again " * 30
                counter.reset()
                assert server.broadcast(message) == 4
                assert counter.encode == 4 and counter.shared == 0
                for ws in clients:
                    assert await recv(ws) == message
        finally:
            for ws in clients:
                await ws.close()


# ------------------------------------------- loadtest --offer-deflate / --server-arg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loadtest_connections(tmp_path: Any, *args: str) -> dict[str, Any]:
    json_path = tmp_path / "result.json"
    command = [sys.executable, "-m", "loadtest", "connections", "--clients", "20"]
    command += ["--rate", "0", "--hold", "0.2", "--measure", "0.2", "--no-chart", "--quiet"]
    command += ["--json", str(json_path), "--timeout", "50", *args]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    document: dict[str, Any] = json.loads(json_path.read_text())
    return document


def test_loadtest_upgrade_request_offers_deflate() -> None:
    sys.path.insert(0, REPO_ROOT)
    try:
        from loadtest import wire
    finally:
        sys.path.remove(REPO_ROOT)
    key = wire.new_key()
    plain = wire.upgrade_request("127.0.0.1", 80, key)
    assert b"Sec-WebSocket-Extensions" not in plain
    offered = wire.upgrade_request("127.0.0.1", 80, key, extensions=wire.DEFLATE_OFFER)
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" in (
        offered
    )
    assert offered.endswith(b"\r\n\r\n") and offered.count(b"\r\n\r\n") == 1
    assert negotiate([wire.DEFLATE_OFFER], DEFAULT) is not None


@pytest.mark.parametrize(
    ("server_args", "agreed"), [((), 20), (("--server-arg=--compression=none",), 0)]
)
def test_loadtest_offer_deflate(tmp_path: Any, server_args: tuple[str, ...], agreed: int) -> None:
    document = loadtest_connections(tmp_path, "--offer-deflate", *server_args)
    (run,) = document["runs"]
    assert run["metrics"]["clients_connected"] == 20
    assert run["metrics"]["clients_with_extension"] == agreed
    passed = [arg.split("=", 1)[1] for arg in server_args]  # appended to echo.py's args
    assert run["server_command"][len(run["server_command"]) - len(passed) :] == passed


def test_node_ws_without_client_no_context_takeover_can_be_served() -> None:
    """Node ws with clientNoContextTakeover: false refuses a response imposing it."""
    offer = ["permessage-deflate; client_max_window_bits"]
    default = negotiate(offer, DeflateOptions())
    assert default is not None and "client_no_context_takeover" in default.response()
    lenient = negotiate(offer, DeflateOptions(client_no_context_takeover=False))
    assert lenient is not None and "client_no_context_takeover" not in lenient.response()
    # a client that offers it still gets it
    offered = negotiate(
        ["permessage-deflate; client_no_context_takeover"],
        DeflateOptions(client_no_context_takeover=False),
    )
    assert offered is not None and "client_no_context_takeover" in offered.response()


def test_connections_that_agree_alike_share_one_negotiated_object() -> None:
    # every browser makes the same offer: one object for all of them, not one each
    options = DeflateOptions()
    offer = ["permessage-deflate; client_max_window_bits"]
    first, second = negotiate(list(offer), options), negotiate(list(offer), options)
    assert first is not None and first is second
    other = negotiate(["permessage-deflate; client_max_window_bits=10"], options)
    assert other is not None and other is not first
    assert other.client_max_window_bits == 10 and first.client_max_window_bits is None


# -------------------------------------------------- one extension for alike clients


def extensions_of(server: WebSocketServer) -> list[Any]:
    return [client.connection.extension for client in server.local_clients]


@async_test
async def test_clients_that_agree_alike_share_one_extension_until_they_fragment() -> None:
    server = echo_server(max_message_size=100_000)
    async with server.serve(HOST, 0):
        first, second, third = [await RawClient.connect(server.port) for _ in range(3)]
        await eventually(lambda: len(server.local_clients) == 3)
        shared = extensions_of(server)[0]
        assert shared.shared and all(e is shared for e in extensions_of(server))
        # two fragmented compressed messages, interleaved: each connection
        # inflates with an inflater of its own (a private copy of the agreement)
        a, b = b"first " * 3000, b"second " * 3000
        a_wire, b_wire = deflate_raw(a), deflate_raw(b)
        first.send(2, a_wire[:40], fin=False, rsv1=True)
        second.send(2, b_wire[:40], fin=False, rsv1=True)
        await first.writer.drain()
        await second.writer.drain()
        await asyncio.sleep(0.05)
        first.send(0, a_wire[40:])
        second.send(0, b_wire[40:])
        for client, message in ((first, a), (second, b)):
            fin, rsv1, opcode, payload = await client.recv_frame()
            assert (fin, rsv1, opcode) == (True, True, 2)
            assert inflate_raw(payload) == message
        private = {id(e) for e in extensions_of(server) if e is not shared}
        assert len(private) == 2
        # over the limit on the shared one: that client fails with 1009, and
        # the extension it shared still inflates a message of the limit's size
        assert extensions_of(server).count(shared) == 1
        third.send(2, deflate_raw(bytes(100_001)), rsv1=True)
        assert await third.close_code() == CloseCode.MESSAGE_TOO_BIG
        fourth = await RawClient.connect(server.port)
        fourth.send(2, deflate_raw(bytes(100_000)), rsv1=True)
        _, rsv1, opcode, payload = await fourth.recv_frame()
        assert (rsv1, opcode, inflate_raw(payload)) == (True, 2, bytes(100_000))
        for client in (first, second, third, fourth):
            client.close()


def test_an_agreement_with_context_takeover_is_never_shared() -> None:
    stateful = DeflateOptions(server_no_context_takeover=False)
    negotiated = negotiate(["permessage-deflate"], stateful)
    assert negotiated is not None and not negotiated.no_context_takeover
    with pytest.raises(ValueError):
        PerMessageDeflate(negotiated, stateful, max_message_size=MiB, shared=True)
    shared = extension_for()
    assert not shared.shared
    shared = PerMessageDeflate(shared.negotiated, DEFAULT, max_message_size=MiB, shared=True)
    with pytest.raises(ValueError):
        shared.decode(deflate_raw(b"x" * 100)[:10], fin=False, compressed=True)
    private = shared.private()
    assert not private.shared and private.negotiated is shared.negotiated


# ------------------------------------- a received message sent on as it came


def shared_extension(value: str = "permessage-deflate") -> PerMessageDeflate:
    negotiated = negotiate([value], DEFAULT)
    assert negotiated is not None and negotiated.no_context_takeover
    return PerMessageDeflate(negotiated, DEFAULT, max_message_size=MiB, shared=True)


def compress_ending(data: bytes, flush: int, level: int = 1) -> bytes:
    """A client's compressed form of ``data``, ending with ``flush``."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(flush)
    return out[:-4] if out.endswith(TAIL) else out


RELAYED = b'{"user": "ada", "text": "relayed as it came", "n": 1}' * 20


def test_a_message_received_and_sent_on_is_its_compressed_form() -> None:
    extension = shared_extension()
    wire = deflate_raw(RELAYED, level=1)  # not what our level 6 would make
    assert extension.encode(RELAYED) != wire
    message = extension.decode(wire, fin=True, compressed=True)
    extension.remember(message, message)
    assert extension.encode_for(message, message) == wire
    # the same bytes in another object: compressed by us
    copy = b"".join([message[:10], message[10:]])
    assert copy == message and copy is not message
    assert extension.encode_for(copy, copy) == extension.encode(RELAYED)


def test_a_binding_is_made_only_for_the_message_just_inflated() -> None:
    extension = shared_extension()
    first_wire = deflate_raw(RELAYED, level=1)
    first = extension.decode(first_wire, fin=True, compressed=True)
    extension.remember(first, first)
    # a second message inflated but never handed over (its text was invalid, say)
    second_data = b"a second message, never delivered " * 20
    second_wire = deflate_raw(second_data, level=1)
    second = extension.decode(second_wire, fin=True, compressed=True)
    extension.remember(b"something else", b"something else")
    assert extension.encode_for(first, first) == first_wire  # still its own bytes
    assert extension.encode_for(second, second) == extension.encode(second_data)
    # a private (fragmented) inflate binds nothing either
    private = extension.private()
    pieces = deflate_raw(second_data, level=1)
    out = private.decode(pieces[:20], fin=False, compressed=True)
    out += private.decode(pieces[20:], fin=True, compressed=True)
    private.remember(out, out)
    assert extension.encode_for(out, out) == extension.encode(second_data)


def open_stored_block(data: bytes) -> bytes:
    """A payload whose one stored block announces 10 bytes more than it holds:
    it inflates to ``data`` and the tail, and leaves the inflater mid-block."""
    length = len(data) + 10
    return b"\x00" + length.to_bytes(2, "little") + (length ^ 0xFFFF).to_bytes(2, "little") + data


@pytest.mark.parametrize(
    "wire",
    [compress_ending(RELAYED, zlib.Z_FINISH), open_stored_block(RELAYED)],
    ids=["final-block", "block-left-open"],
)
def test_a_payload_that_does_not_end_at_a_clean_boundary_is_compressed_again(
    wire: bytes,
) -> None:
    """A final block, or a block left open, would leave a recipient's inflater
    that keeps its state between messages where the next message cannot follow."""
    extension = shared_extension()
    message = extension.decode(wire, fin=True, compressed=True)
    assert message.startswith(RELAYED)
    extension.remember(message, message)
    out = extension.encode_for(message, message)
    assert out != wire and out == extension.encode(message)


def test_a_payload_padded_past_the_message_is_compressed_again() -> None:
    """Empty stored blocks inflate to nothing: relaying such a payload to a
    room would send far more than the message is worth."""
    extension = shared_extension()
    plain = compress_ending(RELAYED, zlib.Z_SYNC_FLUSH)
    # each piece ends the empty stored block the flush began, and begins another
    padding = (TAIL + b"\x00") * (len(RELAYED) // 5)
    for wire, relayed in ((plain, True), (plain + padding, False)):
        message = extension.decode(wire, fin=True, compressed=True)
        assert message == RELAYED
        extension.remember(message, message)
        out = extension.encode_for(message, message)
        assert (out == wire) is relayed
        assert len(out) <= len(plain)


def inflate_streaming(payload: bytes, bits: int) -> bytes:
    """Inflate as a recipient with a ``2**bits`` window and a small output
    buffer does: older bytes only in the window (zlib reaches back into its
    own output buffer when it is large, so one big call would not tell)."""
    inflater = zlib.decompressobj(-bits)
    out, data = [], payload + TAIL
    while data:
        out.append(inflater.decompress(data, 64))
        data = inflater.unconsumed_tail
    return b"".join(out)


def test_a_message_larger_than_the_recipients_window_is_compressed_again() -> None:
    sender = shared_extension()
    narrow = shared_extension("permessage-deflate; server_max_window_bits=9")
    assert narrow.negotiated.compress_bits == 9
    block = os.urandom(60)
    far = block + os.urandom(520) + block  # 640 bytes, a match 580 back: past 512
    near = os.urandom(200) * 2  # 400 bytes: every distance inside it
    for data, relayed in ((far, False), (near, True)):
        wire = deflate_raw(data)
        message = sender.decode(wire, fin=True, compressed=True)
        sender.remember(message, message)
        out = narrow.encode_for(message, message)
        assert (out == wire) is relayed
        assert inflate_streaming(out, 9) == data
    with pytest.raises(zlib.error, match="too far back"):  # what relaying ``far`` would send
        inflate_streaming(deflate_raw(far), 9)


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(min_size=128, max_size=3000) | st.text(min_size=128).map(str.encode),
    level=st.integers(0, 9),
    client_bits=st.integers(9, 15),
    recipient_bits=st.integers(9, 15),
    repeat=st.integers(1, 12),
)
def test_whatever_goes_out_decodes_in_the_recipients_window(
    data: bytes, level: int, client_bits: int, recipient_bits: int, repeat: int
) -> None:
    sender = shared_extension()
    recipient = shared_extension(f"permessage-deflate; server_max_window_bits={recipient_bits}")
    message_data = (data * repeat)[: 1 << 15]
    wire = deflate_raw(message_data, bits=client_bits, level=level)
    message = sender.decode(wire, fin=True, compressed=True)
    sender.remember(message, message)
    out = recipient.encode_for(message, message)
    assert inflate_streaming(out, recipient_bits) == message_data
    inflater = zlib.decompressobj(-recipient_bits)
    assert inflater.decompress(out + TAIL) == message_data
    # and the recipient's inflater, kept, still reads what comes next
    following = recipient.encode(b"the next message " * 10)
    assert inflater.decompress(following + TAIL) == b"the next message " * 10


def relay_server(**options: Any) -> WebSocketServer:
    """Every message goes to every client (a chat room's relay)."""
    options.setdefault("ping_interval", None)
    server = WebSocketServer(**options)

    @server.on_message
    def relay(client: WebSocketClient, message: str | bytes) -> None:
        server.broadcast(message)

    return server


@async_test
async def test_an_echo_sends_back_the_clients_own_compressed_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = echo_server()
    counter = CallCounter(monkeypatch)
    async with server.serve(HOST, 0):
        raw = await RawClient.connect(server.port)
        try:
            text = RELAYED.decode()
            wire = deflate_raw(RELAYED, level=1)
            counter.reset()
            raw.send(1, wire, rsv1=True)
            fin, rsv1, opcode, payload = await raw.recv_frame()
            assert (fin, rsv1, opcode, payload) == (True, True, 1, wire)
            assert counter.shared == 0
            # in two frames: inflated by a private inflater, compressed by us
            raw.send(1, wire[:30], fin=False, rsv1=True)
            raw.send(0, wire[30:])
            fin, rsv1, opcode, payload = await raw.recv_frame()
            assert (fin, rsv1, opcode) == (True, True, 1)
            assert payload != wire and inflate_raw(payload).decode() == text
            assert counter.shared == 1
        finally:
            raw.close()


@async_test
async def test_a_relayed_message_reaches_each_client_in_its_own_terms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # our side keeps context unless asked not to: a client that asks for
    # server_no_context_takeover can get the sender's bytes, one that does not
    # gets a compression of its own stream
    options = DeflateOptions(server_no_context_takeover=False)
    server = relay_server(compression=options)
    counter = CallCounter(monkeypatch)
    stateless = "permessage-deflate; server_no_context_takeover; client_max_window_bits"
    async with server.serve(HOST, 0):
        sender = await RawClient.connect(server.port, offer=stateless)
        alike = await RawClient.connect(server.port, offer=stateless)
        keeping = await RawClient.connect(server.port, offer="permessage-deflate")
        plain = await RawClient.connect(server.port, offer=None)
        try:
            assert keeping.extensions is not None
            assert "server_no_context_takeover" not in keeping.extensions
            await eventually(lambda: server.client_count == 4)
            keeping_inflater = zlib.decompressobj(-15)
            for index in range(3):
                data = b'{"n": %d, "text": "relay me"} ' % index * 30
                wire = deflate_raw(data, level=1)
                counter.reset()
                sender.send(2, wire, rsv1=True)
                for client in (sender, alike):
                    assert await client.recv_frame() == (True, True, 2, wire)
                fin, rsv1, opcode, payload = await keeping.recv_frame()
                assert (fin, rsv1, opcode) == (True, True, 2) and payload != wire
                assert keeping_inflater.decompress(payload + TAIL) == data
                assert await plain.recv_frame() == (True, False, 2, data)
                assert counter.encode == 1 and counter.shared == 0
        finally:
            for client in (sender, alike, keeping, plain):
                client.close()


@pytest.mark.parametrize("mem_level", [1, 5, 8])
@async_test
async def test_an_incompressible_message_of_exactly_the_limit_passes_compressed(
    mem_level: int,
) -> None:
    """A client's deflate makes incompressible data a little larger (websockets uses
    memLevel 5: about 0.25 %; memLevel 1 several %): the limit is on the message, so
    ``max_message_size`` random bytes, compressed, must be accepted and echoed, and one
    byte more refused with 1009."""
    limit = MiB
    server = echo_server(max_message_size=limit)
    factory = ClientPerMessageDeflateFactory(
        server_max_window_bits=None,
        client_max_window_bits=None,
        compress_settings={"memLevel": mem_level},
    )
    data = os.urandom(limit)
    async with server.serve(HOST, 0):
        async with ws_connect(server, compression=None, extensions=[factory]) as ws:
            await ws.send(data)
            assert await recv(ws) == data
        async with ws_connect(server, compression=None, extensions=[factory]) as ws:
            await ws.send(data + b"x")
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == CloseCode.MESSAGE_TOO_BIG


def _stored_block(data: bytes, final: bool) -> bytes:
    """One stored (uncompressed) deflate block, byte-aligned (RFC 1951 §3.2.4)."""
    return (
        bytes([1 if final else 0])
        + len(data).to_bytes(2, "little")
        + ((0xFFFF ^ len(data)).to_bytes(2, "little"))
        + data
    )


def _crafted_streams(rng: random.Random, count: int) -> Iterator[bytes]:
    """Payloads a client may send: zlib's with every flush, and stored blocks by hand."""
    flushes = (zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH, zlib.Z_FINISH, zlib.Z_PARTIAL_FLUSH)
    for index in range(count):
        size = rng.choice((0, 1, 10, 200, 4000, 32 * 1024 - 5, 32 * 1024, 40_000))
        data = rng.randbytes(size) if index % 2 else bytes(rng.choice(b"ab") for _ in range(size))
        kind = index % 4
        if kind == 0:  # a stored block, final or not, with or without a tail
            payload = _stored_block(data[:65535], final=rng.random() < 0.5)
            if rng.random() < 0.5:
                payload += b"\x00\x00\xff\xff"
        else:
            compressor = zlib.compressobj(
                rng.choice((1, 6, 9)), zlib.DEFLATED, -rng.choice((9, 12, 15)),
                rng.choice((1, 5, 8)), rng.choice((zlib.Z_DEFAULT_STRATEGY, zlib.Z_FIXED,
                                                   zlib.Z_HUFFMAN_ONLY)),
            )  # fmt: skip
            payload = compressor.compress(data) + compressor.flush(rng.choice(flushes))
        if payload.endswith(b"\x00\x00\xff\xff") and rng.random() < 0.8:
            payload = payload[:-4]  # RFC 7692 §7.2.1: the sender removes the tail
        yield payload


def _reference_inflate(payload: bytes) -> bytes | None:
    """What a plain inflater makes of payload + tail (None where zlib refuses the stream)."""
    inflater = zlib.decompressobj(-15)
    try:
        return inflater.decompress(payload + b"\x00\x00\xff\xff")
    except zlib.error:
        return None


def test_crafted_streams_decode_as_zlib_does_and_relay_only_self_contained_ones() -> None:
    """A differential check over crafted payloads: each decodes to what a plain inflater
    makes of it (a stored block of 32 KiB or less with no tail included: it was refused
    with 1007), and a payload kept for relaying inflates, alone in a fresh inflater, to
    the same bytes."""
    import enjent.deflate as deflate_module

    rng = random.Random(20261207)
    negotiated = negotiate(["permessage-deflate"], DEFAULT)
    assert negotiated is not None and negotiated.no_context_takeover
    # stateless both ways: the shared decoder, the one that relays
    extension = PerMessageDeflate(negotiated, DEFAULT, max_message_size=MiB, shared=True)
    checked = relayable = 0
    for payload in _crafted_streams(rng, 2000):
        expected = _reference_inflate(payload)
        if expected is None or len(expected) > MiB:
            continue
        out = extension.decode(payload, fin=True, compressed=True)
        assert out == expected, payload[:16]
        relay = deflate_module._RELAY
        if relay.inflated is out and relay.pending is not None:
            relayable += 1
            assert _reference_inflate(relay.pending) == out
            second = zlib.decompressobj(-15)  # a client reading two relayed messages
            assert second.decompress(relay.pending + b"\x00\x00\xff\xff") == out
            assert second.decompress(relay.pending + b"\x00\x00\xff\xff") == out
        checked += 1
    assert checked > 1500 and relayable > 100, (checked, relayable)


@pytest.mark.parametrize("size", [0, 1, 1000, 32 * 1024])
def test_a_lone_non_final_stored_block_without_a_tail_is_accepted(size: int) -> None:
    data = os.urandom(size)
    payload = _stored_block(data, final=False)  # no 00 00 ff ff after it
    negotiated = negotiate(["permessage-deflate"], DEFAULT)
    assert negotiated is not None
    for extension in (
        extension_for(),
        PerMessageDeflate(negotiated, DEFAULT, max_message_size=MiB, shared=True),
    ):
        assert extension.decode(payload, fin=True, compressed=True) == data
