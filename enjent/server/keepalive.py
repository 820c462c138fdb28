"""One sweep per process: handshake, keepalive and close timeouts.

Server layer (layer 2 of docs/architecture.md). No connection has a timer
or a task of its own: every ``sweep_interval`` one pass over the open
connections aborts stalled handshakes, pings idle clients, closes those
whose pong does not come (1011), closes clients whose token expired (3005)
and aborts closings that take too long.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..frames import CloseCode, Opcode, encode_frame
from ..protocol import State
from .connection import ServerState

__all__ = ["sweep", "sweep_forever"]

logger = logging.getLogger("enjent.server")

_PING_FRAME = encode_frame(Opcode.PING.value, b"")


def sweep(state: ServerState, now: float) -> None:
    """One pass over every connection."""
    timeouts = state.options.timeouts
    ping_interval = timeouts.ping_interval
    ping_timeout = timeouts.ping_timeout
    close_timeout = timeouts.close_timeout
    handshake_timeout = timeouts.handshake_timeout
    stats = state.stats
    wall = time.time()
    for connection in state.all_connections():
        transport = connection.transport
        if transport is None:
            continue
        if connection.client is None:
            if connection.closing_since:  # refused, lingering until the client's EOF
                if now - connection.closing_since > close_timeout:
                    transport.abort()
            elif now - connection.last_seen > handshake_timeout:  # opened then
                stats["handshake_timeouts"] += 1
                transport.abort()
            continue
        if connection.active:
            connection.active = False
            connection.last_seen = now
            connection.ping_sent_at = 0.0
        if connection.state is State.OPEN:
            expires_at = connection.client.expires_at
            if expires_at and wall >= expires_at:
                stats["tokens_expired"] += 1
                connection.close_websocket(CloseCode.TOKEN_EXPIRED, "token expired")
                continue
            if ping_interval is None:
                continue
            if connection.ping_sent_at:
                if now - connection.ping_sent_at > ping_timeout:
                    stats["keepalive_timeouts"] += 1
                    logger.info("closing %s: no pong within %ss", connection.client, ping_timeout)
                    connection.fail_connection(CloseCode.INTERNAL_ERROR, "keepalive timeout")
                    connection.closing_since = now
            elif now - connection.last_seen >= ping_interval:
                connection.ping_sent_at = now
                transport.write(_PING_FRAME)
        elif not connection.closing_since:
            connection.closing_since = now
        elif now - connection.closing_since > close_timeout:
            transport.abort()


async def sweep_forever(state: ServerState) -> None:
    """Sweep every ``sweep_interval`` seconds until cancelled; ``state.now`` follows."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(state.options.timeouts.sweep_interval)
        state.now = loop.time()
        try:
            sweep(state, state.now)
        except Exception:  # never let a bug stop keepalive
            logger.exception("error in the keepalive sweep")
