"""A worker process: one uvloop event loop serving the app on a shared port.

Supervisor layer (layer 4). Runs in a child of the supervisor, after fork:
it loads the app, creates its own ZeroMQ context and bus sockets, binds
``host:port`` with ``SO_REUSEPORT`` and tells the supervisor it is ready
through a pipe. It stops gracefully on SIGTERM/SIGINT (Close 1001), drains
on SIGUSR1 (a reload: no new connections, its clients closed with 1012 over
``drain_timeout``), and exits by itself if the supervisor disappears
(``PR_SET_PDEATHSIG`` and a parent check).
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
from typing import Any

from enjent import CloseCode, WebSocketServer, WebSocketServerError
from enjent.cluster import BusEngine, ClusterClient
from enjent.cluster.natsbus import NatsConfig, NatsEngine
from enjent.exceptions import BusError
from enjent.server import run_event_loop
from enjent.server.addresses import AddressTable, attach

logger = logging.getLogger("enjent.worker")

WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4
#: Seconds between two heartbeats to the supervisor.
HEARTBEAT_INTERVAL = 1.0
#: The signal that tells a worker to drain (the supervisor's reload): SIGUSR1.
DRAIN_SIGNAL = signal.SIGUSR1
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
    #: seconds a draining worker keeps its clients (SIGUSR1: a reload replaced it)
    drain_timeout: float = 30.0
    #: the host's per-address counts (shared memory), when the app limits addresses
    address_table: AddressTable | None = None


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
    if spec.address_table is not None:  # this worker's column of the host's counts
        attach(spec.address_table.for_slot(spec.shard))
    result: int = run_event_loop(_serve(server, spec))
    return result


async def _serve(server: WebSocketServer, spec: WorkerSpec) -> int:
    shard = spec.shard
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(DRAIN_SIGNAL, drain.set)
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
    draining: asyncio.Task[None] | None = None
    bus_silent = False
    while not stop.is_set():
        if drain.is_set() and draining is None:
            # a reload replaced this worker: no new connections, and the clients
            # closed with 1012 over the drain period; the bus stays up meanwhile
            draining = loop.create_task(server.drain(spec.drain_timeout))
        waits: list[asyncio.Future[Any]] = [loop.create_task(stop.wait())]
        waits.append(draining if draining is not None else loop.create_task(drain.wait()))
        _, pending = await asyncio.wait(
            waits, timeout=HEARTBEAT_INTERVAL, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            if waiter is not draining:
                waiter.cancel()
        # from the event loop: a hung loop stops beating, and the supervisor
        # replaces the worker after its worker_timeout; so does a worker whose
        # bus heartbeat stopped (the other workers would count it late forever)
        if cluster.heartbeat_alive():
            beat(spec.ready_fd, b"H")
        elif not bus_silent:
            bus_silent = True
            logger.error(
                "worker %d: its bus heartbeat stopped: no more beats to the supervisor, "
                "which replaces this worker",
                shard,
            )
        if draining is not None and draining.done():
            break
        if os.getppid() != spec.parent_pid:
            logger.warning("worker %d: the supervisor is gone, stopping", shard)
            break
    if draining is not None and not draining.done():
        draining.cancel()  # SIGTERM while draining: the rest get 1001 now
        with contextlib.suppress(asyncio.CancelledError):
            await draining
    if draining is not None and draining.done() and not draining.cancelled():
        await server.stop(code=CloseCode.SERVICE_RESTART, reason="server restarting")
    else:
        await server.stop()
    await cluster.close()
    with contextlib.suppress(OSError):
        os.close(spec.ready_fd)
    return 0


def beat(fd: int, signal_byte: bytes) -> None:
    """One byte to the supervisor's pipe; never blocks (a full pipe loses a beat)."""
    with contextlib.suppress(OSError):  # BlockingIOError included
        os.write(fd, signal_byte)
