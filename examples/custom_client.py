"""A custom client type built from the request: the original's ClientInitializationStrategy.

In the C# Enjent, a ``WebSocketServer<TClient>`` took a strategy that built
each ``TClient`` from the initial request. In Python that is a
``client_factory``: a callable that receives the :class:`~enjent.Request` and
returns a :class:`~enjent.WebSocketClient` (a subclass with ``__slots__``
here, to keep memory per connection low). It runs before the ``101``, so it
can also refuse a client with :class:`~enjent.HandshakeRejected`.

    python examples/custom_client.py --host 127.0.0.1 --port 9002
    # then connect to ws://127.0.0.1:9002/?user=ada

Each message comes back prefixed with the user's name, ``@<user> <text>``
goes only to that user, and ``/who`` lists who is connected (to this process).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from enjent import HandshakeRejected, Request, WebSocketClient, WebSocketServer

USER_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")


class UserClient(WebSocketClient):
    """A client that knows who it is; ``__slots__`` keeps it small."""

    __slots__ = ("language", "user")

    def __init__(self, request: Request, user: str, language: str) -> None:
        super().__init__(request)
        self.user = user
        self.language = language


def initialize_client(request: Request) -> UserClient:
    """Build the client from its opening request, or refuse it (HTTP 400)."""
    user = request.query.get("user") or ""
    if not USER_NAME.fullmatch(user):
        raise HandshakeRejected(400, "connect with ?user=<name> (letters, digits, _)")
    accept_language = request.headers.get("Accept-Language") or "en"
    language = accept_language.split(",")[0].split(";")[0].strip() or "en"
    return UserClient(request, user, language)


def build_server(**options: object) -> WebSocketServer:
    server = WebSocketServer(client_factory=initialize_client, **options)  # type: ignore[arg-type]
    users: dict[str, UserClient] = {}  # user name -> client, on this process

    @server.on_connect
    def connected(client: UserClient) -> None:
        previous = users.get(client.user)
        if previous is not None:
            previous.close(4000, "signed in elsewhere")
        users[client.user] = client
        client.send(f"hello {client.user} ({client.language})")

    @server.on_message
    def message(client: UserClient, message: str | bytes) -> None:
        if isinstance(message, bytes):
            client.send(message)
        elif message == "/who":
            client.send("online: " + ", ".join(sorted(users)))
        elif message.startswith("@"):
            target, _, text = message[1:].partition(" ")
            recipient = users.get(target)
            if recipient is None or not recipient.send(f"{client.user} (private): {text}"):
                client.send(f"{target} is not online")
        else:
            client.send(f"{client.user}: {message}")

    @server.on_disconnect
    def disconnected(client: UserClient, code: int, reason: str) -> None:
        if users.get(client.user) is client:
            del users[client.user]

    return server


#: The application object: ``enjent run examples.custom_client:server``.
server = build_server()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9002, help="port to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    server.run(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
