"""Tests for ``enjent.mask`` (RFC 6455 §5.3): the pure-Python fallback and the
optional C helper ``enjent._speedups`` must give identical bytes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enjent import mask as mask_module
from enjent.mask import apply_mask_python, unmask_frame_python

try:
    from enjent._speedups import apply_mask as apply_mask_c
    from enjent._speedups import unmask_frame as unmask_frame_c
except ImportError:
    apply_mask_c = None
    unmask_frame_c = None

needs_speedups = pytest.mark.skipif(
    apply_mask_c is None,
    reason=(
        "enjent._speedups is not built (no C compiler at install time, or "
        "ENJENT_NO_SPEEDUPS=1): only the pure-Python fallback is tested"
    ),
)

IMPLEMENTATIONS = [
    pytest.param(apply_mask_python, id="python"),
    pytest.param(apply_mask_c, id="c", marks=needs_speedups),
]

MaskFunction = Callable[[bytes | bytearray | memoryview, bytes], bytes]

masks = st.binary(min_size=4, max_size=4)
payloads = st.binary(max_size=2048)


def random_bytes(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


# -- both implementations ---------------------------------------------------


@pytest.mark.parametrize("apply_mask", IMPLEMENTATIONS)
def test_rfc_6455_example(apply_mask: MaskFunction) -> None:
    """RFC 6455 §5.7: a masked "Hello" with key 37 fa 21 3d."""
    masked = apply_mask(b"Hello", bytes.fromhex("37fa213d"))
    assert masked == bytes.fromhex("7f9f4d5158")
    assert apply_mask(masked, bytes.fromhex("37fa213d")) == b"Hello"


@pytest.mark.parametrize("apply_mask", IMPLEMENTATIONS)
def test_empty_payload(apply_mask: MaskFunction) -> None:
    assert apply_mask(b"", b"\x01\x02\x03\x04") == b""


@pytest.mark.parametrize("apply_mask", IMPLEMENTATIONS)
@given(data=payloads, mask=masks)
def test_masking_twice_is_identity(apply_mask: MaskFunction, data: bytes, mask: bytes) -> None:
    masked = apply_mask(data, mask)
    assert len(masked) == len(data)
    assert apply_mask(masked, mask) == data


@pytest.mark.parametrize("apply_mask", IMPLEMENTATIONS)
def test_zero_mask_is_identity(apply_mask: MaskFunction) -> None:
    data = random_bytes(1000, seed=1)
    assert apply_mask(data, b"\x00\x00\x00\x00") == data


# -- the C helper against the fallback ---------------------------------------


@needs_speedups
@pytest.mark.skipif(
    os.environ.get("ENJENT_NO_SPEEDUPS", "") not in ("", "0"),
    reason="ENJENT_NO_SPEEDUPS forces the pure-Python fallback",
)
def test_module_uses_speedups_when_built() -> None:
    assert mask_module.HAVE_SPEEDUPS
    assert mask_module.apply_mask is apply_mask_c
    assert mask_module.unmask_frame is unmask_frame_c


@needs_speedups
@given(data=payloads, mask=masks)
def test_c_matches_python(data: bytes, mask: bytes) -> None:
    assert apply_mask_c(data, mask) == apply_mask_python(data, mask)


@needs_speedups
@pytest.mark.parametrize("length", range(21))
def test_c_matches_python_short_lengths(length: int) -> None:
    """Every length around the 8-byte blocks and the 4-byte tail."""
    data = random_bytes(length, seed=length)
    for mask in (b"\x37\xfa\x21\x3d", b"\xff\xff\xff\xff", b"\x01\x02\x04\x08"):
        assert apply_mask_c(data, mask) == apply_mask_python(data, mask)


@needs_speedups
@pytest.mark.parametrize("length", [1 << 20, (1 << 20) + 3])
def test_c_matches_python_large(length: int) -> None:
    data = random_bytes(length, seed=length)
    mask = b"\x9a\x0b\xc4\x71"
    assert apply_mask_c(data, mask) == apply_mask_python(data, mask)


@needs_speedups
@given(data=payloads, mask=masks, kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_c_accepts_bytes_like_data(
    data: bytes, mask: bytes, kind: Callable[[bytes], bytes | bytearray | memoryview]
) -> None:
    buffer = kind(data)
    masked = apply_mask_c(buffer, mask)
    assert type(masked) is bytes
    assert masked == apply_mask_python(buffer, mask) == apply_mask_python(data, mask)
    assert bytes(buffer) == data  # the input is left untouched


@needs_speedups
@given(data=payloads, mask=masks, kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_c_accepts_bytes_like_mask(
    data: bytes, mask: bytes, kind: Callable[[bytes], bytes | bytearray | memoryview]
) -> None:
    assert apply_mask_c(data, kind(mask)) == apply_mask_python(data, mask)


@needs_speedups
@given(data=st.binary(min_size=1, max_size=2048), mask=masks, bounds=st.data())
def test_c_memoryview_slice_with_offset(data: bytes, mask: bytes, bounds: st.DataObject) -> None:
    """A frame payload is a slice of the receive buffer, rarely at offset 0."""
    start = bounds.draw(st.integers(min_value=1, max_value=len(data)), label="start")
    stop = bounds.draw(st.integers(min_value=start, max_value=len(data)), label="stop")
    view = memoryview(bytearray(data))[start:stop]
    assert apply_mask_c(view, mask) == apply_mask_python(view, mask)
    assert apply_mask_c(view, mask) == apply_mask_python(data[start:stop], mask)


@needs_speedups
@pytest.mark.parametrize("length", [0, 1, 3, 5, 8])
def test_c_rejects_bad_mask_length(length: int) -> None:
    with pytest.raises(ValueError, match="exactly 4 bytes"):
        apply_mask_c(b"payload", bytes(length))


@needs_speedups
def test_c_rejects_non_bytes_like() -> None:
    with pytest.raises(TypeError):
        apply_mask_c("text", b"\x00\x00\x00\x00")
    with pytest.raises(TypeError):
        apply_mask_c(b"payload", "abcd")


@needs_speedups
def test_c_rejects_non_contiguous_view() -> None:
    with pytest.raises(BufferError):
        apply_mask_c(memoryview(b"abcdefgh")[::2], b"\x00\x00\x00\x00")


@needs_speedups
@pytest.mark.parametrize("args", [(), (b"data",), (b"data", b"mask", b"extra")])
def test_c_rejects_wrong_argument_count(args: tuple[bytes, ...]) -> None:
    with pytest.raises(TypeError, match="exactly 2 arguments"):
        apply_mask_c(*args)


# -- unmask_frame: a payload unmasked where it lies in the read ----------------

UNMASK_IMPLEMENTATIONS = [
    pytest.param(unmask_frame_python, id="python"),
    pytest.param(unmask_frame_c, id="c", marks=needs_speedups),
]

UnmaskFunction = Callable[[bytes | bytearray | memoryview, int, int], bytes]


@pytest.mark.parametrize("unmask_frame", UNMASK_IMPLEMENTATIONS)
@given(
    before=st.binary(max_size=40),
    mask=masks,
    payload=payloads,
    after=st.binary(max_size=40),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_unmask_frame_is_apply_mask_with_the_key_before_the_payload(
    unmask_frame: UnmaskFunction,
    before: bytes,
    mask: bytes,
    payload: bytes,
    after: bytes,
    kind: Callable[[bytes], bytes | bytearray | memoryview],
) -> None:
    """What the parser does for each frame: the key is the 4 bytes before the payload."""
    read = before + mask + apply_mask_python(payload, mask) + after
    start = len(before) + 4
    unmasked = unmask_frame(kind(read), start, start + len(payload))
    assert type(unmasked) is bytes
    assert unmasked == payload


@pytest.mark.parametrize("unmask_frame", UNMASK_IMPLEMENTATIONS)
def test_unmask_frame_of_a_view_counts_from_the_view(unmask_frame: UnmaskFunction) -> None:
    """A view that starts inside a buffer: offsets are the view's, not the buffer's."""
    mask = b"\x37\xfa\x21\x3d"
    buffer = bytearray(b"junk" + mask + apply_mask_python(b"Hello", mask))
    assert unmask_frame(memoryview(buffer)[4:], 4, 9) == b"Hello"


@pytest.mark.parametrize("unmask_frame", UNMASK_IMPLEMENTATIONS)
@pytest.mark.parametrize(("start", "stop"), [(3, 5), (0, 0), (6, 5), (4, 11), (-1, 4), (4, -1)])
def test_unmask_frame_rejects_bounds_outside_the_data(
    unmask_frame: UnmaskFunction, start: int, stop: int
) -> None:
    with pytest.raises(ValueError, match="start <= stop"):
        unmask_frame(b"0123456789", start, stop)


@needs_speedups
def test_c_unmask_frame_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="exactly 3 arguments"):
        unmask_frame_c(b"data", 4)
    with pytest.raises(TypeError):
        unmask_frame_c("text and more", 4, 6)
    with pytest.raises(TypeError):
        unmask_frame_c(b"0123456789", "4", 6)
