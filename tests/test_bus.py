"""The bus wire format (enjent/cluster/bus.py) and a worker's engine (enjent/cluster/engine.py).

The receive path is fed directly: a stand-in SUB socket hands envelopes to
``ClusterClient._on_readable``, no broker and no other process. Presence
queries run between engines joined by an in-memory bus (``MemoryBus``).
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

from enjent.cluster import BusEngine, ClusterClient, bus
from enjent.cluster.bus import Kind
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
        (Kind.HEARTBEAT, [1234, 10, {"sent": 1, "gaps": 0}]),
        (Kind.HELLO, []),
        (Kind.DEAD, [1, 4321, False]),
        (Kind.PRESENCE_REQ, [7, 3, "abc", None, 1000]),
        (Kind.PRESENCE_REQ, [7, 3, "abc", "lobby", 0]),
        (Kind.PRESENCE, [7, "abc", [["0-abc-1", "/", 1.5], ["0-abc-2", "/x", 2.5]], 2, True]),
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
    body = bus.encode(Kind.DEAD, bus.BROKER_ORIGIN, "b", 1, 0, 99, False)
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


@pytest.mark.parametrize("kind", [0, 5, 10, 11, 14, 15, 99, -1, "BROADCAST", None])
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
    good = bus.encode(Kind.PRESENCE, 1, "gen", 5, 3, "gen", [["1-gen-1", "/", 1.0]], 1, True)
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
    topics = [bus.TOPIC_ALL, bus.TOPIC_CONTROL, bus.shard_topic(0), bus.room_topic("A")]
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
    shard_of = ClientIds.shard_of
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
        self.rooms: dict[str, set[Any]] = {}

    @property
    def count(self) -> int:
        return len(self.clients)

    def get(self, client_id: str) -> Any:
        return self.clients.get(client_id)

    def members(self, name: str) -> set[Any]:
        return self.rooms.get(name, set())

    def write_all(self, clients: Any, message: OutgoingMessage, exclude: Any) -> int:
        self.written.append(bytes(message.frame))
        return len([client for client in clients if client is not exclude])

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
            bus.TOPIC_CONTROL,
            bus.encode(Kind.PRESENCE_REQ, 1, "g", 1, 1, 1, "g", ["not a room name"], 10),
        ],
        [bus.TOPIC_CONTROL, bus.encode(Kind.HEARTBEAT, 1, "g", 2, "pid?", 3, {})],
        [bus.TOPIC_ALL],  # one part
        [bus.TOPIC_ALL, b"", b""],  # three parts
        broadcast(1),
    )
    assert cluster.counters["received"] == 9
    assert cluster.counters["malformed"] == 8
    assert server.written == [b"\x81\x01x"]  # the good one after the garbage still arrives
    assert cluster.counters["gaps"] == 0
    assert cluster.peers == {} or cluster.peers[1].clients == 0  # the bad heartbeat touched nothing


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


def control(kind: Kind, seq: int, *fields: Any, origin: int = 1, gen: str = "p1") -> list[bytes]:
    """An envelope on its own topic: liveness on ``H``, presence queries on ``C``."""
    topic = bus.TOPIC_CONTROL if kind is Kind.PRESENCE_REQ else bus.TOPIC_HEARTBEAT
    return [topic, bus.encode(kind, origin, gen, seq, *fields)]


def test_sequence_is_per_topic() -> None:
    cluster, sub, _ = make_client()
    feed(cluster, sub, broadcast(1), control(Kind.HEARTBEAT, 1, 7, 1, {}), broadcast(2))
    assert cluster.counters["gaps"] == 0
    assert cluster.client_count() == 1


def test_own_messages_are_ignored() -> None:
    cluster, sub, server = make_client()
    feed(cluster, sub, broadcast(1, origin=0, generation="self00"))
    assert server.written == []
    assert cluster.counters["received"] == 1


def test_counts_are_the_sum_of_the_heartbeats() -> None:
    cluster, sub, hub = make_client()
    hub.clients["0-self00-1"] = object()
    feed(
        cluster,
        sub,
        control(Kind.HEARTBEAT, 1, 777, 1500, {}),
        control(Kind.HEARTBEAT, 1, 778, 2500, {}, origin=2, gen="p2"),
    )
    assert cluster.client_count() == 4001
    assert cluster.health()["clients"] == 4001
    assert {w["shard"]: w["clients"] for w in cluster.health()["workers"]} == {
        0: 1,
        1: 1500,
        2: 2500,
    }
    # the next heartbeat replaces the figure, it does not add to it
    feed(cluster, sub, control(Kind.HEARTBEAT, 2, 777, 10, {}))
    assert cluster.client_count() == 2511


def test_nothing_is_published_per_client_event() -> None:
    cluster, _, _ = make_client()
    published: list[Kind] = []
    cluster._send = lambda topic, body: published.append(bus.decode(body)[0]) or True  # type: ignore[method-assign,func-returns-value]
    for _ in range(100):
        cluster.client_connected(object())
        cluster.client_disconnected(object())
    assert published == []
    assert cluster.counters["sent"] == 0
    # a burst of 20,000 (one long turn of the loop) still lets a heartbeat out
    # when one is due, and only then: never one message per client
    for _ in range(10_000):
        cluster.client_connected(object())
        cluster.client_disconnected(object())
    assert published == [Kind.HEARTBEAT]


def test_a_dead_worker_is_announced_by_the_supervisor_not_guessed() -> None:
    cluster, sub, _ = make_client()
    feed(cluster, sub, control(Kind.HEARTBEAT, 1, 777, 40, {}))
    # silent for longer than peer_timeout: marked late, still counted
    cluster.peers[1].last_heartbeat -= cluster.peer_timeout + 1
    cluster._checked_at -= 10  # our own loop stalled: no verdict until the bus is read
    cluster._check_peers()
    assert not cluster.peers[1].late
    cluster._check_peers()
    assert cluster.peers[1].late and cluster.client_count() == 40
    assert cluster.health()["workers"][1]["late"] is True
    assert cluster.counters["late_peers"] == 1
    cluster._check_peers()
    assert cluster.counters["late_peers"] == 1  # one mark per episode
    feed(cluster, sub, control(Kind.HEARTBEAT, 2, 777, 40, {}))
    assert not cluster.peers[1].late
    # a DEAD for another pid (an older process of that shard) changes nothing
    feed(cluster, sub, [bus.TOPIC_HEARTBEAT, bus.encode(Kind.DEAD, -1, "b", 1, 1, 555, False)])
    assert cluster.client_count() == 40
    # the broker relays the supervisor's word: worker 1 (pid 777) died
    feed(cluster, sub, [bus.TOPIC_HEARTBEAT, bus.encode(Kind.DEAD, -1, "b", 2, 1, 777, False)])
    assert 1 not in cluster.peers and cluster.client_count() == 0
    assert cluster.counters["malformed"] == 0
    # its last heartbeat, overtaken by the DEAD in the broker, does not bring it back
    feed(cluster, sub, control(Kind.HEARTBEAT, 3, 777, 40, {}))
    assert 1 not in cluster.peers and cluster.client_count() == 0


def test_an_engine_without_a_supervisor_forgets_a_silent_peer() -> None:
    cluster, sub, _ = make_client()
    cluster.forget_after = 10.0
    feed(cluster, sub, control(Kind.HEARTBEAT, 1, 777, 40, {}))
    cluster.peers[1].last_heartbeat -= 6
    cluster._check_peers()
    assert cluster.peers[1].late
    cluster.peers[1].last_heartbeat -= 5
    cluster._check_peers()
    assert cluster.peers == {} and cluster.client_count() == 0
    # a partition heals: the same process is heard again, and what it sent
    # meanwhile is counted as lost, not taken for a fresh start
    feed(cluster, sub, control(Kind.HEARTBEAT, 9, 777, 40, {}))
    assert cluster.counters["gaps"] == 7 and cluster.client_count() == 40


def test_a_new_generation_of_a_shard_replaces_the_old_one_once_it_is_silent() -> None:
    cluster, sub, _ = make_client()
    feed(cluster, sub, control(Kind.HEARTBEAT, 1, 5, 30, {}, gen="old"))
    assert cluster.client_count() == 30
    # while the old process beats, another generation is not believed (a forgery would
    # make its clients unaddressable): counted, nothing changes
    feed(cluster, sub, control(Kind.HELLO, 1, gen="new"))
    assert cluster.peers[1].generation == "old" and cluster.client_count() == 30
    assert cluster.counters["malformed"] == 1
    # silent for two heartbeat intervals: a restart, the new process replaces it
    cluster.peers[1].last_heartbeat -= 2 * cluster.heartbeat_interval + 0.1
    feed(cluster, sub, control(Kind.HELLO, 2, gen="new"))
    assert cluster.client_count() == 0
    assert cluster.peers[1].generation == "new"


def test_liveness_is_believed_only_on_its_topic_and_from_its_senders() -> None:
    cluster, sub, _ = make_client()
    feed(
        cluster,
        sub,
        [bus.TOPIC_ALL, bus.encode(Kind.HEARTBEAT, 1, "p1", 1, 5, 30, {})],  # wrong topic
        [bus.TOPIC_HEARTBEAT, bus.encode(Kind.HEARTBEAT, -7, "pub", 1, 5, 30, {})],  # publisher
        [bus.TOPIC_HEARTBEAT, bus.encode(Kind.HEARTBEAT, 0, "other", 1, 5, 30, {})],  # our shard
        [bus.TOPIC_HEARTBEAT, bus.encode(Kind.DEAD, 3, "w3", 1, 1, 5, False)],  # not the broker
        [bus.TOPIC_HEARTBEAT, bus.encode(Kind.HEARTBEAT, 2, "p2", 1, 5, 2**63, {})],  # 2**63
    )
    assert cluster.peers == {} and cluster.client_count() == 0
    assert cluster.counters["malformed"] == 5
    # a sequence number far ahead is a reset, not a gap of 2**52
    feed(cluster, sub, control(Kind.HEARTBEAT, 1, 5, 3, {}))
    feed(cluster, sub, control(Kind.HEARTBEAT, 2**52, 5, 3, {}))
    assert cluster.counters["gaps"] == 0 and cluster.counters["malformed"] == 6
    # and one past the range is refused at decoding
    with pytest.raises(BusError):
        bus.decode(bus.encode(Kind.HELLO, 1, "p1", 2**64 - 1))
    # an engine with no supervisor's broker (NATS) believes no DEAD at all
    cluster.trusts_dead = False
    feed(cluster, sub, [bus.TOPIC_HEARTBEAT, bus.encode(Kind.DEAD, -1, "b", 1, 1, 5, False)])
    assert 1 in cluster.peers


def test_send_routes_by_the_id_alone() -> None:
    cluster, sub, _ = make_client()
    sent: list[tuple[bytes, list[Any]]] = []

    def capture(topic: bytes, body: bytes) -> bool:
        kind, _, _, _, fields = bus.decode(body)
        sent.append((topic, [kind, *fields]))
        return True

    cluster._send = capture  # type: ignore[method-assign]
    feed(cluster, sub, control(Kind.HEARTBEAT, 1, 5, 3, {}, origin=3, gen="g3"))
    assert cluster.send_to("3-g3-1f", "hi") is True
    assert sent == [(bus.shard_topic(3), [Kind.SEND, "3-g3-1f", b"\x81\x02hi"])]
    proxy = cluster.get_client("3-g3-1f")
    assert proxy is not None and proxy.shard == 3
    proxy.close(4000, "bye")
    assert sent[-1] == (bus.shard_topic(3), [Kind.CLOSE, "3-g3-1f", 4000, "bye"])
    sent.clear()
    # refused at once, nothing published: a past life of worker 3, one of our
    # own past lives, a worker nobody has heard of (after the first heartbeats),
    # and what is not an id at all
    cluster._started_at -= 10
    for gone in ("3-old-1", "0-older-1", "9-g9-1", "nonsense", ""):
        assert cluster.send_to(gone, "x") is False, gone
        assert cluster.get_client(gone) is None, gone
        cluster.close_remote(gone, 1000, "")
    assert sent == []


def test_the_owner_counts_what_it_cannot_deliver() -> None:
    cluster, sub, hub = make_client()
    hub.clients["0-self00-1"] = object()
    feed(
        cluster,
        sub,
        [bus.shard_topic(0), bus.encode(Kind.SEND, 1, "p1", 1, "0-self00-1", b"\x81\x00")],
        [bus.shard_topic(0), bus.encode(Kind.SEND, 1, "p1", 2, "0-self00-2", b"\x81\x00")],
        [bus.shard_topic(0), bus.encode(Kind.CLOSE, 1, "p1", 3, "0-self00-3", 1000, "")],
    )
    assert hub.written == [b"\x81\x00"]
    assert cluster.counters["undeliverable"] == 2


# ------------------------------------------------------- presence queries


class MemoryBus:
    """Engines joined in memory: prefix subscriptions, delivery on a later tick."""

    def __init__(self) -> None:
        self.engines: list[MemoryEngine] = []
        self.stopped: set[int] = set()
        self.bodies: list[int] = []

    def deliver(self, topic: bytes, body: bytes) -> None:
        self.bodies.append(len(body))
        loop = asyncio.get_running_loop()
        for engine in self.engines:
            if engine.shard in self.stopped:
                continue
            if any(topic.startswith(prefix) for prefix in engine.subscriptions):
                loop.call_soon(engine.receive, topic, body)


class MemoryEngine(BusEngine):
    def __init__(self, memory: MemoryBus, hub: FakeHub, shard: int) -> None:
        hub.ids = ClientIds(shard)
        super().__init__(hub, shard=shard)  # type: ignore[arg-type]
        self.memory = memory
        self.subscriptions = set(self.topics)
        memory.engines.append(self)

    def _send(self, topic: bytes, body: bytes) -> bool:
        self.memory.deliver(topic, body)
        return True

    def _subscribe(self, topic: bytes) -> None:
        self.subscriptions.add(topic)

    def _unsubscribe(self, topic: bytes) -> None:
        self.subscriptions.discard(topic)


class Row:
    """A client as presence sees it (hashable, as room members are)."""

    def __init__(self, client_id: str, path: str) -> None:
        from types import SimpleNamespace

        self.id, self.request, self.connected_at = client_id, SimpleNamespace(path=path), 1.5


def _cluster_of(sizes: list[int], path: str = "/") -> tuple[MemoryBus, list[MemoryEngine]]:
    memory = MemoryBus()
    engines = []
    for shard, size in enumerate(sizes):
        hub = FakeHub()
        engine = MemoryEngine(memory, hub, shard)
        for index in range(size):
            client_id = f"{shard}-{engine.generation}-{index:x}"
            client = Row(client_id, path)
            hub.clients[client_id] = client
            if index % 3 == 0:
                hub.rooms.setdefault("thirds", set()).add(client)
        engines.append(engine)
    for engine in engines:  # everyone has heard everyone's heartbeat
        for other in engines:
            if other is not engine:
                engine._peer(other.shard, other.generation).clients = other.hub.count
    return memory, engines


def test_presence_asks_every_worker_and_merges_the_answers() -> None:
    async def run() -> None:
        _, engines = _cluster_of([5, 7, 11])
        presence = await engines[0].fetch_clients(None, 1000, 1.0)
        assert not presence.partial and not presence.truncated
        assert presence.total == 23 and len(presence) == 23
        assert presence.workers == [0, 1, 2] and presence.missing_workers == []
        assert sorted(info.id for info in presence) == sorted(
            client_id for engine in engines for client_id in engine.hub.clients
        )
        assert {info.shard for info in presence if info.id.startswith("2-")} == {2}
        assert all(info.path == "/" and info.connected_at == 1.5 for info in presence)
        # one room, a limit: the total still counts every match
        room = await engines[1].fetch_clients("thirds", 4, 1.0)
        assert room.total == 2 + 3 + 4 and len(room) == 4 and room.truncated
        count = await engines[2].fetch_clients("thirds", 0, 1.0)
        assert count.total == 9 and count.clients == []

    asyncio.run(run())


def test_presence_is_partial_and_says_who_did_not_answer() -> None:
    async def run() -> None:
        memory, engines = _cluster_of([5, 7, 11])
        memory.stopped.add(2)  # stopped (SIGSTOP): it neither hears nor answers
        loop = asyncio.get_running_loop()
        started = loop.time()
        presence = await engines[0].fetch_clients(None, 1000, 0.3)
        assert 0.25 < loop.time() - started < 2.0
        assert presence.partial and presence.missing_workers == [2]
        assert presence.workers == [0, 1] and presence.total == 12
        # a late answer to a query that timed out is dropped, not merged anywhere
        memory.stopped.clear()
        engines[2]._answer_presence([1, 0, engines[0].generation, None, 10])
        for _ in range(5):
            await asyncio.sleep(0)
        assert engines[0].counters["malformed"] == 0 and engines[0]._queries == {}

    asyncio.run(run())


def test_a_large_presence_answer_goes_in_bounded_parts() -> None:
    """3 x 2,200 clients with 4 KiB paths (27 MiB of rows): parts far under MAX_BODY."""

    async def run() -> None:
        memory, engines = _cluster_of([2200, 2200, 2200], path="/" + "p" * 4095)
        presence = await engines[0].fetch_clients(None, 100_000, 5.0)
        assert presence.total == 6600 and len(presence) == 6600 and not presence.partial
        assert max(memory.bodies) < bus.PART_BYTES + 64 * 1024
        assert len(memory.bodies) >= 2 * 9

    asyncio.run(run())


def test_presence_queries_are_checked() -> None:
    from enjent import WebSocketServer

    async def run() -> None:
        server = WebSocketServer()
        presence = await server.fetch_clients()
        assert presence.total == 0 and presence.workers == [0] and not presence.partial
        with pytest.raises(ValueError, match="limit"):
            await server.fetch_clients(limit=-1)
        with pytest.raises(ValueError, match="limit"):
            await server.fetch_clients(limit=10**9)
        with pytest.raises(ValueError, match="timeout"):
            await server.fetch_clients(timeout=0)
        count = await server.room("lobby").count()
        assert count.total == 0

    asyncio.run(run())


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),  # found by the long fuzzing campaign
        pytest.param(b"\x81", id="one-byte"),
        pytest.param(b"\x81\x05abc", id="short"),
        pytest.param(b"\x81\x02abc", id="long"),
        pytest.param(b"\x81\x82abcdxy", id="masked"),
        pytest.param(b"\x89\x00", id="ping"),
        pytest.param(b"\x01\x01a", id="not-final"),
        pytest.param(b"\x82\x7e\x00", id="cut-16-bit-length"),
    ],
)
def test_a_broken_frame_on_the_bus_is_malformed_not_written(frame: bytes) -> None:
    cluster, sub, server = make_client()
    server.clients["0-self00-1"] = object()
    feed(
        cluster,
        sub,
        [bus.TOPIC_ALL, bus.encode(Kind.BROADCAST, 1, "p1", 1, frame, None)],
        [bus.shard_topic(0), bus.encode(Kind.SEND, 1, "p1", 1, "0-self00-1", frame)],
        [bus.room_topic("r"), bus.encode(Kind.ROOM, 1, "p1", 1, ["r"], frame, None, 1)],
    )
    assert cluster.counters["malformed"] == 3
    assert server.written == []
    with pytest.raises(BusError):
        cluster._handle(bus.TOPIC_ALL, bus.encode(Kind.BROADCAST, 1, "p1", 2, frame, None))
