"""Signed connection tokens (enjent.server.auth.JWTAuth) with real processes on 2 workers.

``enjent run tests.auth_app:server --workers 2``: every bad token gets 401 and
never reaches ``on_connect`` (the app writes each connect to a file); a good
token connects from each of the four places with its claims; a connection
whose token expires is closed with 3005 within a second of ``exp``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterutil import Cluster
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

jwt = pytest.importorskip("jwt", reason="PyJWT is in the test extra")

pytestmark = pytest.mark.timeout(90)

SECRET = "test-secret-0123456789abcdef0123456789"


def token(claims: dict[str, Any] | None = None, *, key: Any = SECRET, algorithm: str = "HS256",
          **headers: Any) -> str:  # fmt: skip
    now = int(time.time())
    body = {"sub": "ada", "aud": "enjent-test", "iat": now, "exp": now + 300, **(claims or {})}
    return str(jwt.encode(body, key, algorithm=algorithm, headers=headers or None))


def unsigned(claims: dict[str, Any]) -> str:
    """A token with ``alg: none`` (no signature), as an attacker writes it."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    connects = tmp_path / "connects"
    connects.touch()
    with Cluster(workers=2, app="tests.auth_app:server", env={"AUTH_CONNECTS": str(connects)}) as c:
        c.wait_ready()
        yield c, connects


async def status_of(port: int, **kwargs: Any) -> int:
    try:
        async with connect(f"ws://127.0.0.1:{port}/", open_timeout=5, **kwargs):
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)


def test_bad_tokens_get_401_and_never_reach_on_connect(app: tuple[Cluster, Path]) -> None:
    cluster, connects = app
    port = cluster.port
    now = int(time.time())
    bad = {
        "missing": None,
        "malformed": "not.a.jwt",
        "wrong signature": token(key="another-secret-0123456789abcdef0123456"),
        "alg none": unsigned({"sub": "eve", "aud": "enjent-test", "exp": now + 300}),
        "expired": token({"exp": now - 60}),
        "not yet valid": token({"nbf": now + 600}),
        "wrong audience": token({"aud": "someone-else"}),
    }

    async def main() -> None:
        for what, value in bad.items():
            path = "/" if value is None else f"/?token={value}"
            try:
                async with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=5):
                    raise AssertionError(f"{what}: connected")
            except InvalidStatus as exc:
                assert exc.response.status_code == 401, what
                assert exc.response.body, what  # a short reason

    asyncio.run(main())
    time.sleep(0.3)
    assert connects.read_text() == ""


def test_hs_rs_confusion_and_a_public_key_server(tmp_path: Path) -> None:
    """A server that checks RS256 with a public key: a token signed with HS256 and that
    public key as the HMAC secret (the classic confusion) gets 401; an RS256 one connects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(public_pem)
    connects = tmp_path / "connects"
    connects.touch()
    env = {
        "AUTH_CONNECTS": str(connects),
        "AUTH_ALGORITHM": "RS256",
        "AUTH_KEY_FILE": str(key_file),
    }
    with Cluster(workers=2, app="tests.auth_app:server", env=env) as cluster:
        cluster.wait_ready()
        header, payload = (
            base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=")
            for v in ({"alg": "HS256", "typ": "JWT"},
                      {"sub": "eve", "aud": "enjent-test", "exp": int(time.time()) + 300})
        )  # fmt: skip
        import hashlib
        import hmac

        signing_input = header + b"." + payload
        signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
        forged = (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
        good = token(key=private, algorithm="RS256")

        async def main() -> None:
            assert (
                await status_of(
                    cluster.port, additional_headers={"Authorization": f"Bearer {forged}"}
                )
                == 401
            )
            assert (
                await status_of(
                    cluster.port, additional_headers={"Authorization": f"Bearer {good}"}
                )
                == 101
            )

        asyncio.run(main())
    assert connects.read_text() == "ada\n"


def test_a_good_token_connects_from_each_of_the_four_places(app: tuple[Cluster, Path]) -> None:
    cluster, connects = app
    port = cluster.port

    async def claims_with(path: str = "/", **kwargs: Any) -> tuple[dict[str, Any], str | None]:
        async with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=5, **kwargs) as ws:
            await ws.send("claims")
            return json.loads(await asyncio.wait_for(ws.recv(), 5)), ws.subprotocol

    async def main() -> None:
        claims, _ = await claims_with(f"/?token={token({'sub': 'q'})}")
        assert claims["sub"] == "q" and claims["aud"] == "enjent-test"
        claims, _ = await claims_with(
            additional_headers={"Authorization": f"Bearer {token({'sub': 'h'})}"}
        )
        assert claims["sub"] == "h"
        claims, _ = await claims_with(additional_headers={"Cookie": f"token={token({'sub': 'c'})}"})
        assert claims["sub"] == "c"
        # the browser's way: the token as an offered subprotocol, beside the app's
        protocols = ["chat.v1", f"access_token.{token({'sub': 'p'})}"]
        claims, chosen = await claims_with(subprotocols=protocols)
        assert claims["sub"] == "p" and chosen == "chat.v1"
        protocols = [f"access_token.{token({'sub': 'p2'})}"]
        claims, chosen = await claims_with(subprotocols=protocols)
        assert claims["sub"] == "p2" and chosen == protocols[0]

    asyncio.run(main())
    time.sleep(0.3)
    assert sorted(connects.read_text().split()) == ["c", "h", "p", "p2", "q"]


def test_a_connection_whose_token_expires_is_closed_with_3005(app: tuple[Cluster, Path]) -> None:
    cluster, _ = app
    exp = time.time() + 2.0

    async def main() -> float:
        value = token({"exp": int(exp) + 1})
        async with connect(f"ws://127.0.0.1:{cluster.port}/?token={value}", open_timeout=5) as ws:
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 3005, (ws.close_code, ws.close_reason)
            return time.time() - (int(exp) + 1)

    late = asyncio.run(main())
    assert -0.05 <= late < 1.0, late
