"""The app of ``python -m loadtest.history_bench``: rooms ``kept:*`` keep history, others not.

A client joins the room named by ``?room=`` (with ``&since=EPOCH:OFFSET`` to
recover); with ``&report=1`` it first gets ``{"epoch": E, "offset": O,
"recovered": R}``. Whatever a client sends is broadcast to its rooms, as is
(the default format: no position added), so that the two kinds of room cost
the same to deliver and differ only by the history.
"""

from __future__ import annotations

import json

from enjent import Joined, WebSocketClient, WebSocketServer

server = WebSocketServer(ping_interval=None, compression=None, max_connections=20_000)
server.keep_history(prefix="kept:", size=2000, ttl=600.0)


@server.on_join
def joined(client: WebSocketClient, join: Joined) -> None:
    if client.request.query.get("report"):
        client.send(
            json.dumps({"epoch": join.epoch, "offset": join.offset, "recovered": join.recovered})
        )


@server.on_connect
def join(client: WebSocketClient) -> None:
    query = client.request.query
    room = query.get("room")
    if room:
        client.join(room, since=query.get("since") if room.startswith("kept:") else None)


@server.on_message
def say(client: WebSocketClient, message: str | bytes) -> None:
    for room in client.rooms:
        server.room(room).broadcast(message)
