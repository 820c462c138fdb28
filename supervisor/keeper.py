"""The keeper of room history on the embedded bus: a thread of the broker process.

Supervisor layer (layer 4). The broker process outlives every worker (a
worker killed with SIGKILL, replaced by a reload, restarted): the history of
the rooms that keep one lives here, in a :class:`~enjent.server.history.HistoryStore`
with the rules the app set (``server.keep_history``) when the supervisor
started. It is the one sequencer of those rooms:

- a ``PUBLISH`` envelope (on topic ``Q``: from a worker, a ``Publisher``, the
  HTTP API) gives each room with history its next offset, stored, and the
  keeper publishes it as ``LOGGED`` on the room's topic; rooms without
  history in the same publication get one ``ROOM`` envelope from here;
- a ``REPLAY_REQ`` is answered with ``REPLAY`` on the room's topic: the room's
  position and what the client missed. Being the only sender of both on that
  topic, the keeper's order is the order every worker sees (ZeroMQ keeps one
  sender's order through the proxy): what the replay covers arrived before
  it, what it does not comes after it. No gap and no duplicate at the seam.
- once a second, TTL eviction and, when they changed (else every 30 s), a
  ``KEEPER`` envelope with its figures; none when no room keeps history.

Costs: one more hop (inproc) for a publication to a room with history, and
the store's memory in the broker process (bounded by the rules' global bound).
If the broker process itself dies, the history is gone: the supervisor starts
a new one, whose rooms have new epochs (clients are told ``recovered=False``).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import zmq

from enjent.cluster import bus
from enjent.cluster.bus import BROKER_ORIGIN, Kind
from enjent.exceptions import BusError
from enjent.protocol import OutgoingMessage
from enjent.server.history import HistoryRules, HistoryStore, parse_since
from enjent.server.logs import RepeatedLog

__all__ = ["Keeper", "keeper_loop"]

logger = logging.getLogger("enjent.keeper")

#: The most rooms one publication may name, and the longest name taken (bytes).
MAX_NAMES = 256
MAX_NAME_BYTES = 4096
#: Seconds between two reports of unchanged figures (changed ones: within a second).
REPORT_INTERVAL = 30.0
#: The largest replay envelope sent (a replay over it says recovered=False).
MAX_REPLAY_BODY = bus.MAX_BODY - 64 * 1024


class Keeper:
    """Turns envelopes for the keeper into envelopes for the workers (no I/O here)."""

    def __init__(self, rules: HistoryRules) -> None:
        self.store = HistoryStore(rules)
        self.rules = rules
        self.generation = secrets.token_hex(4)
        self._seq: dict[bytes, int] = {}
        self._message_id = 0
        self.malformed = 0
        self._reported: dict[str, int] = {}
        self._malformed_log = RepeatedLog(logger, logging.WARNING)

    def _envelope(self, topic: bytes, kind: Kind, *fields: Any) -> tuple[bytes, bytes]:
        seq = self._seq.get(topic, 0) + 1
        if len(self._seq) > 100_000 and topic not in self._seq:
            self._seq.clear()  # bounded: receivers see a reset, not a gap
        self._seq[topic] = seq
        return topic, bus.encode(kind, BROKER_ORIGIN, self.generation, seq, *fields)

    def handle(self, body: bytes) -> list[tuple[bytes, bytes]]:
        """The envelopes to publish for one envelope received on ``Q``."""
        try:
            kind, _origin, _generation, _seq, fields = bus.decode(body)
            if kind is Kind.PUBLISH:
                return self._publish(*fields)
            if kind is Kind.REPLAY_REQ:
                return self._replay(*fields)
            raise BusError(f"{kind.name} envelope sent to the keeper")
        except (BusError, TypeError, ValueError, OverflowError) as exc:
            self.malformed += 1
            self._malformed_log("dropped a malformed envelope for the keeper: %s", exc)
        except Exception:  # never the end of the keeper
            self.malformed += 1
            logger.exception("error handling an envelope for the keeper")
        return []

    def _publish(
        self, names: Any, data: Any, exclude_id: Any, _message_id: Any
    ) -> list[tuple[bytes, bytes]]:
        if not isinstance(names, list) or not 0 < len(names) <= MAX_NAMES:
            raise BusError("PUBLISH envelope: names must be a list of 1 to 256 rooms")
        for name in names:
            if not isinstance(name, str) or not name or len(name) > MAX_NAME_BYTES:
                raise BusError("PUBLISH envelope: a room name must be a short str")
        if not isinstance(data, str | bytes):
            raise BusError("PUBLISH envelope: data must be str or bytes")
        if exclude_id is not None and not isinstance(exclude_id, str):
            raise BusError("PUBLISH envelope: exclude must be a client id or nil")
        names = list(dict.fromkeys(names))
        logged, others = self.rules.split(names) if self.rules else ([], names)
        out = []
        for name in logged:
            publication = self.store.append(name, data)
            if publication is not None:
                out.append(
                    self._envelope(
                        bus.room_topic(name),
                        Kind.LOGGED,
                        name,
                        publication.epoch,
                        publication.offset,
                        data,
                        exclude_id,
                    )
                )
        if others:
            frame = OutgoingMessage.of(data).frame
            self._message_id += 1
            for name in others:
                out.append(
                    self._envelope(
                        bus.room_topic(name),
                        Kind.ROOM,
                        others,
                        frame,
                        exclude_id,
                        self._message_id,
                    )
                )
        return out

    def _replay(
        self,
        request_id: Any,
        reply_shard: Any,
        reply_generation: Any,
        room: Any,
        epoch: Any,
        offset: Any,
    ) -> list[tuple[bytes, bytes]]:
        if not isinstance(room, str) or not room or len(room) > MAX_NAME_BYTES:
            raise BusError("REPLAY_REQ envelope: bad room")
        if not isinstance(request_id, int) or not isinstance(reply_shard, int):
            raise BusError("REPLAY_REQ envelope: bad request id or shard")
        if not isinstance(reply_generation, str):
            raise BusError("REPLAY_REQ envelope: bad generation")
        topic = bus.room_topic(room)
        head = (request_id, reply_shard, reply_generation, room)
        if self.rules.settings_of(room) is None:
            return [self._envelope(topic, Kind.REPLAY, *head, None, 0, None, [])]
        since = None if epoch is None and offset is None else parse_since((epoch, offset))
        joined, missed = self.store.recover(room, since)
        items = [[publication.offset, publication.data] for publication in missed]
        reply = self._envelope(
            topic, Kind.REPLAY, *head, joined.epoch, joined.offset, joined.recovered, items
        )
        if len(reply[1]) > MAX_REPLAY_BODY:  # too much to carry: the client starts afresh
            reply = self._envelope(
                topic, Kind.REPLAY, *head, joined.epoch, joined.offset, False, []
            )
        return [reply]

    def report(self, *, force: bool = True) -> tuple[bytes, bytes] | None:
        """The ``KEEPER`` envelope with this store's figures (after TTL eviction);
        ``None`` when they did not change since the last one and ``force`` is false."""
        self.store.expire()
        figures = {**self.store.figures(), "malformed": self.malformed}
        if not force and figures == self._reported:
            return None
        self._reported = figures
        return self._envelope(bus.TOPIC_HEARTBEAT, Kind.KEEPER, figures)


def keeper_loop(
    context: zmq.Context[zmq.Socket[bytes]], rules: HistoryRules, inbound: str, outbound: str
) -> None:
    """Serve the keeper until the context is terminated (the broker's end).

    ``outbound``: the broker's XPUB (subscribed to ``Q``); ``inbound``: its XSUB.
    """
    keeper = Keeper(rules)
    sub = context.socket(zmq.SUB)
    pub = context.socket(zmq.PUB)
    for sock in (sub, pub):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
    try:
        sub.connect(outbound)
        sub.setsockopt(zmq.SUBSCRIBE, bus.TOPIC_KEEPER)
        pub.connect(inbound)
        checked_at = reported_at = time.monotonic()
        while True:
            if sub.poll(1000):
                for _ in range(1024):  # a batch, then the report if due
                    try:
                        topic, body = sub.recv_multipart(zmq.NOBLOCK)[:2]
                    except zmq.Again:
                        break
                    except ValueError:
                        continue  # not [topic, body]
                    if topic == bus.TOPIC_KEEPER:
                        for envelope in keeper.handle(body):
                            pub.send_multipart(envelope)
            now = time.monotonic()
            if rules and now - checked_at >= 1.0:  # figures when they change, else twice a minute
                checked_at = now
                report = keeper.report(force=now - reported_at >= REPORT_INTERVAL)
                if report is not None:
                    reported_at = now
                    pub.send_multipart(report)
    except zmq.ContextTerminated:
        pass
    except zmq.ZMQError as exc:  # pragma: no cover - only on context teardown
        logger.debug("keeper ended: %s", exc)
    finally:
        sub.close()
        pub.close()
