"""The app of the token tests: ``enjent run tests.auth_app:server`` with a JWT check.

``AUTH_ALGORITHM`` (``HS256`` by default) and ``AUTH_KEY`` (the secret) or
``AUTH_KEY_FILE`` (a PEM public key) choose the check; the audience is
``enjent-test``. Every ``on_connect`` appends the client's ``sub`` claim to
the file ``AUTH_CONNECTS`` (so a test can see that a refused token never got
there); the text ``claims`` answers the client's claims as JSON, anything
else is echoed.
"""

from __future__ import annotations

import json
import os

from enjent import WebSocketClient, WebSocketServer
from enjent.server.auth import JWTAuth

_algorithm = os.environ.get("AUTH_ALGORITHM", "HS256")
_key: str | bytes
if os.environ.get("AUTH_KEY_FILE"):
    with open(os.environ["AUTH_KEY_FILE"], "rb") as _file:
        _key = _file.read()
else:
    _key = os.environ.get("AUTH_KEY", "test-secret-0123456789abcdef0123456789")

server = WebSocketServer(ping_interval=None, close_timeout=2.0, sweep_interval=0.2)
server.on_handshake(JWTAuth(_key, algorithms=[_algorithm], audience="enjent-test"))


@server.on_connect
def connected(client: WebSocketClient) -> None:
    with open(os.environ["AUTH_CONNECTS"], "a") as log:
        log.write(f"{client.data.get('sub')}\n")


@server.on_message
def message(client: WebSocketClient, text: str | bytes) -> None:
    client.send(json.dumps(client.data) if text == "claims" else text)
