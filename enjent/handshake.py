"""The WebSocket opening handshake, server side (RFC 6455 §4.2).

Protocol core (layer 1 of docs/architecture.md): checks a parsed :class:`Request` and
builds the ``101 Switching Protocols`` response; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence

from .exceptions import WebSocketNegotiationError
from .http11 import Request, check_header

__all__ = [
    "accept_key",
    "accept_response",
    "is_upgrade_request",
    "offered_subprotocols",
    "select_subprotocol",
    "validate_upgrade",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


#: RFC 9110 §5.6.2: a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: RFC 9112 §3.2: ``uri-host [ ":" port ]`` (an IP literal, IPv4 or a registered name).
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
#: The longest subprotocol name taken from a client.
MAX_SUBPROTOCOL = 255


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def is_upgrade_request(request: Request) -> bool:
    """Whether the client asks for a WebSocket upgrade at all.

    A plain HTTP request (no ``Upgrade: websocket``) gets 426 or the health
    path's answer rather than a handshake error.
    """
    return "websocket" in request.headers.get_tokens("Upgrade")


def validate_upgrade(request: Request) -> str:
    """Check the client's handshake (RFC 6455 §4.2.1); return its key.

    Raises :class:`WebSocketNegotiationError` with 400 for a malformed
    request, 405 for ``HEAD``, 505 below HTTP/1.1 (RFC 6455 §4.1 asks for
    "HTTP/1.1 or higher") and 426 (with ``Sec-WebSocket-Version: 13``) for
    another WebSocket version.
    """
    if request.version != "HTTP/1.1":
        raise WebSocketNegotiationError(505, "only HTTP/1.1 can upgrade to WebSocket")
    if request.method != "GET":
        raise WebSocketNegotiationError(
            405, f"method {request.method} not allowed, use GET", headers=[("Allow", "GET")]
        )
    headers = request.headers
    hosts = headers.get_all("Host")
    if not hosts:
        raise WebSocketNegotiationError(400, "missing Host header")
    if len(hosts) != 1 or not _HOST.fullmatch(hosts[0]):
        raise WebSocketNegotiationError(400, "exactly one well-formed Host header is required")
    if "Transfer-Encoding" in headers or headers.get_all("Content-Length") not in ([], ["0"]):
        # a GET upgrade has no body: bytes after the head are WebSocket frames.
        # ``Content-Length: 0`` says "no body" (RFC 9112 §6.3) and JDK's
        # java.net.http client sends it on its upgrade GET: accepted, once.
        raise WebSocketNegotiationError(400, "an upgrade request has no body")
    if len(headers.get_all("Origin")) > 1:
        raise WebSocketNegotiationError(400, "more than one Origin header")
    if not is_upgrade_request(request):
        raise WebSocketNegotiationError(
            426,
            "this is a WebSocket endpoint: send Upgrade: websocket",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    if "upgrade" not in headers.get_tokens("Connection"):
        raise WebSocketNegotiationError(400, "the Connection header must include Upgrade")
    versions = headers.get_all("Sec-WebSocket-Version")
    if versions != ["13"]:
        raise WebSocketNegotiationError(
            426,
            "unsupported WebSocket version, use 13",
            headers=[("Sec-WebSocket-Version", "13")],
        )
    keys = headers.get_all("Sec-WebSocket-Key")
    if len(keys) != 1:
        raise WebSocketNegotiationError(400, "exactly one Sec-WebSocket-Key is required")
    key = keys[0]
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise WebSocketNegotiationError(400, "Sec-WebSocket-Key is not base64 of 16 bytes")
    return key


def is_token(text: str) -> bool:
    """Whether ``text`` is an HTTP token (RFC 9110 §5.6.2) of at most 255 characters."""
    return len(text) <= MAX_SUBPROTOCOL and _TOKEN.fullmatch(text) is not None


def offered_subprotocols(request: Request) -> list[str]:
    """The subprotocols the client offers, in its order of preference.

    Only HTTP tokens of at most 255 characters (RFC 6455 §4.1): anything
    else is not a subprotocol, so it can never be echoed back.
    """
    return [
        token.strip()
        for value in request.headers.get_all("Sec-WebSocket-Protocol")
        for token in value.split(",")
        if token.strip() and is_token(token.strip())
    ]


def select_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The first of the server's ``supported`` subprotocols the client offered."""
    for name in supported:
        if name in offered:
            return name
    return None


def accept_response(
    key: str,
    *,
    subprotocol: str | None = None,
    extensions: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The ``101 Switching Protocols`` response (RFC 6455 §4.2.2).

    The subprotocol and the extra headers come from the application and
    are checked against CR/LF injection; the rest is ours.
    """
    head = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
    )
    extra = list(extra_headers)
    if subprotocol:
        extra.insert(0, ("Sec-WebSocket-Protocol", subprotocol))
    if extensions:
        head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    for name, value in extra:
        check_header(name, value)
        head += f"{name}: {value}\r\n"
    return (head + "\r\n").encode("latin-1")
