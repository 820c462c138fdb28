"""The supervisor: boot failures, signals, restarts of workers and of the broker.

Each test runs ``python -m enjent_supervisor run tests.cluster_app:server``
(or examples/echo.py) in its own process group; the Cluster helper kills the
group and every child it saw, and fails the test if one is left over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clusterutil import (
    REPO_ROOT,
    Cluster,
    alive,
    close_all,
    free_port,
    healthz,
    healthz_of,
    open_client_on,
    open_clients,
    port_is_free,
    wait_for,
    wait_for_gone,
)

pytestmark = pytest.mark.timeout(60)

#: close_timeout of tests/cluster_app.py
CLOSE_TIMEOUT = 2.0


def run_script(source: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet from the repository root in its own process group.

    Its runtime directory must be gone when it returns.
    """
    tmpdir = tempfile.mkdtemp(prefix="ejt-")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": tmpdir},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        leftovers = os.listdir(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert leftovers == [], leftovers
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# ------------------------------------------------------------ boot failures


def test_app_that_does_not_import_exits_4() -> None:
    started = time.monotonic()
    with Cluster(workers=2, app="tests.no_such_module_here:server") as cluster:
        code = cluster.wait(15)
        log = cluster.log()
    assert code == 4, log
    assert "tests.no_such_module_here" in log
    assert time.monotonic() - started < 10


def test_app_failing_in_the_workers_exits_4_without_restart_loop() -> None:
    """The app loads in the supervisor but not in the workers: exit 4, not a restart loop."""
    port = free_port()
    result = run_script(
        f"""
        import logging, sys
        from enjent_supervisor.arbiter import run_cluster
        logging.basicConfig(level=logging.INFO)

        def load():
            raise ImportError("the app module is broken")

        sys.exit(run_cluster(load, "127.0.0.1", {port}, workers=2))
        """
    )
    assert result.returncode == 4, result.stdout
    assert "cannot load the application" in result.stdout
    assert "the app module is broken" in result.stdout
    assert result.stdout.count("started (pid") <= 3  # broker + 2 workers, nothing restarted
    assert "restarting" not in result.stdout


def test_port_taken_exits_3_with_the_address() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        with Cluster(workers=2, port=port) as cluster:
            code = cluster.wait(15)
            log = cluster.log()
        elapsed = time.monotonic() - started
    assert code == 3, log
    assert f"127.0.0.1:{port}" in log
    assert "restarting" not in log
    assert elapsed < 10


def test_worker_that_cannot_bind_stops_the_supervisor_with_3() -> None:
    """Past the supervisor's early check, a worker's failed bind: exit 3, no restart loop."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_script(
            f"""
            import logging, sys
            from enjent_supervisor.arbiter import Arbiter
            from tests.cluster_app import build_server
            logging.basicConfig(level=logging.INFO)
            Arbiter._reserve_port = lambda self: None  # race the early check
            sys.exit(Arbiter(build_server, "127.0.0.1", {port}, workers=2).run())
            """
        )
    assert result.returncode == 3, result.stdout
    assert f"127.0.0.1:{port}" in result.stdout
    assert "failed to boot" in result.stdout
    assert "restarting" not in result.stdout


# --------------------------------------------------------- graceful stop


def test_sigterm_closes_clients_with_1001_and_cleans_up() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        children = {child.pid for child in cluster.children()}
        assert len(children) == 3  # 2 workers + the broker
        (runtime_dir,) = cluster.runtime_dirs()
        assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
        assert sorted(os.listdir(runtime_dir)) == ["bus-in", "bus-out"]

        async def main() -> float:
            clients = await open_clients(cluster.port, 30)
            try:
                assert {c.shard for c in clients} == {0, 1}
                started = time.monotonic()
                cluster.signal(signal.SIGTERM)
                await asyncio.wait_for(
                    asyncio.gather(*(c.closed.wait() for c in clients)), CLOSE_TIMEOUT + 3
                )
                assert [c.ws.close_code for c in clients] == [1001] * len(clients)
                return started
            finally:
                await close_all(clients)

        started = asyncio.run(main())
        assert cluster.wait(CLOSE_TIMEOUT + 3) == 0, cluster.log()
        elapsed = time.monotonic() - started
        assert elapsed < CLOSE_TIMEOUT + 2, elapsed
        assert wait_for_gone(children, 1.0) == []
        assert not os.path.exists(runtime_dir)
        assert cluster.runtime_dirs() == []
        assert port_is_free(cluster.port)


def test_sigint_stops_gracefully() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        children = {child.pid for child in cluster.children()}
        cluster.signal(signal.SIGINT)
        assert cluster.wait(CLOSE_TIMEOUT + 3) == 0, cluster.log()
        assert wait_for_gone(children, 1.0) == []
        assert cluster.runtime_dirs() == []


def test_ctrl_c_to_the_process_group_stops_gracefully() -> None:
    """Regression: SIGINT to the whole group killed the broker at once (and it could be
    restarted during the stop); it must outlive the workers' drain."""
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        broker = cluster.broker_pid()
        children = {child.pid for child in cluster.children()}
        stuck = _stuck_client(cluster.port, 0)  # worker 0 drains for close_timeout
        try:
            os.killpg(cluster.pid, signal.SIGINT)
            time.sleep(0.5)
            assert alive(broker)
            assert cluster.wait(CLOSE_TIMEOUT + 3) == 0, cluster.log()
        finally:
            stuck.close()
        assert wait_for_gone(children, 2.0) == []
        assert "restarting" not in cluster.log()
        assert "Traceback" not in cluster.log()
        assert cluster.runtime_dirs() == []


# -------------------------------------------------------------- signals


def _stuck_client(port: int, shard: int, timeout: float = 10.0) -> socket.socket:
    """A raw WebSocket client on worker ``shard`` that then never reads nor answers a close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 101"), data
        data = data.split(b"\r\n\r\n", 1)[1]
        payload = b"whoami"
        mask = b"\x01\x02\x03\x04"
        sock.sendall(
            b"\x81" + bytes([0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )  # fmt: skip
        while len(data) < 2 or len(data) < 2 + data[1]:
            data += sock.recv(4096)
        client_id = data[2 : 2 + data[1]].decode()
        if client_id.startswith(f"{shard}-"):
            return sock
        sock.close()
    raise AssertionError(f"no connection landed on worker {shard}")


def test_sighup_reloads_without_dropping_every_client_at_once() -> None:
    """SIGHUP with 40 clients on 2 workers: new workers take new connections at once;
    the old ones keep their clients through the first fifth of the drain period, then
    close each with 1012 at its own moment; nobody is lost without a close frame, the
    health path answers throughout, and the new workers are one logical server."""
    drain = 10.0
    with Cluster(workers=2, args=["--drain-timeout", str(drain)]) as cluster:
        cluster.wait_ready()
        port = cluster.port
        old = cluster.worker_pids()
        refused: list[BaseException] = []
        done = threading.Event()

        def probe() -> None:  # the service must answer during the whole reload
            while not done.is_set():
                try:
                    healthz(port, timeout=2.0)
                except Exception as exc:
                    refused.append(exc)
                time.sleep(0.05)

        async def main() -> tuple[dict[int, tuple[float, int | None, bool]], int, int]:
            clients = await open_clients(port, 40)
            closed: dict[int, tuple[float, int | None, bool]] = {}
            started = time.monotonic()

            async def watch(index: int) -> None:
                ws = clients[index].ws
                with contextlib.suppress(Exception):
                    await ws.wait_closed()
                received_close = ws.protocol.close_rcvd is not None
                closed[index] = (time.monotonic() - started, ws.close_code, received_close)

            watchers = [asyncio.create_task(watch(i)) for i in range(len(clients))]
            cluster.signal(signal.SIGHUP)
            served = failed = 0
            # new clients are served throughout, until every old one is gone
            while len(closed) < len(clients) and time.monotonic() - started < drain + 5:
                try:
                    fresh = await open_clients(port, 1)
                    assert await fresh[0].request("whoami", timeout=3)
                    await close_all(fresh)
                    served += 1
                except Exception:
                    failed += 1
                await asyncio.sleep(0.1)
            await asyncio.wait(watchers, timeout=1)
            return closed, served, failed

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            closed, served, failed = asyncio.run(main())
        finally:
            done.set()
            prober.join(5)
        assert len(closed) == 40, (len(closed), cluster.log())
        early = [t for t, _, _ in closed.values() if t < 2.0]
        assert len(early) <= 4, sorted(closed.values())
        assert all(t <= drain + 5 for t, _, _ in closed.values()), sorted(closed.values())
        assert {code for _, code, _ in closed.values()} == {1012}, closed
        assert all(received for _, _, received in closed.values())  # a close frame each
        assert served >= 20 and failed == 0, (served, failed)
        assert refused == [], refused[:3]
        wait_for(lambda: not any(alive(pid) for pid in old.values()), 10)
        assert cluster.proc is not None and cluster.proc.poll() is None
        new = wait_for(lambda: _known_pids(cluster), 5)
        assert len(new) == 2 and not set(new.values()) & set(old.values()), (old, new)
        log = cluster.log()
        assert log.count("drained and stopped") == 2, log
        assert "died" not in log, log  # a planned stop is not logged as a death

        async def one_server() -> None:  # the new workers are one logical server
            shards = sorted(new)
            a = await open_client_on(port, shards[0])
            b = await open_client_on(port, shards[1])
            try:
                await a.ws.send("broadcast:after hup")
                assert await a.next() == "after hup"
                assert await b.next() == "after hup"
            finally:
                await close_all([a, b])

        asyncio.run(one_server())


def test_a_reload_whose_new_code_fails_keeps_the_old_workers(tmp_path: Path) -> None:
    """SIGHUP after the app was broken: the new workers fail to import it, the reload is
    abandoned with one error line, and the old workers and their clients serve on."""
    app = tmp_path / "reloadable.py"
    app.write_text("from tests.cluster_app import build_server\nserver = build_server()\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"}
    with Cluster(workers=2, app="reloadable:server", env=env) as cluster:
        cluster.wait_ready()
        old = cluster.worker_pids()

        async def main() -> None:
            clients = await open_clients(cluster.port, 6)
            try:
                app.write_text("raise RuntimeError('a typo in the new release')\n")
                cluster.signal(signal.SIGHUP)
                wait_for(lambda: "the reload is abandoned" in cluster.log(), 15)
                await asyncio.sleep(1.0)
                for client in clients:  # still connected, still served
                    assert await client.request("whoami")
            finally:
                await close_all(clients)

        asyncio.run(main())
        assert cluster.proc is not None and cluster.proc.poll() is None
        assert cluster.worker_pids() == old
        assert "a typo in the new release" in cluster.log()


def test_refused_requests_stay_out_of_the_log_at_the_default_level() -> None:
    """100 plain ``GET /`` (a scanner) add at most 2 lines to the log at INFO; they are
    counted in /metrics all the same."""
    import urllib.error
    import urllib.request

    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        time.sleep(0.5)
        before = len(cluster.log().splitlines())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(100):
            with contextlib.suppress(urllib.error.HTTPError):
                opener.open(f"http://127.0.0.1:{cluster.port}/", timeout=2).close()
        time.sleep(0.5)
        lines = cluster.log().splitlines()[before:]
        assert len(lines) <= 2, lines

        def refused() -> bool:  # the other worker's figures come with its heartbeat
            url = f"http://127.0.0.1:{cluster.port}/metrics"
            with opener.open(url, timeout=2) as answer:
                metrics = answer.read().decode()
            counts = re.findall(
                r'^enjent_handshakes_total\{worker="\d+",outcome="refused"\} (\d+)$',
                metrics,
                re.M,
            )
            return len(counts) == 2 and sum(map(int, counts)) >= 100

        wait_for(refused, 5)


def test_a_worker_that_does_not_boot_in_time_is_reported_once(tmp_path: Path) -> None:
    app = tmp_path / "slowboot.py"
    marker = tmp_path / "imported-once"
    # the supervisor imports the app first (to read its options): that import is
    # quick; each worker's import of the new code then hangs
    app.write_text(
        "import os, time\nfrom tests.cluster_app import build_server\n"
        f"if os.path.exists({str(marker)!r}):\n    time.sleep(30)\n"
        f"open({str(marker)!r}, 'w').close()\nserver = build_server()\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"}
    cluster = Cluster(workers=2, app="slowboot:server", env=env, args=["--boot-timeout", "2"])
    with cluster:
        assert cluster.wait(15) == 3, cluster.log()
        log = cluster.log()
    assert log.count("did not boot within 2s") <= 2, log  # one line per worker at most
    assert "--boot-timeout" in log


def _known_pids(cluster: Cluster) -> dict[int, int] | None:
    """shard -> pid once the answering worker has heard every peer's heartbeat."""
    pids = cluster.worker_pids()
    return pids if all(pids.values()) else None


def test_sigttin_and_sigttou_add_and_remove_a_worker() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port

        def workers_seen_by_all(count: int) -> bool:
            for shard in range(count):
                if len(healthz_of(port, shard, timeout=2.0)["workers"]) != count:
                    return False
            return len(cluster.children()) == count + 1

        cluster.signal(signal.SIGTTIN)
        wait_for(lambda: workers_seen_by_all(3), 10)
        pids = wait_for(lambda: _known_pids(cluster), 5)
        assert sorted(pids) == [0, 1, 2]
        cluster.signal(signal.SIGTTOU)
        wait_for(lambda: workers_seen_by_all(2) and len(healthz(port)["workers"]) == 2, 10)
        wait_for(lambda: not alive(pids[2]), 5)
        assert wait_for(lambda: _known_pids(cluster), 5) == {0: pids[0], 1: pids[1]}


# ------------------------------------------------------------- failures


def test_broker_sigkill_is_restarted_and_bus_traffic_resumes() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        port = cluster.port

        async def main() -> float:
            a = await open_client_on(port, 0)
            b = await open_client_on(port, 1)
            try:
                workers = cluster.worker_pids()
                broker = cluster.broker_pid()
                os.kill(broker, signal.SIGKILL)
                killed_at = time.monotonic()
                # until a broadcast crosses from worker 0 to worker 1 again
                deadline = killed_at + 5.0
                n = 0
                while True:
                    assert time.monotonic() < deadline, cluster.log()
                    n += 1
                    await a.ws.send(f"broadcast:ping{n}")
                    try:
                        while True:
                            message = await b.next(timeout=0.1)
                            if message == f"ping{n}":
                                break
                        break
                    except TimeoutError:
                        pass
                recovered = time.monotonic() - killed_at
                assert cluster.worker_pids() == workers  # the workers were not touched
                new_broker = cluster.broker_pid()
                assert new_broker != broker
                # and the other way, once more
                await b.ws.send("broadcast:back")
                while await a.next() != "back":
                    pass
                return recovered
            finally:
                await close_all([a, b])

        recovered = asyncio.run(main())
        print(f"broker restart, bus traffic back after {recovered:.3f}s")
        assert "broker" in cluster.log() and "restarting it" in cluster.log()


def test_supervisor_sigkill_leaves_no_orphans() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        children = {child.pid for child in cluster.children()}
        assert len(children) == 3
        assert len(cluster.runtime_dirs()) == 1
        os.kill(cluster.pid, signal.SIGKILL)
        cluster.wait(5)
        assert wait_for_gone(children, 5.0) == []
        # the broker removed the ipc files and the runtime directory on its way out
        assert cluster.runtime_dirs() == []
        assert port_is_free(cluster.port)  # nobody holds the port


# ------------------------------------------------------- one worker, echo


def test_one_worker_does_not_fork() -> None:
    with Cluster(workers=1) as cluster:
        data = wait_for(lambda: healthz(cluster.port), 15)
        assert [w["pid"] for w in data["workers"]] == [cluster.pid]
        assert cluster.children() == []
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(CLOSE_TIMEOUT + 3) == 0


def test_echo_example_with_two_workers_broadcasts_everywhere() -> None:
    port = free_port()
    command = [
        sys.executable,
        str(Path(REPO_ROOT, "examples", "echo.py")),
        "--port",
        str(port),
        "--workers",
        "2",
        "--health-detail",
    ]
    with Cluster(workers=2, port=port, command=command) as cluster:
        cluster.wait_ready()

        async def main() -> None:
            from websockets.asyncio.client import connect

            sockets = [await connect(f"ws://127.0.0.1:{port}/") for _ in range(30)]
            try:
                await sockets[0].send("just echo")
                assert await asyncio.wait_for(sockets[0].recv(), 5) == "just echo"
                # the other worker's count comes with its next heartbeat (about 1 s)
                deadline = time.monotonic() + 3.0
                while True:
                    per_worker = [w["clients"] for w in healthz(port)["workers"]]
                    if sum(per_worker) == 30 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert len(per_worker) == 2 and all(per_worker), per_worker
                assert sum(per_worker) == 30, per_worker
                await sockets[-1].send("broadcast:to everyone")
                for ws in sockets:
                    assert await asyncio.wait_for(ws.recv(), 5) == "to everyone"
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        asyncio.run(main())
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(10) == 0


# ------------------------------------------------ hung workers, dying brokers


@pytest.mark.timeout(90)
def test_a_stopped_worker_is_replaced_after_worker_timeout() -> None:
    """SIGSTOP a worker: killed and replaced within worker_timeout (+ a margin), logged."""
    with Cluster(workers=2, args=["--worker-timeout", "3"]) as cluster:
        cluster.wait_ready()
        before = cluster.worker_pids()
        stopped_at = time.monotonic()
        os.kill(before[0], signal.SIGSTOP)
        try:

            def replaced() -> dict[int, int] | None:
                try:
                    pids = {
                        shard: healthz_of(cluster.port, shard, timeout=1.5)["workers"]
                        for shard in (0, 1)
                    }
                except (OSError, AssertionError):
                    return None
                own = {w["shard"]: w["pid"] for w in pids[1]}
                return own if own.get(0) not in (None, 0, before[0]) else None

            wait_for(replaced, 20.0)
            took = time.monotonic() - stopped_at
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(before[0], signal.SIGCONT)
        assert took < 3 + 10, took
        log = cluster.log()
        assert "worker 0" in log and "sent no heartbeat" in log, log
        assert not alive(before[0]) or psutil_status(before[0]) == "zombie"
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(15) == 0, cluster.log()


def psutil_status(pid: int) -> str:
    import psutil

    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return "gone"


def test_broker_restarts_back_off_and_a_broker_that_never_starts_stops_the_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker dying in a loop is restarted at most every 0.1, 0.2, ... 10 s, not 300/s."""
    from enjent_supervisor import arbiter as arbiter_module

    clock = [1000.0]
    monkeypatch.setattr(arbiter_module.time, "monotonic", lambda: clock[0])
    supervisor = arbiter_module.Arbiter(lambda: None, "127.0.0.1", 0, workers=1)  # type: ignore[arg-type,return-value]
    supervisor._broker_was_up = True  # it ran fine once: keep retrying, with a backoff
    delays = []
    for _ in range(10):
        supervisor._broker_started_at = clock[0]
        supervisor._broker_died(1234, 1)
        delays.append(round(supervisor._broker_restart_at - clock[0], 2))
        clock[0] = supervisor._broker_restart_at + 0.01  # dies again at once
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert not supervisor._stopping
    # after a long healthy life, the backoff starts over
    clock[0] += 60
    supervisor._broker_died(1234, 1)
    assert round(supervisor._broker_restart_at - clock[0], 2) == 0.1

    fresh = arbiter_module.Arbiter(lambda: None, "127.0.0.1", 0, workers=1)  # type: ignore[arg-type,return-value]
    for _ in range(arbiter_module.BROKER_START_ATTEMPTS):
        fresh._broker_started_at = clock[0]
        fresh._broker_died(1234, 1)
    assert fresh._stopping and fresh.exit_code == arbiter_module.WORKER_BOOT_ERROR


@pytest.mark.timeout(60)
def test_a_broker_that_cannot_bind_stops_the_supervisor_with_exit_3(tmp_path: Path) -> None:
    """A runtime directory with no inode left (a tmpfs of our own, in a private mount
    namespace): the broker cannot bind; three attempts with a backoff, then exit 3."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    runtime = tmp_path / "full"
    runtime.mkdir()
    port = free_port()
    script = (
        f"mount -t tmpfs -o size=1m,nr_inodes=2 tmpfs {runtime} && exec {sys.executable} -m "
        f"enjent run tests.cluster_app:server --workers 2 --port {port} --runtime-dir {runtime}"
    )
    started = time.monotonic()
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=40,
    )
    took = time.monotonic() - started
    if "mount:" in done.stderr and done.returncode not in (0, 3):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 3, done.stderr
    assert "the bus broker cannot start" in done.stderr
    assert len(done.stderr.splitlines()) < 60  # bounded log, no restart storm
    assert took < 20, took
    assert port_is_free(port)


@pytest.mark.timeout(60)
def test_a_stopped_broker_shows_as_bus_down_in_healthz() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        broker = cluster.broker_pid()
        assert healthz(cluster.port)["status"] == "ok"
        os.kill(broker, signal.SIGSTOP)
        try:

            def degraded() -> dict[str, Any] | None:
                data = healthz(cluster.port, timeout=1.0)
                return data if data["status"] == "degraded" else None

            data = wait_for(degraded, 15.0)
            assert data["bus"]["up"] is False
        finally:
            os.kill(broker, signal.SIGCONT)
        wait_for(lambda: healthz(cluster.port, timeout=1.0)["status"] == "ok", 15.0)
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(15) == 0


def test_the_supervisor_warms_up_without_the_apps_handlers() -> None:
    """warm_up serves loopback clients with a bare server of its own, then leaves no trace."""
    import asyncio as asyncio_module
    import threading

    from enjent_supervisor.warmup import warm_up

    threads = threading.active_count()
    assert warm_up(rounds=8) is True
    with pytest.raises(RuntimeError):
        asyncio_module.get_running_loop()  # its loop is closed, none left running
    assert threading.active_count() == threads
    # and it never raises: a failure only skips the optimization
    assert warm_up(rounds=1, timeout=1e-9) is False


def test_the_supervisor_fills_its_allocator_pools_before_forking() -> None:
    """fill_allocator_pools takes the free small-object blocks the supervisor has in use.

    Run in a fresh interpreter: the fillers live as long as their process.
    What it guarantees on any interpreter state: every block free when it
    looked is taken (``filled >= before``), and what is free afterwards is at
    most the rest of the pool each size class last opened (the fill itself may
    open one, and frees its own few temporaries): never more than two pools'
    worth per class. A total ratio (``after < before / 4``) held on one heap
    and not on another (739 left of 2795: one fresh pool of 48-byte blocks).
    """
    script = textwrap.dedent(
        """
        import json
        from enjent_supervisor.warmup import _available_blocks, fill_allocator_pools
        import enjent  # a heap like the supervisor's, with free blocks left by imports
        before = _available_blocks()
        filled = fill_allocator_pools()
        after = _available_blocks()
        print(json.dumps([sum(before.values()), filled, sorted(after.items()), len(before)]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    before, filled, after, classes = json.loads(done.stdout)
    assert classes == 32  # every size class of CPython's small-object allocator was read
    assert before > 0 and filled >= before
    largest_pool = 16 * 1024  # CPython's pools are 4 KiB (before 3.10) or 16 KiB
    for size, free_blocks in after:
        assert free_blocks * size <= 2 * largest_pool, (size, free_blocks, after)


def test_filling_the_pools_is_skipped_without_the_allocators_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from enjent_supervisor import warmup

    monkeypatch.delattr(sys, "_debugmallocstats")
    assert warmup._available_blocks() is None
    assert warmup.fill_allocator_pools() == 0
