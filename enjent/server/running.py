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
import ctypes
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..exceptions import WebSocketServerError
from .options import Limits

__all__ = [
    "BOOT_ERROR",
    "AppServesOnImport",
    "capacity",
    "configure_default_logging",
    "importing_app",
    "prepare_process",
    "refuse_while_importing",
    "run_event_loop",
    "run_until_signal",
    "serve_until_signal",
    "tune_allocator",
]

logger = logging.getLogger("enjent.server")


#: glibc's ``mallopt()`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap (default 128 KiB, moving):
#: a large message's buffers are not each a fresh ``mmap``, zeroed pages and a
#: ``munmap``.
MALLOC_MMAP_THRESHOLD = 4 << 20
#: Free memory kept at the top of the heap before it goes back to the system
#: (default 128 KiB): memory freed by one burst of large messages serves the next.
MALLOC_TRIM_THRESHOLD = 16 << 20


def tune_allocator() -> bool:
    """Set the C allocator's thresholds for a server's allocation pattern.

    glibc's defaults make each buffer of a message past 128 KiB its own
    ``mmap`` (page faults to zero it, ``munmap`` on free) and give memory
    back as soon as 128 KiB are free at the top of the heap, so a stream of
    large messages pays for fresh pages again and again: measured on a 256
    KiB echo, 20 % of the server's CPU in page faults, and runs that fall
    into a slow or a fast mode by how glibc's moving threshold happened to
    settle. With :data:`MALLOC_MMAP_THRESHOLD` and
    :data:`MALLOC_TRIM_THRESHOLD` the buffers come from the heap, and up to
    16 MiB of freed heap is kept for the next burst (RSS stays up to that
    much above the live data after a burst).

    Called by :meth:`WebSocketServer.run` and the supervisor, which own their
    processes; an application embedding ``start()`` in a process of its own
    may call it too. ``ENJENT_MALLOC_TUNING=off`` leaves the allocator as it
    is. Returns whether the settings took (``False`` off glibc or when off).
    """
    if os.environ.get("ENJENT_MALLOC_TUNING", "").lower() in ("0", "off", "no", "false"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
    )
    took = all(mallopt(key, value) == 1 for key, value in settings)
    logger.debug("allocator thresholds %s", "set" if took else "not set (not glibc?)")
    return took


def prepare_process() -> None:
    """What ``run()`` does to the process it owns before serving: the default
    logging (:func:`configure_default_logging`) and the allocator's thresholds
    (:func:`tune_allocator`)."""
    configure_default_logging()
    tune_allocator()


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


#: The exit code of a server that could not start serving (``enjent run``'s too).
BOOT_ERROR = 3


def run_until_signal(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    describe: Callable[[], str],
) -> None:
    """:func:`serve_until_signal` on its own loop; exit 3 in one line when it cannot serve.

    ``python myapp.py`` whose port is taken fails as ``enjent run`` does: the
    error logged (no traceback) and ``SystemExit(3)``.
    """
    try:
        run_event_loop(serve_until_signal(start, stop, describe))
    except WebSocketServerError as exc:
        logger.error("%s", exc)
        raise SystemExit(BOOT_ERROR) from None


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
