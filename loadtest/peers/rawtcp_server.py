"""The floor of an echo: a bare uvloop TCP echo behind a minimal upgrade.

Layer 5 of docs/architecture.md (it does not import ``enjent``). Not a
WebSocket server: it answers the upgrade request, then writes back every
chunk it reads, as it is, without parsing a frame. ``loadtest echo``
sends it *unmasked* frames (``--compare rawtcp``), so what comes back are
valid server frames and the client's checks run unchanged: the same
harness, the same messages, and no framing, masking or message handling on
the server. Its throughput is the limit a WebSocket server on uvloop
approaches (the copies and system calls of moving the bytes); broadcasts
are not supported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from loadtest.peers import BACKLOG, run_peer, server_ssl

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RawEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.upgraded:
            transport.write(data)  # the echo: no parsing, no copy of our own
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 16384:
                transport.close()
            return
        key = b""
        for line in self.head[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.upgraded = True
        rest = self.head[end + 4 :]
        self.head = b""
        if rest:
            transport.write(rest)


@asynccontextmanager
async def serving(args: argparse.Namespace) -> AsyncIterator[object]:
    server = await asyncio.get_running_loop().create_server(
        RawEcho, args.host, args.port, backlog=BACKLOG, ssl=server_ssl(args)
    )
    try:
        yield server
    finally:
        server.close()


def main() -> None:
    run_peer(__doc__.split("\n")[0], serving)


if __name__ == "__main__":
    main()
