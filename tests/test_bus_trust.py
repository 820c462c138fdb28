"""The bus as a trust boundary: forged and broken envelopes from a rogue NATS client.

Real processes: a nats-server (from the test extra), ``enjent run
tests.cluster_app:server --workers 2 --bus nats://...`` and, in the test's own
process, a rogue nats-py client that publishes envelopes by hand. First with no
authorization on NATS (the simplest setup, where anyone may publish anywhere):
what the workers must survive on their own. Then with the NATS authorization
layout the README documents: NATS itself refuses a publisher's liveness
envelopes, while the same user still publishes data and asks presence.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from clusterutil import (
    Cluster,
    close_all,
    healthz,
    healthz_of,
    open_client,
    open_client_on,
    wait_for,
)
from natsutil import cluster_on_nats

from enjent.cluster.bus import Kind

pytestmark = pytest.mark.timeout(120)

WORKER = ("worker", "worker-secret-0123")
PUBLISHER = ("publisher", "publisher-secret-0123")

#: The NATS authorization of the README ("Who can publish"), with the users above.
AUTHORIZATION = f"""
authorization {{
  users: [
    {{user: {WORKER[0]}, password: {WORKER[1]},
      permissions: {{publish: "enjent.>", subscribe: "enjent.>"}}}}
    {{user: {PUBLISHER[0]}, password: {PUBLISHER[1]}, permissions: {{
      publish: ["enjent.all", "enjent.r.>", "enjent.w.>", "enjent.ctl"],
      subscribe: ["enjent.hb", "enjent.p.>"]
    }}}}
  ]
}}
"""


@pytest.fixture
def open_nats() -> Iterator[tuple[Cluster, str]]:
    with cluster_on_nats() as (cluster, url):
        yield cluster, url


def envelope(kind: Kind, origin: int, generation: str, seq: int, *fields: Any) -> bytes:
    """Packed by hand, not by ``bus.encode``: a rogue is free to write anything."""
    return msgpack.packb([int(kind), origin, generation, seq, *fields], use_bin_type=True)  # type: ignore[no-any-return]


async def rogue(url: str, **options: Any) -> Any:
    import nats

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **options)
    nc.errors = errors  # type: ignore[attr-defined]
    return nc


def _metric(port: int, name: str) -> dict[int, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    pattern = rf'^enjent_{name}\{{worker="(\d+)"\}} ([0-9.e+]+)$'
    return {int(w): float(v) for w, v in re.findall(pattern, text, re.M)}


def test_forged_liveness_envelopes_change_nothing_but_counters(
    open_nats: tuple[Cluster, str],
) -> None:
    """On a NATS with no authorization: the sequence overflow (seq 0 then 2**64-1), a
    forged DEAD for a live worker, a forged heartbeat of a live shard with another
    generation, 20 fake workers claiming 2**63 clients: heartbeats go on, status stays
    ok, the counts stay true, and sends to the attacked worker's clients succeed."""
    cluster, url = open_nats
    port = cluster.port
    before = healthz(port)
    real = {w["shard"]: w for w in before["workers"]}

    async def main() -> None:
        nc = await rogue(url)
        sender = await open_client_on(port, 1)
        target = await open_client_on(port, 0)
        try:
            for seq in (0, 0, 0, 2**64 - 1, 2**64 - 1, 2**64 - 1):
                await nc.publish("enjent.hb", envelope(Kind.HELLO, 7, "evil", seq))
            for fake in range(20):
                await nc.publish(
                    "enjent.hb",
                    envelope(Kind.HEARTBEAT, 100 + fake, "fake", 1, 4242, 2**63, {}),
                )
            await nc.flush()
            pid0, generation0 = real[0]["pid"], real[0]["generation"]
            sent_ok = 0
            for index in range(20):
                await nc.publish(
                    "enjent.hb", envelope(Kind.DEAD, -1, "b", index + 1, 0, pid0, False)
                )
                await nc.publish(
                    "enjent.hb", envelope(Kind.HEARTBEAT, 0, "other", index + 1, pid0, 0, {})
                )
                await nc.flush()
                await asyncio.sleep(0.1)
                if await sender.request(f"send:{target.id}:n{index}") == "sent:True":
                    sent_ok += 1
                assert await target.next() == f"n{index}"
            assert sent_ok == 20
            seen_by_1 = {w["shard"]: w for w in healthz_of(port, 1)["workers"]}
            assert seen_by_1[0]["generation"] == generation0  # the real one, not "other"
        finally:
            await close_all([sender, target])
            await nc.close()

    asyncio.run(main())
    time.sleep(2.5)  # two heartbeats more
    after = healthz(port)
    assert after["status"] == "ok", after
    assert after["clients"] < 1000, after  # not 1.8e20
    shards = sorted(
        w["shard"] for w in after["workers"] if w["pid"] in (real[0]["pid"], real[1]["pid"])
    )
    assert shards == [0, 1], after["workers"]
    assert after["bus"]["heartbeats"] > before["bus"]["heartbeats"] + 2, (before, after)
    assert after["bus"]["malformed"] > 0
    log = cluster.log()
    assert "Traceback" not in log and "died" not in log, log[-3000:]


def test_twenty_thousand_forged_gaps_add_at_most_a_hundred_log_lines(
    open_nats: tuple[Cluster, str],
) -> None:
    cluster, url = open_nats
    lines_before = len(cluster.log().splitlines())

    async def main() -> None:
        nc = await rogue(url)
        try:
            for index in range(20_000):  # every other sequence number: 19,999 gaps
                body = envelope(Kind.CLOSE, -9, "gaps", 1 + 2 * index, "0-none-1", 1000, "")
                await nc.publish("enjent.w.0", body)
                if index % 1000 == 999:
                    await nc.flush()
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(main())

    def counted() -> bool:
        return sum(_metric(cluster.port, "bus_gaps_total").values()) >= 19_000

    wait_for(counted, 15)
    added = cluster.log().splitlines()[lines_before:]
    assert len(added) <= 100, added[:5]
    assert healthz(cluster.port)["status"] == "ok"


def test_the_documented_authorization_keeps_publishers_off_liveness() -> None:
    """With the README's NATS users: the publisher's user is refused by NATS itself when it
    publishes a heartbeat, a HELLO or a DEAD; the same user publishes data and asks
    presence; a client without a user cannot connect at all."""
    env = {"ENJENT_NATS_USER": WORKER[0], "ENJENT_NATS_PASSWORD": WORKER[1]}
    with cluster_on_nats(AUTHORIZATION, env) as (cluster, url):

        async def main() -> None:
            nc = await rogue(url, user=PUBLISHER[0], password=PUBLISHER[1])
            try:
                for kind, fields in (
                    (Kind.HEARTBEAT, (4242, 5, {})),
                    (Kind.HELLO, ()),
                    (Kind.DEAD, (0, 4242, False)),
                ):
                    await nc.publish("enjent.hb", envelope(kind, 0, "forged", 9, *fields))
                await nc.flush()
                await asyncio.sleep(0.5)
                violations = [e for e in nc.errors if "permissions violation" in e.lower()]
                assert len(violations) == 3, nc.errors
            finally:
                await nc.close()
            with pytest.raises(Exception):  # noqa: B017 - nats-py's own error types
                await rogue(url)  # no user: refused
            client = await open_client(cluster.port)
            try:
                script = (
                    "from enjent import Publisher\n"
                    f"with Publisher({url!r}) as pub:\n"
                    "    pub.broadcast('allowed')\n"
                    "    print('presence', pub.fetch_clients().total)\n"
                )
                done = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-c", script],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "ENJENT_NATS_USER": PUBLISHER[0],
                         "ENJENT_NATS_PASSWORD": PUBLISHER[1]},
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert "presence 1" in done.stdout, done.stdout
                assert await client.next() == "allowed"
            finally:
                await close_all([client])

        asyncio.run(main())
        health = healthz(cluster.port)
        assert len(health["workers"]) == 2 and health["status"] == "ok", health
        assert health["bus"]["malformed"] == 0, health  # NATS stopped them first


def test_twenty_consecutive_ids_of_a_worker_cannot_be_told_from_each_other() -> None:
    from enjent.server.ids import RANDOM_BYTES, ClientIds

    ids = ClientIds(3)
    made = [ids.make() for _ in range(20)]
    assert len(set(made)) == 20 and all(len(i) < 40 for i in made)
    tails = [int(i.rsplit("-", 1)[1][-2 * RANDOM_BYTES :], 16) for i in made]
    assert len(set(tails)) == 20
    steps = {b - a for a, b in itertools.pairwise(tails)}
    assert len(steps) > 10  # no constant stride to count along
    assert all(ClientIds.parse(i) is not None and ClientIds.parse(i).shard == 3 for i in made)  # type: ignore[union-attr]


def test_a_presence_flood_leaves_an_innocent_clients_echo_alone() -> None:
    """50 clients asking presence in a loop over 3000 idle clients on 2 workers: an
    innocent client's echo p99 stays within 3x its quiet p99 + 10 ms."""
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port
        flood_script = f"""
import asyncio, time
from websockets.asyncio.client import connect
async def asker():
    async with connect("ws://127.0.0.1:{port}/", max_size=None) as ws:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            await ws.send("presence")
            try:
                await asyncio.wait_for(ws.recv(), 2)
            except TimeoutError:
                pass
async def main():
    await asyncio.gather(*(asker() for _ in range(50)))
asyncio.run(main())
"""

        async def main() -> tuple[float, float]:
            from clusterutil import open_clients

            idle = await open_clients(port, 3000, batch=100)
            innocent = await open_client(port)

            async def p99(seconds: float) -> float:
                samples = []
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    sent = time.monotonic()
                    assert await innocent.request("echo me") == "echo me"
                    samples.append(time.monotonic() - sent)
                    await asyncio.sleep(0.01)
                samples.sort()
                return samples[int(0.99 * len(samples))]

            quiet = await p99(4)
            flood = await asyncio.create_subprocess_exec(sys.executable, "-c", flood_script)
            await asyncio.sleep(1.0)
            loud = await p99(5)
            await asyncio.wait_for(flood.wait(), 30)
            await close_all([*idle, innocent])
            return quiet, loud

        quiet, loud = asyncio.run(main())
        assert loud <= 3 * quiet + 0.010, (quiet, loud)
        refused = sum(_metric(port, "bus_presence_refused_total").values())
        print(f"echo p99 {quiet * 1000:.2f} ms quiet, {loud * 1000:.2f} ms in the flood")
        print(f"presence queries refused: {refused:.0f}")
