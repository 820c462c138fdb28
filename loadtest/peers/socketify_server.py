"""The echo-and-broadcast app on `socketify` (Python bindings of C++ uWebSockets).

Layer 5 of docs/architecture.md: a peer to compare Enjent with, the one that is not
Python underneath: framing, sending and the broadcast all run in uWebSockets' C++.
Same contract as examples/echo.py. A broadcast is uWebSockets' own pub/sub
(every client subscribes to one topic, ``app.publish`` writes to all of them in C++),
which is how a socketify application broadcasts. No compression (shown for
reference next to the peers that compress), no automatic pings, no idle timeout.

socketify runs its own loop (libuv, driven from C): this peer does not use
:func:`loadtest.peers.run_peer`'s asyncio loop; SIGTERM closes the listening
socket and stops that loop.
"""

from __future__ import annotations

import signal
from typing import Any

from socketify import App, AppListenOptions, AppOptions, CompressOptions, OpCode

from loadtest.peers import BROADCAST_PREFIX, MAX_MESSAGE, parse_args

_TOPIC = "all"


def build_app(*, certfile: str | None, keyfile: str | None) -> Any:
    """A socketify ``App`` serving the contract on every path."""
    if certfile:
        app = App(AppOptions(cert_file_name=certfile, key_file_name=keyfile or certfile))
    else:
        app = App()

    def on_open(ws: Any) -> None:
        ws.subscribe(_TOPIC)

    def on_message(ws: Any, message: str | bytes, opcode: OpCode) -> None:
        if opcode == OpCode.TEXT:
            assert isinstance(message, str)
            if message.startswith(BROADCAST_PREFIX):
                app.publish(_TOPIC, message[len(BROADCAST_PREFIX) :], OpCode.TEXT)
                return
        ws.send(message, opcode)

    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": MAX_MESSAGE,
            # uWebSockets' largest idle timeout (0 would be its default, 120 s)
            "idle_timeout": 960,
            # as loose as the other peers' limits: nothing here is a slow consumer
            "max_backpressure": 64 * 2**20,
            "close_on_backpressure_limit": False,
            "send_pings_automatically": False,
            "open": on_open,
            "message": on_message,
        },
    )
    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.compression != "none":
        raise SystemExit("socketify_server: only --compression none is measured")
    app = build_app(certfile=args.ssl_certfile, keyfile=args.ssl_keyfile)
    app.listen(AppListenOptions(port=args.port, host=args.host))
    # socketify's loop runs Python between its turns, so the handler runs promptly
    signal.signal(signal.SIGTERM, lambda signum, frame: app.close())
    app.run()


if __name__ == "__main__":
    main()
