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
            counted.copied += len(self)

        def __iadd__(self, other: Any) -> CountingBytearray:
            counted.copied += len(other)
            return super().__iadd__(other)  # type: ignore[return-value]

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
