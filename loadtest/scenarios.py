"""The four load scenarios: connections, echo, fanout and handshake.

Layer 5 of docs/architecture.md. Each scenario drives one already started server through a
`ClientPool` and returns a `RunResult`: pass/fail checks, flat numeric metrics (compared
across servers), per-process details and series for the chart. Every loop is bounded in
count and in time.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest import wire
from loadtest.client import OPEN, ClientPool, CountingTlsClient, WsClient, source_addresses
from loadtest.config import Config
from loadtest.measure import TreeSampler, latency_summary, percentile
from loadtest.report import Progress, format_bytes
from loadtest.servers import ServerProcess
from loadtest.tls import SERVER_NAME, client_context

BROADCAST_PREFIX = b"broadcast:"

#: Points kept of a latency distribution for the JSON file and the chart.
QUANTILE_POINTS = 200


@dataclass
class RunResult:
    """What one scenario run against one server produced."""

    server: str
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)

    def check(self, condition: bool, failure: str) -> None:
        if not condition:
            self.ok = False
            self.failures.append(failure)


def quantiles(seconds: list[float]) -> list[list[float]]:
    """A compact distribution: [fraction, milliseconds] at QUANTILE_POINTS fractions."""
    if not seconds:
        return []
    ordered = sorted(seconds)
    points = [index / QUANTILE_POINTS for index in range(1, QUANTILE_POINTS + 1)]
    points = sorted({*points, 0.001, 0.01, 0.5, 0.99, 0.999})
    return [[fraction, percentile(ordered, fraction) * 1000] for fraction in points]


async def connect_clients(
    pool: ClientPool,
    cfg: Config,
    count: int,
    progress: Progress,
    *,
    rate: float,
    on_tick: Callable[[], None] | None = None,
) -> float:
    """Open `count` clients (bounded by time), showing progress; returns seconds taken."""
    sources = source_addresses(cfg.host, count, cfg.source_addresses)
    started = time.monotonic()
    budget = (count / rate if rate > 0 else count / 500) * 3 + 30
    deadline = started + min(budget, cfg.timeout)
    last = 0.0

    def tick() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 0.25:
            last = now
            if on_tick is not None:
                on_tick()
            elapsed = max(now - started, 1e-9)
            progress.update(
                f"connecting {pool.opened_total}/{count} open {pool.open_count} "
                f"failed {pool.failed} ({pool.opened_total / elapsed:.0f}/s)"
            )

    pool.on_change = tick
    try:
        await pool.ramp(
            count, rate=rate, concurrency=cfg.concurrency, sources=sources, deadline=deadline
        )
    finally:
        pool.on_change = None
    progress.update(f"connected {pool.opened_total}/{count} failed {pool.failed}")
    return time.monotonic() - started


def connection_checks(result: RunResult, pool: ClientPool, expected: int) -> None:
    result.check(
        pool.opened_total == expected,
        f"{pool.opened_total} of {expected} clients connected "
        f"({pool.failed} failed: {dict(pool.errors.most_common(3))})",
    )
    result.check(
        pool.lost_while_open == 0 and pool.server_closes == 0,
        f"{pool.lost_while_open} clients lost, {pool.server_closes} closed by the server",
    )


def connection_metrics(pool: ClientPool, seconds: float) -> dict[str, float]:
    metrics = {
        "clients_connected": pool.opened_total,
        "clients_failed": pool.failed,
        "connect_rate_per_s": pool.opened_total / seconds if seconds > 0 else math.nan,
        **latency_summary(pool.handshake_times, "upgrade"),
    }
    if pool.offer is not None:  # --offer-deflate: how many servers' answers agreed
        metrics["clients_with_extension"] = pool.extensions_agreed
    return metrics


def prepare_pool(pool: ClientPool, cfg: Config) -> None:
    """What every client of the run does alike: offer deflate (`--offer-deflate`), speak
    TLS with the run's certificate (`--tls`)."""
    if cfg.offer_deflate:
        pool.offer = wire.DEFLATE_OFFER
    if cfg.tls_files is not None:
        pool.ssl = client_context(cfg.tls_files[0])
        pool.server_hostname = SERVER_NAME


_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)


def json_like(rng: random.Random, size: int) -> bytes:
    """`size` bytes of JSON text as an app sends it: a list of small records with
    repeated keys, words, numbers and ids (deflate takes a 1 KiB one to about 40 %).
    Valid JSON whenever `size` is at least 16; padded to the exact size in a last field.
    """
    records: list[str] = []
    length = 2  # the list's brackets
    while True:
        record = json.dumps(
            {
                "id": rng.randrange(10**9),
                "user": f"{rng.choice(_WORDS)}_{rng.randrange(1000)}",
                "room": rng.choice(_WORDS),
                "text": " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(2, 9))),
                "score": round(rng.random() * 100, 2),
                "ok": rng.random() < 0.5,
            },
            separators=(",", ":"),
        )
        if length + len(record) + 1 + 12 > size:
            break
        records.append(record)
        length += len(record) + 1
    body = "[" + ",".join(records) + ("," if records else "")
    pad = size - len(body) - len('{"p":""}]')
    if pad < 0:
        return ("x" * size).encode()
    return (body + '{"p":"' + "x" * pad + '"}]').encode()


async def sleep_watching(seconds: float, server: ServerProcess, step: float = 0.2) -> bool:
    """Sleep up to `seconds`, returning False early if the server process died."""
    end = time.monotonic() + seconds
    while (remaining := end - time.monotonic()) > 0:
        if not server.alive():
            return False
        await asyncio.sleep(min(step, remaining))
    return server.alive()


# connections --------------------------------------------------------------------------


def marginal_slope(series: list[list[float]], from_clients: float) -> float:
    """Least-squares slope of USS over open clients, for samples past ``from_clients``."""
    points = [(point[0], point[1]) for point in series if point[0] >= from_clients]
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


async def run_connections(
    cfg: Config, server: ServerProcess, sampler: TreeSampler, progress: Progress
) -> RunResult:
    """Ramp to N idle clients at a set rate, hold, then measure memory and CPU."""
    result = RunResult(server.kind.name)
    pool = ClientPool(cfg.host, cfg.port or server.port)
    prepare_pool(pool, cfg)
    await asyncio.sleep(0.5)
    base = sampler.memory()
    series: list[list[float]] = [[0, base.uss, base.rss]]
    last_sample = time.monotonic()

    def sample() -> None:
        nonlocal last_sample
        if time.monotonic() - last_sample >= cfg.sample_interval:
            last_sample = time.monotonic()
            memory = sampler.memory()
            series.append([pool.open_count, memory.uss, memory.rss])
            progress.note(f"USS {format_bytes(memory.uss)}")

    seconds = await connect_clients(pool, cfg, cfg.clients, progress, rate=cfg.rate, on_tick=sample)
    progress.update(f"holding {pool.open_count} clients for {cfg.hold:g} s")
    alive = await sleep_watching(cfg.hold, server)
    memory = sampler.memory()
    series.append([pool.open_count, memory.uss, memory.rss])
    progress.update(f"measuring {pool.open_count} idle clients for {cfg.measure:g} s")
    window = sampler.begin_window()
    alive = alive and await sleep_watching(cfg.measure, server)
    stats = sampler.end_window(window, port=server.port)
    result.check(alive, "the server exited during the run")
    connection_checks(result, pool, cfg.clients)
    clients = max(pool.open_count, 1)
    result.metrics = {
        **connection_metrics(pool, seconds),
        "uss_base_bytes": base.uss,
        "uss_bytes": stats["server_uss_bytes"],
        "rss_bytes": stats["server_rss_bytes"],
        "uss_per_client_bytes": (stats["server_uss_bytes"] - base.uss) / clients,
        # the slope over the second half of the ramp: what one more client costs,
        # without each process's one-time warm-up (pages it stops sharing with
        # the supervisor, allocator pools on first use)
        "uss_marginal_per_client_bytes": marginal_slope(series, clients / 2),
        "rss_per_client_bytes": (stats["server_rss_bytes"] - base.rss) / clients,
        "server_fds": stats["server_fds"],
        "server_cpu_percent": stats["server_cpu_percent"],
        "loadgen_cpu_percent": stats["loadgen_cpu_percent"],
    }
    result.details = {"window": stats, "errors": dict(pool.errors)}
    result.series = {"memory": series}
    await pool.close_all()
    return result


# echo -----------------------------------------------------------------------------------


#: With --offer-deflate the echo cycles through distinct messages, this many bytes of
#: them in all (at most ECHO_DISTINCT_MAX): more than a 32 KiB deflate window, so a server
#: that keeps its compression context finds no copy of the message it compresses.
ECHO_DISTINCT_BYTES = 128 * 1024
ECHO_DISTINCT_MAX = 64


def distinct_messages(cfg: Config, size: int) -> int:
    """How many different messages one echo size cycles through (1 without deflate)."""
    if not cfg.offer_deflate:
        return 1
    return max(1, min(ECHO_DISTINCT_MAX, -(-ECHO_DISTINCT_BYTES // max(size, 1))))


class EchoPool(ClientPool):
    """Closed loop: each echo received sends the next message (pipeline depth kept).

    Each client sends the messages in turn (one, or a cycle of distinct ones), each
    framed and masked once in advance. Where permessage-deflate was agreed a client
    sends them compressed once in advance too (`wire.deflate_message`) and counts
    compressed echoes without inflating them; one such client, the checker, inflates
    and compares every echo it gets.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.opcode = wire.Opcode.BINARY
        self.payloads: list[bytes] = [b""]
        self.frames: list[bytes] = [b""]
        #: the messages' compressed frames per window size agreed
        self.deflated: dict[int, list[bytes]] = {}
        self.mask = b"\0\0\0\0"
        #: per client: the index of the next message to send, and of the next echo
        self.next_sent: list[int] = []
        self.next_echo: list[int] = []
        self.checker: WsClient | None = None
        self.inflater = wire.Inflater()
        self.reset()

    def set_messages(self, opcode: int, payloads: list[bytes], mask: bytes | None) -> None:
        self.opcode, self.payloads = opcode, payloads
        self.frames = [wire.encode_frame(opcode, payload, mask=mask) for payload in payloads]
        self.mask = mask or b"\0\0\0\0"
        self.deflated = {}

    def _deflated_frames(self, bits: int) -> list[bytes]:
        frames = self.deflated.get(bits)
        if frames is None:
            frames = [
                wire.encode_frame(
                    self.opcode,
                    wire.deflate_message(payload, bits),
                    mask=self.mask,
                    compressed=True,
                )
                for payload in self.payloads
            ]
            self.deflated[bits] = frames
        return frames

    def reset(self) -> None:
        self.sending = False
        self.recording = False
        self.remaining = -1  # messages still allowed; -1: until told to stop
        self.sent = 0
        self.received = 0
        self.recorded = 0
        self.mismatched = 0
        self.unexpected = 0
        self.compressed = 0
        self.checked = 0
        self.latencies: list[float] = []
        self.drained = asyncio.Event()

    def start(self, depth: int) -> None:
        self.sending = True
        count = len(self.clients)
        # each client starts at its own place in the cycle
        self.next_sent = [index % len(self.payloads) for index in range(count)]
        self.next_echo = list(self.next_sent)
        for client in self.clients:
            if client.state != OPEN:
                continue
            if client.data is None:
                client.data = deque()
            if client.deflate_bits:
                self._deflated_frames(client.deflate_bits)
            for _ in range(depth):
                if self.remaining == 0:
                    break
                self._send(client, time.perf_counter())

    def _send(self, client: WsClient, now: float) -> None:
        frames = self.deflated[client.deflate_bits] if client.deflate_bits else self.frames
        if len(frames) == 1:
            client.send_frame(frames[0])
        else:
            index = self.next_sent[client.index]
            self.next_sent[client.index] = (index + 1) % len(frames)
            client.send_frame(frames[index])
        client.data.append(now)
        self.sent += 1
        if self.remaining > 0:
            self.remaining -= 1
            if self.remaining == 0:
                self.sending = False

    def stop(self) -> None:
        self.sending = False
        if self.received >= self.sent:
            self.drained.set()

    def on_message(self, client: WsClient, opcode: int, payload: bytes) -> None:
        now = time.perf_counter()
        pending: deque[float] | None = client.data
        if not pending:
            self.unexpected += 1
            return
        sent_at = pending.popleft()
        self.received += 1
        payloads = self.payloads
        if len(payloads) == 1:
            expected = payloads[0]
        else:
            index = self.next_echo[client.index]
            self.next_echo[client.index] = (index + 1) % len(payloads)
            expected = payloads[index]
        if opcode & wire.COMPRESSED:
            self.compressed += 1
            opcode &= 0x0F
            if client is self.checker:
                payload = self.inflater.inflate(payload)
                self.checked += 1
            else:
                payload = expected  # counted, not inflated: the checker compares
        if opcode != self.opcode or payload != expected:
            self.mismatched += 1
        if self.recording:
            self.recorded += 1
            self.latencies.append(now - sent_at)
        if self.sending:
            self._send(client, now)
        if not self.sending and self.received >= self.sent:
            self.drained.set()


def echo_payloads(cfg: Config, rng: random.Random, size: int) -> tuple[int, list[bytes]]:
    """The opcode and the message(s) of one echo size: `--content`, `--text`, and as
    many distinct messages as `distinct_messages` says."""
    payloads = []
    for _ in range(distinct_messages(cfg, size)):
        if cfg.content == "json":
            payloads.append(json_like(rng, size))
        elif cfg.text:
            letters = "abcdefghijklmnopqrstuvwxyz0123456789"
            payloads.append("".join(rng.choice(letters) for _ in range(size)).encode())
        else:
            payloads.append(rng.randbytes(size))
    text = cfg.content == "json" or cfg.text
    return (wire.Opcode.TEXT if text else wire.Opcode.BINARY), payloads


async def run_echo(
    cfg: Config, server: ServerProcess, sampler: TreeSampler, progress: Progress
) -> RunResult:
    """C clients echo in a closed loop at each message size: messages/s and round trips."""
    result = RunResult(server.kind.name)
    pool = EchoPool(cfg.host, cfg.port or server.port)
    prepare_pool(pool, cfg)
    seconds = await connect_clients(pool, cfg, cfg.clients, progress, rate=0)
    result.metrics.update(connection_metrics(pool, seconds))
    pool.checker = next((c for c in pool.clients if c.state == OPEN and c.deflate_bits), None)
    rng = random.Random(cfg.seed)
    per_size: dict[str, Any] = {}
    for size in cfg.sizes:
        if pool.open_count == 0 or not server.alive():
            break
        opcode, payloads = echo_payloads(cfg, rng, size)
        pool.reset()
        # the raw TCP echo writes back what it reads: unmasked, it comes back valid
        key = rng.randbytes(4)  # drawn for every server: the same payloads for all
        pool.set_messages(opcode, payloads, None if server.kind.name == "rawtcp" else key)
        if cfg.messages > 0:
            pool.remaining = cfg.messages
        label = format_bytes(size)
        progress.update(f"echo {label}: warming up")
        pool.recording = cfg.warmup <= 0
        pool.start(cfg.pipeline)
        if cfg.warmup > 0:
            await _wait_or_timeout(pool.drained.wait(), cfg.warmup)
            pool.recording = True
        window = sampler.begin_window()
        started = time.perf_counter()
        progress.update(f"echo {label}: measuring for up to {cfg.duration:g} s")
        await _wait_or_timeout(pool.drained.wait(), cfg.duration)
        elapsed = time.perf_counter() - started
        recorded = pool.recorded
        stats = sampler.end_window(window, port=server.port)
        pool.stop()
        drained = await _wait_or_timeout(pool.drained.wait(), 10.0)
        result.check(drained, f"echo {label}: {pool.sent - pool.received} echoes never came back")
        result.check(
            pool.received == pool.sent, f"echo {label}: sent {pool.sent}, got {pool.received}"
        )
        result.check(pool.mismatched == 0, f"echo {label}: {pool.mismatched} echoes differed")
        result.check(pool.unexpected == 0, f"echo {label}: {pool.unexpected} unexpected messages")
        result.check(recorded > 0, f"echo {label}: no echo measured")
        if pool.compressed:
            result.check(
                pool.checker is not None and pool.checked > 0,
                f"echo {label}: compressed echoes came, none was inflated and checked",
            )
        key = f"{size}B"
        metrics = {
            f"echo_{key}_messages_per_s": recorded / elapsed if elapsed > 0 else math.nan,
            **latency_summary(pool.latencies, f"echo_{key}_rtt"),
            f"echo_{key}_server_cpu_percent": stats["server_cpu_percent"],
            # CPU time of the whole server tree per echo: what a message costs the server
            # even when the load generator, not the server, limits the rate (TLS)
            f"echo_{key}_server_cpu_us_per_message": (
                stats["server_cpu_percent"] / 100 * elapsed / recorded * 1e6
                if recorded
                else math.nan
            ),
            f"echo_{key}_loadgen_cpu_percent": stats["loadgen_cpu_percent"],
        }
        if pool.offer is not None:
            metrics[f"echo_{key}_compressed_fraction"] = pool.compressed / max(pool.received, 1)
        result.metrics.update(metrics)
        per_size[key] = {
            "sent": pool.sent,
            "received": pool.received,
            "measured": recorded,
            "compressed": pool.compressed,
            "checked_after_inflating": pool.checked,
            "distinct_messages": len(payloads),
            "frame_bytes": len(pool.frames[0]),
            # the mean size of the compressed frames, per window size agreed
            "compressed_frame_bytes": {
                bits: sum(map(len, frames)) / len(frames) for bits, frames in pool.deflated.items()
            },
            "window": stats,
        }
        result.series[f"rtt_{key}"] = quantiles(pool.latencies)
    result.check(server.alive(), "the server exited during the run")
    connection_checks(result, pool, cfg.clients)
    result.details = {"sizes": per_size, "errors": dict(pool.errors)}
    if per_size:
        result.details["window"] = per_size[list(per_size)[-1]]["window"]
    await pool.close_all()
    return result


async def _wait_or_timeout(awaitable: Awaitable[Any], seconds: float) -> bool:
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await awaitable
    except TimeoutError:
        return False
    return True


# fanout ---------------------------------------------------------------------------------


class FanoutPool(ClientPool):
    """Counts broadcast deliveries; when every client has one, the next is sent.

    A compressed broadcast (permessage-deflate agreed) is counted as the current one
    without inflating it; the checker, one such client, inflates all it gets and checks
    each broadcast's number and order. Over TLS (unless `--decrypt-all`), the receivers
    other than the sender and one checking client count each broadcast by the plaintext
    length of the TLS records that carry it, without decrypting them (`CountingTlsClient`).
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.frames: list[bytes] = []
        #: the same requests, compressed in advance, for a sender that agreed deflate
        self.deflated_frames: list[bytes] = []
        self.checker: WsClient | None = None
        self.inflater = wire.Inflater()
        self.compressed = 0
        self.current = -1
        self.expected = 0
        self.count = 0
        self.deliveries = 0
        self.foreign = 0
        self.out_of_order = 0
        self.sent_at = 0.0
        self.latencies: list[float] = []
        self.sender: WsClient | None = None
        self.finished = asyncio.Event()
        self.last_progress = time.monotonic()
        #: over TLS: connect receivers that can count records without decrypting them
        self.count_tls = False
        #: the length of one broadcast's frame, as the server sends it (counting clients)
        self.delivery_size = 0
        self.counting: list[CountingTlsClient] = []

    @property
    def client_class(self) -> type[WsClient]:
        if self.ssl is not None and self.count_tls:
            return CountingTlsClient
        return super().client_class

    def on_plaintext(self, client: CountingTlsClient, nbytes: int) -> None:
        """A counting client got ``nbytes`` of plaintext: whole broadcasts are deliveries."""
        total, size = client.counted + nbytes, self.delivery_size
        while total >= size:
            total -= size
            self._delivered(client, self.current)
        client.counted = total

    def send_round(self, number: int) -> None:
        if number >= len(self.frames) or self.sender is None:
            self.finished.set()
            return
        self.current = number
        self.count = 0
        self.sent_at = time.perf_counter()
        frames = self.deflated_frames if self.sender.deflate_bits else self.frames
        self.sender.send_frame(frames[number])

    def on_message(self, client: WsClient, opcode: int, payload: bytes) -> None:
        if opcode & wire.COMPRESSED:
            self.compressed += 1
            opcode &= 0x0F
            if client is not self.checker:
                self._delivered(client, self.current)
                return
            payload = self.inflater.inflate(payload)
        try:
            number = int(payload[:8]) if opcode == wire.Opcode.TEXT else -1
        except ValueError:
            number = -1
        if number != self.current:
            self.foreign += 1
            return
        self._delivered(client, number)

    def _delivered(self, client: WsClient, number: int) -> None:
        if client.data != number - 1:
            self.out_of_order += 1
        client.data = number
        self.count += 1
        self.deliveries += 1
        if self.count == self.expected:
            # the round's time: until the last client has it (read now, once per round)
            self.latencies.append(time.perf_counter() - self.sent_at)
            self.last_progress = time.monotonic()
            self.send_round(number + 1)


async def run_fanout(
    cfg: Config, server: ServerProcess, sampler: TreeSampler, progress: Progress
) -> RunResult:
    """One client asks M times for a broadcast to N clients, each after the last arrived."""
    result = RunResult(server.kind.name)
    pool = FanoutPool(cfg.host, cfg.port or server.port)
    prepare_pool(pool, cfg)
    # compressed deliveries differ in size: counted as compressed frames, so decrypted
    pool.count_tls = cfg.tls_files is not None and not cfg.decrypt_all and not cfg.offer_deflate
    seconds = await connect_clients(pool, cfg, cfg.clients, progress, rate=0)
    result.metrics.update(connection_metrics(pool, seconds))
    connection_checks(result, pool, cfg.clients)
    open_clients = [client for client in pool.clients if client.state == OPEN]
    if not open_clients:
        result.check(False, "no client connected")
        return result
    for client in open_clients:
        client.data = -1
    rng = random.Random(cfg.seed)
    pool.sender = open_clients[0]
    pool.checker = next((c for c in reversed(open_clients) if c.deflate_bits), None)
    delivery_sizes = set()
    for number in range(cfg.broadcasts):
        if cfg.content == "json":
            body = f"{number:08d}".encode() + json_like(rng, max(cfg.payload - 8, 0))
        else:
            body = f"{number:08d}".ljust(max(cfg.payload, 8), "x").encode()
        mask = rng.randbytes(4)
        request = BROADCAST_PREFIX + body
        delivery_sizes.add(len(wire.encode_frame(wire.Opcode.TEXT, body)))
        pool.frames.append(wire.encode_frame(wire.Opcode.TEXT, request, mask=mask))
        if pool.sender.deflate_bits:
            compressed = wire.deflate_message(request, pool.sender.deflate_bits)
            pool.deflated_frames.append(
                wire.encode_frame(wire.Opcode.TEXT, compressed, mask=mask, compressed=True)
            )
    pool.expected = len(open_clients)
    await asyncio.sleep(0.2)
    if pool.count_tls and len(delivery_sizes) == 1 and len(open_clients) > 2:
        (pool.delivery_size,) = delivery_sizes
        # the sender (first) and the checking client (last) decrypt and check everything
        for client in open_clients[1:-1]:
            assert isinstance(client, CountingTlsClient)
            if client.count_from_now(pool.on_plaintext):
                pool.counting.append(client)
    window = sampler.begin_window()
    started = time.perf_counter()
    pool.last_progress = time.monotonic()
    pool.send_round(0)
    while not pool.finished.is_set():
        await _wait_or_timeout(pool.finished.wait(), 0.25)
        progress.update(
            f"fanout: broadcast {len(pool.latencies)}/{cfg.broadcasts} to {pool.expected} clients"
        )
        if time.monotonic() - pool.last_progress > cfg.round_timeout or not server.alive():
            break
    elapsed = time.perf_counter() - started
    stats = sampler.end_window(window, port=server.port)
    rounds = len(pool.latencies)
    result.check(server.alive(), "the server exited during the run")
    result.check(
        rounds == cfg.broadcasts,
        f"{rounds} of {cfg.broadcasts} broadcasts reached every client "
        f"(round {pool.current}: {pool.count}/{pool.expected} after {cfg.round_timeout:g} s)",
    )
    result.check(
        pool.deliveries == rounds * pool.expected + (pool.count if rounds < cfg.broadcasts else 0),
        f"{pool.deliveries} deliveries counted for {rounds} complete broadcasts",
    )
    result.check(pool.foreign == 0, f"{pool.foreign} messages that were not the current broadcast")
    result.check(pool.out_of_order == 0, f"{pool.out_of_order} broadcasts arrived out of order")
    leftover = sum(client.counted for client in pool.counting)
    result.check(
        leftover == 0,
        f"{leftover} bytes of TLS records counted that were not whole broadcasts",
    )
    if pool.compressed:
        result.check(
            pool.checker is not None and pool.checker.data >= rounds - 1,
            "compressed broadcasts came, but the checking client did not inflate them all",
        )
    result.metrics.update(
        {
            "fanout_clients": pool.expected,
            "fanout_broadcasts": rounds,
            "fanout_deliveries": pool.deliveries,
            "fanout_deliveries_per_s": pool.deliveries / elapsed if elapsed > 0 else math.nan,
            "fanout_broadcasts_per_s": rounds / elapsed if elapsed > 0 else math.nan,
            # the whole server tree's CPU (every worker, the broker) per client written to
            "server_cpu_us_per_delivery": (
                stats["server_cpu_percent"] / 100 * elapsed / pool.deliveries * 1e6
                if pool.deliveries
                else math.nan
            ),
            **latency_summary(pool.latencies, "fanout_last"),
            **(
                {"fanout_compressed_fraction": pool.compressed / max(pool.deliveries, 1)}
                if pool.offer is not None
                else {}
            ),
            **(
                {"fanout_undecrypted_clients": len(pool.counting)}
                if cfg.tls_files is not None
                else {}
            ),
            "server_cpu_percent": stats["server_cpu_percent"],
            "loadgen_cpu_percent": stats["loadgen_cpu_percent"],
        }
    )
    result.details = {"window": stats, "errors": dict(pool.errors)}
    result.series = {"fanout_last": quantiles(pool.latencies)}
    await pool.close_all()
    return result


# handshake ------------------------------------------------------------------------------


class HandshakePool(ClientPool):
    """Connects and closes over and over; keeps counters, not clients."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.created = 0
        self.cycles: list[float] = []
        self.clean = 0
        self.unclean = 0

    def new_client(self) -> WsClient:
        self.created += 1
        return self.client_class(self, self.created, self.host, self.port)


async def run_handshake(
    cfg: Config, server: ServerProcess, sampler: TreeSampler, progress: Progress
) -> RunResult:
    """Connect, upgrade, close, again: connections per second with K in flight."""
    result = RunResult(server.kind.name)
    pool = HandshakePool(cfg.host, cfg.port or server.port)
    prepare_pool(pool, cfg)
    sources = source_addresses(cfg.host, cfg.count, cfg.source_addresses)
    total = cfg.count
    end = time.monotonic() + min(cfg.duration if cfg.duration > 0 else math.inf, cfg.timeout)
    loop = asyncio.get_running_loop()
    started_count = 0

    async def cycle_forever() -> None:
        nonlocal started_count
        while started_count < total and time.monotonic() < end:
            started_count += 1
            client = await pool.connect_one(sources[started_count % len(sources)], 10.0)
            if client is None:
                continue
            client.waiter = loop.create_future()
            client.close()
            try:
                async with asyncio.timeout(5.0):
                    await client.waiter
            except TimeoutError:
                client.abort()
                pool.unclean += 1
                continue
            finally:
                client.waiter = None
            pool.cycles.append(time.perf_counter() - client.t_start)
            if client.close_code == wire.CloseCode.NORMAL_CLOSURE:
                pool.clean += 1
            else:
                pool.unclean += 1

    async def show() -> None:
        while True:
            progress.update(f"handshake: {len(pool.cycles)}/{total} done, {pool.failed} failed")
            await asyncio.sleep(0.25)

    window = sampler.begin_window()
    started = time.perf_counter()
    shower = asyncio.create_task(show())
    try:
        await asyncio.gather(*(cycle_forever() for _ in range(max(1, min(cfg.clients, total)))))
    finally:
        shower.cancel()
    elapsed = time.perf_counter() - started
    stats = sampler.end_window(window, port=server.port)
    done = len(pool.cycles)
    result.check(server.alive(), "the server exited during the run")
    result.check(
        pool.failed == 0, f"{pool.failed} upgrades failed: {dict(pool.errors.most_common(3))}"
    )
    result.check(
        done == total or time.monotonic() >= end,
        f"{done} of {total} cycles completed",
    )
    result.check(done > 0, "no cycle completed")
    result.check(
        pool.unclean == 0, f"{pool.unclean} closes without an echoed 1000 or timely TCP close"
    )
    result.metrics = {
        "handshakes": done,
        "handshakes_failed": pool.failed,
        "handshakes_per_s": done / elapsed if elapsed > 0 else math.nan,
        **latency_summary(pool.handshake_times, "upgrade"),
        **latency_summary(pool.cycles, "cycle"),
        "server_cpu_percent": stats["server_cpu_percent"],
        "loadgen_cpu_percent": stats["loadgen_cpu_percent"],
    }
    if pool.offer is not None:
        result.metrics["handshakes_with_extension"] = pool.extensions_agreed
    result.details = {"window": stats, "errors": dict(pool.errors), "clean_closes": pool.clean}
    result.series = {"upgrade": quantiles(pool.handshake_times), "cycle": quantiles(pool.cycles)}
    return result


Scenario = Callable[[Config, ServerProcess, TreeSampler, Progress], Awaitable[RunResult]]

SCENARIO_RUNNERS: dict[str, Scenario] = {
    "connections": run_connections,
    "echo": run_echo,
    "fanout": run_fanout,
    "handshake": run_handshake,
}
