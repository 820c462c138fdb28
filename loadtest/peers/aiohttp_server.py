"""The echo-and-broadcast app on aiohttp's WebSocket server.

Layer 5 of DESIGN.md: a second peer to compare Enjent with. Same contract as
examples/echo.py; compression off and no heartbeat, as loadtest's clients use neither.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import WSMsgType, web

from loadtest.peers import BACKLOG, BROADCAST_PREFIX, MAX_MESSAGE, parse_args

CLIENTS: set[web.WebSocketResponse] = set()


async def handler(request: web.Request) -> web.WebSocketResponse:
    connection = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE)
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


async def serve_until_signal(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop)
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=BACKLOG)
    await site.start()
    try:
        await stop
    finally:
        await runner.cleanup()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve_until_signal(args.host, args.port))
            return
    asyncio.run(serve_until_signal(args.host, args.port))


if __name__ == "__main__":
    main()
