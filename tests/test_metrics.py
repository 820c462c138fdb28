"""The metrics path (enjent/metrics.py): Prometheus text, per worker and summed.

One process with real sockets, then a two-worker cluster where any worker
answers for all of them (from heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import pytest
from clusterutil import Cluster, wait_for
from wsutil import HOST, async_test, raw_http, recv, ws_connect

from enjent import WebSocketServer, WebSocketServerError
from enjent.server.metrics import WorkerSample, render_metrics

SAMPLE = re.compile(r"^(enjent_[a-z_]+)(\{[^}]*\})? (\d+)$")


def parse_metrics(text: str) -> dict[str, int]:
    """``name{labels}`` -> value; every line must be a comment or a sample."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        values[match.group(1) + (match.group(2) or "")] = int(match.group(3))
    return values


def test_render_sums_the_workers_and_keeps_each() -> None:
    text = render_metrics(
        [
            WorkerSample(1, 3, {"messages_received": 5, "connections_accepted": 4}, {"gaps": 2}),
            WorkerSample(0, 2, {"messages_received": 7, "handshakes_refused": 1}, {"gaps": 0}),
        ]
    )
    values = parse_metrics(text)
    assert values['enjent_connections{worker="0"}'] == 2
    assert values['enjent_connections{worker="1"}'] == 3
    assert values["enjent_cluster_connections"] == 5
    assert values["enjent_cluster_workers"] == 2
    assert values["enjent_cluster_messages_received_total"] == 12
    assert values['enjent_handshakes_total{worker="1",outcome="accepted"}'] == 4
    assert values['enjent_cluster_handshakes_total{outcome="refused"}'] == 1
    assert values['enjent_bus_gaps_total{worker="1"}'] == 2
    assert values["enjent_cluster_bus_gaps_total"] == 2
    # one TYPE line per family, before its samples
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert "# TYPE enjent_messages_received_total counter" in text


def test_render_without_a_bus_has_no_bus_families() -> None:
    assert "enjent_bus_" not in render_metrics([WorkerSample(0, 0, {})])


@async_test
async def test_metrics_path_counts_traffic() -> None:
    server = WebSocketServer()
    server.on_message(lambda client, message: client.send(message))
    async with server.serve(HOST, 0), ws_connect(server) as ws:
        for index in range(3):
            await ws.send(f"hello {index}")
            assert await recv(ws) == f"hello {index}"
        status, headers, body = await raw_http(
            server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await raw_http(server.port, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")  # 426
        _, _, again = await raw_http(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    values = parse_metrics(body.decode())
    assert values['enjent_connections{worker="0"}'] == 1
    assert values['enjent_messages_received_total{worker="0"}'] == 3
    assert values['enjent_messages_sent_total{worker="0"}'] == 3
    assert values['enjent_bytes_received_total{worker="0"}'] > 3 * len("hello 0")
    assert values['enjent_bytes_sent_total{worker="0"}'] >= 3 * (2 + len("hello 0"))
    assert values['enjent_handshakes_total{worker="0",outcome="accepted"}'] == 1
    later = parse_metrics(again.decode())
    assert later['enjent_handshakes_total{worker="0",outcome="refused"}'] == 1
    assert later['enjent_http_responses_total{worker="0"}'] == 1  # the first /metrics


@async_test
async def test_broadcast_counts_each_delivery() -> None:
    server = WebSocketServer()
    async with server.serve(HOST, 0), ws_connect(server) as one, ws_connect(server) as two:
        await asyncio.sleep(0.05)
        assert server.broadcast("news") == 2
        assert await recv(one) == "news" and await recv(two) == "news"
    assert server.stats["messages_sent"] == 2
    assert server.stats["bytes_sent"] == 2 * (2 + len("news"))


@async_test
async def test_metrics_path_can_be_turned_off_or_moved() -> None:
    server = WebSocketServer(metrics_path=None)
    async with server.serve(HOST, 0):
        status, _, _ = await raw_http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 426
    server = WebSocketServer()
    server.configure(metrics_path="/internal/metrics")
    async with server.serve(HOST, 0):
        status, _, _ = await raw_http(
            server.port, b"GET /internal/metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert status == 200


def test_configure_checks_like_the_constructor() -> None:
    server = WebSocketServer()
    with pytest.raises(TypeError, match="unknown WebSocketServer option"):
        server.configure(max_mesage_size=10)
    with pytest.raises(ValueError, match="max_message_size"):
        server.configure(max_message_size=0)
    with pytest.raises(ValueError, match="metrics_path"):
        server.configure(metrics_path="metrics")
    server.configure(trusted_proxies=["10.0.0.0/8"], ping_interval=None, compression=None)
    assert [str(network) for network in server.trusted_proxies] == ["10.0.0.0/8"]
    assert server.ping_interval is None and server.compression is None


@async_test
async def test_run_inside_a_running_loop_points_to_start() -> None:
    server = WebSocketServer()
    with pytest.raises(WebSocketServerError, match=r"await server\.start"):
        server.run(HOST, 0)


@pytest.mark.timeout(60)
def test_cluster_metrics_from_any_worker() -> None:
    from websockets.sync.client import connect

    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        with contextlib.ExitStack() as stack:
            clients = [
                stack.enter_context(connect(f"ws://127.0.0.1:{cluster.port}/", open_timeout=5))
                for _ in range(6)
            ]
            for ws in clients:
                ws.send("whoami")
                ws.recv(timeout=5)

            def summed() -> dict[str, int] | None:
                url = f"http://127.0.0.1:{cluster.port}/metrics"
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(url, timeout=2) as response:
                    values = parse_metrics(response.read().decode())
                complete = (
                    values["enjent_cluster_workers"] == 2
                    and values["enjent_cluster_connections"] == 6
                    and values["enjent_cluster_messages_received_total"] >= 6
                )
                return values if complete else None

            values = wait_for(summed, 10.0)
            per_worker = [values[f'enjent_connections{{worker="{w}"}}'] for w in (0, 1)]
            assert sum(per_worker) == 6
            assert values["enjent_cluster_bus_sent_total"] > 0
