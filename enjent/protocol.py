"""The per-connection WebSocket state machine, server side (RFC 6455 §5-§7).

Protocol core (layer 1 of docs/architecture.md): bytes in, events and bytes out, no I/O.
:meth:`ServerProtocol.receive_data` parses every complete frame of a read in
one pass, answers pings, runs the close handshake and validates UTF-8; bytes
to write accumulate in :attr:`ServerProtocol.pending`, which the I/O layer
takes (:meth:`ServerProtocol.chunks_to_send`) and writes, one write per read.
A protocol error never escapes: it becomes a close frame and a :class:`Close`
event.
"""

from __future__ import annotations

import codecs
import enum
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from .exceptions import ProtocolError
from .frames import (
    MAX_CONTROL_PAYLOAD,
    SHORT_BINARY_HEADERS,
    SHORT_TEXT_HEADERS,
    CloseCode,
    Opcode,
    encode_close_payload,
    encode_frame,
    frame_header,
    parse_close_payload,
)
from .mask import apply_mask, unmask_frame

__all__ = [
    "Close",
    "Event",
    "Extension",
    "OutgoingMessage",
    "Ping",
    "Pong",
    "ServerProtocol",
    "State",
]


class State(enum.IntEnum):
    """Connection states after the opening handshake (RFC 6455 §4, §7)."""

    OPEN = 1
    CLOSING = 2  # we sent a close frame and wait for the peer's
    CLOSED = 3  # the close handshake is over (or the connection failed)


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer sent a ping; the pong is already queued (RFC 6455 §5.5.2)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """The peer sent a pong (RFC 6455 §5.5.3)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The connection is closed at the WebSocket level; close the transport.

    ``code``/``reason`` are the peer's close frame when it sent one, or what
    we failed the connection with (``failed`` is then true).
    """

    code: int
    reason: str
    failed: bool = False


#: Messages arrive as ``str`` (text) or ``bytes`` (binary); other events
#: are the small frozen dataclasses above.
Event: TypeAlias = "str | bytes | Ping | Pong | Close"


class Extension(Protocol):
    """What the state machine needs of a negotiated extension (RSV1 only)."""

    def decode(self, payload: bytes, *, fin: bool, compressed: bool) -> bytes: ...

    def max_message_size_exceeded(self) -> bool: ...

    # Optional: ``remember(message, inflated)`` is told which message a
    # single-frame payload was inflated into (PerMessageDeflate uses it to
    # relay the compressed form; see ``enjent.deflate``).


_UTF8_DECODER = codecs.getincrementaldecoder("utf-8")
#: Payloads from this size on are written next to their header, not copied into a frame.
ZERO_COPY_MIN = 16 * 1024
#: What a binary message may be, besides ``bytes`` (checked as a tuple: a
#: ``X | Y`` union makes ``isinstance`` several times slower).
_BUFFER_TYPES = (bytes, bytearray, memoryview)
#: Frames from this size on may be read straight into their own buffer (read_into).
DIRECT_READ = 16 * 1024

_OPCODE_TEXT = Opcode.TEXT.value
_OPCODE_BINARY = Opcode.BINARY.value
_OPCODE_CONT = Opcode.CONTINUATION.value
_OPCODE_CLOSE = Opcode.CLOSE.value
_OPCODE_PING = Opcode.PING.value
_OPCODE_PONG = Opcode.PONG.value


def _deflate_bound(size: int) -> int:
    """The most bytes a deflate stream may take for ``size`` bytes, whatever its settings.

    zlib's conservative ``deflateBound`` (any memLevel, any window, fixed
    Huffman blocks included), about 14 % over ``size``, plus room for the
    block headers and the sync tail. A client that compresses with a small
    ``memLevel`` (websockets uses 5) makes incompressible data about 0.25 %
    larger, so a message of exactly ``max_message_size`` must pass; the
    memory bound holds anyway (the inflated size is checked as it inflates).
    """
    return size + ((size + 7) >> 3) + ((size + 63) >> 6) + 64


def _decode_text(payload: bytes) -> str:
    """A whole text message (RFC 6455 §8.1): invalid UTF-8 fails with 1007."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD_DATA, "text message is not valid UTF-8"
        ) from None


class ServerProtocol:
    """The server side of one WebSocket connection, after the handshake.

    ``max_message_size`` bounds a message (all its fragments, after
    decompression); a bigger one fails the connection with 1009 before its
    payload is buffered.
    """

    __slots__ = (
        "_buffer",
        "_close_frame",
        "_decoder",
        "_eof_due",
        "_frag_compressed",
        "_frag_opcode",
        "_frag_size",
        "_fragments",
        "_have",
        "_need",
        "_partial",
        "close_code",
        "close_reason",
        "extension",
        "max_message_size",
        "pending",
        "state",
    )

    def __init__(
        self, *, max_message_size: int = 1 << 20, extension: Extension | None = None
    ) -> None:
        self.max_message_size = max_message_size
        self.extension = extension
        self.state = State.OPEN
        #: Frames to write, in order, or ``None`` while there are none (an
        #: idle connection keeps no empty list); add with :meth:`queue_frame`,
        #: take with :meth:`chunks_to_send`.
        self.pending: list[bytes] | None = None
        #: Our close frame once the read that ended the connection is parsed;
        #: written after the answers to the messages that read delivered.
        self._close_frame: bytes | None = None
        self._eof_due = True
        self.close_code: int | None = None
        self.close_reason = ""
        #: a partial frame, only while one is: its first ``_have`` bytes are
        #: here; the buffer is either exactly that long (it grows as bytes come)
        #: or long enough for the whole frame (see :meth:`read_into`)
        self._buffer: bytearray | None = None
        self._have = 0
        self._need = 0  # bytes the partial frame needs before parsing can go on
        #: (header size, masking key, bytes checked, decoder) while a text
        #: frame is only partly here: its UTF-8 is checked as it arrives
        self._partial: tuple[int, bytes, int, codecs.IncrementalDecoder] | None = None
        self._frag_opcode = 0  # opcode of the fragmented message in progress, 0: none
        self._frag_size = 0
        self._frag_compressed = False
        #: the payload of a fragmented message in progress, in one buffer (so
        #: that it costs about its size however small the fragments), or None
        self._fragments: bytearray | None = None
        self._decoder: codecs.IncrementalDecoder | None = None

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | memoryview, *, keep: bool = False) -> list[Event]:
        """Feed bytes read from the peer; return the events they complete.

        A frame that straddles two reads is the only thing ever copied: its
        bytes collect in a buffer (taking from the next read only what the
        frame still lacks), and the frames after it are parsed in place in
        the read itself. However the reads fall against frame boundaries,
        each byte is copied at most once before unmasking; none is once the
        frame's buffer holds it whole and the rest is read into it
        (:meth:`read_into`).

        ``data`` may be a view of the caller's read buffer: nothing of it is
        kept after the call unless ``keep`` is true, which hands over the
        ``bytearray`` under a view that starts at its first byte: a frame
        that the read leaves partial at that first byte keeps that buffer
        instead of a copy.
        """
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        start = 0
        buffer = self._buffer
        try:
            if buffer is not None:
                view = memoryview(data)
                while True:
                    missing = self._need - self._have
                    if len(data) - start < missing:  # still not enough: keep it all
                        self._store(view[start:])
                        if self._partial is not None:
                            self._check_partial()
                        else:
                            self._maybe_start_partial()
                        return events
                    self._store(view[start : start + missing])
                    start += missing
                    buffer = self._buffer
                    assert buffer is not None
                    if len(buffer) == self._have:
                        parsed = self._parse(buffer, events, 0)
                    else:  # a buffer longer than the frame (one kept from a read)
                        frame = memoryview(buffer)[: self._have]
                        parsed = self._parse(frame, events, 0)
                        frame.release()
                    if parsed:  # the straddling frame is whole
                        break
                    if self.is_closed():
                        return events
                    # only its header was: now its length is known, read on
                self._buffer = None
                self._partial = None
                if self.is_closed():
                    return events
            consumed = self._parse(data, events, start)
        except ProtocolError as exc:
            events.append(self.fail(exc.close_code, str(exc)))
            return events
        if consumed < len(data) and not self.is_closed():
            self._keep(data, consumed, keep)
        return events

    def read_into(self) -> memoryview | None:
        """Where the rest of the partial frame can be read to, without a copy.

        A view of the frame's own buffer, from its first missing byte to the
        frame's end, for a frame of at least :data:`DIRECT_READ` bytes: when
        its buffer is already as long as the frame (one handed over with
        ``keep``), or when a quarter to a half of it is here (the buffer is
        then made as long as the frame, one copy of what is here instead of
        one of all the rest). ``None`` otherwise: a header that announces a
        big frame costs nothing until the frame's bytes come (at most four
        times what a client sent is allocated for it). After reading ``n``
        bytes into the view, call :meth:`received_into`.
        """
        buffer = self._buffer
        if buffer is None:
            return None
        have = self._have
        need = self._need
        if need < DIRECT_READ or have >= need:
            return None
        if len(buffer) < need:
            if need > 4 * have or 2 * have > need:
                return None  # too little here yet, or so much that the rest is cheaper copied
            whole = bytearray(need)
            whole[:have] = memoryview(buffer)[:have]
            self._buffer = buffer = whole
        return memoryview(buffer)[have:need]

    @property
    def partial_frame(self) -> int:
        """The size of the frame held partly, waiting for more bytes (0: none)."""
        return self._need if self._buffer is not None else 0

    def keeps(self, buffer: bytearray) -> bool:
        """Whether ``buffer``, handed over with ``keep``, is the partial frame's now."""
        return self._buffer is buffer

    def received_into(self, nbytes: int) -> list[Event]:
        """``nbytes`` were read into the view :meth:`read_into` gave: parse on."""
        self._have += nbytes
        return self.receive_data(b"")

    def _keep(self, data: bytes | memoryview, consumed: int, keep: bool) -> None:
        """Keep the partial frame at the end of a read, for the next reads."""
        rest = len(data) - consumed
        if keep and consumed == 0 and isinstance(data, memoryview):
            owner = data.obj
            if isinstance(owner, bytearray) and len(owner) >= self._need:
                self._buffer, self._have = owner, rest  # the caller's, handed over
                return
        self._buffer, self._have = bytearray(memoryview(data)[consumed:]), rest

    def _store(self, chunk: memoryview) -> None:
        """Add bytes of the partial frame to its buffer."""
        if not chunk:  # (the buffer may still be lent to the event loop: not resized)
            return
        buffer = self._buffer
        assert buffer is not None
        have = self._have
        if len(buffer) == have:
            buffer += chunk
        else:  # a buffer made for the whole frame: filled in place
            buffer[have : have + len(chunk)] = chunk
        self._have = have + len(chunk)

    def _parse(self, data: bytes | bytearray | memoryview, events: list[Event], pos: int) -> int:
        """Parse every complete frame of ``data`` from ``pos``; return where it stopped."""
        end = len(data)
        max_size = self.max_message_size
        while end - pos >= 2:
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            if length < 126:
                header = 6
            elif length == 126:
                if end - pos < 4:
                    self._need = 4
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    raise ProtocolError(
                        CloseCode.PROTOCOL_ERROR, "non-minimal frame length (RFC 6455 §5.2)"
                    )
                header = 8
            else:
                if end - pos < 10:
                    self._need = 10
                    break
                length = int.from_bytes(memoryview(data)[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "64-bit length with MSB set")
                if length < 65536:
                    raise ProtocolError(
                        CloseCode.PROTOCOL_ERROR, "non-minimal frame length (RFC 6455 §5.2)"
                    )
                header = 14
            if not second & 0x80:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            if (first == 0x81 or first == 0x82) and not self._frag_opcode:
                # the common case, on its own short path: a whole text or
                # binary message in one frame, no RSV bit
                if length > max_size:
                    raise ProtocolError(
                        CloseCode.MESSAGE_TOO_BIG, f"message over the limit of {max_size} bytes"
                    )
                stop = pos + header + length
                if stop > end:
                    self._need = stop - pos
                    if first == 0x81 and end >= pos + header:
                        self._start_partial(data, pos, header, end, continued=False)
                    break
                payload = unmask_frame(data, pos + header, stop)
                pos = stop
                if first == 0x81:
                    try:  # _decode_text, inlined: this is the hot path
                        events.append(payload.decode("utf-8"))
                    except UnicodeDecodeError:
                        _decode_text(payload)  # raises the ProtocolError
                else:
                    events.append(payload)
                continue
            opcode = first & 0x0F
            fin = first & 0x80
            rsv = first & 0x70
            compressed = False
            if opcode < 8:
                if opcode == _OPCODE_CONT:
                    if not self._frag_opcode:
                        raise ProtocolError(
                            CloseCode.PROTOCOL_ERROR, "continuation frame without a message"
                        )
                    compressed = self._frag_compressed
                    if rsv:
                        raise ProtocolError(
                            CloseCode.PROTOCOL_ERROR, "RSV bits set on a continuation frame"
                        )
                elif opcode == _OPCODE_TEXT or opcode == _OPCODE_BINARY:
                    if self._frag_opcode:
                        raise ProtocolError(
                            CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message"
                        )
                    if rsv:
                        if rsv != 0x40 or self.extension is None:
                            raise ProtocolError(
                                CloseCode.PROTOCOL_ERROR, "RSV bits set without an extension"
                            )
                        compressed = True
                else:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if compressed:
                    # the limit is on the message once inflated (checked as it
                    # inflates); on the wire, a message of max_size may take a
                    # little more than max_size bytes when it does not compress
                    if length > _deflate_bound(max_size):
                        raise ProtocolError(
                            CloseCode.MESSAGE_TOO_BIG,
                            f"compressed frame over the limit of {max_size} bytes",
                        )
                elif self._frag_size + length > max_size:
                    raise ProtocolError(
                        CloseCode.MESSAGE_TOO_BIG,
                        f"message over the limit of {max_size} bytes",
                    )
            else:
                if rsv:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "RSV bits set on a control frame")
                if opcode > _OPCODE_PONG:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
                if not fin:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(
                        CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes"
                    )
            stop = pos + header + length
            if stop > end:
                self._need = stop - pos
                text = opcode == _OPCODE_TEXT or (opcode == _OPCODE_CONT and self._decoder)
                if text and not compressed and end >= pos + header:
                    self._start_partial(data, pos, header, end, continued=opcode == _OPCODE_CONT)
                break
            payload = unmask_frame(data, pos + header, stop)
            pos = stop

            if opcode == _OPCODE_TEXT or opcode == _OPCODE_BINARY:
                if compressed:
                    payload = self._inflate(payload, fin=bool(fin))
                if fin:
                    message = _decode_text(payload) if opcode == _OPCODE_TEXT else payload
                    events.append(message)
                    if compressed:
                        remember = getattr(self.extension, "remember", None)
                        if remember is not None:
                            remember(message, payload)
                else:
                    self._start_fragments(opcode, payload, compressed)
            elif opcode == _OPCODE_CONT:
                if compressed:
                    payload = self._inflate(payload, fin=bool(fin))
                whole = self._add_fragment(payload, bool(fin))
                if whole is not None:
                    events.append(whole)
            elif opcode == _OPCODE_PING:
                if self.state is State.OPEN:
                    self.queue_frame(encode_frame(_OPCODE_PONG, payload))
                events.append(Ping(payload))
            elif opcode == _OPCODE_PONG:
                events.append(Pong(payload))
            else:
                events.append(self._receive_close(payload))
                return pos
        else:
            self._need = 2
        return pos

    def _start_partial(
        self,
        data: bytes | bytearray | memoryview,
        pos: int,
        header: int,
        end: int,
        *,
        continued: bool,
    ) -> None:
        """A text frame is still arriving: check the UTF-8 of what is here.

        RFC 6455 §8.1 lets an endpoint fail on invalid UTF-8 as soon as it
        sees it; without this, a text frame that arrives in several reads is
        checked only once complete. A copy of the message's decoder is used:
        the complete frame is decoded again the usual way.
        """
        decoder = _UTF8_DECODER("strict")
        if continued and self._decoder is not None:
            decoder.setstate(self._decoder.getstate())
        key = bytes(data[pos + header - 4 : pos + header])
        available = memoryview(data)[pos + header : end]
        self._decode_fragment(decoder, apply_mask(available, key), False)
        self._partial = (header, key, len(available), decoder)

    def _maybe_start_partial(self) -> None:
        """The header of a buffered frame is complete now: a text frame? Check it.

        (The header was valid: the parser saw its first two bytes already.)
        """
        buffer = self._buffer
        have = self._have
        if buffer is None or have < 2:
            return
        first = buffer[0]
        opcode = first & 0x0F
        if first & 0x70:  # compressed: checked once inflated
            return
        if opcode == _OPCODE_TEXT and not self._frag_opcode:
            continued = False
        elif opcode == _OPCODE_CONT and self._decoder is not None:
            continued = True
        else:
            return
        length = buffer[1] & 0x7F
        header = 6 if length < 126 else (8 if length == 126 else 14)
        if have >= header:
            self._start_partial(bytes(buffer[:have]), 0, header, have, continued=continued)

    def _check_partial(self) -> None:
        """Check the bytes of a partial text frame that arrived since the last read."""
        assert self._partial is not None and self._buffer is not None
        header, key, checked, decoder = self._partial
        rotation = checked & 3  # the masking key goes on where the last check stopped
        new = memoryview(self._buffer)[header + checked : self._have]
        try:
            chunk = apply_mask(new, key[rotation:] + key[:rotation])
        finally:
            new.release()  # the buffer may grow on the next read
        self._decode_fragment(decoder, chunk, False)
        self._partial = (header, key, checked + len(chunk), decoder)

    def _inflate(self, payload: bytes, *, fin: bool) -> bytes:
        extension = self.extension
        assert extension is not None
        if not fin and getattr(extension, "shared", False):
            # a message in several frames: its inflater is this connection's own
            extension = self.extension = extension.private()  # type: ignore[attr-defined]
        try:
            payload = extension.decode(payload, fin=fin, compressed=True)
        except ProtocolError:
            raise
        except Exception as exc:  # zlib.error and friends: bad compressed data
            raise ProtocolError(
                CloseCode.INVALID_PAYLOAD_DATA, f"cannot decompress the message: {exc}"
            ) from None
        if extension.max_message_size_exceeded() or (
            self._frag_size + len(payload) > self.max_message_size
        ):
            raise ProtocolError(
                CloseCode.MESSAGE_TOO_BIG,
                f"message over the limit of {self.max_message_size} bytes once decompressed",
            )
        return payload

    def _start_fragments(self, opcode: int, payload: bytes, compressed: bool) -> None:
        self._frag_opcode = opcode
        self._frag_compressed = compressed
        self._frag_size = len(payload)
        self._fragments = bytearray(payload)
        if opcode == _OPCODE_TEXT:
            decoder = _UTF8_DECODER("strict")
            self._decoder = decoder
            self._decode_fragment(decoder, payload, False)  # fail fast on bad UTF-8

    def _add_fragment(self, payload: bytes, fin: bool) -> str | bytes | None:
        self._frag_size += len(payload)
        buffer = self._fragments
        assert buffer is not None
        buffer += payload
        decoder = self._decoder
        if decoder is not None:
            self._decode_fragment(decoder, payload, fin)  # validated as it arrives
        if not fin:
            return None
        message: str | bytes = buffer.decode("utf-8") if decoder is not None else bytes(buffer)
        self._frag_opcode = 0
        self._frag_size = 0
        self._frag_compressed = False
        self._fragments = None
        self._decoder = None
        return message

    @staticmethod
    def _decode_fragment(decoder: codecs.IncrementalDecoder, payload: bytes, fin: bool) -> str:
        """Decode a fragment, failing on the first invalid byte (RFC 6455 §8.1)."""
        try:
            text = decoder.decode(payload, fin)
        except UnicodeDecodeError:
            raise ProtocolError(
                CloseCode.INVALID_PAYLOAD_DATA, "text message is not valid UTF-8"
            ) from None
        if not fin:
            # CPython keeps ED A0-BF pending although only a surrogate can follow
            pending = decoder.getstate()[0]
            if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
                raise ProtocolError(
                    CloseCode.INVALID_PAYLOAD_DATA, "text message is not valid UTF-8"
                )
        return text

    def _receive_close(self, payload: bytes) -> Close:
        """The peer's close frame (RFC 6455 §5.5.1): echo it, then close.

        The reply carries the peer's code and reason back unchanged (as
        websockets does): a client that logs our close frame sees what it
        sent, and the reason was validated UTF-8 of at most 123 bytes.
        """
        code, reason = parse_close_payload(payload)
        if self.state is State.OPEN:
            if code == CloseCode.NO_STATUS_RCVD:
                reply = encode_close_payload(None)
            else:
                reply = encode_close_payload(code, reason)
            self._close_frame = encode_frame(_OPCODE_CLOSE, reply)
        self.state = State.CLOSED
        self.close_code = code
        self.close_reason = reason
        return Close(code, reason)

    def fail(self, code: int, reason: str = "") -> Close:
        """Fail the connection (RFC 6455 §7.1.7): send a close frame, stop reading.

        Also what the server calls to close at once without waiting for the
        peer (a keepalive timeout).
        """
        if self.state is State.OPEN:
            self._close_frame = encode_frame(_OPCODE_CLOSE, encode_close_payload(code, reason))
        self.state = State.CLOSED
        self._buffer = None
        self._partial = None
        self._fragments = None
        self._decoder = None
        self.close_code = code
        self.close_reason = reason
        return Close(code, reason, failed=True)

    # ----------------------------------------------------------------- output

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (RFC 6455 §7.1.2); idempotent."""
        if self.state is State.OPEN:
            self.queue_frame(encode_frame(_OPCODE_CLOSE, encode_close_payload(code, reason)))
            self.state = State.CLOSING
            self.close_code = code
            self.close_reason = reason

    def is_closed(self) -> bool:
        """Whether the close handshake is over (or the connection failed)."""
        return self.state is State.CLOSED

    @property
    def closing_read(self) -> bool:
        """Whether the last read ended the connection and its close frame is unsent.

        Until it is sent, answers to the messages of that read may still be
        queued: they go out before the close frame (RFC 6455 §5.5.1 lets an
        endpoint finish sending what it had before its close).
        """
        return self._close_frame is not None

    def encode_message(self, data: str | bytes | bytearray | memoryview) -> bytes:
        """The frame of one message to this peer: text for ``str``, binary otherwise.

        Compressed when permessage-deflate was negotiated and the message is
        worth it (RSV1 set, RFC 7692 §6). The one place that turns a
        message into a frame for a connection; a broadcast uses
        :class:`OutgoingMessage` to encode once for many. (The I/O layer
        writes :meth:`message_chunks` instead, which never copies a large
        payload into the frame; this is the same frame in one piece.)
        """
        chunks = self.message_chunks(data)
        return chunks[0] if len(chunks) == 1 else chunks[0] + chunks[1]

    def message_chunks(
        self, data: str | bytes | bytearray | memoryview
    ) -> tuple[bytes] | tuple[bytes, bytes]:
        """Like :meth:`encode_message`, as the buffers of one (vectored) write.

        A payload of at least :data:`ZERO_COPY_MIN` bytes comes back as
        ``(header, payload)``, the payload never copied into a frame: it is
        the caller's ``bytes`` itself (immutable, so safe to write later), or
        the one copy made of a mutable buffer, or the encoded text, or the
        compressed form. A smaller one is ``(frame,)``.
        """
        if type(data) is str:
            opcode = _OPCODE_TEXT
            payload: bytes | bytearray | memoryview = data.encode("utf-8")
            short = SHORT_TEXT_HEADERS
        elif type(data) is bytes or isinstance(data, _BUFFER_TYPES):
            opcode = _OPCODE_BINARY
            payload = data
            short = SHORT_BINARY_HEADERS
        elif isinstance(data, str):  # a subclass of str
            return self.message_chunks(str(data))
        else:
            raise TypeError(f"a message is str or bytes, not {type(data).__name__}")
        extension: Any = self.extension  # a PerMessageDeflate when negotiated
        if extension is not None and extension.should_compress(len(payload)):
            compressed = extension.encode_for(data, payload)
            if len(compressed) < ZERO_COPY_MIN:
                return (encode_frame(opcode, compressed, rsv1=True),)
            return frame_header(opcode, len(compressed), rsv1=True), compressed
        size = len(payload)
        if size < 126:  # the small frame of most messages: a header made once, then the payload
            return (short[size] + payload,)
        if size < ZERO_COPY_MIN:
            return (encode_frame(opcode, payload),)
        if type(payload) is not bytes:
            payload = bytes(payload)  # a buffer the caller may change: one copy, now
        return frame_header(opcode, size), payload

    def should_half_close(self) -> bool:
        """True once, when the WebSocket is closed and everything we had to send is out.

        The I/O layer then ends its side of TCP (FIN) and goes on reading,
        dropping what comes, until the peer closes: closing at once could
        answer the peer's last bytes (a second close frame, data in flight)
        with a reset, which can discard our close frame. RFC 6455 §7.1.1 lets
        the server close the TCP connection first; the wait is bounded by
        the server's ``close_timeout``.
        """
        if self.state is not State.CLOSED or self.pending or self._close_frame is not None:
            return False
        due = self._eof_due
        self._eof_due = False
        return due

    def transport_lost(self) -> None:
        """The transport is gone: a close without a close frame is 1006 (RFC 6455 §7.1.5).

        A close we started and the peer never answered keeps our code.
        """
        if self.state is State.OPEN or self.close_code is None:
            self.close_code = CloseCode.ABNORMAL_CLOSURE
            self.close_reason = ""
        self.state = State.CLOSED
        self.pending = None
        self._close_frame = None
        self._eof_due = False

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer."""
        chunks = self.chunks_to_send()
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def queue_frame(self, frame: bytes) -> None:
        """Queue an encoded frame (or a payload after its header) to write, after the others."""
        pending = self.pending
        if pending is None:
            self.pending = [frame]
        else:
            pending.append(frame)

    def chunks_to_send(self) -> list[bytes]:
        """Everything queued since the last call, as the buffers of one vectored write."""
        if self._close_frame is not None:
            self.queue_frame(self._close_frame)
            self._close_frame = None
        pending = self.pending
        if pending is None:
            return []
        self.pending = None
        return pending


class OutgoingMessage:
    """One message to many peers: encoded once, compressed at most once per setting.

    ``frame`` is the plain frame; :meth:`frame_for` gives the frame for a
    connection that negotiated permessage-deflate, compressing once per
    distinct compression setting (not once per client) when our side keeps
    no context.
    """

    __slots__ = ("_compressed", "frame", "opcode", "payload", "source")

    def __init__(
        self,
        opcode: int,
        payload: bytes | bytearray | memoryview,
        frame: bytes | None = None,
        *,
        source: object = None,
    ) -> None:
        self.opcode = opcode
        self.payload = payload
        self.frame = frame if frame is not None else encode_frame(opcode, payload)
        self._compressed: dict[int, bytes] | None = None
        #: What the application passed (a message it received may go out in
        #: the compressed form it came in: ``PerMessageDeflate.encode_for``).
        self.source = source

    @classmethod
    def of(cls, data: str | bytes | bytearray | memoryview) -> OutgoingMessage:
        """The message for ``data``: text for ``str``, binary otherwise."""
        if isinstance(data, str):
            return cls(_OPCODE_TEXT, data.encode("utf-8"), source=data)
        if isinstance(data, _BUFFER_TYPES):
            return cls(_OPCODE_BINARY, data, source=data)
        raise TypeError(f"a message is str or bytes, not {type(data).__name__}")

    @classmethod
    def from_frame(cls, frame: bytes) -> OutgoingMessage:
        """The message of a plain frame that the bus carried (its header read back)."""
        length = frame[1] & 0x7F
        offset = 2 if length < 126 else (4 if length == 126 else 10)
        return cls(frame[0] & 0x0F, memoryview(frame)[offset:], frame)

    def frame_for(self, extension: Any) -> bytes:
        """The frame for a connection whose ``extension`` is its PerMessageDeflate."""
        if not extension.should_compress(len(self.payload)):
            return self.frame
        if not extension.stateless:
            return encode_frame(self.opcode, extension.encode(bytes(self.payload)), rsv1=True)
        key = extension.compress_key()
        cache = self._compressed
        if cache is None:
            cache = self._compressed = {}
        frame = cache.get(key)
        if frame is None:
            compressed = extension.encode_for(self.source, self.payload)
            frame = encode_frame(self.opcode, compressed, rsv1=True)
            cache[key] = frame
        return frame
