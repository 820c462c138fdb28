"""The floor of memory per connection: a bare uvloop server that does nothing.

Layer 5 of docs/architecture.md (it does not import ``enjent``). A child process runs
an ``asyncio.Protocol`` that accepts and ignores everything on uvloop; this
process opens ``--connections`` plain TCP connections to it and reports the
growth of the child's USS per connection: what uvloop's own transport and
libuv handle cost, under any WebSocket server built on them. Bounded::

    python -m loadtest.transport_floor [--connections 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import time

import psutil


def _serve(port: int) -> None:
    import uvloop

    class Ignore(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Ignore, "127.0.0.1", port, backlog=4096)
        await asyncio.sleep(600)  # bounded: the parent kills it long before

    uvloop.run(main())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(connections: int) -> float:
    """USS growth of the bare server per connection, in bytes."""
    port = _free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "loadtest.transport_floor", "--serve", str(port)]
    )
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare server did not start") from None
                time.sleep(0.05)
        process = psutil.Process(child.pid)
        time.sleep(0.3)
        before = process.memory_full_info().uss
        for _ in range(connections):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # let the server accept them all
        after = process.memory_full_info().uss
        return (after - before) / connections
    finally:
        for sock in sockets:
            sock.close()
        child.kill()
        child.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not 1 <= args.connections <= hard - 100:
        parser.error(f"--connections must be between 1 and {hard - 100} (RLIMIT_NOFILE)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_connection = measure(args.connections)
    print(
        f"bare uvloop server: {per_connection:,.0f} B of USS per connection "
        f"({args.connections} connections)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
