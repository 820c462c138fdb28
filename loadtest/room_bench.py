"""Does a room broadcast cost more when many clients are not addressed?

Like ``parser_bench``, this one imports ``enjent`` on purpose: it runs a
``WebSocketServer`` in this process, connects ``--members`` clients that
join one room and, in turn, 0 and then more idle clients that join other
rooms, and times ``room.broadcast`` inside the server (the cost the
application pays per call; delivery is the kernel's). Seeded and bounded::

    python -m loadtest.room_bench [--members 10] [--others 0,1000,8000] [--calls 2000]

the promise of docs/architecture.md: a room broadcast to 10 clients costs the same with 10
or 10,000 other clients connected. The ratio column shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import sys
import time

from enjent import WebSocketServer
from enjent.server import run_event_loop


class _Idle(asyncio.Protocol):
    """A raw client that upgrades and then reads and drops whatever comes."""

    def __init__(self, path: bytes) -> None:
        self.path = path

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        key = base64.b64encode(os.urandom(16))
        transport.write(  # type: ignore[attr-defined]
            b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        pass


async def _measure(members: int, others: list[int], calls: int) -> list[tuple[int, float]]:
    server = WebSocketServer(ping_interval=None, compression=None, max_connections=100_000)

    @server.on_connect
    def join(client: object) -> None:
        path = client.request.path  # type: ignore[attr-defined]
        client.join("target" if path == "/target" else f"other-{path[1:]}")  # type: ignore[attr-defined]

    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    transports = []

    async def connect(count: int, path: bytes) -> None:
        for index in range(count):
            target = path if path == b"/target" else b"/%d" % (index % 100)
            transport, _ = await loop.create_connection(
                lambda target=target: _Idle(target), "127.0.0.1", server.port
            )
            transports.append(transport)

    async def settle(total: int) -> None:
        deadline = time.monotonic() + 60
        while server.client_count < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {server.client_count} of {total} clients connected")
            await asyncio.sleep(0.05)

    await connect(members, b"/target")
    connected = members
    results = []
    room = server.room("target")
    payload = "x" * 32
    try:
        for count in others:
            await connect(count - (connected - members), b"/other")
            connected = members + count
            await settle(connected)
            for _ in range(50):  # warm up
                room.broadcast(payload)
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            for _ in range(calls):
                if room.broadcast(payload) != members:
                    raise RuntimeError("a room broadcast missed a member")
            elapsed = time.perf_counter() - start
            results.append((count, elapsed / calls * 1e6))
            await asyncio.sleep(0.2)  # let the kernel deliver
    finally:
        for transport in transports:
            transport.close()
        await server.stop(close_timeout=1.0)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10, help="clients in the room")
    parser.add_argument(
        "--others", default="0,1000,8000", help="idle clients in other rooms, in turn"
    )
    parser.add_argument("--calls", type=int, default=2000, help="broadcasts per measurement")
    args = parser.parse_args(argv)
    others = sorted({int(value) for value in args.others.split(",")})
    if args.members < 1 or args.calls < 1 or others[0] < 0 or others[-1] > 9000:
        parser.error("--members and --calls must be positive, --others between 0 and 9000")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * (args.members + others[-1]) + 100
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    results = run_event_loop(_measure(args.members, others, args.calls))
    base = results[0][1]
    print(f"room of {args.members}: cost of one room.broadcast() inside the server")
    print(f"{'other clients':>14}  {'us per call':>11}  {'ratio':>6}")
    for count, micros in results:
        print(f"{count:>14,}  {micros:>11.1f}  {micros / base:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
