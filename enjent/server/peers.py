"""The cluster seam: what the server needs of the other workers, and nothing more.

Server layer (layer 2 of docs/architecture.md). :class:`Peers` is the one
interface between a server and a cluster engine: client and room events,
publishing to all / to rooms / to one client, counts, presence, health and
metrics. No engine keeps per-client state for another worker's clients:
a client id names its owner, counts come from heartbeats and presence is
a query.
:class:`LocalPeers` is the engine of a single process (there are no
peers); the ZeroMQ engine (:mod:`enjent.cluster`) implements the same
interface, and nothing above the seam knows which one runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from .metrics import WorkerSample
from .presence import Presence, local_rows

if TYPE_CHECKING:
    from .client import WebSocketClient
    from .hub import Hub

__all__ = ["LocalPeers", "Peers"]


class Peers(Protocol):
    """What a cluster engine does for the server of one worker."""

    def client_connected(self, client: WebSocketClient) -> None:
        """A client of this worker completed its handshake."""

    def client_disconnected(self, client: WebSocketClient) -> None:
        """A client of this worker is gone."""

    def room_created(self, name: str) -> None:
        """This worker has a first member in ``name``: receive its broadcasts."""

    def room_deleted(self, name: str) -> None:
        """This worker has no member in ``name`` any more."""

    def publish_broadcast(self, frame: bytes, exclude_id: str | None) -> None:
        """Deliver ``frame`` to the clients of every other worker."""

    def publish_room(self, names: list[str], frame: bytes, exclude_id: str | None) -> None:
        """Deliver ``frame`` once to each member of any of ``names`` on other workers."""

    def send_to(self, client_id: str, data: str | bytes) -> bool:
        """Hand ``data`` to the owner of ``client_id``; ``False`` if it is known to be gone."""
        ...

    def close_remote(self, client_id: str, code: int, reason: str) -> None:
        """Ask the worker that owns ``client_id`` to close it."""

    def get_client(self, client_id: str) -> Any | None:
        """A proxy for another worker's client (``send``, ``close``), or ``None``."""

    def client_count(self) -> int:
        """Clients of the whole cluster, this worker's included (from heartbeats)."""
        ...

    async def fetch_clients(self, room: str | None, limit: int, timeout: float) -> Presence:
        """Ask every worker for its clients (of ``room``); what answered within ``timeout``."""
        ...

    def health(self) -> dict[str, Any]:
        """What the health path answers."""
        ...

    def metrics_samples(self) -> list[WorkerSample]:
        """One sample per worker known, for the metrics path."""
        ...


class LocalPeers:
    """The engine of one process: no other worker, nothing published."""

    __slots__ = ("hub",)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def client_connected(self, client: WebSocketClient) -> None:
        pass

    def client_disconnected(self, client: WebSocketClient) -> None:
        pass

    def room_created(self, name: str) -> None:
        pass

    def room_deleted(self, name: str) -> None:
        pass

    def publish_broadcast(self, frame: bytes, exclude_id: str | None) -> None:
        pass

    def publish_room(self, names: list[str], frame: bytes, exclude_id: str | None) -> None:
        pass

    def send_to(self, client_id: str, data: str | bytes) -> bool:
        return False

    def close_remote(self, client_id: str, code: int, reason: str) -> None:
        pass

    def get_client(self, client_id: str) -> Any | None:
        return None

    def client_count(self) -> int:
        return self.hub.count

    async def fetch_clients(self, room: str | None, limit: int, timeout: float) -> Presence:
        shard = self.hub.ids.shard
        presence = Presence(workers=[shard])
        rows, total = local_rows(self.hub, room, limit)
        presence.add(shard, rows, total, limit)
        return presence

    def health(self) -> dict[str, Any]:
        hub = self.hub
        return {
            "status": "ok",
            "clients": hub.count,
            "workers": [{"shard": hub.ids.shard, "pid": os.getpid(), "clients": hub.count}],
            "stats": dict(hub.stats),
        }

    def metrics_samples(self) -> list[WorkerSample]:
        hub = self.hub
        return [WorkerSample(hub.ids.shard, hub.count, dict(hub.stats))]
