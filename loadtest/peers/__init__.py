"""Peer servers: other libraries running the echo-and-broadcast contract of examples/echo.py.

Layer 5 of docs/architecture.md. Each module is a small program,
`python -m loadtest.peers.NAME_server --host H --port P`, that loadtest starts and stops.
The contract: echo every text and binary message unchanged, except that the text
message `broadcast:<payload>` sends `<payload>` as text to every connected client.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

BROADCAST_PREFIX = "broadcast:"

#: Large enough for loadtest's biggest messages; bounded all the same.
MAX_MESSAGE = 16 * 2**20

#: Listen backlog: ramps open hundreds of connections at once.
BACKLOG = 2048


def parse_args(description: str) -> argparse.Namespace:
    """The command line shared by every peer (loopback addresses only)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workers", type=int, default=1, help="ignored: peers run 1 process")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    parser.add_argument(
        "--compression",
        choices=["none", "deflate"],
        default="none",
        help="permessage-deflate with the library's defaults (websockets and aiohttp; "
        "default none)",
    )
    parser.add_argument("--ssl-certfile", help="serve TLS (wss://) with this certificate")
    parser.add_argument("--ssl-keyfile", help="the certificate's private key")
    args = parser.parse_args()
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    address = ipaddress.ip_address(args.host)
    if not (address.is_loopback):
        parser.error(f"--host {args.host} is not a loopback address")
    return args


def server_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of `--ssl-certfile`/`--ssl-keyfile`, or None for plain TCP."""
    if not args.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    return context


#: What a peer module provides: given its command line, an async context that
#: listens while it is entered and stops listening when it exits.
Serving = Callable[[argparse.Namespace], AbstractAsyncContextManager[object]]


async def serve_until_signal(serving: Serving, args: argparse.Namespace) -> None:
    """Run ``serving(args)`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop)
    async with serving(args):
        await stop


def run_peer(description: str, serving: Serving) -> None:
    """A peer's ``main()``: parse the command line, serve on uvloop (if it is
    installed and not refused with ``--no-uvloop``) or asyncio until a signal."""
    args = parse_args(description)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve_until_signal(serving, args))
            return
    asyncio.run(serve_until_signal(serving, args))
