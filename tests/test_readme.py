"""The README, followed to the letter.

- Its two commands, in a fresh virtual environment in a clean clone of the
  repository's committed ``HEAD`` (uncommitted work is not in the clone): the
  first one until the chat page answers at ``/``, then stopped; the second
  one's install, then a small subset of the tests instead of the whole suite.
  It installs from PyPI and took 34 to 57 s here (more on a loaded machine or
  a slow network), so it is marked ``slow``: CI runs it in its ``-m slow`` step.
- Its Python snippets, run against the working tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

INSTALL_AND_CHAT = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && "
    ".venv/bin/python examples/chat/app.py --port 8000"
)
INSTALL_AND_TEST = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest"
)
#: The subset of the suite run by the fresh environment (the whole suite runs anyway).
TEST_SUBSET = "-k 'test_frames or test_mask or test_cli'"


def code_blocks(markdown: str) -> Iterator[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block, under its nearest heading."""
    heading = ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", markdown, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("#").strip()
        else:
            yield heading, match.group(2), match.group(3)


def snippet(markdown: str, heading: str, language: str = "python") -> str:
    for block_heading, block_language, code in code_blocks(markdown):
        if block_heading == heading and block_language == language:
            return code
    raise AssertionError(f"no {language} block under {heading!r} in the README")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL to whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


# ----------------------------------------------------------- the text


def test_readme_has_the_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text()
    commands = [code.strip() for _, language, code in code_blocks(text) if language == "sh"]
    assert INSTALL_AND_CHAT in commands
    assert INSTALL_AND_TEST in commands
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert INSTALL_AND_TEST in ci.splitlines()


def test_readme_links_point_at_files() -> None:
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target or target == "RELIABILITY.md":  # written separately
            continue
        assert (REPO_ROOT / target).exists(), f"README links to a missing {target}"


# ---------------------------------------------------------- snippets


def test_first_server_snippet_runs(tmp_path: Path) -> None:
    """The "A first server" snippet: welcome, echo, and a graceful stop on SIGTERM (exit 0)."""
    code = snippet(README.read_text(), "A first server")
    assert 'server.run("127.0.0.1", 13003)' in code
    assert 'if __name__ == "__main__":' in code  # `enjent run myapp:server` imports it
    port = free_port()
    (tmp_path / "myapp.py").write_text(code.replace("13003", str(port)))
    process = subprocess.Popen(
        [sys.executable, "myapp.py"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        async def talk() -> None:
            deadline = time.monotonic() + 10
            while True:
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}/chat?x=1", open_timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    await asyncio.sleep(0.05)
            async with ws:
                welcome = await asyncio.wait_for(ws.recv(), 5)
                assert isinstance(welcome, str) and welcome.startswith("welcome 0-")
                await ws.send("hello")
                assert await asyncio.wait_for(ws.recv(), 5) == "hello"
                # systemd's reload: logged and ignored by one process, never fatal
                process.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.3)
                assert process.poll() is None, "SIGHUP killed the server"
                await ws.send(b"\x00\x01")
                assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01"

        asyncio.run(asyncio.wait_for(talk(), 20))
        time.sleep(0.2)  # let the disconnect handler print
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            stop_group(process)
    text = output.decode()
    assert process.returncode == 0, text
    assert "connected 0-" in text and "/chat 127.0.0.1" in text
    assert "gone 0-" in text
    # one INFO line says where it listens (logging set up since the app did not)
    assert f"serving on ws://127.0.0.1:{port} (1 worker" in text
    assert "SIGHUP ignored" in text


def test_first_server_snippet_under_enjent_run(tmp_path: Path) -> None:
    """The same myapp.py as `enjent run myapp:server --workers 2`: two workers, SIGTERM exits 0."""
    from clusterutil import Cluster

    code = snippet(README.read_text(), "A first server")
    (tmp_path / "myapp.py").write_text(code)
    port = free_port()
    command = [
        *(sys.executable, "-m", "enjent", "run", "myapp:server"),
        *("--app-dir", str(tmp_path), "--port", str(port), "--workers", "2", "--health-detail"),
    ]
    with Cluster(workers=2, port=port, command=command) as cluster:
        health = cluster.wait_ready()
        assert len(health["workers"]) == 2
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(15) == 0, cluster.log()
    assert "address already in use" not in cluster.log()


def test_api_page_snippet_works() -> None:
    """The "API in a page" snippet: page, refusal, rooms, union, client_count, async handler."""
    namespace: dict[str, Any] = {}
    exec(compile(snippet(README.read_text(), "The API in a page"), "README.md", "exec"), namespace)
    server = namespace["server"]
    auth = {"Authorization": "Bearer s3cret", "Origin": "https://chat.example.com"}

    async def main() -> None:
        await server.start("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}/ws"
        try:
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/")
            assert (status, body) == (200, "<p>hello</p>")
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers={"Origin": auth["Origin"]})
            assert refused.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers={**auth, "Origin": "https://evil.test"})
            assert refused.value.response.status_code == 403
            async with (
                connect(url + "?name=ada", additional_headers=auth) as ada,
                connect(url + "?name=bob", additional_headers=auth) as bob,
            ):
                assert await asyncio.wait_for(ada.recv(), 5) == "bob is here"
                assert [client.data for client in server.local_clients] == [{"plan": "free"}] * 2
                await ada.send("/who")
                assert await asyncio.wait_for(ada.recv(), 5) == "2 online"
                await bob.send("hi")
                for ws in (ada, bob):
                    assert await asyncio.wait_for(ws.recv(), 5) == "bob: hi"
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


# ------------------------------------------- the commands, clean clone


@pytest.fixture
def clean_clone(tmp_path: Path) -> Path:
    git = shutil.which("git")
    if git is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    clone = tmp_path / "enjent"
    subprocess.run(
        [git, "clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(clone)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return clone


def fresh_environment() -> dict[str, str]:
    """This environment less what would leak the test's own Python into the clone's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
        and not name.startswith(("PYTEST_", "COV_"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_commands_on_a_clean_clone(clean_clone: Path) -> None:
    readme = (clean_clone / "README.md").read_text()
    commands = [code.strip() for _, language, code in code_blocks(readme) if language == "sh"]
    assert INSTALL_AND_CHAT in commands, "the committed README lost its first command"
    assert INSTALL_AND_TEST in commands, "the committed README lost its second command"
    env = fresh_environment()
    log_path = clean_clone.parent / "commands.log"

    # 1. install and start the chat example, until its page answers
    command, port = INSTALL_AND_CHAT, 8000
    if not port_is_free(port):  # something else has the README's port here
        port = free_port()
        command = command.replace("--port 8000", f"--port {port}")
    with open(log_path, "wb") as log:
        chat = subprocess.Popen(
            ["bash", "-c", command],
            cwd=clean_clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        page = ""
        while time.monotonic() < deadline and chat.poll() is None:
            with contextlib.suppress(OSError):
                status, page = http_get(f"http://127.0.0.1:{port}/")
                if status == 200:
                    break
            time.sleep(0.5)
        assert chat.poll() is None, f"the first command exited:\n{log_path.read_text()[-3000:]}"
        assert "<title>Enjent chat</title>" in page, log_path.read_text()[-3000:]
    finally:
        stop_group(chat)
    assert chat.returncode == 0, f"the chat did not stop cleanly:\n{log_path.read_text()[-3000:]}"

    # 2. the test command: its install as written, then a subset of the tests
    install, _, run_tests = INSTALL_AND_TEST.rpartition(" && ")
    result = subprocess.run(
        ["bash", "-c", f"{install} && {run_tests} -q -p no:cacheprovider {TEST_SUBSET}"],
        cwd=clean_clone,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert re.search(r"\d+ passed", output), output[-3000:]
