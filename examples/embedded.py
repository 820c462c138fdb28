"""Enjent inside an existing asyncio program.

The program already has work of its own (here: a clock that ticks every
``--tick`` seconds). It serves WebSockets beside it with
``async with server.serve(host, port)``: no thread, no second event loop.
Each tick is broadcast to every client; a client's messages are echoed. The
program stops by itself after ``--duration`` seconds, or on SIGINT/SIGTERM,
and the server then closes every client with 1001 (Going Away).

    python examples/embedded.py --host 127.0.0.1 --port 9003 --duration 30

It prints ``listening on ws://HOST:PORT/`` once it accepts clients
(``--port 0`` lets the system choose the port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

from enjent import WebSocketClient, WebSocketServer


async def clock(server: WebSocketServer, interval: float) -> None:
    """The program's own work: count ticks, and tell the WebSocket clients."""
    tick = 0
    while True:
        await asyncio.sleep(interval)
        tick += 1
        server.broadcast(f"tick {tick} {time.strftime('%H:%M:%S')}")


async def main(host: str, port: int, duration: float, tick: float) -> int:
    server = WebSocketServer(close_timeout=2.0)

    @server.on_message
    def echo(client: WebSocketClient, message: str | bytes) -> None:
        client.send(message)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async with server.serve(host, port):
        print(f"listening on ws://{host}:{server.port}/", flush=True)
        worker = asyncio.create_task(clock(server, tick))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        print(f"stopping with {server.client_count} client(s)", flush=True)
    # leaving the block stopped the server: every client got Close 1001
    print("stopped", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9003, help="port to listen on (0: any)")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds before stopping by itself"
    )
    parser.add_argument("--tick", type=float, default=1.0, help="seconds between ticks")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(asyncio.run(main(args.host, args.port, args.duration, args.tick)))
