"""Rooms that remember: per-room history with offsets, and recovery on reconnect.

Server layer (layer 2 of docs/architecture.md). A room keeps history only when
the application asks for it (:meth:`RememberingRooms.keep_history`, by name or
by name prefix). Every publication to such a room gets an *offset* that
increases by one within the room, whoever publishes it, and the room has an
*epoch*, a short string that changes whenever the room's history is lost (a
restart of the process that keeps it, or the room's record dropped under the
memory bound): a client that comes back with ``(epoch, offset)`` gets exactly
what it missed, or ``recovered=False`` and nothing passed off as complete.

Who keeps the history: :class:`HistoryStore`, in memory. One process keeps
its own; on the embedded bus the broker process keeps it for every worker
(it outlives any worker: see :mod:`enjent_supervisor.keeper`).

What a member receives: ``format(publication)`` (:meth:`RememberingRooms.format_publication`),
called once per worker per publication, so that encode-once and compress-once
per worker still hold; by default the data unchanged.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "MAX_REPLAY",
    "HistoryRules",
    "HistorySettings",
    "HistoryStore",
    "Joined",
    "Publication",
    "RememberingRooms",
    "parse_since",
]

#: The most publications one recovery replays; a client further behind gets
#: ``recovered=False`` (and a fresh snapshot from the application).
MAX_REPLAY = 1000
#: The longest epoch accepted in a position.
MAX_EPOCH = 32
#: The largest offset accepted in a position (a counter that never reaches it honestly).
MAX_OFFSET = (1 << 53) - 1
#: What parse_since returns for a position that is not one (garbage from a client).
INVALID = ("", -1)


@dataclass(frozen=True, slots=True)
class HistorySettings:
    """What one room (or each room of a prefix) keeps: messages, seconds, bytes."""

    #: Publications kept per room (the oldest evicted first).
    size: int = 100
    #: Seconds a publication is kept.
    ttl: float = 600.0
    #: Bytes kept per room (Python's size of the data).
    max_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not self.size > 0:
            raise ValueError(f"history size must be a positive int, got {self.size!r}")
        if self.size > 1_000_000:
            raise ValueError(f"history size is at most 1,000,000 messages, got {self.size}")
        ttl = self.ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ValueError(f"history ttl must be a positive number of seconds, got {ttl!r}")
        object.__setattr__(self, "ttl", float(ttl))
        size = self.max_bytes
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 16 << 20:
            raise ValueError(f"history max_bytes must be an int in 1..16 MiB, got {size!r}")


class HistoryRules:
    """Which rooms keep history: exact names first, then the longest matching prefix."""

    __slots__ = ("max_bytes", "max_messages", "names", "prefixes")

    def __init__(self) -> None:
        self.names: dict[str, HistorySettings] = {}
        self.prefixes: list[tuple[str, HistorySettings]] = []
        #: The bound of all rooms' history together (bytes, publications).
        self.max_bytes = 64 * 1024 * 1024
        self.max_messages = 1_000_000

    def __bool__(self) -> bool:
        return bool(self.names or self.prefixes)

    def add(self, room: str | None, prefix: str | None, settings: HistorySettings) -> None:
        if (room is None) == (prefix is None):
            raise ValueError("keep_history() takes room=NAME or prefix=TEXT (one of them)")
        if room is not None:
            if not isinstance(room, str) or not room:
                raise ValueError(f"room must be a non-empty str, got {room!r}")
            self.names[room] = settings
        else:
            if not isinstance(prefix, str):
                raise ValueError(f"prefix must be a str ('' for every room), got {prefix!r}")
            self.prefixes = [item for item in self.prefixes if item[0] != prefix]
            self.prefixes.append((prefix, settings))
            self.prefixes.sort(key=lambda item: -len(item[0]))

    def largest(self) -> HistorySettings:
        """The largest size, TTL and bytes of any rule (what a store for all rooms allows)."""
        every = [*self.names.values(), *(settings for _, settings in self.prefixes)]
        return HistorySettings(
            max(item.size for item in every),
            max(item.ttl for item in every),
            max(item.max_bytes for item in every),
        )

    def settings_of(self, name: str) -> HistorySettings | None:
        """The settings of room ``name``, or ``None`` if it keeps no history."""
        settings = self.names.get(name)
        if settings is not None:
            return settings
        for prefix, settings in self.prefixes:
            if name.startswith(prefix):
                return settings
        return None

    def split(self, names: list[str]) -> tuple[list[str], list[str]]:
        """``names`` as (rooms with history, rooms without)."""
        kept = [name for name in names if self.settings_of(name) is not None]
        if not kept:
            return kept, names
        return kept, [name for name in names if name not in kept]


class Publication:
    """One publication to a room with history: what a formatter and a replay see."""

    __slots__ = ("data", "epoch", "offset", "room")

    def __init__(self, room: str, epoch: str, offset: int, data: str | bytes) -> None:
        self.room = room
        self.epoch = epoch
        self.offset = offset
        self.data = data

    def __repr__(self) -> str:
        return f"<Publication {self.room!r} {self.epoch}:{self.offset}>"


@dataclass(frozen=True, slots=True)
class Joined:
    """A client's join of a room with history, as ``on_join`` handlers see it.

    ``epoch`` and ``offset`` are the room's position when the client joined
    (the last offset published; 0 for none): what it should send back with
    ``since`` when it reconnects. ``recovered`` is ``None`` when no ``since``
    was given, ``True`` when every publication after ``since`` follows (``missed``
    of them, then the live ones), ``False`` when they cannot be: the application
    should send a fresh snapshot. ``epoch`` is ``None`` only when the keeper of
    the history did not answer in time (the client then gets the live ones).
    """

    room: str
    epoch: str | None
    offset: int | None
    recovered: bool | None
    missed: int = 0

    @classmethod
    def unanswered(cls, room: str, since: tuple[str, int] | None) -> Joined:
        """A join whose keeper did not answer: no position, not recovered (if asked)."""
        return cls(room, None, None, None if since is None else False)


def parse_since(value: Any) -> tuple[str, int] | None:
    """A position from a client: ``(epoch, offset)``, ``"EPOCH:OFFSET"`` or ``None``.

    Garbage gives :data:`INVALID` (recovery then says ``False``), never an exception.
    """
    if value is None:
        return None
    if isinstance(value, str):
        epoch, colon, number = value.rpartition(":")
        if not colon or not number.isdigit() or len(number) > 16:
            return INVALID
        value = (epoch, int(number))
    if not isinstance(value, tuple | list) or len(value) != 2:
        return INVALID
    epoch, offset = value
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH:
        return INVALID
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        return INVALID
    return epoch, offset


class _RoomLog:
    __slots__ = ("bytes", "entries", "epoch", "last", "settings")

    def __init__(self, epoch: str, settings: HistorySettings) -> None:
        self.epoch = epoch
        self.settings = settings
        self.last = 0
        #: (offset, time, data, size), oldest first
        self.entries: collections.deque[tuple[int, float, str | bytes, int]] = collections.deque()
        self.bytes = 0


def _size(data: str | bytes) -> int:
    return sys.getsizeof(data)


class HistoryStore:
    """Every room's history in one process's memory, bounded per room and in all.

    Per room: at most ``size`` publications and ``max_bytes``, none older than
    ``ttl``. In all: the rules' ``max_bytes`` and ``max_messages`` (the oldest
    publications of any room evicted first) and ``max_rooms`` rooms remembered
    (the least recently published dropped whole: its next publication starts a
    new epoch).
    """

    def __init__(
        self,
        rules: HistoryRules,
        *,
        max_rooms: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.max_rooms = max_rooms
        self.clock = clock
        self._base = secrets.token_hex(4)
        self._instances = 0
        self._rooms: collections.OrderedDict[str, _RoomLog] = collections.OrderedDict()
        #: (log, offset) in the order published: what the global bound evicts first
        self._order: collections.deque[tuple[_RoomLog, int]] = collections.deque()
        self.bytes = 0
        self.messages = 0
        self.counters = {"appended": 0, "evicted": 0, "replays": 0, "replayed": 0}
        self._expired_at = clock()

    # -------------------------------------------------------------- rooms

    def _log(self, room: str, settings: HistorySettings) -> _RoomLog:
        log = self._rooms.get(room)
        if log is None:
            if len(self._rooms) >= self.max_rooms:
                _, dropped = self._rooms.popitem(last=False)
                self._drop_entries(dropped, len(dropped.entries))
            self._instances += 1
            log = self._rooms[room] = _RoomLog(f"{self._base}-{self._instances}", settings)
        else:
            self._rooms.move_to_end(room)
            log.settings = settings
        return log

    def _drop_entries(self, log: _RoomLog, count: int) -> None:
        entries = log.entries
        for _ in range(count):
            _, _, _, size = entries.popleft()
            log.bytes -= size
            self.bytes -= size
            self.messages -= 1
            self.counters["evicted"] += 1

    def _expire_room(self, log: _RoomLog, now: float) -> None:
        horizon = now - log.settings.ttl
        entries = log.entries
        count = 0
        for entry in entries:
            if entry[1] >= horizon:
                break
            count += 1
        if count:
            self._drop_entries(log, count)

    def expire(self) -> None:
        """Evict what is past its room's TTL (the keeper calls it once a second)."""
        now = self.clock()
        self._expired_at = now
        for log in self._rooms.values():
            if log.entries:
                self._expire_room(log, now)
        if len(self._order) > 2 * self.messages + 1024:
            self._order = collections.deque(
                item for item in self._order if item[0].entries and item[1] >= item[0].entries[0][0]
            )

    # ------------------------------------------------------------ publish

    def append(self, room: str, data: str | bytes) -> Publication | None:
        """Record one publication; ``None`` if ``room`` keeps no history."""
        settings = self.rules.settings_of(room)
        if settings is None:
            return None
        now = self.clock()
        if now - self._expired_at > 1.0:
            self.expire()
        log = self._log(room, settings)
        log.last += 1
        size = _size(data)
        log.entries.append((log.last, now, data, size))
        log.bytes += size
        self.bytes += size
        self.messages += 1
        self.counters["appended"] += 1
        self._order.append((log, log.last))
        over = len(log.entries) - settings.size
        if over > 0:
            self._drop_entries(log, over)
        while log.bytes > settings.max_bytes and len(log.entries) > 1:
            self._drop_entries(log, 1)
        rules = self.rules
        order = self._order
        while order and (self.bytes > rules.max_bytes or self.messages > rules.max_messages):
            oldest, offset = order.popleft()
            if oldest.entries and oldest.entries[0][0] == offset:
                self._drop_entries(oldest, 1)
        return Publication(room, log.epoch, log.last, data)

    # ------------------------------------------------------------ recover

    def recover(self, room: str, since: tuple[str, int] | None) -> tuple[Joined, list[Publication]]:
        """The room's position, and what a client at ``since`` missed (if all of it is here).

        ``since`` as :func:`parse_since` returns it. The room's record is
        created if need be, so the position given is one a later recovery knows.
        """
        settings = self.rules.settings_of(room)
        if settings is None:
            raise ValueError(f"room {room!r} keeps no history")
        log = self._log(room, settings)
        self._expire_room(log, self.clock())
        if since is None:
            return Joined(room, log.epoch, log.last, None), []
        epoch, offset = since
        entries = log.entries
        first = entries[0][0] if entries else log.last + 1
        complete = (
            epoch == log.epoch
            and offset <= log.last
            and offset >= first - 1
            and log.last - offset <= MAX_REPLAY
        )
        self.counters["replays"] += 1
        if not complete:
            return Joined(room, log.epoch, log.last, False), []
        missed = [
            Publication(room, log.epoch, entry[0], entry[2])
            for entry in itertools.islice(entries, offset - first + 1, None)
        ]
        self.counters["replayed"] += len(missed)
        return Joined(room, log.epoch, log.last, True, len(missed)), missed

    def figures(self) -> dict[str, int]:
        """What ``/metrics`` shows of this store (``enjent_history_*``)."""
        return {
            "rooms": len(self._rooms),
            "messages": self.messages,
            "bytes": self.bytes,
            **self.counters,
        }


def identity(publication: Publication) -> str | bytes:
    """The default format: a member receives the data as published."""
    return publication.data


class RememberingRooms:
    """The history part of :class:`~enjent.WebSocketServer`'s API (a mix-in)."""

    hub: Hub

    def keep_history(
        self,
        *,
        room: str | None = None,
        prefix: str | None = None,
        size: int = 100,
        ttl: float = 600.0,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """Keep the last ``size`` publications (at most ``ttl`` seconds old and
        ``max_bytes``) of the room ``room``, or of every room whose name starts
        with ``prefix`` (``""``: every room).

        Call it before the server starts (a module-level call in the app, so
        that every worker and the keeper of the embedded bus see it). Raises
        ``ValueError`` for a bad value.
        """
        self.hub.history.add(room, prefix, HistorySettings(size, ttl, max_bytes))

    def limit_history(self, *, max_bytes: int, max_messages: int) -> None:
        """Bound all rooms' history together (default 64 MiB, 1,000,000 publications)."""
        for name, value in (("max_bytes", max_bytes), ("max_messages", max_messages)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hub.history.max_bytes = max_bytes
        self.hub.history.max_messages = max_messages

    def format_publication(
        self, formatter: Callable[[Publication], str | bytes]
    ) -> Callable[[Publication], str | bytes]:
        """Register ``formatter(publication) -> str | bytes``: what members of rooms
        with history receive, with ``publication.room``, ``.epoch``, ``.offset`` and
        ``.data`` (by default the data unchanged). Called once per worker per
        publication, and once per publication a recovering client missed.
        """
        if inspect.iscoroutinefunction(formatter):
            raise TypeError("format_publication takes a plain function (it runs per delivery)")
        self.hub.formatter = formatter
        return formatter

    def on_join(self, handler: Callable[[Any, Joined], None]) -> Callable[[Any, Joined], None]:
        """Register ``handler(client, joined)``: a client's join of a room with history
        is complete (:class:`Joined`: its position, whether it recovered). What the
        handler sends reaches the client before what it missed and the live ones.
        A plain function (an ``async def`` one would run too late for that order).
        """
        if inspect.iscoroutinefunction(handler):
            raise TypeError("on_join takes a plain function: what it sends must go first")
        self.hub.join_handlers.append(handler)
        return handler
