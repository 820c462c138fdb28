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
    ClientInfo,
    Presence,
    Response,
    Room,
    RoomUnion,
    WebSocketClient,
    WebSocketServer,
)

__version__ = "0.1.0"

__all__ = [
    "Accept",
    "BusError",
    "ClientInfo",
    "Close",
    "CloseCode",
    "ConnectionClosedError",
    "EnjentError",
    "HandshakeRejected",
    "Headers",
    "Opcode",
    "Ping",
    "Pong",
    "Presence",
    "ProtocolError",
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
