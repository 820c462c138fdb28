"""The echo-and-broadcast app on `picows` (a Cython WebSocket library).

Layer 5 of docs/architecture.md: a peer to compare Enjent with, the fastest Python
WebSocket server measured here. Same contract as examples/echo.py;
keepalive pings off (picows has no permessage-deflate).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from loadtest.peers import BACKLOG, BROADCAST_PREFIX, MAX_MESSAGE, run_peer, server_ssl

CLIENTS: set[WSTransport] = set()
_PREFIX = BROADCAST_PREFIX.encode()


class EchoListener(WSListener):  # type: ignore[misc]
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        CLIENTS.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if payload.startswith(_PREFIX):
                data = payload[len(_PREFIX) :]
                for client in CLIENTS:
                    client.send(WSMsgType.TEXT, data)
                return
            transport.send(WSMsgType.TEXT, payload)
        elif msg_type == WSMsgType.BINARY:
            transport.send(WSMsgType.BINARY, frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


def listener_factory(request: WSUpgradeRequest) -> EchoListener:
    return EchoListener()


@asynccontextmanager
async def serving(args: argparse.Namespace) -> AsyncIterator[None]:
    server = await ws_create_server(
        listener_factory,
        args.host,
        args.port,
        max_frame_size=MAX_MESSAGE,
        backlog=BACKLOG,
        ssl=server_ssl(args),
    )
    try:
        yield
    finally:
        server.close()


def main() -> None:
    run_peer(__doc__.splitlines()[0], serving)


if __name__ == "__main__":
    main()
