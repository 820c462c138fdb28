"""Masking of frame payloads (RFC 6455 §5.3): XOR with a 4-byte key.

Protocol core (layer 1). The one place where an optional C helper
(``enjent._speedups``) is used; the pure-Python fallback below gives the same
bytes and is what runs when no compiler was present at install time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

__all__ = [
    "HAVE_SPEEDUPS",
    "apply_mask",
    "apply_mask_python",
    "unmask_frame",
    "unmask_frame_python",
]


def apply_mask_python(data: Buffer, mask: Buffer) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask``, the whole buffer at once.

    Big-integer XOR runs in C inside CPython, so this costs a few
    nanoseconds per byte instead of a Python-level loop per byte.
    """
    length = len(data)
    if length == 0:
        return b""
    repeated = bytes(mask) * ((length >> 2) + 1)
    value = int.from_bytes(data, "little") ^ int.from_bytes(repeated[:length], "little")
    return value.to_bytes(length, "little")


def unmask_frame_python(data: Buffer, start: int, stop: int) -> bytes:
    """``data[start:stop]`` unmasked with the key ``data[start - 4:start]``.

    A frame's masking key comes just before its payload (RFC 6455 §5.2): the
    parser hands over where the payload is in the read, not two slices.
    """
    if not 4 <= start <= stop <= len(data):
        raise ValueError(
            f"need 4 <= start <= stop <= len(data), got start={start} stop={stop} len={len(data)}"
        )
    view = memoryview(data)
    return apply_mask_python(view[start:stop], view[start - 4 : start])


#: XOR a payload with a masking key: the C helper when built, else Python.
#: ``ENJENT_NO_SPEEDUPS=1`` in the environment forces the fallback.
apply_mask: Callable[[Buffer, Buffer], bytes] = apply_mask_python
#: Unmask a payload in place in the read: the C helper when built, else Python.
unmask_frame: Callable[[Buffer, int, int], bytes] = unmask_frame_python
HAVE_SPEEDUPS = False
if os.environ.get("ENJENT_NO_SPEEDUPS", "") in ("", "0"):
    try:
        from ._speedups import apply_mask as _c_apply_mask
        from ._speedups import unmask_frame as _c_unmask_frame
    except ImportError:  # no compiler at install time (or an older build): the fallback is complete
        pass
    else:
        apply_mask = _c_apply_mask
        unmask_frame = _c_unmask_frame
        HAVE_SPEEDUPS = True
