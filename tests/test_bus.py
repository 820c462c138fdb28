"""The bus wire format (enjent/bus.py) and a worker's receive path (enjent/cluster.py).

The receive path is fed directly: a stand-in SUB socket hands envelopes to
``ClusterClient._on_readable``, no broker and no other process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from typing import Any

import msgpack
import pytest
import zmq

from enjent.cluster import ClusterClient, bus
from enjent.cluster.bus import Kind
from enjent.cluster.zeromq import shard_of
from enjent.exceptions import BusError
from enjent.protocol import OutgoingMessage
from enjent.server.ids import ClientIds

# ------------------------------------------------------------ wire format


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (Kind.BROADCAST, [b"\x81\x02hi", None]),
        (Kind.BROADCAST, [b"\x81\x02hi", "0-abc-1"]),
        (Kind.ROOM, [["a", "b"], b"\x82\x01x", None, 7]),
        (Kind.SEND, ["1-abc-2", b"\x81\x00"]),
        (Kind.CLOSE, ["1-abc-2", 1000, "bye"]),
        (Kind.CONNECT, ["0-abc-1", "/chat", 1700000000.5]),
        (Kind.DISCONNECT, ["0-abc-1"]),
        (Kind.HEARTBEAT, [1234, 10, {"sent": 1, "gaps": 0}]),
        (Kind.HELLO, []),
        (Kind.SNAPSHOT_REQ, [3]),
        (Kind.SNAPSHOT, [[["0-abc-1", "/", 1.5], ["0-abc-2", "/x", 2.5]], 0, True]),
        (Kind.DEAD, [1, 4321]),
    ],
)
def test_round_trip(kind: Kind, fields: list[Any]) -> None:
    body = bus.encode(kind, 2, "a1b2c3", 42, *fields)
    assert isinstance(body, bytes)
    assert bus.decode(body) == (kind, 2, "a1b2c3", 42, fields)


def test_round_trip_keeps_bytes_and_str_apart() -> None:
    kind, _, _, _, fields = bus.decode(bus.encode(Kind.SEND, 0, "g", 1, "id", b"bytes"))
    assert kind is Kind.SEND
    assert type(fields[0]) is str and type(fields[1]) is bytes


def test_broker_origin_round_trips() -> None:
    body = bus.encode(Kind.DEAD, bus.BROKER_ORIGIN, "b", 1, 0, 99)
    assert bus.decode(body)[1] == -1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x94\x01\x00", id="truncated"),
        pytest.param(b"\x93\x01\x00\xa1g\x01", id="extra-data"),
    ],
)
def test_not_msgpack(body: bytes) -> None:
    with pytest.raises(BusError):
        bus.decode(body)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"kind": 1}, id="map"),
        pytest.param("text", id="str"),
        pytest.param(17, id="int"),
        pytest.param([1, 0, "g"], id="short-list"),
        pytest.param([1, "0", "g", 1, b"f", None], id="origin-not-int"),
        pytest.param([1, 0, b"g", 1, b"f", None], id="generation-not-str"),
        pytest.param([1, 0, "g", "1", b"f", None], id="seq-not-int"),
        pytest.param([1, 0, "g", 1, b"f"], id="missing-field"),
        pytest.param([1, 0, "g", 1, b"f", None, 3], id="extra-field"),
        pytest.param([13, 0, "g", 1, "x"], id="hello-with-field"),
    ],
)
def test_wrong_shape(value: Any) -> None:
    with pytest.raises(BusError):
        bus.decode(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("kind", [0, 5, 99, -1, "BROADCAST", None])
def test_unknown_kind(kind: Any) -> None:
    with pytest.raises(BusError, match="kind"):
        bus.decode(msgpack.packb([kind, 0, "g", 1, b"f", None], use_bin_type=True))


def test_oversize_body() -> None:
    body = msgpack.packb([1, 0, "g", 1, b"x" * bus.MAX_BODY, None], use_bin_type=True)
    assert len(body) > bus.MAX_BODY
    with pytest.raises(BusError, match="limit"):
        bus.decode(body)


def test_decode_never_raises_anything_but_bus_error() -> None:
    rng = random.Random(6455)
    good = bus.encode(Kind.CONNECT, 1, "gen", 5, "1-gen-1", "/", 1.0)
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randint(0, len(data))])
        for body in (bytes(data), cut):
            with contextlib.suppress(BusError):
                bus.decode(body)


def test_topics_are_prefix_free() -> None:
    assert bus.shard_topic(1) != bus.shard_topic(10)
    assert not bus.shard_topic(10).startswith(bus.shard_topic(1))
    assert not bus.shard_topic(1).startswith(bus.shard_topic(10))
    assert not bus.room_topic("ab").startswith(bus.room_topic("a"))
    assert not bus.room_topic("a").startswith(bus.room_topic("ab"))
    topics = [bus.TOPIC_ALL, bus.TOPIC_DIRECTORY, bus.shard_topic(0), bus.room_topic("A")]
    topics += [bus.shard_topic(n) for n in (1, 2, 11, 111)]
    topics += [bus.room_topic(name) for name in ("a", "ab", "S1.", "é", "")]
    for one in topics:
        for other in topics:
            if one != other:
                assert not other.startswith(one), (one, other)


def test_room_topic_is_a_fixed_size_digest_of_the_name() -> None:
    """Subscription tables never grow with the name; no topic is a prefix of another."""
    names = ["café", "a", "ab", "x" * 100_000, "lobby"]
    topics = [bus.room_topic(name) for name in names]
    assert {len(topic) for topic in topics} == {17}
    assert len(set(topics)) == len(names)
    assert all(topic.startswith(b"R") for topic in topics)
    assert bus.room_topic("café") == bus.room_topic("café")


def test_shard_of() -> None:
    assert shard_of("0-abc-1") == 0
    assert shard_of("12-abc-ff") == 12
    assert shard_of("abc") is None
    assert shard_of("x-abc-1") is None
    assert shard_of("-1-abc") is None


# ------------------------------------------------------------ receive path


class FakeSub:
    """Stands for the SUB socket: hands out queued multipart messages."""

    def __init__(self) -> None:
        self.queue: collections.deque[list[bytes]] = collections.deque()
        self.subscriptions: list[bytes] = []

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.queue:
            raise zmq.Again()
        return self.queue.popleft()

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.queue else 0

    def setsockopt(self, option: int, value: bytes) -> None:
        self.subscriptions.append(value)


class FakeHub:
    """The part of the hub's interface that the receive path uses."""

    def __init__(self) -> None:
        self.ids = ClientIds(0)
        self.ids.generation = "self00"
        self.clients: dict[str, Any] = {}
        self.stats: dict[str, int] = {}
        self.written: list[bytes] = []
        self.deliveries = 0

    @property
    def count(self) -> int:
        return len(self.clients)

    def get(self, client_id: str) -> Any:
        return self.clients.get(client_id)

    def write_all(self, clients: Any, message: OutgoingMessage, exclude: Any) -> int:
        self.written.append(bytes(message.frame))
        return 0

    def deliver_rooms(self, names: Any, message: OutgoingMessage, exclude: Any) -> int:
        self.written.append(bytes(message.frame))
        return 0


def make_client() -> tuple[ClusterClient, FakeSub, FakeHub]:
    server = FakeHub()
    cluster = ClusterClient(
        server,  # type: ignore[arg-type]
        shard=0,
        publish_endpoint="ipc:///nonexistent/in",
        subscribe_endpoint="ipc:///nonexistent/out",
    )
    sub = FakeSub()
    cluster._sub = sub  # type: ignore[assignment]
    return cluster, sub, server


def feed(cluster: ClusterClient, sub: FakeSub, *messages: list[bytes]) -> None:
    sub.queue.extend(messages)

    async def run() -> None:
        cluster._loop = asyncio.get_running_loop()
        cluster._on_readable()
        for _ in range(10):  # _on_readable reschedules itself while POLLIN
            await asyncio.sleep(0)

    asyncio.run(run())


def broadcast(seq: int, origin: int = 1, generation: str = "peer01") -> list[bytes]:
    return [bus.TOPIC_ALL, bus.encode(Kind.BROADCAST, origin, generation, seq, b"\x81\x01x", None)]


def test_garbage_is_counted_and_dropped_not_fatal() -> None:
    cluster, sub, server = make_client()
    feed(
        cluster,
        sub,
        [bus.TOPIC_ALL, b"not msgpack \xc1"],
        [bus.TOPIC_ALL, msgpack.packb({"a": 1})],
        [bus.TOPIC_ALL, msgpack.packb([99, 1, "g", 1])],
        [bus.TOPIC_ALL, bus.encode(Kind.BROADCAST, 1, "g", 1, "a str, not bytes", None)],
        [
            bus.TOPIC_DIRECTORY,
            bus.encode(Kind.SNAPSHOT, 1, "g", 1, "not a list of triples", 0, True),
        ],
        [bus.TOPIC_ALL],  # one part
        [bus.TOPIC_ALL, b"", b""],  # three parts
        broadcast(1),
    )
    assert cluster.counters["received"] == 8
    assert cluster.counters["malformed"] == 7
    assert server.written == [b"\x81\x01x"]  # the good one after the garbage still arrives
    assert cluster.counters["gaps"] == 0


def test_sequence_jump_is_counted_as_gap() -> None:
    cluster, sub, server = make_client()
    feed(cluster, sub, broadcast(1), broadcast(2), broadcast(5), broadcast(6))
    assert cluster.counters["gaps"] == 2
    assert len(server.written) == 4
    # per publisher: another origin, or a restarted one (new generation), starts afresh
    feed(cluster, sub, broadcast(1, origin=2), broadcast(100, generation="peer02"))
    assert cluster.counters["gaps"] == 2
    feed(cluster, sub, broadcast(8))
    assert cluster.counters["gaps"] == 3


def test_sequence_is_per_topic() -> None:
    cluster, sub, _ = make_client()
    directory = [
        bus.TOPIC_DIRECTORY,
        bus.encode(Kind.CONNECT, 1, "peer01", 1, "1-peer01-1", "/", 1.0),
    ]
    feed(cluster, sub, broadcast(1), directory, broadcast(2))
    assert cluster.counters["gaps"] == 0
    assert cluster.client_count() == 1


def test_own_messages_are_ignored() -> None:
    cluster, sub, server = make_client()
    feed(cluster, sub, broadcast(1, origin=0, generation="self00"))
    assert server.written == []
    assert cluster.counters["received"] == 1


def test_directory_events_and_dead_shard_purge() -> None:
    cluster, sub, _ = make_client()

    def directory(kind: Kind, seq: int, *fields: Any, origin: int = 1, gen: str = "p1") -> list:
        return [bus.TOPIC_DIRECTORY, bus.encode(kind, origin, gen, seq, *fields)]

    feed(
        cluster,
        sub,
        directory(Kind.HEARTBEAT, 1, 777, 0, {}),
        directory(Kind.CONNECT, 2, "1-p1-1", "/", 1.0),
        directory(Kind.CONNECT, 3, "1-p1-2", "/", 1.0),
        directory(Kind.CONNECT, 1, "2-p2-1", "/", 1.0, origin=2, gen="p2"),
        directory(Kind.DISCONNECT, 4, "1-p1-1"),
    )
    assert sorted(cluster.directory) == ["1-p1-2", "2-p2-1"]
    assert cluster.get_client("1-p1-2") is not None
    assert cluster.get_client("1-p1-1") is None
    # the broker announces that worker 1 (pid 777) died: its clients go
    dead = [bus.TOPIC_DIRECTORY, bus.encode(Kind.DEAD, bus.BROKER_ORIGIN, "b", 1, 1, 777)]
    feed(cluster, sub, dead)
    assert sorted(cluster.directory) == ["2-p2-1"]
    assert 1 not in cluster.peers
    assert cluster.counters["malformed"] == 0


def test_dead_shard_never_heard_of_is_purged() -> None:
    """A worker that dies before its first heartbeat still has its clients purged."""
    cluster, sub, _ = make_client()
    connect = bus.encode(Kind.CONNECT, 1, "p1", 1, "1-p1-1", "/", 1.0)
    dead = bus.encode(Kind.DEAD, bus.BROKER_ORIGIN, "b", 1, 1, 777)
    feed(cluster, sub, [bus.TOPIC_DIRECTORY, connect], [bus.TOPIC_DIRECTORY, dead])
    assert cluster.directory == {}


def test_new_generation_of_a_shard_purges_the_old_one() -> None:
    cluster, sub, _ = make_client()
    old = bus.encode(Kind.HEARTBEAT, 1, "old", 1, 5, 1, {})
    connect = bus.encode(Kind.CONNECT, 1, "old", 2, "1-old-1", "/", 1.0)
    hello = bus.encode(Kind.HELLO, 1, "new", 1)
    feed(cluster, sub, [bus.TOPIC_DIRECTORY, old], [bus.TOPIC_DIRECTORY, connect])
    assert cluster.client_count() == 1
    feed(cluster, sub, [bus.TOPIC_DIRECTORY, hello])
    assert cluster.client_count() == 0
    assert cluster.peers[1].generation == "new"


def test_a_large_snapshot_goes_in_bounded_parts_and_arrives_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2,200 clients with 8 KiB paths (17 MiB, over MAX_BODY in one message): in parts."""
    from types import SimpleNamespace

    sender, _, hub = make_client()
    for index in range(2200):
        request = SimpleNamespace(path="/" + "p" * 8191)
        client_id = f"0-self00-{index:x}"
        hub.clients[client_id] = SimpleNamespace(id=client_id, request=request, connected_at=1.0)
    published: list[tuple[bytes, list[Any]]] = []

    def publish(topic: bytes, kind: Kind, *fields: Any) -> bool:
        published.append((topic, [int(kind), *fields]))
        return True

    sender._publish = publish  # type: ignore[method-assign]
    sender._send_snapshot(1)
    bodies = [bus.encode(Kind(fields[0]), 0, "self00", seq, *fields[1:])
              for seq, (_, fields) in enumerate(published, 1)]  # fmt: skip
    assert len(bodies) >= 17 and all(len(body) < bus.MAX_BODY // 8 for body in bodies)
    assert [fields[-1] for _, fields in published] == [False] * (len(published) - 1) + [True]

    receiver, sub, _ = make_client()
    receiver.shard = 1
    feed(receiver, sub, *[[bus.shard_topic(1), body] for body in bodies])
    assert receiver.client_count() == 2200
    assert receiver.counters["malformed"] == 0

    failing, _, failing_hub = make_client()
    failing_hub.clients.update(hub.clients)
    failing._publish = lambda *args: False  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="enjent.cluster"):
        failing._send_snapshot(1)
    assert failing.counters["snapshot_failures"] == 1
    assert "snapshot_failures" in caplog.text
