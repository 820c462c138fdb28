"""One logical server over two workers: broadcasts, rooms, sends, counts, presence.

The app is tests/cluster_app.py, run by the supervisor (``python -m
enjent_supervisor run tests.cluster_app:server --workers 2``). The room
filtering is also checked in one process, with two bus clients on a broker
thread and no heartbeats, where the "received" counter must not move at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from cluster_app import build_server
from clusterutil import (
    Cluster,
    close_all,
    healthz,
    healthz_of,
    open_client,
    open_client_on,
    open_clients,
    poll,
    wait_for,
)
from enjent_supervisor.broker import broker_main

from enjent.cluster import ClusterClient

pytestmark = pytest.mark.timeout(60)

CLIENTS = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(workers=2) as running:
        running.wait_ready()
        yield running


async def _settle_count(clients: list, expected: int, timeout: float = 5.0) -> None:
    async def right() -> bool:
        for client in (clients[0], clients[-1]):
            if await client.request("count") != str(expected):
                return False
        return True

    await poll(right, timeout, interval=0.1)


def test_one_logical_server_with_200_clients(cluster: Cluster) -> None:
    port = cluster.port

    async def main() -> None:
        clients = await open_clients(port, CLIENTS)
        try:
            by_shard = {
                0: [c for c in clients if c.shard == 0],
                1: [c for c in clients if c.shard == 1],
            }
            assert len({c.id for c in clients}) == CLIENTS
            assert by_shard[0] and by_shard[1], "the kernel put every client on one worker"
            assert len(by_shard[0]) + len(by_shard[1]) == CLIENTS

            # counts are cluster-wide (from heartbeats), presence asks both workers
            await _settle_count(clients, CLIENTS)
            assert await by_shard[0][0].request("local") == str(len(by_shard[0]))
            answer = await by_shard[1][0].request("presence")
            assert answer == f"{CLIENTS} {CLIENTS} 0,1 -", answer
            data = healthz(port)
            assert data["clients"] == CLIENTS
            assert {w["shard"]: w["clients"] for w in data["workers"]} == {
                0: len(by_shard[0]),
                1: len(by_shard[1]),
            }
            assert all(w["pid"] > 0 for w in data["workers"])
            assert {"sent", "received", "dropped", "gaps"} <= set(data["bus"])

            # a broadcast from one client reaches every client exactly once
            for sender in (by_shard[0][0], by_shard[1][0]):
                text = f"hello from {sender.id}"
                await sender.ws.send(f"broadcast:{text}")
                for client in clients:
                    assert await client.next() == text, client.id
            await asyncio.sleep(0.5)
            assert [c.id for c in clients if c.pending()] == []

            # a room spans workers: members everywhere get it, others nothing
            members = by_shard[0][:7] + by_shard[1][:5]
            for member in members:
                assert await member.request("join:blue") == "joined"
            # joining also subscribes the worker: wait until a room message crosses
            await asyncio.sleep(0.3)
            answer = await by_shard[1][-1].request("presence:blue")
            assert answer == f"{len(members)} {len(members)} 0,1 -", answer
            sender = by_shard[1][-1]  # not a member
            await sender.ws.send("room:blue:sky")
            for member in members:
                assert await member.next() == "sky", member.id
            await asyncio.sleep(0.5)
            assert [c.id for c in clients if c.pending()] == []

            # send(client_id) crosses workers, both ways, routed by the id alone
            for source, target in (
                (by_shard[0][1], by_shard[1][1]),
                (by_shard[1][2], by_shard[0][2]),
            ):
                assert await source.request(f"get:{target.id}") == "True"
                assert await source.request(f"send:{target.id}:psst") == "sent:True"
                assert await target.next() == "psst"
            assert await by_shard[0][3].request("get:1-nobody-1") == "False"
            assert await by_shard[0][3].request("send:1-nobody-1:x") == "sent:False"
            await asyncio.sleep(0.3)
            assert [c.id for c in clients if c.pending()] == []

            # disconnects reach the counts of the other worker by heartbeat; a
            # send to a client gone from a live worker is handed over (True)
            # and counted by its owner as undeliverable
            leaving = by_shard[0][-10:] + by_shard[1][-10:]
            await close_all(leaving)
            staying = [c for c in clients if c not in leaving]
            await _settle_count(staying, CLIENTS - 20)
            answer = await staying[0].request("presence")
            assert answer == f"{CLIENTS - 20} {CLIENTS - 20} 0,1 -", answer
            gone = by_shard[1][-1]
            before = healthz_of(port, 1)["bus"]["undeliverable"]
            assert await by_shard[0][0].request(f"send:{gone.id}:late") == "sent:True"
            await poll(lambda: healthz_of(port, 1)["bus"]["undeliverable"] == before + 1, 3.0)

            # nothing was lost or malformed on the bus
            for shard in (0, 1):
                bus = healthz_of(port, shard)["bus"]
                assert bus["gaps"] == 0 and bus["dropped"] == 0 and bus["malformed"] == 0, bus
        finally:
            await close_all(clients)

    asyncio.run(main())


def test_room_traffic_skips_shards_without_members(cluster: Cluster) -> None:
    """Worker 1 has no member of the room: its received counter must not follow the traffic."""
    port = cluster.port
    messages = 300

    async def main() -> None:
        member = await open_client_on(port, 0)
        other = await open_client_on(port, 1)
        try:
            assert await member.request("join:only-on-0") == "joined"
            await asyncio.sleep(0.3)
            before = healthz_of(port, 1)["bus"]["received"]
            started = time.monotonic()
            for i in range(messages):
                await member.ws.send(f"room:only-on-0:m{i}")
            for i in range(messages):
                assert await member.next() == f"m{i}"
            after = healthz_of(port, 1)["bus"]["received"]
            elapsed = time.monotonic() - started
            # heartbeats (one a second per worker) only: nothing like one per
            # room message
            assert after - before < 20 + 10 * elapsed, (before, after, elapsed)
            assert other.pending() == []
        finally:
            await close_all([member, other])

    asyncio.run(main())


def test_worker_sigkill_restarts_and_purges(cluster: Cluster) -> None:
    """Runs last on the module's cluster: it kills worker 1."""
    port = cluster.port

    async def main() -> None:
        clients = await open_clients(port, 60)
        try:
            survivors = [c for c in clients if c.shard == 0]
            victims = [c for c in clients if c.shard == 1]
            assert survivors and victims
            await _settle_count(survivors, 60)
            old = cluster.worker_pids()
            killed_at = time.monotonic()
            os.kill(old[1], signal.SIGKILL)

            # the worker is back (another pid, listening) within 2 s
            def back() -> int | None:
                data = healthz_of(port, 1, timeout=0.5)
                pid = next(w["pid"] for w in data["workers"] if w["shard"] == 1)
                return pid if pid != old[1] else None

            new_pid = await asyncio.to_thread(wait_for, back, 2.0, 0.0)
            restart = time.monotonic() - killed_at
            print(f"worker restart: {restart:.3f}s")

            # and both workers know each other (pids from heartbeats)
            def known() -> bool:
                for shard in (0, 1):
                    data = healthz_of(port, shard, timeout=1.0)
                    pids = {w["shard"]: w["pid"] for w in data["workers"]}
                    if pids != {0: old[0], 1: new_pid}:
                        return False
                return True

            await asyncio.to_thread(wait_for, known, 3.0, 0.05)

            # the victims' connections dropped; the survivors' did not
            await poll(lambda: all(v.closed.is_set() for v in victims), 5.0)
            assert not any(s.closed.is_set() for s in survivors)

            # the dead shard's clients are purged everywhere: counts are right again
            await _settle_count(survivors, len(survivors))
            newcomer = await open_client_on(port, 1)
            survivors_and_new = [*survivors, newcomer]
            # the restarted worker knows the survivors by heartbeat; the dead
            # generation's ids are refused at once
            await _settle_count([newcomer, survivors[0]], len(survivors_and_new))
            assert await newcomer.request(f"get:{survivors[0].id}") == "True"
            assert await newcomer.request(f"get:{victims[0].id}") == "False"
            assert await survivors[0].request(f"send:{victims[0].id}:x") == "sent:False"

            # broadcasts still reach everyone, once, from either worker
            for sender in (survivors[0], newcomer):
                await sender.ws.send(f"broadcast:after-{sender.id}")
                for client in survivors_and_new:
                    assert await client.next() == f"after-{sender.id}"
            await asyncio.sleep(0.3)
            assert [c.id for c in survivors_and_new if c.pending()] == []
            await close_all([newcomer])
        finally:
            await close_all(clients)

    asyncio.run(main())
    assert "worker 1" in cluster.log() and "restarting it" in cluster.log()


# ------------------------------------------------- in one process, no supervisor


def test_room_subscription_filters_at_the_broker() -> None:
    """Two bus clients on a broker thread: a shard subscribes to a room only with members."""
    with tempfile.TemporaryDirectory(prefix="ejt-") as tmp:
        publish, subscribe = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
        control_read, control_write = os.pipe()
        broker = threading.Thread(
            target=broker_main, args=(publish, subscribe, control_read), daemon=True
        )
        broker.start()
        try:
            asyncio.run(_two_shards(publish, subscribe))
        finally:
            os.close(control_write)  # the broker stops at end of file
            broker.join(5.0)
        assert not broker.is_alive()


async def _two_shards(publish: str, subscribe: str) -> None:
    servers = [build_server(), build_server()]
    buses = []
    for shard, server in enumerate(servers):
        server.hub.ids.reset(shard)
        bus = ClusterClient(
            server.hub,
            shard=shard,
            publish_endpoint=publish,
            subscribe_endpoint=subscribe,
            heartbeat_interval=3600.0,
            peer_timeout=7200.0,
        )
        server.attach_peers(bus)
        bus.start()
        buses.append(bus)
        await server.start("127.0.0.1", 0)
    clients = []
    try:
        await asyncio.sleep(0.5)  # subscriptions reach the broker; HELLO/snapshots pass
        member = await open_client(servers[0].port)
        outsider = await open_client(servers[1].port)
        clients += [member, outsider]
        assert (member.shard, outsider.shard) == (0, 1)
        assert await member.request("join:red") == "joined"
        await asyncio.sleep(0.3)

        async def publish_to_red(count: int) -> None:
            for i in range(count):
                await outsider.ws.send(f"room:red:{i}")
                await member.ws.send(f"room:red:{i}")
            for _ in range(2 * count):
                await member.next()

        base = [bus.counters["received"] for bus in buses]
        await publish_to_red(100)
        await asyncio.sleep(0.2)
        # shard 0 got shard 1's 100 and its own 100 back; shard 1 got nothing
        assert buses[0].counters["received"] - base[0] == 200
        assert buses[1].counters["received"] == base[1]
        assert buses[0].counters["gaps"] == 0
        assert outsider.pending() == [] and member.pending() == []

        # shard 1 gets a member: now it receives the room's traffic too
        assert await outsider.request("join:red") == "joined"
        await asyncio.sleep(0.3)
        base = [bus.counters["received"] for bus in buses]
        await publish_to_red(10)
        for _ in range(20):
            await outsider.next()
        assert buses[1].counters["received"] - base[1] == 20  # 10 from 0 and its own 10

        # the last member of shard 1 leaves: unsubscribed, the traffic stops again
        await outsider.close()
        await asyncio.sleep(0.3)
        base = [bus.counters["received"] for bus in buses]
        for i in range(50):
            await member.ws.send(f"room:red:{i}")
        for _ in range(50):
            await member.next()
        await asyncio.sleep(0.2)
        assert buses[0].counters["received"] - base[0] == 50
        assert buses[1].counters["received"] == base[1]
    finally:
        await close_all(clients)
        for server in servers:
            await server.stop()
        for bus in buses:
            await bus.close()
