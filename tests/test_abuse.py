"""Abuse against a running server: hostile clients while well-behaved ones keep working.

Each test starts the server in its own process (uvloop, as ``server.run``
does) so that its RSS and file descriptors can be measured with psutil,
keeps an ordinary client connected that must go on getting echoes, and
checks the stated outcome: the status or close code, the memory bound, and
that connections and descriptors come back. Garbage on the cluster bus is
published straight to the broker of a real two-worker cluster. The numbers
are in ``RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from clusterutil import Cluster, close_all, healthz_of, open_client_on, poll, wait_for
from websockets.asyncio.client import ClientConnection, connect
from wsutil import upgrade_request

from enjent.cluster import bus
from enjent.frames import encode_frame

HOST = "127.0.0.1"
MASK = b"\x11\x22\x33\x44"
MIB = 1024 * 1024

SERVER_APP = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys, time
    from enjent import WebSocketServer
    from enjent.server import run_event_loop

    options = json.loads(sys.argv[1])
    server = WebSocketServer(**options)

    async def pour(count, size):
        stamp = time.time
        for index in range(count):
            server.broadcast(stamp().hex().encode().ljust(size, b"."))
            if index % 8 == 7:
                await asyncio.sleep(0.016)  # about 500 messages a second

    @server.on_message
    def on_message(client, message):
        if message == "stats":
            client.send(json.dumps({**server.stats, "clients": len(server.local_clients),
                                    "connections": server.connection_count}))
        elif message == "pour-self":
            sent = [client.send(b"z" * 30_000) for _ in range(200)]
            print("pour-self", sent.count(True), file=sys.stderr, flush=True)
        elif isinstance(message, str) and message.startswith("join:"):
            try:
                client.join(message[len("join:"):])
            except ValueError as exc:  # RoomLimitError
                client.send(f"refused: {type(exc).__name__}")
            else:
                client.send("joined")
        elif isinstance(message, str) and message.startswith("pour:"):
            _, count, size = message.split(":")
            asyncio.get_running_loop().create_task(pour(int(count), int(size)))
        else:
            client.send(message)

    async def main():
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await server.start("127.0.0.1", 0)
        print(server.port, flush=True)
        await stop.wait()
        await server.stop()

    run_event_loop(main())
    """
)


class ServerProcess:
    """The abuse app in a child process; ``rss``/``fds`` measure it."""

    def __init__(self, tmp_path: Path, *, nofile: int = 0, **options: Any) -> None:
        script = tmp_path / "abuse_app.py"
        script.write_text(SERVER_APP)
        options.setdefault("ping_interval", None)
        options.setdefault("compression", None)
        self.log_path = tmp_path / f"abuse-{len(list(tmp_path.glob('abuse-*.log')))}.log"

        def limit_files() -> None:  # in the child, before exec
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            preexec_fn=limit_files,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the server did not start"
        self.port = int(line)
        self.process = psutil.Process(self.proc.pid)

    @property
    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    @property
    def fds(self) -> int:
        return int(self.process.num_fds())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_server(tmp_path: Path) -> Any:
    started: list[ServerProcess] = []

    def start(**options: Any) -> ServerProcess:
        server = ServerProcess(tmp_path, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run(main: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main, timeout)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def ws(port: int, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    options: dict[str, Any] = {
        "open_timeout": 5,
        "close_timeout": 2,
        "ping_interval": None,
        "max_size": None,
        "proxy": None,
    }
    options.update(kwargs)
    async with connect(f"ws://{HOST}:{port}/", **options) as connection:
        yield connection


async def echo_latency(client: ClientConnection, text: str = "are you there") -> float:
    """One echo round trip through the ordinary client; fails after 5 s."""
    started = time.monotonic()
    await client.send(text)
    while True:
        reply = await asyncio.wait_for(client.recv(), 5)
        if reply == text:
            return time.monotonic() - started


async def stats(client: ClientConnection) -> dict[str, int]:
    await client.send("stats")
    while True:
        reply = await asyncio.wait_for(client.recv(), 5)
        if isinstance(reply, str) and reply.startswith("{"):
            data: dict[str, int] = json.loads(reply)
            return data


class Raw:
    """A raw client socket: handshake by hand, then any bytes at all."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, handshake: bool = True, rcvbuf: int = 0) -> Raw:
        sock = None
        if rcvbuf:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(HOST, port)
        raw = cls(reader, writer)
        if handshake:
            writer.write(upgrade_request())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 "), head
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_all(self, timeout: float = 5.0) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionError:
            return b""

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read up to the server's close frame; its code (``None``: none came)."""
        buffer = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                remaining = deadline - time.monotonic()
                chunk = await asyncio.wait_for(self.reader.read(1 << 20), max(remaining, 0.01))
            except ConnectionError:
                return None
            if not chunk:
                return None
            buffer += chunk
            pos = 0
            while len(buffer) - pos >= 2:  # drop the complete frames, keep a partial one
                opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
                start = pos + 2 + (2 if length == 126 else 8 if length == 127 else 0)
                if length >= 126:
                    length = int.from_bytes(buffer[pos + 2 : start], "big")
                if len(buffer) < start + length:
                    break
                if opcode == 8:
                    return int.from_bytes(buffer[start : start + 2], "big")
                pos = start + length
            del buffer[:pos]

    async def http_status(self, data: bytes, timeout: float = 5.0) -> int:
        self.send(data)
        response = await self.read_all(timeout)
        return int(response.split(b" ", 2)[1])

    def close(self, *, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        self.writer.close()


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    pos = 0
    while len(data) - pos >= 2:
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        if pos + length > len(data):
            break
        frames.append((opcode, data[pos : pos + length]))
        pos += length
    return frames


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def report(name: str, **numbers: Any) -> None:
    """Print the measured numbers (``pytest -s`` shows them; RELIABILITY.md quotes them)."""
    print(f"\n[abuse] {name}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


# ---------------------------------------------------------------- tests


def test_slowloris_2000_half_requests_are_dropped_after_handshake_timeout(
    start_server: Any,
) -> None:
    """2000 connections send half a request and stall: dropped, fds back, others served."""
    server = start_server(handshake_timeout=2.0, sweep_interval=0.2)
    count = 2000

    async def main() -> None:
        async with ws(server.port) as ordinary:
            await echo_latency(ordinary)
            fds_before, rss_before = server.fds, server.rss
            sockets = []
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect((HOST, server.port))
                sockets.append(sock)
            await asyncio.sleep(0.2)
            half = upgrade_request()[:40]
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(half)
            started = time.monotonic()
            peak_fds = await poll(lambda: server.fds >= fds_before + count // 2 and server.fds, 5)
            latency = await echo_latency(ordinary)  # served while the stall goes on
            rss_peak = server.rss
            await poll(lambda: server.fds <= fds_before + 2, 10)
            dropped_after = time.monotonic() - started
            data = await stats(ordinary)
            assert data["handshake_timeouts"] >= count
            assert data["connections"] == 1
            closed = 0
            for sock in sockets:
                try:
                    closed += sock.recv(10) == b""
                except (ConnectionResetError, BlockingIOError):
                    closed += 1
                sock.close()
            assert closed == count
            assert 1.8 < dropped_after < 6.0
            assert latency < 1.0
            assert rss_peak - rss_before < 40 * MIB
            report(
                "slowloris",
                connections=count,
                peak_fds=peak_fds,
                dropped_after_s=round(dropped_after, 2),
                echo_latency_ms=round(latency * 1000, 1),
                rss_growth_mib=round((rss_peak - rss_before) / MIB, 1),
            )

    run(main())
    assert server.alive()


def test_connection_flood_beyond_max_connections_gets_503(start_server: Any) -> None:
    server = start_server(max_connections=100)

    async def main() -> None:
        async with ws(server.port) as ordinary:
            clients = [await Raw.open(server.port) for _ in range(99)]
            rss_before = server.rss
            refused = await asyncio.gather(*(_status_of_upgrade(server.port) for _ in range(200)))
            assert refused == [503] * 200
            latency = await echo_latency(ordinary)
            for client in clients[:10]:
                client.close()
            data = await poll(
                lambda: _clients_at_most(ordinary, 90), 5
            )  # room again: new clients get in
            async with ws(server.port) as newcomer:
                await echo_latency(newcomer)
            for client in clients[10:]:
                client.close()
            report(
                "connection flood",
                max_connections=100,
                refused_503=len(refused),
                echo_latency_ms=round(latency * 1000, 1),
                rss_growth_mib=round((server.rss - rss_before) / MIB, 1),
                clients_after_close=data["clients"],
            )

    run(main())
    assert server.alive()


async def _status_of_upgrade(port: int) -> int:
    raw = await Raw.open(port, handshake=False)
    return await raw.http_status(upgrade_request())


async def _clients_at_most(client: ClientConnection, limit: int) -> dict[str, int] | None:
    data = await stats(client)
    return data if data["clients"] <= limit else None


def test_a_refused_client_still_sending_gets_its_answer(start_server: Any) -> None:
    """A head over the limit, and the client goes on sending: the 431 must still arrive.

    Closing at once with the client's bytes unread makes the kernel answer RST, which can
    destroy the answer before the client reads it; the server half-closes instead, drops
    what still comes and closes on the client's EOF (or after close_timeout).
    """
    server = start_server()

    async def main() -> None:
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(upgrade_request()[:-2] + b"X: " + b"y" * 40000)
            for _ in range(10):  # still sending after the refusal
                writer.write(b"y" * 16384)
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(writer.drain(), 2)
                await asyncio.sleep(0.005)
            answer = b""
            with contextlib.suppress(asyncio.IncompleteReadError):
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            assert answer.startswith(b"HTTP/1.1 431"), answer
            rest = await asyncio.wait_for(reader.read(), 5)  # the whole answer, then FIN
            assert b"\r\n\r\n" in rest, rest
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    run(main())


def test_oversized_request_line_and_headers_get_414_and_431(start_server: Any) -> None:
    server = start_server()

    async def main() -> None:
        async with ws(server.port) as ordinary:
            long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n"
            raw = await Raw.open(server.port, handshake=False)
            assert await raw.http_status(long_line) == 414
            huge = upgrade_request("/", *(f"X-Pad-{i}: {'v' * 300}" for i in range(80)))
            raw = await Raw.open(server.port, handshake=False)
            assert await raw.http_status(huge) == 431
            endless = upgrade_request()[:-2] + b"X: " + b"y" * 40000  # never ends
            raw = await Raw.open(server.port, handshake=False)
            assert await raw.http_status(endless) == 431
            await echo_latency(ordinary)

    run(main())
    assert server.alive()


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + MASK, 1002),
        (bytes([0x82, 0xFF]) + (64 * MIB).to_bytes(8, "big") + MASK, 1009),
        (bytes([0x82, 0xFE, 0xFF, 0xFF]) + MASK, 1009),
        (encode_frame(1, b"not masked"), 1002),
    ],
    ids=["length-2^63", "length-64MiB", "length-65535", "unmasked"],
)
def test_bad_frame_headers_are_refused_before_any_payload(
    start_server: Any, header: bytes, code: int
) -> None:
    server = start_server(max_message_size=60000)

    async def main() -> None:
        async with ws(server.port) as ordinary:
            raw = await Raw.open(server.port)
            raw.send(header)  # and never the payload it announces
            assert await raw.close_code() == code
            await echo_latency(ordinary)

    run(main())
    assert server.alive()


def test_endless_fragmented_message_is_closed_1009_and_empty_fragments_keep_memory_flat(
    start_server: Any,
) -> None:
    server = start_server(max_message_size=MIB)

    async def main() -> None:
        async with ws(server.port) as ordinary:
            raw = await Raw.open(server.port)
            # read while sending: once the server closes, more data from us
            # makes its kernel answer RST, which would discard the close frame
            close_code = asyncio.create_task(raw.close_code(10))
            raw.send(masked(2, b"x" * 1000, fin=False))
            chunk = masked(0, b"y" * 1000, fin=False) * 64
            sent = 0
            for _ in range(100):  # 6.4 MB offered against a 1 MiB limit
                if close_code.done():
                    break
                raw.send(chunk)
                sent += len(chunk)
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(raw.writer.drain(), 5)
            # The server sends 1009, shuts down its side and reads until we
            # close (lingering close): our data still in flight cannot make its
            # kernel reset the connection before we read the close frame.
            assert await close_code == 1009
            assert sent > MIB
            data = await stats(ordinary)
            assert data["protocol_errors"] == 1 and data["clients"] == 1

            empty = await Raw.open(server.port)
            empty.send(masked(2, b"start", fin=False))
            rss_before = server.rss
            burst = masked(0, b"", fin=False) * 50_000
            for _ in range(20):  # 1,000,000 empty fragments, 6 MB
                empty.send(burst)
                await empty.writer.drain()
            await echo_latency(ordinary)  # the server has read them all
            growth = server.rss - rss_before
            empty.send(masked(0, b"end"))
            frames = parse_frames(await asyncio.wait_for(empty.reader.read(100), 5))
            assert frames == [(2, b"startend")]
            assert growth < 8 * MIB, growth
            empty.close()
            report(
                "empty fragments",
                fragments=1_000_000,
                rss_growth_mib=round(growth / MIB, 1),
            )
            await echo_latency(ordinary)

    run(main())
    assert server.alive()


def test_ping_flood_is_answered_with_memory_flat(start_server: Any) -> None:
    server = start_server()
    pings = 100_000

    async def main() -> None:
        async with ws(server.port) as ordinary:
            raw = await Raw.open(server.port)
            rss_before = server.rss
            payload = b"p" * 125
            frame = masked(9, payload)
            pongs = 0
            buffer = b""
            expected = encode_frame(10, payload)

            async def read_pongs() -> None:
                nonlocal pongs, buffer
                while pongs < pings:
                    data = await asyncio.wait_for(raw.reader.read(1 << 16), 10)
                    assert data, "the server closed the flooding client"
                    buffer += data
                    whole = len(buffer) // len(expected)
                    assert buffer[: whole * len(expected)] == expected * whole
                    pongs += whole
                    buffer = buffer[whole * len(expected) :]

            reader = asyncio.create_task(read_pongs())
            latencies = []
            rss_peak = 0
            for _ in range(pings // 1000):
                raw.send(frame * 1000)
                await raw.writer.drain()
                if len(latencies) < 20:
                    latencies.append(await echo_latency(ordinary))
                rss_peak = max(rss_peak, server.rss)
            await asyncio.wait_for(reader, 20)
            assert pongs == pings
            growth = rss_peak - rss_before
            assert growth < 16 * MIB, growth
            assert max(latencies) < 1.0
            report(
                "ping flood",
                pings=pings,
                pongs=pongs,
                rss_growth_mib=round(growth / MIB, 1),
                echo_latency_max_ms=round(max(latencies) * 1000, 1),
            )
            raw.close()

    run(main())
    assert server.alive()


def test_clients_vanishing_mid_frame_leak_nothing(start_server: Any) -> None:
    server = start_server()
    count = 200

    async def main() -> None:
        async with ws(server.port) as ordinary:
            await echo_latency(ordinary)
            fds_before = server.fds
            clients = [await Raw.open(server.port) for _ in range(count)]
            for index, client in enumerate(clients):
                client.send(masked(2, b"z" * 5000)[: 100 + index])  # header and part of it
            await poll(lambda: _clients_at_least(ordinary, count + 1), 5)
            for index, client in enumerate(clients):
                client.close(reset=index % 2 == 0)  # half FIN, half RST
            data = await poll(lambda: _clients_at_most(ordinary, 1), 10)
            await poll(lambda: server.fds <= fds_before, 5)
            assert data["connections"] == 1
            report("vanish mid-frame", clients=count, fds_before=fds_before, fds_after=server.fds)

    run(main())
    assert server.alive()


async def _clients_at_least(client: ClientConnection, count: int) -> bool:
    return (await stats(client))["clients"] >= count


def test_never_reading_clients_are_closed_3008_and_fast_clients_keep_their_latency(
    start_server: Any,
) -> None:
    """5 clients never read while 2000 broadcasts of 16 KiB (32 MiB each) pour in."""
    write_limit = 1024 * 1024
    server = start_server(write_limit=write_limit, close_timeout=20.0)
    messages, size = 2000, 16 * 1024

    async def main() -> None:
        slow = [await Raw.open(server.port, rcvbuf=4096) for _ in range(5)]
        async with contextlib.AsyncExitStack() as stack:
            fast = [await stack.enter_async_context(ws(server.port)) for _ in range(5)]
            rss_before = server.rss
            latencies: list[float] = []
            rss_peak = 0

            async def consume(client: ClientConnection) -> int:
                received = 0
                while received < messages:
                    message = await asyncio.wait_for(client.recv(), 10)
                    assert isinstance(message, bytes)
                    sent_at = float.fromhex(message[:24].rstrip(b".").decode())
                    latencies.append(time.time() - sent_at)
                    received += 1
                return received

            readers = [asyncio.create_task(consume(client)) for client in fast]
            await fast[0].send(f"pour:{messages}:{size}")
            while not all(reader.done() for reader in readers):
                rss_peak = max(rss_peak, server.rss)
                await asyncio.sleep(0.05)
            counts = [reader.result() for reader in readers]
            assert counts == [messages] * 5
            data = await stats(fast[1])
            growth = rss_peak - rss_before
            codes = await asyncio.gather(*(client.close_code(10) for client in slow))
            latencies.sort()
            p99 = latencies[int(len(latencies) * 0.99)]
            report(
                "slow consumers",
                slow_closed=data["slow_consumers_closed"],
                close_codes=codes,
                rss_growth_mib=round(growth / MIB, 1),
                fast_p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
                fast_p99_ms=round(p99 * 1000, 1),
            )
            assert data["slow_consumers_closed"] == 5
            assert codes == [3008] * 5
            assert growth < 48 * MIB, growth
            assert p99 < 0.5

    run(main(), timeout=90)
    assert server.alive()


# ------------------------------------------------------------ bus garbage


def test_garbage_on_the_bus_is_counted_and_the_cluster_keeps_working() -> None:
    corpus = Path(__file__).parent / "corpus"
    garbage = [
        (corpus / "bus" / "unknown-kind.msgpack").read_bytes(),
        (corpus / "bus" / "not-msgpack.msgpack").read_bytes(),
        (corpus / "bus" / "array32-claim.msgpack").read_bytes(),
        (corpus / "crashers" / "bus-heartbeat-str-pid.msgpack").read_bytes(),
        b"\x00" * (16 * MIB),  # huge, under the limit: reaches the workers, malformed
    ]
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        process_tree = [psutil.Process(cluster.pid), *cluster.children()]
        broker = cluster.broker_pid()
        malformed_before = [healthz_of(cluster.port, shard)["bus"]["malformed"] for shard in (0, 1)]
        rss_before = sum(p.memory_info().rss for p in process_tree)
        runtime = cluster.runtime_dirs()[0]
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 1000)
        pub.connect(f"ipc://{runtime}/bus-in")
        try:
            time.sleep(0.5)  # the broker's subscriptions reach the new publisher
            for body in garbage:
                pub.send_multipart([bus.TOPIC_ALL, body])
            pub.send_multipart([bus.TOPIC_ALL])  # one part only
            pub.send_multipart([bus.TOPIC_ALL, b"\x00" * (bus.MAX_BODY + 8192)])  # over the limit

            def counted() -> list[int] | None:
                now = [healthz_of(cluster.port, shard)["bus"]["malformed"] for shard in (0, 1)]
                added = [
                    after - before for after, before in zip(now, malformed_before, strict=True)
                ]
                return added if all(n >= len(garbage) + 1 for n in added) else None

            added = wait_for(counted, 15)
        finally:
            pub.close()
            context.term()
        rss_after = sum(p.memory_info().rss for p in process_tree)
        assert cluster.broker_pid() == broker  # the broker did not fall over
        # a malformed envelope changed nothing: both workers still know each other
        for shard in (0, 1):
            assert all(w["pid"] for w in healthz_of(cluster.port, shard)["workers"])

        async def still_one_server() -> None:
            a = await open_client_on(cluster.port, 0)
            b = await open_client_on(cluster.port, 1)
            try:
                await a.ws.send("broadcast:still here")
                assert await b.next() == "still here"
                assert await a.next() == "still here"
            finally:
                await close_all([a, b])

        run(still_one_server())
        gaps = [healthz_of(cluster.port, shard)["bus"]["gaps"] for shard in (0, 1)]
        assert gaps == [0, 0]
        report(
            "bus garbage",
            malformed_counted_per_worker=added,
            rss_tree_growth_mib=round((rss_after - rss_before) / MIB, 1),
        )
        assert rss_after - rss_before < 96 * MIB


# ------------------------------------------- bounded per connection (issue 13)


def test_tiny_fragments_cost_about_their_payload_and_never_block_the_loop(
    start_server: Any,
) -> None:
    """1-byte fragments up to the default 1 MiB limit: RSS grows <= 4 MB (was +56 MB)."""
    server = start_server()

    async def main() -> None:
        async with ws(server.port) as ordinary:
            raw = await Raw.open(server.port)
            raw.send(masked(2, b"x", fin=False))
            await echo_latency(ordinary)
            rss_before = server.rss
            burst = masked(0, b"y", fin=False) * 20_000  # 140 KB of 7-byte frames
            held, latencies = 1, []
            while held + 20_000 < MIB:
                raw.send(burst)
                held += 20_000
                await asyncio.wait_for(raw.writer.drain(), 10)
                if held % 100_000 < 20_000:
                    latencies.append(await echo_latency(ordinary))
            latencies.append(await echo_latency(ordinary))  # the server read it all
            growth = server.rss - rss_before
            close_code = asyncio.create_task(raw.close_code(10))
            raw.send(masked(0, b"z" * 30_000, fin=False))  # over the limit now
            assert await close_code == 1009
            report(
                "tiny fragments",
                fragments=held,
                rss_growth_mib=round(growth / MIB, 2),
                worst_echo_ms=round(max(latencies) * 1000),
            )
            assert growth <= 4 * MIB, growth
            assert max(latencies) < 0.5, latencies
            await echo_latency(ordinary)

    run(main(), timeout=120)
    assert server.alive()


def test_long_room_names_and_many_rooms_are_refused_with_room_limit_error(
    start_server: Any,
) -> None:
    server = start_server()

    async def main() -> None:
        async with ws(server.port) as client:
            rss_before = server.rss
            for _ in range(60):  # 6 MB of names on the wire
                await client.send("join:" + "n" * 100_000)
                assert await asyncio.wait_for(client.recv(), 5) == "refused: RoomLimitError"
            answers = []
            for index in range(300):
                await client.send(f"join:room-{index}")
                answers.append(await asyncio.wait_for(client.recv(), 5))
            assert answers.count("joined") == 100  # max_rooms_per_client
            assert set(answers[100:]) == {"refused: RoomLimitError"}
            growth = server.rss - rss_before
            report("room limits", rss_growth_mib=round(growth / MIB, 2))
            assert growth < 16 * MIB, growth

    run(main())
    assert server.alive()


def test_long_room_names_on_two_workers_keep_the_tree_small() -> None:
    """60 joins of 100 KB names on 2 workers: the tree grows <= 64 MB (was +1.2 GB)."""
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        tree = [psutil.Process(cluster.pid), *cluster.children()]

        def tree_rss() -> int:
            return sum(int(process.memory_info().rss) for process in tree)

        before = tree_rss()

        async def main() -> None:
            async with ws(cluster.port) as client:
                for _ in range(60):
                    await client.send("join:" + "n" * 100_000)
                await client.send("whoami")  # answered after the 60 joins (refused)
                while not str(await asyncio.wait_for(client.recv(), 10)).startswith(("0-", "1-")):
                    pass

        run(main())
        growth = tree_rss() - before
        report("long room names, 2 workers", tree_rss_growth_mib=round(growth / MIB, 1))
        assert growth <= 64 * MIB, growth


def test_write_limit_holds_for_answers_to_the_senders_own_messages(start_server: Any) -> None:
    """200 sends of 30 KB from the client's own on_message, write_limit 64 KiB: 3008."""
    server = start_server(write_limit=64 * 1024)

    async def main() -> None:
        async with ws(server.port) as ordinary:
            raw = await Raw.open(server.port)
            rss_before = server.rss
            close_code = asyncio.create_task(raw.close_code(10))
            raw.send(masked(1, b"pour-self"))
            assert await close_code == 3008
            growth = server.rss - rss_before
            data = await stats(ordinary)
            assert data["slow_consumers_closed"] == 1
            report("self flood", rss_growth_mib=round(growth / MIB, 2))
            assert growth < 4 * MIB, growth

    run(main())


def test_at_the_open_file_limit_every_connection_gets_an_answer(start_server: Any) -> None:
    """RLIMIT_NOFILE 200: upgrades past the derived limit get 503, health still answers."""
    server = start_server(nofile=200)

    async def upgrade_status(opened: list[asyncio.StreamWriter]) -> int:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        opened.append(writer)
        writer.write(upgrade_request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ", 2)[1])

    async def main() -> tuple[list[int], int]:
        opened: list[asyncio.StreamWriter] = []
        try:
            statuses = [await upgrade_status(opened) for _ in range(160)]
            probe = await Raw.open(server.port, handshake=False)
            health = await probe.http_status(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return statuses, health
        finally:
            for writer in opened:
                writer.close()

    statuses, health = run(main())
    accepted = statuses.count(101)
    report("open-file limit 200", accepted=accepted, refused_503=statuses.count(503))
    assert set(statuses) == {101, 503}, statuses  # never a reset, never silence
    assert 100 <= accepted <= 140, accepted  # 200 less a reserve of 64 descriptors
    assert statuses[accepted:] == [503] * (160 - accepted)
    assert health == 200
    assert server.alive()
    assert "RLIMIT_NOFILE" in server.log_path.read_text()


# ------------------------------------------------ fair per worker (issue 13)


READERS = textwrap.dedent(
    """
    import asyncio, sys
    port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    UPGRADE = (
        "GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nUpgrade: websocket\\r\\n"
        "Connection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
        "Sec-WebSocket-Version: 13\\r\\n\\r\\n"
    ).encode()
    received = 0

    class Discard(asyncio.Protocol):  # reads every byte, parses none: a cheap reader
        def connection_made(self, transport):
            transport.write(UPGRADE)
            self.transport = transport
        def data_received(self, data):
            global received
            received += len(data)

    async def main():
        loop = asyncio.get_running_loop()
        readers = []
        for _ in range(count):
            readers.append((await loop.create_connection(Discard, "127.0.0.1", port))[1])
        print("ready", flush=True)
        await asyncio.sleep(seconds)
        print(received, flush=True)
        for reader in readers:
            reader.transport.close()

    asyncio.run(main())
    """
)


def _broadcast_loop_keeps_everyone_served(readers: int, seconds: float, p99_bound: float) -> None:
    from clusterutil import healthz, open_client_on

    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port

        # the readers in a process of their own: their reads must not starve
        # the bystanders' measurements (nor be starved by them)
        listener = subprocess.Popen(
            [sys.executable, "-c", READERS, str(port), str(readers), str(seconds + 3)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"

        async def main() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            bystanders = [await open_client_on(port, shard) for shard in (0, 1, 0, 1)]
            broadcaster = await Raw.open(port)
            latencies: dict[int, list[float]] = {0: [], 1: []}
            probes: list[float] = []
            stop_at = loop.time() + seconds
            burst = masked(1, b"broadcast:" + b"x" * 64) * 200

            async def broadcast() -> int:
                sent = 0
                while loop.time() < stop_at:
                    broadcaster.send(burst)
                    sent += 200
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(broadcaster.writer.drain(), 1.0)
                return sent

            async def measure(client: Any) -> None:
                token = 0
                while loop.time() < stop_at:
                    token += 1
                    text = f"echo-{client.id}-{token}"
                    started = loop.time()
                    await client.ws.send(text)
                    while (await client.next(10.0)) != text:
                        pass
                    latencies[client.shard].append(loop.time() - started)
                    await asyncio.sleep(0.2)

            def timed_healthz() -> float:
                # timed in the probing thread: the server's answer, not how late
                # this process's own loop (busy reading the broadcasts) resumes
                started = time.monotonic()
                healthz(port, 1.0)  # raises past 1 s
                return time.monotonic() - started

            async def probe_health() -> None:
                while loop.time() < stop_at:
                    probes.append(await loop.run_in_executor(None, timed_healthz))
                    await asyncio.sleep(0.5)

            sent, *_ = await asyncio.gather(
                broadcast(), *(measure(c) for c in bystanders), probe_health()
            )
            await asyncio.sleep(1.0)
            health = await loop.run_in_executor(None, healthz, port, 2.0)
            await close_all(bystanders)
            broadcaster.close()
            return {
                "sent": sent,
                "p99": {
                    shard: sorted(values)[int(0.99 * (len(values) - 1))]
                    for shard, values in latencies.items()
                },
                "samples": {shard: len(values) for shard, values in latencies.items()},
                "worst_probe": max(probes),
                "clients": health["clients"],
            }

        try:
            result = run(main(), timeout=seconds + 120)
            result["received"] = int(listener.communicate(timeout=30)[0].strip() or 0)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait(10)
        log = cluster.log()
    report("broadcast loop", readers=readers, seconds=seconds, **result)
    assert result["clients"] == readers + 4 + 1, result  # nobody lost, counts right
    assert all(count >= 3 for count in result["samples"].values()), result
    assert all(p99 <= p99_bound for p99 in result["p99"].values()), result
    assert result["worst_probe"] < 1.0
    assert "silent for" not in log and "forgetting it" not in log, log[-3000:]
    assert result["received"] > 0


@pytest.mark.timeout(180)
def test_one_client_broadcasting_in_a_loop_does_not_freeze_its_worker() -> None:
    # a loose bound in the default suite (it shares the machine with other tests);
    # before the fix a worker froze for tens of seconds, far past it
    _broadcast_loop_keeps_everyone_served(readers=1000, seconds=6, p99_bound=2.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_client_broadcasting_for_20s_to_2000_readers_on_2_workers() -> None:
    _broadcast_loop_keeps_everyone_served(readers=2000, seconds=20, p99_bound=0.5)
