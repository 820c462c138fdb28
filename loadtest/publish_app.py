"""The app of ``python -m loadtest publish``: every client joins the room named by ``?room=``.

It imports ``enjent`` (it is a server); the receivers of the benchmark only
speak the wire protocol. Nothing is sent on connect, so the room's traffic is
the publisher's alone.
"""

from __future__ import annotations

from enjent import WebSocketClient, WebSocketServer

server = WebSocketServer(ping_interval=None, max_connections=20_000)


@server.on_connect
def join(client: WebSocketClient) -> None:
    room = client.request.query.get("room")
    if room:
        client.join(room)
