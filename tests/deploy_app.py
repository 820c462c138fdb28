"""The app behind nginx in the deployment tests: ``enjent run tests.deploy_app:server``.

It trusts the proxy on 127.0.0.1 (``trusted_proxies``), as the app of
``deploy/README.md`` trusts its nginx. Text commands (anything else is echoed):

- ``whoami``: reply the client's id (it starts with the worker's shard)
- ``addr``: reply ``client.remote_address`` (the address nginx saw)
- ``broadcast:<x>``: ``server.broadcast(x)``, reaching every worker's clients

``python tests/deploy_app.py PORT CERT KEY`` serves it with native TLS on two
workers: ``server.run(..., workers=2, ssl=context)``.
"""

from __future__ import annotations

import ssl
import sys

from enjent import WebSocketClient, WebSocketServer


def build_server() -> WebSocketServer:
    app = WebSocketServer(trusted_proxies=["127.0.0.1"], close_timeout=2.0, health_detail=True)

    @app.on_message
    def on_message(client: WebSocketClient, message: str | bytes) -> None:
        if message == "whoami":
            client.send(client.id)
        elif message == "addr":
            client.send(str(client.remote_address))
        elif isinstance(message, str) and message.startswith("broadcast:"):
            app.broadcast(message[len("broadcast:") :])
        else:
            client.send(message)

    return app


server = build_server()


def main(argv: list[str]) -> int:
    port, cert, key = int(argv[0]), argv[1], argv[2]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.run("127.0.0.1", port, workers=2, ssl=context)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
