"""Rooms that remember: offsets, epochs, recovery on reconnect.

The store and the keeper on their own (bounds, eviction, bogus positions),
then ``examples/feed.py``'s wire contract for real: one process
(``python examples/feed.py``), and two workers on the embedded bus
(``enjent run tests.feed_app:server --workers 2 --bus ipc:///DIR``) with a
``Publisher`` in the same room, a worker killed with SIGKILL, a rolling
restart (SIGHUP), and a burst of live publications during a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from clusterutil import REPO_ROOT, Cluster, free_port, wait_for
from enjent_supervisor.keeper import Keeper
from natsutil import cluster_on_nats
from websockets.asyncio.client import ClientConnection, connect

from enjent import Joined, WebSocketServer
from enjent.cluster import bus
from enjent.cluster.bus import Kind
from enjent.server.history import (
    MAX_REPLAY,
    HistoryRules,
    HistorySettings,
    HistoryStore,
    parse_since,
)

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ the store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store_of(size: int = 10, ttl: float = 60.0, **bounds: int) -> tuple[HistoryStore, Clock]:
    rules = HistoryRules()
    rules.add(None, "", HistorySettings(size=size, ttl=ttl))
    for name, value in bounds.items():
        setattr(rules, name, value)
    clock = Clock()
    return HistoryStore(rules, clock=clock), clock


def test_offsets_increase_by_one_per_room_and_recovery_is_exact() -> None:
    store, _ = store_of(size=10)
    joined, missed = store.recover("a", None)
    assert (joined.offset, joined.recovered, missed) == (0, None, [])
    epoch = joined.epoch
    assert epoch is not None
    for index in range(7):
        publication = store.append("a", f"a{index}")
        assert publication is not None
        assert (publication.epoch, publication.offset) == (epoch, index + 1)
    other = store.append("b", "b0")
    assert other is not None and other.offset == 1 and other.epoch != epoch
    joined, missed = store.recover("a", (epoch, 3))
    assert (joined.epoch, joined.offset, joined.recovered, joined.missed) == (epoch, 7, True, 4)
    assert [(item.offset, item.data) for item in missed] == [
        (4, "a3"),
        (5, "a4"),
        (6, "a5"),
        (7, "a6"),
    ]
    joined, missed = store.recover("a", (epoch, 7))  # nothing missed: complete, empty
    assert (joined.recovered, missed) == (True, [])


def test_what_cannot_be_recovered_says_so_and_replays_nothing() -> None:
    store, clock = store_of(size=5, ttl=10.0)
    epoch = store.recover("a", None)[0].epoch
    assert epoch is not None
    for index in range(8):
        store.append("a", str(index))
    # offsets 4..8 kept: from 3 every one follows, from 2 the 3rd is gone
    assert store.recover("a", (epoch, 3))[0].recovered is True
    assert store.recover("a", (epoch, 2)) == (Joined("a", epoch, 8, False), [])
    assert store.recover("a", (epoch, 9))[0].recovered is False  # the future
    assert store.recover("a", ("another", 8))[0].recovered is False  # another epoch
    assert store.recover("b", (epoch, 0))[0].recovered is False  # another room's epoch
    clock.now += 11.0  # past the TTL: all gone, the position stays
    joined, missed = store.recover("a", (epoch, 6))
    assert (joined.epoch, joined.offset, joined.recovered, missed) == (epoch, 8, False, [])
    assert store.recover("a", (epoch, 8))[0].recovered is True  # missed nothing at all
    assert store.figures()["messages"] == 0 and store.figures()["evicted"] == 8


def test_bogus_positions_are_not_recovered_and_never_raise() -> None:
    store, _ = store_of()
    epoch = store.recover("a", None)[0].epoch
    store.append("a", "x")
    bogus: list[Any] = [
        "garbage",
        "",
        ":",
        f"{epoch}:",
        f"{epoch}:-1",
        f"{epoch}:1e3",
        f"{epoch}:{'9' * 40}",
        ("", 0),
        (epoch, "1"),
        (epoch, True),
        (epoch, -1),
        (epoch, 1 << 60),
        ("x" * 100, 0),
        [epoch],
        5,
        b"bytes",
        {"epoch": epoch},
    ]
    for value in bogus:
        joined, missed = store.recover("a", parse_since(value))
        assert (joined.recovered, missed) == (False, []), value
    assert parse_since(f"{epoch}:0") == (epoch, 0)
    assert parse_since([epoch, 1]) == (epoch, 1)


def test_a_client_cannot_make_the_server_replay_more_than_the_bound() -> None:
    store, _ = store_of(size=5000)
    epoch = store.recover("a", None)[0].epoch
    assert epoch is not None
    for index in range(MAX_REPLAY + 1):
        store.append("a", str(index))
    assert store.recover("a", (epoch, 0))[0].recovered is False  # 1001 behind
    joined, missed = store.recover("a", (epoch, 1))
    assert joined.recovered is True and len(missed) == MAX_REPLAY


def test_memory_is_bounded_per_room_and_in_all() -> None:
    store, _ = store_of(size=1000, max_messages=50, max_bytes=1 << 30)
    for index in range(200):
        store.append(f"room{index % 4}", "x" * 10)
    assert store.messages == 50
    store, _ = store_of(size=1000, max_bytes=20_000)
    for _ in range(100):
        store.append("a", "y" * 1000)
    assert store.bytes <= 20_000 and 0 < store.messages < 20
    rules = HistoryRules()
    rules.add("big", None, HistorySettings(size=10, max_bytes=5000))
    store = HistoryStore(rules)
    for _ in range(20):
        store.append("big", b"z" * 1000)
    assert store.bytes <= 5000 and store.messages == 4
    assert store.append("not-kept", "x") is None


def test_a_room_dropped_under_the_bound_comes_back_with_a_new_epoch() -> None:
    rules = HistoryRules()
    rules.add(None, "", HistorySettings())
    store = HistoryStore(rules, max_rooms=2)
    first = store.append("a", "1")
    store.append("b", "1")
    store.append("c", "1")  # "a" is the least recently published: dropped
    again = store.append("a", "2")
    assert first is not None and again is not None
    assert again.epoch != first.epoch and again.offset == 1
    assert store.recover("a", (first.epoch, 1))[0].recovered is False


def test_rules_take_names_then_the_longest_prefix_and_check_values() -> None:
    rules = HistoryRules()
    assert not rules
    rules.add(None, "news:", HistorySettings(size=1))
    rules.add(None, "news:sport:", HistorySettings(size=2))
    rules.add("news:sport:live", None, HistorySettings(size=3))
    assert rules.settings_of("news:x") == HistorySettings(size=1)
    assert rules.settings_of("news:sport:x") == HistorySettings(size=2)
    assert rules.settings_of("news:sport:live") == HistorySettings(size=3)
    assert rules.settings_of("chat") is None
    assert rules.split(["chat", "news:a"]) == (["news:a"], ["chat"])
    server = WebSocketServer()
    for bad in ({"size": 0}, {"ttl": -1}, {"max_bytes": 1 << 30}, {"size": True}):
        with pytest.raises(ValueError):
            server.keep_history(prefix="", **bad)
    with pytest.raises(ValueError, match="one of them"):
        server.keep_history(room="a", prefix="b")
    with pytest.raises(TypeError):

        @server.on_join
        async def late(client: Any, joined: Joined) -> None:
            pass


# ----------------------------------------------------------------- the keeper


def envelope(kind: Kind, *fields: Any, origin: int = 0) -> bytes:
    return bus.encode(kind, origin, "gen", 1, *fields)


def test_the_keeper_sequences_rooms_with_history_and_forwards_the_others() -> None:
    rules = HistoryRules()
    rules.add(None, "h:", HistorySettings(size=3))
    keeper = Keeper(rules)
    out = keeper.handle(envelope(Kind.PUBLISH, ["h:1", "plain", "h:2"], "hello", None, 7))
    decoded = [(topic, bus.decode(body)) for topic, body in out]
    logged = [(t, f) for t, (k, _, _, _, f) in decoded if k is Kind.LOGGED]
    plain = [(t, f) for t, (k, _, _, _, f) in decoded if k is Kind.ROOM]
    assert [(t, f[0], f[2], f[3]) for t, f in logged] == [
        (bus.room_topic("h:1"), "h:1", 1, "hello"),
        (bus.room_topic("h:2"), "h:2", 1, "hello"),
    ]
    assert [t for t, _ in plain] == [bus.room_topic("plain")]
    assert plain[0][1][0] == ["plain"] and plain[0][1][1].endswith(b"hello")
    for _ in range(4):
        keeper.handle(envelope(Kind.PUBLISH, ["h:1"], b"\x00", "0-abc-1", 8))
    epoch = logged[0][1][1]
    ((topic, body),) = keeper.handle(envelope(Kind.REPLAY_REQ, 5, 3, "g3", "h:1", epoch, 2))
    kind, origin, _, _, fields = bus.decode(body)
    assert (topic, kind, origin) == (bus.room_topic("h:1"), Kind.REPLAY, bus.BROKER_ORIGIN)
    assert fields == [5, 3, "g3", "h:1", epoch, 5, True, [[3, b"\x00"], [4, b"\x00"], [5, b"\x00"]]]
    ((_, body),) = keeper.handle(envelope(Kind.REPLAY_REQ, 6, 3, "g3", "h:1", epoch, 1))
    assert bus.decode(body)[4][6:] == [False, []]  # offset 2 evicted (size 3)
    ((_, body),) = keeper.handle(envelope(Kind.REPLAY_REQ, 7, 3, "g3", "plain", None, None))
    assert bus.decode(body)[4][4] is None  # no history for that room here
    for bad in (
        envelope(Kind.PUBLISH, "h:1", "x", None, 1),
        envelope(Kind.PUBLISH, ["h:1"], 5, None, 1),
        envelope(Kind.PUBLISH, [], "x", None, 1),
        envelope(Kind.REPLAY_REQ, "x", 3, "g", "h:1", None, None),
        envelope(Kind.BROADCAST, b"\x81\x00", None),
        b"\xc1 not msgpack",
    ):
        assert keeper.handle(bad) == []
    assert keeper.malformed == 6
    report = keeper.report()
    assert report is not None and keeper.report(force=False) is None  # unchanged: quiet
    topic, body = report
    kind, _, _, _, (figures,) = bus.decode(body)
    assert (topic, kind) == (bus.TOPIC_HEARTBEAT, Kind.KEEPER)
    assert figures["messages"] == 4 and figures["malformed"] == 6


# ------------------------------------------------------------- the wire contract


class Feed:
    """A client of the feed: its messages as JSON, its position."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.worker = ws.response.headers.get("X-Enjent-Worker") if ws.response else None

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        value = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        assert isinstance(value, dict)
        return value

    async def publish(self, data: str) -> None:
        await self.ws.send(json.dumps({"publish": data}))

    async def quiet(self, seconds: float = 0.3) -> list[Any]:
        """What else arrives within ``seconds`` (nothing, when all is well)."""
        extra = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                extra.append(await asyncio.wait_for(self.ws.recv(), seconds))
        return extra

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3.0)


async def feed(
    port: int, room: str, since: str | None = None, *, worker: str | None = None
) -> Feed:
    """A feed client (on ``worker`` when given: others opened meanwhile are closed)."""
    query = f"room={room}" + (f"&since={since}" if since is not None else "")
    deadline = time.monotonic() + 20.0
    while True:
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}/?{query}", open_timeout=5, ping_interval=None
            )
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        client = Feed(ws)
        if worker is None or client.worker == worker:
            return client
        await client.close()
        assert time.monotonic() < deadline, f"no connection landed on worker {worker}"


async def joined(client: Feed, room: str, recovered: bool | None) -> tuple[str, int]:
    message = await client.next()
    assert message["type"] == "joined" and message["room"] == room, message
    assert message["recovered"] is recovered, message
    return message["epoch"], message["offset"]


async def expect_pubs(
    client: Feed, room: str, epoch: str, offsets: range, data: list[str], *, contiguous: bool = True
) -> list[int]:
    """The next ``len(offsets)`` messages: these publications, in order. On NATS the
    offsets (JetStream's sequence) only increase, from ``offsets.start`` on."""
    got = [await client.next() for _ in offsets]
    assert [(m["type"], m["room"], m["epoch"]) for m in got] == [("pub", room, epoch)] * len(got)
    numbers = [m["offset"] for m in got]
    if contiguous:
        assert numbers == list(offsets)
    else:
        assert numbers == sorted(set(numbers)) and numbers[0] >= offsets.start, numbers
    assert [m["data"] for m in got] == data
    return numbers


async def miss_and_recover(
    port: int,
    room: str,
    publish: Any,
    *,
    count: int = 30,
    worker: str | None = None,
    back_on: str | None = None,
    watcher_on: str | None = None,
    drop: Any = None,
    contiguous: bool = True,
) -> None:
    """A client at a position misses ``count`` publications, comes back, gets exactly them.

    It leaves with ``drop(client)`` (by default it closes); a watcher that stays
    sees every publication before the client comes back.
    """
    watcher = await feed(port, room, worker=watcher_on)
    epoch, offset = await joined(watcher, room, None)
    missing = await feed(port, room, worker=worker)
    assert (await joined(missing, room, None)) == (epoch, offset)
    await (drop(missing) if drop is not None else missing.close())
    sent = [f"{room}-{index}" for index in range(count)]
    await publish(sent)
    span = range(offset + 1, offset + count + 1)
    seen = await expect_pubs(watcher, room, epoch, span, sent, contiguous=contiguous)
    back = await feed(port, room, f"{epoch}:{offset}", worker=back_on)
    assert (await joined(back, room, True)) == (epoch, seen[-1])
    assert await expect_pubs(back, room, epoch, span, sent, contiguous=contiguous) == seen
    await watcher.publish("live")
    live = range(seen[-1] + 1, seen[-1] + 2)
    await expect_pubs(back, room, epoch, live, ["live"], contiguous=contiguous)
    assert await back.quiet() == []  # no duplicate
    await expect_pubs(watcher, room, epoch, live, ["live"], contiguous=contiguous)
    await back.close()
    await watcher.close()


@contextlib.contextmanager
def feed_process(*args: str) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "examples/feed.py", "--port", str(port), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _listening(port), 20.0)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode == 0, err.decode(errors="replace")[-2000:]
        assert b"Traceback" not in err, err.decode(errors="replace")[-2000:]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_one_process_recovers_exactly_what_was_missed() -> None:
    async def main(port: int) -> None:
        async def by_a_client(sent: list[str]) -> None:
            other = await feed(port, "lobby")
            await joined(other, "lobby", None)
            for data in sent:
                await other.publish(data)
            await other.close()

        await miss_and_recover(port, "lobby", by_a_client)
        # not recoverable: garbage, another epoch, past the size (--history 40)
        for since in ("garbage", "nope:1", "12:x"):
            client = await feed(port, "lobby", since)
            await joined(client, "lobby", False)
            assert await client.quiet(0.2) == []
            await client.close()
        watcher = await feed(port, "lobby")
        epoch, offset = await joined(watcher, "lobby", None)
        for index in range(41):
            await watcher.publish(str(index))
        late = await feed(port, "lobby", f"{epoch}:{offset}")
        assert (await joined(late, "lobby", False)) == (epoch, offset + 41)
        assert await late.quiet(0.2) == []
        await late.close()
        await watcher.close()

    with feed_process("--history", "40") as port:
        asyncio.run(main(port))


def test_one_process_past_the_ttl_and_after_a_restart() -> None:
    async def main(port: int, position: tuple[str, int] | None) -> tuple[str, int]:
        client = await feed(port, "r", None if position is None else f"{position[0]}:{position[1]}")
        if position is not None:  # a new process: a new epoch, nothing passed off as complete
            epoch, offset = await joined(client, "r", False)
            assert epoch != position[0]
            return epoch, offset
        epoch, offset = await joined(client, "r", None)
        await client.publish("one")
        assert (await client.next())["offset"] == offset + 1
        await client.close()
        await asyncio.sleep(1.5)  # past --history-ttl 1
        back = await feed(port, "r", f"{epoch}:{offset}")
        assert (await joined(back, "r", False)) == (epoch, offset + 1)
        await back.close()
        return epoch, offset + 1

    with feed_process("--history-ttl", "1") as port:
        position = asyncio.run(main(port, None))
    with feed_process() as port:
        asyncio.run(main(port, position))


# ------------------------------------------------------- two workers, one bus


@pytest.fixture(params=["zmq", "nats"])
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, str, bool]]:
    """The feed on two workers: the embedded bus at a stable address, or NATS with
    JetStream (a nats-server -js of its own). The third item: whether offsets go by one
    (the keeper's) or only increase (JetStream's sequence, shared by every room)."""
    api = ["--api", f"127.0.0.1:{free_port()}"]  # the HTTP publish API too
    env = {"ENJENT_API_KEY": API_KEY, "ENJENT_DRAIN_TIMEOUT": "2"}
    if request.param == "zmq":
        directory = os.path.join(tempfile.mkdtemp(prefix="ejh-"), "bus")
        bus_url = f"ipc://{directory}"
        args = ["--bus", bus_url, *api]
        with Cluster(workers=2, app="tests.feed_app:server", args=args, env=env) as running:
            running.wait_ready()
            running.api_port = int(api[1].rpartition(":")[2])  # type: ignore[attr-defined]
            yield running, bus_url, True
    else:
        store = tempfile.mkdtemp(prefix="ejjs-")
        config = f"jetstream {{ store_dir: {json.dumps(store)} }}\n"
        with cluster_on_nats(config, env, app="tests.feed_app:server", args=api) as (
            running,
            bus_url,
        ):
            running.api_port = int(api[1].rpartition(":")[2])
            yield running, bus_url, False


API_KEY = "history-test-key-0123456789"


def api_publish(port: int, body: dict[str, Any]) -> int:
    """One POST to the HTTP API (asked again while its process is still starting)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Authorization", f"Bearer {API_KEY}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 15.0
    while True:
        try:
            with opener.open(request, timeout=10) as answer:
                return int(answer.status)
        except (ConnectionError, urllib.error.URLError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the HTTP API did not answer: {exc}") from None
            time.sleep(0.2)


@contextlib.asynccontextmanager
async def publisher(bus_url: str) -> AsyncIterator[Any]:
    from enjent import AsyncPublisher

    async with AsyncPublisher(bus_url) as pub:
        yield pub


def test_two_workers_recover_from_clients_and_a_publisher_on_the_other_worker(
    cluster: tuple[Cluster, str, bool],
) -> None:
    running, bus_url, contiguous = cluster

    async def main() -> None:
        async with publisher(bus_url) as pub:

            async def half_and_half(sent: list[str]) -> None:
                other = await feed(running.port, "news", worker="1")
                await joined(other, "news", None)
                for index, data in enumerate(sent):
                    if index % 2:
                        await pub.room("news").broadcast(data)
                    else:
                        await other.publish(data)
                    assert (await other.next())["data"] == data  # one at a time: in order
                await other.close()

            await miss_and_recover(
                running.port, "news", half_and_half, worker="0", back_on="1", contiguous=contiguous
            )
            # the HTTP API's publications get their position like the others
            listener = await feed(running.port, "news")
            epoch, offset = await joined(listener, "news", None)
            status = await asyncio.to_thread(
                api_publish, running.api_port, {"room": "news", "data": "from-api"}
            )
            assert status == 200
            got = await listener.next()
            assert (got["type"], got["epoch"], got["data"]) == ("pub", epoch, "from-api")
            assert got["offset"] > offset and (not contiguous or got["offset"] == offset + 1)
            await listener.close()
            # /metrics: the joins by outcome (every worker's, from the heartbeats; a client
            # that landed on the wrong worker first recovered there too), and on the embedded
            # bus the keeper's figures (reported when they change)
            pattern = r'^enjent_cluster_history_joins_total\{outcome="recovered"\} ([1-9]\d*)$'
            wanted = (
                []
                if not contiguous
                else ["enjent_history_messages 32", "enjent_history_appended_total 32"]
            )

            def complete(text: str) -> bool:
                lines = text.splitlines()
                return bool(re.search(pattern, text, re.M)) and all(w in lines for w in wanted)

            for _ in range(100):
                text = await asyncio.to_thread(_get, running.port, "/metrics")
                if complete(text):
                    break
                await asyncio.sleep(0.1)
            shown = [line for line in text.splitlines() if "history" in line and "#" not in line]
            assert complete(text), shown
            # not recoverable on a cluster either: garbage, another epoch, past size and TTL
            for since in ("junk:junk", "other-epoch:1"):
                client = await feed(running.port, "news", since)
                await joined(client, "news", False)
                await client.close()
            watcher = await feed(running.port, "small:a")
            epoch, offset = await joined(watcher, "small:a", None)
            sent = [str(index) for index in range(6)]
            for data in sent:
                await pub.room("small:a").broadcast(data)
            span = range(offset + 1, offset + 7)
            seen = await expect_pubs(watcher, "small:a", epoch, span, sent, contiguous=contiguous)
            late = await feed(running.port, "small:a", f"{epoch}:{offset}")  # 6 missed, 5 kept
            assert (await joined(late, "small:a", False)) == (epoch, seen[-1])
            await late.close()
            late = await feed(running.port, "small:a", f"{epoch}:{seen[-2]}")  # 1 missed: fine
            assert (await joined(late, "small:a", True)) == (epoch, seen[-1])
            await expect_pubs(late, "small:a", epoch, span[-1:], ["5"], contiguous=contiguous)
            await late.close()
            await asyncio.sleep(1.3)  # past the TTL (1 s) of small:*
            late = await feed(running.port, "small:a", f"{epoch}:{seen[-2]}")
            assert (await joined(late, "small:a", False)) == (epoch, seen[-1])
            assert await late.quiet(0.2) == []
            await late.close()
            await watcher.close()

    asyncio.run(main())


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def test_history_survives_a_worker_killed_and_a_rolling_restart(
    cluster: tuple[Cluster, str, bool],
) -> None:
    running, bus_url, contiguous = cluster

    async def main() -> None:
        async with publisher(bus_url) as pub:

            async def killed(client: Feed) -> None:  # the worker the client is on dies
                os.kill(running.worker_pids()[0], signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.ws.wait_closed(), 10)
                assert client.ws.close_code != 1000

            async def published(sent: list[str]) -> None:
                for data in sent:
                    await pub.room("deploy").broadcast(data)

            await miss_and_recover(
                running.port,
                "deploy",
                published,
                worker="0",
                watcher_on="1",
                drop=killed,
                contiguous=contiguous,
            )
            running.wait_ready()

            # a rolling restart: the client is closed with 1012 and comes back
            client = await feed(running.port, "deploy")
            epoch, offset = await joined(client, "deploy", None)
            running.signal(signal.SIGHUP)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.ws.wait_closed(), 15)
            assert client.ws.close_code == 1012
            sent = [f"during-{index}" for index in range(30)]
            for data in sent:
                await pub.room("deploy").broadcast(data)
            back = await feed(running.port, "deploy", f"{epoch}:{offset}")
            # the keeper may answer before the last publications reach it: those
            # follow live; either way, each once and in order
            assert (await joined(back, "deploy", True))[1] > offset
            span = range(offset + 1, offset + 31)
            await expect_pubs(back, "deploy", epoch, span, sent, contiguous=contiguous)
            assert await back.quiet() == []
            await back.close()
            if contiguous:  # the broker process (the keeper) killed: the history is gone
                os.kill(running.broker_pid(), signal.SIGKILL)
                await asyncio.sleep(1.0)
                again = await feed(running.port, "deploy", f"{epoch}:{offset + 30}")
                new_epoch, _ = await joined(again, "deploy", False)
                assert new_epoch != epoch
                await again.close()

    asyncio.run(main())


def test_a_burst_during_the_replay_loses_and_duplicates_nothing(
    cluster: tuple[Cluster, str, bool],
) -> None:
    running, bus_url, contiguous = cluster

    async def main() -> None:
        async with publisher(bus_url) as pub:
            watcher = await feed(running.port, "big:burst")
            epoch, offset = await joined(watcher, "big:burst", None)
            expected = [f"before-{index}" for index in range(100)]
            for data in expected:
                await pub.room("big:burst").broadcast(data)

            async def burst(round: int) -> None:
                for index in range(250):  # 100 + 3 x 250: under the 1000 a replay may carry
                    await pub.room("big:burst").broadcast(f"during-{round}-{index}")
                    if index % 20 == 0:
                        await asyncio.sleep(0)

            clients = []
            for round in range(3):  # several recoveries while a burst runs
                task = asyncio.create_task(burst(round))
                clients.append(await feed(running.port, "big:burst", f"{epoch}:{offset}"))
                await task
                expected += [f"during-{round}-{index}" for index in range(250)]
            for client in clients:
                first = await client.next()
                assert first["type"] == "joined" and first["recovered"] is True, first
                got = [await client.next(10) for _ in expected]
                assert [m["data"] for m in got] == expected  # replay then live: no gap, no dup
                offsets = [m["offset"] for m in got]
                assert offsets == sorted(set(offsets)) and offsets[0] > offset
                assert first["offset"] in offsets or first["offset"] == offset
                if contiguous:
                    assert offsets == list(range(offset + 1, offset + 1 + len(expected)))
                assert await client.quiet(0.2) == []
                await client.close()
            await watcher.close()

    asyncio.run(main())


def test_history_on_nats_without_jetstream_says_so_and_exits_3() -> None:
    from natsutil import start_nats

    node, nats_port = start_nats()  # no jetstream block
    try:
        done = subprocess.run(
            [sys.executable, "examples/feed.py", "--port", str(free_port()),
             "--bus", f"nats://127.0.0.1:{nats_port}"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        node.stop()
    assert done.returncode == 3, done.stderr[-2000:]
    assert "need JetStream on the NATS servers (nats-server -js" in done.stderr
    assert "Traceback" not in done.stderr
