"""A worker process: one uvloop event loop serving the app on a shared port.

Supervisor layer (layer 4). Runs in a child of the supervisor, after fork:
it loads the app, creates its own ZeroMQ context and bus sockets, binds
``host:port`` with ``SO_REUSEPORT`` and tells the supervisor it is ready
through a pipe. It stops gracefully on SIGTERM/SIGINT, and exits by itself
if the supervisor disappears (``PR_SET_PDEATHSIG`` and a parent check).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import ssl as ssl_module
import sys
from collections.abc import Callable

from enjent import WebSocketServer, WebSocketServerError
from enjent.cluster import BusEngine, ClusterClient
from enjent.cluster.natsbus import NatsConfig, NatsEngine
from enjent.exceptions import BusError
from enjent.server import run_event_loop

logger = logging.getLogger("enjent.worker")

WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4
#: Seconds between two heartbeats to the supervisor.
HEARTBEAT_INTERVAL = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the supervisor dies (no orphans)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Where and how one worker serves (built by the supervisor before fork)."""

    shard: int
    host: str
    port: int
    publish_endpoint: str
    subscribe_endpoint: str
    ready_fd: int  # write end of the pipe: "R" once listening, then "H" every second
    parent_pid: int
    ssl: ssl_module.SSLContext | None = None
    #: ``None``: the ZeroMQ broker's endpoints above; else NATS
    bus: NatsConfig | None = None


def worker_main(load_app: Callable[[], WebSocketServer], spec: WorkerSpec) -> int:
    """Serve until told to stop; return the process exit code."""
    _die_with_parent()
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    if os.getppid() != spec.parent_pid:
        return 0
    os.set_blocking(spec.ready_fd, False)
    try:
        server = load_app()
    except Exception:
        logger.exception("worker %d: cannot load the application", spec.shard)
        return APP_LOAD_ERROR
    # a fresh identity per process: client ids stay unique across restarts
    server.hub.ids.reset(spec.shard)
    result: int = run_event_loop(_serve(server, spec))
    return result


async def _serve(server: WebSocketServer, spec: WorkerSpec) -> int:
    shard = spec.shard
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    cluster: BusEngine
    if spec.bus is None:
        zeromq = ClusterClient(
            server.hub,
            shard=shard,
            publish_endpoint=spec.publish_endpoint,
            subscribe_endpoint=spec.subscribe_endpoint,
        )
        server.attach_peers(zeromq)
        zeromq.start()
        cluster = zeromq
    else:
        nats = NatsEngine(server.hub, shard=shard, config=spec.bus)
        server.attach_peers(nats)
        try:
            await nats.start()
        except BusError as exc:
            logger.error("worker %d cannot start: %s", shard, exc)
            return WORKER_BOOT_ERROR
        cluster = nats
    try:
        await server.start(spec.host, spec.port, ssl=spec.ssl, reuse_port=True)
    except WebSocketServerError as exc:
        logger.error("worker %d cannot start: %s", shard, exc)
        await cluster.close()
        return WORKER_BOOT_ERROR
    beat(spec.ready_fd, b"R")
    logger.info("worker %d (pid %d) serving on %s:%d", shard, os.getpid(), spec.host, spec.port)
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL)
        # from the event loop: a hung loop stops beating, and the supervisor
        # replaces the worker after its worker_timeout
        beat(spec.ready_fd, b"H")
        if os.getppid() != spec.parent_pid:
            logger.warning("worker %d: the supervisor is gone, stopping", shard)
            break
    await server.stop()
    await cluster.close()
    with contextlib.suppress(OSError):
        os.close(spec.ready_fd)
    return 0


def beat(fd: int, signal_byte: bytes) -> None:
    """One byte to the supervisor's pipe; never blocks (a full pipe loses a beat)."""
    with contextlib.suppress(OSError):  # BlockingIOError included
        os.write(fd, signal_byte)
