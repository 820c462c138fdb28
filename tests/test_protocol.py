"""Tests for the per-connection state machine (``enjent.protocol``), socket-free.

Bytes in, events and bytes out: fragmentation, control frames, UTF-8
validation, the close handshake (RFC 6455 §5-§7) and the message size limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsutil import parse_server_frames

from enjent.frames import CloseCode, Opcode, encode_close_payload, encode_frame
from enjent.protocol import Close, Event, Ping, Pong, ServerProtocol, State

MASK = b"\x9a\x0b\xc4\x71"


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A frame as a client sends it: masked (RFC 6455 §5.3)."""
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def text(payload: str | bytes, *, fin: bool = True) -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return client_frame(Opcode.TEXT, data, fin=fin)


def binary(payload: bytes, *, fin: bool = True) -> bytes:
    return client_frame(Opcode.BINARY, payload, fin=fin)


def cont(payload: str | bytes, *, fin: bool = True) -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return client_frame(Opcode.CONTINUATION, data, fin=fin)


def ping(payload: bytes = b"") -> bytes:
    return client_frame(Opcode.PING, payload)


def close(code: int | None = None, reason: str = "") -> bytes:
    return client_frame(Opcode.CLOSE, encode_close_payload(code, reason))


def raw_close(payload: bytes) -> bytes:
    return client_frame(Opcode.CLOSE, payload)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the server wrote into (opcode, payload); all must be final, unmasked."""
    return parse_server_frames(data, strict=True)


def close_frame(code: int | None = None, reason: str = "") -> tuple[int, bytes]:
    return (Opcode.CLOSE, encode_close_payload(code, reason))


def feed(
    chunks: Iterable[bytes], protocol: ServerProtocol | None = None
) -> tuple[list[Event], ServerProtocol]:
    protocol = protocol or ServerProtocol()
    events: list[Event] = []
    for chunk in chunks:
        events += protocol.receive_data(chunk)
    return events, protocol


def failed_with(events: list[Event], code: int) -> bool:
    last = events[-1] if events else None
    return isinstance(last, Close) and last.failed and last.code == code


# -- messages and fragmentation ----------------------------------------------------


def test_text_and_binary_messages() -> None:
    events, protocol = feed([text("héllo") + binary(b"\x00\xff") + text("")])
    assert events == ["héllo", b"\x00\xff", ""]
    assert protocol.state is State.OPEN
    assert protocol.data_to_send() == b""


def test_fragmented_message_with_control_frames_interleaved() -> None:
    """RFC 6455 §5.4: control frames may come between the fragments of a message."""
    data = (
        text("Hel", fin=False)
        + ping(b"p1")
        + cont("l", fin=False)
        + client_frame(Opcode.PONG, b"q")
        + ping(b"p2")
        + cont("o")
    )
    events, protocol = feed([data])
    assert events == [Ping(b"p1"), Pong(b"q"), Ping(b"p2"), "Hello"]
    assert server_frames(protocol.data_to_send()) == [(Opcode.PONG, b"p1"), (Opcode.PONG, b"p2")]


def test_fragmented_binary_message() -> None:
    data = binary(b"ab", fin=False) + cont(b"", fin=False) + cont(b"cd")
    assert feed([data])[0] == [b"abcd"]


def test_many_fragmented_messages_in_a_row() -> None:
    data = (text("a", fin=False) + cont("b")) * 3 + binary(b"x", fin=False) + cont(b"y")
    assert feed([data])[0] == ["ab", "ab", "ab", b"xy"]


def test_continuation_without_a_message_is_a_protocol_error() -> None:
    events, _ = feed([cont("x")])
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_new_message_inside_a_fragmented_message_is_a_protocol_error(opcode: Opcode) -> None:
    events, _ = feed([text("a", fin=False) + client_frame(opcode, b"b")])
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)


# -- UTF-8 (RFC 6455 §8.1) ------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"caf\xc3", b"\x80"],
)
def test_invalid_utf8_text_message(payload: bytes) -> None:
    events, protocol = feed([text(payload)])
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)
    assert server_frames(protocol.data_to_send()) == [
        close_frame(CloseCode.INVALID_PAYLOAD_DATA, "text message is not valid UTF-8")
    ]


def test_utf8_character_split_across_fragments() -> None:
    euro = "€".encode()
    data = text(euro[:1], fin=False) + cont(euro[1:2], fin=False) + cont(euro[2:])
    assert feed([data])[0] == ["€"]


def test_incomplete_utf8_at_the_end_of_a_fragmented_message() -> None:
    events, _ = feed([text("a", fin=False) + cont(b"\xe2\x82")])
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


@pytest.mark.parametrize(
    "invalid",
    [b"\xff", b"\xf4\x90", b"\xc0", b"\xed\xa0", b"\xed\xbf", b"\xe0\x80", b"\x80"],
)
def test_invalid_utf8_fails_before_the_final_fragment(invalid: bytes) -> None:
    """Fail fast (RFC 6455 §8.1): the invalid fragment closes with 1007 at once."""
    protocol = ServerProtocol()
    assert protocol.receive_data(text("κόσμε", fin=False)) == []
    events = protocol.receive_data(cont(b"ok" + invalid, fin=False))
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)
    assert protocol.state is State.CLOSED
    assert protocol.receive_data(cont("rest")) == []


def test_invalid_utf8_in_the_first_fragment() -> None:
    events, _ = feed([text(b"\xce\xba\xff", fin=False)])
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


def test_surrogate_prefix_split_across_fragments_fails_fast() -> None:
    """``ED A0`` can only start a UTF-16 surrogate: invalid before its third byte."""
    protocol = ServerProtocol()
    assert protocol.receive_data(text(b"\xed", fin=False)) == []  # ED 80-9F is valid
    events = protocol.receive_data(cont(b"\xa0", fin=False))
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


def test_valid_ed_prefix_is_not_rejected() -> None:
    """``ED 9F BF`` (U+D7FF) is the last valid code point before the surrogates."""
    data = text(b"\xed", fin=False) + cont(b"\x9f", fin=False) + cont(b"\xbf")
    assert feed([data])[0] == ["\ud7ff"]


# -- ping / pong --------------------------------------------------------------------------


def test_ping_is_answered_with_the_same_payload() -> None:
    payload = bytes(range(125))
    events, protocol = feed([ping(payload)])
    assert events == [Ping(payload)]
    assert protocol.data_to_send() == encode_frame(Opcode.PONG, payload)
    assert protocol.data_to_send() == b""


def test_pongs_in_order_of_pings() -> None:
    events, protocol = feed([ping(b"1") + ping(b"") + ping(b"3")])
    assert events == [Ping(b"1"), Ping(b""), Ping(b"3")]
    assert server_frames(protocol.data_to_send()) == [
        (Opcode.PONG, b"1"),
        (Opcode.PONG, b""),
        (Opcode.PONG, b"3"),
    ]


def test_unsolicited_pong_is_an_event_without_answer() -> None:
    events, protocol = feed([client_frame(Opcode.PONG, b"hb")])
    assert events == [Pong(b"hb")]
    assert protocol.data_to_send() == b""


# -- the close handshake (RFC 6455 §5.5.1, §7) ----------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4000, 4999])
def test_peer_close_is_echoed(code: int) -> None:
    events, protocol = feed([close(code, "bye")])
    assert events == [Close(code, "bye")]
    assert protocol.state is State.CLOSED
    assert protocol.is_closed()
    assert (protocol.close_code, protocol.close_reason) == (code, "bye")
    # the reply echoes the peer's code and reason (as websockets does)
    assert server_frames(protocol.data_to_send()) == [close_frame(code, "bye")]


def test_empty_close_gives_1005_and_an_empty_reply() -> None:
    events, protocol = feed([raw_close(b"")])
    assert events == [Close(CloseCode.NO_STATUS_RCVD, "")]
    assert protocol.data_to_send() == b"\x88\x00"


def test_close_with_a_one_byte_payload() -> None:
    events, protocol = feed([raw_close(b"\x03")])
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)
    assert server_frames(protocol.data_to_send())[0][1][:2] == b"\x03\xea"


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999, 5000, 65535])
def test_close_with_an_invalid_code(code: int) -> None:
    events, protocol = feed([raw_close(code.to_bytes(2, "big") + b"why")])
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)
    assert server_frames(protocol.data_to_send())[0][1][:2] == b"\x03\xea"


def test_close_with_an_invalid_utf8_reason() -> None:
    events, protocol = feed([raw_close(b"\x03\xe8\xce\xba\xff")])
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)
    assert server_frames(protocol.data_to_send())[0][1][:2] == b"\x03\xef"


def test_close_with_a_125_byte_payload() -> None:
    reason = "r" * 123
    events, _ = feed([close(1000, reason)])
    assert events == [Close(1000, reason)]


def test_data_after_a_close_is_ignored() -> None:
    events, protocol = feed([close(1000) + text("late") + ping(b"late")])
    assert events == [Close(1000, "")]
    assert protocol.receive_data(text("later")) == []
    assert protocol.receive_data(b"\xff\xff\xff garbage") == []
    assert server_frames(protocol.data_to_send()) == [close_frame(1000)]
    assert protocol.data_to_send() == b""


def test_close_during_a_fragmented_message() -> None:
    events, protocol = feed([text("part", fin=False) + close(1001)])
    assert events == [Close(1001, "")]
    assert server_frames(protocol.data_to_send()) == [close_frame(1001)]


def test_server_initiated_close() -> None:
    protocol = ServerProtocol()
    protocol.close(CloseCode.GOING_AWAY, "restart")
    assert protocol.state is State.CLOSING
    assert server_frames(protocol.data_to_send()) == [close_frame(1001, "restart")]
    protocol.close(1000)  # idempotent
    assert protocol.data_to_send() == b""
    # messages still arrive while the peer has not answered (RFC 6455 §7.1.2)
    assert protocol.receive_data(text("in flight")) == ["in flight"]
    events = protocol.receive_data(close(1001))
    assert events == [Close(1001, "")]
    assert protocol.is_closed()
    assert protocol.data_to_send() == b""  # the handshake is over: no second close frame


def test_server_close_then_protocol_error_sends_no_second_close() -> None:
    protocol = ServerProtocol()
    protocol.close()
    protocol.data_to_send()
    events = protocol.receive_data(b"\x81\x00")  # unmasked
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)
    assert protocol.state is State.CLOSED
    assert protocol.data_to_send() == b""


def test_no_pong_once_our_close_is_sent() -> None:
    protocol = ServerProtocol()
    protocol.close()
    protocol.data_to_send()
    assert protocol.receive_data(ping(b"x")) == [Ping(b"x")]
    assert protocol.data_to_send() == b""


def test_fail_closes_at_once() -> None:
    protocol = ServerProtocol()
    event = protocol.fail(CloseCode.POLICY_VIOLATION, "timeout")
    assert event == Close(CloseCode.POLICY_VIOLATION, "timeout", failed=True)
    assert protocol.is_closed()
    assert server_frames(protocol.data_to_send()) == [close_frame(1008, "timeout")]
    assert protocol.receive_data(text("x")) == []


# -- errors in the middle of a read ------------------------------------------------------


def test_messages_before_a_protocol_error_are_delivered_and_the_close_comes_last() -> None:
    protocol = ServerProtocol()
    data = text("one") + ping(b"pp") + binary(b"two") + b"\x81\x03abc" + text("never")
    events = protocol.receive_data(data)
    assert events[:3] == ["one", Ping(b"pp"), b"two"]
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)
    assert len(events) == 4
    assert protocol.closing_read
    # an answer queued by the I/O layer after the read still precedes the close
    protocol.queue_frame(encode_frame(Opcode.TEXT, b"echo"))
    frames = server_frames(protocol.data_to_send())
    assert frames == [
        (Opcode.PONG, b"pp"),
        (Opcode.TEXT, b"echo"),
        close_frame(CloseCode.PROTOCOL_ERROR, "client frames must be masked"),
    ]
    assert not protocol.closing_read


# -- message size limit ---------------------------------------------------------------------


def test_message_at_the_limit_is_accepted() -> None:
    protocol = ServerProtocol(max_message_size=100)
    assert protocol.receive_data(binary(bytes(100))) == [bytes(100)]
    data = binary(bytes(50), fin=False) + cont(bytes(50))
    assert protocol.receive_data(data) == [bytes(100)]


@pytest.mark.parametrize("length", [101, 200, 70000, 1 << 40])
def test_oversize_message_closed_from_the_header(length: int) -> None:
    """1009 as soon as the header tells the length; the payload never arrives."""
    protocol = ServerProtocol(max_message_size=100)
    if length < 126:
        header = bytes([0x82, 0x80 | length])
    elif length < 65536:
        header = bytes([0x82, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big")
    events = protocol.receive_data(header + MASK)
    assert failed_with(events, CloseCode.MESSAGE_TOO_BIG)
    assert server_frames(protocol.data_to_send())[0][1][:2] == b"\x03\xf1"


def test_oversize_decided_before_the_mask_arrives() -> None:
    protocol = ServerProtocol(max_message_size=100)
    assert protocol.receive_data(b"\x82\xff") == []
    events = protocol.receive_data((1 << 32).to_bytes(8, "big"))
    assert failed_with(events, CloseCode.MESSAGE_TOO_BIG)


def test_oversize_across_fragments() -> None:
    protocol = ServerProtocol(max_message_size=100)
    assert protocol.receive_data(text("a" * 60, fin=False)) == []
    assert protocol.receive_data(ping()) == [Ping(b"")]
    events = protocol.receive_data(cont("b" * 41)[:6])  # header and mask only
    assert failed_with(events, CloseCode.MESSAGE_TOO_BIG)


def test_limit_is_per_message() -> None:
    protocol = ServerProtocol(max_message_size=100)
    data = (binary(bytes(60), fin=False) + cont(bytes(40))) * 3
    assert protocol.receive_data(data) == [bytes(100)] * 3


# -- chunking ----------------------------------------------------------------------------------

STREAM = (
    text("héllo")
    + text("frag-", fin=False)
    + ping(b"in the middle")
    + cont("ment-", fin=False)
    + cont("€".encode()[:1], fin=False)
    + cont("€".encode()[1:])
    + binary(bytes(range(256)) * 2)
    + client_frame(Opcode.PONG, b"")
    + binary(b"", fin=False)
    + cont(b"z")
    + close(1000, "done")
)
STREAM_EVENTS: list[Event] = [
    "héllo",
    Ping(b"in the middle"),
    "frag-ment-€",
    bytes(range(256)) * 2,
    Pong(b""),
    b"z",
    Close(1000, "done"),
]


def test_stream_all_at_once() -> None:
    events, protocol = feed([STREAM])
    assert events == STREAM_EVENTS
    assert server_frames(protocol.data_to_send()) == [
        (Opcode.PONG, b"in the middle"),
        close_frame(1000, "done"),
    ]


def test_stream_byte_by_byte() -> None:
    events, protocol = feed(STREAM[i : i + 1] for i in range(len(STREAM)))
    assert events == STREAM_EVENTS
    assert server_frames(protocol.data_to_send()) == [
        (Opcode.PONG, b"in the middle"),
        close_frame(1000, "done"),
    ]


def test_stream_split_at_every_boundary() -> None:
    expected_output = ServerProtocol()
    expected_output.receive_data(STREAM)
    output = expected_output.data_to_send()
    for cut in range(len(STREAM) + 1):
        events, protocol = feed([STREAM[:cut], STREAM[cut:]])
        assert events == STREAM_EVENTS, cut
        assert protocol.data_to_send() == output, cut


def test_protocol_error_split_at_every_boundary() -> None:
    data = text("ok") + text("a", fin=False) + cont(b"\xff")
    for cut in range(len(data) + 1):
        events, _ = feed([data[:cut], data[cut:]])
        assert events[0] == "ok"
        assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA), cut


def test_empty_reads() -> None:
    events, _ = feed([b"", text("x")[:3], b"", text("x")[3:], b""])
    assert events == ["x"]


# -- properties ------------------------------------------------------------------------------

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Frames with arbitrary header bits and lengths: mostly masked, some wrong."""
    data = b""
    for _ in range(draw(st.integers(0, 6))):
        first = draw(st.integers(0, 255))
        payload = draw(st.binary(max_size=140))
        masked = draw(st.integers(0, 9)) > 0
        frame = encode_frame(
            first & 0x0F, payload, fin=bool(first & 0x80), mask=MASK if masked else None
        )
        frame = bytes([first]) + frame[1:]
        if draw(st.integers(0, 9)) == 0:
            frame = frame[: draw(st.integers(0, len(frame)))]
        data += frame
    return data + draw(st.binary(max_size=20))


def check_invariants(events: list[Event], protocol: ServerProtocol) -> None:
    closes = [index for index, event in enumerate(events) if isinstance(event, Close)]
    assert closes in ([], [len(events) - 1]), "at most one Close, and it comes last"
    for event in events:
        assert isinstance(event, str | bytes | Ping | Pong | Close)
    output = protocol.data_to_send()
    if closes:
        assert protocol.state is State.CLOSED
        frames = server_frames(output)
        assert frames[-1][0] == Opcode.CLOSE
        assert all(opcode == Opcode.PONG for opcode, _ in frames[:-1])
    else:
        assert all(opcode == Opcode.PONG for opcode, _ in server_frames(output))


@BOUNDED
@given(data=st.data(), payload=st.binary(max_size=600) | frame_soup())
def test_arbitrary_bytes_never_raise(data: st.DataObject, payload: bytes) -> None:
    chunks = data.draw(chunked(payload), label="chunks")
    protocol = ServerProtocol(max_message_size=data.draw(st.sampled_from([64, 1 << 20])))
    events, _ = feed(chunks, protocol)
    check_invariants(events, protocol)


@BOUNDED
@given(data=st.data(), payload=frame_soup())
def test_chunking_never_changes_the_events(data: st.DataObject, payload: bytes) -> None:
    whole_events, whole = feed([payload])
    whole_output = whole.data_to_send()
    chunks = data.draw(chunked(payload), label="chunks")
    events, protocol = feed(chunks)
    assert events == whole_events
    assert protocol.data_to_send() == whole_output


# -- UTF-8 checked while a text frame is still arriving (RFC 6455 §8.1) ------------


@pytest.mark.parametrize("split", [0, 3, 7, 8, 9, 10, 11])
def test_invalid_utf8_fails_inside_a_frame_that_is_still_arriving(split: int) -> None:
    """The invalid byte fails the connection before the rest of the frame is sent."""
    good = "κόσμε".encode()
    frame = text(good + b"\xf4\x90\x80\x80" + b"a" * 100)
    protocol = ServerProtocol()
    header = 6  # 7-bit length + masking key
    assert protocol.receive_data(frame[: header + split]) == []
    events = protocol.receive_data(frame[header + split : header + len(good) + 2])
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)
    assert server_frames(protocol.data_to_send())[0][1][:2] == b"\x03\xef"  # 1007
    assert protocol.receive_data(frame[header + len(good) + 2 :]) == []


def test_valid_utf8_arriving_byte_by_byte_gives_one_message() -> None:
    """Each read checks only its new bytes, with the masking key rotated to match."""
    message = "héllo wörld, ☃ and 𝄞 " * 20
    frame = text(message)
    events, protocol = feed(frame[i : i + 1] for i in range(len(frame)))
    assert events == [message]
    assert protocol.state is State.OPEN


def test_invalid_utf8_in_a_partial_continuation_frame_fails_early() -> None:
    """The decoder's state carries over from the message's earlier fragments."""
    first = text(b"\xe2\x82", fin=False)  # the first two bytes of "€"
    rest = cont(b"\x28" + b"b" * 200)  # not a continuation byte: invalid
    protocol = ServerProtocol()
    assert protocol.receive_data(first) == []
    events = protocol.receive_data(rest[:9])  # header, key and the bad byte only
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


def test_a_partial_continuation_completing_a_character_is_fine() -> None:
    first = text(b"\xe2\x82", fin=False)
    rest = cont(b"\xac" + b"b" * 200)
    events, _ = feed([first, rest[:9], rest[9:50], rest[50:]])
    assert events == ["€" + "b" * 200]


@pytest.mark.parametrize("first_read", [1, 2, 4, 5])
def test_partial_check_starts_once_the_header_is_complete(first_read: int) -> None:
    """A header split over reads: the frame is checked once its masking key is here."""
    frame = text(b"ok" + b"\xc0\xaf" + b"z" * 300)  # 16-bit length: an 8-byte header
    protocol = ServerProtocol()
    assert protocol.receive_data(frame[:first_read]) == []
    assert protocol.receive_data(frame[first_read:9]) == []
    events = protocol.receive_data(frame[9:12])  # the invalid bytes, 300 bytes still to come
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


# ---------------------------------------------------- hostile input (bounds)


@pytest.mark.parametrize(
    ("header", "length"),
    [
        (b"\x82\xfe\x00\x05", 5),
        (b"\x82\xfe\x00\x7d", 125),
        (b"\x82\xff" + (300).to_bytes(8, "big"), 300),
    ],
)
def test_non_minimal_length_encodings_fail_with_1002(header: bytes, length: int) -> None:
    """RFC 6455 §5.2: the minimal number of bytes MUST be used to encode the length."""
    events, protocol = feed([header + MASK + bytes(length)])
    assert failed_with(events, CloseCode.PROTOCOL_ERROR)
    assert "non-minimal" in protocol.close_reason


def test_minimal_length_encodings_at_the_boundaries_are_accepted() -> None:
    for length in (125, 126, 65535, 65536):
        events, _ = feed([binary(bytes(length))], ServerProtocol(max_message_size=1 << 17))
        assert events == [bytes(length)]


def test_a_message_of_tiny_fragments_is_held_in_one_buffer() -> None:
    """100,000 one-byte fragments cost about 100 KB, not a list of 100,000 objects."""
    protocol = ServerProtocol()
    protocol.receive_data(text("a", fin=False))
    one = cont("b", fin=False)
    for _ in range(10):
        assert protocol.receive_data(one * 10_000) == []
    events = protocol.receive_data(cont("c"))
    assert events == ["a" + "b" * 100_000 + "c"]


def test_invalid_utf8_in_a_fragment_still_fails_fast() -> None:
    protocol = ServerProtocol()
    assert protocol.receive_data(text("ok", fin=False)) == []
    events = protocol.receive_data(cont(b"\xff", fin=False))
    assert failed_with(events, CloseCode.INVALID_PAYLOAD_DATA)


def test_the_core_decides_when_to_half_close_and_what_a_lost_transport_means() -> None:
    protocol = ServerProtocol()
    assert not protocol.should_half_close()  # open
    events = protocol.receive_data(close(1000, "bye"))
    assert events == [Close(1000, "bye")]
    assert not protocol.should_half_close()  # our close frame is not out yet
    assert server_frames(protocol.data_to_send()) == [close_frame(1000, "bye")]
    assert protocol.should_half_close()  # now, once
    assert not protocol.should_half_close()
    lost = ServerProtocol()
    lost.transport_lost()
    assert lost.close_code == CloseCode.ABNORMAL_CLOSURE  # 1006: no close frame either way
    assert not lost.should_half_close()
    ours = ServerProtocol()
    ours.close(1001, "going")
    ours.transport_lost()
    assert ours.close_code == 1001  # a close we started keeps our code


# ------------------------------------------------------ large messages: no copy


def test_a_large_bytes_payload_is_written_next_to_its_header_not_copied() -> None:
    from enjent.protocol import ZERO_COPY_MIN

    protocol = ServerProtocol()
    payload = bytes(range(256)) * (ZERO_COPY_MIN // 256 + 1)
    header, body = protocol.message_chunks(payload)
    assert body is payload  # the caller's immutable bytes, as they are
    assert header + body == encode_frame(Opcode.BINARY, payload)
    # a mutable buffer is copied once, now: changing it later changes nothing
    buffer = bytearray(payload)
    header, body = protocol.message_chunks(buffer)
    assert type(body) is bytes and body == payload
    buffer[0] ^= 0xFF
    assert body == payload
    # text is encoded, small messages stay one frame
    text_header, text_body = protocol.message_chunks("é" * ZERO_COPY_MIN)
    assert text_header + text_body == encode_frame(Opcode.TEXT, ("é" * ZERO_COPY_MIN).encode())
    assert protocol.message_chunks(b"small") == (encode_frame(Opcode.BINARY, b"small"),)
    assert protocol.encode_message(payload) == encode_frame(Opcode.BINARY, payload)


class _Text(str):
    pass


class _Blob(bytes):
    pass


@pytest.mark.parametrize("length", [*range(0, 131), 1000, 65535, 65536])
def test_every_message_type_and_small_length_encodes_to_the_frame_rfc_6455_describes(
    length: int,
) -> None:
    """The frame ``send`` writes, checked against the header built here byte by byte.

    Small frames take a header made once per length (0-125), larger ones
    the 16- and 64-bit forms; str (and its subclasses) is text, every
    bytes-like object binary.
    """
    protocol = ServerProtocol()

    def expected(first: int, payload: bytes) -> bytes:
        if len(payload) < 126:
            header = bytes([first, len(payload)])
        elif len(payload) < 65536:
            header = bytes([first, 126]) + len(payload).to_bytes(2, "big")
        else:
            header = bytes([first, 127]) + len(payload).to_bytes(8, "big")
        return header + payload

    data = bytes(i % 251 for i in range(length))
    text = "a" * length
    for message, first, payload in [
        (data, 0x82, data),
        (bytearray(data), 0x82, data),
        (memoryview(data), 0x82, data),
        (_Blob(data), 0x82, data),
        (text, 0x81, text.encode()),
        (_Text(text), 0x81, text.encode()),
    ]:
        assert protocol.encode_message(message) == expected(first, payload), type(message)
    with pytest.raises(TypeError, match="str or bytes, not int"):
        protocol.encode_message(5)  # type: ignore[arg-type]


def test_large_and_small_answers_of_one_read_keep_their_order() -> None:
    """Queued during a read, written as buffers (vectored) or joined: the same bytes in order."""
    import asyncio

    from enjent import WebSocketServer

    sizes = [5, 70_000, 3, 20_000, 17, 200_000, 1]

    async def main() -> None:
        server = WebSocketServer(ping_interval=None, compression=None, max_message_size=1 << 22)

        @server.on_message
        def answer(client: Any, message: Any) -> None:
            for index, size in enumerate(sizes):
                client.send(bytes([index]) * size)

        await server.start("127.0.0.1", 0)
        try:
            from websockets.asyncio.client import connect

            async with connect(f"ws://127.0.0.1:{server.port}/", max_size=None) as ws:
                for _ in range(3):
                    await ws.send("go")
                    for index, size in enumerate(sizes):
                        message = await asyncio.wait_for(ws.recv(), 5)
                        assert message == bytes([index]) * size
        finally:
            await server.stop()

    asyncio.run(main())
