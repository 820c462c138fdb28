"""The bus client of one worker: one logical server over ZeroMQ pub/sub.

Cluster layer (layer 3 of docs/architecture.md). A :class:`ClusterClient` is plugged
into a :class:`~enjent.WebSocketServer` (``server.attach_peers()``) in each worker
process, after fork. It publishes this worker's client events and its
cross-shard messages, delivers what other workers publish, and keeps the
directory of every client of the cluster. The wire format is in
:mod:`enjent.bus`.

Directory consistency: connect/disconnect events keep it current; every
worker sends a heartbeat with its client count each second, and a worker
whose view of a peer disagrees with that count twice in a row asks the peer
for a snapshot (this also brings a (re)started worker up to date); a peer
that restarts (new generation), that the supervisor reports dead, or that
stays silent for ``peer_timeout`` has its clients purged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from ..exceptions import BusError
from ..frames import CloseCode
from ..protocol import OutgoingMessage
from ..server.connection import DELIVERY_BUDGET
from ..server.ids import ClientIds
from ..server.metrics import WorkerSample
from . import bus
from .bus import Kind

if TYPE_CHECKING:
    from ..server.client import WebSocketClient
    from ..server.hub import Hub

__all__ = ["ClusterClient", "RemoteClient"]

logger = logging.getLogger("enjent.cluster")

#: Most envelopes handled per event-loop callback, so one busy bus cannot
#: starve the clients' sockets.
_RECEIVE_BATCH = 512
_DEDUP_WINDOW = 1024


class RemoteClient:
    """A client connected to another worker: ``send`` and ``close`` cross the bus."""

    __slots__ = ("_cluster", "connected_at", "id", "path", "shard")

    def __init__(
        self, cluster: ClusterClient, client_id: str, shard: int, path: str, connected_at: float
    ) -> None:
        self._cluster = cluster
        self.id = client_id
        self.shard = shard
        self.path = path
        self.connected_at = connected_at

    @property
    def is_open(self) -> bool:
        return self.id in self._cluster.directory

    def send(self, data: str | bytes) -> bool:
        """Send a message through the bus; ``False`` if the client is gone."""
        return self._cluster.send_to(self.id, data)

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Ask the owning worker to close this client."""
        self._cluster.close_remote(self.id, code, reason)

    def __repr__(self) -> str:
        return f"<RemoteClient {self.id} on worker {self.shard} {self.path!r}>"


@dataclass
class Peer:
    """What this worker knows of another worker, from its heartbeats."""

    generation: str
    pid: int = 0
    clients: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    last_heartbeat: float = 0.0
    mismatches: int = 0


shard_of = ClientIds.shard_of


class ClusterClient:
    """One worker's connection to the bus (PUB to the broker's XSUB, SUB to its XPUB).

    Create it in the worker process, after fork, then :meth:`start` it on
    the running loop before the server starts accepting clients.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        shard: int,
        publish_endpoint: str,
        subscribe_endpoint: str,
        high_water_mark: int = 100_000,
        max_publish_rate: float = 200_000.0,
        heartbeat_interval: float = 1.0,
        peer_timeout: float = 5.0,
    ) -> None:
        self.hub = hub
        self.shard = shard
        self.generation = hub.ids.generation
        self.publish_endpoint = publish_endpoint
        self.subscribe_endpoint = subscribe_endpoint
        self.high_water_mark = high_water_mark
        self.max_publish_rate = max_publish_rate
        self.heartbeat_interval = heartbeat_interval
        self.peer_timeout = peer_timeout
        #: The clients of the *other* workers: id -> (shard, path, connected_at).
        #: This worker's own clients are ``hub.clients``; not storing them
        #: twice saves memory on every worker.
        self.directory: dict[str, tuple[int, str, float]] = {}
        self._shard_counts: collections.Counter[int] = collections.Counter()
        self.peers: dict[int, Peer] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "sent",
                "received",
                "dropped",
                "malformed",
                "gaps",
                "rate_limited",
                "snapshot_failures",
            ),
            0,
        )
        self._seq: dict[bytes, int] = {}
        self._last_seq: dict[bytes, dict[tuple[int, str], int]] = {}
        self._room_message_id = 0
        self._recent_room_messages: collections.deque[tuple[int, str, int]] = collections.deque()
        self._recent_room_set: set[tuple[int, str, int]] = set()
        self._tokens = max_publish_rate
        self._tokens_at = 0.0
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._sub: zmq.Socket[bytes] | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._last_rate_warning = 0.0
        #: when our own heartbeat last came back through the broker
        self._own_heartbeat_at = time.monotonic()
        self._last_malformed_warning = -10.0

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the sockets (in this process), subscribe, announce this worker."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._tokens_at = loop.time()
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub = context.socket(zmq.PUB)
        sub = context.socket(zmq.SUB)
        for sock in (pub, sub):
            sock.setsockopt(zmq.LINGER, 500)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        pub.setsockopt(zmq.SNDHWM, self.high_water_mark)
        sub.setsockopt(zmq.RCVHWM, self.high_water_mark)
        sub.setsockopt(zmq.MAXMSGSIZE, bus.MAX_BODY + 4096)
        pub.connect(self.publish_endpoint)
        sub.connect(self.subscribe_endpoint)
        for topic in (bus.TOPIC_ALL, bus.TOPIC_DIRECTORY, bus.shard_topic(self.shard)):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._context, self._pub, self._sub = context, pub, sub
        self._fd = int(sub.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._on_readable)
        self._heartbeat_task = loop.create_task(self._heartbeat_forever())
        loop.call_soon(self._on_readable)

    async def close(self) -> None:
        """Stop the heartbeat and close the sockets (pending messages get 0.5 s)."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close()
        self._pub = self._sub = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # -------------------------------------------------------------- publish

    def _publish(self, topic: bytes, kind: Kind, *fields: Any) -> bool:
        pub = self._pub
        if pub is None:
            return False
        loop = self._loop
        assert loop is not None
        now = loop.time()
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
        try:
            pub.send_multipart((topic, body), flags=zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.Again:
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

    def send_to(self, client_id: str, data: str | bytes) -> bool:
        """Send to a client of any worker; ``False`` if it is not in the directory."""
        shard = shard_of(client_id)
        if shard is None:
            return False
        if shard == self.shard:
            local = self.hub.get(client_id)
            return local.send(data) if local is not None else False
        if client_id not in self.directory:
            return False
        frame = OutgoingMessage.of(data).frame
        return self._publish(bus.shard_topic(shard), Kind.SEND, client_id, frame)

    def close_remote(self, client_id: str, code: int, reason: str) -> None:
        shard = shard_of(client_id)
        if shard is None:
            return
        if shard == self.shard:
            local = self.hub.get(client_id)
            if local is not None:
                local.close(code, reason)
            return
        self._publish(bus.shard_topic(shard), Kind.CLOSE, client_id, int(code), reason)

    # --------------------------------------------------- events from server

    def client_connected(self, client: WebSocketClient) -> None:
        self._publish(
            bus.TOPIC_DIRECTORY, Kind.CONNECT, client.id, client.request.path, client.connected_at
        )

    def client_disconnected(self, client: WebSocketClient) -> None:
        self._publish(bus.TOPIC_DIRECTORY, Kind.DISCONNECT, client.id)

    def room_created(self, name: str) -> None:
        """The first local member joined: subscribe to the room's topic."""
        topic = bus.room_topic(name)
        self._last_seq.pop(topic, None)
        if self._sub is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
            self._wake()

    def room_deleted(self, name: str) -> None:
        """The last local member left: unsubscribe, so its traffic stops here."""
        topic = bus.room_topic(name)
        self._last_seq.pop(topic, None)
        if self._sub is not None:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self._wake()

    # ------------------------------------------------------------ directory

    def _directory_add(self, client_id: str, shard: int, path: str, connected_at: float) -> None:
        if client_id not in self.directory:
            self._shard_counts[shard] += 1
        self.directory[client_id] = (shard, sys.intern(path), connected_at)

    def _directory_remove(self, client_id: str) -> None:
        entry = self.directory.pop(client_id, None)
        if entry is not None:
            self._shard_counts[entry[0]] -= 1

    def _purge(self, shard: int, keep_generation: str | None = None) -> int:
        """Forget the clients of ``shard`` (except those of ``keep_generation``)."""
        keep = f"{shard}-{keep_generation}-" if keep_generation else None
        doomed = [
            client_id
            for client_id, entry in self.directory.items()
            if entry[0] == shard and (keep is None or not client_id.startswith(keep))
        ]
        for client_id in doomed:
            self._directory_remove(client_id)
        if doomed:
            logger.info("purged %d clients of worker %d from the directory", len(doomed), shard)
        return len(doomed)

    def client_count(self) -> int:
        return self.hub.count + len(self.directory)

    def get_client(self, client_id: str) -> RemoteClient | None:
        entry = self.directory.get(client_id)
        if entry is None:
            return None
        return RemoteClient(self, client_id, entry[0], entry[1], entry[2])

    def remote_clients(self) -> list[Any]:
        """Proxies for every other worker's clients."""
        return [
            RemoteClient(self, client_id, entry[0], entry[1], entry[2])
            for client_id, entry in self.directory.items()
        ]

    def health(self) -> dict[str, Any]:
        hub = self.hub
        workers = [
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
                    # the directory's count: current, and adds up to "clients"
                    # (the heartbeat's count is up to a second old)
                    "clients": self._shard_counts.get(shard, 0),
                    "generation": peer.generation,
                    "heartbeat_age": round(now - peer.last_heartbeat, 3),
                }
            )
        return {
            "status": "ok" if self.bus_up() else "degraded",
            "clients": hub.count + len(self.directory),
            "local_clients": hub.count,
            "shard": self.shard,
            "workers": workers,
            "bus": {**self.counters, "up": self.bus_up()},
            "stats": dict(hub.stats),
        }

    def bus_up(self) -> bool:
        """Whether our heartbeats come back through the broker (within 3 intervals)."""
        return time.monotonic() - self._own_heartbeat_at < 3 * self.heartbeat_interval + 1.0

    def metrics_samples(self) -> list[WorkerSample]:
        """This worker's figures, and each peer's from its last heartbeat."""
        hub = self.hub
        samples = [WorkerSample(self.shard, hub.count, dict(hub.stats), dict(self.counters))]
        for shard, peer in sorted(self.peers.items()):
            stats = peer.stats
            server_stats = stats.get("server")
            bus_stats = stats.get("bus")
            samples.append(
                WorkerSample(
                    shard,
                    peer.clients,
                    server_stats if isinstance(server_stats, dict) else {},
                    bus_stats if isinstance(bus_stats, dict) else {},
                )
            )
        return samples

    # -------------------------------------------------------------- receive

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        sub = self._sub
        if sub is None:
            return
        hub = self.hub
        budget_end = hub.deliveries + DELIVERY_BUDGET
        for _ in range(_RECEIVE_BATCH):
            if hub.deliveries > budget_end:
                break  # a fair share of the loop: the rest on the next turn
            try:
                parts = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                logger.warning("bus receive failed: %s", exc)
                break
            self.counters["received"] += 1
            if len(parts) != 2:
                self.counters["malformed"] += 1
                continue
            try:
                self._handle(parts[0], parts[1])
            except BusError as exc:
                self.counters["malformed"] += 1
                now = time.monotonic()
                if now - self._last_malformed_warning > 5.0:  # logged once, then counted
                    self._last_malformed_warning = now
                    logger.warning("dropped a malformed bus envelope: %s", exc)
            except Exception:
                self.counters["malformed"] += 1
                logger.exception("error handling a bus envelope")
        if self._sub is not None and int(self._sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _track_seq(self, topic: bytes, origin: int, generation: str, seq: int) -> None:
        per_topic = self._last_seq.get(topic)
        if per_topic is None:
            per_topic = self._last_seq[topic] = {}
        key = (origin, generation)
        last = per_topic.get(key)
        if last is not None and seq > last + 1:
            self.counters["gaps"] += seq - last - 1
            logger.warning(
                "bus gap: %d message(s) from worker %d lost on topic %r",
                seq - last - 1,
                origin,
                topic,
            )
        per_topic[key] = seq

    def _handle(self, topic: bytes, body: bytes) -> None:
        """Handle one envelope; a field of the wrong type raises :class:`BusError`."""
        kind, origin, generation, seq, fields = bus.decode(body)
        own = origin == self.shard and generation == self.generation
        if own:
            if kind is Kind.HEARTBEAT:  # our own heartbeat went round: the bus works
                self._own_heartbeat_at = time.monotonic()
            return
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
            _check_bytes(frame)
            exclude = hub.get(exclude_id) if exclude_id else None
            hub.write_all(hub.clients.values(), OutgoingMessage.from_frame(frame), exclude)
        elif kind is Kind.ROOM:
            names, frame, exclude_id, message_id = fields
            _check_bytes(frame)
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
            _check_bytes(frame)
            client = hub.get(client_id)
            if client is not None:
                hub.write_all((client,), OutgoingMessage.from_frame(frame), None)
        elif kind is Kind.CLOSE:
            client_id, code, reason = fields
            client = hub.get(client_id)
            if client is not None:
                client.close(int(code), str(reason))
        elif kind is Kind.CONNECT:
            client_id, path, connected_at = fields
            self._directory_add(str(client_id), origin, str(path), float(connected_at))
        elif kind is Kind.DISCONNECT:
            self._directory_remove(str(fields[0]))
        elif kind is Kind.HEARTBEAT:
            self._on_heartbeat(origin, generation, fields)
        elif kind is Kind.HELLO:
            self._peer(origin, generation)
        elif kind is Kind.SNAPSHOT_REQ:
            self._send_snapshot(int(fields[0]))
        elif kind is Kind.SNAPSHOT:
            rows = [(str(c), str(p), float(t)) for c, p, t in fields[0]]  # all or nothing
            part, last = int(fields[1]), bool(fields[2])
            self._peer(origin, generation)
            if part == 0:
                self._purge(origin)
            for client_id, path, connected_at in rows:
                self._directory_add(client_id, origin, path, connected_at)
            if last:
                logger.debug("snapshot of worker %d: %d parts", origin, part + 1)
        elif kind is Kind.DEAD:
            shard, pid = int(fields[0]), int(fields[1])
            peer = self.peers.get(shard)
            if peer is None or peer.pid == pid:
                # (never heard of: it died before its first heartbeat reached us)
                self.peers.pop(shard, None)
                self._purge(shard)
                if peer is not None:
                    self._forget_sequences(shard, peer.generation)
            else:
                self._purge(shard, keep_generation=peer.generation)

    def _peer(self, shard: int, generation: str) -> Peer:
        peer = self.peers.get(shard)
        if peer is None or peer.generation != generation:
            # a new process for that shard: its predecessor's clients are gone,
            # and so is the sequence state kept for it
            self._purge(shard, keep_generation=generation)
            if peer is not None:
                self._forget_sequences(shard, peer.generation)
            peer = self.peers[shard] = Peer(generation, last_heartbeat=time.monotonic())
        return peer

    def _forget_sequences(self, shard: int, generation: str) -> None:
        key = (shard, generation)
        for per_topic in self._last_seq.values():
            per_topic.pop(key, None)

    def _send_snapshot(self, reply_shard: int) -> None:
        """This worker's clients to ``reply_shard``, in parts bounded in bytes.

        A part that cannot be published (a high-water mark, the rate limit)
        is counted and logged: the receiver's count then disagrees with our
        heartbeat and it asks again.
        """
        topic = bus.shard_topic(reply_shard)
        rows: list[list[Any]] = []
        size = 0
        part = 0
        clients = list(self.hub.clients.values())
        for index, client in enumerate(clients):
            path = client.request.path
            rows.append([client.id, path, client.connected_at])
            size += len(client.id) + len(path) + 16
            last = index == len(clients) - 1
            if size >= bus.SNAPSHOT_PART_BYTES or last:
                if not self._publish(topic, Kind.SNAPSHOT, rows, part, last):
                    self._snapshot_failed(reply_shard, part)
                    return
                rows, size, part = [], 0, part + 1
        if not clients and not self._publish(topic, Kind.SNAPSHOT, [], 0, True):
            self._snapshot_failed(reply_shard, 0)

    def _snapshot_failed(self, reply_shard: int, part: int) -> None:
        self.counters["snapshot_failures"] += 1
        logger.warning(
            "snapshot for worker %d: part %d not published (counted as snapshot_failures)",
            reply_shard,
            part,
        )

    def _on_heartbeat(self, origin: int, generation: str, fields: list[Any]) -> None:
        pid, clients, stats = fields
        pid, clients = int(pid), int(clients)  # a malformed one must not touch the peer
        peer = self._peer(origin, generation)
        peer.pid = pid
        peer.clients = clients
        peer.stats = stats if isinstance(stats, dict) else {}
        peer.last_heartbeat = time.monotonic()
        if self._shard_counts.get(origin, 0) != peer.clients:
            peer.mismatches += 1
            if peer.mismatches >= 2:
                peer.mismatches = 0
                self._publish(bus.shard_topic(origin), Kind.SNAPSHOT_REQ, self.shard)
        else:
            peer.mismatches = 0

    async def _heartbeat_forever(self) -> None:
        # announce, then ask everyone for their clients (again shortly after:
        # subscriptions take a moment to reach the broker)
        self._publish(bus.TOPIC_DIRECTORY, Kind.HELLO)
        for delay in (0.05, 0.3):
            await asyncio.sleep(delay)
            self._publish(bus.TOPIC_DIRECTORY, Kind.SNAPSHOT_REQ, self.shard)
        while True:
            self._publish(
                bus.TOPIC_DIRECTORY,
                Kind.HEARTBEAT,
                os.getpid(),
                self.hub.count,
                {"bus": dict(self.counters), "server": dict(self.hub.stats)},
            )
            now = time.monotonic()
            for shard, peer in list(self.peers.items()):
                if now - peer.last_heartbeat > self.peer_timeout:
                    logger.warning(
                        "worker %d silent for %.1fs: forgetting it", shard, self.peer_timeout
                    )
                    del self.peers[shard]
                    self._purge(shard)
                    self._forget_sequences(shard, peer.generation)
            await asyncio.sleep(self.heartbeat_interval)


def _check_bytes(value: Any) -> None:
    if not isinstance(value, bytes):
        raise BusError("frame field must be bytes")
