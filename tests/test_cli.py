"""The ``enjent`` command line (supervisor/cli.py, installed as a console script)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
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
