"""permessage-deflate (RFC 7692): negotiation and per-message (de)compression.

Protocol core (layer 1 of docs/architecture.md): no I/O. Memory is the design goal:

- With ``server_no_context_takeover`` (the default) every message we send
  is compressed independently, so one compressor per setting is shared by
  all the connections of a process (``Z_FULL_FLUSH`` after each message
  resets it) and a broadcast is compressed once per distinct setting, not
  once per client. Per connection this costs nothing.
- With ``client_no_context_takeover`` (the default; a server may always ask
  for it, RFC 7692 §7.1.1.2) each received message gets a fresh inflater
  that lives only while the message is read: no idle state either.
- Turning either off keeps a zlib stream per connection (about 64 KiB to
  300 KiB each with zlib's defaults): better ratios, much more memory.

A message that inflates past ``max_message_size`` stops decompression at
the limit (the rest is never produced) and closes the connection with 1009.

A message sent on as it came (the very object ``on_message`` received, e.g.
an echo or a chat relay) is not compressed again when the client's
compressed form can go out unchanged: it came in one frame, inflated on its
own from a fresh state to a clean block boundary, it fits in the
recipient's window, and its compressed form is no more than a few bytes
larger than the message (see :meth:`PerMessageDeflate.encode_for`). Only the
last such message of the process is kept (at most 32 KiB inflated).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .exceptions import ProtocolError
from .frames import CloseCode

if TYPE_CHECKING:  # zlib's stream types have no public name (typeshed's names)
    from zlib import _Compress as Compressor
    from zlib import _Decompress as Decompressor

__all__ = [
    "DeflateOptions",
    "Negotiated",
    "PerMessageDeflate",
    "negotiate",
]

_TAIL = b"\x00\x00\xff\xff"
#: An empty final fixed-Huffman block: it ends a stream cleanly only when the
#: inflater stands at a block boundary, byte-aligned (RFC 1951 §3.2.6).
_END = b"\x03\x00"
#: The largest inflated message kept for relaying (the largest window).
_RELAY_MAX = 1 << 15
#: How much larger than the message its relayed compressed form may be: a
#: stored block's header and a flush (anything more, e.g. a payload padded
#: with empty blocks, is compressed again, so that relaying a message to many
#: clients never sends more than the message is worth).
_RELAY_SLACK = 16
_PARAMS = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)


@dataclass(frozen=True)
class DeflateOptions:
    """What the server is willing to do (``WebSocketServer(compression=...)``).

    ``server_max_window_bits`` bounds our compressor's window (9-15);
    ``client_max_window_bits`` (``None``: no limit) asks clients that support
    it to use a smaller window; ``memory_level`` (1-9) and ``level`` (0-9)
    are zlib's; messages shorter than ``min_size`` bytes go uncompressed.
    """

    server_no_context_takeover: bool = True
    client_no_context_takeover: bool = True
    server_max_window_bits: int = 15
    client_max_window_bits: int | None = None
    memory_level: int = 8
    level: int = 6
    min_size: int = 128

    def __post_init__(self) -> None:
        if not 9 <= self.server_max_window_bits <= 15:
            raise ValueError("server_max_window_bits must be between 9 and 15")
        if self.client_max_window_bits is not None and not 8 <= self.client_max_window_bits <= 15:
            raise ValueError("client_max_window_bits must be between 8 and 15")
        if not 1 <= self.memory_level <= 9:
            raise ValueError("memory_level must be between 1 and 9")
        if not 0 <= self.level <= 9:
            raise ValueError("level must be between 0 and 9")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The agreed parameters of one connection (immutable: connections that
    agreed on the same share one).

    ``compress_bits`` is the window our compressor may use: 0 when the
    client asked for a window zlib cannot produce (8 bits), in which case
    we accept the extension and simply send every message uncompressed,
    which RFC 7692 allows.
    """

    server_no_context_takeover: bool
    client_no_context_takeover: bool
    server_max_window_bits: int | None
    client_max_window_bits: int | None
    compress_bits: int

    @property
    def no_context_takeover(self) -> bool:
        """No context taken over either way: nothing is kept between messages,
        so the connections that agreed alike can share one extension."""
        return self.server_no_context_takeover and self.client_no_context_takeover

    def response(self) -> str:
        """The ``Sec-WebSocket-Extensions`` value of our 101 response."""
        parts = ["permessage-deflate"]
        if self.server_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.client_no_context_takeover:
            parts.append("client_no_context_takeover")
        if self.server_max_window_bits is not None:
            parts.append(f"server_max_window_bits={self.server_max_window_bits}")
        if self.client_max_window_bits is not None:
            parts.append(f"client_max_window_bits={self.client_max_window_bits}")
        return "; ".join(parts)


def _parse_offers(values: list[str]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    offers = []
    for value in values:
        for offer in value.split(","):
            items = [item.strip() for item in offer.split(";")]
            if not items[0]:
                continue
            params: list[tuple[str, str | None]] = []
            for item in items[1:]:
                if not item:
                    continue
                name, sep, raw = item.partition("=")
                param_value: str | None = None
                if sep:
                    param_value = raw.strip()
                    if len(param_value) >= 2 and param_value[0] == param_value[-1] == '"':
                        param_value = param_value[1:-1]
                params.append((name.strip().lower(), param_value))
            offers.append((items[0].lower(), params))
    return offers


def _window_bits(value: str | None) -> int | None:
    # isascii(): str.isdigit() is also true of "²" (a latin-1 header byte), which int() refuses
    if (
        value is None
        or not (value.isascii() and value.isdigit())
        or (len(value) > 1 and value[0] == "0")
    ):
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def negotiate(header_values: list[str], options: DeflateOptions) -> Negotiated | None:
    """Accept the first acceptable permessage-deflate offer (RFC 7692 §5, §7).

    An offer with an unknown or repeated parameter, or an invalid value, is
    declined and the next one tried; ``None`` means no compression.
    """
    for name, params in _parse_offers(header_values):
        if name != "permessage-deflate":
            continue
        seen: dict[str, str | None] = {}
        valid = True
        for param, value in params:
            if param not in _PARAMS or param in seen:
                valid = False
                break
            seen[param] = value
        if not valid:
            continue
        if any(
            seen.get(p) is not None
            for p in ("server_no_context_takeover", "client_no_context_takeover")
        ):
            continue
        server_bits: int | None = None
        if "server_max_window_bits" in seen:
            server_bits = _window_bits(seen["server_max_window_bits"])
            if server_bits is None:
                continue
        client_bits: int | None = None
        if "client_max_window_bits" in seen:
            raw = seen["client_max_window_bits"]
            if raw is not None and _window_bits(raw) is None:
                continue
            offered = _window_bits(raw) if raw is not None else 15
            assert offered is not None
            if options.client_max_window_bits is not None:
                client_bits = min(offered, options.client_max_window_bits)
            elif raw is not None:
                client_bits = offered
        ours = options.server_max_window_bits
        if server_bits is not None:
            response_server_bits: int | None = min(server_bits, ours)
        elif ours < 15:
            response_server_bits = ours
        else:
            response_server_bits = None
        compress_bits = response_server_bits or 15
        if compress_bits < 9:
            compress_bits = 0  # zlib cannot write raw deflate with an 8-bit window
        return _shared_negotiated(
            options.server_no_context_takeover or "server_no_context_takeover" in seen,
            options.client_no_context_takeover or "client_no_context_takeover" in seen,
            response_server_bits,
            client_bits,
            compress_bits,
        )
    return None


#: One Negotiated per distinct agreement (a few hundred at most: two flags and
#: two window sizes), shared by the connections that made it.
_NEGOTIATED: dict[tuple[bool, bool, int | None, int | None, int], Negotiated] = {}


def _shared_negotiated(
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: int | None,
    client_max_window_bits: int | None,
    compress_bits: int,
) -> Negotiated:
    """The (immutable) agreement, one object for every connection that made it."""
    key = (
        server_no_context_takeover,
        client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
        compress_bits,
    )
    negotiated = _NEGOTIATED.get(key)
    if negotiated is None:
        negotiated = _NEGOTIATED[key] = Negotiated(*key)
    return negotiated


class _Relay:
    """The message last inflated on its own, with the compressed form it came in.

    ``decode`` sets ``inflated`` and ``pending``; ``remember`` binds them to
    the object handed to the application (``message``, ``compressed``);
    ``encode_for`` forwards ``compressed`` when it is given that very object.
    One per process: the binding is made as the message is parsed, and
    holds until the next one.
    """

    __slots__ = ("compressed", "inflated", "message", "pending", "size")

    def __init__(self) -> None:
        self.compressed: bytes | None = None
        self.pending: bytes | None = None
        self.inflated: bytes | None = None
        self.message: object = None
        self.size = 0


_RELAY = _Relay()


def _self_contained(inflater: Decompressor) -> bool:
    """Whether a message's inflater, fed its payload and the tail, stopped at a
    clean block boundary (so the payload can go to another inflater as is).

    A payload that ends with a complete stored block and no sync tail leaves
    the tail read as the start of another stored block, whose lengths the end
    marker then contradicts: zlib raises, and the payload is simply not
    relayed (its inflated bytes were right all the same).
    """
    if inflater.unused_data:
        return False
    try:
        return not inflater.decompress(_END) and inflater.eof
    except zlib.error:
        return False


class _SharedCompressors:
    """One compressor per (window, memory level, level), for stateless messages."""

    def __init__(self) -> None:
        self._by_setting: dict[tuple[int, int, int], Compressor] = {}

    def compress(self, data: bytes, bits: int, memory_level: int, level: int) -> bytes:
        key = (bits, memory_level, level)
        compressor = self._by_setting.get(key)
        if compressor is None:
            compressor = zlib.compressobj(level, zlib.DEFLATED, -bits, memory_level)
            self._by_setting[key] = compressor
        out = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
        return out[:-4] if out.endswith(_TAIL) else out


SHARED_COMPRESSORS = _SharedCompressors()


class PerMessageDeflate:
    """The permessage-deflate state of one connection (small when stateless).

    ``shared``: one instance serves every connection that agreed on the
    same parameters with no context takeover either way, so an idle
    connection keeps none of its own. It keeps nothing between calls, so it
    only inflates messages that come in one frame; for a message in several
    frames the connection takes a :meth:`private` copy first (the protocol
    core does).
    """

    __slots__ = (
        "_compressor",
        "_exceeded",
        "_inflater",
        "_produced",
        "max_message_size",
        "negotiated",
        "options",
        "shared",
    )

    def __init__(
        self,
        negotiated: Negotiated,
        options: DeflateOptions,
        *,
        max_message_size: int,
        shared: bool = False,
    ) -> None:
        if shared and not negotiated.no_context_takeover:
            raise ValueError("only an agreement without context takeover can be shared")
        self.negotiated = negotiated
        self.options = options
        self.max_message_size = max_message_size
        self.shared = shared
        self._inflater: Decompressor | None = None
        self._compressor: Compressor | None = None
        self._produced = 0
        self._exceeded = False

    # ------------------------------------------------------------ receive

    def private(self) -> PerMessageDeflate:
        """A copy of this agreement for one connection alone (its state its own)."""
        return PerMessageDeflate(
            self.negotiated, self.options, max_message_size=self.max_message_size
        )

    def decode(self, payload: bytes, *, fin: bool, compressed: bool) -> bytes:
        """Inflate one frame of a compressed message (RFC 7692 §7.2.2)."""
        if self.shared:
            if not fin:
                raise ValueError("a shared PerMessageDeflate inflates whole messages: private()")
            # nothing kept: a fresh inflater for this message alone
            limit = self.max_message_size
            one_message = zlib.decompressobj(-15)
            out = one_message.decompress(payload + _TAIL, limit + 1)
            if one_message.unconsumed_tail or len(out) > limit:
                raise ProtocolError(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message over the limit of {limit} bytes once decompressed",
                )
            if (
                len(out) <= _RELAY_MAX
                and len(payload) <= len(out) + _RELAY_SLACK
                and _self_contained(one_message)
            ):
                relay = _RELAY
                relay.inflated, relay.pending = out, bytes(payload)
            return out
        inflater = self._inflater
        if inflater is None:
            inflater = zlib.decompressobj(-15)
            self._inflater = inflater
            self._produced = 0
        data = payload + _TAIL if fin else payload
        budget = self.max_message_size - self._produced + 1
        out = inflater.decompress(data, budget)
        self._produced += len(out)
        if inflater.unconsumed_tail or self._produced > self.max_message_size:
            self._exceeded = True
            self._inflater = None
            raise ProtocolError(
                CloseCode.MESSAGE_TOO_BIG,
                f"message over the limit of {self.max_message_size} bytes once decompressed",
            )
        if fin:
            self._produced = 0
            if self.negotiated.client_no_context_takeover or inflater.eof:
                self._inflater = None
        return out

    def max_message_size_exceeded(self) -> bool:
        return self._exceeded

    @staticmethod
    def remember(message: str | bytes, inflated: bytes) -> None:
        """``message`` (handed to the application) is what :meth:`decode` just
        inflated into ``inflated``: if that payload can be relayed, bind it to
        the message for :meth:`encode_for`."""
        relay = _RELAY
        if relay.inflated is inflated:
            relay.message, relay.compressed, relay.size = message, relay.pending, len(inflated)
            relay.inflated = relay.pending = None

    # --------------------------------------------------------------- send

    @property
    def stateless(self) -> bool:
        """Whether our messages are compressed independently (shareable)."""
        return self.negotiated.server_no_context_takeover

    def compress_key(self) -> int:
        """Connections with the same key get the same compressed bytes."""
        return self.negotiated.compress_bits

    def should_compress(self, size: int) -> bool:
        return self.negotiated.compress_bits != 0 and size >= self.options.min_size

    def encode_for(self, message: object, data: bytes | bytearray | memoryview) -> bytes:
        """:meth:`encode` for ``data``, the bytes of ``message`` (what the
        application passed to ``send``): the compressed form the message came
        in when it is the very object last received compressed and that form
        can go out as it is (see the module's docstring).

        A payload inflated alone from a fresh state refers to nothing before
        it, and its distances are shorter than the message; so it decodes the
        same in any inflater whose window holds the message. It goes only to
        connections for which we keep no context (``server_no_context_takeover``),
        as every message we send them is independent anyway.
        """
        relay = _RELAY
        if message is relay.message and message is not None:
            negotiated = self.negotiated
            if negotiated.server_no_context_takeover and relay.size <= (
                1 << negotiated.compress_bits
            ):
                compressed = relay.compressed
                assert compressed is not None
                return compressed
        return self.encode(bytes(data))

    def encode(self, data: bytes) -> bytes:
        """Compress one whole message (RSV1 goes on its first frame)."""
        bits = self.negotiated.compress_bits
        options = self.options
        if self.stateless:
            return SHARED_COMPRESSORS.compress(data, bits, options.memory_level, options.level)
        compressor = self._compressor
        if compressor is None:
            compressor = zlib.compressobj(options.level, zlib.DEFLATED, -bits, options.memory_level)
            self._compressor = compressor
        out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(_TAIL) else out
