"""The deployment of ``deploy/``, for real: wss:// through nginx to a 2-worker cluster.

nginx runs ``deploy/nginx/enjent.conf`` itself, with only its ports,
certificate and log paths swapped for temporary ones (a self-signed
certificate made with the ``openssl`` command), in front of
``enjent run tests.deploy_app:server --workers 2``. nginx is installed with
apt-get when missing; the test is skipped only when that fails. The same
file also checks native TLS (``start(..., ssl=)`` and ``run(..., ssl=)``)
and the systemd unit of ``deploy/systemd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aptinstall import find_program, require_program
from clusterutil import Cluster, free_port, wait_for
from websockets.asyncio.client import ClientConnection, connect

from enjent import WebSocketClient, WebSocketServer

REPO_ROOT = Path(__file__).resolve().parents[1]
NGINX_SITE = REPO_ROOT / "deploy" / "nginx" / "enjent.conf"
SYSTEMD_UNIT = REPO_ROOT / "deploy" / "systemd" / "enjent.service"
DEPLOY_APP = Path(__file__).with_name("deploy_app.py")


def run_async(main: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


# ------------------------------------------------------------------ TLS


@dataclass
class Certificate:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this certificate (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.cert))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certificate(directory: Path) -> Certificate:
    """A self-signed certificate for ``localhost`` and 127.0.0.1, by the openssl CLI."""
    openssl = find_program("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    return Certificate(cert, key)


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path)


def https_get(url: str, context: ssl.SSLContext | None) -> tuple[int, dict[str, str], bytes]:
    """GET without following redirects; returns status, headers and body."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(
        NoRedirect, urllib.request.HTTPSHandler(context=context), urllib.request.ProxyHandler({})
    )
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# ---------------------------------------------------------------- nginx


def nginx_config(
    tmp: Path, cert: Certificate, http_port: int, https_port: int, app_port: int
) -> Path:
    """``deploy/nginx/enjent.conf`` with its machine-specific parts made temporary.

    Each swap must find its text: if the documented file changes shape, this
    fails instead of quietly testing something else.
    """
    site = NGINX_SITE.read_text()
    swaps = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("server 127.0.0.1:13003;", f"server 127.0.0.1:{app_port};"),
        ("/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(cert.cert)),
        ("/etc/letsencrypt/live/chat.example.com/privkey.pem", str(cert.key)),
        ("/var/log/nginx/", f"{tmp}/"),
    ]
    for old, new in swaps:
        assert old in site, f"{NGINX_SITE} no longer contains {old!r}: update this test"
        site = site.replace(old, new)
    (tmp / "enjent.conf").write_text(site)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = f"""\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 1024; }}
http {{
{temp_paths}
    access_log {tmp}/access.log;
    include {tmp}/enjent.conf;
}}
"""
    config = tmp / "nginx.conf"
    config.write_text(main)
    return config


@dataclass
class Deployment:
    https_port: int
    http_port: int
    app_port: int
    cert: Certificate
    cluster: Cluster

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}/"


@pytest.fixture
def deployment(tmp_path: Path, certificate: Certificate) -> Iterator[Deployment]:
    """nginx (deploy/nginx/enjent.conf) in front of `enjent run ... --workers 2`."""
    nginx = require_program("nginx", "nginx", timeout=300)
    if os.geteuid() != 0:
        pytest.skip("nginx is run as root here, as on a server (it drops to nobody)")
    http_port, https_port = free_port(), free_port()
    while https_port == http_port:
        https_port = free_port()
    app_port = free_port()
    command = enjent_command("tests.deploy_app:server", port=app_port, workers=2)
    cluster = Cluster(2, port=app_port, command=command)
    config = nginx_config(tmp_path, certificate, http_port, https_port, cluster.port)
    base = [nginx, "-p", f"{tmp_path}/", "-e", f"{tmp_path}/error.log", "-c", str(config)]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
    proxy: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        cluster.wait_ready(timeout=30)
        with open(tmp_path / "nginx.out", "wb") as out:
            proxy = subprocess.Popen(
                base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deployment = Deployment(https_port, http_port, cluster.port, certificate, cluster)
        context = certificate.client_context()

        def answering() -> bool:
            assert proxy is not None
            if proxy.poll() is not None:
                raise AssertionError(f"nginx exited {proxy.returncode}: {nginx_log(tmp_path)}")
            return https_get(f"https://127.0.0.1:{https_port}/healthz", context)[0] == 200

        wait_for(answering, 15)
        yield deployment
    finally:
        if proxy is not None:
            stop_process_group(proxy, signal.SIGQUIT)  # nginx's graceful shutdown
        cluster.kill()


def nginx_log(tmp: Path) -> str:
    parts = []
    for name in ("nginx.out", "error.log"):
        with contextlib.suppress(OSError):
            parts.append((tmp / name).read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def stop_process_group(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def enjent_command(app: str, *, port: int, workers: int) -> list[str]:
    """``enjent run APP --workers N`` (the installed script, as systemd runs it)."""
    script = Path(sys.executable).with_name("enjent")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "enjent_supervisor"]
    options = [
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "INFO",
        "--health-detail",
    ]
    return [*head, "run", app, *options]


def ws_connect(url: str, context: ssl.SSLContext, **kwargs: Any) -> connect:
    return connect(
        url,
        ssl=context,
        open_timeout=5,
        close_timeout=2,
        ping_interval=None,
        proxy=None,
        **kwargs,
    )


async def request(ws: ClientConnection, text: str | bytes) -> str | bytes:
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), 5)


# ---------------------------------------------------------------- tests


def test_nginx_config_passes_nginx_t(deployment: Deployment) -> None:
    """The fixture ran ``nginx -t`` on the adapted file; plain HTTP redirects to https."""
    status, headers, _ = https_get(f"http://127.0.0.1:{deployment.http_port}/x?y=1", None)
    assert status == 301
    assert headers["Location"] == "https://127.0.0.1/x?y=1"


def test_wss_through_nginx_echo_health_and_cross_worker_broadcast(deployment: Deployment) -> None:
    context = deployment.cert.client_context()
    status, _, body = https_get(f"https://127.0.0.1:{deployment.https_port}/healthz", context)
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert sorted(worker["shard"] for worker in health["workers"]) == [0, 1]

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            clients: list[tuple[ClientConnection, str]] = []
            # the kernel picks a worker per connection: open until both have some
            for _ in range(40):
                ws = await stack.enter_async_context(ws_connect(deployment.url, context))
                client_id = await request(ws, "whoami")
                assert isinstance(client_id, str)
                clients.append((ws, client_id))
                shards = {cid.split("-", 1)[0] for _, cid in clients}
                if len(clients) >= 6 and shards == {"0", "1"}:
                    break
            assert {cid.split("-", 1)[0] for _, cid in clients} == {"0", "1"}, clients

            ws, _ = clients[0]
            assert await request(ws, "hello through nginx") == "hello through nginx"
            payload = bytes(range(256)) * 64  # binary, 16 KiB: several TLS records
            assert await request(ws, payload) == payload

            await ws.send("broadcast:to every worker")
            for other, client_id in clients:
                message = await asyncio.wait_for(other.recv(), 5)
                assert message == "to every worker", client_id

    run_async(main)


def test_remote_address_is_the_one_nginx_saw(deployment: Deployment) -> None:
    """X-Real-Ip / X-Forwarded-For from the trusted nginx become ``remote_address``."""
    context = deployment.cert.client_context()

    async def main() -> None:
        async with ws_connect(deployment.url, context) as ws:
            assert await request(ws, "addr") == "127.0.0.1"
        # nginx sees another loopback source: the app must report it, not nginx's
        async with ws_connect(deployment.url, context, local_addr=("127.0.0.2", 0)) as ws:
            assert await request(ws, "addr") == "127.0.0.2"
        # a client's own X-Forwarded-For is kept by nginx but not believed
        forged = {"X-Forwarded-For": "203.0.113.7", "X-Real-Ip": "203.0.113.8"}
        async with ws_connect(
            deployment.url, context, local_addr=("127.0.0.2", 0), additional_headers=forged
        ) as ws:
            assert await request(ws, "addr") == "127.0.0.2"

    run_async(main)


# ----------------------------------------------------------- native TLS


def test_native_tls_in_process(certificate: Certificate) -> None:
    """``start(..., ssl=context)``: wss:// without a proxy."""
    server = WebSocketServer()

    @server.on_message
    def echo(client: WebSocketClient, message: str | bytes) -> None:
        client.send(f"{client.remote_address} {message!s}")

    async def main() -> None:
        await server.start("127.0.0.1", 0, ssl=certificate.server_context())
        try:
            url = f"wss://127.0.0.1:{server.port}/"
            async with ws_connect(url, certificate.client_context()) as ws:
                assert await request(ws, "hi") == "127.0.0.1 hi"
                # a message of several reads, and many messages in a row, come
                # through whole and in order
                big = "".join(chr(97 + index % 26) for index in range(300_000))
                for index in range(20):
                    await ws.send(f"{index} {big[: 1000 * index]}")
                answers = [await asyncio.wait_for(ws.recv(), 10) for _ in range(20)]
                assert answers == [f"127.0.0.1 {i} {big[: 1000 * i]}" for i in range(20)]
                assert await request(ws, big) == f"127.0.0.1 {big}"
                # large frames in a row are read into buffers of their own (the
                # transport lent to a buffered reader, then handed back)
                sizes = (300_000, 290_000, 140_000, 5, 200_000, 3)
                for size in sizes:
                    await ws.send(big[:size])
                answers = [await asyncio.wait_for(ws.recv(), 10) for _ in sizes]
                assert answers == [f"127.0.0.1 {big[:size]}" for size in sizes]
                assert await request(ws, "after") == "127.0.0.1 after"
            # a client that does not trust the certificate does not get in
            with pytest.raises(ssl.SSLCertVerificationError):
                async with ws_connect(url, ssl.create_default_context()):
                    pass
        finally:
            await server.stop()

    run_async(main)


def test_native_tls_on_two_workers(certificate: Certificate) -> None:
    """``run(..., workers=2, ssl=context)``: every worker serves wss:// itself."""
    port = free_port()
    command = [
        sys.executable,
        str(DEPLOY_APP),
        str(port),
        str(certificate.cert),
        str(certificate.key),
    ]
    cluster = Cluster(2, port=port, command=command)
    context = certificate.client_context()
    try:
        cluster.start()

        def ready() -> bool:
            assert cluster.proc is not None
            if cluster.proc.poll() is not None:
                raise RuntimeError(f"exited {cluster.proc.returncode}:\n{cluster.log()}")
            cluster.children()
            _, _, body = https_get(f"https://127.0.0.1:{port}/healthz", context)
            workers = json.loads(body)["workers"]
            return len(workers) == 2 and all(worker["pid"] for worker in workers)

        wait_for(ready, 30)

        async def main() -> None:
            shards: set[str] = set()
            for _ in range(40):
                async with ws_connect(f"wss://127.0.0.1:{port}/", context) as ws:
                    client_id = await request(ws, "whoami")
                    assert isinstance(client_id, str)
                    shards.add(client_id.split("-", 1)[0])
                    assert await request(ws, "addr") == "127.0.0.1"
                if shards == {"0", "1"}:
                    return
            raise AssertionError(f"only workers {shards} answered")

        run_async(main)
    finally:
        cluster.kill()


# -------------------------------------------------------------- systemd


def test_systemd_unit_has_the_documented_settings() -> None:
    unit = SYSTEMD_UNIT.read_text()
    settings: dict[str, str] = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    assert " run myapp:server " in settings["ExecStart"]
    assert "--workers" in settings["ExecStart"]
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["KillMode"] == "mixed"  # SIGTERM to the supervisor, not every worker
    assert settings["Restart"] == "on-failure"
    assert settings["User"] and settings["User"] != "root"
    assert int(settings["LimitNOFILE"]) >= 65536
    close_timeout = WebSocketServer().close_timeout
    # the supervisor waits close_timeout + 3 s, then kills stragglers and the broker
    assert int(settings["TimeoutStopSec"].rstrip("s")) > close_timeout + 10


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit (paths pointed at real ones)."""
    analyze = find_program("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    enjent = Path(sys.executable).with_name("enjent")
    if not enjent.exists():
        pytest.skip("the enjent script is not installed next to this Python")
    unit = SYSTEMD_UNIT.read_text()
    unit = unit.replace("/srv/myapp/.venv/bin/enjent", str(enjent))
    unit = unit.replace("WorkingDirectory=/srv/myapp", f"WorkingDirectory={tmp_path}")
    path = tmp_path / "enjent.service"
    path.write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # a container without systemd as init may add notes about the manager; the
    # unit's own problems name the file
    problems = [line for line in result.stderr.splitlines() if "enjent.service" in line]
    assert not problems, result.stderr
    assert shutil.which(str(enjent))


def test_the_nginx_file_keeps_health_and_metrics_internal(deployment: Deployment) -> None:
    """``/healthz`` and ``/metrics`` have locations of their own that allow only internal
    addresses (``deny all`` for the rest); from the host itself they answer."""
    conf = (REPO_ROOT / "deploy" / "nginx" / "enjent.conf").read_text()
    for path in ("/healthz", "/metrics"):
        match = re.search(r"location = " + re.escape(path) + r" \{(.*?)\}", conf, re.S)
        assert match is not None, f"no location = {path}"
        block = match.group(1)
        assert re.search(r"^\s*deny\s+all;", block, re.M), block
        assert "allow 127.0.0.1;" in block and "proxy_pass http://enjent;" in block
    context = deployment.cert.client_context()
    status, _, body = https_get(f"https://127.0.0.1:{deployment.https_port}/metrics", context)
    assert status == 200 and b"enjent_connections" in body
