"""Announce in the chat's rooms from another process: a publisher, not a worker.

Start the chat with its bus at a stable address, then announce from anywhere
on the same host (a cron job, a deploy script, a web backend):

    python examples/chat/app.py --port 8000 --workers 2 --bus ipc:///tmp/enjent-chat
    python examples/announce.py --bus ipc:///tmp/enjent-chat --room lobby "Maintenance at 18:00"

Every member of the rooms sees a chat message from ``announcer`` in the
chat's own JSON (``{"type": "message", "room": ..., "name": ..., "text": ...}``),
whichever worker it is on. ``--every S --count N`` repeats it. Exit codes:
0 sent, 2 usage error, 3 the bus could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from enjent import BusError, Publisher


def chat_message(room: str, text: str, name: str = "announcer") -> str:
    """What the chat's own clients receive for a message in ``room``."""
    return json.dumps(
        {"type": "message", "room": room, "name": name, "text": text}, separators=(",", ":")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bus",
        default=os.environ.get("ENJENT_BUS"),
        help="the chat's bus: ipc:///DIR or nats://HOST:PORT (ENJENT_BUS)",
    )
    parser.add_argument(
        "--room", action="append", default=[], help="a room to announce in (repeatable)"
    )
    parser.add_argument("--name", default="announcer", help="the name shown (default announcer)")
    parser.add_argument("--every", type=float, default=0.0, help="seconds between repeats")
    parser.add_argument("--count", type=int, default=1, help="how many times (default 1)")
    parser.add_argument("text", help="what to say")
    args = parser.parse_args(argv)
    if not args.bus:
        parser.error("--bus is required (the chat's --bus)")
    if not args.room:
        parser.error("name at least one --room")
    if not 1 <= args.count <= 10_000 or args.every < 0:
        parser.error("--count must be 1-10000 and --every >= 0")
    try:
        with Publisher(args.bus) as publisher:
            for index in range(args.count):
                if index:
                    time.sleep(args.every)
                for room in args.room:  # each room gets the message in its own JSON
                    publisher.room(room).broadcast(chat_message(room, args.text, args.name))
    except BusError as exc:
        print(f"announce: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
