"""The server side of ``loadtest.cluster_scale``: echo, plus a presence probe.

Like the micro-benchmarks, this module imports ``enjent``: it is the app the
server under test runs (``python -m enjent run loadtest.cluster_app:server
--workers N``), not part of the load generator. Every message is echoed,
except the text ``presence:<limit>[:<room>]``, answered with one JSON object:
the figures of ``await server.fetch_clients(limit=..., room=...)`` as asked
by the worker that holds the asking client — its latency, the USS this
worker grew by while it held the answer, and which workers answered.
"""

from __future__ import annotations

import asyncio
import json
import time

import psutil

from enjent import WebSocketClient, WebSocketServer

server = WebSocketServer(ping_interval=None, max_connections=25_000, health_detail=True)
_tasks: set[asyncio.Task[None]] = set()


async def _presence(client: WebSocketClient, limit: int, room: str | None) -> None:
    process = psutil.Process()
    before = process.memory_full_info().uss
    started = time.perf_counter()
    presence = await server.fetch_clients(room=room, limit=limit, timeout=5.0)
    seconds = time.perf_counter() - started
    grown = process.memory_full_info().uss - before  # while the answer is held
    client.send(
        json.dumps(
            {
                "seconds": round(seconds, 4),
                "total": presence.total,
                "rows": len(presence),
                "workers": presence.workers,
                "missing_workers": presence.missing_workers,
                "partial": presence.partial,
                "uss_grown": grown,
                "asked_by": server.shard,
            }
        )
    )
    del presence


@server.on_message
def echo(client: WebSocketClient, message: str | bytes) -> None:
    if type(message) is str and message.startswith("presence:"):
        limit, _, room = message[len("presence:") :].partition(":")
        task = asyncio.get_running_loop().create_task(_presence(client, int(limit), room or None))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    else:
        client.send(message)
