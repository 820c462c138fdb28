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

from .history import HistoryStore
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

    def publish_logged(self, names: list[str], data: str | bytes, exclude_id: str | None) -> int:
        """Publish ``data`` to rooms with history (an offset each, from their keeper);
        returns the deliveries made here at once (0 when they come back over the bus)."""
        ...

    def recover(self, client: WebSocketClient, name: str, since: tuple[str, int] | None) -> None:
        """Ask the keeper of ``name``'s history for its position and what a client at
        ``since`` missed; answer with ``hub.joined`` (now, or when the answer arrives)."""

    def history_figures(self) -> dict[str, int] | None:
        """The history store's figures for ``/metrics``, ``None`` without one here."""
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

    __slots__ = ("_store", "hub")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._store: HistoryStore | None = None

    @property
    def store(self) -> HistoryStore:
        """This process's history (created on first use, with the hub's rules)."""
        if self._store is None:
            self._store = HistoryStore(self.hub.history)
        return self._store

    def publish_logged(self, names: list[str], data: str | bytes, exclude_id: str | None) -> int:
        count = 0
        for name in names:
            publication = self.store.append(name, data)
            if publication is not None:
                count += self.hub.deliver_logged(publication, exclude_id)
        return count

    def recover(self, client: WebSocketClient, name: str, since: tuple[str, int] | None) -> None:
        joined, missed = self.store.recover(name, since)
        self.hub.joined(client, joined, missed)

    def history_figures(self) -> dict[str, int] | None:
        return self._store.figures() if self._store is not None else None

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
