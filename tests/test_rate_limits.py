"""How often a client may send: ``max_message_rate`` with real processes on 2 workers.

``python examples/echo.py --workers 2 --max-message-rate 100``: a client that
sends 10,000 messages as fast as it can is closed with 3013 (rate limited:
back off) within 2 s, while a bystander's echo keeps its latency; a client
under the rate is never closed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import pytest
from clusterutil import REPO_ROOT, free_port, healthz, wait_for
from websockets.asyncio.client import connect

pytestmark = pytest.mark.timeout(90)


def test_a_flooding_client_is_closed_with_3013_and_bystanders_keep_their_echo() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "examples/echo.py", "--port", str(port), "--workers", "2",
         "--max-message-rate", "100", "--health-detail"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(healthz(port)["workers"]) == 2, 20)

        async def p99(ws: object, seconds: float) -> float:
            samples = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sent = time.monotonic()
                await ws.send("bystander")  # type: ignore[attr-defined]
                assert await asyncio.wait_for(ws.recv(), 5) == "bystander"  # type: ignore[attr-defined]
                samples.append(time.monotonic() - sent)
                await asyncio.sleep(0.02)  # 50 a second: under the limit, never closed
            samples.sort()
            return samples[int(0.99 * len(samples))]

        flood_script = f"""
import asyncio, time
from websockets.asyncio.client import connect
async def main():
    async with connect("ws://127.0.0.1:{port}/", compression=None, max_queue=None) as ws:
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
                quiet = await p99(bystander, 3)
                # the flood from a process of its own: this loop measures, nothing else
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", flood_script, stdout=asyncio.subprocess.PIPE
                )
                loud = await p99(bystander, 2)
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
    finally:
        server.terminate()
        try:
            server.wait(15)
        finally:
            server.kill()
