"""Running a server from a program: the event loop, signals, logging, import guards.

Server layer (layer 2 of docs/architecture.md). What ``server.run()`` needs
around ``start()``/``stop()``: uvloop when installed, SIGINT/SIGTERM for a
graceful stop (SIGHUP logged and ignored: one process cannot reload), a
default logging setup, and the guard that ``enjent run`` sets while it
imports an app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..exceptions import WebSocketServerError
from .options import Limits

__all__ = [
    "AppServesOnImport",
    "capacity",
    "configure_default_logging",
    "importing_app",
    "refuse_while_importing",
    "run_event_loop",
    "serve_until_signal",
]

logger = logging.getLogger("enjent.server")


class AppServesOnImport(WebSocketServerError):
    """The app started serving while ``enjent run`` imported it."""


#: Set by ``enjent run`` while it imports the app (see :func:`importing_app`).
_importing_app: str | None = None


@contextlib.contextmanager
def importing_app(spec: str) -> Iterator[None]:
    """While the app ``spec`` is imported, refuse to start serving.

    An app module that calls ``server.run()`` at import time would serve
    inside ``enjent run`` itself, before the supervisor starts; the call
    raises :class:`AppServesOnImport` instead.
    """
    global _importing_app
    previous, _importing_app = _importing_app, spec
    try:
        yield
    finally:
        _importing_app = previous


def refuse_while_importing(call: str) -> None:
    """Raise :class:`AppServesOnImport` if ``enjent run`` is importing the app."""
    if _importing_app is not None:
        module = _importing_app.partition(":")[0]
        raise AppServesOnImport(
            f"{module} calls server.{call} while `enjent run` imports it: "
            f'put that call under `if __name__ == "__main__":`'
        )


def refuse_inside_a_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise WebSocketServerError(
        "server.run() blocks, so it cannot be called inside a running event loop: "
        "use `await server.start(host, port)` or `async with server.serve(host, port):`"
    )


def capacity(max_connections: int) -> tuple[int, int]:
    """(connections at most, upgrades at most) under this process's open-file limit.

    A reserve of descriptors (a twentieth of ``RLIMIT_NOFILE``, at least 64:
    listening sockets, the bus, logs, the app's files) is kept free, so that
    the process never runs out (libuv would then accept and drop connections
    silently). Upgrades stop at half the reserve earlier still, so that a
    health probe is answered when the WebSocket capacity is full.
    """
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - not POSIX
        return 1 << 30, max_connections
    if soft == resource.RLIM_INFINITY:
        return 1 << 30, max_connections
    reserve = max(64, soft // 20)
    fd_limit = max(1, soft - reserve // 2)
    upgrade_limit = max(1, min(max_connections, soft - reserve))
    if upgrade_limit < max_connections:
        explicit = max_connections != Limits().max_connections
        logger.log(
            logging.WARNING if explicit else logging.INFO,
            "max_connections %d is above what RLIMIT_NOFILE %d allows: upgrades get 503 "
            "above %d connections (raise the limit, e.g. LimitNOFILE in systemd)",
            max_connections,
            soft,
            upgrade_limit,
        )
    return fd_limit, upgrade_limit


def configure_default_logging() -> None:
    """Log INFO to stderr, only if the application configured no logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def run_event_loop(main: Awaitable[Any]) -> Any:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def _ignore_hangup() -> None:
    logger.warning(
        "SIGHUP ignored: a single process cannot reload without dropping its clients; "
        "run with workers > 1 (enjent run --workers N) to replace workers on SIGHUP"
    )


def url_of(scheme: str, sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve_until_signal(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    describe: Callable[[], str],
) -> None:
    """``start()``, log where it serves, wait for SIGINT/SIGTERM, then ``stop()``."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # one process cannot replace itself without dropping its clients:
    # SIGHUP (systemd's reload) is logged and ignored, never fatal
    loop.add_signal_handler(signal.SIGHUP, _ignore_hangup)
    try:
        await start()
        logger.info(
            "serving on %s (1 worker, pid %d; Ctrl-C or SIGTERM stops)", describe(), os.getpid()
        )
        await stopping.wait()
        logger.info("signal received, stopping")
        await stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
