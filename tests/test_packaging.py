"""What users install: the wheel built from the repository, not the editable tree.

The wheel is built with pip (build isolation, as ``pip install /path`` and
``python -m build`` do), checked against the packages on disk, installed
into a fresh virtual environment (not editable), and then used from a
folder that is not the repository: ``enjent --version``, the imports, and
``enjent run`` of the echo example on two workers, which must echo. The
install fetches the dependencies from the package index (or pip's cache):
about 20-60 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from test_readme import free_port, stop_group
from websockets.asyncio.client import connect

REPO_ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    """Every package folder of the repository, under the name it is installed as."""
    names = set()
    for top, installed in (("enjent", "enjent"), ("supervisor", "enjent_supervisor")):
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / top)
            parts = [installed, *relative.parts]
            names.add(".".join(parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    # a copy without the developer's build outputs, as a clean clone has it
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "docs"
    )
    for name in ("enjent", "supervisor", "pyproject.toml", "setup.py", "README.md", "LICENSE"):
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("enjent-*.whl")
    return built


def test_the_wheel_carries_every_package_and_its_typing_marker(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    packaged = {
        name[: -len("/__init__.py")].replace("/", ".")
        for name in files
        if name.endswith("/__init__.py")
    }
    assert _packages_on_disk() <= packaged, sorted(_packages_on_disk() - packaged)
    assert {"enjent.server", "enjent.cluster", "enjent_supervisor"} <= packaged
    assert "enjent/py.typed" in files and "enjent_supervisor/py.typed" in files
    assert "enjent/_speedups.c" in files  # the sdist-less rebuild of the helper
    assert not any(name.startswith(("tests/", "examples/", "loadtest/")) for name in files)


def test_the_installed_wheel_runs_the_echo_example(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, enjent = venv / "bin" / "python", venv / "bin" / "enjent"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # a folder that is not the repository: nothing of the tree can be imported
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy2(REPO_ROOT / "examples" / "echo.py", app_dir / "echo.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENJENT_", "PYTHON"))}
    version = subprocess.run(
        [str(enjent), "--version"], capture_output=True, text=True, cwd=app_dir, env=env, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("enjent ")
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import enjent, enjent.server, enjent.cluster, enjent.cluster.natsbus, "
            "enjent_supervisor.arbiter; print(enjent.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=app_dir,
        env=env,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout and str(REPO_ROOT) not in where.stdout
    port = free_port()
    server = subprocess.Popen(
        [str(enjent), "run", "echo:build_server", "--port", str(port), "--workers", "2"],
        cwd=app_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        async def echo() -> str:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with connect(f"ws://127.0.0.1:{port}/", open_timeout=2) as ws:
                        await ws.send("from the wheel")
                        return str(await asyncio.wait_for(ws.recv(), 5))
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    await asyncio.sleep(0.2)

        assert asyncio.run(echo()) == "from the wheel"
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        stop_group(server)
        if server.stderr is not None:
            server.stderr.close()
