"""Frame codec of RFC 6455 §5: opcodes, close codes, serialization.

Protocol core (layer 1 of docs/architecture.md): no I/O. Parsing lives in
:mod:`enjent.protocol`, whose single pass over a read buffer is the hot path.
"""

from __future__ import annotations

import enum
import struct

from .exceptions import ProtocolError
from .mask import apply_mask

__all__ = [
    "MAX_CONTROL_PAYLOAD",
    "CloseCode",
    "Opcode",
    "encode_close_payload",
    "encode_frame",
    "frame_header",
    "parse_close_payload",
]

#: RFC 6455 §5.5: control frames carry at most 125 bytes.
MAX_CONTROL_PAYLOAD = 125


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 §5.2, §11.8)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close status codes (RFC 6455 §7.4.1 and the IANA registry)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never on the wire: "the close frame had no code"
    ABNORMAL_CLOSURE = 1006  # never on the wire: "no close frame at all"
    INVALID_PAYLOAD_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire
    # Enjent's own, in the 3000-3999 range registered for libraries (RFC 6455 §7.4.2),
    # where the RFC names no case; what a client should do is in the README's table
    #: The connection's token expired: reconnect with a fresh token.
    TOKEN_EXPIRED = 3005
    #: The client read too slowly (its unsent data passed ``write_limit``): back off.
    SLOW_CONSUMER = 3008
    #: The client sent over ``max_message_rate``: back off before reconnecting.
    RATE_LIMITED = 3013


#: Codes a peer may send in a close frame (RFC 6455 §7.4, IANA registry);
#: 3000-4999 are for libraries and applications.
_WIRE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame (RFC 6455 §7.4.2)."""
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


_HEADER_7 = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
#: The two-byte headers of final, unmasked text and binary frames of 0-125
#: payload bytes, made once (indexed by the length): the frame a server sends
#: most is one of these plus its payload, with no header built per message.
SHORT_TEXT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))
SHORT_BINARY_HEADERS = tuple(bytes((0x82, n)) for n in range(126))


def frame_header(opcode: int, length: int, *, rsv1: bool = False) -> bytes:
    """The header of an unmasked, final frame of ``length`` payload bytes (§5.2).

    For a large payload the I/O layer writes this header and the payload as
    two buffers of one vectored write, so the payload is never copied.
    """
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        return _HEADER_7.pack(first, length)
    if length < 65536:
        return _HEADER_16.pack(first, 126, length)
    return _HEADER_64.pack(first, 127, length)


def encode_frame(
    opcode: int,
    payload: bytes | bytearray | memoryview,
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask: bytes | None = None,
) -> bytes:
    """Serialize one frame (RFC 6455 §5.2).

    A server sends unmasked frames (``mask=None``); a client passes its
    4-byte masking key. The length uses the shortest of the 7, 16 and 64-bit
    forms, as §5.2 requires.
    """
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    length = len(payload)
    if mask is None and length < 126:  # a server's small frame: the hot path
        if first == 0x82:
            return SHORT_BINARY_HEADERS[length] + payload
        if first == 0x81:
            return SHORT_TEXT_HEADERS[length] + payload
        return bytes((first, length)) + payload
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        header = _HEADER_7.pack(first, mask_bit | length)
    elif length < 65536:
        header = _HEADER_16.pack(first, mask_bit | 126, length)
    else:
        header = _HEADER_64.pack(first, mask_bit | 127, length)
    if mask is not None:
        if len(mask) != 4:
            raise ValueError("a masking key is 4 bytes")
        return header + mask + apply_mask(payload, mask)
    return header + payload


def encode_close_payload(code: int | None = None, reason: str = "") -> bytes:
    """The payload of a close frame: a 2-byte code then a UTF-8 reason.

    ``None`` or 1005 give an empty payload. The reason is cut (on a character
    boundary) so that the frame fits the 125-byte control-frame limit.
    """
    if code is None or code == CloseCode.NO_STATUS_RCVD:
        return b""
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} cannot be sent (RFC 6455 §7.4)")
    data = reason.encode("utf-8")
    if len(data) > MAX_CONTROL_PAYLOAD - 2:
        data = data[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + data


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Read the code and reason of a received close frame (RFC 6455 §5.5.1).

    An empty payload means 1005 (no status). Raises :class:`ProtocolError`
    (1002) for a 1-byte payload or a code not allowed on the wire, and
    (1007) for a reason that is not UTF-8.
    """
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD_DATA, "close reason is not valid UTF-8"
        ) from None
    return code, reason
