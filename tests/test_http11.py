"""Tests for the HTTP/1.1 layer of the opening handshake (``enjent.http11``).

Size-limited, incremental request parsing, the :class:`Request` view of a
request, and response serialization that refuses header injection.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enjent.exceptions import WebSocketNegotiationError
from enjent.http11 import (
    Headers,
    MultiDict,
    Request,
    check_header,
    encode_response,
    error_response,
    json_response,
    parse_request,
)

UPGRADE = (
    b"GET /chat?room=1 HTTP/1.1\r\n"
    b"Host: server.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def request_bytes(*header_lines: str, line: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join([line, *header_lines]) + "\r\n\r\n").encode("latin-1")


def parse(data: bytes, **limits: int) -> Request:
    parsed = parse_request(data, **limits)
    assert parsed is not None
    request, consumed = parsed
    assert consumed == len(data)
    return request


def refused(data: bytes, **limits: int) -> WebSocketNegotiationError:
    with pytest.raises(WebSocketNegotiationError) as info:
        parse_request(data, **limits)
    return info.value


# -- a well-formed request -----------------------------------------------------------


def test_parse_the_rfc_example() -> None:
    request = parse(UPGRADE)
    assert request.method == "GET"
    assert request.target == request.url == "/chat?room=1"
    assert request.version == "HTTP/1.1"
    assert request.path == "/chat"
    assert request.query_string == "room=1"
    assert request.query["room"] == "1"
    assert request.headers["host"] == "server.example.com"
    assert request.headers["SEC-WEBSOCKET-KEY"] == "dGhlIHNhbXBsZSBub25jZQ=="
    assert request.remote_address is None
    assert repr(request) == "<Request GET /chat?room=1>"


def test_consumed_stops_at_the_end_of_the_head() -> None:
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    parsed = parse_request(UPGRADE + frame)
    assert parsed is not None
    assert parsed[1] == len(UPGRADE)


def test_incomplete_head_needs_more() -> None:
    for end in range(len(UPGRADE)):
        assert parse_request(UPGRADE[:end]) is None


def test_bytes_arriving_one_at_a_time() -> None:
    """The connection re-parses its growing buffer after every read."""
    buffer = bytearray()
    results = []
    for byte in UPGRADE:
        buffer.append(byte)
        results.append(parse_request(buffer))
    assert all(result is None for result in results[:-1])
    final = results[-1]
    assert final is not None
    assert final[0].headers.multi_items() == parse(UPGRADE).headers.multi_items()


def test_path_is_percent_decoded_without_the_query() -> None:
    request = parse(request_bytes("Host: h", line="GET /a%20b/%C3%A9?x=%2F HTTP/1.1"))
    assert request.path == "/a b/é"
    assert request.query_string == "x=%2F"
    assert request.query["x"] == "/"


def test_query_with_repeated_and_blank_keys() -> None:
    request = parse(request_bytes(line="GET /?a=1&b=&a=2&c HTTP/1.1"))
    assert request.query["a"] == "1"
    assert request.query.get_all("a") == ["1", "2"]
    assert request.query["b"] == ""
    assert request.query["c"] == ""
    assert request.query.get("missing") is None
    assert "a" in request.query
    assert "A" not in request.query  # query keys keep their case
    assert list(request.query) == ["a", "b", "c"]
    assert len(request.query) == 3


def test_no_query() -> None:
    request = parse(request_bytes(line="GET /plain HTTP/1.1"))
    assert request.query_string == ""
    assert len(request.query) == 0


def test_headers_are_case_insensitive_and_repeated_headers_kept() -> None:
    request = parse(request_bytes("Host: h", "X-Tag: one", "x-tag: two", "X-TAG:three", "Empty:"))
    headers = request.headers
    assert headers["x-tag"] == "one"
    assert headers.get_all("X-Tag") == ["one", "two", "three"]
    assert "X-TAG" in headers
    assert 42 not in headers
    assert headers["empty"] == ""
    assert list(headers) == ["Host", "X-Tag", "Empty"]
    assert len(headers) == 3
    assert headers.multi_items()[1:4] == [("X-Tag", "one"), ("x-tag", "two"), ("X-TAG", "three")]
    with pytest.raises(KeyError):
        headers["missing"]


def test_header_values_are_stripped_of_surrounding_whitespace() -> None:
    request = parse(request_bytes("Host: \t h \t", "X-A:b c"))
    assert request.headers["Host"] == "h"
    assert request.headers["X-A"] == "b c"


def test_header_tokens() -> None:
    headers = Headers([("Connection", "keep-alive, Upgrade"), ("connection", " ,close ,")])
    assert headers.get_tokens("CONNECTION") == ["keep-alive", "upgrade", "close"]
    assert headers.get_tokens("Upgrade") == []


def test_cookies() -> None:
    request = parse(
        request_bytes('Cookie: session=abc; theme="dark"; empty=', "Cookie: session=later; x=1")
    )
    assert request.cookies == {"session": "abc", "theme": "dark", "empty": "", "x": "1"}


def test_cookies_ignore_pairs_without_a_name_or_value() -> None:
    request = parse(request_bytes("Cookie: novalue; =anonymous; ok=1"))
    assert request.cookies == {"ok": "1"}


def test_multidict_basics() -> None:
    items = MultiDict([("a", "1")])
    items.add("a", "2")
    assert items.get_all("a") == ["1", "2"]
    assert items == MultiDict([("a", "1"), ("a", "2")])
    assert items != MultiDict([("a", "2"), ("a", "1")])
    assert items != {"a": "1"}
    assert repr(items) == "MultiDict([('a', '1'), ('a', '2')])"
    with pytest.raises(TypeError):
        hash(items)


# -- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "GET / HTTP/1.1 extra",
        "GET /",
        "GET  / HTTP/1.1",
        "G(T / HTTP/1.1",
        "GET / FTP/1.1",
        "GET /a\x7fb HTTP/1.1",
        "GET * HTTP/1.1",
        "GET http:/host/ HTTP/1.1",
        "GET ftp://host/ HTTP/1.1",
        "GET http:// HTTP/1.1",
        "",
    ],
)
def test_malformed_request_line_is_400(line: str) -> None:
    assert refused(request_bytes("Host: h", line=line)).status == 400


@pytest.mark.parametrize(
    "header",
    [
        "No colon",
        "Bad Name: x",
        "Name : x",
        " folded: x",
        ": empty name",
        "X-A: a\x00b",
        "X-A: a\rb",
        "X-A: a\nb",
    ],
)
def test_malformed_header_is_400(header: str) -> None:
    assert refused(request_bytes("Host: h", header)).status == 400


@pytest.mark.parametrize("method", ["POST", "PUT", "OPTIONS", "get", "head"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    error = refused(request_bytes("Host: h", line=f"{method} / HTTP/1.1"))
    assert error.status == 405
    assert ("Allow", "GET, HEAD") in error.headers


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/1.10"])
def test_other_versions_are_505(version: str) -> None:
    assert refused(request_bytes("Host: h", line=f"GET / {version}")).status == 505


@pytest.mark.parametrize(("method", "version"), [("HEAD", "HTTP/1.1"), ("GET", "HTTP/1.0")])
def test_head_and_http_1_0_are_parsed(method: str, version: str) -> None:
    """Load balancers probe with HEAD and with HTTP/1.0 (HAProxy's httpchk)."""
    request = parse(request_bytes("Host: h", line=f"{method} /healthz {version}"))
    assert (request.method, request.version, request.path) == (method, version, "/healthz")


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("http://example.com/chat?room=1", "/chat", "room=1"),
        ("ws://example.com:8080/a/b", "/a/b", ""),
        ("HTTPS://example.com", "/", ""),
        ("http://example.com?x=1", "/", "x=1"),
    ],
)
def test_absolute_form_is_accepted(target: str, path: str, query: str) -> None:
    """RFC 9112 §3.2.2: a server MUST accept the absolute form of the target."""
    request = parse(request_bytes("Host: example.com", line=f"GET {target} HTTP/1.1"))
    assert (request.path, request.query_string) == (path, query)
    assert request.target.startswith("/")


def test_empty_lines_before_the_request_line_are_ignored() -> None:
    """RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request."""
    assert parse(b"\r\n\r\n" + request_bytes("Host: h")).path == "/"
    assert parse_request(b"\r\n") is None  # still waiting for the request line
    rest = b"\r\n" + request_bytes("Host: h") + b"after"
    parsed = parse_request(rest)
    assert parsed is not None and rest[parsed[1] :] == b"after"
    with pytest.raises(WebSocketNegotiationError) as info:
        parse_request(b"\r\n" * 200, max_request_size=100)
    assert info.value.status == 431


def test_request_query_and_headers_are_mappings() -> None:
    """dict(request.query) and dict(request.headers) work, with first values."""
    request = parse(
        request_bytes("Host: h", "X-Tag: one", "x-tag: two", line="GET /?a=1&b=2&a=3 HTTP/1.1")
    )
    assert isinstance(request.query, Mapping) and isinstance(request.headers, Mapping)
    assert dict(request.query) == {"a": "1", "b": "2"}
    assert list(request.query.keys()) == ["a", "b"]
    assert list(request.query.values()) == ["1", "2"]
    assert list(request.query.items()) == [("a", "1"), ("b", "2")]
    assert request.query.get_all("a") == ["1", "3"]
    assert request.query.multi_items() == [("a", "1"), ("b", "2"), ("a", "3")]
    headers = dict(request.headers)
    assert headers == {"Host": "h", "X-Tag": "one"}
    assert request.headers["X-TAG"] == "one" and request.headers.get_all("x-tag") == ["one", "two"]
    assert request.headers.get("missing", "default") == "default"


def test_request_line_too_long_is_414() -> None:
    line = "GET /" + "a" * 200 + " HTTP/1.1"
    assert refused(request_bytes(line=line), max_request_line=100).status == 414
    # also while the request line is still arriving
    assert refused(line.encode()[:150], max_request_line=100).status == 414
    assert parse_request(line.encode()[:100], max_request_line=100) is None


def test_request_line_at_the_limit() -> None:
    line = "GET /" + "a" * 91 + " HTTP/1.1"
    assert len(line) == 105
    assert parse(request_bytes(line=line), max_request_line=105).path == "/" + "a" * 91


def test_head_too_large_is_431() -> None:
    data = request_bytes("X-Big: " + "b" * 500)
    assert refused(data, max_request_size=200).status == 431
    assert refused(data[:300], max_request_size=200).status == 431
    assert parse_request(data[:200], max_request_size=200) is None


def test_head_at_the_size_limit() -> None:
    data = request_bytes("X-Big: " + "b" * 100)
    assert parse(data, max_request_size=len(data) - 4).headers["X-Big"] == "b" * 100


def test_too_many_headers_is_431() -> None:
    lines = [f"X-{index}: v" for index in range(11)]
    assert refused(request_bytes(*lines), max_headers=10).status == 431
    assert len(parse(request_bytes(*lines[:10]), max_headers=10).headers) == 10


# -- responses -----------------------------------------------------------------------


def test_encode_response() -> None:
    data = encode_response(200, [("Content-Length", "2"), ("X-A", "b\tc")], b"ok")
    assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\tc\r\n\r\nok"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nSet-Cookie: pwned=1"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "a\x00b"),
        ("X-Evil\r\nSet-Cookie", "x"),
        ("X Evil", "x"),
        ("", "x"),
        ("X-É", "x"),
    ],
)
def test_header_injection_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        check_header(name, value)
    with pytest.raises(ValueError):
        encode_response(200, [(name, value)])


def test_error_response() -> None:
    error = WebSocketNegotiationError(426, "use 13", headers=[("Sec-WebSocket-Version", "13")])
    data = error_response(error, server="enjent")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Connection: close" in lines
    assert b"Server: enjent" in lines
    assert b"Sec-WebSocket-Version: 13" in lines
    assert b"Content-Type: text/plain; charset=utf-8" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert body == b"use 13\n"


def test_error_response_keeps_a_given_content_type() -> None:
    error = WebSocketNegotiationError(
        403, headers=[("Content-Type", "application/json")], body=b"{}"
    )
    head = error_response(error).partition(b"\r\n\r\n")[0]
    assert head.count(b"Content-Type") == 1
    assert b"Server:" not in head


def test_json_response() -> None:
    data = json_response(200, {"ok": True})
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: application/json" in data
    assert data.endswith(b'\r\n\r\n{"ok":true}')


# -- properties -----------------------------------------------------------------------

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LIMITS = {"max_request_line": 64, "max_request_size": 256, "max_headers": 8}


def parse_incrementally(chunks: list[bytes], **limits: int) -> object:
    """What the connection does: keep the head, re-parse after every read."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        try:
            result = parse_request(buffer, **limits)
        except WebSocketNegotiationError as error:
            return int(error.status)
        if result is not None:
            request, consumed = result
            assert 0 < consumed <= len(buffer)
            assert isinstance(request, Request)
            return (request.target, request.headers.multi_items(), consumed)
    return None


@st.composite
def mangled_requests(draw: st.DrawFn) -> bytes:
    """The RFC example request with a few bytes changed, cut or inserted."""
    data = bytearray(UPGRADE)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 58, 63, 37, 127, 128, 255, 0x41]))
        if action == "insert" or position == len(data):
            data[position:position] = bytes([byte])
        elif action == "replace":
            data[position] = byte
        else:
            del data[position]
    return bytes(data)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


@BOUNDED
@given(
    data=st.data(),
    payload=st.binary(max_size=400)
    | mangled_requests()
    | st.lists(st.sampled_from([b"GET ", b"/", b" HTTP/1.1", b"\r\n", b"a: b", b":"])).map(
        b"".join
    ),
)
def test_arbitrary_bytes_only_raise_negotiation_errors(data: st.DataObject, payload: bytes) -> None:
    limits = data.draw(st.sampled_from([{}, LIMITS]), label="limits")
    chunks = data.draw(chunked(payload), label="chunks")
    incremental = parse_incrementally(chunks, **limits)
    whole = parse_incrementally([payload], **limits)
    if isinstance(whole, tuple):
        # once the whole head is there, chunking cannot change the request
        assert incremental == whole
    if incremental is None:
        assert whole is None


def test_remote_address_is_kept_as_an_interned_host_and_a_port() -> None:
    host = "".join(["127.0.", "0.1"])  # built at run time: not the interned literal
    first = Request("GET", "/", remote_address=(host, 50_001))
    second = Request("GET", "/", remote_address=("".join(["127.0.", "0.1"]), 50_002))
    assert first.remote_address == ("127.0.0.1", 50_001)
    assert second.remote_address == ("127.0.0.1", 50_002)
    assert first.remote_address[0] is second.remote_address[0]  # one copy for both
    ipv6 = ("::1", 443, 0, 0)
    assert Request("GET", "/", remote_address=ipv6).remote_address == ipv6
    assert Request("GET", "/").remote_address is None
    first.remote_address = None
    assert first.remote_address is None
