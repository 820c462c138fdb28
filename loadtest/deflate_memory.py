"""Memory that permessage-deflate keeps per idle connection, for each DeflateOptions setting.

Like ``parser_bench``, and unlike the rest of ``loadtest`` (a client that only speaks
the wire protocol), this imports ``enjent`` on purpose: it builds ``--connections``
``PerMessageDeflate`` objects in-process, no sockets, each having sent and received
one compressed message (the state an idle connection keeps after some traffic), and
reports the growth per connection two ways: the process's USS (psutil, real pages) and
tracemalloc (bytes allocated by Python and by zlib, whose allocator is Python's).
Each setting runs in a fresh child process, so one setting's freed memory is not
reused by the next::

    python -m loadtest.deflate_memory [--connections 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tracemalloc
import zlib
from typing import Any

import psutil

from enjent.deflate import DeflateOptions, PerMessageDeflate, negotiate

#: name -> (DeflateOptions keyword arguments, the client's offer)
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "default (no context takeover either way)": ({}, "permessage-deflate"),
    "server_no_context_takeover=False": (
        {"server_no_context_takeover": False},
        "permessage-deflate",
    ),
    "client_no_context_takeover=False": (
        {"client_no_context_takeover": False},
        "permessage-deflate",
    ),
    "both False": (
        {"server_no_context_takeover": False, "client_no_context_takeover": False},
        "permessage-deflate",
    ),
    "both False, server_max_window_bits=10, memory_level=1": (
        {
            "server_no_context_takeover": False,
            "client_no_context_takeover": False,
            "server_max_window_bits": 10,
            "memory_level": 1,
        },
        "permessage-deflate",
    ),
    "both False, client offers client_max_window_bits=10": (
        {"server_no_context_takeover": False, "client_no_context_takeover": False},
        "permessage-deflate; client_max_window_bits=10",
    ),
}

MESSAGE = b"an idle connection once sent and received this message; " * 20


def measure(name: str, connections: int) -> dict[str, Any]:
    """Growth per connection for one setting (run in a fresh process)."""
    kwargs, offer = SETTINGS[name]
    options = DeflateOptions(**kwargs)
    negotiated = negotiate([offer], options)
    assert negotiated is not None
    client_bits = negotiated.client_max_window_bits or 15
    client = zlib.compressobj(6, zlib.DEFLATED, -client_bits)
    incoming = (client.compress(MESSAGE) + client.flush(zlib.Z_SYNC_FLUSH))[:-4]
    # warm up: the shared compressor and whatever else happens once per process
    PerMessageDeflate(negotiated, options, max_message_size=1 << 20).encode(MESSAGE)
    process = psutil.Process()
    gc.collect()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    uss_before = process.memory_full_info().uss
    kept = []
    for _ in range(connections):
        extension = PerMessageDeflate(negotiated, options, max_message_size=1 << 20)
        extension.encode(MESSAGE)
        extension.decode(incoming, fin=True, compressed=True)
        kept.append(extension)
    gc.collect()
    uss_after = process.memory_full_info().uss
    traced_after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "setting": name,
        "response": negotiated.response(),
        "connections": connections,
        "uss_per_connection_bytes": (uss_after - uss_before) / connections,
        "traced_per_connection_bytes": (traced_after - traced_before) / connections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--setting", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setting is not None:  # the child
        print(json.dumps(measure(args.setting, args.connections)))
        return 0
    results = []
    for name in SETTINGS:
        command = [sys.executable, "-m", "loadtest.deflate_memory", "--setting", name]
        child = subprocess.run(
            [*command, "--connections", str(args.connections)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        results.append(json.loads(child.stdout))
    print(f"{'setting':<56} {'USS/conn':>10} {'traced/conn':>12}")
    for row in results:
        print(
            f"{row['setting']:<56} {row['uss_per_connection_bytes'] / 1024:>7.1f} KiB"
            f" {row['traced_per_connection_bytes'] / 1024:>8.1f} KiB"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
