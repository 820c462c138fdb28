"""How often a client may send: ``max_message_rate`` with real processes on 2 workers.

``python examples/echo.py --workers 2 --max-message-rate 100``: a client that
sends 10,000 messages as fast as it can is closed with 3013 (rate limited:
back off) within 2 s, while a bystander's echo keeps its latency; a client
under the rate is never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from clusterutil import REPO_ROOT, Cluster, free_port, healthz, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.timeout(90)


@contextlib.contextmanager
def echo_example(*args: str) -> Iterator[int]:
    """``examples/echo.py --workers 2 ARGS`` on a free port, until the block ends; its port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "examples/echo.py", "--port", str(port), "--workers", "2",
         "--health-detail", *args],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(healthz(port)["workers"]) == 2, 20)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(15)
        finally:
            server.kill()


def test_a_flooding_client_is_closed_with_3013_and_bystanders_keep_their_echo() -> None:
    with echo_example("--max-message-rate", "100") as port:

        async def p99(ws: object, seconds: float) -> float:
            samples = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sent = time.monotonic()
                await ws.send("bystander")  # type: ignore[attr-defined]
                assert await asyncio.wait_for(ws.recv(), 5) == "bystander"  # type: ignore[attr-defined]
                samples.append(time.monotonic() - sent)
                await asyncio.sleep(0.015)  # under 100 a second: never closed
            samples.sort()
            return samples[int(0.99 * len(samples))]

        flood_script = f"""
import os
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # a client elsewhere: not our CPU
import asyncio, sys, time
from websockets.asyncio.client import connect
async def main():
    async with connect("ws://127.0.0.1:{port}/", compression=None, max_queue=None) as ws:
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        try:
            for index in range(10_000):
                await ws.send(f"flood {{index}}")
        except Exception:
            pass
        await asyncio.wait_for(ws.wait_closed(), 10)
        print(ws.close_code, time.monotonic() - started)
asyncio.run(main())
"""

        async def main() -> tuple[float, float, str]:
            url = f"ws://127.0.0.1:{port}/"
            async with connect(url, compression=None) as bystander:
                # the flood from a process of its own, connected before anything is
                # measured: this loop measures, nothing else
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", flood_script,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                assert flooder.stdin is not None and flooder.stdout is not None
                assert (await asyncio.wait_for(flooder.stdout.readline(), 30)).strip() == b"ready"
                quiet = await p99(bystander, 3)
                flooder.stdin.write(b"go\n")
                await flooder.stdin.drain()
                loud = await p99(bystander, 3)
                output, _ = await asyncio.wait_for(flooder.communicate(), 30)
                return quiet, loud, output.decode()

        quiet, loud, output = asyncio.run(main())
        code, closed_after = output.split()
        assert int(code) == 3013, output
        assert float(closed_after) < 2.0, output
        assert loud <= 1.2 * quiet + 0.002, (quiet, loud)

        def counted() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
            return "enjent_cluster_rate_limited_total 1" in text

        wait_for(counted, 5)


async def _try(port: int, source: str) -> int:
    """101, or the HTTP status that refused the upgrade."""
    try:
        ws = await connect(
            f"ws://127.0.0.1:{port}/", open_timeout=5, local_addr=(source, 0), compression=None
        )
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    _open.append(ws)
    return 101


_open: list[Any] = []


def test_connections_per_address_hold_on_the_host_across_both_workers() -> None:
    """``--max-connections-per-ip 50`` on 2 workers: 150 connections from 127.0.0.2 give
    50 ± 2 accepted (spread over both workers: the count is the host's) and 429 for the
    rest; 127.0.0.3 still connects; a closed connection frees its place."""
    with echo_example("--max-connections-per-ip", "50") as port:

        async def main() -> tuple[list[int], int, int, list[int]]:
            statuses = []
            for _ in range(0, 150, 10):  # a few at a time: both workers at once
                statuses += await asyncio.gather(*(_try(port, "127.0.0.2") for _ in range(10)))
            await asyncio.sleep(1.5)  # the counts travel in the heartbeats
            local = [w["clients"] for w in healthz(port)["workers"]]
            other = await _try(port, "127.0.0.3")
            await _open.pop().close()  # 127.0.0.3's
            await _open[0].close()  # one of 127.0.0.2's leaves: a place is free
            del _open[0]
            again = await _try(port, "127.0.0.2")
            for ws in _open:
                await ws.close()
            _open.clear()
            return statuses, other, again, local

        statuses, other, again, local = asyncio.run(main())
        accepted = statuses.count(101)
        assert 48 <= accepted <= 52, statuses
        assert statuses.count(429) == 150 - accepted, statuses
        assert all(count > 0 for count in local), local  # both workers held some
        assert other == 101 and again == 101
        _open.clear()


def test_a_reconnect_storm_from_one_address_is_held_to_its_rate() -> None:
    """20 handshakes a second per address: 1000 handshakes in a tight loop from 127.0.0.2
        (a process standing for a client elsewhere: SCHED_IDLE) get at most 20 through in each
    second they touch,
        and 127.0.0.3's handshakes keep at least 80 % of their rate."""
    env = {"LIMITS_HANDSHAKES": "20"}
    with Cluster(workers=2, app="tests.limits_app:server", env=env) as cluster:
        cluster.wait_ready()
        port = cluster.port
        storm_script = f"""
import asyncio, os, time
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
async def main():
    accepted = refused = 0
    started = time.monotonic()
    for _ in range(1000):
        try:
            ws = await connect("ws://127.0.0.1:{port}/", local_addr=("127.0.0.2", 0),
                               compression=None, open_timeout=5)
            accepted += 1
            await ws.close()
        except InvalidStatus:
            refused += 1
    print(accepted, refused, time.monotonic() - started)
asyncio.run(main())
"""

        async def rate(seconds: float) -> float:
            done = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                assert await _try(port, "127.0.0.3") == 101
                await _open.pop().close()
                done += 1
                await asyncio.sleep(0.06)  # under 20 a second: never limited itself
            return done / seconds

        async def main() -> tuple[float, float, str]:
            quiet = await rate(3)
            storm = await asyncio.create_subprocess_exec(
                sys.executable, "-c", storm_script, stdout=asyncio.subprocess.PIPE
            )
            await asyncio.sleep(0.5)
            loud = await rate(3)
            output, _ = await asyncio.wait_for(storm.communicate(), 60)
            return quiet, loud, output.decode()

        quiet, loud, output = asyncio.run(main())
        accepted, refused, seconds = output.split()
        assert int(accepted) + int(refused) == 1000
        # a window per second: at most 20 in each second the storm touched
        assert int(accepted) <= 20 * (math.floor(float(seconds)) + 2), output
        assert int(refused) >= 900, output
        assert loud >= 0.8 * quiet, (quiet, loud)
