"""Publishers: processes that are not workers reach the clients through the bus.

Cluster layer (layer 3 of docs/architecture.md). A web view, a task queue,
a cron job reaches Enjent's clients with the bus URL the servers use:

- ``ipc:///DIR``: the embedded ZeroMQ broker of a supervisor started with
  ``--bus ipc:///DIR`` on the same host (the private default bus cannot be
  reached from outside);
- ``nats://...``: any node of the NATS cluster the hosts use.

A publisher is a bus member with an origin of its own (a negative number:
never a worker's shard) and sequence numbers per topic, so the workers count
its gaps exactly as they count a worker's; it sends no heartbeat, so it is
never counted, never late, never dead, and a worker forgets its sequence
state a minute after its last message. Its messages arrive in the order it
sent them. When the bus pushes back (ZeroMQ's high-water mark, NATS's
outbound buffer), a call waits for room, at most ``timeout`` seconds, then
raises :class:`~enjent.BusError`: nothing is dropped silently.

:class:`AsyncPublisher` is for asyncio code (every call awaits);
:class:`Publisher` is for synchronous code (a Django view, a Celery task):
it runs an :class:`AsyncPublisher` on an event loop of its own, in a daemon
thread, and each call blocks until the message is handed to the bus (a few
tens of microseconds; at most ``timeout``). It is thread-safe, and after a
``fork`` (a prefork server's worker) it starts afresh in the child.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import msgpack

from ..exceptions import BusError, EnjentError, RoomLimitError
from ..frames import CloseCode
from ..protocol import OutgoingMessage
from ..server.ids import ClientIds
from ..server.presence import Presence, check_query
from . import bus
from .bus import Kind
from .jetstream import history_subject, read_rules, stream_name
from .natsbus import IpcBus, NatsConfig, parse_bus, subject_of

__all__ = ["AsyncPublisher", "MessageTooBigError", "Publisher", "PublisherRoom"]

T = TypeVar("T")

#: The default size limit of one message (what ``max_message_size`` admits from a client).
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
#: The largest message the bus carries (its envelope limit, less headroom).
BUS_MESSAGE_LIMIT = bus.MAX_BODY - 64 * 1024
#: Seconds a worker's heartbeat stays good for a presence query (3 intervals).
_WORKER_FRESH = 3.0
#: The topics every worker subscribes to: the bus is up when the broker forwards both.
_EVERY_WORKER = frozenset((bus.TOPIC_ALL, bus.TOPIC_CONTROL))
#: Seconds after the bus comes up for the rest of the subscriptions (rooms) to arrive.
_SETTLE = 0.05


class MessageTooBigError(EnjentError, ValueError):
    """A message over the publisher's ``max_message_size``: nothing was sent."""


class _Transport:
    """What carries a publisher's envelopes: ZeroMQ (same host) or NATS."""

    on_receive: Callable[[bytes, bytes], None]

    async def start(self, topics: tuple[bytes, ...], timeout: float) -> None:
        raise NotImplementedError

    async def send(self, topic: bytes, body: bytes, timeout: float) -> None:
        raise NotImplementedError

    async def close(self, timeout: float) -> None:
        raise NotImplementedError


class _ZmqTransport(_Transport):
    """An XPUB socket (it never drops: it waits) to the broker's ``bus-in``, a SUB to ``bus-out``.

    The broker forwards the workers' subscriptions to every publisher
    connected to it: the first one to arrive says that the bus is reached
    and a worker listens. ``XPUB_NODROP`` makes a full pipe wait instead of
    dropping, so a publisher that outpaces the bus is slowed down.
    """

    def __init__(self, config: IpcBus) -> None:
        self.config = config
        self._context: Any = None
        self._pub: Any = None
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed: set[bytes] = set()
        self._up = asyncio.Event()
        self._up_at = 0.0

    async def start(self, topics: tuple[bytes, ...], timeout: float) -> None:
        import zmq
        import zmq.asyncio

        context = self._context = zmq.asyncio.Context()
        pub = self._pub = context.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_NODROP, 1)
        pub.setsockopt(zmq.SNDHWM, 10_000)
        pub.setsockopt(zmq.RECONNECT_IVL, 100)
        pub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        pub.connect(self.config.publish_endpoint)
        sub = self._sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.MAXMSGSIZE, bus.MAX_BODY + 4096)
        sub.connect(self.config.subscribe_endpoint)
        for topic in topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_subscriptions()),
            loop.create_task(self._read()),
        ]
        try:
            await self._wait_until_up(timeout)
        except BusError:
            await self.close(0)
            raise

    async def _follow_subscriptions(self) -> None:
        """Keep the set of topics the broker subscribed to us (``\x01topic`` / ``\x00topic``)."""
        subscribed = self._subscribed
        while True:
            message = await self._pub.recv()
            if message[:1] == b"\x01":
                subscribed.add(message[1:])
            elif message[:1] == b"\x00":
                subscribed.discard(message[1:])
            if subscribed >= _EVERY_WORKER:
                if not self._up.is_set():
                    self._up_at = time.monotonic()
                    self._up.set()
            else:
                self._up.clear()  # the broker is gone (restarting): wait, never drop

    async def _wait_until_up(self, timeout: float) -> None:
        """Wait until the broker forwards every worker's topics (a restarted one included).

        A message for a topic nobody subscribed is dropped by ZeroMQ; while
        the bus is down *every* topic is unsubscribed, so a publisher waits
        for ``A`` and ``C`` (every worker's) instead of losing what it sends,
        and lets the rest of a reconnection's subscriptions (rooms) arrive.
        """
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), timeout)
            except TimeoutError:
                raise BusError(
                    f"no Enjent bus answers at {self.config.directory} within {timeout:g}s "
                    f"(is `enjent run ... --bus ipc://{self.config.directory}` running?)"
                ) from None
        settle = self._up_at + _SETTLE - time.monotonic()
        if settle > 0:
            await asyncio.sleep(settle)

    async def _read(self) -> None:
        import zmq

        while True:
            try:
                parts = await self._sub.recv_multipart()
            except zmq.ZMQError:
                return
            if len(parts) == 2:
                self.on_receive(parts[0], parts[1])

    async def send(self, topic: bytes, body: bytes, timeout: float) -> None:
        if not self._up.is_set() or time.monotonic() - self._up_at < _SETTLE:
            await self._wait_until_up(timeout)
        try:
            await asyncio.wait_for(self._pub.send_multipart((topic, body)), timeout)
        except TimeoutError:
            raise BusError(f"the bus took nothing for {timeout:g}s (a full queue)") from None

    async def close(self, timeout: float) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for sock, linger in ((self._sub, 0), (self._pub, int(timeout * 1000))):
            if sock is not None:
                sock.close(linger=linger)  # the publisher's: what is queued goes out first
        self._pub = self._sub = None
        if self._context is not None:
            context, self._context = self._context, None
            await asyncio.get_running_loop().run_in_executor(None, context.term)


class _NatsTransport(_Transport):
    """A NATS connection; nats-py's outbound buffer, flushed when full."""

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self._nc: Any = None
        self._rules: tuple[set[str], list[str]] = (set(), [])
        self._rules_at = -100.0

    async def start(self, topics: tuple[bytes, ...], timeout: float) -> None:
        from nats.aio.client import Client

        nc = Client()
        options = {
            "name": f"enjent-publisher-{os.getpid()}",
            "connect_timeout": max(1, min(2, int(timeout))),
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            **self.config.connect_options(),
        }
        servers = ", ".join(self.config.servers)
        try:
            await asyncio.wait_for(nc.connect(**options), timeout)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await nc.close()
            raise BusError(f"cannot reach NATS at {servers} within {timeout:g}s") from None
        except Exception as exc:
            raise BusError(f"cannot connect to NATS at {servers}: {exc}") from None
        self._nc = nc
        prefix = self.config.subject_prefix

        async def deliver(msg: Any) -> None:
            self.on_receive(self._topics.get(msg.subject, b""), msg.data)

        self._subjects: dict[bytes, str] = {}
        self._topics: dict[str, bytes] = {}
        for topic in topics:
            subject = subject_of(prefix, topic)
            self._topics[subject] = topic
            await nc.subscribe(subject, cb=deliver)

    def subject(self, topic: bytes) -> str:
        subject = self._subjects.get(topic)
        if subject is None:
            if len(self._subjects) > 10_000:
                self._subjects.clear()
            subject = self._subjects[topic] = subject_of(self.config.subject_prefix, topic)
        return subject

    async def send(self, topic: bytes, body: bytes, timeout: float) -> None:
        from nats.errors import OutboundBufferLimitError

        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._nc.publish(self.subject(topic), body)
                return
            except OutboundBufferLimitError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusError(f"NATS took nothing for {timeout:g}s (buffer full)") from None
                with contextlib.suppress(Exception):
                    await self._nc.flush(timeout=max(0.1, left))

    async def history_rooms(self, names: tuple[str, ...], timeout: float) -> list[str]:
        """Which of ``names`` keep history, per the rules in the JetStream stream's
        metadata (read again when 10 s old; none when there is no such stream)."""
        now = time.monotonic()
        if now - self._rules_at > 10.0:
            from nats.js.errors import Error as JetStreamError

            try:
                info = await self._nc.jetstream(timeout=timeout).stream_info(
                    stream_name(self.config.subject_prefix)
                )
                self._rules = read_rules(info.config.metadata)
            except (JetStreamError, TimeoutError):
                self._rules = (set(), [])
            self._rules_at = now
        exact, prefixes = self._rules
        return [n for n in names if n in exact or any(n.startswith(p) for p in prefixes)]

    async def store(
        self, name: str, data: str | bytes, exclude: str | None, timeout: float
    ) -> None:
        """A publication to a room with history: stored by JetStream (acknowledged)."""
        payload = msgpack.packb([name, data, exclude], use_bin_type=True)
        subject = history_subject(self.config.subject_prefix, name)
        try:
            await self._nc.jetstream(timeout=timeout).publish(subject, payload)
        except Exception as exc:
            raise BusError(f"JetStream did not store the publication to {name!r}: {exc}") from None

    async def close(self, timeout: float) -> None:
        nc, self._nc = self._nc, None
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.drain(), timeout)  # sends what is buffered, then closes
        except Exception:
            with contextlib.suppress(Exception):
                await nc.close()


class PublisherRoom:
    """One room, or several at once (a client in two of them gets one copy)."""

    __slots__ = ("_names", "_publisher")

    def __init__(self, publisher: AsyncPublisher, names: tuple[str, ...]) -> None:
        self._publisher = publisher
        self._names = names

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    async def broadcast(self, data: str | bytes, *, exclude: str | None = None) -> None:
        """Send ``data`` to every member of the room(s), on every worker."""
        await self._publisher.publish_rooms(self._names, data, exclude=exclude)

    async def fetch_clients(self, *, limit: int = 1000, timeout: float = 1.0) -> Presence:
        """The members of the (first) room, as :meth:`AsyncPublisher.fetch_clients`."""
        return await self._publisher.fetch_clients(
            room=self._names[0], limit=limit, timeout=timeout
        )


class AsyncPublisher:
    """A publisher for asyncio code: ``async with AsyncPublisher(url) as pub: await ...``.

    ``bus`` is what the servers use (``ipc:///DIR`` or ``nats://...``;
    NATS credentials from the URL or ``ENJENT_NATS_*`` as for ``enjent
    run``). ``timeout`` bounds every wait: reaching the bus (the first call
    connects), room for a message when the bus pushes back, and the flush of
    :meth:`close`. Messages over ``max_message_size`` bytes and room names
    over ``max_room_name`` bytes raise before anything is sent.
    """

    def __init__(
        self,
        bus: str | IpcBus | NatsConfig,
        *,
        timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_room_name: int = 256,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        config = bus if isinstance(bus, IpcBus | NatsConfig) else parse_bus(bus, environ)
        if config is None:
            raise ValueError(
                "a publisher needs the servers' bus address: ipc:///DIR (enjent run --bus "
                "ipc:///DIR) or nats://...; the private default bus cannot be reached"
            )
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if not 0 < max_message_size <= BUS_MESSAGE_LIMIT:
            raise ValueError(f"max_message_size must be from 1 to {BUS_MESSAGE_LIMIT} bytes")
        self.bus = bus
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.max_room_name = max_room_name
        self._transport: _Transport = (
            _ZmqTransport(config) if isinstance(config, IpcBus) else _NatsTransport(config)
        )
        self._transport.on_receive = self._on_receive
        #: this publisher's origin on the bus: negative, never a worker's shard
        self.origin = -2 - secrets.randbelow(1 << 30)
        self.generation = "p" + secrets.token_hex(4)
        self._seq: dict[bytes, int] = {}
        self._message_id = 0
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._started_at = 0.0
        #: shard -> (generation, when its last heartbeat came)
        self._workers: dict[int, tuple[str, float]] = {}
        self._queries: dict[int, tuple[Presence, int, set[int], asyncio.Future[None]]] = {}
        self._query_id = 0

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Reach the bus (at most ``timeout``); the first publish does it by itself."""
        if self._started:
            return
        if self._closed:
            raise BusError("this publisher is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            topics = (bus.TOPIC_HEARTBEAT, bus.shard_topic(self.origin))
            await self._transport.start(topics, self.timeout)
            self._started = True
            self._started_at = time.monotonic()

    async def close(self) -> None:
        """Send everything published so far (at most ``timeout``), then disconnect."""
        if self._closed:
            return
        self._closed = True
        for _, _, _, done in self._queries.values():
            if not done.done():
                done.set_result(None)
        await self._transport.close(self.timeout)

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ publish

    def check_message(self, data: str | bytes) -> None:
        """:class:`MessageTooBigError` or ``TypeError`` if ``data`` cannot go (nothing made)."""
        if isinstance(data, str):
            # at most 4 bytes a character: only a long text is encoded to be measured
            size = len(data) if 4 * len(data) <= self.max_message_size else len(data.encode())
        elif isinstance(data, bytes | bytearray | memoryview):
            size = len(data)
        else:
            raise TypeError(f"a message is str or bytes, not {type(data).__name__}")
        if size > self.max_message_size:
            raise MessageTooBigError(
                f"message of {size} bytes over max_message_size={self.max_message_size}"
            )

    def frame_of(self, data: str | bytes) -> bytes:
        """The frame of ``data``, checked first (:meth:`check_message`)."""
        self.check_message(data)
        return OutgoingMessage.of(data).frame

    def check_room(self, name: str) -> None:
        """Raise :class:`~enjent.RoomLimitError` for a name no worker would accept."""
        if not isinstance(name, str) or not name:
            raise RoomLimitError("a room name is a non-empty str")
        size = len(name.encode("utf-8"))
        if size > self.max_room_name:
            raise RoomLimitError(
                f"room name of {size} bytes over max_room_name={self.max_room_name}"
            )

    @staticmethod
    def owner(client_id: str) -> int:
        """The shard of the worker that holds ``client_id``; ``ValueError`` if it is no id."""
        parsed = ClientIds.parse(client_id) if isinstance(client_id, str) else None
        if parsed is None:
            raise ValueError(f"{client_id!r} is not an Enjent client id")
        return parsed.shard

    async def _publish(self, topic: bytes, kind: Kind, *fields: Any) -> None:
        if not self._started:
            await self.start()
        if self._closed:
            raise BusError("this publisher is closed")
        seq = self._seq.get(topic, 0) + 1
        if len(self._seq) > 10_000 and topic not in self._seq:
            self._seq = {key: value for key, value in self._seq.items() if key[:1] != b"R"}
        self._seq[topic] = seq
        body = bus.encode(kind, self.origin, self.generation, seq, *fields)
        await self._transport.send(topic, body, self.timeout)

    async def broadcast(self, data: str | bytes, *, exclude: str | None = None) -> None:
        """Send ``data`` (``str``: text, ``bytes``: binary) to every client of every worker."""
        frame = self.frame_of(data)
        await self._publish(bus.TOPIC_ALL, Kind.BROADCAST, frame, exclude)

    def room(self, name: str) -> PublisherRoom:
        """A room by name (checked against ``max_room_name``)."""
        return self.rooms(name)

    def rooms(self, *names: str) -> PublisherRoom:
        """Several rooms as one: a client in more than one of them gets one copy."""
        if not names:
            raise ValueError("rooms() needs at least one name")
        for name in names:
            self.check_room(name)
        return PublisherRoom(self, tuple(dict.fromkeys(names)))

    async def publish_rooms(
        self, names: tuple[str, ...], data: str | bytes, *, exclude: str | None = None
    ) -> None:
        """What :meth:`PublisherRoom.broadcast` does.

        On the embedded bus one envelope goes to the keeper (in the broker
        process), which gives each room that keeps history its next offset and
        forwards the others: a publisher does not need to know the app's rules.
        On NATS a room that keeps history (the rules are read from the JetStream
        stream the workers made) gets the publication stored by JetStream, the
        others one envelope each on their topic.
        """
        for name in names:
            self.check_room(name)
        self._message_id += 1
        listed = list(names)
        if isinstance(self._transport, _ZmqTransport):
            self.check_message(data)
            if not isinstance(data, str):
                data = bytes(data)
            await self._publish(
                bus.TOPIC_KEEPER, Kind.PUBLISH, listed, data, exclude, self._message_id
            )
            return
        self.check_message(data)
        if not isinstance(data, str):
            data = bytes(data)
        if not self._started:
            await self.start()
        if self._closed:
            raise BusError("this publisher is closed")
        transport = self._transport
        assert isinstance(transport, _NatsTransport)
        kept = await transport.history_rooms(names, self.timeout)
        for name in kept:
            await transport.store(name, data, exclude, self.timeout)
        others = [name for name in names if name not in kept]
        if not others:
            return
        frame = OutgoingMessage.of(data).frame
        for name in others:
            await self._publish(
                bus.room_topic(name), Kind.ROOM, others, frame, exclude, self._message_id
            )

    async def send(self, client_id: str, data: str | bytes) -> None:
        """Send ``data`` to the client ``client_id`` wherever it is connected.

        Its worker counts a message for a client gone meanwhile
        (``undeliverable`` in ``/metrics``): a publisher cannot know.
        """
        shard = self.owner(client_id)
        frame = self.frame_of(data)
        await self._publish(bus.shard_topic(shard), Kind.SEND, client_id, frame)

    async def close_client(
        self, client_id: str, code: int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
        """Close the client ``client_id`` with ``code`` (1000, or 3000-4999) and ``reason``."""
        shard = self.owner(client_id)
        if not (code == 1000 or 3000 <= int(code) <= 4999):
            raise ValueError(f"close code must be 1000 or 3000-4999, not {code}")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        await self._publish(bus.shard_topic(shard), Kind.CLOSE, client_id, int(code), reason)

    # -------------------------------------------------- counts and presence

    async def fetch_clients(
        self, *, room: str | None = None, limit: int = 1000, timeout: float = 1.0
    ) -> Presence:
        """Ask every worker which clients it holds (of ``room``): as ``server.fetch_clients``.

        The workers are those heard in the last heartbeats (a publisher that
        has just connected first listens for one interval); one that does not
        answer within ``timeout`` is named in ``missing_workers``.
        """
        check_query(limit, timeout)
        if room is not None:
            self.check_room(room)
        if not self._started:
            await self.start()
        heard_for = time.monotonic() - self._started_at
        if heard_for < 1.2:
            await asyncio.sleep(1.2 - heard_for)  # every worker beats once a second
        now = time.monotonic()
        workers = {s for s, (_, at) in self._workers.items() if now - at < _WORKER_FRESH}
        presence = Presence()
        if not workers:
            return presence
        self._query_id += 1
        query_id = self._query_id
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queries[query_id] = (presence, limit, set(workers), done)
        try:
            await self._publish(
                bus.TOPIC_CONTROL,
                Kind.PRESENCE_REQ,
                query_id,
                self.origin,
                self.generation,
                room,
                limit,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), timeout)
        finally:
            _, _, waiting, _ = self._queries.pop(query_id)
        presence.workers.sort()
        presence.missing_workers = sorted(waiting)
        return presence

    async def count(self, *, timeout: float = 1.0) -> int:
        """The clients of every worker that answered within ``timeout``."""
        return (await self.fetch_clients(limit=0, timeout=timeout)).total

    def _on_receive(self, topic: bytes, body: bytes) -> None:
        try:
            kind, origin, generation, _, fields = bus.decode(body)
            if kind is Kind.HEARTBEAT and origin >= 0:
                self._workers[origin] = (generation, time.monotonic())
                if len(self._workers) > 100_000:  # bounded whatever the bus says
                    self._workers.clear()
            elif kind is Kind.DEAD:
                self._workers.pop(int(fields[0]), None)
            elif kind is Kind.PRESENCE:
                self._on_presence(origin, fields)
        except (BusError, TypeError, ValueError, KeyError, IndexError):
            return  # not ours to judge: the workers count malformed envelopes

    def _on_presence(self, origin: int, fields: list[Any]) -> None:
        query_id, reply_generation, rows, total, last = fields
        query = self._queries.get(int(query_id))
        if query is None or reply_generation != self.generation or not isinstance(rows, list):
            return
        presence, limit, waiting, done = query
        if origin not in waiting:
            return
        presence.add(origin, rows, int(total), limit)
        if last:
            waiting.discard(origin)
            presence.workers.append(origin)
            if not waiting and not done.done():
                done.set_result(None)


_open_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Flush what synchronous publishers still hold when the interpreter exits."""
    for publisher in list(_open_publishers):
        with contextlib.suppress(Exception):
            publisher.close()


class Publisher:
    """A publisher for synchronous code: ``with Publisher(url) as pub: pub.broadcast(...)``.

    The same methods as :class:`AsyncPublisher`, blocking: each returns once
    the message is handed to the bus (the first one connects, at most
    ``timeout`` seconds; a bus that pushes back makes it wait, at most
    ``timeout``, then :class:`~enjent.BusError`). :meth:`close` sends
    everything published before it, then disconnects; publishers still open
    at interpreter exit are closed then. Thread-safe: calls from several
    threads are serialized, in the order they arrive. In a process forked
    after it was used (a prefork worker), it reconnects on its first call.
    """

    def __init__(self, bus: str, **options: Any) -> None:
        self._options = options
        self._bus = bus
        self._async = AsyncPublisher(bus, **options)  # checks the URL and options now
        self.timeout = self._async.timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        _open_publishers.add(self)

    @property
    def origin(self) -> int:
        return self._async.origin

    def _runner(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._pid != os.getpid():  # forked: the thread and sockets stayed behind
                self._pid = os.getpid()
                self._loop, self._thread = None, None
                self._async = AsyncPublisher(self._bus, **self._options)
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="enjent-publisher", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _call(self, work: Callable[[], Awaitable[T]], wait: float | None = None) -> T:
        loop = self._runner()

        async def run() -> T:
            return await work()

        coroutine: Coroutine[Any, Any, T] = run()
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(wait if wait is not None else 2 * self.timeout + 1)
        except TimeoutError:
            future.cancel()
            raise BusError(f"the publisher did not finish within {self.timeout:g}s") from None

    def broadcast(self, data: str | bytes, *, exclude: str | None = None) -> None:
        """Send ``data`` to every client of every worker."""
        self._async.check_message(data)  # refused in the caller's thread, nothing sent
        self._call(lambda: self._async.broadcast(data, exclude=exclude))

    def room(self, name: str) -> SyncPublisherRoom:
        return self.rooms(name)

    def rooms(self, *names: str) -> SyncPublisherRoom:
        """Several rooms as one: a client in more than one of them gets one copy."""
        return SyncPublisherRoom(self, self._async.rooms(*names).names)

    def publish_rooms(
        self, names: tuple[str, ...], data: str | bytes, *, exclude: str | None = None
    ) -> None:
        self._async.check_message(data)
        self._call(lambda: self._async.publish_rooms(names, data, exclude=exclude))

    def send(self, client_id: str, data: str | bytes) -> None:
        """Send ``data`` to the client ``client_id`` wherever it is connected."""
        self._async.owner(client_id)
        self._async.check_message(data)
        self._call(lambda: self._async.send(client_id, data))

    def close_client(
        self, client_id: str, code: int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
        """Close the client ``client_id`` with ``code`` and ``reason``."""
        self._call(lambda: self._async.close_client(client_id, code, reason))

    def fetch_clients(
        self, *, room: str | None = None, limit: int = 1000, timeout: float = 1.0
    ) -> Presence:
        """As :meth:`AsyncPublisher.fetch_clients`."""
        check_query(limit, timeout)
        return self._call(
            lambda: self._async.fetch_clients(room=room, limit=limit, timeout=timeout),
            wait=self.timeout + timeout + 3,
        )

    def count(self, *, timeout: float = 1.0) -> int:
        return self.fetch_clients(limit=0, timeout=timeout).total

    def close(self) -> None:
        """Send everything published so far (at most ``timeout``), then disconnect."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if self._pid != os.getpid():
                loop = None
        if loop is None:
            self._loop = None
            return
        try:
            self._call(self._async.close)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(self.timeout + 1)
            with contextlib.suppress(RuntimeError):
                loop.close()
            with self._lock:
                self._loop, self._thread = None, None
            _open_publishers.discard(self)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncPublisherRoom:
    """One room, or several at once, of a :class:`Publisher`."""

    __slots__ = ("_names", "_publisher")

    def __init__(self, publisher: Publisher, names: tuple[str, ...]) -> None:
        self._publisher = publisher
        self._names = names

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def broadcast(self, data: str | bytes, *, exclude: str | None = None) -> None:
        """Send ``data`` to every member of the room(s), on every worker."""
        self._publisher.publish_rooms(self._names, data, exclude=exclude)

    def fetch_clients(self, *, limit: int = 1000, timeout: float = 1.0) -> Presence:
        return self._publisher.fetch_clients(room=self._names[0], limit=limit, timeout=timeout)
