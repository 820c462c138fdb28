"""Run Enjent's hot paths once in the supervisor, before it forks the workers.

Supervisor layer (layer 4). A worker shares the supervisor's memory
copy-on-write. Whatever a worker imports or runs for the first time after
fork is its own: modules imported lazily, and CPython's in-place
specialization of the bytecode it executes. So the supervisor serves a few
loopback clients with a bare :class:`~enjent.WebSocketServer` of its own
(never the application's, whose handlers must not run here) before forking:
the modules and the specialized code are then shared by every worker.
Measured at 8 workers, before any client: 41.7 MiB of whole-tree USS
instead of 58.4 (``loadtest/RESULTS.md``).

Then, with :func:`fill_allocator_pools`, it takes the free blocks left in
its small-object allocator's pools, so that a worker's own objects do not
land on pages it shares with the supervisor.

It takes a few tens of milliseconds; any failure (no loopback, no free
port) is logged at debug level and ignored: it is an optimization only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys

logger = logging.getLogger("enjent.supervisor")

_REQUEST = (
    b"GET /warm-up HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
)


def _masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + body


async def _exercise(rounds: int) -> None:
    from enjent import WebSocketServer

    server = WebSocketServer(
        ping_interval=None,
        compression=None,
        health_path=None,
        metrics_path=None,
        max_connections=rounds + 8,
    )
    server.on_message(lambda client, message: client.send(message))
    await server.start("127.0.0.1", 0)
    try:
        for _ in range(rounds):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                key = base64.b64encode(os.urandom(16))
                writer.write(_REQUEST + key + b"\r\n\r\n")
                await reader.readuntil(b"\r\n\r\n")
                writer.write(_masked_text(b"warm-up"))
                await reader.readexactly(2 + len(b"warm-up"))
            finally:
                writer.close()
        await asyncio.sleep(0.02)  # the server sees the clients go
    finally:
        await server.stop(close_timeout=1.0)


def warm_up(rounds: int = 64, timeout: float = 5.0) -> bool:
    """Serve ``rounds`` loopback clients in a short-lived loop; ``False`` if that failed."""
    from enjent.server import run_event_loop

    async def bounded() -> None:
        await asyncio.wait_for(_exercise(rounds), timeout)

    quiet = logging.getLogger("enjent.server")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "stopped" is not the application's
    try:
        run_event_loop(bounded())
    except Exception as exc:  # an optimization only: never a reason not to start
        logger.debug("warm-up skipped: %s: %s", type(exc).__name__, exc)
        return False
    finally:
        quiet.setLevel(level)
    return True


_BYTES_OVERHEAD = sys.getsizeof(b"")  # a bytes object of n bytes takes this + n
#: Objects that fill the supervisor's partly used allocator pools; kept for the
#: life of the process, never touched again.
_fillers: list[object] = []


def _available_blocks() -> dict[int, int] | None:
    """Free blocks per size class in the pools in use (``sys._debugmallocstats``)."""
    import re
    import tempfile

    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return None
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("ascii", "replace")
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.MULTILINE)
    return {int(size): int(avail) for _, size, _, _, avail in rows}


def _filler(size: int) -> object:
    """An object that takes one block of ``size`` bytes (CPython, 64-bit)."""
    if size <= _BYTES_OVERHEAD:
        return object() if size <= 16 else float(len(_fillers)) + 0.5  # 16 and 24 bytes
    return bytes(size - _BYTES_OVERHEAD)


def fill_allocator_pools(passes: int = 3) -> int:
    """Use up the free blocks of the small-object pools the supervisor has in use.

    A forked worker's allocations would otherwise go first into those
    blocks, each on a page shared with the supervisor's live objects, which
    the worker then copies whole. With the blocks taken, a worker's objects
    go to pools of its own. Measured at 8 workers (``loadtest/RESULTS.md``):
    2.0-2.6 MiB less USS for the whole tree, before and with 8000 idle
    clients (~0.3 MiB per worker). What a worker still copies when its first
    clients arrive are pages whose objects' reference counts it changes, which
    no filling avoids.
    Returns the number of blocks filled (0 where the statistics are not
    available: not CPython, or no file descriptor 2 to borrow).
    """
    filled = 0
    for _ in range(passes):
        try:
            available = _available_blocks()
        except OSError as exc:  # no file descriptor 2 to borrow, no temporary file
            logger.debug("allocator pools not filled: %s", exc)
            break
        if not available:
            break
        wanted = [(size, count) for size, count in available.items() if count]
        if not wanted:
            break
        for size, count in wanted:
            _fillers.extend(_filler(size) for _ in range(count))
            filled += count
    return filled
