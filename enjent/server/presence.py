"""Presence: who is connected, answered on demand by the workers that hold them.

Server layer (layer 2 of docs/architecture.md). No worker keeps a list of
another worker's clients; ``await server.fetch_clients(...)`` asks every
worker (over the bus on a cluster) and returns what answered within the
timeout, as a :class:`Presence`. A worker answers from its own clients with
:func:`local_rows`, at most ``limit`` rows, and always says how many matched.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "MAX_PRESENCE_LIMIT",
    "ClientInfo",
    "Presence",
    "check_query",
    "local_clients",
    "local_rows",
    "presence_row",
]

#: The most client rows one presence query may ask for.
MAX_PRESENCE_LIMIT = 100_000


class ClientInfo(NamedTuple):
    """One client in a presence answer (a snapshot: it may have left since)."""

    id: str
    shard: int
    path: str
    connected_at: float


@dataclass
class Presence:
    """The answer to a presence query.

    ``total`` counts the matching clients of every worker that answered,
    ``clients`` holds at most the query's ``limit`` of them, and
    ``missing_workers`` names the workers that did not answer within the
    timeout: when it is not empty the answer is ``partial``.
    """

    clients: list[ClientInfo] = field(default_factory=list)
    total: int = 0
    workers: list[int] = field(default_factory=list)
    missing_workers: list[int] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Some worker did not answer in time: ``total`` may be short."""
        return bool(self.missing_workers)

    @property
    def truncated(self) -> bool:
        """More clients matched than ``clients`` holds (the query's limit)."""
        return self.total > len(self.clients)

    def __len__(self) -> int:
        return len(self.clients)

    def __iter__(self) -> Iterator[ClientInfo]:
        return iter(self.clients)

    def add(self, shard: int, rows: Iterable[Any], total: int, limit: int) -> None:
        """Merge one worker's rows ``[id, path, connected_at]`` (up to ``limit`` in all)."""
        room = limit - len(self.clients)
        for row in rows:
            if room <= 0:
                break
            client_id, path, connected_at = row
            self.clients.append(ClientInfo(str(client_id), shard, str(path), float(connected_at)))
            room -= 1
        self.total += int(total)


def check_query(limit: int, timeout: float) -> None:
    """Refuse a presence query that could not be answered sensibly."""
    if not isinstance(limit, int) or not 0 <= limit <= MAX_PRESENCE_LIMIT:
        raise ValueError(f"limit must be an int from 0 to {MAX_PRESENCE_LIMIT}, not {limit!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def local_clients(hub: Hub, room: str | None, limit: int) -> tuple[list[Any], int]:
    """This worker's clients (of ``room``, or all): at most ``limit`` of them, and the count.

    A list of its own (the hub's sets change as clients come and go), of
    references only: the rows can be made later, a part at a time.
    """
    if room is None:
        clients: Iterable[Any] = hub.clients.values()
        total = hub.count
    else:
        members = hub.members(room)
        clients, total = members, len(members)
    return list(itertools.islice(clients, limit)), total


def presence_row(client: Any) -> list[Any]:
    """One client as a presence answer carries it: ``[id, path, connected_at]``."""
    return [client.id, client.request.path, client.connected_at]


def local_rows(hub: Hub, room: str | None, limit: int) -> tuple[list[list[Any]], int]:
    """This worker's clients (of ``room``, or all): at most ``limit`` rows, and the count."""
    clients, total = local_clients(hub, room, limit)
    return [presence_row(client) for client in clients], total
