"""The chat example in a real browser: two headless Chromium tabs on two workers.

``enjent run examples.chat.app:server --workers 2`` serves the page at ``/``;
Chromium (Debian's ``chromium``, installed with apt-get when missing; the
test is skipped only when that fails) is driven over the DevTools protocol
with the ``websockets`` client. Tabs are opened until the server's
``/healthz`` shows one on each worker; both join a room and each one reads
what the other typed, which crosses the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aptinstall import require_program
from clusterutil import Cluster, healthz, wait_for
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    # every tab is a background tab but one: keep them all running at full speed
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
#: Tabs opened at most to get one on each worker (each lands on either at random).
MAX_TABS = 16


class DevTools:
    """A minimal Chrome DevTools Protocol client: commands over one WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            future = self.waiting.pop(message.get("id", 0), None)
            if future is not None and not future.done():
                future.set_result(message)  # events (no id) are not needed here

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[command_id] = future
        await self.ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 15)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


@contextlib.asynccontextmanager
async def devtools(url: str) -> AsyncIterator[DevTools]:
    async with connect(url, max_size=None, proxy=None, ping_interval=None) as ws:
        client = DevTools(ws)
        try:
            yield client
        finally:
            await client.close()


class Tab:
    """One chat page: a Chromium tab whose user types ``name`` into the page."""

    def __init__(self, browser: DevTools, port: int, target_id: str, name: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.name = name
        self.url = f"ws://127.0.0.1:{port}/devtools/page/{target_id}"
        self.stack = contextlib.AsyncExitStack()
        self.page: DevTools | None = None

    async def open(self, chat_url: str) -> Tab:
        self.page = await self.stack.enter_async_context(devtools(self.url))
        await self.page.call("Page.enable")
        # a modal dialog (prompt, alert) would block a headless tab: there must be none
        await self.page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source="window.__dialogs = 0; window.prompt = window.alert = window.confirm = "
            "() => { window.__dialogs += 1; return null; };",
        )
        await self.page.call("Page.navigate", url=chat_url)
        deadline = time.monotonic() + 10
        # the whole page, its script included: the name field alone may be parsed before
        # the script that handles the form (a submit then reloads the page instead)
        ready = "document.readyState === 'complete' && !!document.getElementById('name')"
        while not await self.page.evaluate(ready):
            assert time.monotonic() < deadline, "the chat page did not load, or has no name field"
            await asyncio.sleep(0.05)
        # the name is typed into the page, then the join form submitted
        await self.page.evaluate(
            f"document.getElementById('name').value = {json.dumps(self.name)};"
            "document.getElementById('enter').click();"
        )
        await self.wait_for_line(f"welcome, {self.name}")
        assert await self.page.evaluate("window.__dialogs") == 0
        return self

    async def log(self) -> list[str]:
        assert self.page is not None
        lines: list[str] = await self.page.evaluate(
            "Array.from(document.querySelectorAll('#log li'), (li) => li.textContent)"
        )
        return lines

    async def room(self) -> str:
        assert self.page is not None
        room: str = await self.page.evaluate("document.getElementById('room').textContent")
        return room

    async def wait_for_line(self, line: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while line not in await self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never showed {line!r}: {await self.log()}")
            await asyncio.sleep(0.05)

    async def type(self, text: str) -> None:
        """Type into the text box (as keyboard input) and press the Send button."""
        assert self.page is not None
        await self.page.call("Page.bringToFront")
        await self.page.evaluate("document.getElementById('text').focus()")
        await self.page.call("Input.insertText", text=text)
        typed = await self.page.evaluate("document.getElementById('text').value")
        assert typed == text
        await self.page.evaluate("document.getElementById('send').click()")

    async def close(self) -> None:
        await self.stack.aclose()
        await self.browser.call("Target.closeTarget", targetId=self.target_id)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[int]:
    """A headless Chromium; yields its DevTools port."""
    program = require_program("chromium", "chromium", timeout=420)
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [program, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "chromium.log", "wb"),  # noqa: SIM115 - closed by the child's exit
        start_new_session=True,
    )
    seen: set[int] = set()
    try:

        def devtools_port() -> int | None:
            if process.poll() is not None:
                log = (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited {process.returncode}:\n{log}")
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.update(child.pid for child in psutil.Process(process.pid).children(True))
            active = profile / "DevToolsActivePort"  # "PORT\n/devtools/browser/ID"
            lines = active.read_text().split() if active.exists() else []
            return int(lines[0]) if len(lines) == 2 else None

        yield wait_for(devtools_port, 30)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update(child.pid for child in psutil.Process(process.pid).children(True))
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in seen:  # a helper that left the process group
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


@pytest.fixture
def chat_cluster() -> Iterator[Cluster]:
    with Cluster(2, app="examples.chat.app:server") as cluster:
        cluster.wait_ready(timeout=30)
        yield cluster


def clients_per_worker(port: int, total: int) -> dict[int, int]:
    """Once ``total`` clients are connected (directory is current): shard -> clients."""

    def current() -> dict[int, int] | None:
        data = healthz(port)
        if data["clients"] != total:
            return None
        return {worker["shard"]: worker["clients"] for worker in data["workers"]}

    counts: dict[int, int] = wait_for(current, 10)
    return counts


@pytest.mark.timeout(600)  # the first run may install Chromium (about a minute)
def test_two_tabs_on_two_workers_chat_in_a_room(chromium: int, chat_cluster: Cluster) -> None:
    port = chat_cluster.port
    chat_url = f"http://127.0.0.1:{port}/"

    async def main() -> None:
        version = json.loads(await asyncio.to_thread(http_get, chromium, "/json/version"))
        async with devtools(version["webSocketDebuggerUrl"]) as browser:

            async def new_tab(name: str) -> Tab:
                target = await browser.call("Target.createTarget", url="about:blank")
                return await Tab(browser, chromium, target["targetId"], name).open(chat_url)

            alice = await new_tab("alice")
            first = await asyncio.to_thread(clients_per_worker, port, 1)
            alice_shard = max(first, key=lambda shard: first[shard])
            for _ in range(MAX_TABS):
                bob = await new_tab("bob")
                counts = await asyncio.to_thread(clients_per_worker, port, 2)
                if counts.get(alice_shard) == 1 and sum(counts.values()) == 2:
                    break  # one tab on each worker
                await bob.close()
                await asyncio.to_thread(clients_per_worker, port, 1)
            else:
                raise AssertionError(f"{MAX_TABS} tabs all landed on worker {alice_shard}")

            for tab in (alice, bob):
                await tab.type("/join games")
                await tab.wait_for_line("you are in games")
                assert await tab.room() == "games"
            await alice.wait_for_line("bob joined games")

            await alice.type("hello from alice")
            await bob.wait_for_line("alice:hello from alice")
            await alice.wait_for_line("alice:hello from alice")  # the sender sees it too
            await bob.type("hi from bob")
            await alice.wait_for_line("bob:hi from bob")

            await bob.close()
            await alice.wait_for_line("bob left games")
            await alice.close()

    asyncio.run(asyncio.wait_for(main(), 90))


def http_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: str = response.read().decode()
        return body
