"""The one exception tree of Enjent (all layers).

::

    EnjentError                         base of everything Enjent raises
    ├── WebSocketServerError            the server cannot start or run
    │                                   (port in use, bad option, ...)
    ├── WebSocketNegotiationError       an opening handshake was refused;
    │   │                               carries the HTTP status to answer
    │   └── HandshakeRejected           raised by an ``on_handshake`` hook
    │                                   to refuse a client on purpose
    ├── ProtocolError                   a peer broke RFC 6455; carries the
    │                                   close code to fail the connection with
    ├── ConnectionClosedError           an operation on a closed connection
    ├── RoomLimitError                  a room name too long, or a client in
    │                                   too many rooms (also a ValueError)
    └── BusError                        the cluster bus is misconfigured or
                                        an envelope is malformed

The parser never lets an exception escape into the event loop: a
``ProtocolError`` becomes a close frame, a ``WebSocketNegotiationError``
becomes an HTTP error response.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

__all__ = [
    "BusError",
    "ConnectionClosedError",
    "EnjentError",
    "HandshakeRejected",
    "ProtocolError",
    "RoomLimitError",
    "WebSocketNegotiationError",
    "WebSocketServerError",
]


class EnjentError(Exception):
    """Base class of every exception Enjent raises."""


class WebSocketServerError(EnjentError):
    """The server cannot start or keep running (e.g. the address is in use)."""


class WebSocketNegotiationError(EnjentError):
    """The opening handshake failed (RFC 6455 §4.2.1); answered with ``status``.

    ``headers`` are extra response headers (e.g. ``Sec-WebSocket-Version``
    for a 426) and ``body`` the response body.
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | str | None = None,
    ) -> None:
        self.status = HTTPStatus(status)
        self.message = message or self.status.phrase
        self.headers = list(headers)
        if body is None:
            body = self.message + "\n"
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        super().__init__(f"{int(self.status)} {self.status.phrase}: {self.message}")


class HandshakeRejected(WebSocketNegotiationError):
    """Raise from an ``on_handshake`` hook to refuse a client.

    >>> raise HandshakeRejected(401, "missing token")   # doctest: +SKIP
    """


class ProtocolError(EnjentError):
    """The peer broke the protocol; fail the connection with ``close_code``."""

    def __init__(self, close_code: int, message: str) -> None:
        self.close_code = close_code
        super().__init__(message)


class ConnectionClosedError(EnjentError):
    """An operation needs an open connection and this one is closed."""


class RoomLimitError(EnjentError, ValueError):
    """A room name over ``max_room_name`` bytes, or a join over ``max_rooms_per_client``.

    Raised to the application by ``client.join()`` and ``server.room()``:
    room names often come from client input, and every room costs memory
    in every worker that has members.
    """


class BusError(EnjentError):
    """The cluster bus is misconfigured, or an envelope is malformed."""
