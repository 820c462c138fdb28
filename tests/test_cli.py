"""The ``enjent`` command line (supervisor/cli.py, installed as a console script)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from clusterutil import REPO_ROOT, Cluster, free_port, healthz
from enjent_supervisor import cli

pytestmark = pytest.mark.timeout(60)

#: The console script installed with the interpreter that runs the tests (never
#: one found on PATH: the README's commands run without an activated venv).
SCRIPT = Path(sysconfig.get_path("scripts")) / "enjent"
ENJENT = str(SCRIPT) if SCRIPT.is_file() and os.access(SCRIPT, os.X_OK) else None


def enjent(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    command = [ENJENT] if ENJENT else [sys.executable, "-m", "enjent_supervisor"]
    return subprocess.run(
        [*command, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_console_script_is_installed() -> None:
    assert ENJENT is not None, f"the `enjent` console script is not installed at {SCRIPT}"
    done = subprocess.run([ENJENT, "--version"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and done.stdout.startswith("enjent ")


def test_help() -> None:
    result = enjent("--help")
    assert result.returncode == 0
    assert "usage: enjent" in result.stdout
    assert "run" in result.stdout


def test_run_help_lists_every_option_and_its_environment_variable() -> None:
    result = enjent("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in ("--host", "--port", "--workers", "--log-level", "--app-dir", "MODULE:ATTR"):
        assert option in text
    for variable in ("ENJENT_APP", "ENJENT_HOST", "ENJENT_PORT", "ENJENT_WORKERS"):
        assert variable in text


def test_module_entry_point_matches() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enjent_supervisor", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0 and "usage: enjent" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    assert enjent().returncode == 2


@pytest.mark.parametrize("spec", ["tests.cluster_app", "tests.cluster_app:", ":server", "a b"])
def test_bad_module_attr_is_a_usage_error(spec: str) -> None:
    result = enjent("run", spec, "--workers", "2", "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    assert "usage: enjent" in result.stderr
    assert "MODULE:ATTR" in result.stderr


def test_missing_app_is_a_usage_error() -> None:
    env = {key: value for key, value in os.environ.items() if key != "ENJENT_APP"}
    result = subprocess.run(
        [sys.executable, "-m", "enjent_supervisor", "run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert "MODULE:ATTR" in result.stderr


@pytest.mark.parametrize("option", [("--workers", "0"), ("--port", "70000"), ("--port", "x")])
def test_bad_option_is_a_usage_error(option: tuple[str, str]) -> None:
    result = enjent("run", "tests.cluster_app:server", *option)
    assert result.returncode == 2, result.stderr


def test_bad_integer_in_environment_is_a_usage_error() -> None:
    result = enjent("run", "tests.cluster_app:server", env={"ENJENT_PORT": "lots"})
    assert result.returncode == 2, result.stderr
    assert "ENJENT_PORT" in result.stderr


def test_missing_attribute_is_an_app_load_error() -> None:
    result = enjent("run", "tests.cluster_app:nothing_here", "--workers", "2")
    assert result.returncode == 4, result.stderr
    assert "tests.cluster_app:nothing_here" in result.stderr


def test_value_error_while_importing_the_app_is_an_app_load_error(tmp_path: Path) -> None:
    """Regression: a ValueError raised by the app's import was reported as a usage error (2)."""
    (tmp_path / "broken_app.py").write_text("raise ValueError('bad configuration')\n")
    result = enjent(
        "run", "broken_app:server", "--app-dir", str(tmp_path), "--port", str(free_port())
    )
    assert result.returncode == 4, result.stderr
    assert "bad configuration" in result.stderr


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENJENT_PORT", "12345")
    monkeypatch.setenv("ENJENT_HOST", "127.0.0.2")
    monkeypatch.setenv("ENJENT_WORKERS", "3")
    monkeypatch.setenv("ENJENT_APP", "tests.cluster_app:server")
    monkeypatch.setenv("ENJENT_LOG_LEVEL", "WARNING")
    values = cli.resolve_settings(cli.build_parser().parse_args(["run"]))
    assert (values["host"], values["port"], values["workers"], values["log_level"]) == (
        "127.0.0.2",
        12345,
        3,
        "WARNING",
    )
    # the command line wins
    args = cli.build_parser().parse_args(["run", "x:y", "--port", "1", "--workers", "2"])
    values = cli.resolve_settings(args)
    assert (args.app, values["port"], values["workers"]) == ("x:y", 1, 2)


def test_workers_default_to_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENJENT_WORKERS", raising=False)
    args = cli.build_parser().parse_args(["run", "x:y"])
    assert cli.resolve_settings(args)["workers"] == (os.cpu_count() or 1)


def test_enjent_port_environment_variable_is_honoured() -> None:
    """``ENJENT_PORT`` (and ``ENJENT_APP``, ``ENJENT_WORKERS``) drive a real run."""
    port = free_port()
    env = {
        "ENJENT_PORT": str(port),
        "ENJENT_APP": "tests.cluster_app:server",
        "ENJENT_WORKERS": "2",
        "ENJENT_HEALTH_DETAIL": "1",
    }
    assert ENJENT is not None, f"the `enjent` console script is not installed at {SCRIPT}"
    command = [ENJENT, "run"]
    with Cluster(workers=2, port=port, command=command, env=env) as cluster:
        cluster.wait_ready()
        assert len(healthz(port)["workers"]) == 2
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(10) == 0


def test_missing_certificate_is_a_usage_error(tmp_path: Path) -> None:
    done = enjent("run", "tests.cluster_app:server", "--ssl-keyfile", str(tmp_path / "k.pem"))
    assert done.returncode == 2
    assert "--ssl-keyfile needs --ssl-certfile" in done.stderr
    done = enjent("run", "tests.cluster_app:server", "--ssl-certfile", str(tmp_path / "nope.pem"))
    assert done.returncode == 2
    assert f"the TLS certificate file {tmp_path / 'nope.pem'} does not exist" in done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_native_tls_from_the_command_line(tmp_path: Path) -> None:
    """``--ssl-certfile/--ssl-keyfile``: wss:// served by every worker."""
    import asyncio
    import ssl
    import time

    from websockets.asyncio.client import connect

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    port = free_port()
    args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    async def echo_once() -> str:
        async with connect(f"wss://127.0.0.1:{port}/", ssl=context, open_timeout=2) as ws:
            await ws.send("over tls")
            return str(await asyncio.wait_for(ws.recv(), 5))

    with Cluster(workers=2, port=port, args=args) as cluster:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert asyncio.run(echo_once()) == "over tls"
                break
            except (OSError, TimeoutError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no wss:// echo:\n{cluster.log()}") from None
                time.sleep(0.2)
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(10) == 0


# ------------------------------------------------ what a newcomer runs into


def test_python_m_enjent_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "enjent", "--help"],
        capture_output=True, text=True, timeout=20, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: enjent" in done.stdout and "Exit codes" in " ".join(done.stdout.split())


@pytest.mark.parametrize("how", ["environment", "option"])
def test_bad_log_level_is_a_clean_usage_error(how: str) -> None:
    if how == "environment":
        done = enjent("run", "tests.cluster_app:server", env={"ENJENT_LOG_LEVEL": "verbose"})
    else:
        done = enjent("run", "tests.cluster_app:server", "--log-level", "verbose")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert ("ENJENT_LOG_LEVEL" if how == "environment" else "--log-level") in done.stderr
    assert "verbose" in done.stderr


def test_app_that_serves_while_imported_is_named_in_one_line(tmp_path: Path) -> None:
    """The README's old snippet shape: server.run() at module level."""
    port = free_port()
    (tmp_path / "servesnow.py").write_text(
        "from enjent import WebSocketServer\n"
        "server = WebSocketServer()\n"
        f"server.run('127.0.0.1', {port})\n"
    )
    done = enjent(
        "run", "servesnow:server", "--app-dir", str(tmp_path), "--port", str(port),
        "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and 'if __name__ == "__main__":' in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "address already in use" not in done.stderr


def test_app_that_fails_to_load_shows_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "dbapp.py").write_text(
        "from enjent import WebSocketServer\n"
        "\n"
        "def connect():\n"
        "    raise RuntimeError('db down')\n"
        "\n"
        "connect()\n"
        "server = WebSocketServer()\n"
    )
    done = enjent("run", "dbapp:server", "--app-dir", str(tmp_path), "--port", str(free_port()))
    assert done.returncode == 4, done.stderr
    assert "RuntimeError: db down" in done.stderr
    assert f'File "{tmp_path / "dbapp.py"}", line 4, in connect' in done.stderr
    assert "importlib" not in done.stderr  # the import machinery's frames are left out


def test_command_line_overrides_the_apps_options(tmp_path: Path) -> None:
    """--health-path, --metrics-path, --max-message-size (and ENJENT_*) over the app's values."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    port = free_port()
    command = [
        *([ENJENT] if ENJENT else [sys.executable, "-m", "enjent_supervisor"]),
        "run", "tests.cluster_app:server", "--port", str(port), "--workers", "1",
        "--health-path", "/alive", "--metrics-path", "none", "--max-message-size", "1000",
    ]  # fmt: skip
    env = {**os.environ, "ENJENT_MAX_MESSAGE_SIZE": "5", "ENJENT_PING_INTERVAL": "0"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    async def check() -> tuple[int | None, str]:
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=2) as ws:
            await ws.send("x" * 999)  # under --max-message-size, over ENJENT_'s 5
            echoed = await asyncio.wait_for(ws.recv(), 5)
            await ws.send("x" * 1001)
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code is not None
            return ws.close_code, str(echoed)

    try:
        wait_for_http(port, "/alive")
        assert http_status(port, "/healthz") == 426  # no longer the health path
        assert http_status(port, "/metrics") == 426  # turned off
        code, echoed = asyncio.run(check())
        assert code == 1009 and len(echoed) == 999
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    assert process.returncode == 0, output


def test_bad_override_is_a_usage_error() -> None:
    done = enjent("run", "tests.cluster_app:server", "--ping-timeout", "0", "--workers", "1")
    assert done.returncode == 2 and "ping_timeout" in done.stderr, done.stderr
    done = enjent("run", "tests.cluster_app:server", env={"ENJENT_TRUSTED_PROXIES": "nonsense"})
    assert done.returncode == 2 and "trusted_proxies" in done.stderr, done.stderr
    done = enjent("run", "tests.cluster_app:server", "--health-path", "alive")
    assert done.returncode == 2 and "--health-path" in done.stderr, done.stderr


def test_runtime_dir_holds_the_bus_sockets(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    with Cluster(workers=2, args=["--runtime-dir", str(runtime)]) as cluster:
        cluster.wait_ready()
        made = list(runtime.glob("enjent-*"))
        assert len(made) == 1 and (made[0] / "bus-in").exists(), cluster.log()
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(10) == 0
    assert not list(runtime.glob("enjent-*"))  # removed at the end


def test_access_log_has_one_line_per_handshake(tmp_path: Path) -> None:
    import asyncio

    from websockets.asyncio.client import connect

    port = free_port()
    with Cluster(workers=2, port=port, args=["--access-log"]) as cluster:
        cluster.wait_ready()

        async def visit() -> None:
            async with connect(f"ws://127.0.0.1:{port}/room?x=1", open_timeout=2) as ws:
                await ws.send("whoami")
                await asyncio.wait_for(ws.recv(), 5)

        asyncio.run(visit())
        assert http_status(port, "/nothing-here") == 426
        time.sleep(0.3)
        log = cluster.log()
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(10) == 0
    accepted = [line for line in log.splitlines() if '"GET /room?x=1 HTTP/1.1" 101' in line]
    refused = [line for line in log.splitlines() if '"GET /nothing-here HTTP/1.1" 426' in line]
    assert len(accepted) == 1 and "enjent.access" in accepted[0], log
    assert "127.0.0.1:" in accepted[0] and re.search(r"worker=[01]$", accepted[0])
    assert len(refused) == 1 and "WebSocket endpoint" in refused[0], log


def http_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wait_for_http(port: int, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_status(port, path) == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered 200 at {path} on port {port}")
        time.sleep(0.05)


def test_run_usage_errors_print_the_usage_of_run() -> None:
    result = enjent("run", "tests.cluster_app:server", "--no-such-option")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: enjent run "), result.stderr
    assert "unrecognized arguments: --no-such-option" in result.stderr


def test_python_myapp_with_the_port_taken_exits_3_in_one_line(tmp_path: Path) -> None:
    """``python myapp.py`` (one process, ``server.run()``) fails as ``enjent run`` does:
    one error line naming the address, exit code 3, no traceback."""
    import socket

    app = tmp_path / "myapp.py"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app.write_text(
            "from enjent import WebSocketServer\n"
            "server = WebSocketServer()\n"
            "if __name__ == '__main__':\n"
            f"    server.run('127.0.0.1', {port})\n"
        )
        result = subprocess.run(
            [sys.executable, str(app)], capture_output=True, text=True, timeout=20, cwd=tmp_path
        )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], result.stderr
