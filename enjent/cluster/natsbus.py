"""The NATS engine: the workers of several hosts as one logical server.

Cluster layer (layer 3 of docs/architecture.md). With ``--bus
nats://h1:4222,nats://h2:4222`` every worker connects to NATS itself (no
Enjent broker) and a :class:`NatsEngine` carries the same envelopes as the
ZeroMQ engine: :class:`~enjent.cluster.engine.BusEngine` does the routing,
sequence numbers, counts and presence; this module maps topics to subjects
and moves the bytes with nats-py (subscription callbacks, one publisher
task per worker).

Subjects (``<prefix>`` is ``enjent`` unless configured):

======================  ==================================================
``<prefix>.all``        global broadcasts
``<prefix>.ctl``        presence queries (workers and publishers)
``<prefix>.hb``         heartbeats and ``HELLO``: workers only (NATS
                        permissions keep publishers off it; see the README)
``<prefix>.w.<shard>``  one worker: sends to its clients, answers
``<prefix>.p.<n>``      one publisher (origin ``-n``): answers to its queries
``<prefix>.r.<hex>``    one room: the hex of its 16-byte digest; a worker
                        subscribes only while it has members, so NATS
                        forwards a room's traffic only to hosts with members
======================  ==================================================

Shards are unique across hosts: :func:`host_shard_base` gives each host a
range (from its name and listening address, or ``ENJENT_NODE_ID``), and the
worker's index is added to it. Loss is never silent: the sequence numbers
count gaps, and NATS's slow-consumer errors, disconnects and reconnects are
counted (``slow_consumers``, ``disconnects``, ``reconnects`` in ``/healthz``
and ``/metrics``). No supervisor watches another host's workers, so a peer
silent for ``forget_after`` seconds (3 by default) is dropped from the
counts; it is counted again from its next heartbeat.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import socket
import ssl as ssl_module
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..exceptions import BusError
from ..server.history import Joined
from ..server.logs import RepeatedLog
from . import bus
from .engine import BusEngine
from .jetstream import JetStreamHistory

if TYPE_CHECKING:
    from ..server.hub import Hub

__all__ = ["IpcBus", "NatsConfig", "NatsEngine", "host_shard_base", "parse_bus", "subject_of"]

logger = logging.getLogger("enjent.cluster")

#: Workers one host may run: a host's shards are ``base .. base + SHARDS_PER_HOST - 1``.
SHARDS_PER_HOST = 1000


@dataclass(frozen=True)
class NatsConfig:
    """Where and how the workers reach NATS (``--bus nats://...`` and ``ENJENT_NATS_*``)."""

    servers: tuple[str, ...]
    token: str | None = None
    user: str | None = None
    password: str | None = None
    credentials: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    subject_prefix: str = "enjent"
    node_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def connect_options(self) -> dict[str, Any]:
        """The keyword arguments of ``nats.connect`` for these settings."""
        options: dict[str, Any] = {"servers": list(self.servers)}
        if self.token:
            options["token"] = self.token
        if self.user:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.credentials:
            options["user_credentials"] = self.credentials
        if self.tls_ca or self.tls_cert or any(s.startswith("tls://") for s in self.servers):
            context = ssl_module.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        options.update(self.extra)
        return options


@dataclass(frozen=True)
class IpcBus:
    """The embedded ZeroMQ bus at a stable address: its sockets in ``directory``.

    ``--bus ipc:///ABSOLUTE/DIR``: the supervisor's broker binds
    ``DIR/bus-in`` (publishers connect there) and ``DIR/bus-out``
    (subscribers), so that a :class:`~enjent.Publisher` of the same host
    reaches the clients with the same URL. The directory is made with mode
    0700 when missing; one that others may enter is refused.
    """

    directory: str

    @property
    def publish_endpoint(self) -> str:
        return f"ipc://{self.directory}/bus-in"

    @property
    def subscribe_endpoint(self) -> str:
        return f"ipc://{self.directory}/bus-out"


def parse_bus(
    text: str | None, environ: Mapping[str, str] | None = None
) -> NatsConfig | IpcBus | None:
    """``None`` for the private embedded bus; :class:`IpcBus` for ``ipc:///DIR``; a
    :class:`NatsConfig` for ``nats://`` URLs.

    ``text`` is ``zeromq`` (or empty), ``ipc:///ABSOLUTE/DIR``, or a comma-separated list of
    ``nats://`` / ``tls://`` URLs (credentials in the URL work too:
    ``nats://token@host:4222``, ``nats://user:pass@host:4222``). The other
    settings come from ``ENJENT_NATS_TOKEN``, ``ENJENT_NATS_USER``,
    ``ENJENT_NATS_PASSWORD``, ``ENJENT_NATS_CREDS`` (a credentials file),
    ``ENJENT_NATS_TLS_CA`` / ``_CERT`` / ``_KEY``, ``ENJENT_NATS_PREFIX``
    and ``ENJENT_NODE_ID``. Raises ``ValueError`` with what to fix.
    """
    env = os.environ if environ is None else environ
    if text is None or text.strip() in ("", "zeromq", "zmq"):
        return None
    if text.strip().startswith("ipc://"):
        directory = text.strip()[len("ipc://") :].rstrip("/")
        if not directory.startswith("/") or "," in directory:
            raise ValueError(f"bus {text!r}: expected ipc:///ABSOLUTE/DIR (three slashes)")
        if len(directory) + len("/bus-out") > 107:  # sun_path, the final NUL included
            raise ValueError(f"bus {text!r}: the directory is too long for ipc:// sockets")
        return IpcBus(os.path.normpath(directory))
    servers = tuple(part.strip() for part in text.split(",") if part.strip())
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError(
                f"bus {server!r}: expected zeromq, ipc:///DIR or "
                "nats://HOST:PORT[,nats://HOST:PORT...]"
            )
    prefix = env.get("ENJENT_NATS_PREFIX", "enjent")
    if not prefix or not all(c.isalnum() or c in "-_" for c in prefix):
        raise ValueError(f"ENJENT_NATS_PREFIX {prefix!r}: letters, digits, '-' and '_' only")
    node = env.get("ENJENT_NODE_ID")
    if node is not None and not (node.isdigit() and int(node) < 1_000_000):
        raise ValueError(f"ENJENT_NODE_ID {node!r}: a number from 0 to 999999")
    return NatsConfig(
        servers=servers,
        token=env.get("ENJENT_NATS_TOKEN") or None,
        user=env.get("ENJENT_NATS_USER") or None,
        password=env.get("ENJENT_NATS_PASSWORD") or None,
        credentials=env.get("ENJENT_NATS_CREDS") or None,
        tls_ca=env.get("ENJENT_NATS_TLS_CA") or None,
        tls_cert=env.get("ENJENT_NATS_TLS_CERT") or None,
        tls_key=env.get("ENJENT_NATS_TLS_KEY") or None,
        subject_prefix=prefix,
        node_id=int(node) if node is not None else None,
    )


def subject_of(prefix: str, topic: bytes) -> str:
    """The NATS subject of a bus topic (the table in the module docstring).

    A publisher's own topic (its origin is negative: ``-N``) is ``<prefix>.p.N``.
    """
    if topic == bus.TOPIC_ALL:
        return f"{prefix}.all"
    if topic == bus.TOPIC_CONTROL:
        return f"{prefix}.ctl"
    if topic == bus.TOPIC_HEARTBEAT:
        return f"{prefix}.hb"
    if topic[:1] == b"S":
        shard = int(topic[1:-1])
        # a publisher's own subject (its answers) is apart from the workers', so that
        # NATS permissions can let publishers read theirs and not the workers'
        return f"{prefix}.w.{shard}" if shard >= 0 else f"{prefix}.p.{-shard}"
    if topic[:1] == b"R":
        return f"{prefix}.r.{topic[1:].hex()}"
    raise BusError(f"no subject for topic {topic!r}")


def host_shard_base(config: NatsConfig, host: str, port: int) -> int:
    """The first shard of this host: ``ENJENT_NODE_ID``, or a digest of where it serves.

    Two hosts of one cluster never serve on the same (host name, address,
    port), so the digest (a number below a million, times
    :data:`SHARDS_PER_HOST`) tells them apart; set ``ENJENT_NODE_ID`` to
    choose the numbers yourself.
    """
    if config.node_id is not None:
        node = config.node_id
    else:
        where = f"{socket.gethostname()}|{host}|{port}".encode()
        node = int.from_bytes(hashlib.blake2b(where, digest_size=8).digest(), "big") % 1_000_000
    return node * SHARDS_PER_HOST


class NatsEngine(BusEngine):
    """One worker's connection to NATS; :meth:`start` it on the running loop."""

    def __init__(
        self,
        hub: Hub,
        *,
        shard: int,
        config: NatsConfig,
        max_pending: int = 100_000,
        max_publish_rate: float = 200_000.0,
        heartbeat_interval: float = 1.0,
        peer_timeout: float = 5.0,
        forget_after: float = 3.0,
        first_wait: float = 1.0,
    ) -> None:
        super().__init__(
            hub,
            shard=shard,
            max_publish_rate=max_publish_rate,
            heartbeat_interval=heartbeat_interval,
            peer_timeout=min(peer_timeout, forget_after),
            forget_after=forget_after,
        )
        self.config = config
        self.max_pending = max_pending
        self.trusts_dead = False  # no broker on NATS: a DEAD envelope there is forged
        for name in ("slow_consumers", "disconnects", "reconnects", "connect_failures"):
            self.counters[name] = 0
        #: the topics this worker listens to, subscribed again on (re)connection
        self._wanted: set[bytes] = set(self.topics)
        self._connector: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._last_error = ""
        #: seconds :meth:`start` waits for the first connection before serving without it
        self.first_wait = first_wait
        #: errors nats-py reports (each failed reconnect attempt is one): rate-limited
        self._errors = RepeatedLog(logger, logging.WARNING)
        self._subjects: dict[bytes, str] = {}
        self._topics: dict[str, bytes] = {}
        self._subscriptions: dict[bytes, Any] = {}
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._nc: Any = None
        self._connected = False
        self._budget_end = 0
        #: rooms that keep history: JetStream's (made once connected)
        self._history = JetStreamHistory(self) if hub.history else None

    # ---------------------------------------------------------- subjects

    def subject(self, topic: bytes) -> str:
        """The NATS subject of a bus topic."""
        subject = self._subjects.get(topic)
        if subject is None:
            subject = subject_of(self.config.subject_prefix, topic)
            if len(self._subjects) > 20_000:
                self._subjects.clear()  # bounded: rooms come and go
            self._subjects[topic] = subject
        return subject

    # --------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the heartbeat and the publisher, and connect, waiting at most ``first_wait``.

        A worker serves whether NATS is reachable or not: when no server
        answers within ``first_wait`` seconds (nothing listens yet, a host
        that booted before its NATS node), one warning says so, ``/healthz``
        says ``degraded``, and nats-py goes on trying in the background
        (every ``reconnect_time_wait`` per server, each failure counted in
        ``connect_failures``) until it connects; one line then says after how
        long. Meanwhile what the worker publishes is dropped and counted
        (``dropped``), as in any outage. Raises :class:`BusError` only for
        settings nats-py refuses outright.
        """
        from nats.aio.client import Client  # layer 3's optional engine: only when asked for

        loop = asyncio.get_running_loop()
        self._publisher = loop.create_task(self._publish_forever())
        self._start_heartbeats()
        self._down_since = time.monotonic()
        connector = self._connector = loop.create_task(self._connect(Client()))
        done, _ = await asyncio.wait({connector}, timeout=self.first_wait)
        if done:
            connector.result()  # BusError: settings nats-py refused
            return
        connector.add_done_callback(self._connector_done)
        servers = ", ".join(self.config.servers)
        detail = f" ({self._last_error})" if self._last_error else ""
        logger.warning(
            "worker %d: NATS not reachable at %s within %.1fs%s: serving without the bus "
            "(health degraded), connecting in the background",
            self.shard,
            servers,
            self.first_wait,
            detail,
        )

    def _connect_options(self) -> dict[str, Any]:
        return {
            "name": f"enjent-{self.shard}-{os.getpid()}",
            "connect_timeout": 2,
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": -1,  # the first connection too: never gives up
            "ping_interval": 2,
            "max_outstanding_pings": 2,
            # the first URL is this host's own node (the README says so): a
            # room's traffic then reaches only the nodes of hosts with members
            "dont_randomize": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            **self.config.connect_options(),
        }

    async def _connect(self, nc: Any) -> None:
        """Connect ``nc`` (retrying until it succeeds), then subscribe to every topic wanted."""
        try:
            await nc.connect(**self._connect_options())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            servers = ", ".join(self.config.servers)
            detail = str(exc) or type(exc).__name__
            raise BusError(f"cannot connect to NATS at {servers}: {detail}") from None
        self._nc = nc
        self._connected = True
        if self._history is not None:
            await self._history.start(nc)
        for topic in list(self._wanted):
            await self._do_subscribe(topic)
        self._wakeup.set()
        if self.counters["connect_failures"]:
            logger.warning(
                "worker %d: connected to NATS after %.1fs without it (%d failed attempts)",
                self.shard,
                time.monotonic() - self._down_since,
                self.counters["connect_failures"],
            )

    def _connector_done(self, task: asyncio.Task[None]) -> None:
        if self._connector is task:
            self._connector = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("worker %d: %s", self.shard, task.exception())

    async def close(self) -> None:
        """Stop the heartbeat, send what is queued (bounded), close the connection."""
        await self._stop_heartbeats()
        if self._history is not None:
            await self._history.close()
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, BusError):
                await self._connector
            self._connector = None
        if self._publisher is not None:
            for _ in range(50):
                if not self._outbox:
                    break
                await asyncio.sleep(0.01)
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        if self._nc is not None:
            self._connected = False  # a disconnect of our own: not counted, not logged
            try:
                await asyncio.wait_for(self._nc.close(), 2.0)
            except Exception as exc:  # a dead server must not hang the stop
                logger.debug("closing the NATS connection: %s", exc)
            self._nc = None

    # -------------------------------------------------- rooms with history

    @property
    def nc(self) -> Any:
        """The NATS connection (``None`` before the first one)."""
        return self._nc

    def publish_logged(self, names: list[str], data: str | bytes, exclude_id: str | None) -> int:
        """To JetStream: the stream numbers it and republishes it to the members' workers."""
        if self._history is None:
            return 0
        self._history.publish(names, data, exclude_id)
        return 0

    def queue_history(self, subject: str, payload: bytes) -> None:
        """One JetStream publish, in order with this worker's other messages."""
        if self._nc is None or len(self._outbox) >= self.max_pending:
            self.counters["dropped"] += 1
            return
        self._outbox.append(("js", (subject, payload)))
        self._wakeup.set()

    def recover(self, client: Any, name: str, since: tuple[str, int] | None) -> None:
        if self._history is None:
            self.hub.joined(client, Joined.unanswered(name, since), [])
            return
        self._history.recover(client, name, since)

    def room_deleted(self, name: str) -> None:
        super().room_deleted(name)
        if self._history is not None:
            self._history.room_deleted(name)

    def spawn_unsubscribe(self, subscription: Any) -> None:
        """Unsubscribe in the publisher task's order (a subscription of the history's)."""
        self._outbox.append(("-", subscription))
        self._wakeup.set()

    def history_figures(self) -> dict[str, int] | None:
        return self._history.figures if self._history is not None else None

    # --------------------------------------------------------- transport

    def _send(self, topic: bytes, body: bytes) -> bool:
        if self._nc is None or len(self._outbox) >= self.max_pending:
            return False
        self._outbox.append((self.subject(topic), body))
        self._wakeup.set()
        return True

    def _subscribe(self, topic: bytes) -> None:
        self._wanted.add(topic)
        self._outbox.append(("+", topic))
        self._wakeup.set()

    def _unsubscribe(self, topic: bytes) -> None:
        self._wanted.discard(topic)
        self._outbox.append(("-", topic))
        self._wakeup.set()

    async def _do_subscribe(self, topic: bytes) -> None:
        if topic in self._subscriptions or self._nc is None:
            return
        subject = self.subject(topic)
        self._topics[subject] = topic
        claim = self._subscriptions[topic] = object()  # no second subscription meanwhile
        subscription = await self._nc.subscribe(
            subject, cb=self._on_message, pending_msgs_limit=self.max_pending
        )
        if self._subscriptions.get(topic) is claim:
            self._subscriptions[topic] = subscription
        else:  # unsubscribed while the subscription was being made
            await subscription.unsubscribe()

    async def _publish_forever(self) -> None:
        """One task for the worker: publishes (and subscribes) in order, never per client."""
        outbox = self._outbox
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while outbox:
                subject, payload = outbox.popleft()
                try:
                    if subject == "+":
                        await self._do_subscribe(payload)
                    elif subject == "js":
                        assert self._history is not None
                        await self._history.send(*payload)
                    elif subject == "-":
                        subscription = (
                            self._subscriptions.pop(payload, None)
                            if isinstance(payload, bytes)
                            else payload
                        )
                        if hasattr(subscription, "unsubscribe"):  # not a claim in progress
                            await subscription.unsubscribe()
                    else:
                        await self._nc.publish(subject, payload)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # during a reconnect past nats-py's buffer: lost, counted,
                    # and the receivers count the gap too
                    self.counters["dropped"] += 1
                    logger.debug("NATS publish to %s failed: %s", subject, exc)

    async def _on_message(self, msg: Any) -> None:
        topic = self._topics.get(msg.subject)
        if topic is not None:
            self.receive(topic, msg.data)
        if self.hub.deliveries > self._budget_end:
            # nats-py runs the callbacks of a backlog back to back: a fair
            # share of the loop, then the clients' sockets get their turn
            await asyncio.sleep(0)
            self._budget_end = self.delivery_budget_end()

    async def _on_error(self, exc: Exception) -> None:
        if type(exc).__name__ == "SlowConsumerError":
            self.counters["slow_consumers"] += 1
            self._errors(
                "worker %d: NATS slow consumer: messages dropped (counted as gaps)", self.shard
            )
        elif not self._connected:
            # a failed attempt of a reconnection (or of the first connection):
            # the outage was logged once when it began, and is summed up at its end
            self._last_error = str(exc) or type(exc).__name__
            if self._nc is None:
                self.counters["connect_failures"] += 1
            logger.debug("worker %d: NATS: %s", self.shard, self._last_error)
        else:
            self._errors("worker %d: NATS: %s", self.shard, exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._connected:
            self._connected = False
            self._down_since = time.monotonic()
            self.counters["disconnects"] += 1
            logger.warning("worker %d: disconnected from NATS, reconnecting", self.shard)

    async def _on_reconnected(self) -> None:
        self._connected = True
        self.counters["reconnects"] += 1
        url = getattr(self._nc, "connected_url", None)
        where = f"{url.hostname}:{url.port}" if url is not None else "NATS"
        logger.warning(
            "worker %d: reconnected to %s after %.1fs",
            self.shard,
            where,
            time.monotonic() - self._down_since,
        )

    def health(self) -> dict[str, Any]:
        data = super().health()
        nc = self._nc
        data["bus"]["engine"] = "nats"
        data["bus"]["connected"] = bool(nc is not None and nc.is_connected)
        if nc is not None and nc.is_connected and nc.connected_url is not None:
            data["bus"]["server"] = f"{nc.connected_url.hostname}:{nc.connected_url.port}"
        if not data["bus"]["connected"]:
            data["status"] = "degraded"
        return data
