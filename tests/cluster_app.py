"""The app the cluster and supervisor tests run: ``enjent run tests.cluster_app:server``.

Text commands (anything else is echoed):

- ``broadcast:<x>``: ``server.broadcast(x)``
- ``join:<room>``: join the room, reply ``joined``
- ``room:<room>:<x>``: ``server.room(room).broadcast(x)``
- ``send:<client_id>:<x>``: ``server.send(client_id, x)``, reply ``sent:True|False``
- ``whoami``: reply the client's id
- ``count``: reply ``server.client_count``
- ``get:<id>``: reply ``True`` or ``False``: ``server.get_client(id) is not None``
- ``local``: reply the number of this worker's clients (``server.local_clients``)
- ``presence`` / ``presence:<room>``: ``await server.fetch_clients(room=...)``,
  reply ``<total> <rows> <workers answered> <workers missing>`` (comma lists),
  or ``refused`` over the worker's presence rate limit

With ``ENJENT_TEST_HISTORY=1`` rooms ``kept-*`` keep history (the multi-host
test: JetStream on the NATS nodes); a join of one is followed by
``position:<epoch>:<offset>:<recovered>``, and ``recover:<room>:<epoch>:<offset>``
joins from that position (the missed publications follow the position line).
"""

from __future__ import annotations

import asyncio
import os

from enjent import BusError, Joined, WebSocketClient, WebSocketServer


def build_server() -> WebSocketServer:
    app = WebSocketServer(close_timeout=2.0, ping_interval=None)

    @app.on_message
    def on_message(client: WebSocketClient, message: str | bytes) -> None:
        if not isinstance(message, str):
            client.send(message)
            return
        command, sep, rest = message.partition(":")
        if not sep:
            if message == "whoami":
                client.send(client.id)
            elif message == "count":
                client.send(str(app.client_count))
            elif message == "local":
                client.send(str(len(app.local_clients)))
            elif message == "presence":
                _reply_presence(client, None)
            else:
                client.send(message)
        elif command == "broadcast":
            app.broadcast(rest)
        elif command == "join":
            client.join(rest)
            client.send("joined")
        elif command == "recover":
            room, _, since = rest.partition(":")
            client.join(room, since=since)
        elif command == "room":
            room, _, payload = rest.partition(":")
            app.room(room).broadcast(payload)
        elif command == "send":
            target, _, payload = rest.partition(":")
            client.send(f"sent:{app.send(target, payload)}")
        elif command == "get":
            client.send(str(app.get_client(rest) is not None))
        elif command == "presence":
            _reply_presence(client, rest)
        else:
            client.send(message)

    def _reply_presence(client: WebSocketClient, room: str | None) -> None:
        async def ask() -> None:
            try:
                presence = await app.fetch_clients(room=room, limit=100_000, timeout=1.0)
            except BusError:  # over the presence rate limit: said, not raised
                client.send("refused")
                return
            workers = ",".join(map(str, presence.workers))
            missing = ",".join(map(str, presence.missing_workers)) or "-"
            client.send(f"{presence.total} {len(presence)} {workers} {missing}")

        task = asyncio.get_running_loop().create_task(ask())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Task[None]] = set()
    if os.environ.get("ENJENT_TEST_HISTORY") == "1":
        app.keep_history(prefix="kept-", size=1000, ttl=600.0)

        @app.on_join
        def position(client: WebSocketClient, join: Joined) -> None:
            client.send(f"position:{join.epoch}:{join.offset}:{join.recovered}")

    return app


server = build_server()
