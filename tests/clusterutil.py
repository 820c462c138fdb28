"""Helpers of the cluster tests: run a supervisor, talk to its workers, clean up.

Every process a test starts is in its own session (process group): teardown
kills the group and every pid seen as a child of the supervisor, then checks
that none is left. The supervisor gets ``TMPDIR`` set to a private folder, so
its runtime directory (``enjent-*``) can be found and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = "tests.cluster_app:server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # e.g. connection refused while a worker restarts
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s (last error: {last_error!r})")
        time.sleep(interval)


def healthz(port: int, timeout: float = 2.0) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/healthz"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def healthz_of(port: int, shard: int, timeout: float = 5.0) -> dict[str, Any]:
    """The health JSON answered by worker ``shard`` (the kernel picks; ask until it does)."""

    def ask() -> dict[str, Any] | None:
        data = healthz(port)
        return data if data.get("shard") == shard else None

    result: dict[str, Any] = wait_for(ask, timeout, interval=0.0)
    return result


def port_is_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Cluster:
    """``python -m enjent_supervisor run APP --workers N`` in its own process group."""

    def __init__(
        self,
        workers: int = 2,
        *,
        app: str = APP,
        port: int | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.workers = workers
        self.port = port if port is not None else free_port()
        self.tmpdir = tempfile.mkdtemp(prefix="ejt-")
        self.log_path = os.path.join(self.tmpdir, "supervisor.log")
        if command is None:
            command = [
                sys.executable,
                "-m",
                "enjent_supervisor",
                "run",
                app,
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--log-level",
                "INFO",
                "--health-detail",  # the per-worker detail these tests read
                *args,
            ]
        self.command = list(command)
        self.env = {**os.environ, "TMPDIR": self.tmpdir, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    # ---------------------------------------------------------- lifecycle

    def start(self) -> Cluster:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until every worker is listening and known to its peers."""

        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited {self.proc.returncode}:\n{self.log()}")
            self.children()
            data = healthz(self.port, timeout=1.0)
            workers = data["workers"]  # a peer's pid is 0 until its first heartbeat
            return data if len(workers) == self.workers and all(w["pid"] for w in workers) else None

        try:
            result: dict[str, Any] = wait_for(ready, timeout)
        except AssertionError:
            raise AssertionError(f"cluster not ready:\n{self.log()}") from None
        # every worker listens (each one answers the health path) and has
        # heard every other one's heartbeat
        for shard in range(self.workers):

            def complete(shard: int = shard) -> bool:
                workers = healthz_of(self.port, shard)["workers"]
                return len(workers) == self.workers and all(w["pid"] for w in workers)

            wait_for(complete, timeout)
        return result

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self.seen.update(child.pid for child in children)
        return [child for child in children if child.status() != psutil.STATUS_ZOMBIE]

    def worker_pids(self) -> dict[int, int]:
        """shard -> pid, from the health JSON (asked of every worker: all must agree)."""
        data = healthz(self.port)
        return {worker["shard"]: worker["pid"] for worker in data["workers"]}

    def broker_pid(self) -> int:
        """The child that is neither a worker nor the HTTP API (which listens on a port)."""
        workers = set(self.worker_pids().values())
        others = [
            child.pid
            for child in self.children()
            if child.pid not in workers
            and not any(c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp"))
        ]
        assert len(others) == 1, (others, workers)
        return others[0]

    def runtime_dirs(self) -> list[str]:
        return [str(path) for path in Path(self.tmpdir).glob("enjent-*")]

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        self.children()
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Stop everything this cluster started, whatever state it is in."""
        if self.proc is None:
            return
        self.children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(8)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self.seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        leftovers = wait_for_gone(self.seen, 5.0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        assert not leftovers, f"processes left over: {leftovers}"


def wait_for_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """The pids of ``pids`` still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    remaining = [pid for pid in pids if alive(pid)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [pid for pid in remaining if alive(pid)]
    return remaining


# --------------------------------------------------------------- clients


class Client:
    """A WebSocket client whose incoming messages pile up in ``inbox``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.id = ""
        self.inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @property
    def shard(self) -> int:
        return int(self.id.split("-", 1)[0])

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.inbox.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def next(self, timeout: float = 5.0) -> str | bytes:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def request(self, text: str, timeout: float = 5.0) -> str | bytes:
        await self.ws.send(text)
        return await self.next(timeout)

    def pending(self) -> list[str | bytes]:
        messages = []
        while not self.inbox.empty():
            messages.append(self.inbox.get_nowait())
        return messages

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3.0)
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def open_client(port: int, timeout: float = 5.0, *, host: str = "127.0.0.1") -> Client:
    ws = await connect(
        f"ws://{host}:{port}/",
        open_timeout=timeout,
        close_timeout=2.0,
        ping_interval=None,
        max_queue=None,
    )
    client = Client(ws)
    reply = await client.request("whoami", timeout)
    assert isinstance(reply, str)
    client.id = reply
    return client


async def open_clients(port: int, count: int, batch: int = 50) -> list[Client]:
    clients: list[Client] = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        clients += await asyncio.gather(*(open_client(port) for _ in range(size)))
    return clients


async def open_client_on(port: int, shard: int, timeout: float = 10.0) -> Client:
    """A client connected to worker ``shard`` (others opened meanwhile are closed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        client = await open_client(port)
        if client.shard == shard:
            return client
        await client.close()
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no connection landed on worker {shard}")


async def close_all(clients: Iterable[Client]) -> None:
    await asyncio.gather(*(client.close() for client in clients))


async def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """The async twin of :func:`wait_for` (the predicate may be a coroutine function)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(interval)
