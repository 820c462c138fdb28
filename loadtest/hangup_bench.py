"""How long does a worker stall when thousands of clients hang up at once?

Like ``room_bench``, this one imports ``enjent`` on purpose: it runs a
``WebSocketServer`` in this process, has a client process (``loadtest.cluster_scale
--child``, which never imports enjent) open ``--clients`` idle connections, then
makes that process exit (the kernel closes every socket together) and reports
the longest gap of a 5 ms ticker on the server's loop meanwhile, the time until
the server counts 0 clients, and the CPU it spent. Bounded::

    python -m loadtest.hangup_bench [--clients 18000]

(2026-12-01, 18,000 clients: the longest stall was 296 ms when every socket
was closed in the turn that read its end of file, 42 ms with closes batched
256 per turn.)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from enjent import WebSocketServer
from enjent.server import run_event_loop


async def _measure(clients: int, host: str, source: str) -> dict[str, float]:
    server = WebSocketServer(ping_interval=None, max_connections=clients + 100)
    await server.start(host, 0)
    command = [sys.executable, "-m", "loadtest.cluster_scale", "--child", "--host", host]
    command += ["--port", str(server.port), "--count", str(clients), "--source", source]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loop = asyncio.get_running_loop()
    try:
        assert child.stdout is not None and child.stdin is not None
        await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 300)
        deadline = loop.time() + 30
        while server.client_count < clients and loop.time() < deadline:
            await asyncio.sleep(0.1)
        opened = server.client_count
        gaps: list[float] = []
        running = True

        async def ticker() -> None:
            last = time.perf_counter()
            while running:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = loop.create_task(ticker())
        await asyncio.sleep(0.1)
        cpu, started = time.process_time(), time.perf_counter()
        child.stdin.write("close\n")
        child.stdin.flush()
        deadline = loop.time() + 30
        while server.client_count > 0 and loop.time() < deadline:
            await asyncio.sleep(0.001)
        to_zero = time.perf_counter() - started
        spent = time.process_time() - cpu
        await asyncio.sleep(0.2)
        running = False
        await task
    finally:
        child.kill()
        child.wait(10)
        await server.stop(close_timeout=1.0)
    return {
        "clients": opened,
        "longest_stall_ms": round(max(gaps) * 1000, 1),
        "count_zero_after_s": round(to_zero, 3),
        "server_cpu_s": round(spent, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.hangup_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=18_000, help="default 18000 (< 20000 fds)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on")
    parser.add_argument("--source", default="127.0.0.4", help="the clients' source address")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 19_000:
        parser.error("--clients must be from 1 to 19000 (one process's open files)")
    result = run_event_loop(_measure(args.clients, args.host, args.source))
    for key, value in result.items():
        print(f"{key:>20}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
