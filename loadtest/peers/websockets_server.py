"""The echo-and-broadcast app on the `websockets` library (its asyncio implementation).

Layer 5 of docs/architecture.md: a peer to compare Enjent with. Same contract as examples/echo.py;
permessage-deflate (unless `--compression deflate`) and keepalive pings are off, as
loadtest's clients use neither (unless `--offer-deflate`).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from websockets.asyncio.server import ServerConnection, broadcast, serve

from loadtest.peers import BACKLOG, BROADCAST_PREFIX, MAX_MESSAGE, run_peer, server_ssl

CLIENTS: set[ServerConnection] = set()


async def handler(connection: ServerConnection) -> None:
    CLIENTS.add(connection)
    try:
        async for message in connection:
            if isinstance(message, str) and message.startswith(BROADCAST_PREFIX):
                broadcast(CLIENTS, message[len(BROADCAST_PREFIX) :])
            else:
                await connection.send(message)
    finally:
        CLIENTS.discard(connection)


@asynccontextmanager
async def serving(args: argparse.Namespace) -> AsyncIterator[None]:
    async with serve(
        handler,
        args.host,
        args.port,
        compression="deflate" if args.compression == "deflate" else None,
        ping_interval=None,
        max_size=MAX_MESSAGE,
        backlog=BACKLOG,
        ssl=server_ssl(args),
    ):
        yield


def main() -> None:
    run_peer(__doc__.splitlines()[0], serving)


if __name__ == "__main__":
    main()
