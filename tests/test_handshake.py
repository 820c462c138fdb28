"""Tests for the server side of the opening handshake (``enjent.handshake``).

RFC 6455 §4.2.1 checks of a parsed request, ``Sec-WebSocket-Accept``,
subprotocol selection and the ``101 Switching Protocols`` response.
"""

from __future__ import annotations

import base64

import pytest

from enjent.exceptions import WebSocketNegotiationError
from enjent.handshake import (
    accept_key,
    accept_response,
    is_upgrade_request,
    offered_subprotocols,
    select_subprotocol,
    validate_upgrade,
)
from enjent.http11 import Headers, Request, parse_request

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

VALID = {
    "Host": "server.example.com",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": RFC_KEY,
    "Sec-WebSocket-Version": "13",
}


def make_request(
    headers: dict[str, str] | None = None,
    *,
    extra: list[tuple[str, str]] | None = None,
    drop: tuple[str, ...] = (),
) -> Request:
    fields = {**VALID, **(headers or {})}
    items = [(name, value) for name, value in fields.items() if name not in drop]
    return Request("GET", "/chat", Headers(items + (extra or [])))


def rejected(request: Request) -> WebSocketNegotiationError:
    with pytest.raises(WebSocketNegotiationError) as info:
        validate_upgrade(request)
    return info.value


def response_headers(response: bytes) -> tuple[bytes, Headers]:
    head, separator, body = response.partition(b"\r\n\r\n")
    assert separator and body == b""
    status, *lines = head.decode("latin-1").split("\r\n")
    return status.encode(), Headers(tuple(line.split(": ", 1)) for line in lines)  # type: ignore[misc]


# -- Sec-WebSocket-Accept -----------------------------------------------------------------


def test_accept_key_rfc_example() -> None:
    """RFC 6455 §1.3 and §4.2.2."""
    assert accept_key(RFC_KEY) == RFC_ACCEPT


def test_accept_response() -> None:
    status, headers = response_headers(accept_response(RFC_KEY))
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert headers["Upgrade"] == "websocket"
    assert headers["Connection"] == "Upgrade"
    assert headers["Sec-WebSocket-Accept"] == RFC_ACCEPT
    assert "Sec-WebSocket-Protocol" not in headers
    assert "Sec-WebSocket-Extensions" not in headers


def test_accept_response_with_subprotocol_extensions_and_extra_headers() -> None:
    response = accept_response(
        RFC_KEY,
        subprotocol="chat",
        extensions="permessage-deflate",
        extra_headers=[("Server", "enjent")],
    )
    _, headers = response_headers(response)
    assert headers["Sec-WebSocket-Protocol"] == "chat"
    assert headers["Sec-WebSocket-Extensions"] == "permessage-deflate"
    assert headers["Server"] == "enjent"


def test_accept_response_refuses_header_injection() -> None:
    with pytest.raises(ValueError):
        accept_response(RFC_KEY, extra_headers=[("X-A", "b\r\nSet-Cookie: x=1")])
    with pytest.raises(ValueError):
        accept_response(RFC_KEY, subprotocol="chat\r\nX-Evil: 1")


# -- validate_upgrade ----------------------------------------------------------------------


def test_valid_request_returns_its_key() -> None:
    assert validate_upgrade(make_request()) == RFC_KEY


def test_full_handshake_from_bytes() -> None:
    data = (
        b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    parsed = parse_request(data)
    assert parsed is not None
    request = parsed[0]
    key = validate_upgrade(request)
    subprotocol = select_subprotocol(offered_subprotocols(request), ["superchat", "chat"])
    assert subprotocol == "superchat"
    _, headers = response_headers(accept_response(key, subprotocol=subprotocol))
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["sec-websocket-protocol"] == "superchat"


@pytest.mark.parametrize(
    "headers",
    [
        {"upgrade": "WebSocket", "connection": "upgrade"},
        {"Upgrade": "WEBSOCKET", "Connection": "keep-alive, Upgrade"},
        {"Upgrade": "foo/2, websocket", "Connection": "UPGRADE,keep-alive"},
        {"Connection": " keep-alive ,  upgrade "},
    ],
)
def test_upgrade_and_connection_are_case_insensitive_token_lists(headers: dict[str, str]) -> None:
    names = {name.lower() for name in headers}
    items = [(name, value) for name, value in VALID.items() if name.lower() not in names]
    request = Request("GET", "/", Headers([*items, *headers.items()]))
    assert is_upgrade_request(request)
    assert validate_upgrade(request) == RFC_KEY


def test_connection_upgrade_in_a_second_field() -> None:
    request = make_request({"Connection": "keep-alive"}, extra=[("Connection", "Upgrade")])
    assert validate_upgrade(request) == RFC_KEY


def test_missing_host_is_400() -> None:
    assert rejected(make_request(drop=("Host",))).status == 400


@pytest.mark.parametrize("upgrade", [None, "h2c", "websockets", "web socket"])
def test_not_an_upgrade_is_426(upgrade: str | None) -> None:
    request = (
        make_request(drop=("Upgrade",)) if upgrade is None else make_request({"Upgrade": upgrade})
    )
    assert not is_upgrade_request(request)
    error = rejected(request)
    assert error.status == 426
    assert ("Upgrade", "websocket") in error.headers


@pytest.mark.parametrize("connection", [None, "keep-alive", "upgraded", "close"])
def test_connection_without_upgrade_is_400(connection: str | None) -> None:
    request = (
        make_request(drop=("Connection",))
        if connection is None
        else make_request({"Connection": connection})
    )
    assert rejected(request).status == 400


@pytest.mark.parametrize("version", [None, "8", "12", "14", "13, 8", "", "thirteen"])
def test_other_versions_are_426_with_version_13(version: str | None) -> None:
    """RFC 6455 §4.2.2: answer 426 with ``Sec-WebSocket-Version: 13``."""
    request = (
        make_request(drop=("Sec-WebSocket-Version",))
        if version is None
        else make_request({"Sec-WebSocket-Version": version})
    )
    error = rejected(request)
    assert error.status == 426
    assert ("Sec-WebSocket-Version", "13") in error.headers


def test_repeated_version_is_426() -> None:
    request = make_request(extra=[("Sec-WebSocket-Version", "13")])
    assert rejected(request).status == 426


@pytest.mark.parametrize(
    "key",
    [
        "",
        "dGhlIHNhbXBsZSBub25jZQ",  # padding missing
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        base64.b64encode(bytes(17)).decode(),
        base64.b64encode(bytes(15)).decode(),
        "dGhlIHNhbXBsZSBub25jZQ==dGhl",
        "dGhlIHNhbXBsZSBub25j!Q==",
        "dGhlIHNhbXBsZSBub25jZQ é",
    ],
)
def test_key_must_be_base64_of_16_bytes(key: str) -> None:
    assert rejected(make_request({"Sec-WebSocket-Key": key})).status == 400


def test_key_of_16_arbitrary_bytes() -> None:
    key = base64.b64encode(bytes(range(240, 256))).decode()
    assert validate_upgrade(make_request({"Sec-WebSocket-Key": key})) == key


def test_missing_or_repeated_key_is_400() -> None:
    assert rejected(make_request(drop=("Sec-WebSocket-Key",))).status == 400
    assert rejected(make_request(extra=[("Sec-WebSocket-Key", RFC_KEY)])).status == 400


# -- subprotocols ----------------------------------------------------------------------------


def test_offered_subprotocols_in_client_order() -> None:
    request = make_request(
        extra=[("Sec-WebSocket-Protocol", "chat, superchat"), ("sec-websocket-protocol", " v2 ,")]
    )
    assert offered_subprotocols(request) == ["chat", "superchat", "v2"]
    assert offered_subprotocols(make_request()) == []


@pytest.mark.parametrize(
    ("offered", "supported", "selected"),
    [
        (["chat", "superchat"], ["superchat", "chat"], "superchat"),  # server preference
        (["chat", "superchat"], ["chat"], "chat"),
        (["chat"], ["mqtt"], None),
        ([], ["chat"], None),
        (["chat"], [], None),
        (["Chat"], ["chat"], None),  # subprotocol names are case-sensitive
    ],
)
def test_select_subprotocol(offered: list[str], supported: list[str], selected: str | None) -> None:
    assert select_subprotocol(offered, supported) == selected
