"""The ZeroMQ engine: the workers of one host as one logical server.

Cluster layer (layer 3 of docs/architecture.md). A :class:`ClusterClient` is
plugged into a :class:`~enjent.WebSocketServer` (``server.attach_peers()``)
in each worker process, after fork: one PUB socket to the broker's XSUB,
one SUB socket to its XPUB, both created in this process. What it publishes
and how it delivers, counts and answers is :class:`~enjent.cluster.engine.BusEngine`'s;
this module only carries the bytes. The wire format is in
:mod:`enjent.cluster.bus`.

Liveness: a worker's death is announced by the supervisor that watches it
(the broker publishes ``DEAD``); a peer whose heartbeats are late is only
marked late, so a worker busy with a burst is never mistaken for a dead one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import zmq

from . import bus
from .engine import BusEngine, RemoteClient

if TYPE_CHECKING:
    from ..server.hub import Hub

__all__ = ["ClusterClient", "RemoteClient"]

logger = logging.getLogger("enjent.cluster")

#: Most envelopes handled per event-loop callback, so one busy bus cannot
#: starve the clients' sockets.
_RECEIVE_BATCH = 512


class ClusterClient(BusEngine):
    """One worker's connection to the ZeroMQ broker.

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
        super().__init__(
            hub,
            shard=shard,
            max_publish_rate=max_publish_rate,
            heartbeat_interval=heartbeat_interval,
            peer_timeout=peer_timeout,
        )
        self.publish_endpoint = publish_endpoint
        self.subscribe_endpoint = subscribe_endpoint
        self.high_water_mark = high_water_mark
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._sub: zmq.Socket[bytes] | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the sockets (in this process), subscribe, announce this worker."""
        loop = asyncio.get_running_loop()
        self._loop = loop
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
        for topic in self.topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._context, self._pub, self._sub = context, pub, sub
        self._fd = int(sub.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._on_readable)
        self._start_heartbeats()
        loop.call_soon(self._on_readable)

    async def close(self) -> None:
        """Stop the heartbeat and close the sockets (pending messages get 0.5 s)."""
        await self._stop_heartbeats()
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

    # ----------------------------------------------------------- transport

    def _send(self, topic: bytes, body: bytes) -> bool:
        pub = self._pub
        if pub is None:
            return False
        try:
            pub.send_multipart((topic, body), flags=zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.Again:
            return False
        return True

    def _subscribe(self, topic: bytes) -> None:
        if self._sub is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
            self._wake()

    def _unsubscribe(self, topic: bytes) -> None:
        if self._sub is not None:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self._wake()

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        sub = self._sub
        if sub is None:
            return
        hub = self.hub
        budget_end = self.delivery_budget_end()
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
            if len(parts) != 2:
                self.counters["received"] += 1
                self.counters["malformed"] += 1
                continue
            self.receive(parts[0], parts[1])
        if self._sub is not None and int(self._sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)
