"""A feed whose rooms remember: clients that reconnect get what they missed.

    python examples/feed.py --port 8000 [--workers N] [--bus URL] [--history N] [--history-ttl S]

The wire contract (other tools drive it):

- connect to ``/?room=R``, or ``/?room=R&since=EPOCH:OFFSET`` with the last
  position seen;
- the first message is the text ``{"type": "joined", "room": R, "epoch": E,
  "offset": O, "recovered": true|false|null}`` (``O`` the room's last offset at
  that moment; ``recovered`` null without ``since``, false when what was missed
  cannot all be replayed: show a fresh snapshot);
- then, when recovering, the missed publications, then the live ones, each
  ``{"type": "pub", "room": R, "epoch": E, "offset": O, "data": D}``;
- a client that sends the text ``{"publish": D}`` (``D`` a string) publishes
  ``D`` to its room: every member gets it, the sender included.

``Publisher(bus).room(R).broadcast(D)`` and the HTTP API (``enjent run
examples.feed:build_server --api ...``) reach the same clients in the same form:
the data is stored as published, and each worker puts the position in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from enjent import CloseCode, Joined, Publication, WebSocketClient, WebSocketServer


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def build_server(*, history: int = 100, history_ttl: float = 600.0) -> WebSocketServer:
    """The feed: every room keeps its last ``history`` publications for ``history_ttl`` s."""
    server = WebSocketServer()
    server.keep_history(prefix="", size=history, ttl=history_ttl)

    @server.format_publication
    def publication(item: Publication) -> str:
        data = item.data if isinstance(item.data, str) else item.data.decode("utf-8", "replace")
        message = {"type": "pub", "room": item.room, "epoch": item.epoch, "offset": item.offset}
        message["data"] = data
        return _json(message)

    @server.on_join
    def joined(client: WebSocketClient, join: Joined) -> None:
        client.send(
            _json(
                {
                    "type": "joined",
                    "room": join.room,
                    "epoch": join.epoch,
                    "offset": join.offset,
                    "recovered": join.recovered,
                }
            )
        )

    @server.on_connect
    def connected(client: WebSocketClient) -> None:
        query = client.request.query
        room = query.get("room")
        if not room:
            client.close(CloseCode.POLICY_VIOLATION, "connect to /?room=NAME")
            return
        client.join(room, since=query.get("since"))

    @server.on_message
    def received(client: WebSocketClient, message: str | bytes) -> None:
        try:
            request = json.loads(message)
        except ValueError:
            request = None
        data = request.get("publish") if isinstance(request, dict) else None
        if not isinstance(data, str):
            client.close(CloseCode.UNSUPPORTED_DATA, 'send {"publish": "text"}')
            return
        for room in client.rooms:
            server.room(room).broadcast(data)

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--bus",
        default=os.environ.get("ENJENT_BUS"),
        help="ipc:///DIR (the embedded bus at a stable address, for publishers) "
        "or nats://HOST:PORT,... (ENJENT_BUS)",
    )
    parser.add_argument(
        "--history", type=int, default=100, help="publications kept per room (default 100)"
    )
    parser.add_argument(
        "--history-ttl", type=float, default=600.0, help="seconds they are kept (default 600)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        server = build_server(history=args.history, history_ttl=args.history_ttl)
    except ValueError as exc:
        parser.error(str(exc))
    server.run(args.host, args.port, workers=args.workers, bus=args.bus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
