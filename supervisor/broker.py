"""The bus broker process: a ZeroMQ XSUB/XPUB proxy owned by the supervisor.

Supervisor layer (layer 4). Workers publish to ``in`` (XSUB) and subscribe
at ``out`` (XPUB); the proxy runs in a thread inside libzmq. The main thread
reads one-line commands from the supervisor's pipe (``dead SHARD PID PLANNED``) and
publishes them as :data:`enjent.cluster.bus.Kind.DEAD` envelopes; when the pipe
closes (the supervisor is gone) the broker exits, so it is never orphaned. A
third thread keeps the history of the rooms that keep one (:mod:`.keeper`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading

import zmq

from enjent.cluster import bus
from enjent.server.history import HistoryRules

from .keeper import keeper_loop

logger = logging.getLogger("enjent.broker")

#: Explicit high-water marks (docs/architecture.md: ZeroMQ drops silently past them).
HIGH_WATER_MARK = 100_000


#: The broker's own endpoints for its keeper thread (same process, no socket file).
KEEPER_IN = "inproc://enjent-keeper-in"
KEEPER_OUT = "inproc://enjent-keeper-out"


def broker_main(
    publish_endpoint: str,
    subscribe_endpoint: str,
    control_fd: int,
    history: HistoryRules | None = None,
) -> int:
    """Run the proxy (and the keeper of room history) until the control pipe closes."""
    # Ctrl-C reaches the whole process group: the broker must outlive the
    # workers' graceful stop (their last messages) and stop at end of file
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    xsub = context.socket(zmq.XSUB)
    xpub = context.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.LINGER, 0)
    xsub.setsockopt(zmq.MAXMSGSIZE, bus.MAX_BODY + 4096)
    try:
        xsub.bind(publish_endpoint)
        xpub.bind(subscribe_endpoint)
        xsub.bind(KEEPER_IN)
        xpub.bind(KEEPER_OUT)
    except zmq.ZMQError as exc:
        logger.error("broker cannot bind %s / %s: %s", publish_endpoint, subscribe_endpoint, exc)
        return 1

    def proxy() -> None:
        try:
            zmq.proxy(xsub, xpub)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - only on context teardown
            logger.debug("proxy ended: %s", exc)

    thread = threading.Thread(target=proxy, name="enjent-broker-proxy", daemon=True)
    thread.start()
    keeper = threading.Thread(
        target=keeper_loop,
        args=(context, history or HistoryRules(), KEEPER_IN, KEEPER_OUT),
        name="enjent-keeper",
        daemon=True,
    )
    keeper.start()
    announcer = context.socket(zmq.PUB)
    announcer.setsockopt(zmq.LINGER, 200)
    announcer.connect(publish_endpoint)
    generation = secrets.token_hex(3)
    seq = 0
    with os.fdopen(control_fd, "rb", buffering=0) as control:
        while True:
            line = _read_line(control)
            if line is None:
                break
            parts = line.split()
            if len(parts) == 4 and parts[0] == b"dead":
                seq += 1
                shard, pid, planned = int(parts[1]), int(parts[2]), parts[3] == b"1"
                body = bus.encode(
                    bus.Kind.DEAD, bus.BROKER_ORIGIN, generation, seq, shard, pid, planned
                )
                announcer.send_multipart((bus.TOPIC_HEARTBEAT, body))
    announcer.close()
    xsub.close()
    xpub.close()
    context.term()
    _remove_ipc_files(publish_endpoint, subscribe_endpoint)
    return 0


def _remove_ipc_files(*endpoints: str) -> None:
    """Remove the ipc socket files and their folder if it is then empty.

    The supervisor removes its runtime directory itself; this also cleans up
    when the supervisor was killed (SIGKILL) and the broker stops at end of file.
    """
    folders = set()
    for endpoint in endpoints:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            with contextlib.suppress(OSError):
                os.unlink(path)
            folders.add(os.path.dirname(path))
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty: never someone else's files


def _read_line(stream: object) -> bytes | None:
    """One line from the pipe, or ``None`` at end of file."""
    chunks: list[bytes] = []
    while True:
        byte = stream.read(1)  # type: ignore[attr-defined]
        if not byte:
            return None
        if byte == b"\n":
            return b"".join(chunks)
        chunks.append(byte)
        if len(chunks) > 256:
            chunks.clear()  # not a command of ours: drop it
