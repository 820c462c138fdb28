"""Soak: a bounded mixed load on a two-worker cluster, memory and descriptors sampled.

Clients connect and disconnect, echo, join rooms, and send room and global
broadcasts across both workers for a fixed time. Pass criteria: the RSS of
the whole process tree (supervisor, workers, broker) grows less than
``RSS_GROWTH_BOUND`` after warm-up, the descriptors come back to their
baseline once the clients are gone, the bus counts no gap, and every echo
comes back. ``test_soak_short`` (35 s) runs in the default suite;
``test_soak_long`` (4 min) with ``python -m pytest -m slow tests/test_soak.py``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import psutil
import pytest
from clusterutil import Client, Cluster, close_all, healthz_of, open_client, wait_for

MIB = 1024 * 1024
RSS_GROWTH_BOUND = 20 * MIB
WARM_UP = 8.0


def tree(cluster: Cluster) -> list[psutil.Process]:
    return [psutil.Process(cluster.pid), *cluster.children()]


def tree_rss(cluster: Cluster) -> int:
    return sum(process.memory_info().rss for process in tree(cluster))


def tree_fds(cluster: Cluster) -> int:
    return sum(process.num_fds() for process in tree(cluster))


async def soak(cluster: Cluster, duration: float, seed: int = 7) -> dict[str, Any]:
    port = cluster.port
    rng = random.Random(seed)
    clients: list[Client] = await asyncio.gather(*(open_client(port) for _ in range(40)))
    for index, client in enumerate(clients):
        await client.request(f"join:room{index % 4}")
    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    counts = {"echo_sent": 0, "echo_received": 0, "broadcasts": 0, "room": 0, "reconnects": 0}
    next_sample = started
    while time.monotonic() - started < duration:
        for _ in range(20):
            client = rng.choice(clients)
            roll = rng.random()
            if roll < 0.6:
                token = f"echo{counts['echo_sent']}"
                counts["echo_sent"] += 1
                await client.ws.send(token)
                counts["echo_received"] += await _await_echo(client, token)
            elif roll < 0.75:
                await client.ws.send(f"room:room{rng.randrange(4)}:" + "r" * rng.randrange(2000))
                counts["room"] += 1
            elif roll < 0.85:
                await client.ws.send("broadcast:" + "b" * rng.randrange(500))
                counts["broadcasts"] += 1
            else:  # churn: one client leaves, a new one comes and joins a room
                index = clients.index(client)
                await client.close()
                clients[index] = await open_client(port)
                await clients[index].request(f"join:room{index % 4}")
                counts["reconnects"] += 1
        for client in clients:  # what the broadcasts left in the inboxes
            client.pending()
        await asyncio.sleep(0.02)
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - started, tree_rss(cluster)))
            next_sample = now + 1.0
    await close_all(clients)
    return {"samples": samples, **counts}


async def _await_echo(client: Client, token: str) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = await client.next(timeout=5)
        if message == token:
            return 1
    return 0


def run_soak(duration: float) -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        fds_baseline = tree_fds(cluster)

        async def main() -> dict[str, Any]:
            return await asyncio.wait_for(soak(cluster, duration), duration + 60)

        result = asyncio.run(main())
        samples = result["samples"]
        after_warm_up = [rss for at, rss in samples if at >= WARM_UP]
        growth = max(after_warm_up) - after_warm_up[0]
        wait_for(lambda: healthz_of(cluster.port, 0)["clients"] == 0, 10)
        fds_after = wait_for(lambda: tree_fds(cluster) <= fds_baseline and tree_fds(cluster), 10)
        bus = [healthz_of(cluster.port, shard)["bus"] for shard in (0, 1)]
        print(
            f"\n[soak] {duration:.0f}s: echoes {result['echo_received']}/{result['echo_sent']}, "
            f"room {result['room']}, broadcasts {result['broadcasts']}, "
            f"reconnects {result['reconnects']}, RSS tree {after_warm_up[0] / MIB:.1f} -> "
            f"{after_warm_up[-1] / MIB:.1f} MiB (max growth {growth / MIB:.1f} MiB), "
            f"fds {fds_baseline} -> {fds_after}, gaps {[b['gaps'] for b in bus]}, "
            f"dropped {[b['dropped'] for b in bus]}, malformed {[b['malformed'] for b in bus]}"
        )
        assert result["echo_received"] == result["echo_sent"]
        assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / MIB:.1f} MiB after warm-up"
        assert [b["gaps"] for b in bus] == [0, 0]
        assert [b["malformed"] for b in bus] == [0, 0]


def test_soak_short() -> None:
    run_soak(35.0)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_soak_long() -> None:
    run_soak(240.0)
