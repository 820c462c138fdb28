"""HTTP/1.1 for the opening handshake: request parsing and responses.

Protocol core (layer 1 of docs/architecture.md): bytes in, a :class:`Request` out;
no I/O. Parsing is size-limited (RFC 9112 §2.3, §5) so that a hostile client
costs at most ``max_request_size`` bytes of buffer before it is refused.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, TypeVar, overload
from urllib.parse import parse_qsl, unquote

from .exceptions import WebSocketNegotiationError

__all__ = [
    "Headers",
    "MultiDict",
    "Request",
    "encode_response",
    "error_response",
    "parse_request",
    "text_response",
    "without_body",
]

_T = TypeVar("_T")

#: RFC 9110 §5.6.2: a token (header names, methods).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Header values may not carry control characters other than tab (RFC 9110 §5.5).
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_END_OF_HEAD = b"\r\n\r\n"
#: Every header line of a head (after the request line): ``token ":" value``,
#: the value without control characters other than tab (RFC 9110 §5.5).
_FIELD_LINE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*"
_FIELD_LINES = re.compile(_FIELD_LINE + rb"(?:\r\n" + _FIELD_LINE + rb")*")


class MultiDict(Mapping[str, str]):
    """An ordered multimap of strings, read as a ``Mapping`` of first values.

    ``[name]``, ``get()``, ``keys()``, ``values()``, ``items()`` and
    ``dict(multidict)`` see the first value of each name (as websockets'
    and aiohttp's headers do); ``get_all(name)`` gives every value of a name,
    in order, and ``multi_items()`` every (name, value) pair as received.
    With ``case_insensitive`` (headers) names are compared without case but
    kept as received.
    """

    __slots__ = ("_case_insensitive", "_index", "_items")

    def __init__(
        self, items: Iterable[tuple[str, str]] = (), *, case_insensitive: bool = False
    ) -> None:
        self._case_insensitive = case_insensitive
        self._items: list[tuple[str, str]] = list(items)
        self._index: dict[str, list[str]] | None = None

    def _key(self, name: str) -> str:
        return name.lower() if self._case_insensitive else name

    def _lookup(self) -> dict[str, list[str]]:
        """key -> values, built once on the first lookup (a handshake makes several)."""
        index = self._index
        if index is None:
            index = {}
            for name, value in self._items:
                index.setdefault(self._key(name), []).append(value)
            self._index = index
        return index

    def __getitem__(self, name: str) -> str:
        values = self._lookup().get(self._key(name))
        if not values:
            raise KeyError(name)
        return values[0]

    @overload
    def get(self, name: str, /) -> str | None: ...

    @overload
    def get(self, name: str, default: str, /) -> str: ...

    @overload
    def get(self, name: str, default: _T, /) -> str | _T: ...

    def get(self, name: str, default: object = None, /) -> object:
        values = self._lookup().get(self._key(name))
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._lookup().get(self._key(name), ()))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return self._key(name) in self._lookup()

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self._items:
            key = self._key(name)
            if key not in seen:
                seen.add(key)
                yield name

    def __len__(self) -> int:
        return len({self._key(name) for name, _ in self._items})

    def multi_items(self) -> list[tuple[str, str]]:
        """Every (name, value) pair, repeated names included, in order."""
        return list(self._items)

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))
        self._index = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MultiDict):
            return self._items == other.multi_items()
        return NotImplemented  # not equal to a dict: that would drop repeated names

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class Headers(MultiDict):
    """HTTP header fields: case-insensitive names, repeated fields kept."""

    __slots__ = ()

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items, case_insensitive=True)

    def get_tokens(self, name: str) -> list[str]:
        """The comma-separated, lower-cased tokens of every ``name`` field."""
        return [
            token.strip().lower()
            for value in self.get_all(name)
            for token in value.split(",")
            if token.strip()
        ]


class Request:
    """An HTTP/1.1 request, as received in the opening handshake.

    ``path`` is percent-decoded and excludes the query string; ``query``
    holds the query string parsed (repeated keys kept); ``cookies`` the
    ``Cookie`` header parsed. ``remote_address`` is filled in by the server
    (the TCP peer: ``(host, port)``, with IPv6's flow and scope too).

    Memory: a connected client keeps its request for its whole life, so
    once the handshake is done the server calls :meth:`compact`, which keeps
    only the raw header bytes; ``headers``, ``query`` and ``cookies`` are
    parsed again (and cached) the first time they are read.
    """

    __slots__ = (
        "_headers",
        "_parsed",
        "_peer",
        "_port",
        "_raw_headers",
        "method",
        "target",
        "version",
    )
    _peer: Any  # the host (interned), or the whole address when not (host, port)
    _port: int

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers | None = None,
        *,
        version: str = "HTTP/1.1",
        remote_address: tuple[str, int] | None = None,
        raw_headers: bytes | None = None,
    ) -> None:
        if headers is None and raw_headers is None:
            headers = Headers()
        self.method = method
        self.target = target
        self.version = version
        self.remote_address = remote_address
        self._headers = headers
        self._raw_headers = raw_headers
        #: [query, cookies] once either was read (one slot for both: every
        #: connected client keeps its request)
        self._parsed: list[Any] | None = None

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The TCP peer, ``(host, port)`` (IPv6: with flow and scope), or ``None``."""
        peer = self._peer
        if peer is None or type(peer) is tuple:
            return peer
        return (peer, self._port)

    @remote_address.setter
    def remote_address(self, peer: tuple[Any, ...] | None) -> None:
        # kept as its parts, the host interned: clients behind one proxy or
        # NAT share one copy of their address, and no tuple is kept per
        # connection (an idle connection's memory is the figure that counts)
        if peer and len(peer) == 2 and type(peer[0]) is str:
            self._peer = sys.intern(peer[0])
            self._port = peer[1]
        else:
            self._peer = tuple(peer) if peer else None
            self._port = 0

    @property
    def headers(self) -> Headers:
        """The header fields (case-insensitive names, repeated fields kept)."""
        headers = self._headers
        if headers is None:
            assert self._raw_headers is not None
            headers = self._headers = Headers(_split_fields(self._raw_headers))
        return headers

    @property
    def path(self) -> str:
        """The percent-decoded path, without the query string."""
        return unquote(self.target.partition("?")[0])

    @property
    def query_string(self) -> str:
        """The raw query string (after ``?``), or ``""``."""
        return self.target.partition("?")[2]

    @property
    def query(self) -> MultiDict:
        """The query string parsed; ``query["key"]`` is the first value."""
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = [None, None]
        query: MultiDict | None = parsed[0]
        if query is None:
            query = parsed[0] = MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
        return query

    @property
    def cookies(self) -> dict[str, str]:
        """The ``Cookie`` header parsed (the first value of each name)."""
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = [None, None]
        cookies: dict[str, str] | None = parsed[1]
        if cookies is None:
            cookies = parsed[1] = _parse_cookies(self.headers.get_all("Cookie"))
        return cookies

    @property
    def url(self) -> str:
        """The request target as sent (path and query string)."""
        return self.target

    def compact(self) -> None:
        """Drop what can be parsed again from the raw header bytes."""
        if self._raw_headers is not None:
            self._headers = None
            self._parsed = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target}>"


def _split_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, value) pairs of header lines already checked by parse_request."""
    fields = []
    for line in raw.split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields.append((name.decode("ascii"), value.decode("latin-1").strip(" \t")))
    return fields


def _parse_cookies(fields: list[str]) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for field in fields:
        for pair in field.split(";"):
            name, sep, value = pair.partition("=")
            name = name.strip()
            if sep and name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                cookies.setdefault(name, value)
    return cookies


def parse_request(
    data: bytes | bytearray,
    *,
    max_request_line: int = 8192,
    max_request_size: int = 16384,
    max_headers: int = 100,
    any_method: bool = False,
) -> tuple[Request, int] | None:
    """Parse the head of an HTTP/1.1 request from the start of ``data``.

    Returns ``(request, consumed)`` once the head is complete, ``None`` while
    more bytes are needed. ``GET`` and ``HEAD`` are accepted, over HTTP/1.1
    or HTTP/1.0 (load balancers' health probes; only HTTP/1.1 may upgrade,
    which :func:`~enjent.handshake.validate_upgrade` checks); with
    ``any_method``, every method (a token), for an HTTP API to judge. Raises
    :class:`WebSocketNegotiationError` with 400 (malformed), 405 (another
    method), 414 (request line too long), 431 (head too large, or too many
    fields) or 505 (another HTTP version).
    """
    start = 0
    # RFC 9112 §2.2: ignore empty lines received before the request line
    while data.startswith(b"\r\n", start) and start <= max_request_size:
        start += 2
    if start > max_request_size:
        raise WebSocketNegotiationError(431, "request header fields too large")
    if start:
        if len(data) == start:
            return None
        parsed = parse_request(
            bytes(data[start:]),
            max_request_line=max_request_line,
            max_request_size=max_request_size - start,
            max_headers=max_headers,
            any_method=any_method,
        )
        return None if parsed is None else (parsed[0], parsed[1] + start)
    end = data.find(_END_OF_HEAD, 0, max_request_size + 4)
    if end < 0:
        line_end = data.find(b"\r\n", 0, max_request_line + 2)
        if line_end < 0 and len(data) > max_request_line:
            raise WebSocketNegotiationError(414, "request line too long")
        if len(data) > max_request_size:
            raise WebSocketNegotiationError(431, "request header fields too large")
        return None
    head = bytes(data[:end])
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > max_request_line:
        raise WebSocketNegotiationError(414, "request line too long")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise WebSocketNegotiationError(400, "malformed request line")
    method_bytes, target_bytes, version_bytes = parts
    if not version_bytes.startswith(b"HTTP/"):
        raise WebSocketNegotiationError(400, "malformed request line")
    if version_bytes != b"HTTP/1.1" and version_bytes != b"HTTP/1.0":
        raise WebSocketNegotiationError(505, "HTTP version not supported, use HTTP/1.1")
    if not target_bytes or any(c <= 0x20 or c >= 0x7F for c in target_bytes):
        raise WebSocketNegotiationError(400, "malformed request target")
    if len(lines) - 1 > max_headers:
        raise WebSocketNegotiationError(431, f"more than {max_headers} header fields")
    fields: list[tuple[str, str]] = []
    first_line_end = head.find(b"\r\n")
    # one pass of the regex engine checks every field line at once; the
    # loop below then only splits (and finds the culprit if the check fails)
    valid = first_line_end < 0 or _FIELD_LINES.fullmatch(head, first_line_end + 2) is not None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not valid and (not colon or not _TOKEN.fullmatch(name)):
            raise WebSocketNegotiationError(400, "malformed header field")
        text = value.decode("latin-1").strip(" \t")
        if not valid and _BAD_VALUE_CHARS.search(text):
            raise WebSocketNegotiationError(400, "control character in a header value")
        fields.append((name.decode("ascii"), text))
    if not valid:  # pragma: no cover - the loop above names every failure
        raise WebSocketNegotiationError(400, "malformed header field")
    if method_bytes == b"GET":
        method = "GET"  # one shared str
    elif method_bytes == b"HEAD":
        method = "HEAD"
    else:
        method = method_bytes.decode("ascii")
        if not any_method:
            raise WebSocketNegotiationError(
                405, f"method {method} not allowed, use GET", headers=[("Allow", "GET, HEAD")]
            )
    target = _origin_form(target_bytes.decode("ascii"))
    version = "HTTP/1.1" if version_bytes == b"HTTP/1.1" else "HTTP/1.0"
    raw_headers = head[first_line_end + 2 :] if first_line_end >= 0 else None
    request = Request(method, target, Headers(fields), version=version, raw_headers=raw_headers)
    return request, end + len(_END_OF_HEAD)


#: RFC 9112 §3.2.2: the absolute form, ``http://host[:port]/path?query``.
_ABSOLUTE_FORM = re.compile(r"(?:https?|wss?)://[^/?#]+(.*)", re.IGNORECASE)


def _origin_form(target: str) -> str:
    """The path and query of a request target in origin or absolute form.

    A server MUST accept the absolute form (RFC 9112 §3.2.2); its authority
    is ignored here (the ``Host`` header is what a hook reads).
    """
    if target.startswith("/"):
        return target
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise WebSocketNegotiationError(400, "the request target must be a path or an absolute URI")
    rest = match.group(1)
    if not rest:
        return "/"
    if rest.startswith("?"):
        return "/" + rest
    if not rest.startswith("/"):
        raise WebSocketNegotiationError(400, "malformed absolute request target")
    return rest


def check_header(name: str, value: str) -> None:
    """Refuse a response header that could split the response (CR/LF injection)."""
    if not _TOKEN.fullmatch(name.encode("latin-1", "replace")):
        raise ValueError(f"invalid header name {name!r}")
    if _BAD_VALUE_CHARS.search(value):
        raise ValueError(f"header {name} has a control character (CR/LF injection?)")


def encode_response(
    status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """Serialize a response head and body; header values are checked first."""
    phrase = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}"]
    for name, value in headers:
        check_header(name, value)
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_response(error: WebSocketNegotiationError, *, server: str | None = None) -> bytes:
    """The response that answers a refused handshake; the connection then closes."""
    headers: list[tuple[str, str]] = []
    names = {name.lower() for name, _ in error.headers}
    if "content-type" not in names:
        headers.append(("Content-Type", "text/plain; charset=utf-8"))
    headers.append(("Content-Length", str(len(error.body))))
    headers.append(("Connection", "close"))
    if server:
        headers.append(("Server", server))
    headers.extend(error.headers)
    return encode_response(int(error.status), headers, error.body)


def without_body(response: bytes) -> bytes:
    """The head of an encoded response: what answers a ``HEAD`` request (RFC 9110 §9.3.2)."""
    end = response.find(_END_OF_HEAD)
    return response if end < 0 else response[: end + len(_END_OF_HEAD)]


def json_response(
    status: int,
    payload: Any,
    *,
    keep_alive: bool = False,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A small JSON response (the health path, the publish API); it closes the
    connection unless ``keep_alive``."""
    import json

    body = json.dumps(payload, separators=(",", ":")).encode()
    return encode_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "keep-alive" if keep_alive else "close"),
            *headers,
        ],
        body,
    )


def text_response(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    """A small text response (the metrics path), closing the connection."""
    body = text.encode()
    return encode_response(
        status,
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ],
        body,
    )
