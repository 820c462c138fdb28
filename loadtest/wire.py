"""The client side of the WebSocket wire protocol, just enough for load generation.

Layer 5 of docs/architecture.md: loadtest is a client and depends on nothing in `enjent`, only on
RFC 6455. This module does no I/O: it builds the upgrade request, checks the response,
builds masked frames and parses server frames (bytes in, messages out).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from enum import IntEnum

#: RFC 6455 §1.3: appended to Sec-WebSocket-Key before hashing.
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Largest upgrade response head we accept before calling the server broken.
MAX_RESPONSE_HEAD = 16 * 1024

#: Largest message (after reassembly) the load generator accepts.
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class Opcode(IntEnum):
    """Frame opcodes, RFC 6455 §5.2."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """The close codes the load generator sends or names, RFC 6455 §7.4.1."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002


class ProtocolError(Exception):
    """The server broke RFC 6455 (or the HTTP upgrade); the connection is abandoned."""


def new_key() -> bytes:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 §4.1)."""
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept value a server must answer to `key` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest())


#: The permessage-deflate offer of `--offer-deflate` (RFC 7692), as browsers send it.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"

#: Added to an opcode by `FrameParser.feed` for a message whose first frame had RSV1
#: set: compressed with permessage-deflate (RFC 7692 §6), payload left as it came.
COMPRESSED = 0x40

#: RFC 7692 §7.2.1: the empty stored block every sync-flushed message ends with.
DEFLATE_TAIL = b"\x00\x00\xff\xff"


def deflate_window_bits(agreed: str) -> int:
    """The window our compressor may use under the server's permessage-deflate answer:
    its `client_max_window_bits` (RFC 7692 §7.1.2.2), 15 when it names none.

    Raises ProtocolError for an answer that is not permessage-deflate or names a
    window zlib's raw deflate cannot keep to (8 bits).
    """
    name, *params = [part.strip() for part in agreed.split(";")]
    if name.lower() != "permessage-deflate":
        raise ProtocolError(f"agreed to an extension not offered: {agreed!r}")
    bits = 15
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "client_max_window_bits":
            text = value.strip().strip('"')
            if not text.isdigit() or not 8 <= int(text) <= 15:
                raise ProtocolError(f"bad client_max_window_bits in {agreed!r}")
            bits = int(text)
    if bits < 9:
        raise ProtocolError("client_max_window_bits=8: zlib's raw deflate needs 9 or more")
    return bits


def deflate_message(payload: bytes, window_bits: int = 15) -> bytes:
    """One message as a client sends it compressed (RFC 7692 §7.2.1): raw deflate from
    a fresh stream, sync-flushed, the 4-byte tail removed. A fresh stream refers to
    nothing sent before, so the same bytes are valid as any message of a connection,
    with or without context takeover, and the load generator compresses each shape once.
    """
    compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if not data.endswith(DEFLATE_TAIL):
        raise AssertionError("a sync flush ends with the empty stored block")
    return data[: -len(DEFLATE_TAIL)]


class Inflater:
    """Decompresses the messages of one connection in order (RFC 7692 §7.2.2), for the
    client that checks what a compressing server sends. One zlib stream with the
    largest window decodes a server that resets its context or keeps it alike.
    """

    __slots__ = ("_stream",)

    def __init__(self) -> None:
        self._stream = zlib.decompressobj(-15)

    def inflate(self, payload: bytes) -> bytes:
        try:
            return self._stream.decompress(payload + DEFLATE_TAIL)
        except zlib.error as exc:
            raise ProtocolError(f"a compressed message does not inflate: {exc}") from None


def upgrade_request(
    host: str, port: int, key: bytes, path: str = "/", extensions: str | None = None
) -> bytes:
    """The HTTP/1.1 GET that asks for an upgrade to WebSocket (RFC 6455 §4.1), with a
    Sec-WebSocket-Extensions offer when `extensions` is given."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode('ascii')}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"{offer}"
        "\r\n"
    ).encode("ascii")


def check_upgrade_response(head: bytes, key: bytes) -> str | None:
    """Raise ProtocolError unless `head` (status line and headers, no body) accepts `key`.

    RFC 6455 §4.1: status 101, `Upgrade: websocket`, `Connection` containing `upgrade`,
    and a matching Sec-WebSocket-Accept. Returns the Sec-WebSocket-Extensions the server
    agreed to, or None.
    """
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.1") or status[1] != "101":
        raise ProtocolError(f"upgrade refused: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise ProtocolError("missing Upgrade: websocket")
    if "upgrade" not in [
        token.strip().lower() for token in headers.get("connection", "").split(",")
    ]:
        raise ProtocolError("missing Connection: Upgrade")
    if headers.get("sec-websocket-accept", "").encode("ascii", "replace") != accept_for(key):
        raise ProtocolError("wrong Sec-WebSocket-Accept")
    return headers.get("sec-websocket-extensions")


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask` repeated (RFC 6455 §5.3), in one big-int pass."""
    length = len(payload)
    if length == 0:
        return b""
    repeated = (mask * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return masked.to_bytes(length, "little")


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    mask: bytes | None = None,
    fin: bool = True,
    compressed: bool = False,
) -> bytes:
    """One frame, RFC 6455 §5.2. Client frames carry a mask; pass one to build them;
    `compressed` sets RSV1 (a payload from `deflate_message`, RFC 7692 §6).

    The load generator builds each frame it sends repeatedly once and writes the same
    bytes many times, so the cost of masking here is paid once per message shape.
    """
    first = (0x80 if fin else 0) | (0x40 if compressed else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is None:
        return head + payload
    if len(mask) != 4:
        raise ValueError("a mask is 4 bytes")
    return head + mask + mask_payload(payload, mask)


def close_payload(code: int, reason: str = "") -> bytes:
    """The body of a Close frame: a 2-byte code then a UTF-8 reason (RFC 6455 §5.5.1)."""
    return struct.pack("!H", code) + reason.encode("utf-8")


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """Split a Close body into (code, reason); (None, "") when it has no code."""
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Incremental parser for server-to-client frames (RFC 6455 §5.2).

    `feed(data)` returns the complete messages as `(opcode, payload)`: data messages
    reassembled from their fragments (§5.4) with the opcode of the first fragment, and
    control frames (§5.5) as they come, even between fragments. With `compressed`
    (permessage-deflate agreed), a message whose first frame sets RSV1 comes with
    `COMPRESSED` added to its opcode and its payload not inflated. Any violation raises
    ProtocolError: a masked server frame (§5.1), reserved bits without an extension,
    unknown opcodes, fragmented or oversized control frames, a continuation with
    nothing to continue, or a message over `max_message` bytes.
    """

    __slots__ = (
        "_buffer",
        "_fragment_opcode",
        "_fragments",
        "_fragments_size",
        "compressed",
        "max_message",
    )

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE, compressed: bool = False) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode = -1
        self._fragments_size = 0
        self.max_message = max_message
        self.compressed = compressed

    @property
    def idle(self) -> bool:
        """Nothing buffered: no partial frame, no fragmented message under way."""
        return not self._buffer and not self._fragments and self._fragment_opcode < 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Consume `data`; return every message it completes, in order."""
        buffered = bool(self._buffer)
        if buffered:
            self._buffer += data
            source: bytes | bytearray = self._buffer
        else:
            source = data  # the common case: parse the chunk in place, one copy per payload
        messages: list[tuple[int, bytes]] = []
        size = len(source)
        position = 0
        while size - position >= 2:
            first = source[position]
            second = source[position + 1]
            if second & 0x80:
                raise ProtocolError("server frames must not be masked (RFC 6455 §5.1)")
            opcode = first & 0x0F
            if first & 0x70:
                # RSV1 on the first frame of a data message, when deflate was agreed
                if not (self.compressed and first & 0x70 == 0x40 and 0 < opcode < 3):
                    raise ProtocolError("reserved bits set without a negotiated extension")
                opcode |= COMPRESSED
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = (source[position + 2] << 8) | source[position + 3]
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(source[position + 2 : position + 10], "big")
                if length >> 63:
                    raise ProtocolError("64-bit length with the most significant bit set")
                header = 10
            if length > self.max_message:
                raise ProtocolError(f"frame of {length} bytes over the limit")
            end = position + header + length
            if end > size:
                break
            start = position + header
            if buffered:
                # one copy out of the buffer (slicing the bytearray first would be two);
                # the view is released before the buffer is trimmed below
                with memoryview(self._buffer) as view:
                    payload = bytes(view[start:end])
            else:
                payload = data[start:end]
            position = end
            if first & 0x80 and 0 < opcode & 0x0F < 3 and self._fragment_opcode < 0:
                messages.append((opcode, payload))  # a whole data message, the usual frame
            else:
                self._frame(first & 0x80, opcode, payload, messages)
        if buffered:
            if position:
                del self._buffer[:position]
        elif position < size:
            self._buffer += memoryview(data)[position:]  # one copy, not a slice and a copy
        return messages

    def whole_message(self, data: bytes) -> tuple[int, bytes] | None:
        """`data` as the one whole data message it is, or None to use :meth:`feed`.

        The fast path of a read that is exactly one unfragmented, valid text or binary
        frame with nothing buffered and no fragmented message under way (what fan-out and
        echo clients mostly read); any other read, valid or not, answers None and is
        left to :meth:`feed`, which parses or rejects it.
        """
        size = len(data)
        if size < 2 or self._buffer or self._fragment_opcode >= 0:
            return None
        first = data[0]
        second = data[1]
        opcode = first & 0x0F
        if first & 0x80 == 0 or second & 0x80 or not 0 < opcode < 3:
            return None
        if first & 0x70:
            if first & 0x70 != 0x40 or not self.compressed:
                return None
            opcode |= COMPRESSED
        length = second & 0x7F
        header = 2
        if length == 126:
            if size < 4:
                return None
            length = (data[2] << 8) | data[3]
            header = 4
        elif length == 127:
            if size < 10:
                return None
            length = int.from_bytes(data[2:10], "big")
            header = 10
        if header + length != size or length > self.max_message:
            return None
        return opcode, data[header:]

    def _frame(self, fin: int, opcode: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode & COMPRESSED == 0 and opcode >= 0x8:
            if opcode not in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
                raise ProtocolError(f"unknown control opcode {opcode:#x}")
            if not fin or len(payload) > 125:
                raise ProtocolError("control frames are single frames of 125 bytes at most")
            out.append((opcode, payload))
            return
        if opcode == Opcode.CONTINUATION:
            if self._fragment_opcode < 0:
                raise ProtocolError("continuation frame without a message to continue")
        elif opcode & 0x0F in (Opcode.TEXT, Opcode.BINARY):
            if self._fragment_opcode >= 0:
                raise ProtocolError("new data frame inside a fragmented message")
            if fin:
                out.append((opcode, payload))
                return
            self._fragment_opcode = opcode
        else:
            raise ProtocolError(f"unknown data opcode {opcode:#x}")
        self._fragments_size += len(payload)
        if self._fragments_size > self.max_message:
            raise ProtocolError("fragmented message over the limit")
        self._fragments.append(payload)
        if fin:
            out.append((self._fragment_opcode, b"".join(self._fragments)))
            self._fragments = []
            self._fragment_opcode = -1
            self._fragments_size = 0
