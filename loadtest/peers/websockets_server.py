"""The echo-and-broadcast app on the `websockets` library (its asyncio implementation).

Layer 5 of DESIGN.md: a peer to compare Enjent with. Same contract as examples/echo.py;
permessage-deflate (unless `--compression deflate`) and keepalive pings are off, as
loadtest's clients use neither (unless `--offer-deflate`).
"""

from __future__ import annotations

import asyncio
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve

from loadtest.peers import BACKLOG, BROADCAST_PREFIX, MAX_MESSAGE, parse_args

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


async def serve_until_signal(host: str, port: int, compression: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop)
    async with serve(
        handler,
        host,
        port,
        compression=compression,
        ping_interval=None,
        max_size=MAX_MESSAGE,
        backlog=BACKLOG,
    ):
        await stop


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    compression = "deflate" if args.compression == "deflate" else None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve_until_signal(args.host, args.port, compression))
            return
    asyncio.run(serve_until_signal(args.host, args.port, compression))


if __name__ == "__main__":
    main()
