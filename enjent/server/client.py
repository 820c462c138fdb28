"""The application's view of one connected client: :class:`WebSocketClient`.

Server layer (layer 2 of docs/architecture.md). The Python form of the original's
``WebSocketClient``: an id, the initial request, ``send`` returning a bool,
rooms. Subclass it (``WebSocketServer(client_class=...)``) or build it with a
factory (``client_factory=...``, the original's ClientInitializationStrategy).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ..exceptions import ConnectionClosedError, RoomLimitError
from ..frames import CloseCode
from ..http11 import Request
from .history import parse_since

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = ["WebSocketClient"]


_wall_time = 0.0


def _recent_wall_time() -> float:
    """``time.time()``, as one ``float`` shared by the calls of 10 ms.

    Every connected client keeps its handshake time: in a burst of
    connections, one object for all of them instead of 24 bytes each.
    """
    global _wall_time
    now = time.time()
    if now - _wall_time >= 0.01:
        _wall_time = now
    return _wall_time


class WebSocketClient:
    """A client connected to this server (on this process).

    Attributes set by the server once the handshake succeeds:

    - ``id``: unique across the cluster (it names the worker that owns it);
    - ``connected_at``: UNIX time of the handshake (within 10 ms: the clients
      of a burst share one timestamp object);
    - ``request``: the :class:`~enjent.Request` of the opening handshake;
    - ``subprotocol``: the negotiated subprotocol, or ``None``;
    - ``data``: whatever the ``on_handshake`` hook attached (default ``None``).

    A subclass may add attributes; declare them in ``__slots__`` to keep
    memory per connection low. ``connection`` and ``hub`` are the server's
    (the client's transport and the registry it belongs to): do not reuse
    those names.
    """

    __slots__ = (
        "_rooms",
        "connected_at",
        "connection",
        "data",
        "expires_at",
        "hub",
        "id",
        "request",
        "subprotocol",
    )

    def __init__(self, request: Request) -> None:
        self.request = request
        self.id = ""
        self.connected_at = _recent_wall_time()
        self.subprotocol: str | None = None
        self.data: Any = None
        #: UNIX time after which the client is closed with 3005 (its token's
        #: ``exp``; set by an ``on_handshake`` hook's ``Accept(expires_at=...)``);
        #: 0: never. The keepalive sweep checks it, about once a second.
        self.expires_at = 0.0
        #: The connection this client is served on (``None`` before the handshake).
        self.connection: Connection | None = None
        #: The registry of the process's clients (``None`` before the handshake).
        self.hub: Hub | None = None
        self._rooms: set[str] | None = None

    # ------------------------------------------------------------- identity

    @property
    def remote_address(self) -> str | None:
        """The client's IP address.

        ``X-Forwarded-For`` (its rightmost address not itself a trusted
        proxy) or ``X-Real-Ip`` are honoured only when the TCP peer is one of
        the server's ``trusted_proxies``.
        """
        hub = self.hub
        peer = self.request.remote_address
        host = peer[0] if peer else None
        if hub is None or host is None:
            return host
        return hub.proxies.client_address(host, self.request.headers)

    @property
    def is_open(self) -> bool:
        """Whether messages can still be sent to this client."""
        connection = self.connection
        return connection is not None and connection.is_open()

    # ------------------------------------------------------------- messages

    def send(self, data: str | bytes | bytearray | memoryview) -> bool:
        """Queue a message (text for ``str``, binary otherwise); never blocks.

        Returns ``False`` when the client is closed or is a slow consumer
        over its ``write_limit`` (the server then closes it with 3008).
        """
        connection = self.connection
        if connection is None:
            return False
        return connection.send_message(data)

    def drain(self) -> Awaitable[None]:
        """Wait until the write buffer is below the server's low-water mark."""
        connection = self.connection
        if connection is None:
            raise ConnectionClosedError(f"client {self.id} is not connected")
        return connection.drain()

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (non-blocking); ``on_disconnect`` follows."""
        connection = self.connection
        if connection is not None:
            connection.close_websocket(code, reason)

    # ---------------------------------------------------------------- rooms

    def join(self, name: str, *, since: Any = None) -> None:
        """Join the room ``name`` (created on first use); a no-op once disconnected.

        For a room that keeps history (``server.keep_history``), ``since`` is the
        position the client last saw (``(epoch, offset)`` or ``"EPOCH:OFFSET"``, as
        the client sent it back): the client then gets, in order, ``on_join``'s
        messages, what it missed and the live publications, or ``recovered=False``
        in ``on_join`` (garbage, an old epoch, too far behind: never an exception).
        On a cluster the client becomes a member once the keeper of the history
        answered (a bus round trip).

        Raises :class:`~enjent.RoomLimitError` when the name is over the
        server's ``max_room_name`` bytes, or when this client is already in
        ``max_rooms_per_client`` rooms; ``ValueError`` for ``since`` on a room
        without history.
        """
        hub = self.hub
        if hub is None:
            raise RuntimeError("join() needs a client connected to a server")
        hub.check_room_name(name)
        remembers = bool(hub.history) and hub.history.settings_of(name) is not None
        if since is not None and not remembers:
            raise ValueError(f"room {name!r} keeps no history: join it without since")
        if not hub.is_connected(self):
            return  # gone: joining now would leave a dead member in the room forever
        rooms = self._rooms
        if rooms is None:
            rooms = self._rooms = set()
        if name not in rooms:
            limit = hub.limits.max_rooms_per_client
            if len(rooms) >= limit:
                raise RoomLimitError(
                    f"client {self.id} is in {len(rooms)} rooms: max_rooms_per_client={limit}"
                )
            rooms.add(name)
            if remembers:
                hub.join_with_history(self, name, parse_since(since))
            else:
                hub.join(self, name)

    def leave(self, name: str) -> None:
        """Leave the room ``name``; a no-op if not a member."""
        rooms = self._rooms
        if rooms and name in rooms:
            rooms.discard(name)
            assert self.hub is not None
            self.hub.leave(self, name)

    @property
    def rooms(self) -> frozenset[str]:
        """The names of the rooms this client is in."""
        return frozenset(self._rooms) if self._rooms else frozenset()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.request.path!r}>"
