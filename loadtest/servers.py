"""Start, watch and stop the server under test: ours or a peer library's.

Layer 5 of docs/architecture.md. Every server runs the same echo-and-broadcast contract of
`examples/echo.py`; this module knows each one's command line, waits (bounded) until it
listens, and always terminates its whole process tree (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
ECHO_EXAMPLE = REPO_ROOT / "examples" / "echo.py"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServerKind:
    """A server the load generator knows how to start."""

    name: str
    #: The module a peer needs importable, None for our own server.
    requires: str | None
    #: Whether `--workers` applies (peers run one process).
    multiprocess: bool
    #: Whether it can negotiate permessage-deflate (`--offer-deflate` turns it on).
    compresses: bool = False

    def feature_args(self, *, deflate: bool, tls: tuple[Path, Path] | None) -> list[str]:
        """What its command line needs for `--offer-deflate` and `--tls`: a peer's
        compression is switched on (ours is on by default), every server gets the
        certificate."""
        args = []
        if deflate and self.compresses and self.name != "enjent":
            args += ["--compression", "deflate"]
        if tls is not None:
            args += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
        return args

    def command(self, host: str, port: int, workers: int) -> list[str]:
        if self.name == "enjent":
            return [
                sys.executable,
                str(ECHO_EXAMPLE),
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(workers),
                # the peers' limits are as loose: nothing here is a slow consumer
                *("--max-message-size", str(64 << 20), "--write-limit", str(64 << 20)),
                *("--max-connections", "100000"),
            ]
        module = f"loadtest.peers.{self.name}_server"
        return [sys.executable, "-m", module, "--host", host, "--port", str(port)]

    def unavailable_reason(self) -> str | None:
        """Why this server cannot be started here, or None if it can."""
        if self.name == "enjent":
            if not ECHO_EXAMPLE.exists():
                return f"{ECHO_EXAMPLE.relative_to(REPO_ROOT)} does not exist"
            return None
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install {self.requires})"
        return None


SERVERS: dict[str, ServerKind] = {
    "enjent": ServerKind("enjent", None, multiprocess=True, compresses=True),
    "websockets": ServerKind("websockets", "websockets", multiprocess=False, compresses=True),
    "aiohttp": ServerKind("aiohttp", "aiohttp", multiprocess=False, compresses=True),
    "picows": ServerKind("picows", "picows", multiprocess=False),
    # C++ uWebSockets under Python bindings (its own loop; no compression measured)
    "socketify": ServerKind("socketify", "socketify", multiprocess=False),
    # not a WebSocket server: the echo's floor (loadtest sends it unmasked frames)
    "rawtcp": ServerKind("rawtcp", None, multiprocess=False),
}
PEERS = [name for name in SERVERS if name != "enjent"]


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this (child) process when the load generator dies, so that
    even a SIGKILLed loadtest leaves no server behind (prctl PR_SET_PDEATHSIG).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ServerStartError(RuntimeError):
    """The server exited or never listened within the start timeout."""


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_cpus(text: str) -> set[int]:
    """`"0"`, `"0,2"` or `"0-3"` (and mixes) to a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.update(range(int(low), int(high) + 1))
        else:
            cpus.add(int(part))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    available = os.sched_getaffinity(0)
    if not cpus <= available:
        raise ValueError(f"CPUs {sorted(cpus - available)} are not available here")
    return cpus


class ServerProcess:
    """One running server: its process tree, its log, and a guaranteed stop."""

    def __init__(
        self,
        kind: ServerKind,
        host: str,
        port: int,
        workers: int,
        *,
        cpus: set[int] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.workers = workers if kind.multiprocess else 1
        self.cpus = cpus
        self.command = kind.command(host, port, self.workers) + list(extra_args)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close_log()
        self.popen: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.killed = False

    def start(self, timeout: float) -> None:
        """Start the server and wait until it accepts TCP connections (and, when it
        forks workers, until every worker listens), polling for at most `timeout` s.
        """
        cpus = self.cpus

        def prepare_child() -> None:  # runs in the child between fork and exec
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=prepare_child,
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self.popen.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.kind.name} exited with code {code} while starting:\n{self.log_tail()}"
                )
            if self._accepts():
                break
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.kind.name} did not listen on {self.host}:{self.port} "
                    f"within {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        # With SO_REUSEPORT each worker binds the port itself: wait for all of them.
        while self.workers > 1 and time.monotonic() < deadline:
            if len(self.listening_pids()) >= self.workers:
                break
            time.sleep(0.1)
        if cpus:
            self.pin_tree(cpus)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def processes(self) -> list[psutil.Process]:
        """The server's process tree now: the root, then its descendants."""
        if self.popen is None:
            return []
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def listening_pids(self) -> set[int]:
        """Processes of the tree with a listening socket on our port."""
        pids: set[int] = set()
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                for conn in process.net_connections(kind="tcp"):
                    if (
                        conn.status == psutil.CONN_LISTEN
                        and conn.laddr
                        and conn.laddr.port == self.port
                    ):
                        pids.add(process.pid)
                        break
        return pids

    def pin_tree(self, cpus: set[int]) -> None:
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.cpu_affinity(sorted(cpus))

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the root (the supervisor forwards to its workers), wait up to `timeout`
        s for the whole tree, then SIGKILL whatever is left. Safe to call twice.
        """
        if self.popen is None:
            return
        tree = self.processes()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
        _, leftovers = psutil.wait_procs(tree, timeout=0.5 if not self.killed else 0.1)
        for process in leftovers:
            self.killed = True
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=5.0)
        # Anything else still in the session we created (pgid == root pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.exit_code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.exit_code = self.popen.wait(timeout=5.0)

    def log_tail(self, limit: int = 4000) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.log.flush()
            size = self.log.seek(0, os.SEEK_END)
            self.log.seek(max(0, size - limit))
            return self.log.read().decode("utf-8", "replace")
        return ""

    def close_log(self) -> None:
        with contextlib.suppress(OSError):
            self.log.close()
