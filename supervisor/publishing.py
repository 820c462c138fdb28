"""``enjent publish``: one message to clients, rooms or everyone, from a shell or cron.

Supervisor layer (layer 4). A thin command over :class:`enjent.Publisher`:

    enjent publish --bus URL (--all | --room NAME [--room NAME...] | --client ID)
                   [--binary] [--exclude ID] DATA

``DATA`` ``-`` reads standard input; ``ENJENT_BUS`` gives the bus when
``--bus`` does not. Exit codes: 0 published, 2 usage error (no DATA, no
target, a bad bus URL, a message or room name over the limits), 3 the bus
could not be reached (or took nothing) within ``--timeout``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["BUS_UNREACHABLE", "add_publish_parser", "publish_main"]

#: Exit code: the bus could not be reached within the timeout.
BUS_UNREACHABLE = 3


def add_publish_parser(commands: Any) -> None:
    """Add ``publish`` to the ``enjent`` command's subcommands."""
    publish = commands.add_parser(
        "publish",
        help="send a message to clients from outside the servers",
        description="Publish DATA to every client (--all), to the members of rooms (--room, "
        "repeatable: a client in several gets one copy) or to one client (--client), through "
        "the servers' bus. Exit codes: 0 published, 2 usage error, 3 the bus could not be "
        "reached within --timeout.",
    )
    publish.add_argument(
        "--bus",
        default=None,
        metavar="URL",
        help="the servers' bus: ipc:///DIR (enjent run --bus ipc:///DIR on this host) or "
        "nats://HOST:PORT[,...] (ENJENT_BUS; NATS credentials from ENJENT_NATS_*)",
    )
    target = publish.add_mutually_exclusive_group()
    target.add_argument("--all", action="store_true", help="every client of every worker")
    target.add_argument(
        "--room", action="append", metavar="NAME", help="the members of a room (repeatable)"
    )
    target.add_argument("--client", metavar="ID", help="one client, by its id")
    publish.add_argument(
        "--binary", action="store_true", help="send DATA as a binary message (default: text)"
    )
    publish.add_argument("--exclude", metavar="ID", help="a client not to send it to")
    publish.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the bus (default 5)",
    )
    publish.add_argument("data", nargs="?", metavar="DATA", help="the message; - reads stdin")


def publish_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``enjent publish``; return its exit code (``parser.error`` exits 2)."""
    from enjent import BusError, MessageTooBigError, Publisher, RoomLimitError

    bus = args.bus or os.environ.get("ENJENT_BUS")
    if not bus:
        parser.error("publish needs --bus URL (or ENJENT_BUS)")
    if not (args.all or args.room or args.client):
        parser.error("publish needs a target: --all, --room NAME or --client ID")
    if args.data is None:
        parser.error("publish needs DATA (or - to read it from standard input)")
    if not args.timeout > 0:
        parser.error("--timeout must be a positive number of seconds")
    raw: bytes | str
    if args.data == "-":
        raw = sys.stdin.buffer.read()
    else:
        raw = os.fsencode(args.data) if args.binary else args.data
    if args.binary:
        data: str | bytes = raw if isinstance(raw, bytes) else raw.encode()
    else:
        try:
            data = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            parser.error("DATA is not UTF-8: send it with --binary")
    try:
        publisher = Publisher(bus, timeout=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with publisher:
            if args.all:
                publisher.broadcast(data, exclude=args.exclude)
            elif args.room:
                publisher.rooms(*args.room).broadcast(data, exclude=args.exclude)
            else:
                publisher.send(args.client, data)
    except (MessageTooBigError, RoomLimitError, ValueError) as exc:
        parser.error(str(exc))
    except BusError as exc:
        print(f"enjent publish: {exc}", file=sys.stderr)
        return BUS_UNREACHABLE
    return 0
