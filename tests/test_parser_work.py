"""The parser's work stays linear in the bytes, however reads fall against frames.

The large-message issue: a frame that straddles reads must not be re-buffered
and copied on every read (the slow mode, quadratic in the frame's size). Here
the same stream of frames (small, 16-bit and 64-bit lengths, text and binary,
fragments) is fed cut in every pattern below, and every byte the parser copies
is counted: bytes put into its buffers (its ``bytearray``: the straddle
buffer and a fragmented message's one buffer) and bytes unmasked
(``apply_mask``: the payload, and a text frame's bytes checked as they
arrive). By design that is at most about 2.2 copies per byte: once into the
straddle buffer, once unmasked, once more for fragments and for text still
in flight. The bound is 2.5 copies per byte fed, plus a constant per read,
for every pattern (a quadratic parser copies 30 times that on 200 KB); the events
must be the same as when the stream comes in one piece.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

import enjent.protocol as protocol_module
from enjent.frames import Opcode, encode_frame
from enjent.protocol import ServerProtocol

MASK = b"\x9a\x37\x01\xfe"


def _stream() -> bytes:
    rng = random.Random(6455)
    frames = [
        encode_frame(Opcode.BINARY, rng.randbytes(70_000), mask=MASK),  # 64-bit length
        encode_frame(Opcode.TEXT, b"small", mask=MASK),
        encode_frame(Opcode.BINARY, rng.randbytes(20_000), mask=MASK),  # 16-bit length
        encode_frame(Opcode.TEXT, ("é" * 9000).encode(), mask=MASK),  # text, checked as it comes
        encode_frame(Opcode.BINARY, rng.randbytes(3_000), fin=False, mask=MASK),
        encode_frame(Opcode.CONTINUATION, rng.randbytes(40_000), fin=False, mask=MASK),
        encode_frame(Opcode.CONTINUATION, rng.randbytes(5), mask=MASK),
        encode_frame(Opcode.PING, b"p", mask=MASK),
        encode_frame(Opcode.BINARY, rng.randbytes(131_072), mask=MASK),
    ]
    return b"".join(frames)


STREAM = _stream()


class Counted:
    """Bytes copied by the parser: into its buffers, and by unmasking."""

    def __init__(self) -> None:
        self.copied = 0


def _counting(monkeypatch: pytest.MonkeyPatch) -> Counted:
    counted = Counted()
    real_mask = protocol_module.apply_mask

    class CountingBytearray(bytearray):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            if args and not isinstance(args[0], int):  # bytearray(n) zeroes, copies nothing
                counted.copied += len(self)

        def __iadd__(self, other: Any) -> CountingBytearray:
            counted.copied += len(other)
            return super().__iadd__(other)  # type: ignore[return-value]

        def __setitem__(self, index: Any, value: Any) -> None:
            if isinstance(index, slice):  # filling a buffer made for a whole frame
                counted.copied += len(value)
            super().__setitem__(index, value)

    def counting_mask(data: Any, mask: bytes) -> bytes:
        counted.copied += len(data)
        return real_mask(data, mask)

    # the module's own names: what the parser calls
    monkeypatch.setattr(protocol_module, "bytearray", CountingBytearray, raising=False)
    monkeypatch.setattr(protocol_module, "apply_mask", counting_mask)
    return counted


def _cuts() -> Iterator[tuple[str, list[int]]]:
    """Read sizes, as patterns: fixed sizes, growing, alternating, random, byte by byte."""
    for size in (1, 2, 3, 7, 126, 1000, 4095, 4096, 16_383, 65_536, 65_537, 262_144):
        yield f"fixed {size}", [size]
    yield "growing", list(range(1, 3000))
    yield "alternating", [1, 65_535, 2, 16_000, 9]
    for seed in range(4):
        rng = random.Random(seed)
        yield f"random {seed}", [rng.randint(1, 70_000) for _ in range(200)]


def _feed(sizes: list[int]) -> tuple[list[Any], int]:
    parser = ServerProtocol(max_message_size=1 << 20)
    events: list[Any] = []
    position, index, reads = 0, 0, 0
    while position < len(STREAM):
        size = sizes[index % len(sizes)]
        index += 1
        events += parser.receive_data(STREAM[position : position + size])
        position += size
        reads += 1
    return events, reads


def test_the_whole_stream_in_one_read_copies_each_byte_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted = _counting(monkeypatch)
    parser = ServerProtocol(max_message_size=1 << 20)
    events = parser.receive_data(STREAM)
    assert len(events) == 7  # 6 messages and a ping
    # unmasking, plus the fragments' one buffer (43,005 bytes), and nothing else
    assert counted.copied <= len(STREAM) + 43_005 + 64, counted.copied


@pytest.mark.parametrize(("name", "sizes"), list(_cuts()), ids=[name for name, _ in _cuts()])
def test_work_stays_linear_however_reads_fall(
    monkeypatch: pytest.MonkeyPatch, name: str, sizes: list[int]
) -> None:
    expected = ServerProtocol(max_message_size=1 << 20).receive_data(STREAM)
    counted = _counting(monkeypatch)
    events, reads = _feed(sizes)
    assert events == expected, name
    bound = 2.5 * len(STREAM) + 16 * reads
    assert counted.copied <= bound, f"{name}: {counted.copied} bytes copied for {len(STREAM)}"


def test_the_counter_sees_a_quadratic_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure can fail: a parser that re-buffers everything on each read blows the bound."""
    counted = _counting(monkeypatch)
    buffer = protocol_module.bytearray()  # type: ignore[attr-defined]
    for start in range(0, 200_000, 1000):  # what the slow mode did: keep, join, copy again
        buffer = protocol_module.bytearray(buffer)  # type: ignore[attr-defined]
        buffer += STREAM[start : start + 1000]
    assert counted.copied > 30 * (2.5 * 200_000 + 16 * 200)


def _feed_reading_into(sizes: list[int]) -> tuple[list[Any], int]:
    """Feed the stream the way the server's connection reads: into the rest of a
    partial frame's own buffer whenever the parser offers one (``read_into``),
    else into a read buffer that the next read overwrites."""
    parser = ServerProtocol(max_message_size=1 << 20)
    shared = bytearray(max(sizes))
    events: list[Any] = []
    position, index, reads = 0, 0, 0
    while position < len(STREAM):
        size = sizes[index % len(sizes)]
        index += 1
        reads += 1
        direct = parser.read_into()
        if direct is not None:
            n = min(size, len(direct), len(STREAM) - position)
            direct[:n] = STREAM[position : position + n]  # what the kernel writes there
            direct.release()
            events += parser.received_into(n)
        else:
            n = min(size, len(STREAM) - position)
            shared[:n] = STREAM[position : position + n]
            events += parser.receive_data(memoryview(shared)[:n])
        position += n
    return events, reads


@pytest.mark.parametrize("size", [4096, 50_000, 65_536, 262_144])
def test_reading_into_the_frames_buffer_copies_less(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """What read_into is for: the rest of a big frame goes straight into its buffer.

    Fed the same way otherwise, the parser copies fewer bytes into its buffers
    when the reads go into the frame's own buffer (made when a quarter to a
    half of the frame is here), and the events are the same, although every read buffer
    is overwritten by the next read (nothing of it may be kept)."""
    expected = ServerProtocol(max_message_size=1 << 20).receive_data(STREAM)
    counted = _counting(monkeypatch)
    events, reads = _feed_reading_into([size])
    assert events == expected
    direct = counted.copied
    counted.copied = 0
    assert _feed([size])[0] == expected
    if size < 262_144:
        assert direct < counted.copied, (direct, counted.copied)
    else:  # the one frame cut (the last) arrives more than half in the first read
        assert direct == counted.copied, (direct, counted.copied)
    # unmasking once, the fragments' buffer, and the bytes read before each big
    # frame's buffer was made (at most half of it)
    assert direct <= 2.5 * len(STREAM) + 16 * reads, direct


def test_a_kept_read_buffer_becomes_the_frames_buffer() -> None:
    """``keep=True`` hands over the read's bytearray: a frame left partial at its
    start keeps it (no copy); without ``keep`` the parser copies what it keeps, so
    the caller may overwrite its buffer at once."""
    frame = encode_frame(Opcode.BINARY, bytes(range(256)) * 1024, mask=MASK)  # 256 KiB
    for keep in (True, False):
        parser = ServerProtocol(max_message_size=1 << 20)
        read = bytearray(len(frame) + 1000)  # a read buffer may be longer than the frame
        read[:100_000] = frame[:100_000]
        assert parser.receive_data(memoryview(read)[:100_000], keep=keep) == []
        assert (parser._buffer is read) is keep
        if not keep:
            read[:] = bytes(len(read))  # the caller's next read
        rest = parser.read_into()
        assert rest is not None and len(rest) == len(frame) - 100_000
        rest[:] = frame[100_000:]
        rest.release()
        assert parser.received_into(len(frame) - 100_000) == [bytes(range(256)) * 1024]
        assert parser._buffer is None


def test_text_read_into_its_buffer_is_still_checked_as_it_arrives() -> None:
    """Invalid UTF-8 in a big text frame, in bytes read through ``read_into``, fails
    the connection (1007) as soon as they are there, not when the frame is whole."""
    text = bytearray(("ü" * 100_000).encode())  # 200,000 bytes
    text[80_000] = 0xFF
    frame = encode_frame(Opcode.TEXT, bytes(text), mask=MASK)
    parser = ServerProtocol(max_message_size=1 << 20)
    assert parser.receive_data(frame[:60_000]) == []  # valid so far, under half of it
    rest = parser.read_into()
    assert rest is not None and len(rest) == len(frame) - 60_000
    rest[:30_000] = frame[60_000:90_000]
    rest.release()
    events = parser.received_into(30_000)
    assert [(event.code, event.failed) for event in events] == [(1007, True)]  # type: ignore[union-attr]
