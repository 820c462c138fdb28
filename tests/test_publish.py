"""Publishing from processes that are not workers: Publisher, enjent publish, the HTTP API.

Real processes throughout: ``enjent run tests.cluster_app:server --workers 2``
on the embedded bus at a stable address (``--bus ipc:///DIR``) and on NATS
(``nats-server`` from the test extra), publishers in interpreters of their
own (a script run with ``python -c``), the command line as a shell runs it,
and the HTTP API through ``urllib`` (a real HTTP client).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterutil import (
    REPO_ROOT,
    Client,
    Cluster,
    close_all,
    free_port,
    healthz,
    open_client,
    open_clients,
    wait_for,
)
from natsutil import cluster_on_nats

pytestmark = pytest.mark.timeout(120)

API_KEY = "test-key-0123456789abcdef"


def run_python(source: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """A publisher in an interpreter of its own."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def enjent_publish(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "enjent", "publish", *args],
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        timeout=30,
    )


def bus_directory() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="ejp-"), "bus")


@pytest.fixture
def zmq_cluster() -> Iterator[tuple[Cluster, str]]:
    directory = bus_directory()
    bus = f"ipc://{directory}"
    env = {"ENJENT_API_KEY": API_KEY}
    api_port = free_port()
    cluster = Cluster(workers=2, args=["--bus", bus, "--api", f"127.0.0.1:{api_port}"], env=env)
    cluster.api_port = api_port  # type: ignore[attr-defined]
    with cluster:
        cluster.wait_ready()
        yield cluster, bus


@pytest.fixture
def nats_cluster() -> Iterator[tuple[Cluster, str]]:
    with cluster_on_nats() as (cluster, bus):
        yield cluster, bus


async def _room_members(port: int, room: str, count: int) -> list[Client]:
    clients = await open_clients(port, count)
    for client in clients:
        assert await client.request(f"join:{room}") == "joined"
    return clients


def _check_publisher_reaches_everyone(cluster: Cluster, bus: str, *, strict_order: bool) -> None:
    async def main() -> None:
        everyone = await open_clients(cluster.port, 6)
        red = await _room_members(cluster.port, "red", 3)
        both = await _room_members(cluster.port, "blue", 1)
        assert await both[0].request("join:red") == "joined"
        target = everyone[0]
        await asyncio.sleep(0.5)  # room subscriptions reach the bus
        done = await asyncio.to_thread(
            run_python,
            f"""
            from enjent import Publisher, RoomLimitError, MessageTooBigError
            with Publisher({bus!r}, max_message_size=1000) as pub:
                pub.broadcast("to everyone")
                pub.broadcast(b"\\x00binary")
                pub.room("red").broadcast("to red")
                pub.rooms("red", "blue").broadcast("to red or blue")
                pub.send({target.id!r}, "just you")
                try:
                    pub.room("x" * 300).broadcast("never")
                except RoomLimitError as exc:
                    print("refused:", exc)
                try:
                    pub.broadcast("y" * 1001)
                except MessageTooBigError as exc:
                    print("refused:", exc)
                presence = pub.fetch_clients(room="red")
                print("presence", presence.total, len(presence.clients), presence.partial)
                print("count", pub.count())
                pub.close_client({target.id!r}, 4000, "bye")
            """,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("refused:") == 2, done.stdout
        assert "presence 4 4 False" in done.stdout, done.stdout
        assert "count 10" in done.stdout, done.stdout
        expected: dict[str, list[str | bytes]] = {}
        for client in [*everyone, *red, *both]:
            expected[client.id] = ["to everyone", b"\x00binary"]
        for client in [*red, *both]:  # one copy of the second, though "both" is in both rooms
            expected[client.id] += ["to red", "to red or blue"]
        expected[target.id].append("just you")
        for client in [*everyone, *red, *both]:
            got = [await client.next() for _ in expected[client.id]]
            if strict_order:  # one socket carries everything in order
                assert got == expected[client.id], client.id
            else:  # NATS orders per subject: each target's own messages in order
                assert sorted(got, key=repr) == sorted(expected[client.id], key=repr)
                assert got.index("to everyone") < got.index(b"\x00binary")
                if "to red" in got:
                    assert got.index("to red") < got.index("to red or blue")
        await asyncio.wait_for(target.closed.wait(), 5)
        assert target.ws.close_code == 4000 and target.ws.close_reason == "bye"
        await asyncio.sleep(0.5)
        assert [c.pending() for c in [*everyone[1:], *red, *both]] == [[]] * 9
        # a publisher is never a worker: the counts and the worker list are unchanged
        health = healthz(cluster.port)
        assert len(health["workers"]) == 2 and health["status"] == "ok", health
        assert health["bus"]["gaps"] == 0 and health["bus"]["malformed"] == 0, health
        await close_all([*everyone[1:], *red, *both])

    asyncio.run(main())


def test_a_publisher_reaches_clients_rooms_and_ids_on_the_embedded_bus(
    zmq_cluster: tuple[Cluster, str],
) -> None:
    cluster, bus = zmq_cluster
    directory = bus[len("ipc://") :]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    _check_publisher_reaches_everyone(cluster, bus, strict_order=True)


def test_a_publisher_reaches_clients_rooms_and_ids_over_nats(
    nats_cluster: tuple[Cluster, str],
) -> None:
    cluster, bus = nats_cluster
    _check_publisher_reaches_everyone(cluster, bus, strict_order=False)


@pytest.mark.parametrize("engine", ["zmq", "nats"])
def test_50000_sends_to_one_client_arrive_all_and_in_order(
    engine: str, request: pytest.FixtureRequest
) -> None:
    cluster, bus = request.getfixturevalue(f"{engine}_cluster")
    total = 50_000

    async def main() -> None:
        client = await open_client(cluster.port)
        done = await asyncio.to_thread(
            run_python,
            f"""
            import time
            from enjent import Publisher
            started = time.monotonic()
            with Publisher({bus!r}) as pub:
                for index in range(1, {total} + 1):
                    pub.send({client.id!r}, str(index))
            print(f"{{{total} / (time.monotonic() - started):.0f}} sends/s")
            """,
            timeout=110,
        )
        assert done.returncode == 0, done.stderr
        received = [await client.next(timeout=30) for _ in range(total)]
        assert received == [str(index) for index in range(1, total + 1)]
        health = healthz(cluster.port)
        assert health["bus"]["gaps"] == 0, health
        await close_all([client])
        print(engine, done.stdout.strip())

    asyncio.run(main())


def test_a_publisher_that_starts_first_and_outlives_a_server_restart(tmp_path: Path) -> None:
    directory = bus_directory()
    bus = f"ipc://{directory}"
    port = free_port()
    script = tmp_path / "publisher.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from enjent import Publisher
            pub = Publisher({bus!r}, timeout=30)
            for line in sys.stdin:  # one message per line, until stdin closes
                pub.broadcast(line.strip())
                print("sent", line.strip(), flush=True)
            pub.close()
            """
        )
    )
    publisher = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "publisher.err", "w"),  # noqa: SIM115 - the child's
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert publisher.stdin is not None and publisher.stdout is not None
    try:
        for life in ("first", "second"):
            with Cluster(workers=2, port=port, args=["--bus", bus]) as cluster:
                cluster.wait_ready()

                async def main(life: str = life) -> None:
                    clients = await open_clients(port, 4)
                    assert publisher.stdin is not None and publisher.stdout is not None
                    publisher.stdin.write(f"{life} life\n")
                    publisher.stdin.flush()
                    line = await asyncio.wait_for(asyncio.to_thread(publisher.stdout.readline), 40)
                    errors = (tmp_path / "publisher.err").read_text()
                    assert line.strip() == f"sent {life} life", errors
                    for client in clients:
                        try:
                            got = await client.next(timeout=10)
                        except TimeoutError:
                            raise AssertionError(f"nothing in the {life} life") from None
                        assert got == f"{life} life"
                    await close_all(clients)

                asyncio.run(main())
                cluster.signal(signal.SIGTERM)
                assert cluster.wait(15) == 0
        publisher.stdin.close()
        assert publisher.wait(30) == 0
    finally:
        publisher.kill()


def test_a_bus_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "bus"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    cluster = Cluster(workers=2, args=["--bus", f"ipc://{directory}"])
    with cluster:
        assert cluster.wait(20) == 2, cluster.log()
        assert "chmod 700" in cluster.log()


# ----------------------------------------------------------- the command line


def test_enjent_publish_reaches_clients_and_says_what_went_wrong(
    zmq_cluster: tuple[Cluster, str],
) -> None:
    cluster, bus = zmq_cluster

    async def main() -> None:
        clients = await _room_members(cluster.port, "ops", 2)
        other = await open_client(cluster.port)
        await asyncio.sleep(0.5)
        done = await asyncio.to_thread(enjent_publish, "--bus", bus, "--all", "from cron")
        assert done.returncode == 0, done.stderr
        for client in [*clients, other]:
            assert await client.next() == "from cron"
        done = await asyncio.to_thread(
            enjent_publish, "--bus", bus, "--room", "ops", "--binary", "-", stdin=b"\x01\x02"
        )
        assert done.returncode == 0, done.stderr
        for client in clients:
            assert await client.next() == b"\x01\x02"
        done = await asyncio.to_thread(enjent_publish, "--bus", bus, "--client", other.id, "you")
        assert done.returncode == 0 and await other.next() == "you"
        await asyncio.sleep(0.3)
        assert other.pending() == []
        await close_all([*clients, other])

    asyncio.run(main())
    for args in (["--bus", bus, "--all"], ["--bus", bus, "data"], ["--all", "x"]):
        env_free = {k: v for k, v in os.environ.items() if k != "ENJENT_BUS"}
        done = subprocess.run(
            [sys.executable, "-m", "enjent", "publish", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env=env_free,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("usage: enjent publish"), done.stderr
    nowhere = bus_directory()
    done = enjent_publish("--bus", f"ipc://{nowhere}", "--all", "x", "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert b"Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------- the HTTP API


def api(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = API_KEY,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_http_api_publishes_closes_and_answers_presence(
    zmq_cluster: tuple[Cluster, str],
) -> None:
    cluster, _ = zmq_cluster
    port = cluster.api_port  # type: ignore[attr-defined]

    async def main() -> None:
        members = await _room_members(cluster.port, "news", 2)
        other = await open_client(cluster.port)
        await asyncio.sleep(0.5)
        call = asyncio.to_thread
        assert await call(api, port, "POST", "/api/publish", {"all": True, "data": "all"}) == (
            200,
            {"ok": True},
        )
        for client in [*members, other]:
            assert await client.next() == "all"
        body = {"room": "news", "data_b64": base64.b64encode(b"\x00\xff").decode()}
        assert (await call(api, port, "POST", "/api/publish", body))[0] == 200
        for client in members:
            assert await client.next() == b"\x00\xff"
        body = {"rooms": ["news", "other"], "data": "rooms", "exclude": members[0].id}
        assert (await call(api, port, "POST", "/api/publish", body))[0] == 200
        assert await members[1].next() == "rooms"
        body = {"client": other.id, "data": "one"}
        assert (await call(api, port, "POST", "/api/publish", body))[0] == 200
        assert await other.next() == "one"
        status, presence = await call(api, port, "GET", "/api/presence?room=news&limit=10")
        assert status == 200 and presence["total"] == 2 and not presence["partial"], presence
        assert sorted(c["id"] for c in presence["clients"]) == sorted(m.id for m in members)
        body = {"client": other.id, "code": 4001, "reason": "done"}
        assert (await call(api, port, "POST", "/api/close", body))[0] == 200
        await asyncio.wait_for(other.closed.wait(), 5)
        assert other.ws.close_code == 4001
        await asyncio.sleep(0.3)
        assert members[0].pending() == []
        await close_all(members)

    asyncio.run(main())
    good = {"all": True, "data": "x"}
    refusals = [
        (api(port, "POST", "/api/publish", good, key=None), 401),
        (api(port, "POST", "/api/publish", good, key="wrong-key-0123456789"), 401),
        (api(port, "POST", "/api/publish", raw=b"{not json"), 400),
        (api(port, "POST", "/api/publish", {"room": 5, "data": "x"}), 400),
        (api(port, "POST", "/api/publish", {"all": True, "room": "a", "data": "x"}), 400),
        (api(port, "POST", "/api/publish", {"all": True}), 400),
        (api(port, "POST", "/api/close", {"client": "not-an-id"}), 400),
        (api(port, "GET", "/api/publish"), 405),
        (api(port, "POST", "/api/presence", good), 405),
        (api(port, "GET", "/api/nothing"), 404),
        (api(port, "POST", "/api/publish", {"all": True, "data": "x" * ((1 << 20) + 1)}), 413),
    ]
    for (status, answer), expected in refusals:
        assert status == expected, (status, answer, expected)
        assert answer["error"], answer
    assert "room" in api(port, "POST", "/api/publish", {"room": 5, "data": "x"})[1]["error"]
    # a body announced over the limit is refused from its head, before it is sent
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Length: {2 << 20}\r\n\r\n".encode()
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer


def test_the_http_api_keeps_serving_while_a_worker_restarts(
    zmq_cluster: tuple[Cluster, str],
) -> None:
    cluster, _ = zmq_cluster
    port = cluster.api_port  # type: ignore[attr-defined]
    pids = cluster.worker_pids()
    os.kill(pids[0], signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        statuses.append(api(port, "POST", "/api/publish", {"all": True, "data": "x"})[0])
        time.sleep(0.05)
    assert set(statuses) == {200}, statuses
    wait_for(
        lambda: len(cluster.worker_pids()) == 2 and pids[0] not in cluster.worker_pids().values(),
        20,
    )


def test_the_api_needs_a_key_and_a_port_of_its_own() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ENJENT_API_KEY"}
    for extra, wanted in (
        ([], "--api needs a key"),
        (["--port", "18080"], "a port of its own"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "enjent", "run", "tests.cluster_app:server", "--workers", "2",
             "--api", "127.0.0.1:18080", *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "ENJENT_API_KEY": API_KEY} if extra else env,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert wanted in done.stderr, done.stderr
