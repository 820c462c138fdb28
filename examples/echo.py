"""Echo server: every text and binary message comes back unchanged.

A text message ``broadcast:<payload>`` instead sends ``<payload>`` (as text)
to every connected client, on every worker. This command line is stable:
Autobahn runs and ``loadtest`` drive it. Its limits default to the library's
safe ones; the conformance runner and ``loadtest`` pass bigger ones.

    python examples/echo.py --host 127.0.0.1 --port 9001 [--workers N] [--bus nats://...]
        [--ssl-certfile cert.pem --ssl-keyfile key.pem] [--max-message-rate N]
        [--max-connections-per-ip N] [--jwt-secret SECRET]
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys

from enjent import WebSocketClient, WebSocketServer
from enjent.server.addresses import AddressLimits

PREFIX = "broadcast:"


def build_server(**options: object) -> WebSocketServer:
    server = WebSocketServer(**options)  # type: ignore[arg-type]

    @server.on_message
    def echo(client: WebSocketClient, message: str | bytes) -> None:
        if type(message) is str and message.startswith(PREFIX):
            server.broadcast(message[len(PREFIX) :])
        else:
            client.send(message)

    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9001, help="port to listen on")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (1: this process only; default 1)",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=1 << 20,
        help="largest message accepted, in bytes (default 1 MiB, the library's; the "
        "conformance runner passes 64 MiB for Autobahn's 9.* cases)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=25_000, help="per worker (default 25000)"
    )
    parser.add_argument(
        "--write-limit",
        type=int,
        default=512 * 1024,
        help="unsent bytes per client before it counts as a slow consumer "
        "(default 512 KiB, the library's)",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=20.0, help="keepalive ping interval, 0: off"
    )
    parser.add_argument(
        "--compression",
        choices=["deflate", "none"],
        default="deflate",
        help="permessage-deflate (RFC 7692) on or off (default deflate)",
    )
    parser.add_argument(
        "--bus",
        default=os.environ.get("ENJENT_BUS"),
        help="zeromq (one host, the default) or nats://HOST:PORT[,...] to join the workers "
        "of several hosts (ENJENT_BUS)",
    )
    parser.add_argument(
        "--ssl-certfile", help="serve wss:// natively (TLS in Python's ssl) with this certificate"
    )
    parser.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--health-detail",
        action="store_true",
        help="the health path also shows each worker's pid, bus and error counters",
    )
    parser.add_argument(
        "--max-message-rate",
        type=int,
        default=None,
        metavar="N",
        help="messages per second one client may send, burst N (close 3013 above it; "
        "default: no limit)",
    )
    parser.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=None,
        metavar="N",
        help="open connections one client address may hold on the host, every worker "
        "together (HTTP 429 above it; default: no limit)",
    )
    parser.add_argument(
        "--jwt-secret",
        default=None,
        metavar="SECRET",
        help="admit only clients with an HS256 token signed with SECRET, in the token query "
        "parameter or Authorization: Bearer (401 otherwise; close 3005 when it expires)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ENJENT_LOG_LEVEL", "INFO"),
        choices=["debug", "info", "warning", "error", "DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO (ENJENT_LOG_LEVEL)",
    )
    args = parser.parse_args(argv)
    if args.log_level.lower() not in ("debug", "info", "warning", "error"):
        parser.error(
            f"ENJENT_LOG_LEVEL must be debug, info, warning or error, got {args.log_level!r}"
        )
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    if args.max_message_rate is not None and args.max_message_rate < 1:
        parser.error("--max-message-rate must be at least 1")
    return args


def tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server context of ``--ssl-certfile``/``--ssl-keyfile`` (None: plain TCP)."""
    if certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        print("echo.py: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        context = tls_context(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        print(
            f"echo.py: cannot use the TLS certificate {args.ssl_certfile}: {exc}", file=sys.stderr
        )
        return 2
    server = build_server(
        max_message_size=args.max_message_size,
        max_connections=args.max_connections,
        write_limit=args.write_limit,
        ping_interval=args.ping_interval or None,
        compression=None if args.compression == "none" else "deflate",
        health_detail=args.health_detail,
        max_message_rate=args.max_message_rate,
        address_limits=(
            AddressLimits(max_connections=args.max_connections_per_ip)
            if args.max_connections_per_ip
            else None
        ),
    )
    if args.jwt_secret:
        from enjent.server.auth import JWTAuth

        server.on_handshake(
            JWTAuth(args.jwt_secret, algorithms=["HS256"], sources=("query", "header"))
        )
    try:
        server.run(args.host, args.port, workers=args.workers, bus=args.bus, ssl=context)
    except ValueError as exc:  # a --bus that is not zeromq or nats:// URLs
        print(f"echo.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
