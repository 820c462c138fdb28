"""The feed example as the history tests run it: ``enjent run tests.feed_app:server``.

``examples/feed.py``'s server (every room keeps 100 publications for 600 s),
plus rooms ``small:*`` that keep 5 publications for 1 s, ``big:*`` 2000, and the worker's
shard in the 101 response (``X-Enjent-Worker``) so that a test knows where
a client landed.
"""

from __future__ import annotations

from enjent import Accept, Request, WebSocketServer
from examples.feed import build_server


def make() -> WebSocketServer:
    app = build_server(history=100, history_ttl=600.0)
    app.configure(close_timeout=2.0, ping_interval=None)
    app.keep_history(prefix="small:", size=5, ttl=1.0)
    app.keep_history(prefix="big:", size=2000)

    @app.on_handshake
    def where(request: Request) -> Accept:
        return Accept(headers=[("X-Enjent-Worker", str(app.shard))])

    return app


server = make()
