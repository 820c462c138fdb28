"""The cluster bus wire format: topics and msgpack envelopes, in one place.

Cluster layer (layer 3 of docs/architecture.md). Every bus message is a ZeroMQ
multipart ``[topic, body]`` published by a worker (or the broker) to the
broker's XSUB socket and fanned out by its XPUB socket to the subscribers
whose subscription is a prefix of ``topic``.

Topics (short byte prefixes, so ZeroMQ filters upstream):

=====================  ==================================================
``A``                  all workers: global broadcasts
``C``                  all workers: presence queries (publishers may ask too)
``H``                  all workers: liveness (heartbeats, ``HELLO``, ``DEAD``),
                       published by workers and the broker only
``S<shard>.``          one worker: sends to one of its clients, answers
``R<digest>``          the workers with members in a room
``Q``                  the keeper of room history (in the broker process):
                       publications to rooms with history, recovery requests
=====================  ==================================================

Body: ``msgpack([kind, origin, generation, seq, *fields])`` where ``origin``
is the publisher's shard (``-1`` for the broker), ``generation`` a random
string per process start, and ``seq`` increases by one per message the
publisher sends *on that topic*: a receiver that sees seq jump on a topic
counts a gap (a message lost, e.g. to a high-water mark), never silently.

Nothing is published when a client connects or disconnects: a client id
names its owner, counts travel in heartbeats and presence is a query, so
the bus traffic of a client event does not grow with the number of workers.

Kinds and their fields:

==================  ============================================================
``BROADCAST``       ``frame, exclude_id|None``: write ``frame`` to every client
``ROOM``            ``names, frame, exclude_id|None, message_id``: write once to
                    each member of any of ``names`` (published on each room's
                    topic; ``message_id`` de-duplicates the copies)
``SEND``            ``client_id, frame``: write to one client
``CLOSE``           ``client_id, code, reason``: close one client
``HEARTBEAT``       ``pid, client_count, stats``: once a second per worker
``HELLO``           (none): a worker (re)started with a new generation
``DEAD``            ``shard, pid, planned``: from the broker, for the supervisor:
                    the worker process ended (its count is dropped); ``planned``
                    when the supervisor stopped it (a reload, one worker fewer)
``PRESENCE_REQ``    ``query_id, reply_shard, reply_generation, room|None,
                    limit``: send me your clients (of ``room``), at most ``limit``
``PRESENCE``        ``query_id, reply_generation, rows, total, last``: one part of
                    an answer, on the asker's ``S<shard>.``: rows
                    ``[client_id, path, connected_at]`` of at most
                    :data:`PART_BYTES`; ``total`` (on the last part) counts
                    every match, rows or not
``PUBLISH``         ``names, data, exclude_id|None, message_id``, on ``Q``: a room
                    publication for the keeper (data as published, not a frame):
                    a room with history gets an offset (``LOGGED``), the others
                    a ``ROOM`` envelope from the keeper
``LOGGED``          ``room, epoch, offset, data, exclude_id|None``, from the keeper
                    on the room's topic: one publication with its position
``REPLAY_REQ``      ``request_id, reply_shard, reply_generation, room, epoch|None,
                    offset|None``, on ``Q``: the room's position, and what a client
                    at ``epoch:offset`` missed
``REPLAY``          ``request_id, reply_shard, reply_generation, room, epoch, offset,
                    recovered|None, [[offset, data], ...]``, from the keeper on the
                    room's topic, so that it arrives after every ``LOGGED`` it
                    covers and before every one it does not (one sender, one order)
``KEEPER``          ``figures``, from the keeper on ``H`` once a second: its store's
                    figures for ``/metrics``
==================  ============================================================

Only msgpack crosses the bus (never pickle), unpacked with size limits:
a body over :data:`MAX_BODY` bytes, or one that is not a list of the right
shape, is counted as malformed and dropped.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

import msgpack

from ..exceptions import BusError

__all__ = [
    "MAX_BODY",
    "PART_BYTES",
    "TOPIC_ALL",
    "TOPIC_CONTROL",
    "TOPIC_HEARTBEAT",
    "TOPIC_KEEPER",
    "Kind",
    "decode",
    "encode",
    "room_topic",
    "shard_topic",
]

#: The largest envelope body accepted (a frame of 16 MiB plus headroom).
MAX_BODY = 17 * 1024 * 1024
#: The most bytes of client rows in one PRESENCE part (far under MAX_BODY).
PART_BYTES = 1024 * 1024

TOPIC_ALL = b"A"
TOPIC_CONTROL = b"C"
TOPIC_HEARTBEAT = b"H"
TOPIC_KEEPER = b"Q"

#: The largest sequence number accepted (a counter that never reaches it honestly).
MAX_SEQ = (1 << 53) - 1
#: Origins are shards (>= 0), the broker (-1) or publishers (below -1), within this range.
MIN_ORIGIN = -(1 << 31)
MAX_ORIGIN = (1 << 31) - 1
#: The longest generation string accepted.
MAX_GENERATION = 32

#: Shard of messages the broker publishes on the supervisor's behalf.
BROKER_ORIGIN = -1


class Kind(enum.IntEnum):
    """Envelope kinds; see the module docstring for their fields."""

    BROADCAST = 1
    ROOM = 2
    SEND = 3
    CLOSE = 4
    # 10, 11, 14 and 15 were the directory's (CONNECT, DISCONNECT, SNAPSHOT_REQ,
    # SNAPSHOT): never reused, so that an old worker's envelope is refused
    HEARTBEAT = 12
    HELLO = 13
    DEAD = 16
    PRESENCE_REQ = 17
    PRESENCE = 18
    PUBLISH = 19
    LOGGED = 20
    REPLAY_REQ = 21
    REPLAY = 22
    KEEPER = 23


#: The number of fields after the header, per kind (shape check on decode).
_FIELD_COUNTS = {
    Kind.BROADCAST: 2,
    Kind.ROOM: 4,
    Kind.SEND: 2,
    Kind.CLOSE: 3,
    Kind.HEARTBEAT: 3,
    Kind.HELLO: 0,
    Kind.DEAD: 3,
    Kind.PRESENCE_REQ: 5,
    Kind.PRESENCE: 5,
    Kind.PUBLISH: 4,
    Kind.LOGGED: 5,
    Kind.REPLAY_REQ: 6,
    Kind.REPLAY: 8,
    Kind.KEEPER: 1,
}


def shard_topic(shard: int) -> bytes:
    """The topic of one worker (``S3.``: the dot keeps ``S1`` from matching ``S10``)."""
    return b"S%d." % shard


def room_topic(name: str) -> bytes:
    """The topic of a room: a fixed-size digest of its name (17 bytes, whatever the name).

    Subscription tables (the broker's, each worker's) never grow with the
    name, and every topic has the same length, so that no room's topic is a
    prefix of another's. The envelope still carries the names: a receiver
    delivers by name, so a digest collision could at worst cost a message
    sent in vain, never one delivered to the wrong room.
    """
    return b"R" + hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()


def encode(kind: Kind, origin: int, generation: str, seq: int, *fields: Any) -> bytes:
    """Pack one envelope body."""
    return msgpack.packb([int(kind), origin, generation, seq, *fields], use_bin_type=True)  # type: ignore[no-any-return]


def decode(body: bytes) -> tuple[Kind, int, str, int, list[Any]]:
    """Unpack and check one envelope body; raise :class:`BusError` if malformed."""
    if len(body) > MAX_BODY:
        raise BusError(f"envelope of {len(body)} bytes is over the limit of {MAX_BODY}")
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise BusError(f"envelope is not msgpack: {exc}") from None
    if not isinstance(value, list) or len(value) < 4:
        raise BusError("envelope is not a list [kind, origin, generation, seq, ...]")
    kind_value, origin, generation, seq = value[:4]
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise BusError(f"unknown envelope kind {kind_value!r}") from None
    if not isinstance(origin, int) or not isinstance(generation, str) or not isinstance(seq, int):
        raise BusError("malformed envelope header")
    if not MIN_ORIGIN <= origin <= MAX_ORIGIN:
        raise BusError("envelope origin out of range")
    if not 0 <= seq <= MAX_SEQ or not 0 < len(generation) <= MAX_GENERATION:
        raise BusError("envelope sequence number or generation out of range")
    fields = value[4:]
    if len(fields) != _FIELD_COUNTS[kind]:
        raise BusError(f"{kind.name} envelope has {len(fields)} fields")
    return kind, origin, generation, seq, fields
