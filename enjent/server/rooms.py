"""Named groups of clients: :class:`Room` and unions of rooms.

Server layer (layer 2 of docs/architecture.md). A ``Room`` is a handle (a name and the
hub of clients); members live in the hub, so a handle never goes stale and an
empty room costs nothing. ``Room.union`` is the original's Aggregate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .presence import Presence, check_query

if TYPE_CHECKING:
    from .client import WebSocketClient
    from .hub import Hub

__all__ = ["Room", "RoomUnion"]


class Room:
    """The clients that joined ``name``; get one with ``server.room(name)``.

    On a cluster, ``broadcast`` reaches the members on every worker, while
    ``len``, ``in`` and iteration see this worker's members only; ``await
    room.count()`` and ``await room.fetch_clients()`` ask every worker.
    """

    __slots__ = ("hub", "name")

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name

    def members(self) -> set[WebSocketClient]:
        """This worker's members (a live set: copy it before changing rooms)."""
        return self.hub.members(self.name)

    def broadcast(self, data: str | bytes, *, exclude: WebSocketClient | None = None) -> int:
        """Send ``data`` to every member (encoded once); return local writes."""
        return self.hub.broadcast_rooms([self.name], data, exclude)

    async def count(self, *, timeout: float = 1.0) -> Presence:
        """The members of every worker, counted: ``.total``, and ``.partial`` if one was late."""
        return await self.fetch_clients(limit=0, timeout=timeout)

    async def fetch_clients(self, *, limit: int = 1000, timeout: float = 1.0) -> Presence:
        """The members of every worker (at most ``limit``): see ``server.fetch_clients``."""
        check_query(limit, timeout)
        return await self.hub.peers.fetch_clients(self.name, limit, timeout)

    def __len__(self) -> int:
        return len(self.members())

    def __contains__(self, client: object) -> bool:
        return client in self.members()

    def __iter__(self) -> Iterator[WebSocketClient]:
        return iter(list(self.members()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Room):
            return self.hub is other.hub and self.name == other.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<Room {self.name!r} ({len(self)} members)>"

    def union(self, *rooms: Room) -> RoomUnion:
        """Several rooms seen as one: a client in two of them gets one copy.

        ``Room.union(a, b)`` and ``a.union(b)`` are the same union.
        """
        return RoomUnion((self, *rooms))


class RoomUnion:
    """The union of several rooms (the original's ``Aggregate``)."""

    __slots__ = ("rooms",)

    def __init__(self, rooms: tuple[Room, ...]) -> None:
        self.rooms = rooms

    def members(self) -> set[WebSocketClient]:
        """This worker's members of any of the rooms, each once."""
        members: set[WebSocketClient] = set()
        for room in self.rooms:
            members |= room.members()
        return members

    def broadcast(self, data: str | bytes, *, exclude: WebSocketClient | None = None) -> int:
        """Send ``data`` once to each client of any of the rooms."""
        if not self.rooms:
            return 0
        hub = self.rooms[0].hub
        return hub.broadcast_rooms([room.name for room in self.rooms], data, exclude)

    def __len__(self) -> int:
        return len(self.members())

    def __contains__(self, client: object) -> bool:
        return any(client in room for room in self.rooms)

    def __iter__(self) -> Iterator[WebSocketClient]:
        return iter(list(self.members()))

    def __repr__(self) -> str:
        return f"<RoomUnion {[room.name for room in self.rooms]!r}>"
