"""Autobahn|Testsuite conformance of ``examples/echo.py`` (RFC 6455 end to end).

Runs ``shared/tools/autobahn.sh`` (beside the repository: CI clones the repo
with ``shared/`` next to it; ``ENJENT_AUTOBAHN`` overrides the path) against
the echo example started as a subprocess. The quick run (~11 s) is part of
the default suite; the full one is marked ``slow``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.autobahn

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(
    os.environ.get("ENJENT_AUTOBAHN")
    or Path(__file__).resolve().parents[2] / "shared/tools/autobahn.sh"
)
SERVER_START_TIMEOUT = 15.0
SUMMARY = re.compile(r"^autobahn: (\d+) cases, (\d+) failed$")


def python27_available() -> bool:
    """Whether autobahn.sh can run wstest: its venv exists, or a Python 2.7 to build it."""
    venv = Path(os.environ.get("AB_VENV", "/tmp/ab27"))
    if os.access(venv / "bin" / "wstest", os.X_OK):
        return True
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [
        os.environ.get("AB_PY27", ""),
        *sorted(glob.glob(f"{pyenv_root}/versions/2.7*/bin/python")),
        shutil.which("python2.7") or "",
    ]
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (2, 7)"],
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:  # a pyenv shim without the version installed fails here
            return True
    return False


def skip_reason() -> str | None:
    if not SCRIPT.is_file():
        return f"the Autobahn script is missing at {SCRIPT} (set ENJENT_AUTOBAHN)"
    if not python27_available():
        return "Python 2.7 is missing: the Autobahn|Testsuite (wstest) needs it"
    return None


@pytest.fixture(scope="module")
def autobahn_script() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return SCRIPT


def wait_for_port(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"echo server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"echo server not listening on port {port} after {timeout} s")


@pytest.fixture
def echo_server(free_port: int, tmp_path: Path) -> Iterator[str]:
    """``examples/echo.py`` on 127.0.0.1; yields its URL; always killed afterwards."""
    log_path = tmp_path / "echo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "examples/echo.py",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port),
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(process, free_port, SERVER_START_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{log_path.read_text(errors='replace')}")
        yield f"ws://127.0.0.1:{free_port}"
        assert process.poll() is None, "the echo server died during the run:\n" + (
            log_path.read_text(errors="replace")
        )
    finally:
        process.kill()
        process.wait(timeout=10)


def run_autobahn(script: Path, url: str, outdir: Path, *options: str, timeout: int) -> None:
    command = [str(script), *options, "--timeout", str(timeout), "--outdir", str(outdir), url]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout + 60, cwd=REPO_ROOT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"autobahn.sh exited with {done.returncode}:\n{output}"
    lines = done.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1]) if lines else None
    assert match, f"no summary line in the output of autobahn.sh:\n{output}"
    assert int(match.group(1)) > 0, output
    assert match.group(2) == "0", output


@pytest.mark.timeout(400)
def test_autobahn_quick(autobahn_script: Path, echo_server: str, tmp_path: Path) -> None:
    """Every case but 9.* (limits) and 12.*/13.* (permessage-deflate): ~11 s."""
    run_autobahn(autobahn_script, echo_server, tmp_path / "reports", "--quick", timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_autobahn_full(autobahn_script: Path, echo_server: str, tmp_path: Path) -> None:
    """All 517 cases, permessage-deflate (12.*, 13.*) included: ~8 min on a quiet machine."""
    run_autobahn(autobahn_script, echo_server, tmp_path / "reports", timeout=1800)
