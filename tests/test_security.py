"""Security properties: the private bus, msgpack only, no response splitting,
``X-Forwarded-For`` trust, and logs that never carry client payloads.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from clusterutil import Cluster
from websockets.asyncio.client import connect
from wsutil import KEY, upgrade_request

from enjent import Accept, BusError, HandshakeRejected, Response, WebSocketServer
from enjent.cluster import bus as bus_format
from enjent.frames import encode_frame

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-payload-7f1d"


def run(main: Any, timeout: float = 20.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(main, timeout)

    return asyncio.run(bounded())


async def exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


# ------------------------------------------------------------------- bus


def test_runtime_directory_is_private() -> None:
    with Cluster(workers=2) as cluster:
        cluster.wait_ready()
        [runtime] = cluster.runtime_dirs()
        mode = stat.S_IMODE(os.stat(runtime).st_mode)
        assert mode == 0o700, oct(mode)
        assert os.stat(runtime).st_uid == os.getuid()
        sockets = sorted(os.listdir(runtime))
        assert sockets == ["bus-in", "bus-out"]


@pytest.mark.parametrize(
    "module",
    [
        "enjent/cluster/bus.py",
        "enjent/cluster/zeromq.py",
        "supervisor/broker.py",
        "supervisor/worker.py",
    ],
)
def test_no_pickle_on_the_bus(module: str) -> None:
    tree = ast.parse((REPO / module).read_text())
    forbidden = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {alias.name.split(".")[0] for alias in node.names} & forbidden
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in forbidden
        elif isinstance(node, ast.Attribute):
            assert node.attr not in ("recv_pyobj", "send_pyobj"), "pyzmq's pickle helpers"


def test_envelope_unpacking_is_size_limited() -> None:
    # over the body limit: refused before unpacking
    with pytest.raises(BusError, match="over the limit"):
        bus_format.decode(b"\x90" + b"\x00" * bus_format.MAX_BODY)
    # containers claiming 4 billion items, strings claiming 4 GiB: refused at once
    rss = psutil.Process().memory_info().rss
    started = time.monotonic()
    for claim in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        with pytest.raises(BusError):
            bus_format.decode(claim + b"\x00" * 64)
    assert time.monotonic() - started < 1.0
    assert psutil.Process().memory_info().rss - rss < 32 * 1024 * 1024
    # a pickle is not msgpack
    with pytest.raises(BusError):
        bus_format.decode(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.")
    # ext types are data, never code
    with pytest.raises(BusError):
        bus_format.decode(msgpack.packb([msgpack.ExtType(42, b"x"), 1, "g", 1]))


# -------------------------------------------------- response splitting


INJECTIONS = ["x\r\nSet-Cookie: evil=1", "x\nX-Evil: 1", "x\rX-Evil: 1", "x\x00y"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("answer", ["accept", "response", "rejected", "header-name"])
def test_hook_headers_cannot_split_the_response(
    value: str, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = WebSocketServer(ping_interval=None)

    @server.on_handshake
    def hook(request: Any) -> Any:
        headers = [("X-Evil" + value, "1")] if answer == "header-name" else [("X-Ok", value)]
        if answer == "rejected":
            raise HandshakeRejected(401, "no", headers=headers)
        if answer == "response":
            return Response(403, headers=headers)
        return Accept(headers=headers)

    async def main() -> bytes:
        async with server.serve(HOST, 0):
            return await exchange(server.port, upgrade_request())

    with caplog.at_level(logging.INFO):
        response = run(main())
    assert response.startswith(b"HTTP/1.1 500 ")
    head = response.split(b"\r\n\r\n")[0]
    assert b"Evil" not in response and b"evil" not in head
    assert any(record.levelno >= logging.ERROR for record in caplog.records)


# ------------------------------------------------------ X-Forwarded-For


@pytest.mark.parametrize(
    ("trusted", "headers", "expected"),
    [
        ([], ["X-Forwarded-For: 203.0.113.7"], "127.0.0.1"),
        ([], ["X-Real-Ip: 203.0.113.7"], "127.0.0.1"),
        (["10.0.0.0/8"], ["X-Forwarded-For: 203.0.113.7"], "127.0.0.1"),
        (["127.0.0.1"], ["X-Forwarded-For: 203.0.113.7"], "203.0.113.7"),
        (["127.0.0.0/8"], ["X-Forwarded-For: 198.51.100.1, 203.0.113.7"], "203.0.113.7"),
        (["127.0.0.1", "10.0.0.0/8"], ["X-Forwarded-For: 203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        (["127.0.0.1"], ["X-Forwarded-For: not-an-ip, 203.0.113.7"], "203.0.113.7"),
        (["127.0.0.1"], ["X-Forwarded-For: 203.0.113.7, garbage"], "127.0.0.1"),
        (["127.0.0.1"], ["X-Real-Ip: 203.0.113.9"], "203.0.113.9"),
    ],
)
def test_forwarded_for_is_trusted_only_from_trusted_proxies(
    trusted: list[str], headers: list[str], expected: str
) -> None:
    server = WebSocketServer(trusted_proxies=trusted, ping_interval=None)
    seen: list[str | None] = []
    server.on_connect(lambda client: seen.append(client.remote_address))

    async def main() -> None:
        async with server.serve(HOST, 0):
            head = await exchange(
                server.port, upgrade_request("/", *headers), read_until_close=False
            )
            assert head.startswith(b"HTTP/1.1 101 ")

    run(main())
    assert seen == [expected]


# ------------------------------------------------------------------- logs


def test_logs_never_contain_client_payloads(caplog: pytest.LogCaptureFixture) -> None:
    server = WebSocketServer(ping_interval=None, max_message_size=4096, compression=None)

    @server.on_message
    def on_message(client: Any, message: Any) -> None:
        raise ValueError("handler failed")  # the app's own message, not the payload

    secret = SECRET.encode()
    mask = b"\x01\x02\x03\x04"
    attacks = [
        encode_frame(1, secret + b"\xff\xfe", mask=mask),  # invalid UTF-8
        encode_frame(1, secret, mask=mask),  # handler exception
        encode_frame(2, secret * 300, mask=mask),  # over max_message_size
        encode_frame(1, secret, fin=False, mask=mask) + encode_frame(0, b"\xc3", mask=mask),
        encode_frame(8, b"\x03\xe8" + secret, mask=mask),  # close reason
        encode_frame(8, b"\x03\xe8" + secret + b"\xff", mask=mask),  # invalid close reason
        encode_frame(9, secret, mask=mask) + encode_frame(3, secret, mask=mask),
        encode_frame(1, secret),  # unmasked
        b"\x81\xfe\x00\x05" + mask + secret[:5],  # non-minimal length is fine; then garbage
    ]

    async def main() -> None:
        async with server.serve(HOST, 0):
            for frames in attacks:
                reader, writer = await asyncio.open_connection(HOST, server.port)
                writer.write(upgrade_request() + frames)
                with_timeout = asyncio.wait_for(reader.read(), 1)
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await with_timeout
                writer.close()
            # a handshake that carries the secret in the path, a header and the key
            bad = upgrade_request(f"/{SECRET}", f"X-Token: {SECRET}").replace(KEY.encode(), secret)
            await exchange(server.port, bad)
            async with connect(
                f"ws://{HOST}:{server.port}/", open_timeout=3, ping_interval=None, proxy=None
            ) as client:
                await client.send(SECRET)
                await client.close(1000, SECRET)

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert server.stats["handler_errors"] >= 2
    assert server.stats["protocol_errors"] >= 4
    ours = [record for record in caplog.records if record.name.startswith("enjent")]
    assert ours, "the server logged the errors"
    text = "\n".join(logging.Formatter().format(record) for record in ours)  # with tracebacks
    assert SECRET not in text
