"""Micro-benchmark of Enjent's whole echo path in-process, with no sockets.

Like ``parser_bench``, this imports ``enjent`` on purpose. It builds the
server of ``examples/echo.py``, opens ``--connections`` connections on a
transport that only counts what is written, upgrades them, and feeds each
reads of ``--per-read`` masked frames of ``--size`` bytes, round robin: the
parser, the dispatch to ``on_message``, ``client.send``, the queueing of the
read's answers and their one write, without the kernel or the event loop's
I/O. It reports CPU microseconds per message for each repeat, and checks that
every message was answered with the frame it should have been::

    python -m loadtest.echo_path [--size 32] [--per-read 8] [--messages 200000] [--repeat 5]

Instructions instead of seconds (repeatable on a noisy machine): run it under
``valgrind --tool=callgrind`` with ``--messages 0`` and with ``--messages N``
``--repeat 1``; the difference of the two totals over N is the instructions
per message.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from enjent.frames import Opcode, encode_frame

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class CountingTransport:
    """What a connection needs of a transport; counts the bytes written."""

    def __init__(self) -> None:
        self.written = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, chunks: Any) -> None:
        self.written += sum(map(len, chunks))
        self.writes += 1

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def _request() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


async def run(
    *,
    size: int,
    per_read: int,
    connections: int,
    messages: int,
    repeat: int,
    seed: int,
    limits: bool = False,
) -> list[float]:
    """CPU microseconds per echoed message, one figure per repeat."""
    sys.path.insert(0, str(_EXAMPLES))
    from echo import build_server  # examples/echo.py: the server the load tests run

    options: dict[str, object] = {}
    if limits:  # the limits on, never reached: what checking them costs
        from enjent import AddressLimits

        options = {
            "max_message_rate": 10**9,
            "address_limits": AddressLimits(max_connections=10**6, max_handshakes_per_second=10**6),
        }
    server = build_server(**options)
    opened = []
    for _ in range(connections):
        connection = server.new_connection()
        transport = CountingTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(_request())
        if connection.client is None:
            raise RuntimeError("the upgrade failed: the server did not open the connection")
        opened.append((connection, transport, transport.written))
    rng = random.Random(seed)
    read = b"".join(
        encode_frame(Opcode.BINARY, rng.randbytes(size), mask=rng.randbytes(4))
        for _ in range(per_read)
    )
    rounds = messages // (per_read * connections)
    figures = []
    for _ in range(repeat if rounds else 0):
        start = time.process_time()
        for _ in range(rounds):
            for connection, _, _ in opened:
                connection.data_received(read)
        elapsed = time.process_time() - start
        figures.append(elapsed / (rounds * per_read * connections) * 1e6)
    answer = len(encode_frame(Opcode.BINARY, bytes(size)))
    expected = rounds * repeat * per_read * answer
    for _connection, transport, after_upgrade in opened:
        if transport.written - after_upgrade != expected:
            raise RuntimeError(
                f"a connection wrote {transport.written - after_upgrade} bytes of answers, "
                f"expected {expected}"
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32, help="payload bytes per message")
    parser.add_argument("--per-read", type=int, default=8, help="frames per read")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per repeat")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--limits",
        action="store_true",
        help="max_message_rate and address_limits on (never reached): what checking costs",
    )
    args = parser.parse_args(argv)
    if args.size < 0 or min(args.per_read, args.connections, args.repeat) < 1:
        parser.error("--per-read, --connections and --repeat must be at least 1, --size >= 0")
    if args.messages < 0:
        parser.error("--messages must be >= 0")
    import uvloop

    figures = uvloop.run(
        run(
            size=args.size,
            per_read=args.per_read,
            connections=args.connections,
            messages=args.messages,
            repeat=args.repeat,
            seed=args.seed,
            limits=args.limits,
        )
    )
    for number, value in enumerate(figures, 1):
        print(f"repeat {number}: {value:.3f} µs of CPU per {args.size} B message echoed")
    if not figures:
        print("no messages: set up only (the base for an instruction count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
