"""Faults with real processes: the supervisor, 2 workers and the broker, under load.

Each test runs ``tests.cluster_app`` with ``--workers 2``, puts bounded
traffic on it, injects one fault (SIGKILL of a worker, of the broker, of
the supervisor; SIGTERM) and counts what the fault cost: messages sent and
received per client, bus gaps, close codes, recovery time. The numbers are
printed (``pytest -s``) and quoted in ``RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

from clusterutil import (
    Client,
    Cluster,
    close_all,
    healthz_of,
    open_client_on,
    port_is_free,
    wait_for,
    wait_for_gone,
)

from enjent import WebSocketServer

TIMEOUT = 60.0


def run(main: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main, TIMEOUT)

    return asyncio.run(bounded())


def report(name: str, **numbers: Any) -> None:
    print(f"\n[faults] {name}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


async def clients_on(port: int, shard: int, count: int) -> list[Client]:
    return [await open_client_on(port, shard) for _ in range(count)]


async def drain_until(client: Client, predicate: Any, timeout: float) -> list[str | bytes]:
    """Collect messages until ``predicate(messages)``; give up after ``timeout``."""
    messages: list[str | bytes] = []
    deadline = time.monotonic() + timeout
    while not predicate(messages) and time.monotonic() < deadline:
        try:
            messages.append(await client.next(timeout=max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            break
    return messages


def gaps(port: int, shard: int) -> int:
    value: int = healthz_of(port, shard)["bus"]["gaps"]
    return value


def test_worker_sigkill_under_load_loses_nothing_on_the_other_worker() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port

        async def main() -> None:
            survivors = await clients_on(port, 1, 6)
            doomed = await clients_on(port, 0, 4)
            try:
                for client in survivors:
                    assert await client.request("join:r") == "joined"
                victim = cluster.worker_pids()[0]
                sent_echo = dict.fromkeys(range(len(survivors)), 0)
                broadcasts = rooms = 0

                async def traffic() -> None:
                    nonlocal broadcasts, rooms
                    for step in range(300):  # ~3 s
                        for index, client in enumerate(survivors):
                            await client.ws.send(f"echo-{index}-{step}")
                            sent_echo[index] += 1
                        if step % 3 == 0:
                            await survivors[0].ws.send(f"broadcast:b{step}")
                            broadcasts += 1
                        if step % 3 == 1:
                            await survivors[1].ws.send(f"room:r:r{step}")
                            rooms += 1
                        if step == 100:
                            os.kill(victim, signal.SIGKILL)
                        await asyncio.sleep(0.01)

                await traffic()
                lost = 0
                for index, client in enumerate(survivors):

                    def complete(messages: list[Any], index: int = index) -> bool:
                        echoes = sum(str(m).startswith(f"echo-{index}-") for m in messages)
                        return echoes + sum(str(m)[:1] in "br" for m in messages) == (
                            sent_echo[index] + broadcasts + rooms
                        )

                    messages = await drain_until(client, complete, 5.0)
                    echoes = [m for m in messages if str(m).startswith(f"echo-{index}-")]
                    got_b = [m for m in messages if str(m).startswith("b")]
                    got_r = [m for m in messages if str(m).startswith("r")]
                    assert echoes == [f"echo-{index}-{step}" for step in range(300)]
                    lost += broadcasts - len(got_b) + rooms - len(got_r)
                    assert len(got_b) == broadcasts and len(got_r) == rooms
                # the killed worker's clients saw their connection drop
                await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in doomed)), 5)
                killed_at = time.monotonic()
                wait_for(lambda: cluster.worker_pids().get(0) not in (None, 0, victim), 15)
                newcomer = await open_client_on(port, 0, timeout=15)
                await survivors[0].ws.send("broadcast:across")
                assert "across" in await drain_until(newcomer, lambda m: "across" in m, 5)
                recovery = time.monotonic() - killed_at
                await newcomer.close()
                report(
                    "worker SIGKILL",
                    survivor_messages=sum(sent_echo.values()) + (broadcasts + rooms) * 6,
                    lost_on_survivor=lost,
                    cross_worker_check_after_traffic_s=round(recovery, 2),
                )
            finally:
                await close_all(survivors + doomed)

        run(main())


def test_broker_sigkill_loss_is_counted_as_gaps() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port

        async def main() -> None:
            sender = await open_client_on(port, 0)
            receiver = await open_client_on(port, 1)
            try:
                gaps_before = gaps(port, 1)
                broker = cluster.broker_pid()
                sent = 0
                killed_at = 0.0
                for step in range(400):  # ~4 s at 5 ms
                    await sender.ws.send(f"broadcast:m{step}")
                    sent += 1
                    if step == 100:
                        os.kill(broker, signal.SIGKILL)
                        killed_at = time.monotonic()
                    await asyncio.sleep(0.005)
                last = f"m{sent - 1}"
                received = await drain_until(receiver, lambda m: last in m, 10)
                got = [int(str(m)[1:]) for m in received if str(m).startswith("m")]
                assert got == sorted(got), "order kept"
                lost = sent - len(got)
                first_after = next(
                    (n for previous, n in itertools.pairwise(got) if n != previous + 1),
                    None,
                )
                gaps_after = wait_for(lambda: gaps(port, 1) - gaps_before >= lost and True, 5)
                gap_count = gaps(port, 1) - gaps_before
                assert cluster.broker_pid() != broker
                assert got[-1] == sent - 1, "traffic resumed"
                assert gaps_after and gap_count >= lost, (gap_count, lost)
                own = await drain_until(sender, lambda m: last in m, 5)
                assert len([m for m in own if str(m).startswith("m")]) == sent  # local: all
                report(
                    "broker SIGKILL",
                    cross_worker_sent=sent,
                    lost=lost,
                    gaps_counted=gap_count,
                    first_resumed_message=first_after,
                    outage_estimate_s=round(lost * 0.005, 2),  # one message per 5 ms
                    killed_at_step=100,
                )
                assert killed_at
            finally:
                await close_all([sender, receiver])

        run(main())


def test_supervisor_sigkill_workers_exit_and_free_the_port() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port
        children = {child.pid for child in cluster.children()}

        async def main() -> None:
            clients = [await open_client_on(port, shard) for shard in (0, 1, 0, 1)]
            try:
                for client in clients:
                    await client.request("hello")
                os.kill(cluster.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in clients)), 10)
                codes = [client.ws.close_code for client in clients]
                assert wait_for_gone(children, 10.0) == []
                gone = time.monotonic() - killed_at
                wait_for(lambda: port_is_free(port), 5)
                server = WebSocketServer()
                await server.start("127.0.0.1", port)  # a new server takes the port
                rebound = time.monotonic() - killed_at
                await server.stop()
                assert codes == [1001] * len(clients)
                assert rebound < 5.0
                report(
                    "supervisor SIGKILL",
                    client_close_codes=codes,
                    children_gone_after_s=round(gone, 2),
                    port_rebound_after_s=round(rebound, 2),
                )
            finally:
                await close_all(clients)

        run(main())


def test_sigterm_under_load_closes_every_client_with_1001() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port
        count = 60

        async def main() -> None:
            clients = [await open_client_on(port, index % 2) for index in range(count)]
            try:
                stop_traffic = asyncio.Event()

                async def chatter(client: Client) -> None:
                    step = 0
                    while not stop_traffic.is_set() and step < 1000:
                        try:
                            await client.ws.send(f"x{step}")
                        except Exception:
                            return
                        step += 1
                        await asyncio.sleep(0.01)

                tasks = [asyncio.create_task(chatter(client)) for client in clients]
                await asyncio.sleep(0.5)
                cluster.signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in clients)), 15)
                closed_after = time.monotonic() - signalled
                stop_traffic.set()
                await asyncio.gather(*tasks)
                codes = [client.ws.close_code for client in clients]
                states = {client.ws.state.name for client in clients}
                assert codes == [1001] * count
                assert states == {"CLOSED"}  # none half-open
                assert cluster.wait(15) == 0
                report(
                    "SIGTERM under load",
                    clients=count,
                    got_1001=codes.count(1001),
                    all_closed_after_s=round(closed_after, 2),
                )
            finally:
                await close_all(clients)

        run(main())
