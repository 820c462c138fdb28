"""Tests for the frame codec of RFC 6455 §5 (``enjent.frames``), socket-free.

Serialization is tested on its own; parsing lives in
:class:`enjent.protocol.ServerProtocol`, so frames built the way a client
builds them (masked) are fed to it and the resulting events checked.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enjent.exceptions import ProtocolError
from enjent.frames import (
    MAX_CONTROL_PAYLOAD,
    CloseCode,
    Opcode,
    encode_close_payload,
    encode_frame,
    is_valid_close_code,
    parse_close_payload,
)
from enjent.protocol import Close, Event, Ping, Pong, ServerProtocol

MASK = bytes.fromhex("37fa213d")  # the masking key of RFC 6455 §5.7
BIG = 1 << 20


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask: bytes = MASK,
) -> bytes:
    """A frame as a client sends it: masked (RFC 6455 §5.3)."""
    return encode_frame(opcode, payload, fin=fin, rsv1=rsv1, mask=mask)


def with_bits(frame: bytes, first_bits: int) -> bytes:
    """``frame`` with extra bits set in its first byte (RSV bits, opcode bits)."""
    return bytes([frame[0] | first_bits]) + frame[1:]


def with_opcode(frame: bytes, opcode: int) -> bytes:
    return bytes([(frame[0] & 0xF0) | opcode]) + frame[1:]


def feed(data: bytes, *, max_message_size: int = 1 << 20) -> tuple[list[Event], ServerProtocol]:
    protocol = ServerProtocol(max_message_size=max_message_size)
    return protocol.receive_data(data), protocol


def assert_failed(events: list[Event], code: int) -> None:
    assert events, "expected a Close event"
    close = events[-1]
    assert isinstance(close, Close)
    assert close.failed
    assert close.code == code


# -- serialization -------------------------------------------------------------


@pytest.mark.parametrize("opcode", list(Opcode))
def test_encode_every_opcode(opcode: Opcode) -> None:
    frame = encode_frame(opcode, b"abc")
    assert frame == bytes([0x80 | opcode, 3]) + b"abc"


def test_encode_not_final_and_rsv1() -> None:
    assert encode_frame(Opcode.TEXT, b"", fin=False)[0] == 0x01
    assert encode_frame(Opcode.TEXT, b"", rsv1=True)[0] == 0xC1


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f" + struct.pack("!Q", 65536)),
        (65537, b"\x82\x7f" + struct.pack("!Q", 65537)),
    ],
)
def test_encode_length_forms(length: int, header: bytes) -> None:
    """RFC 6455 §5.2: the shortest of the 7, 16 and 64-bit length forms."""
    payload = bytes(length)
    assert encode_frame(Opcode.BINARY, payload) == header + payload


@pytest.mark.parametrize("payload_type", [bytes, bytearray, memoryview])
def test_encode_accepts_bytes_like(payload_type: type) -> None:
    frame = encode_frame(Opcode.BINARY, payload_type(b"xyz"))
    assert frame == b"\x82\x03xyz"
    assert encode_frame(Opcode.BINARY, payload_type(b"xyz"), mask=MASK)[:2] == b"\x82\x83"


@pytest.mark.parametrize("mask", [b"", b"abc", b"abcde"])
def test_encode_rejects_bad_mask(mask: bytes) -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(Opcode.TEXT, b"x", mask=mask)


# -- RFC 6455 §5.7 examples ------------------------------------------------------


def test_rfc_single_frame_unmasked_text() -> None:
    assert encode_frame(Opcode.TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")


def test_rfc_single_frame_masked_text() -> None:
    frame = bytes.fromhex("818537fa213d7f9f4d5158")
    assert client_frame(Opcode.TEXT, b"Hello") == frame
    assert feed(frame)[0] == ["Hello"]


def test_rfc_fragmented_unmasked_text() -> None:
    assert encode_frame(Opcode.TEXT, b"Hel", fin=False) == bytes.fromhex("010348656c")
    assert encode_frame(Opcode.CONTINUATION, b"lo") == bytes.fromhex("80026c6f")
    masked = client_frame(Opcode.TEXT, b"Hel", fin=False) + client_frame(Opcode.CONTINUATION, b"lo")
    assert feed(masked)[0] == ["Hello"]


def test_rfc_ping_and_masked_pong() -> None:
    assert encode_frame(Opcode.PING, b"Hello") == bytes.fromhex("890548656c6c6f")
    pong = bytes.fromhex("8a8537fa213d7f9f4d5158")
    assert client_frame(Opcode.PONG, b"Hello") == pong
    assert feed(pong)[0] == [Pong(b"Hello")]


def test_rfc_256_bytes_binary() -> None:
    payload = bytes(range(256))
    frame = encode_frame(Opcode.BINARY, payload)
    assert frame[:4] == bytes.fromhex("827e0100")
    assert feed(client_frame(Opcode.BINARY, payload))[0] == [payload]


def test_rfc_64_kib_binary() -> None:
    payload = bytes(range(256)) * 256
    frame = encode_frame(Opcode.BINARY, payload)
    assert frame[:10] == bytes.fromhex("827f0000000000010000")
    assert feed(client_frame(Opcode.BINARY, payload), max_message_size=BIG)[0] == [payload]


# -- parsing: lengths, masking, opcodes, RSV bits --------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_parse_length_boundaries(length: int, opcode: Opcode) -> None:
    payload = bytes([0x61 + i % 26 for i in range(length)])
    message = payload.decode() if opcode is Opcode.TEXT else payload
    events, protocol = feed(client_frame(opcode, payload), max_message_size=BIG)
    assert events == [message]
    assert protocol.data_to_send() == b""


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG])
@pytest.mark.parametrize("length", [0, 1, 125])
def test_parse_control_frames(opcode: Opcode, length: int) -> None:
    payload = bytes(range(length))
    events, protocol = feed(client_frame(opcode, payload))
    if opcode is Opcode.PING:
        assert events == [Ping(payload)]
        assert protocol.data_to_send() == encode_frame(Opcode.PONG, payload)
    else:
        assert events == [Pong(payload)]
        assert protocol.data_to_send() == b""


@pytest.mark.parametrize("opcode", list(Opcode))
def test_unmasked_client_frame_is_a_protocol_error(opcode: Opcode) -> None:
    """RFC 6455 §5.1: a server fails the connection on an unmasked frame."""
    events, protocol = feed(encode_frame(opcode, b"\x03\xe8" if opcode == Opcode.CLOSE else b""))
    assert_failed(events, CloseCode.PROTOCOL_ERROR)
    assert protocol.data_to_send().startswith(b"\x88")


@pytest.mark.parametrize("length", [0, 200, 70000])
def test_unmasked_frame_rejected_for_every_length_form(length: int) -> None:
    events, _ = feed(encode_frame(Opcode.BINARY, bytes(length)), max_message_size=BIG)
    assert_failed(events, CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes_rejected(opcode: int) -> None:
    """RFC 6455 §5.2: opcodes 3-7 and 0xB-0xF are reserved."""
    events, protocol = feed(with_opcode(client_frame(Opcode.BINARY, b"x"), opcode))
    assert_failed(events, CloseCode.PROTOCOL_ERROR)
    assert protocol.data_to_send() == encode_frame(
        Opcode.CLOSE, encode_close_payload(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
    )


@pytest.mark.parametrize("bits", [0x40, 0x20, 0x10, 0x70])
@pytest.mark.parametrize("opcode", list(Opcode))
def test_rsv_bits_rejected_without_extension(bits: int, opcode: Opcode) -> None:
    """RFC 6455 §5.2: RSV1-3 must be 0 unless an extension defines them."""
    payload = b"\x03\xe8" if opcode == Opcode.CLOSE else b"x"
    frame = with_bits(client_frame(opcode, payload), bits)
    if opcode == Opcode.CONTINUATION:
        frame = client_frame(Opcode.TEXT, b"a", fin=False) + frame
    events, _ = feed(frame)
    assert_failed(events, CloseCode.PROTOCOL_ERROR)


class ReversingExtension:
    """A stand-in for a negotiated extension that owns RSV1."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bool, bool]] = []

    def decode(self, payload: bytes, *, fin: bool, compressed: bool) -> bytes:
        self.calls.append((payload, fin, compressed))
        return payload[::-1]

    def max_message_size_exceeded(self) -> bool:
        return False


def test_rsv1_accepted_with_an_extension() -> None:
    extension = ReversingExtension()
    protocol = ServerProtocol(extension=extension)
    events = protocol.receive_data(client_frame(Opcode.TEXT, b"cba", rsv1=True))
    assert events == ["abc"]
    assert extension.calls == [(b"cba", True, True)]
    # a message without RSV1 is not passed to the extension
    assert protocol.receive_data(client_frame(Opcode.BINARY, b"xy")) == [b"xy"]
    assert len(extension.calls) == 1


def test_rsv1_fragmented_message_with_an_extension() -> None:
    extension = ReversingExtension()
    protocol = ServerProtocol(extension=extension)
    data = client_frame(Opcode.BINARY, b"ba", fin=False, rsv1=True) + client_frame(
        Opcode.CONTINUATION, b"dc"
    )
    assert protocol.receive_data(data) == [b"abcd"]
    assert extension.calls == [(b"ba", False, True), (b"dc", True, True)]


@pytest.mark.parametrize("bits", [0x20, 0x10, 0x60])
def test_rsv2_rsv3_rejected_even_with_an_extension(bits: int) -> None:
    protocol = ServerProtocol(extension=ReversingExtension())
    events = protocol.receive_data(with_bits(client_frame(Opcode.TEXT, b"x"), bits))
    assert_failed(events, CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE, Opcode.CONTINUATION])
def test_rsv1_rejected_on_control_and_continuation_frames_with_an_extension(
    opcode: Opcode,
) -> None:
    protocol = ServerProtocol(extension=ReversingExtension())
    frame = client_frame(opcode, b"\x03\xe8" if opcode == Opcode.CLOSE else b"x", rsv1=True)
    if opcode == Opcode.CONTINUATION:
        frame = client_frame(Opcode.BINARY, b"a", fin=False, rsv1=True) + frame
    assert_failed(protocol.receive_data(frame), CloseCode.PROTOCOL_ERROR)


def test_extension_decode_error_is_invalid_payload() -> None:
    class BrokenExtension(ReversingExtension):
        def decode(self, payload: bytes, *, fin: bool, compressed: bool) -> bytes:
            raise ValueError("bad deflate stream")

    protocol = ServerProtocol(extension=BrokenExtension())
    events = protocol.receive_data(client_frame(Opcode.BINARY, b"x", rsv1=True))
    assert_failed(events, CloseCode.INVALID_PAYLOAD_DATA)


# -- control frames --------------------------------------------------------------


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_control_frame_over_125_bytes_rejected(opcode: Opcode) -> None:
    """RFC 6455 §5.5: control frames carry at most 125 bytes."""
    payload = b"\x03\xe8" + b"r" * (MAX_CONTROL_PAYLOAD - 1)
    events, _ = feed(client_frame(opcode, payload))
    assert_failed(events, CloseCode.PROTOCOL_ERROR)


def test_control_frame_length_decided_from_header() -> None:
    header = client_frame(Opcode.PING, bytes(126))[:8]  # header and mask, no payload
    assert_failed(feed(header)[0], CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_fragmented_control_frame_rejected(opcode: Opcode) -> None:
    """RFC 6455 §5.5: control frames must not be fragmented."""
    events, _ = feed(client_frame(opcode, b"", fin=False))
    assert_failed(events, CloseCode.PROTOCOL_ERROR)


def test_64_bit_length_with_msb_set_rejected() -> None:
    """RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0."""
    header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + MASK
    events, _ = feed(header, max_message_size=1 << 62)
    assert_failed(events, CloseCode.PROTOCOL_ERROR)
    # without the mask: the length alone decides
    assert_failed(feed(header[:10])[0], CloseCode.PROTOCOL_ERROR)


# -- close payloads (RFC 6455 §5.5.1, §7.4) ---------------------------------------


def test_encode_close_payload() -> None:
    assert encode_close_payload() == b""
    assert encode_close_payload(CloseCode.NO_STATUS_RCVD) == b""
    assert encode_close_payload(1000) == b"\x03\xe8"
    assert encode_close_payload(CloseCode.GOING_AWAY, "bye") == b"\x03\xe9bye"
    assert encode_close_payload(4000, "é") == b"\x0f\xa0\xc3\xa9"


@pytest.mark.parametrize("code", [0, 999, 1004, 1006, 1015, 1016, 2999, 5000])
def test_encode_close_payload_refuses_codes_not_for_the_wire(code: int) -> None:
    with pytest.raises(ValueError):
        encode_close_payload(code)


def test_encode_close_payload_cuts_long_reason_on_a_character_boundary() -> None:
    payload = encode_close_payload(1000, "é" * 100)  # 200 bytes of reason
    assert len(payload) <= MAX_CONTROL_PAYLOAD
    assert payload[2:].decode("utf-8") == "é" * 61  # 122 bytes, the 123rd would split


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999],
)
def test_valid_close_codes(code: int) -> None:
    assert is_valid_close_code(code)
    assert parse_close_payload(code.to_bytes(2, "big") + b"why") == (code, "why")


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_invalid_close_codes(code: int) -> None:
    assert not is_valid_close_code(code)
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(code.to_bytes(2, "big"))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


def test_parse_close_payload_edge_cases() -> None:
    assert parse_close_payload(b"") == (CloseCode.NO_STATUS_RCVD, "")
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03")
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03\xe8\xff")
    assert info.value.close_code == CloseCode.INVALID_PAYLOAD_DATA


# -- properties --------------------------------------------------------------------

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fragmented_messages(draw: st.DrawFn) -> tuple[str | bytes, list[bytes], bytes]:
    """A message, the fragments it is sent as, and the masked wire bytes."""
    if draw(st.booleans()):
        message: str | bytes = draw(st.text(max_size=300))
        payload = message.encode("utf-8")  # type: ignore[union-attr]
        opcode = Opcode.TEXT
    else:
        message = payload = draw(st.binary(max_size=300))
        opcode = Opcode.BINARY
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=5)))
    bounds = [0, *cuts, len(payload)]
    pieces = [payload[start:stop] for start, stop in itertools.pairwise(bounds)]
    wire = b""
    for index, piece in enumerate(pieces):
        wire += client_frame(
            opcode if index == 0 else Opcode.CONTINUATION,
            piece,
            fin=index == len(pieces) - 1,
            mask=draw(st.binary(min_size=4, max_size=4)),
        )
    return message, pieces, wire


@BOUNDED
@given(case=fragmented_messages(), chunk=st.integers(1, 64))
def test_round_trip_data_messages(case: tuple[str | bytes, list[bytes], bytes], chunk: int) -> None:
    """parse(serialize(message)) == message, however fragmented and chunked."""
    message, _, wire = case
    protocol = ServerProtocol()
    events: list[Event] = []
    for start in range(0, len(wire), chunk):
        events += protocol.receive_data(wire[start : start + chunk])
    assert events == [message]
    assert protocol.data_to_send() == b""


@BOUNDED
@given(
    opcode=st.sampled_from([Opcode.PING, Opcode.PONG]),
    payload=st.binary(max_size=MAX_CONTROL_PAYLOAD),
    mask=st.binary(min_size=4, max_size=4),
)
def test_round_trip_ping_pong(opcode: Opcode, payload: bytes, mask: bytes) -> None:
    events, _ = feed(client_frame(opcode, payload, mask=mask))
    assert events == [Ping(payload) if opcode == Opcode.PING else Pong(payload)]


@BOUNDED
@given(
    code=st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011])
    | st.integers(3000, 4999),
    reason=st.text(max_size=200),
    mask=st.binary(min_size=4, max_size=4),
)
def test_round_trip_close(code: int, reason: str, mask: bytes) -> None:
    payload = encode_close_payload(code, reason)
    assert len(payload) <= MAX_CONTROL_PAYLOAD
    parsed_code, parsed_reason = parse_close_payload(payload)
    assert parsed_code == code
    assert reason.startswith(parsed_reason)
    events, protocol = feed(client_frame(Opcode.CLOSE, payload, mask=mask))
    assert events == [Close(code, parsed_reason)]
    # echoed: the peer's code and (validated) reason
    assert protocol.data_to_send() == encode_frame(Opcode.CLOSE, payload)
