"""Find a system program the deployment and browser tests need, installing it if missing.

Debian's package (``apt-get install -y PACKAGE``) is installed only when the
program is not found, only as root, and every apt command is bounded in time.
When it cannot be had, the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"]
)


def find_program(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _apt(args: list[str], timeout: float) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(
            ["apt-get", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"apt-get {' '.join(args)} took more than {timeout:.0f} s"
    except OSError as exc:
        return False, f"apt-get: {exc}"
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return result.returncode == 0, " / ".join(tail)


def require_program(name: str, package: str, *, timeout: float = 300.0) -> str:
    """The path of ``name``; installs ``package`` first if needed, or skips the test."""
    path = find_program(name)
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"{name} is not installed and installing {package} needs root")
    if not Path("/usr/bin/apt-get").exists():
        pytest.skip(f"{name} is not installed and there is no apt-get to install {package}")
    ok, output = _apt(["install", "-y", "-q", "--no-install-recommends", package], timeout)
    if not ok:  # maybe the package lists are missing or stale
        updated, update_output = _apt(["update", "-q"], 120.0)
        if updated:
            ok, output = _apt(["install", "-y", "-q", "--no-install-recommends", package], timeout)
        else:
            output = update_output
    path = find_program(name)
    if not ok or path is None:
        pytest.skip(f"{name} is not installed and `apt-get install {package}` failed: {output}")
    return path
