"""How a server's connections end: all at once on a stop, one by one on a drain.

Server layer (layer 2 of docs/architecture.md). :func:`close_connections`
is the graceful stop's part (Close 1001 to every client, a bounded wait,
then abort). :func:`drain_clients` is a reload's: the worker that a
reload replaced keeps its clients a while, then closes them with 1012
(Service Restart) at moments spread evenly over a period, with jitter, so
that they neither drop in the same instant nor all reconnect in the same
second. One coroutine for the whole worker, never a timer per client.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from .connection import ServerState

__all__ = ["GOING_AWAY", "close_connections", "drain_clients"]

#: The reason of a stop's Close 1001.
GOING_AWAY = "server shutting down"

logger = logging.getLogger("enjent.server")


async def close_connections(state: ServerState, code: int, reason: str, timeout: float) -> None:
    """Close every connection (``code`` to clients, handshakes cut), wait, abort the rest."""
    loop = asyncio.get_running_loop()
    for connection in state.all_connections():
        if connection.client is None:
            if connection.transport is not None:
                connection.transport.close()
        else:
            connection.close_websocket(code, reason)
    deadline = loop.time() + timeout
    while state.open_connections() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for connection in state.all_connections():
        if connection.transport is not None:
            connection.transport.abort()
    await asyncio.sleep(0)


async def drain_clients(state: ServerState, period: float, code: int, reason: str) -> None:
    """Close every client of ``state`` with ``code`` over ``period`` seconds.

    Nobody is closed in the first fifth of ``period`` (clients may leave by
    themselves); then each client still connected is closed at its own
    moment, ``period * 4/5`` spread over the clients in a random order, each
    moment jittered within its share. Returns when no connection is left, or
    ``close_timeout`` after the last close.
    """
    if not period >= 0:
        raise ValueError("period must be >= 0 seconds")
    loop = asyncio.get_running_loop()
    clients: list[Any] = list(state.hub.clients.values())
    logger.info("draining: %d client(s) closed with %d over %.0fs", len(clients), code, period)
    random.shuffle(clients)
    started = loop.time()
    grace = period / 5
    share = (period - grace) / max(1, len(clients))
    for index, client in enumerate(clients):
        wait = started + grace + share * (index + random.random()) - loop.time()
        if wait > 0.01:
            if not state.open_connections():
                break  # everyone left by themselves
            await asyncio.sleep(wait)
        client.close(code, reason)  # a no-op for a client already gone
    deadline = loop.time() + state.options.timeouts.close_timeout
    while state.open_connections() and loop.time() < deadline:
        await asyncio.sleep(0.05)
