"""Many clients over many workers: memory, bus traffic, presence and a mass disconnect.

One command reproduces the cluster-scale figures::

    python -m loadtest.cluster_scale --clients 150000 --workers 8 [--presence-limit 100000]

It starts ``python -m enjent run loadtest.cluster_app:server --workers N``,
opens the clients from several client processes (at most ``--per-process``
sockets each, every process on its own source address in 127.0.0.0/8, so
neither the per-process open-file limit nor the ephemeral ports run out),
and reports:

- whole-tree USS per connection, and the bus messages published per
  handshake beyond the heartbeats (from the workers' ``sent`` and
  ``heartbeats`` counters in ``/metrics``);
- with ``--presence-limit``: a presence query's latency and the memory it
  held, then the same with one worker stopped (SIGSTOP), which must come
  back flagged partial, naming that worker;
- the drain: every client process exits at once (the kernel closes all its
  sockets); ``/healthz`` is probed every 50 ms meanwhile, and the run reports
  when the cluster-wide count reached 0, the slowest probe, bus gaps and drops,
  and whether any worker was marked late or declared dead in the server's log.

The client processes are this module (``--child``): wire-protocol clients
that never import ``enjent``. Bounded: every phase has a deadline, and the
server and client processes die with this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadtest import wire
from loadtest.client import ClientPool, WsClient, check_loopback, raise_fd_limit
from loadtest.servers import REPO_ROOT, ServerProcess, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LOG_ALARMS = ("late:", "silent for", "died:", "restarting it", "Traceback", "bus gap")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


# ------------------------------------------------------------ the clients


async def _child(host: str, port: int, count: int, source: str, timeout: float) -> int:
    """Open ``count`` idle clients, say how it went, exit at once when told."""
    pool = ClientPool(host, port)
    deadline = time.monotonic() + timeout
    await pool.ramp(
        count, rate=0, concurrency=128, sources=[source], deadline=deadline, connect_timeout=30.0
    )
    errors = dict(pool.errors.most_common(3))
    print(
        json.dumps({"open": pool.open_count, "failed": pool.failed, "errors": errors}), flush=True
    )
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() == "close":
        os._exit(0)  # every socket of this process closed at once, by the kernel
    return 0


class _Server(ServerProcess):
    """``python -m enjent run loadtest.cluster_app:server`` (the kind only names it)."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        from loadtest.servers import SERVERS

        super().__init__(SERVERS["enjent"], host, port, workers)
        self.command = [
            sys.executable,
            "-m",
            "enjent",
            "run",
            "loadtest.cluster_app:server",
            *("--host", host, "--port", str(port), "--workers", str(workers)),
            *("--log-level", "info", "--health-detail"),
        ]


# ------------------------------------------------------------- HTTP probes


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[float, bytes]:
    """One GET on a fresh connection: (seconds, body); raises OSError on failure."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"{path}: {head.splitlines()[0] if head else b'no answer'!r}")
    return time.perf_counter() - started, body


def cluster_counters(host: str, port: int) -> dict[str, int]:
    """The ``enjent_cluster_*`` sums of ``/metrics`` (bus counters by name)."""
    _, body = http_get(host, port, "/metrics", timeout=5.0)
    sums: dict[str, int] = {}
    for match in re.finditer(rb"^enjent_cluster_(\w+?)(?:_total)? (\d+)$", body, re.M):
        sums[match.group(1).decode()] = int(match.group(2))
    return sums


def healthz(host: str, port: int, timeout: float = 2.0) -> tuple[float, dict[str, Any]]:
    seconds, body = http_get(host, port, "/healthz", timeout)
    return seconds, json.loads(body)


def wait_count(host: str, port: int, expected: int, timeout: float) -> float | None:
    """Seconds until /healthz counts ``expected`` clients, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError, ValueError):
            if healthz(host, port)[1]["clients"] == expected:
                return time.monotonic() - started
        time.sleep(0.2)
    return None


def tree_uss(server: ServerProcess) -> int:
    total = 0
    for process in server.processes():
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().uss
    return total


# --------------------------------------------------------- presence probe


class _Asker(ClientPool):
    """One control client that sends ``presence:<limit>`` and waits for the JSON."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def on_message(self, client: WsClient, opcode: int, payload: bytes) -> None:
        self.answers.put_nowait(payload)

    async def ask(self, client: WsClient, limit: int) -> dict[str, Any]:
        text = f"presence:{limit}".encode()
        client.send_frame(wire.encode_frame(wire.Opcode.TEXT, text, mask=os.urandom(4)))
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(self.answers.get(), 30.0))
        return answer


async def presence_figures(
    host: str, port: int, limit: int, worker_pids: dict[int, int]
) -> dict[str, Any]:
    asker = _Asker(host, port)
    client = await asker.connect_one(None, 10.0)
    if client is None:
        return {"error": "the control client could not connect"}
    try:
        whole = await asker.ask(client, limit)
        others = sorted(shard for shard in worker_pids if shard != whole["asked_by"])
        figures: dict[str, Any] = {"whole": whole}
        if others:
            stopped = others[-1]
            os.kill(worker_pids[stopped], signal.SIGSTOP)
            try:
                partial = await asker.ask(client, limit)
            finally:
                os.kill(worker_pids[stopped], signal.SIGCONT)
            partial["stopped_worker"] = stopped
            figures["one_stopped"] = partial
        return figures
    finally:
        client.abort()


# ------------------------------------------------------------------ drain


@dataclass
class _Probe:
    """Probes /healthz every ``interval`` s from a thread; records what it saw."""

    host: str
    port: int
    interval: float = 0.05
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # at, seconds, clients
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            at = time.monotonic()
            try:
                seconds, data = healthz(self.host, self.port, timeout=5.0)
                self.samples.append((at, seconds, int(data["clients"])))
            except (OSError, ValueError, KeyError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - at)))


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)] if values else 0.0


# -------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    host = check_loopback(args.host)
    port = args.port or free_port(host)
    raise_fd_limit(args.per_process + 512)
    processes = max(1, math.ceil(args.clients / args.per_process))
    if processes > 250:
        raise SystemExit("cluster_scale: more than 250 client processes (one source address each)")
    result: dict[str, Any] = {
        "clients": args.clients,
        "workers": args.workers,
        "client_processes": processes,
        "command": " ".join(["python -m loadtest.cluster_scale", *sys.argv[1:]]),
    }
    server = _Server(host, port, args.workers)
    server.start(timeout=60.0)
    children: list[subprocess.Popen[str]] = []
    try:
        time.sleep(2.5)  # every worker has heard every other's heartbeat
        uss_before = tree_uss(server)
        counters_before = cluster_counters(host, port)
        started = time.monotonic()
        base, extra = divmod(args.clients, processes)
        for index in range(processes):
            count = base + (1 if index < extra else 0)
            command = [sys.executable, "-m", "loadtest.cluster_scale", "--child"]
            command += ["--host", host, "--port", str(port), "--count", str(count)]
            command += ["--source", f"127.0.0.{index + 2}", "--timeout", str(args.timeout)]
            children.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=_die_with_parent,
                )
            )
        reports = []
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            reports.append(json.loads(line) if line else {"open": 0, "failed": -1})
        opened = sum(report["open"] for report in reports)
        result["opened"] = opened
        result["failed"] = sum(max(0, report["failed"]) for report in reports)
        result["client_errors"] = [
            report.get("errors") for report in reports if report.get("errors")
        ]
        settled = wait_count(host, port, opened, 30.0)
        result["connect_seconds"] = round(time.monotonic() - started, 2)
        result["count_settled"] = settled is not None
        time.sleep(2.5)  # the heartbeats carry the counters past the last handshake
        counters_after = cluster_counters(host, port)
        uss_after = tree_uss(server)
        result["uss_per_connection_kib"] = round(
            (uss_after - uss_before) / max(1, opened) / 1024, 3
        )
        result["tree_uss_mib"] = round(uss_after / 2**20, 1)
        sent = counters_after.get("bus_sent", 0) - counters_before.get("bus_sent", 0)
        beats = counters_after.get("bus_heartbeats", 0) - counters_before.get("bus_heartbeats", 0)
        result["bus_sent_while_connecting"] = sent
        result["bus_heartbeats_while_connecting"] = beats
        result["bus_messages_per_handshake"] = round((sent - beats) / max(1, opened), 6)

        if args.presence_limit:
            _, health = healthz(host, port)
            pids = {int(w["shard"]): int(w["pid"]) for w in health["workers"]}
            result["presence"] = asyncio.run(
                presence_figures(host, port, args.presence_limit, pids)
            )
            time.sleep(2.0)  # the stopped worker's heartbeats are back

        probe = _Probe(host, port)
        thread = threading.Thread(target=probe.run, daemon=True)
        thread.start()
        time.sleep(0.5)
        closed_at = time.monotonic()
        for child in children:
            assert child.stdin is not None
            with contextlib.suppress(OSError):
                child.stdin.write("close\n")
                child.stdin.flush()
        zero_at = None
        while time.monotonic() - closed_at < args.drain_timeout:
            if probe.samples and probe.samples[-1][2] == 0 and probe.samples[-1][0] > closed_at:
                zero_at = probe.samples[-1][0]
                break
            time.sleep(0.02)
        time.sleep(2.0)  # a little past zero: the probes keep going
        probe.stop.set()
        thread.join(10.0)
        during = [seconds for at, seconds, _ in probe.samples if at >= closed_at]
        result["drain"] = {
            "count_zero_after_s": None if zero_at is None else round(zero_at - closed_at, 2),
            "probes": len(during),
            "probe_failures": probe.failures[:5],
            "probe_max_ms": round(max(during, default=0.0) * 1000, 1),
            "probe_p99_ms": round(_percentile(during, 0.99) * 1000, 1),
            "probes_over_100ms": sum(1 for seconds in during if seconds > 0.1),
        }
        time.sleep(1.5)
        final = cluster_counters(host, port)
        result["bus"] = {
            key: final.get(f"bus_{key}", 0)
            for key in ("gaps", "dropped", "rate_limited", "late_peers")
        }
    finally:
        for child in children:
            with contextlib.suppress(OSError):
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10.0)
        server.stop()
    log = server.log_tail(2_000_000)
    server.close_log()
    result["log_alarms"] = [
        line for line in log.splitlines() if any(a in line for a in _LOG_ALARMS)
    ][:20]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.cluster_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--clients", type=int, default=20_000, help="clients in all (default 20000)"
    )
    parser.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    parser.add_argument(
        "--per-process",
        type=int,
        default=18_000,
        help="most sockets per client process (default 18000: under the 20000 open-file limit)",
    )
    parser.add_argument(
        "--presence-limit",
        type=int,
        default=0,
        help="also time a presence query for this many rows, then with one worker stopped",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address of the server")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to open the clients")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for 0")
    parser.add_argument("--json", type=Path, help="result path (default: loadtest/results/)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="127.0.0.2", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _die_with_parent()
        raise_fd_limit(args.count + 256)
        return asyncio.run(_child(args.host, args.port, args.count, args.source, args.timeout))
    if args.clients < 1 or args.workers < 1 or args.per_process < 1:
        parser.error("--clients, --workers and --per-process must be at least 1")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    path = args.json or RESULTS_DIR / (
        f"cluster-scale-{args.clients}-{args.workers}w-{time.strftime('%Y%m%dT%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"written to {path}", file=sys.stderr)
    ok = (
        result.get("opened") == args.clients
        and result["drain"]["count_zero_after_s"] is not None
        and not any(result["bus"].values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
