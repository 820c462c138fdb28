"""What every bus engine does, whatever carries its bytes.

Cluster layer (layer 3 of docs/architecture.md). :class:`BusEngine` is the
:class:`~enjent.server.peers.Peers` of one worker: it publishes this
worker's cross-shard messages, delivers what the other workers publish,
keeps one small record per other *worker* (never per client), counts what
is lost, and answers presence queries. A transport (ZeroMQ in
:mod:`~enjent.cluster.zeromq`) subclasses it and provides three things:
:meth:`BusEngine._send` (one envelope out, never blocking),
:meth:`BusEngine._subscribe` / :meth:`BusEngine._unsubscribe` (interest in
a topic), and calls :meth:`BusEngine.receive` for each envelope in.

Semantics that do not depend on the transport:

- a client id names its owner (``<shard>-<generation>-<serial>``):
  ``send(client_id)`` is handed to the owner's topic, ``True`` if
  published; the owner counts what arrives for a client already gone
  (``undeliverable``); an id whose worker is known to have restarted or
  died is refused at once (``False``);
- counts are sums of the counts in the heartbeats (one a second per worker),
  so they are eventually consistent within two heartbeat intervals;
- a worker whose heartbeat is late is marked ``late`` in ``/healthz``,
  nothing more: its death is decided by the supervisor that watches it
  (a ``DEAD`` envelope), or by a restart (a new generation, ``HELLO``).
  An engine without such a supervisor (``forget_after``) drops a peer
  silent that long.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exceptions import BusError
from ..frames import CloseCode
from ..protocol import OutgoingMessage
from ..server.connection import DELIVERY_BUDGET
from ..server.history import Joined, Publication
from ..server.ids import ClientIds
from ..server.logs import RepeatedLog
from ..server.metrics import WorkerSample
from ..server.presence import (
    MAX_PRESENCE_LIMIT,
    Presence,
    local_clients,
    local_rows,
    presence_row,
)
from . import bus
from .bus import BROKER_ORIGIN, Kind

if TYPE_CHECKING:
    from ..server.hub import Hub

__all__ = ["BusEngine", "Peer", "RemoteClient"]

logger = logging.getLogger("enjent.cluster")

_DEDUP_WINDOW = 1024
#: Heartbeat intervals after which a silent publisher's sequence state is dropped.
PUBLISHER_MEMORY = 60
#: The most presence queries one worker may have in flight.
MAX_QUERIES = 64
COUNTER_NAMES = (
    "sent",
    "heartbeats",
    "received",
    "dropped",
    "malformed",
    "gaps",
    "rate_limited",
    "undeliverable",
    "late_peers",
    "presence_failures",
    "presence_refused",
    "replay_timeouts",
)
#: A sequence number further ahead than this is a reset (or a forgery), not a gap.
MAX_GAP = 1_000_000
#: The most other workers one worker keeps a record of.
MAX_PEERS = 4096
#: The most senders whose sequence numbers are kept per topic.
MAX_SENDERS_PER_TOPIC = 16_384
#: The most clients a heartbeat may claim (more is a forgery or a bug: refused).
MAX_CLIENTS_PER_WORKER = 10_000_000
#: Presence queries this worker asks per second, and answers per second (a burst as large).
PRESENCE_QUERIES_PER_SECOND = 20.0
PRESENCE_ANSWERS_PER_SECOND = 50.0
#: Rows of a presence answer computed per turn of the event loop.
PRESENCE_ROWS_PER_TURN = 1000
#: Which kinds may arrive on which topic (by the topic's first byte), and from whom.
_KIND_TOPICS = {
    Kind.BROADCAST: b"A",
    Kind.ROOM: b"R",
    Kind.SEND: b"S",
    Kind.CLOSE: b"S",
    Kind.PRESENCE: b"S",
    Kind.PRESENCE_REQ: b"C",
    Kind.HEARTBEAT: b"H",
    Kind.HELLO: b"H",
    Kind.DEAD: b"H",
    Kind.PUBLISH: b"Q",
    Kind.REPLAY_REQ: b"Q",
    Kind.LOGGED: b"R",
    Kind.REPLAY: b"R",
    Kind.KEEPER: b"H",
}
#: Kinds only the keeper of room history (the broker process) publishes.
_FROM_KEEPER = (Kind.LOGGED, Kind.REPLAY, Kind.KEEPER)
#: Seconds before a recovery request is asked again (then twice that, ...), and given up.
REPLAY_RETRY = 0.2
REPLAY_DEADLINE = 3.0
#: The most joins of rooms with history one worker may have waiting for the keeper.
MAX_REPLAYS = 10_000


class _TokenBucket:
    """``rate`` a second, in bursts as large: :meth:`take` takes one if there is one."""

    __slots__ = ("at", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RemoteClient:
    """A client of another worker, known by its id: ``send`` and ``close`` cross the bus.

    Built from the id alone (no worker keeps the others' clients), so it does
    not prove that the client is still connected: a send to a client that
    left is counted by its owner as ``undeliverable``.
    """

    __slots__ = ("_engine", "id", "shard")

    def __init__(self, engine: BusEngine, client_id: str, shard: int) -> None:
        self._engine = engine
        self.id = client_id
        self.shard = shard

    def send(self, data: str | bytes) -> bool:
        """Hand a message to the owner; ``False`` if the owner is known to be gone."""
        return self._engine.send_to(self.id, data)

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Ask the owning worker to close this client."""
        self._engine.close_remote(self.id, code, reason)

    def __repr__(self) -> str:
        return f"<RemoteClient {self.id} on worker {self.shard}>"


@dataclass
class Peer:
    """What this worker knows of another worker: its last heartbeat, nothing per client."""

    generation: str
    pid: int = 0
    clients: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    last_heartbeat: float = 0.0
    late: bool = False


@dataclass
class _Replay:
    """A join of a room with history waiting for the keeper's answer."""

    client: Any
    room: str
    since: tuple[str, int] | None
    deadline: float
    asked_at: float = 0.0
    attempts: int = 0


@dataclass
class _Query:
    presence: Presence
    limit: int
    waiting: set[int]
    done: asyncio.Future[None]


class BusEngine:
    """The transport-independent half of a worker's bus client (see the module docstring)."""

    def __init__(
        self,
        hub: Hub,
        *,
        shard: int,
        max_publish_rate: float = 200_000.0,
        heartbeat_interval: float = 1.0,
        peer_timeout: float = 5.0,
        forget_after: float | None = None,
    ) -> None:
        self.hub = hub
        self.shard = shard
        self.generation = hub.ids.generation
        self.max_publish_rate = max_publish_rate
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        self.forget_after = forget_after
        self.peers: dict[int, Peer] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._seq: dict[bytes, int] = {}
        self._last_seq: dict[bytes, dict[tuple[int, str], int]] = {}
        self._room_message_id = 0
        self._recent_room_messages: collections.deque[tuple[int, str, int]] = collections.deque()
        self._recent_room_set: set[tuple[int, str, int]] = set()
        self._queries: dict[int, _Query] = {}
        self._query_id = 0
        self._tokens = max_publish_rate
        self._tokens_at = time.monotonic()
        self._started_at = time.monotonic()
        self._checked_at = time.monotonic()
        self._beat_at = 0.0
        self._events = 0
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._last_rate_warning = -10.0
        self._last_malformed_warning = -10.0
        #: when our own heartbeat last came back through the bus
        self._own_heartbeat_at = time.monotonic()
        #: heartbeat intervals since the start (a clock that costs nothing to read)
        self._ticks = 0
        self._ticked_at = time.monotonic()
        #: (origin, generation) of each publisher heard -> the tick it was last heard
        self._publishers_seen: dict[tuple[int, str], int] = {}
        self._gap_log = RepeatedLog(logger, logging.WARNING)
        self._task_errors = RepeatedLog(logger, logging.ERROR)
        self._refusals = RepeatedLog(logger, logging.WARNING)
        #: whether a DEAD envelope is believed: only where a supervisor of this host's
        #: broker publishes them (ZeroMQ); NATS carries none, so one there is forged
        self.trusts_dead = True
        #: (shard, generation) of the last processes announced dead (a bounded memory)
        self._dead: collections.deque[tuple[int, str]] = collections.deque(maxlen=256)
        self._queries_asked = _TokenBucket(PRESENCE_QUERIES_PER_SECOND)
        self._answers = _TokenBucket(PRESENCE_ANSWERS_PER_SECOND)
        self._replays: dict[int, _Replay] = {}
        self._replay_id = 0
        self._replay_timer: asyncio.TimerHandle | None = None
        #: the keeper's figures (``enjent_history_*``), from its last KEEPER envelope
        self._keeper_figures: dict[str, int] | None = None

    # ------------------------------------------------------ the transport

    def _send(self, topic: bytes, body: bytes) -> bool:
        """Put one envelope on the bus without blocking; ``False`` if it was dropped."""
        raise NotImplementedError

    def _subscribe(self, topic: bytes) -> None:
        raise NotImplementedError

    def _unsubscribe(self, topic: bytes) -> None:
        raise NotImplementedError

    def _start_heartbeats(self) -> None:
        """Start announcing this worker (a transport calls it once its sockets are up)."""
        self._started_at = time.monotonic()
        self._own_heartbeat_at = self._started_at
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_forever())

    async def _stop_heartbeats(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        for query in self._queries.values():
            if not query.done.done():
                query.done.set_result(None)
        if self._replay_timer is not None:
            self._replay_timer.cancel()
            self._replay_timer = None

    async def close(self) -> None:
        """Stop (a transport also closes its connection)."""
        await self._stop_heartbeats()

    @property
    def topics(self) -> tuple[bytes, ...]:
        """The topics every worker listens to from the start."""
        return (bus.TOPIC_ALL, bus.TOPIC_CONTROL, bus.TOPIC_HEARTBEAT, bus.shard_topic(self.shard))

    # ------------------------------------------------------------ publish

    def _publish(self, topic: bytes, kind: Kind, *fields: Any) -> bool:
        now = time.monotonic()
        rate = self.max_publish_rate
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            self.counters["rate_limited"] += 1
            if now - self._last_rate_warning > 5.0:
                self._last_rate_warning = now
                logger.warning(
                    "bus publish rate over %d/s: messages dropped (counted as rate_limited)",
                    int(rate),
                )
            return False
        self._tokens -= 1.0
        seq = self._seq.get(topic, 0) + 1
        if len(self._seq) > 10_000 and topic not in self._seq:
            # bound memory: receivers see the restart as a reset, not a gap
            self._seq = {key: value for key, value in self._seq.items() if key[:1] != b"R"}
        self._seq[topic] = seq
        body = bus.encode(kind, self.shard, self.generation, seq, *fields)
        if not self._send(topic, body):
            self.counters["dropped"] += 1
            return False
        self.counters["sent"] += 1
        return True

    def publish_broadcast(self, frame: bytes, exclude_id: str | None) -> None:
        self._publish(bus.TOPIC_ALL, Kind.BROADCAST, frame, exclude_id)

    def publish_room(self, names: list[str], frame: bytes, exclude_id: str | None) -> None:
        self._room_message_id += 1
        for name in names:
            self._publish(
                bus.room_topic(name), Kind.ROOM, names, frame, exclude_id, self._room_message_id
            )

    # ------------------------------------------------- rooms with history

    def publish_logged(self, names: list[str], data: str | bytes, exclude_id: str | None) -> int:
        """To the keeper, which gives each room its next offset and publishes ``LOGGED``
        on the room's topic: this worker's members get it from there, like every other."""
        self._room_message_id += 1
        self._publish(
            bus.TOPIC_KEEPER, Kind.PUBLISH, names, data, exclude_id, self._room_message_id
        )
        return 0

    def recover(self, client: Any, name: str, since: tuple[str, int] | None) -> None:
        """Ask the keeper; :meth:`_on_replay` completes the join (or the deadline does)."""
        now = time.monotonic()
        if len(self._replays) >= MAX_REPLAYS:
            self.counters["replay_timeouts"] += 1
            self.hub.joined(client, Joined.unanswered(name, since), [])
            return
        self._replay_id += 1
        replay = _Replay(client, name, since, now + REPLAY_DEADLINE)
        self._replays[self._replay_id] = replay
        self._ask(self._replay_id, replay)
        if self._replay_timer is None:
            loop = asyncio.get_running_loop()
            self._replay_timer = loop.call_later(REPLAY_RETRY, self._replay_tick)

    def _ask(self, request_id: int, replay: _Replay) -> None:
        replay.asked_at = time.monotonic()
        replay.attempts += 1
        epoch, offset = replay.since if replay.since is not None else (None, None)
        self._publish(
            bus.TOPIC_KEEPER,
            Kind.REPLAY_REQ,
            request_id,
            self.shard,
            self.generation,
            replay.room,
            epoch,
            offset,
        )

    def _replay_tick(self) -> None:
        """One timer for every waiting join: ask again (the room's subscription may not
        have reached the broker in time for the answer), or give up at the deadline."""
        self._replay_timer = None
        now = time.monotonic()
        for request_id, replay in list(self._replays.items()):
            if now >= replay.deadline:
                del self._replays[request_id]
                self.counters["replay_timeouts"] += 1
                self._refusals("no answer from the history keeper for room %r", replay.room)
                self.hub.joined(replay.client, Joined.unanswered(replay.room, replay.since), [])
            elif now - replay.asked_at >= REPLAY_RETRY * replay.attempts:
                self._ask(request_id, replay)
        if self._replays:
            loop = asyncio.get_running_loop()
            self._replay_timer = loop.call_later(REPLAY_RETRY, self._replay_tick)

    def _on_replay(self, fields: list[Any]) -> None:
        request_id, reply_shard, reply_generation, room, epoch, offset, recovered, items = fields
        if reply_shard != self.shard or reply_generation != self.generation:
            return  # another worker's (every worker with members in the room hears it)
        replay = self._replays.get(int(request_id))
        if replay is None or replay.room != room:
            return  # answered already (a request asked twice), or given up
        if epoch is None:  # the keeper keeps no history of this room (other rules)
            del self._replays[int(request_id)]
            self.hub.joined(replay.client, Joined.unanswered(room, replay.since), [])
            return
        if not isinstance(epoch, str) or not isinstance(items, list):
            raise BusError("REPLAY envelope: bad epoch or items")
        if recovered not in (None, True, False):
            raise BusError("REPLAY envelope: bad recovered flag")
        missed = []
        for item in items:
            number, data = item
            if not isinstance(data, str | bytes):
                raise BusError("REPLAY envelope: data must be str or bytes")
            missed.append(Publication(room, epoch, int(number), data))
        del self._replays[int(request_id)]
        flag = None if replay.since is None else bool(recovered)
        joined = Joined(room, epoch, int(offset), flag, len(missed))
        self.hub.joined(replay.client, joined, missed)

    def history_figures(self) -> dict[str, int] | None:
        """The keeper's figures, from its last report (``None`` before one)."""
        return self._keeper_figures

    def _owner(self, client_id: str) -> int | None:
        """The shard of another worker that may hold ``client_id``; ``None`` if known gone."""
        parsed = ClientIds.parse(client_id)
        if parsed is None or parsed.shard == self.shard:
            return None  # ours are in the hub; one of our past lives is gone
        peer = self.peers.get(parsed.shard)
        if peer is None:
            # unknown worker: every live worker is heard within a heartbeat or two
            if time.monotonic() - self._started_at > 2.5 * self.heartbeat_interval:
                return None
            return parsed.shard
        return parsed.shard if peer.generation == parsed.generation else None

    def send_to(self, client_id: str, data: str | bytes) -> bool:
        """Hand ``data`` to the owner of ``client_id``; ``False`` if the owner is known gone."""
        shard = self._owner(client_id)
        if shard is None:
            return False
        frame = OutgoingMessage.of(data).frame
        return self._publish(bus.shard_topic(shard), Kind.SEND, client_id, frame)

    def close_remote(self, client_id: str, code: int, reason: str) -> None:
        shard = self._owner(client_id)
        if shard is not None:
            self._publish(bus.shard_topic(shard), Kind.CLOSE, client_id, int(code), reason)

    def get_client(self, client_id: str) -> RemoteClient | None:
        shard = self._owner(client_id)
        return None if shard is None else RemoteClient(self, client_id, shard)

    # -------------------------------------------------- events from server

    def client_connected(self, client: Any) -> None:
        """Nothing is published per client: the heartbeat carries the count."""
        self._events += 1
        if not self._events & 255:
            self._beat_if_due()

    def client_disconnected(self, client: Any) -> None:
        """Nothing is published per client: the heartbeat carries the count."""
        self._events += 1
        if not self._events & 255:
            self._beat_if_due()

    def _beat_if_due(self) -> None:
        """A burst of connects or disconnects (one long turn of the loop) keeps beating."""
        if time.monotonic() - self._beat_at > self.heartbeat_interval:
            self._beat()

    def _beat(self) -> None:
        self._beat_at = time.monotonic()
        self.counters["heartbeats"] += 1
        self._publish(
            bus.TOPIC_HEARTBEAT,
            Kind.HEARTBEAT,
            os.getpid(),
            self.hub.count,
            {"bus": dict(self.counters), "server": dict(self.hub.stats)},
        )

    def room_created(self, name: str) -> None:
        """The first local member joined: subscribe to the room's topic."""
        topic = bus.room_topic(name)
        self._last_seq.pop(topic, None)
        self._subscribe(topic)

    def room_deleted(self, name: str) -> None:
        """The last local member left: unsubscribe, so its traffic stops here."""
        topic = bus.room_topic(name)
        self._last_seq.pop(topic, None)
        self._unsubscribe(topic)

    # ------------------------------------------------- counts and presence

    def client_count(self) -> int:
        """This worker's clients now, plus each peer's from its last heartbeat."""
        return self.hub.count + sum(peer.clients for peer in self.peers.values())

    async def fetch_clients(self, room: str | None, limit: int, timeout: float) -> Presence:
        """Ask every known worker; return what answered within ``timeout``."""
        if not self._queries_asked.take():  # refused before any row is made: a flood costs little
            self.counters["presence_refused"] += 1
            raise BusError(
                f"over {PRESENCE_QUERIES_PER_SECOND:g} presence queries a second on this worker: "
                "ask less often (cache the answer)"
            )
        presence = Presence(workers=[self.shard])
        rows, total = local_rows(self.hub, room, limit)
        presence.add(self.shard, rows, total, limit)
        if not self.peers:
            return presence
        if len(self._queries) >= MAX_QUERIES:
            raise BusError(f"over {MAX_QUERIES} presence queries in flight: wait for one")
        self._query_id += 1
        query_id = self._query_id
        loop = asyncio.get_running_loop()
        query = _Query(presence, limit, set(self.peers), loop.create_future())
        self._queries[query_id] = query
        try:
            if self._publish(
                bus.TOPIC_CONTROL,
                Kind.PRESENCE_REQ,
                query_id,
                self.shard,
                self.generation,
                room,
                limit,
            ):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(query.done), timeout)
        finally:
            del self._queries[query_id]
        presence.workers.sort()
        presence.missing_workers = sorted(query.waiting)
        return presence

    def _answer_presence(self, fields: list[Any]) -> None:
        query_id, reply_shard, generation, room, limit = fields
        query_id, reply_shard, limit = int(query_id), int(reply_shard), int(limit)
        if room is not None and not isinstance(room, str):
            raise BusError("PRESENCE_REQ envelope: room must be a str or nil")
        if not isinstance(generation, str) or not bus.MIN_ORIGIN <= reply_shard <= bus.MAX_ORIGIN:
            raise BusError("PRESENCE_REQ envelope: bad reply address")
        if not self._answers.take():
            # the asker sees this worker as missing (a partial answer), and the
            # clients of this worker keep their share of the loop
            self.counters["presence_refused"] += 1
            self._refusals("presence queries over %g/s: not answered", PRESENCE_ANSWERS_PER_SECOND)
            return
        clients, total = local_clients(self.hub, room, max(0, min(limit, MAX_PRESENCE_LIMIT)))
        self._stream_presence(bus.shard_topic(reply_shard), query_id, generation, total, clients, 0)

    def _stream_presence(
        self,
        topic: bytes,
        query_id: int,
        generation: str,
        total: int,
        clients: list[Any],
        start: int,
    ) -> None:
        """Publish the rows of ``clients[start:]`` in parts: one part per turn of the loop,
        at most :data:`PRESENCE_ROWS_PER_TURN` rows and :data:`~enjent.cluster.bus.PART_BYTES`."""
        chunk: list[list[Any]] = []
        size = 0
        end = min(len(clients), start + PRESENCE_ROWS_PER_TURN)
        index = start
        while index < end and size < bus.PART_BYTES:
            row = presence_row(clients[index])
            chunk.append(row)
            size += len(row[0]) + len(row[1]) + 16
            index += 1
        last = index == len(clients)
        sent = self._publish(
            topic, Kind.PRESENCE, query_id, generation, chunk, total if last else 0, last
        )
        if not sent:  # the asker sees this worker as missing: partial, never wrong
            self.counters["presence_failures"] += 1
            return
        if not last:
            asyncio.get_running_loop().call_soon(
                self._stream_presence, topic, query_id, generation, total, clients, index
            )

    def _on_presence(self, origin: int, fields: list[Any]) -> None:
        query_id, reply_generation, rows, total, last = fields
        if reply_generation != self.generation:
            return  # an answer to a past life of this shard
        query = self._queries.get(int(query_id))
        if query is None or origin not in query.waiting:
            return  # too late, or not asked
        if not isinstance(rows, list):
            raise BusError("PRESENCE envelope: rows must be a list")
        query.presence.add(origin, rows, int(total), query.limit)
        if last:
            query.waiting.discard(origin)
            query.presence.workers.append(origin)
            if not query.waiting and not query.done.done():
                query.done.set_result(None)

    # ------------------------------------------------- health and metrics

    def bus_up(self) -> bool:
        """Whether our heartbeats come back through the bus (within 3 intervals)."""
        return time.monotonic() - self._own_heartbeat_at < 3 * self.heartbeat_interval + 1.0

    def health(self) -> dict[str, Any]:
        hub = self.hub
        workers: list[dict[str, Any]] = [
            {
                "shard": self.shard,
                "pid": os.getpid(),
                "clients": hub.count,
                "generation": self.generation,
            }
        ]
        now = time.monotonic()
        for shard, peer in sorted(self.peers.items()):
            workers.append(
                {
                    "shard": shard,
                    "pid": peer.pid,
                    "clients": peer.clients,
                    "generation": peer.generation,
                    "heartbeat_age": round(now - peer.last_heartbeat, 3),
                    "late": now - peer.last_heartbeat > self.peer_timeout,
                }
            )
        up = self.bus_up()
        return {
            "status": "ok" if up else "degraded",
            "clients": self.client_count(),
            "local_clients": hub.count,
            "shard": self.shard,
            "workers": workers,
            "bus": {**self.counters, "up": up},
            "stats": dict(hub.stats),
        }

    def metrics_samples(self) -> list[WorkerSample]:
        """This worker's figures, and each peer's from its last heartbeat."""
        hub = self.hub
        samples = [WorkerSample(self.shard, hub.count, dict(hub.stats), dict(self.counters))]
        for shard, peer in sorted(self.peers.items()):
            server_stats = peer.stats.get("server")
            bus_stats = peer.stats.get("bus")
            samples.append(
                WorkerSample(
                    shard,
                    peer.clients,
                    server_stats if isinstance(server_stats, dict) else {},
                    bus_stats if isinstance(bus_stats, dict) else {},
                )
            )
        return samples

    # ------------------------------------------------------------ receive

    def delivery_budget_end(self) -> int:
        """The hub's delivery count past which a receive batch yields the loop."""
        return self.hub.deliveries + DELIVERY_BUDGET

    def receive(self, topic: bytes, body: bytes) -> None:
        """Handle one envelope from the bus: counted, never raising."""
        self.counters["received"] += 1
        try:
            self._handle(topic, body)
        except BusError as exc:
            self.counters["malformed"] += 1
            now = time.monotonic()
            if now - self._last_malformed_warning > 5.0:  # logged once, then counted
                self._last_malformed_warning = now
                logger.warning("dropped a malformed bus envelope: %s", exc)
        except Exception:
            self.counters["malformed"] += 1
            logger.exception("error handling a bus envelope")

    def _track_seq(self, topic: bytes, origin: int, generation: str, seq: int) -> None:
        per_topic = self._last_seq.get(topic)
        if per_topic is None:
            per_topic = self._last_seq[topic] = {}
        key = (origin, generation)
        last = per_topic.get(key)
        if last is None and len(per_topic) >= MAX_SENDERS_PER_TOPIC:
            per_topic.clear()  # bounded whatever the bus says: gap counting starts afresh
        if last is not None and seq > last + 1 + MAX_GAP:
            # not a loss that size: a forged or corrupted number; start from it
            self.counters["malformed"] += 1
            self._refusals("bus sequence jump of %d from %d: taken as a reset", seq - last, origin)
        elif last is not None and seq > last + 1:
            self.counters["gaps"] += seq - last - 1
            self._gap_log(
                "bus gap: %d message(s) from %s %d lost on topic %r",
                seq - last - 1,
                "worker" if origin >= 0 else "publisher",
                origin,
                topic,
            )
        per_topic[key] = seq
        if origin < BROKER_ORIGIN:  # a publisher: forgotten a while after its last message
            seen = self._publishers_seen
            if key not in seen and len(seen) >= MAX_SENDERS_PER_TOPIC:
                self._forget_publishers(everyone=True)
            seen[key] = self._ticks

    def _handle(self, topic: bytes, body: bytes) -> None:
        """Handle one envelope; a field of the wrong type raises :class:`BusError`.

        Each kind is believed only on its own topic and from its kind of
        sender: liveness (``HEARTBEAT``, ``HELLO``) from workers on ``H``
        (which NATS permissions keep publishers off), ``DEAD`` from the
        broker (never on NATS), data and queries from anyone on the bus.
        """
        kind, origin, generation, seq, fields = bus.decode(body)
        if origin == self.shard and generation == self.generation:
            if kind is Kind.HEARTBEAT:  # our own heartbeat went round: the bus works
                self._own_heartbeat_at = time.monotonic()
            return
        if topic[:1] != _KIND_TOPICS[kind]:
            raise BusError(f"{kind.name} envelope on the wrong topic")
        if kind is Kind.DEAD or kind in _FROM_KEEPER:
            if origin != bus.BROKER_ORIGIN or not self.trusts_dead:
                raise BusError(f"{kind.name} envelope from someone other than this host's broker")
        elif kind is Kind.HEARTBEAT or kind is Kind.HELLO:
            if origin < 0:
                raise BusError(f"{kind.name} envelope from a non-worker")
            if origin == self.shard:  # this shard is this process, whatever it says
                raise BusError(f"{kind.name} envelope of this worker's shard, another process")
        self._track_seq(topic, origin, generation, seq)
        try:
            self._dispatch(kind, origin, generation, fields)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            # e.g. a str where an int belongs: counted as malformed and logged
            # once, without the values (they may carry client data)
            raise BusError(f"malformed {kind.name} envelope ({type(exc).__name__})") from None

    def _dispatch(self, kind: Kind, origin: int, generation: str, fields: list[Any]) -> None:
        hub = self.hub
        if kind is Kind.BROADCAST:
            frame, exclude_id = fields
            _check_frame(frame)
            exclude = hub.get(exclude_id) if exclude_id else None
            hub.write_all(hub.clients.values(), OutgoingMessage.from_frame(frame), exclude)
        elif kind is Kind.ROOM:
            names, frame, exclude_id, message_id = fields
            _check_frame(frame)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise BusError("ROOM envelope: names must be a list of str")
            if len(names) > 1:
                key = (origin, generation, int(message_id))
                if key in self._recent_room_set:
                    return
                self._recent_room_set.add(key)
                self._recent_room_messages.append(key)
                if len(self._recent_room_messages) > _DEDUP_WINDOW:
                    self._recent_room_set.discard(self._recent_room_messages.popleft())
            exclude = hub.get(exclude_id) if exclude_id else None
            hub.deliver_rooms(names, OutgoingMessage.from_frame(frame), exclude)
        elif kind is Kind.SEND:
            client_id, frame = fields
            _check_frame(frame)
            client = hub.get(client_id)
            if client is None or not hub.write_all(
                (client,), OutgoingMessage.from_frame(frame), None
            ):
                self.counters["undeliverable"] += 1
        elif kind is Kind.CLOSE:
            client_id, code, reason = fields
            client = hub.get(client_id)
            if client is None:
                self.counters["undeliverable"] += 1
            else:
                client.close(int(code), str(reason))
        elif kind is Kind.HEARTBEAT:
            self._on_heartbeat(origin, generation, fields)
        elif kind is Kind.HELLO:
            self._peer(origin, generation)
        elif kind is Kind.DEAD:
            self._on_dead(int(fields[0]), int(fields[1]), bool(fields[2]))
        elif kind is Kind.PRESENCE_REQ:
            self._answer_presence(fields)
        elif kind is Kind.PRESENCE:
            self._on_presence(origin, fields)
        elif kind is Kind.LOGGED:
            room, epoch, offset, data, exclude_id = fields
            if not isinstance(room, str) or not isinstance(epoch, str):
                raise BusError("LOGGED envelope: room and epoch must be str")
            if not isinstance(data, str | bytes):
                raise BusError("LOGGED envelope: data must be str or bytes")
            excluded = exclude_id if isinstance(exclude_id, str) else None
            hub.deliver_logged(Publication(room, epoch, int(offset), data), excluded)
        elif kind is Kind.REPLAY:
            self._on_replay(fields)
        elif kind is Kind.KEEPER:
            figures = _stats({"history": fields[0]}).get("history")
            self._keeper_figures = figures if figures else None

    def _peer(self, shard: int, generation: str) -> Peer | None:
        """The record of ``shard`` in ``generation``; ``None`` when it is not believed.

        A new generation replaces a shard's record only when the current one
        has been silent for two heartbeat intervals (its process is gone: a
        restart takes longer than that to be heard), so a forged heartbeat
        cannot make a live worker's clients unaddressable.
        """
        peer = self.peers.get(shard)
        now = time.monotonic()
        if peer is None and (shard, generation) in self._dead:
            return None  # a late heartbeat of a process its supervisor saw end
        if peer is not None and peer.generation != generation:
            if now - peer.last_heartbeat < 2 * self.heartbeat_interval:
                self.counters["malformed"] += 1
                self._refusals(
                    "worker %d heard as another process while it beats: not believed", shard
                )
                return None
            # a new process for that shard: its predecessor's count is gone,
            # and so is the sequence state kept for it
            self._forget_sequences(shard, peer.generation)
            peer = None
        if peer is None:
            if len(self.peers) >= MAX_PEERS:
                self.counters["malformed"] += 1
                return None
            peer = self.peers[shard] = Peer(generation, last_heartbeat=now)
        return peer

    def _on_dead(self, shard: int, pid: int, planned: bool) -> None:
        """The supervisor saw the process of ``shard`` exit (or stopped it: ``planned``)."""
        peer = self.peers.get(shard)
        if peer is not None and peer.pid in (pid, 0):
            del self.peers[shard]
            self._forget_sequences(shard, peer.generation)
            # its last heartbeat may come after this (another sender through the
            # broker): that process is not taken back as a peer
            self._dead.append((shard, peer.generation))
            if planned:  # a reload or one worker fewer: it drained its clients first
                logger.debug("worker %d (pid %d) stopped as planned", shard, pid)
            else:
                logger.info(
                    "worker %d (pid %d) died: its %d client(s) are gone", shard, pid, peer.clients
                )

    def _forget_sequences(self, shard: int, generation: str) -> None:
        key = (shard, generation)
        for per_topic in self._last_seq.values():
            per_topic.pop(key, None)

    def _on_heartbeat(self, origin: int, generation: str, fields: list[Any]) -> None:
        pid, clients, stats = fields
        pid, clients = int(pid), int(clients)  # a malformed one must not touch the peer
        if not 0 < pid < 1 << 31 or not 0 <= clients <= MAX_CLIENTS_PER_WORKER:
            raise BusError("HEARTBEAT envelope: pid or client count out of range")
        peer = self._peer(origin, generation)
        if peer is None:
            return
        peer.pid = pid
        peer.clients = clients
        peer.stats = _stats(stats)
        peer.last_heartbeat = time.monotonic()
        if peer.late:
            peer.late = False
            logger.info("worker %d is heard again", origin)

    def _check_peers(self) -> None:
        """Mark the peers whose heartbeat is late; forget them only with ``forget_after``."""
        now = time.monotonic()
        stalled = now - self._checked_at > 2 * self.heartbeat_interval + 1.0
        self._checked_at = now
        if stalled:
            return  # we were the one not running (stopped, swapped out): read the bus first
        for shard, peer in list(self.peers.items()):
            silent = now - peer.last_heartbeat
            if self.forget_after is not None and silent > self.forget_after:
                # out of the counts, but its sequence numbers are kept: if the
                # same process is heard again (a partition healed), what was
                # lost meanwhile is counted as gaps, not taken for a fresh start
                logger.warning("worker %d silent for %.1fs: forgetting it", shard, silent)
                del self.peers[shard]
            elif silent > self.peer_timeout and not peer.late:
                peer.late = True
                self.counters["late_peers"] += 1
                logger.warning(
                    "worker %d late: no heartbeat for %.1fs (still counted; the supervisor "
                    "decides whether it is dead)",
                    shard,
                    silent,
                )

    def _forget_publishers(self, *, everyone: bool = False) -> None:
        """Drop the sequence state of publishers silent for :data:`PUBLISHER_MEMORY` ticks."""
        horizon = self._ticks + 1 if everyone else self._ticks - PUBLISHER_MEMORY
        gone = [key for key, tick in self._publishers_seen.items() if tick < horizon]
        for key in gone:
            del self._publishers_seen[key]
            for per_topic in self._last_seq.values():
                per_topic.pop(key, None)

    async def _heartbeat_forever(self) -> None:
        self._publish(bus.TOPIC_HEARTBEAT, Kind.HELLO)
        while True:
            self._ticks += 1
            self._ticked_at = time.monotonic()
            try:
                self._beat()
                self._check_peers()
                if self._publishers_seen:
                    self._forget_publishers()
            except Exception:  # never the end of the heartbeat: logged, and on to the next
                self._task_errors("error in the bus heartbeat (it goes on)", exc_info=True)
            await asyncio.sleep(self.heartbeat_interval)

    def heartbeat_alive(self) -> bool:
        """Whether this worker's bus heartbeat runs (the worker tells its supervisor so)."""
        task = self._heartbeat_task
        if task is None or task.done():
            return False
        return time.monotonic() - self._ticked_at < 3 * self.heartbeat_interval + 1.0


def _stats(value: Any) -> dict[str, Any]:
    """A peer's figures from its heartbeat, bounded: at most 8 groups of 64 numbers."""
    if not isinstance(value, dict) or len(value) > 8:
        return {}
    kept: dict[str, Any] = {}
    for group, numbers in value.items():
        if isinstance(group, str) and isinstance(numbers, dict) and len(numbers) <= 64:
            kept[group] = {
                name: number
                for name, number in numbers.items()
                if isinstance(name, str)
                and isinstance(number, int | float)
                and not isinstance(number, bool)
                and 0 <= number < 1 << 62
            }
    return kept


def _check_frame(value: Any) -> None:
    """A frame from the bus is one whole, unmasked text or binary frame, or it is refused.

    What the workers publish always is; anything else (a corrupted or foreign
    envelope) is counted as malformed instead of being written to clients.
    """
    if not isinstance(value, bytes) or len(value) < 2:
        raise BusError("frame field must be a whole frame (bytes)")
    first, second = value[0], value[1]
    if second & 0x80 or first & 0x0F not in (1, 2) or not first & 0x80:
        raise BusError("a bus frame is one unmasked, final text or binary frame")
    length = second & 0x7F
    header = 2
    if length == 126:
        header = 4
        length = int.from_bytes(value[2:4], "big")
    elif length == 127:
        header = 10
        length = int.from_bytes(value[2:10], "big")
    if len(value) < header or len(value) != header + length:
        raise BusError("the frame's length does not match its header")
