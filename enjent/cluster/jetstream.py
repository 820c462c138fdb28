"""Rooms that remember on NATS: JetStream keeps the history, numbers it, and replays it.

Cluster layer (layer 3 of docs/architecture.md). With ``--bus nats://...`` a
server whose rooms keep history (``server.keep_history``) uses NATS's own
persistence, not a log of Enjent's:

- one stream, ``<PREFIX>_HISTORY`` (``ENJENT_HISTORY``), on the subjects
  ``<prefix>.h.<hex>`` (one per room, the hex of the room's digest). A
  publication to a room with history is a JetStream publish there (from a
  worker, a ``Publisher``, the HTTP API): the stream's sequence number is its
  **offset** (strictly increasing within the room, not by one: the sequence
  counts every room's publications), and the stream's creation time gives the
  **epoch** (a stream lost and made again has another one). The stream's
  limits come from the rules: ``max_msgs_per_subject`` the largest ``size``,
  ``max_age`` the largest ``ttl``, ``max_bytes`` / ``max_msgs`` the global
  bound; ``ENJENT_HISTORY_REPLICAS`` (1 by default; 3 on a 3-node cluster)
  its replicas, file storage. The rules themselves are in the stream's
  metadata, where publishers read them.
- live delivery: the stream *republishes* each stored message on core NATS,
  ``<prefix>.hl.<hex>``, with headers giving its sequence and the sequence of
  the previous message of the same room (``Nats-Sequence``,
  ``Nats-Last-Sequence``). A worker subscribes there only while it has members
  (or joins) in the room, so NATS's interest routing still spares the other
  hosts, and the previous-sequence header makes every room a chain: a
  missing link (a message republished before the subscription reached the
  stream's node, a slow consumer) is fetched from the stream before the next
  one is delivered. Nothing is lost silently, nothing is delivered twice.
- recovery: one task per worker serves the rooms that have joins waiting
  (all the joins of a room in one pass; live messages of that room wait
  meanwhile): it subscribes, reads the room's last sequence, fetches what the
  joins missed (an ordered consumer filtered on the room's subject), writes
  the missed ones, makes the clients members, then lets the waiting live ones
  through. A join is ``recovered`` only when nothing after its position can
  have been evicted: its position is still stored, or nothing of the stream
  after it was evicted and the room is under its per-subject cap; and the
  missed ones are within the room's ``size``, ``ttl`` and 1000.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgpack

from ..exceptions import BusError
from ..server.history import MAX_REPLAY, HistoryRules, Joined, Publication
from ..server.logs import RepeatedLog

if TYPE_CHECKING:
    from .natsbus import NatsEngine

__all__ = ["JetStreamHistory", "history_subject", "read_rules", "stream_name"]

logger = logging.getLogger("enjent.cluster")

#: The stream's metadata key holding the rules (for publishers).
RULES_KEY = "enjent.rules"
#: Live messages of one room kept waiting while the room is served (then a gap, repaired).
MAX_WAITING = 100_000
#: Seconds to wait for one message of a fetch, and for a JetStream request.
FETCH_TIMEOUT = 5.0
#: Publications waiting for JetStream's ack, at most (under nats-py's 4000).
MAX_UNACKED = 3000
#: Seconds a worker tries to make the stream while a JetStream cluster forms.
STREAM_WAIT = 60.0


def stream_name(prefix: str) -> str:
    """``enjent`` -> ``ENJENT_HISTORY`` (a stream name has no dots)."""
    return "".join(c if c.isalnum() else "_" for c in prefix).upper() + "_HISTORY"


def _digest(name: str) -> str:
    return hashlib.blake2b(name.encode("utf-8"), digest_size=16).hexdigest()


def history_subject(prefix: str, name: str) -> str:
    """Where a room's publications are stored."""
    return f"{prefix}.h.{_digest(name)}"


def _live_subject(prefix: str, name: str) -> str:
    return f"{prefix}.hl.{_digest(name)}"


def rules_metadata(rules: HistoryRules) -> str:
    return json.dumps(
        {
            "names": {name: settings.size for name, settings in rules.names.items()},
            "prefixes": [prefix for prefix, _ in rules.prefixes],
        },
        separators=(",", ":"),
    )


def read_rules(metadata: dict[str, str] | None) -> tuple[set[str], list[str]]:
    """The rooms (names, prefixes) with history, from the stream's metadata."""
    try:
        value = json.loads((metadata or {}).get(RULES_KEY, "{}"))
        names = {str(name) for name in value.get("names", {})}
        prefixes = [str(prefix) for prefix in value.get("prefixes", [])]
    except (ValueError, AttributeError, TypeError):
        return set(), []
    return names, prefixes


def stream_config(prefix: str, rules: HistoryRules, replicas: int, storage: str = "file") -> Any:
    from nats.js import api

    largest = rules.largest()
    return api.StreamConfig(
        name=stream_name(prefix),
        description="Enjent: the history of the rooms that keep one",
        subjects=[f"{prefix}.h.>"],
        max_msgs_per_subject=largest.size,
        max_age=largest.ttl,
        max_bytes=rules.max_bytes,
        max_msgs=rules.max_messages,
        storage=api.StorageType.MEMORY if storage == "memory" else api.StorageType.FILE,
        num_replicas=replicas,
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
        republish=api.RePublish(src=f"{prefix}.h.>", dest=f"{prefix}.hl.>"),
        metadata={RULES_KEY: rules_metadata(rules)},
    )


def epoch_of(info: Any) -> str:
    """The epoch of a stream: from its creation time (a stream made again has another)."""
    created = getattr(info, "created", None)
    return "js" + hashlib.blake2b(str(created).encode(), digest_size=5).hexdigest()


class _Join:
    __slots__ = ("client", "since")

    def __init__(self, client: Any, since: tuple[str, int] | None) -> None:
        self.client = client
        self.since = since


class _Room:
    """A room with history as this worker sees it: its live subscription and its chain."""

    __slots__ = ("busy", "cursor", "joins", "name", "subject", "subscription", "waiting")

    def __init__(self, name: str, subject: str) -> None:
        self.name = name
        self.subject = subject
        self.subscription: Any = None
        #: the last sequence delivered to this worker's members (None: not served yet)
        self.cursor: int | None = None
        self.joins: list[_Join] = []
        #: live messages held while the room is served: (seq, prev, data, exclude_id)
        self.waiting: collections.deque[tuple[int, int, Any, Any]] = collections.deque()
        self.busy = False


class JetStreamHistory:
    """The history of one worker's rooms on JetStream (see the module docstring)."""

    def __init__(self, engine: NatsEngine) -> None:
        self.engine = engine
        self.hub = engine.hub
        self.rules = engine.hub.history
        self.prefix = engine.config.subject_prefix
        self.stream = stream_name(self.prefix)
        self.epoch = ""
        self._js: Any = None
        self._rooms: dict[str, _Room] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.counters = engine.counters
        self._unacked = 0
        self._inflight: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._failures = RepeatedLog(logger, logging.WARNING)
        #: the stream's figures as of the last room served (``enjent_history_*``)
        self.figures: dict[str, int] | None = None
        for name in ("history_published", "history_failures", "history_repairs"):
            self.counters.setdefault(name, 0)

    # ----------------------------------------------------------- lifecycle

    async def start(self, nc: Any) -> None:
        """Make (or update) the stream, once connected.

        Raises :class:`BusError` at once where the NATS server has no JetStream
        (nobody answers its API: ``nats-server -js``); while a JetStream cluster
        is forming (no leader yet) it asks again every second, for at most
        :data:`STREAM_WAIT` seconds.
        """
        from nats.errors import NoRespondersError
        from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

        js = nc.jetstream(timeout=FETCH_TIMEOUT)
        replicas = int(os.environ.get("ENJENT_HISTORY_REPLICAS", "1") or 1)
        storage = os.environ.get("ENJENT_HISTORY_STORAGE", "file")
        if storage not in ("file", "memory"):
            raise BusError(f"ENJENT_HISTORY_STORAGE must be file or memory, not {storage!r}")
        config = stream_config(self.prefix, self.rules, replicas, storage)
        deadline = time.monotonic() + STREAM_WAIT
        while True:
            try:
                try:
                    info = await js.add_stream(config)
                except APIError as exc:
                    if getattr(exc, "err_code", None) != 10058:  # exists, another config
                        raise
                    info = await js.update_stream(config)
                break
            except (NoRespondersError, NoStreamResponseError, ServiceUnavailableError) as exc:
                if getattr(exc, "description", None) and time.monotonic() < deadline:
                    await asyncio.sleep(1.0)  # "temporarily unavailable": a cluster forming
                    continue
                raise BusError(
                    "rooms that keep history need JetStream on the NATS servers "
                    "(nats-server -js, or a jetstream block in its configuration)"
                ) from None
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise BusError(f"JetStream did not make the history stream: {exc}") from None
                logger.debug("JetStream not ready for the history stream yet: %s", exc)
                await asyncio.sleep(1.0)
        self._js = js
        self.epoch = epoch_of(info)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -------------------------------------------------------------- publish

    def publish(self, names: list[str], data: str | bytes, exclude_id: str | None) -> None:
        """Queue one JetStream publish per room (the engine's publisher task sends them)."""
        for name in names:
            payload = msgpack.packb([name, data, exclude_id], use_bin_type=True)
            self.engine.queue_history(history_subject(self.prefix, name), payload)

    async def send(self, subject: str, payload: bytes) -> None:
        """One publish, in order with the worker's others; its ack is checked when it comes.

        At most :data:`MAX_UNACKED` publications wait for their ack: past that
        (JetStream not answering) a publication is dropped and counted, never
        queued without bound, and the worker's other messages go on.
        """
        if self._js is None:
            raise BusError("JetStream is not ready")
        if self._unacked >= MAX_UNACKED:
            self.counters["history_failures"] += 1
            self._failures(
                "JetStream acknowledges nothing: publications to rooms with history dropped"
            )
            return
        self._unacked += 1
        # no wait_stall: never more in flight than the semaphore allows (checked above)
        future = await self._js.publish_async(subject, payload)
        future.add_done_callback(self._acked)
        self._inflight.append((time.monotonic() + FETCH_TIMEOUT, future))
        self._expire_acks()

    def _expire_acks(self) -> None:
        """An ack that does not come within :data:`FETCH_TIMEOUT` is a failure (counted)."""
        inflight = self._inflight
        now = time.monotonic()
        while inflight and (inflight[0][1].done() or inflight[0][0] < now):
            _, future = inflight.popleft()
            if not future.done():
                future.cancel()  # _acked counts it

    def _acked(self, future: asyncio.Future[Any]) -> None:
        self._unacked -= 1
        if future.cancelled() or future.exception() is not None:
            self.counters["history_failures"] += 1
            self._failures(
                "a publication to a room with history was not stored: %s",
                None if future.cancelled() else future.exception(),
            )
        else:
            self.counters["history_published"] += 1

    # ---------------------------------------------------------------- joins

    def recover(self, client: Any, name: str, since: tuple[str, int] | None) -> None:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room(name, history_subject(self.prefix, name))
        room.joins.append(_Join(client, since))
        self._schedule(room)

    def room_deleted(self, name: str) -> None:
        """No member and no join here any more: stop listening to its live messages."""
        room = self._rooms.get(name)
        if room is None or room.busy or room.joins:
            return
        del self._rooms[name]
        if room.subscription is not None:
            self.engine.spawn_unsubscribe(room.subscription)

    def _schedule(self, room: _Room) -> None:
        if not room.busy:
            room.busy = True
            self._queue.append(room.name)
            self._wakeup.set()

    async def _serve_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 1.0)
            self._wakeup.clear()
            self._expire_acks()
            while self._queue:
                room = self._rooms.get(self._queue.popleft())
                if room is None:
                    continue
                try:
                    await self._serve(room)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.counters["history_failures"] += 1
                    logger.warning("room history: serving %r failed: %s", room.name, exc)
                    joins, room.joins = room.joins, []
                    for join in joins:  # answered without a position: live from now on
                        self.hub.joined(join.client, Joined.unanswered(room.name, join.since), [])
                    room.cursor = None
                    self._release(room)

    # ------------------------------------------------------------- serving

    async def _serve(self, room: _Room) -> None:
        """Subscribe, read the room's end, fetch what joins and members miss, hand over."""
        from nats.js.errors import NotFoundError

        js = self._js
        if js is None:
            raise BusError("JetStream is not ready")
        if room.subscription is None:
            live = _live_subject(self.prefix, room.name)

            async def on_live(msg: Any, room: _Room = room) -> None:
                self._on_live(room, msg)

            room.subscription = await self.engine.nc.subscribe(live, cb=on_live)
            await self.engine.nc.flush(timeout=FETCH_TIMEOUT)
        info = await js.stream_info(self.stream, subjects_filter=room.subject)
        self.epoch = epoch_of(info)
        state = info.state
        self.figures = {"messages": state.messages, "bytes": state.bytes, "rooms": len(self._rooms)}
        stored = (state.subjects or {}).get(room.subject, 0)
        try:
            last = (await js.get_last_msg(self.stream, room.subject)).seq or 0
        except NotFoundError:
            last = 0
        joins, room.joins = room.joins, []
        settings = self.rules.settings_of(room.name)
        # what the members here miss (a gap), then each group of joins at one position
        starts = {
            join.since[1]
            for join in joins
            if join.since is not None and self._behind(join.since, last)
        }
        if room.cursor is not None and room.cursor < last:
            starts.add(room.cursor)
        fetched: dict[int, list[tuple[int, Any, Any, float]]] = {}
        complete: dict[int, bool] = {}
        for start in sorted(starts):
            fetched[start] = missed = await self._fetch(room.subject, start, last)
            complete[start] = self._complete(start, last, missed, settings) and (
                (state.first_seq <= start + 1 and stored < self.rules.largest().size)
                or await self._still_stored(start, room.subject)
            )
        # from here on nothing awaits: the hand-over is one step
        if room.cursor is not None and room.cursor < last:
            self.counters["history_repairs"] += 1
            for seq, data, exclude_id, _ in fetched[room.cursor]:
                self._deliver(room, seq, data, exclude_id)
        room.cursor = last
        for join in joins:
            since = join.since
            recovered: bool | None = None
            publications: list[Publication] = []
            if since is not None:
                recovered = since[0] == self.epoch and since[1] == last  # nothing missed
                if self._behind(since, last) and complete[since[1]]:
                    recovered = True
                    publications = [
                        Publication(room.name, self.epoch, seq, data)
                        for seq, data, _, _ in fetched[since[1]]
                    ]
            joined = Joined(room.name, self.epoch, last, recovered, len(publications))
            self.hub.joined(join.client, joined, publications)
        self._release(room)

    def _behind(self, since: tuple[str, int] | None, last: int) -> bool:
        return since is not None and since[0] == self.epoch and 0 <= since[1] < last

    def _complete(
        self, start: int, last: int, missed: list[tuple[int, Any, Any, float]], settings: Any
    ) -> bool:
        """Whether ``missed`` reaches the room's end within the bounds (size, TTL, 1000)."""
        if not missed or missed[-1][0] != last or len(missed) > MAX_REPLAY:
            return False
        return settings is None or (
            len(missed) <= settings.size and missed[0][3] >= time.time() - settings.ttl
        )

    async def _still_stored(self, seq: int, subject: str) -> bool:
        """Whether message ``seq`` is still stored (so nothing of its room after it is gone)."""
        if seq <= 0:
            return False
        try:
            message = await self._js.get_msg(self.stream, seq=seq)
        except Exception:
            return False
        return bool(message.subject == subject)

    async def _fetch(
        self, subject: str, start: int, last: int
    ) -> list[tuple[int, Any, Any, float]]:
        """The room's messages after ``start`` up to ``last`` (at most MAX_REPLAY + 1)."""
        from nats.js import api

        out: list[tuple[int, Any, Any, float]] = []
        subscription = await self._js.subscribe(
            subject,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start + 1),
        )
        try:
            while len(out) <= MAX_REPLAY:
                msg = await subscription.next_msg(timeout=FETCH_TIMEOUT)
                seq = msg.metadata.sequence.stream
                if seq > last:
                    break
                _, data, exclude_id = _payload(msg.data)
                out.append((seq, data, exclude_id, msg.metadata.timestamp.timestamp()))
                if seq >= last or not msg.metadata.num_pending:
                    break
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        return out

    # ---------------------------------------------------------------- live

    def _on_live(self, room: _Room, msg: Any) -> None:
        headers = msg.headers or {}
        try:
            seq = int(headers["Nats-Sequence"])
            prev = int(headers["Nats-Last-Sequence"])
            _, data, exclude_id = _payload(msg.data)
        except (KeyError, ValueError, TypeError, BusError):
            self.counters["malformed"] += 1
            return
        if room.busy:
            if len(room.waiting) < MAX_WAITING:
                room.waiting.append((seq, prev, data, exclude_id))
            return
        self._step(room, seq, prev, data, exclude_id)

    def _step(self, room: _Room, seq: int, prev: int, data: Any, exclude_id: Any) -> bool:
        """One live message through the chain; ``False`` when a gap needs a fetch first."""
        cursor = room.cursor
        if cursor is None:  # after a failed serve: the chain starts again here
            self.counters["gaps"] += 1
            cursor = prev
        if seq <= cursor:
            return True  # delivered already (a replay or a repair had it)
        if prev > cursor:  # a missing link: fetched from the stream, then this one
            room.waiting.appendleft((seq, prev, data, exclude_id))
            self._schedule(room)
            return False
        self._deliver(room, seq, data, exclude_id)
        room.cursor = seq
        return True

    def _release(self, room: _Room) -> None:
        """The room was served: the live messages that waited go through, in order."""
        room.busy = False
        waiting = room.waiting
        while waiting:
            seq, prev, data, exclude_id = waiting.popleft()
            if not self._step(room, seq, prev, data, exclude_id):
                return  # served again first (a gap)
        if room.joins:
            self._schedule(room)
        elif not self.hub.members(room.name) and room.name in self._rooms:
            self.room_deleted(room.name)  # everyone left meanwhile

    def _deliver(self, room: _Room, seq: int, data: Any, exclude_id: Any) -> None:
        exclude = exclude_id if isinstance(exclude_id, str) else None
        self.hub.deliver_logged(Publication(room.name, self.epoch, seq, data), exclude)


def _payload(data: bytes) -> tuple[str, str | bytes, str | None]:
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception:
        raise BusError("a history message is not msgpack") from None
    if not isinstance(value, list) or len(value) != 3:
        raise BusError("a history message is not [room, data, exclude]")
    name, payload, exclude_id = value
    if not isinstance(name, str) or not isinstance(payload, str | bytes):
        raise BusError("a history message has a bad room or data")
    return name, payload, exclude_id if isinstance(exclude_id, str) else None
