"""The examples, for real: as subprocesses on a free port, or imported and started in-process."""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import wsutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from wsutil import HOST, raw_http, recv

from enjent import WebSocketClient, WebSocketServer

async_test = wsutil.async_test_within(15.0)


def ws_connect(port: int, path: str = "/", **kwargs: Any) -> connect:
    """A ``websockets`` client with its default compression (permessage-deflate)."""
    return wsutil.ws_connect(port, path, **{"compression": "deflate", **kwargs})


async def recv_json(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    """The next message, without the chat's room positions (``epoch``, ``offset``,
    ``recovered``: checked by ``test_chat_resumes_a_room_after_a_reconnect``)."""
    decoded = await recv_json_full(ws, timeout)
    for key in ("epoch", "offset", "recovered"):
        decoded.pop(key, None)
    return decoded


async def recv_json_full(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    message = await recv(ws, timeout)
    assert isinstance(message, str)
    decoded: dict[str, Any] = json.loads(message)
    return decoded


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET over a raw socket; the server closes after answering."""
    return await raw_http(port, f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())


@asynccontextmanager
async def example_process(repo_root: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``python <args>`` from the repository root; kill it if a test leaves it running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=repo_root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), 5)


async def wait_listening(process: asyncio.subprocess.Process, port: int) -> None:
    deadline = time.monotonic() + 8
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if process.returncode is not None:
                assert process.stderr is not None
                raise AssertionError((await process.stderr.read()).decode()) from None
            assert time.monotonic() < deadline, "the example did not start listening"
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


def load(repo_root: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """Import an example by its dotted name, as ``enjent run module:server`` would."""
    monkeypatch.syspath_prepend(str(repo_root))
    return importlib.import_module(name)


# -------------------------------------------------------------------- chat


@async_test
async def test_chat_page_and_rooms_as_a_process(repo_root: Path, free_port: int) -> None:
    args = ("examples/chat/app.py", "--host", HOST, "--port", str(free_port), "--workers", "1")
    async with example_process(repo_root, *args) as process:
        await wait_listening(process, free_port)

        status, headers, body = await http_get(free_port, "/")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        page = body.decode()
        assert "<script>" in page and "new WebSocket(" in page and "/join" in page
        assert 'src="http' not in page and 'href="http' not in page  # no external assets
        status, _, body = await http_get(free_port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"

        alice = await ws_connect(free_port, "/?name=alice")
        assert await recv_json(alice) == {"type": "welcome", "name": "alice", "id": ANY_ID}
        assert await recv_json(alice) == {"type": "joined", "room": "lobby"}
        bob = await ws_connect(free_port, "/?name=bob")
        assert (await recv_json(bob))["type"] == "welcome"
        assert await recv_json(bob) == {"type": "joined", "room": "lobby"}
        assert await recv_json(alice) == {
            "type": "presence",
            "room": "lobby",
            "name": "bob",
            "event": "joined",
        }

        # two clients in the same room see each other's messages
        await alice.send("hello bob")
        await bob.send("hi alice")
        for ws in (alice, bob):
            assert await recv_json(ws) == message("lobby", "alice", "hello bob")
            assert await recv_json(ws) == message("lobby", "bob", "hi alice")

        # /join moves alice: lobby no longer reaches her
        await alice.send("/join games")
        assert await recv_json(alice) == {"type": "joined", "room": "games"}
        assert (await recv_json(bob))["event"] == "left"
        await bob.send("anyone?")
        assert await recv_json(bob) == message("lobby", "bob", "anyone?")
        await alice.send("in games")
        assert await recv_json(alice) == message("games", "alice", "in games")

        process.send_signal(signal.SIGINT)
        for ws in (alice, bob):
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1001
        assert await asyncio.wait_for(process.wait(), 5) == 0


class _AnyId:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_ID = _AnyId()


def message(room: str, name: str, text: str) -> dict[str, str]:
    return {"type": "message", "room": room, "name": name, "text": text}


@async_test
async def test_chat_rejects_zero_workers(repo_root: Path) -> None:
    async with example_process(repo_root, "examples/chat/app.py", "--workers", "0") as process:
        assert await asyncio.wait_for(process.wait(), 5) == 2


@async_test
async def test_chat_in_process(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load(repo_root, monkeypatch, "examples.chat.app")
    server = app.server
    assert isinstance(server, WebSocketServer)
    async with server.serve(HOST, 0):
        port = server.port
        assert (await http_get(port, "/missing"))[0] == 404
        async with ws_connect(port) as guest, ws_connect(port, "/?name=carol") as carol:
            assert (await recv_json(guest))["name"] == "guest"
            await recv_json(guest)  # joined lobby
            await recv_json(guest)  # carol joined
            await recv_json(carol)
            await recv_json(carol)

            await guest.send("/join bad room name!")
            assert (await recv_json(guest))["type"] == "error"
            await guest.send(b"binary")
            assert (await recv_json(guest))["type"] == "error"
            await guest.send("/join lobby")  # already there: nothing happens
            await guest.send("   ")  # blank: nothing is sent
            await guest.send("x" * 5000)
            for ws in (carol, guest):  # the sender gets its message too
                received = await recv_json(ws)
                assert received["name"] == "guest" and len(received["text"]) == app.MAX_TEXT

            await carol.send("/join games")
            assert await recv_json(carol) == {"type": "joined", "room": "games"}
            assert (await recv_json(guest))["event"] == "left"
            await guest.send("/join games")
            assert await recv_json(guest) == {"type": "joined", "room": "games"}
            assert await recv_json(carol) == {
                "type": "presence",
                "room": "games",
                "name": "guest",
                "event": "joined",
            }
            client = next(c for c in server.clients if c.name == "carol")
            assert isinstance(client, app.ChatClient)
            assert not hasattr(client, "__dict__")
            assert client.rooms == {"games"}
            await guest.close()
            assert await recv_json(carol) == {
                "type": "presence",
                "room": "games",
                "name": "guest",
                "event": "left",
            }


@async_test
async def test_chat_resumes_a_room_after_a_reconnect(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page back with ``?room=&since=`` gets what was said meanwhile, in order."""
    app = load(repo_root, monkeypatch, "examples.chat.app")
    server = app.build_server()
    async with server.serve(HOST, 0):
        port = server.port
        async with ws_connect(port, "/?name=ann") as ann:
            assert (await recv_json_full(ann))["type"] == "welcome"
            joined = await recv_json_full(ann)
            assert joined["type"] == "joined" and joined["recovered"] is None
            await ann.send("hello")
            said = await recv_json_full(ann)
            # (offset joined + 1 is ann's own "joined" notice, sent to the others)
            assert said["offset"] == joined["offset"] + 2 and said["epoch"] == joined["epoch"]
        async with ws_connect(port, "/?name=bob") as bob:
            for _ in range(2):
                await recv_json(bob)  # welcome, joined
            await bob.send("while you were away")
            assert (await recv_json(bob))["text"] == "while you were away"
            since = f"{said['epoch']}:{said['offset']}"
            async with ws_connect(port, f"/?name=ann&room=lobby&since={since}") as back:
                assert (await recv_json(back))["type"] == "welcome"
                again = await recv_json_full(back)
                assert again["type"] == "joined" and again["recovered"] is True
                missed = [await recv_json_full(back) for _ in range(3)]
                assert [m["offset"] for m in missed] == [said["offset"] + n for n in (1, 2, 3)]
                assert [(m["type"], m["name"]) for m in missed] == [
                    ("presence", "ann"),  # ann left
                    ("presence", "bob"),  # bob joined
                    ("message", "bob"),
                ]
                assert again["offset"] == missed[-1]["offset"]
            async with ws_connect(port, "/?name=eve&room=lobby&since=nonsense") as eve:
                await recv_json(eve)
                assert (await recv_json_full(eve))["recovered"] is False


@async_test
async def test_chat_refuses_other_sites_and_sends_its_page_safely(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cross-site WebSocket hijacking is refused; the page carries a CSP and nosniff."""
    app = load(repo_root, monkeypatch, "examples.chat.app")
    server = app.build_server(allowed_origins=["https://chat.example.com"])
    async with server.serve(HOST, 0):
        port = server.port
        status, headers, body = await http_get(port, "/")
        assert status == 200 and b'id="name"' in body and b"prompt(" not in body
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
        assert "'unsafe-inline'" not in policy
        assert headers["x-content-type-options"] == "nosniff"
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(port, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        same_site = f"http://{HOST}:{port}"  # the page's own origin
        for origin in (same_site, "https://chat.example.com", None):
            async with ws_connect(port, origin=origin) as ws:
                assert (await recv_json(ws))["type"] == "welcome"


# ----------------------------------------------------------- custom client


@async_test
async def test_custom_client_factory(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load(repo_root, monkeypatch, "examples.custom_client")
    server = example.server
    async with server.serve(HOST, 0):
        port = server.port
        for path in ("/", "/?user=", "/?user=no%20spaces"):
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(port, path)
            assert info.value.response.status_code == 400

        headers = {"Accept-Language": "fr-CA,fr;q=0.9,en;q=0.8"}
        async with ws_connect(port, "/?user=ada", additional_headers=headers) as ada:
            assert await recv(ada) == "hello ada (fr-CA)"
            client = server.clients[0]
            assert type(client) is example.UserClient
            assert isinstance(client, WebSocketClient)
            assert (client.user, client.language) == ("ada", "fr-CA")
            assert not hasattr(client, "__dict__")

            await ada.send("hi")
            assert await recv(ada) == "ada: hi"
            await ada.send(b"\x00")
            assert await recv(ada) == b"\x00"

            async with ws_connect(port, "/?user=bob") as bob:
                assert await recv(bob) == "hello bob (en)"
                await ada.send("/who")
                assert await recv(ada) == "online: ada, bob"
                await ada.send("@bob psst")
                assert await recv(bob) == "ada (private): psst"
                await ada.send("@nobody hello?")
                assert await recv(ada) == "nobody is not online"

                # the same user again: the older connection is closed
                async with ws_connect(port, "/?user=bob") as bob_again:
                    assert await recv(bob_again) == "hello bob (en)"
                    await asyncio.wait_for(bob.wait_closed(), 3)
                    assert (bob.close_code, bob.close_reason) == (4000, "signed in elsewhere")
                    await ada.send("/who")
                    assert await recv(ada) == "online: ada, bob"


# ---------------------------------------------------------------- embedded


async def read_port(process: asyncio.subprocess.Process) -> int:
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 8)).decode()
    assert line.startswith("listening on ws://"), line
    return int(line.rsplit(":", 1)[1].strip().rstrip("/"))


@async_test
async def test_embedded_stops_by_itself(repo_root: Path) -> None:
    args = ("examples/embedded.py", "--port", "0", "--duration", "1.5", "--tick", "0.1")
    async with example_process(repo_root, *args) as process:
        port = await read_port(process)
        started = time.monotonic()
        async with ws_connect(port) as ws:
            tick = await recv(ws)
            assert isinstance(tick, str) and tick.startswith("tick ")
            await ws.send("echo me")
            while (message := await recv(ws)) != "echo me":
                assert message.startswith("tick ")  # type: ignore[union-attr]
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1001
        assert await asyncio.wait_for(process.wait(), 5) == 0
        assert time.monotonic() - started < 5
        assert process.stdout is not None
        output = (await process.stdout.read()).decode()
        assert "stopping with 1 client(s)" in output
        assert output.rstrip().endswith("stopped")


@async_test
async def test_embedded_stops_on_sigint(repo_root: Path) -> None:
    args = ("examples/embedded.py", "--port", "0", "--duration", "60")
    async with example_process(repo_root, *args) as process:
        port = await read_port(process)
        async with ws_connect(port) as ws:
            await ws.send("ping?")
            assert await recv(ws) == "ping?"
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1001
        assert await asyncio.wait_for(process.wait(), 5) == 0


# -------------------------------------------------------------------- echo


@async_test
async def test_echo_example(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    echo = load(repo_root, monkeypatch, "examples.echo")
    server = echo.build_server()
    async with (
        server.serve(HOST, 0),
        ws_connect(server.port) as first,
        ws_connect(server.port) as second,
    ):
        await first.send("hello")
        assert await recv(first) == "hello"
        await first.send(b"\x01\x02")
        assert await recv(first) == b"\x01\x02"
        await first.send("broadcast:to all")
        assert await recv(first) == "to all"
        assert await recv(second) == "to all"


def test_echo_example_models_the_library_defaults(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Examples model safe limits; the conformance runner and loadtest pass big ones."""
    echo = load(repo_root, monkeypatch, "examples.echo")
    args = echo.parse_args([])
    defaults = WebSocketServer()
    assert args.max_message_size == defaults.max_message_size
    assert args.write_limit == defaults.write_limit
    assert args.max_connections == defaults.max_connections
    from conformance.autobahn import ECHO_LIMITS

    assert "--max-message-size" in ECHO_LIMITS and "--write-limit" in ECHO_LIMITS


@async_test
async def test_echo_example_says_where_it_listens(repo_root: Path, free_port: int) -> None:
    async with example_process(repo_root, "examples/echo.py", "--port", str(free_port)) as process:
        await wait_listening(process, free_port)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    assert f"serving on ws://127.0.0.1:{free_port} (1 worker" in stderr.decode()


# ---------------------------------------------------------------- announce


@pytest.mark.timeout(60)
def test_announce_reaches_the_chat_rooms_from_another_process(
    repo_root: Path, free_port: int, tmp_path: Path
) -> None:
    """The chat on two workers with its bus at a stable address; examples/announce.py,
    a separate process, speaks in two rooms: their members on both workers see it in
    the chat's own JSON, others do not."""
    import subprocess
    import tempfile

    bus = f"ipc://{tempfile.mkdtemp(prefix='eja-')}/bus"
    chat = subprocess.Popen(
        [sys.executable, "examples/chat/app.py", "--host", HOST, "--port", str(free_port),
         "--workers", "2", "--bus", bus],
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip

    async def main() -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, free_port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline and chat.poll() is None, "the chat did not start"
                await asyncio.sleep(0.1)
        members: dict[str, list[ClientConnection]] = {"lobby": [], "ops": [], "quiet": []}
        for room, count in (("lobby", 4), ("ops", 4), ("quiet", 2)):
            for index in range(count):
                ws = await ws_connect(free_port, f"/?name={room}{index}")
                if room != "lobby":
                    await ws.send(f"/join {room}")
                    while True:  # presence notices of the others may come in between
                        seen = await recv_json(ws, 5)
                        if seen == {"type": "joined", "room": room}:
                            break
                members[room].append(ws)
        await asyncio.sleep(1.0)  # presence notices settle, subscriptions reach the broker
        for group in members.values():
            for ws in group:
                while True:  # drop the presence notices of the others joining
                    try:
                        await asyncio.wait_for(ws.recv(), 0.2)
                    except TimeoutError:
                        break
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "examples/announce.py", "--bus", bus, "--room", "lobby",
             "--room", "ops", "Maintenance at 18:00"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        for room in ("lobby", "ops"):
            for ws in members[room]:
                assert await recv_json(ws, 5) == message(room, "announcer", "Maintenance at 18:00")
        for ws in members["quiet"]:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)
        for group in members.values():
            for ws in group:
                await ws.close()

    try:
        asyncio.run(main())
    finally:
        chat.send_signal(signal.SIGTERM)
        try:
            chat.wait(15)
        finally:
            chat.kill()
    unreachable = subprocess.run(
        [sys.executable, "examples/announce.py", "--bus", f"ipc://{tmp_path}/none",
         "--room", "lobby", "x"],
        cwd=repo_root, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert unreachable.returncode == 3, unreachable.stderr
    assert "Traceback" not in unreachable.stderr
