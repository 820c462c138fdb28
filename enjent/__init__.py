"""Enjent: a WebSocket server (RFC 6455) for Python.

Write the handlers once; run them in one process (the embedded default) or
in one uvloop worker per core behind a supervisor, as one logical server.

>>> from enjent import WebSocketServer
>>> server = WebSocketServer()
>>> @server.on_message
... def echo(client, message):
...     client.send(message)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exceptions import (
    BusError,
    ConnectionClosedError,
    EnjentError,
    HandshakeRejected,
    ProtocolError,
    RoomLimitError,
    WebSocketNegotiationError,
    WebSocketServerError,
)
from .frames import CloseCode, Opcode
from .http11 import Headers, Request
from .protocol import Close, Ping, Pong
from .server import (
    Accept,
    AddressLimits,
    ClientInfo,
    Joined,
    Presence,
    Publication,
    Response,
    Room,
    RoomUnion,
    WebSocketClient,
    WebSocketServer,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .cluster.publisher import AsyncPublisher, MessageTooBigError, Publisher
    from .server.auth import JWTAuth

#: Names imported from the cluster layer on first use (``from enjent import
#: Publisher``): importing ``enjent`` does not load ZeroMQ or NATS.
_LAZY = {
    "JWTAuth": "enjent.server.auth",
    "AsyncPublisher": "enjent.cluster.publisher",
    "MessageTooBigError": "enjent.cluster.publisher",
    "Publisher": "enjent.cluster.publisher",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'enjent' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Accept",
    "AddressLimits",
    "AsyncPublisher",
    "BusError",
    "ClientInfo",
    "Close",
    "CloseCode",
    "ConnectionClosedError",
    "EnjentError",
    "HandshakeRejected",
    "Headers",
    "JWTAuth",
    "Joined",
    "MessageTooBigError",
    "Opcode",
    "Ping",
    "Pong",
    "Presence",
    "ProtocolError",
    "Publication",
    "Publisher",
    "Request",
    "Response",
    "Room",
    "RoomLimitError",
    "RoomUnion",
    "WebSocketClient",
    "WebSocketNegotiationError",
    "WebSocketServer",
    "WebSocketServerError",
    "__version__",
]
