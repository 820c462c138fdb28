"""The echo-and-broadcast app on aiohttp's WebSocket server.

Layer 5 of docs/architecture.md: a second peer to compare Enjent with. Same contract as
examples/echo.py; no heartbeat, and compression off unless `--compression deflate`
(then aiohttp's default permessage-deflate, each message compressed per client).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import WSMsgType, web

from loadtest.peers import BACKLOG, BROADCAST_PREFIX, MAX_MESSAGE, run_peer, server_ssl

CLIENTS: set[web.WebSocketResponse] = set()
#: `--compression deflate`: whether the upgrade accepts permessage-deflate
COMPRESS = web.AppKey("compress", bool)


async def handler(request: web.Request) -> web.WebSocketResponse:
    connection = web.WebSocketResponse(compress=request.app[COMPRESS], max_msg_size=MAX_MESSAGE)
    await connection.prepare(request)
    CLIENTS.add(connection)
    try:
        async for message in connection:
            if message.type == WSMsgType.TEXT:
                if message.data.startswith(BROADCAST_PREFIX):
                    payload = message.data[len(BROADCAST_PREFIX) :]
                    for client in list(CLIENTS):
                        if not client.closed:
                            await client.send_str(payload)
                else:
                    await connection.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await connection.send_bytes(message.data)
    finally:
        CLIENTS.discard(connection)
    return connection


@asynccontextmanager
async def serving(args: argparse.Namespace) -> AsyncIterator[None]:
    app = web.Application()
    app[COMPRESS] = args.compression == "deflate"
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=BACKLOG, ssl_context=server_ssl(args))
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()


def main() -> None:
    run_peer(__doc__.splitlines()[0], serving)


if __name__ == "__main__":
    main()
