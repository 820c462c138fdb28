"""Chat with rooms: a browser page at ``/`` and a WebSocket on the same port.

Every client starts in the room ``lobby`` (or ``?room=``). A text message
``/join <room>`` moves the sender to that room; any other text goes to everyone
in the sender's room (the sender included), on every worker. The page
(``index.html`` beside this file, plain HTML and JavaScript) is served by the
handshake hook.

Rooms remember their last 100 messages for 10 minutes: each message in a room
carries its ``epoch`` and ``offset``, and a page that reconnects comes back with
``?room=R&since=EPOCH:OFFSET`` and gets what was said meanwhile (its ``joined``
message says ``"recovered": false`` when that cannot be).

    python examples/chat/app.py --host 127.0.0.1 --port 8000 [--workers N] [--bus ipc:///DIR]

or ``enjent run examples.chat.app:server``. The page asks for a name,
then connects; upgrades whose ``Origin`` is another site are refused (403),
and the page is sent with a Content-Security-Policy. Messages sent to clients are JSON
objects with a ``type``: ``welcome``, ``joined``, ``message``, ``presence``,
``error``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from enjent import Joined, Publication, Request, Response, WebSocketClient, WebSocketServer

DEFAULT_ROOM = "lobby"
MAX_TEXT = 2000
ROOM_NAME = re.compile(r"[\w.-]{1,32}")
PAGE = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")


class ChatClient(WebSocketClient):
    """A chat user: a display name (``?name=`` in the URL) and one current room."""

    __slots__ = ("name", "room")

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        name = (request.query.get("name") or "").strip()[:32]
        self.name = name or "guest"
        self.room = DEFAULT_ROOM


def encode(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def _digest(pattern: str) -> str:
    """The CSP source of the one inline <script> or <style> of the page (by its hash)."""
    match = re.search(pattern, PAGE, re.S)
    assert match, f"index.html has no {pattern}"
    digest = hashlib.sha256(match.group(1).encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


#: The page may run its own script and style, connect back to its own host,
#: and nothing else (no other script, frame, form target or plugin).
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_digest(r'<script>(.*?)</script>')}; "
    f"style-src {_digest(r'<style>(.*?)</style>')}; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = [
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


def same_origin(request: Request, allowed: frozenset[str]) -> bool:
    """Whether the page that opens this WebSocket came from this server.

    Browsers always send ``Origin``; a page of another site connecting here
    (cross-site WebSocket hijacking, with the user's cookies) has an Origin
    whose host differs from the ``Host`` it connects to. Clients that are
    not browsers send no Origin and are not that threat: they are let in.
    """
    origin = request.headers.get("Origin")
    if origin is None or origin in allowed:
        return True
    host = (request.headers.get("Host") or "").lower()
    return urlsplit(origin).netloc.lower() == host and bool(host)


def build_server(*, allowed_origins: Iterable[str] = (), **options: object) -> WebSocketServer:
    """The chat server; ``options`` go to :class:`~enjent.WebSocketServer`.

    WebSocket upgrades must come from the page itself (same host), or from
    one of ``allowed_origins`` (e.g. ``https://chat.example.com`` when the
    page is served elsewhere); others get 403.
    """
    options.setdefault("client_class", ChatClient)
    options.setdefault("max_message_size", 16 * 1024)
    server = WebSocketServer(**options)  # type: ignore[arg-type]
    server.keep_history(prefix="", size=100, ttl=600.0)
    allowed = frozenset(allowed_origins)

    @server.format_publication
    def positioned(item: Publication) -> str | bytes:
        """A room's JSON message with its position put in (they are all JSON objects)."""
        data = item.data
        if not isinstance(data, str) or not data.startswith("{"):
            return data
        return f'{{"epoch":{json.dumps(item.epoch)},"offset":{item.offset},{data[1:]}'

    @server.on_join
    def joined(client: WebSocketClient, join: Joined) -> None:
        client.send(
            encode(
                "joined",
                room=join.room,
                epoch=join.epoch,
                offset=join.offset,
                recovered=join.recovered,
            )
        )

    @server.on_handshake
    def page(request: Request) -> Response | None:
        """Plain HTTP requests for ``/`` get the page; upgrades from elsewhere get 403."""
        if "websocket" in request.headers.get_tokens("Upgrade"):
            if not same_origin(request, allowed):
                return Response(403, "cross-origin WebSocket refused\n")
            return None
        if request.path in ("/", "/index.html"):
            return Response(
                200, PAGE, content_type="text/html; charset=utf-8", headers=PAGE_HEADERS
            )
        return Response(404, "not found\n", headers=[("X-Content-Type-Options", "nosniff")])

    def enter(client: ChatClient, room: str, since: str | None = None) -> None:
        client.room = room
        client.join(room, since=since)  # "joined" (on_join), what was missed, then live
        server.room(room).broadcast(
            encode("presence", room=room, name=client.name, event="joined"), exclude=client
        )

    def leave(client: ChatClient) -> None:
        room = client.room
        client.leave(room)
        server.room(room).broadcast(encode("presence", room=room, name=client.name, event="left"))

    @server.on_connect
    def connected(client: ChatClient) -> None:
        client.send(encode("welcome", name=client.name, id=client.id))
        query = client.request.query
        room = query.get("room") or DEFAULT_ROOM
        if not ROOM_NAME.fullmatch(room):
            room = DEFAULT_ROOM
        enter(client, room, query.get("since"))

    @server.on_message
    def message(client: ChatClient, message: str | bytes) -> None:
        if not isinstance(message, str):
            client.send(encode("error", text="send text messages"))
            return
        text = message.strip()
        if text.startswith("/join"):
            room = text[len("/join") :].strip()
            if not ROOM_NAME.fullmatch(room):
                client.send(encode("error", text="usage: /join <room> (letters, digits, . - _)"))
            elif room != client.room:
                leave(client)
                enter(client, room)
            return
        if text:
            server.room(client.room).broadcast(
                encode("message", room=client.room, name=client.name, text=text[:MAX_TEXT])
            )

    @server.on_disconnect
    def disconnected(client: ChatClient, code: int, reason: str) -> None:
        server.room(client.room).broadcast(
            encode("presence", room=client.room, name=client.name, event="left")
        )

    return server


#: The application object: ``enjent run examples.chat.app:server``.
server = build_server()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--bus",
        default=os.environ.get("ENJENT_BUS"),
        help="ipc:///DIR: the embedded bus at a stable address, so that examples/announce.py "
        "(or any Publisher) reaches the rooms; or nats://HOST:PORT (ENJENT_BUS)",
    )
    parser.add_argument("--log-level", default=os.environ.get("ENJENT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    print(f"chat on http://{args.host}:{args.port}/", flush=True)
    server.run(args.host, args.port, workers=args.workers, bus=args.bus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
