"""Client ids: the one place that makes, parses and resets them.

Server layer (layer 2 of docs/architecture.md). An id is
``<shard>-<generation>-<counter in hex><10 random hex digits>``: the worker
that owns the client, a random generation drawn per process (a restarted
worker never reuses an id), a counter (unique), and 40 random bits, so that
the ids of one worker cannot be guessed from each other (an app that lets
users message each other by id must not let them reach anyone by counting).
Ids are not secrets all the same: they travel in messages and logs, and an
app checks who may send to whom. The cluster routes ``server.send(client_id)``
by the shard part alone.
"""

from __future__ import annotations

import secrets
from os import urandom as _urandom
from typing import NamedTuple

__all__ = ["RANDOM_BYTES", "ClientId", "ClientIds"]

#: Random bytes at the end of every id (as hex digits: twice as many).
RANDOM_BYTES = 5


class ClientId(NamedTuple):
    """The parts of a client id."""

    shard: int
    generation: str
    serial: int


class ClientIds:
    """Makes the ids of one process's clients."""

    __slots__ = ("_next", "generation", "shard")

    def __init__(self, shard: int = 0) -> None:
        self.shard = shard
        self.generation = secrets.token_hex(3)
        self._next = 0

    def reset(self, shard: int) -> None:
        """A new identity for this process (a worker after fork): new shard, new generation."""
        self.shard = shard
        self.generation = secrets.token_hex(3)
        self._next = 0

    def make(self) -> str:
        self._next += 1
        return f"{self.shard}-{self.generation}-{self._next:x}{_urandom(RANDOM_BYTES).hex()}"

    @staticmethod
    def parse(client_id: str) -> ClientId | None:
        """The parts of ``client_id``, or ``None`` if it is not an Enjent id."""
        shard, sep, rest = client_id.partition("-")
        generation, sep2, serial = rest.partition("-")
        if not (sep and sep2 and shard.isdigit() and generation and serial):
            return None
        try:
            return ClientId(int(shard), generation, int(serial, 16))
        except ValueError:
            return None

    @staticmethod
    def shard_of(client_id: str) -> int | None:
        """The worker that owns ``client_id`` (ids start with ``<shard>-``)."""
        head, sep, _ = client_id.partition("-")
        if not sep or not head.isdigit():
            return None
        return int(head)
