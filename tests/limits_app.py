"""The app of the per-address tests: ``enjent run tests.limits_app:server``.

``LIMITS_CONNECTIONS`` and ``LIMITS_HANDSHAKES`` (per second) set its
``AddressLimits`` (unset: none); messages are echoed.
"""

from __future__ import annotations

import os

from enjent import AddressLimits, WebSocketClient, WebSocketServer


def _limit(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


server = WebSocketServer(
    ping_interval=None,
    close_timeout=2.0,
    address_limits=AddressLimits(
        max_connections=_limit("LIMITS_CONNECTIONS"),
        max_handshakes_per_second=_limit("LIMITS_HANDSHAKES"),
    ),
)


@server.on_message
def echo(client: WebSocketClient, message: str | bytes) -> None:
    client.send(message)
