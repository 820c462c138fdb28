"""One TCP connection: the asyncio glue around the protocol core.

Server layer (layer 2 of docs/architecture.md). :class:`Connection` is the
``asyncio.Protocol`` of one client: it reads the opening handshake, then
feeds every read to :class:`~enjent.protocol.ServerProtocol` (which it
extends, to keep one object per connection) and writes everything the read
produced — pongs, echoes, broadcasts to this client — in one write. There is
no task and no timer per connection: the server's sweep handles timeouts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from typing import TYPE_CHECKING, Any

from .exceptions import WebSocketNegotiationError
from .frames import CloseCode, Opcode, encode_frame
from .http11 import Request, error_response, parse_request, without_body
from .protocol import Close, ServerProtocol, State

if TYPE_CHECKING:
    from .client import WebSocketClient
    from .server import WebSocketServer

__all__ = ["Connection"]

logger = logging.getLogger("enjent.connection")
#: One line per handshake answered, when the server's ``access_log`` is on.
access_logger = logging.getLogger("enjent.access")


def _log_access(request: Request, status: int, detail: str, worker: int) -> None:
    """``ADDRESS "METHOD TARGET VERSION" STATUS DETAIL worker=N`` on ``enjent.access``."""
    peer = request.remote_address
    address = f"{peer[0]}:{peer[1]}" if peer else "-"
    access_logger.info(
        '%s "%s %s %s" %d %s worker=%d',
        address,
        request.method,
        request.target,
        request.version,
        status,
        detail or "-",
        worker,
    )


_OPEN = State.OPEN
_NO_LINGER, _LINGER_REQUESTED, _LINGERING = 0, 1, 2
_TEXT = Opcode.TEXT.value
_BINARY = Opcode.BINARY.value
_str = str
_bytes = bytes


class Connection(ServerProtocol, asyncio.Protocol):
    """The ``asyncio.Protocol`` of one client connection."""

    __slots__ = (
        "_batching",
        "_drain_waiter",
        "_head",
        "_linger",
        "_paused",
        "active",
        "client",
        "closing_since",
        "last_seen",
        "opened_at",
        "ping_sent_at",
        "server",
        "transport",
    )

    def __init__(self, server: WebSocketServer) -> None:
        super().__init__(max_message_size=server.max_message_size)
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client: WebSocketClient | None = None
        self._head: bytes = b""
        self._batching = False
        self._linger = _NO_LINGER
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        #: set on every read, cleared by the sweep: liveness without a clock call
        self.active = False
        self.opened_at = 0.0
        self.last_seen = 0.0
        self.ping_sent_at = 0.0
        self.closing_since = 0.0

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert hasattr(transport, "write")  # uvloop's TCPTransport is not a Transport subclass
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        self.opened_at = self.last_seen = asyncio.get_running_loop().time()
        self.transport.set_write_buffer_limits(high=server.write_limit)  # type: ignore[union-attr]
        server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.client is None:
            self._receive_handshake(data)
            return
        events = self.receive_data(data)
        stats = self.server.stats
        stats["bytes_received"] += len(data)
        if events:
            self._batching = True
            server = self.server
            client = self.client
            handler = server._single_message_handler
            messages = 0
            try:
                for event in events:
                    kind = type(event)
                    if kind is _str or kind is _bytes:
                        messages += 1
                        if handler is None:
                            server._dispatch_message(client, event)  # type: ignore[arg-type]
                            continue
                        try:
                            result = handler(client, event)
                        except Exception as exc:
                            server._report_error(client, exc)
                            continue
                        if result is not None and inspect.isawaitable(result):
                            server._spawn(result, client)
                    elif kind is Close:
                        self._on_close(event)  # type: ignore[arg-type]
                    else:
                        server._dispatch_control(client, event)
            finally:
                self._batching = False
                stats["messages_received"] += messages
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server._connections.discard(self)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        client = self.client
        if client is None:
            return
        if self.state is State.OPEN or self.close_code is None:
            # no close frame either way: abnormal closure (RFC 6455 §7.1.5)
            self.close_code = CloseCode.ABNORMAL_CLOSURE
            self.close_reason = ""
        # a close we started and the peer never answered keeps our code
        self.state = State.CLOSED
        self.pending.clear()
        server._client_gone(client, self.close_code, self.close_reason)

    def pause_writing(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()  # backpressure on this client's requests

    def resume_writing(self) -> None:
        self._paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---------------------------------------------------------- handshake

    def _receive_handshake(self, data: bytes) -> None:
        server = self.server
        head = self._head + data if self._head else data
        request = None
        try:
            parsed = parse_request(
                head,
                max_request_line=server.max_request_line,
                max_request_size=server.max_request_size,
            )
            if parsed is None:
                self._head = head
                return
            request, consumed = parsed
            self._head = b""
            assert self.transport is not None
            peer = self.transport.get_extra_info("peername")
            if peer:  # many clients share an address (a proxy): keep one copy of it
                peer = (sys.intern(peer[0]), *peer[1:])
            request.remote_address = peer
            response, client, extension = server._handshake(request)
        except WebSocketNegotiationError as exc:
            self._refuse(exc, request)
            return
        except Exception as exc:  # a bug in a hook must not take the server down
            server._report_error(None, exc)
            self._refuse(WebSocketNegotiationError(500, "internal server error"), request)
            return
        transport = self.transport
        if client is None:  # a plain HTTP answer (health path, static page)
            server.stats["http_responses"] += 1
            if server.access_log:
                _log_access(request, int(response[9:12]), "", server.shard)
            transport.write(without_body(response) if request.method == "HEAD" else response)
            transport.close()
            return
        self.client = client
        self.extension = extension
        client._connection = self
        transport.write(response)
        if server.access_log:
            _log_access(request, 101, client.subprotocol or "", server.shard)
        server._client_ready(client)
        rest = head[consumed:]
        if rest and self.state is not State.CLOSED:
            self.data_received(rest)
        else:
            self._flush()

    def _refuse(self, error: WebSocketNegotiationError, request: Request | None) -> None:
        server = self.server
        if int(error.status) >= 500:
            logger.warning("handshake refused: %s", error)
        else:
            logger.info("handshake refused: %s", error)
        server.stats["handshakes_refused"] += 1
        if server.access_log:
            if request is None:  # the request itself was malformed
                assert self.transport is not None
                peer = self.transport.get_extra_info("peername")
                request = Request("-", "-", version="-", remote_address=peer)
            _log_access(request, int(error.status), str(error), server.shard)
        transport = self.transport
        if transport is not None:
            try:
                response = error_response(error, server=server.server_header)
            except ValueError as exc:  # a hook's header with CR/LF: never split the response
                logger.error("handshake refusal not sent as given: %s", exc)
                internal = WebSocketNegotiationError(500, "internal server error")
                response = error_response(internal, server=server.server_header)
            if request is not None and request.method == "HEAD":
                response = without_body(response)
            transport.write(response)
            transport.close()

    # ------------------------------------------------------------- output

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pending = self.pending
        if self._close_frame is None:
            if pending:
                transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
                pending.clear()
        else:
            transport.write(self.data_to_send())
        if self.state is State.CLOSED:
            client = self.client
            if client is not None and self.close_code is not None:
                # the WebSocket is closed: the client is gone now, even if TCP
                # lingers a little (idempotent: reported once)
                self.server._client_gone(client, self.close_code, self.close_reason)
            linger = self._linger
            if linger == _NO_LINGER:
                transport.close()
            elif linger == _LINGER_REQUESTED:
                # we failed the connection while the peer may still be sending:
                # closing now could reset the connection and lose our close
                # frame, so shut down writing and read until the peer closes
                # (the sweep aborts it after close_timeout)
                self._linger = _LINGERING
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()

    def is_open(self) -> bool:
        return self.state is State.OPEN and self.transport is not None

    def send_message(self, data: str | bytes | bytearray | memoryview) -> bool:
        """Encode one message and write or queue it (see :meth:`send_frame`)."""
        if type(data) is _str:
            first = 0x81  # FIN + text
            payload: Any = data.encode("utf-8")
        elif isinstance(data, bytes | bytearray | memoryview):
            first = 0x82  # FIN + binary
            payload = data
        else:
            raise TypeError(f"a message is str or bytes, not {type(data).__name__}")
        extension: Any = self.extension  # a PerMessageDeflate when negotiated
        if extension is not None and extension.should_compress(len(payload)):
            payload = extension.encode(bytes(payload))
            first |= 0x40  # RSV1: compressed (RFC 7692 §6)
        length = len(payload)
        if length < 126:
            frame = bytes((first, length)) + payload
        else:
            frame = encode_frame(first & 0x0F, payload, rsv1=bool(first & 0x40))
        if self.state is _OPEN and not self._paused:  # the common case, inline
            stats = self.server.stats
            stats["messages_sent"] += 1
            stats["bytes_sent"] += len(frame)
            if self._batching:
                self.pending.append(frame)
            else:
                self.transport.write(frame)  # type: ignore[union-attr]
            return True
        return self.send_frame(frame)

    def send_frame(self, frame: bytes) -> bool:
        """Write an encoded frame, or queue it if this client's read is running."""
        if self.state is not State.OPEN and not (self._batching and self._close_frame):
            return False
        if self._paused:
            self._slow_consumer()
            return False
        if self._batching:
            self.pending.append(frame)
        else:
            transport = self.transport
            assert transport is not None
            transport.write(frame)
        return True

    def _slow_consumer(self) -> None:
        """The stated policy: over ``write_limit`` and still sent to → close 1008."""
        self.server.stats["slow_consumers_closed"] += 1
        logger.info("closing %s: slow consumer over its write limit", self.client)
        self.close_websocket(CloseCode.POLICY_VIOLATION, "slow consumer")

    def close_websocket(self, code: int, reason: str) -> None:
        if self.state is not State.OPEN:
            return
        self.close(code, reason)
        self.closing_since = self.server._now
        if not self._batching:
            self._flush()

    def fail_connection(self, code: int, reason: str) -> None:
        """Send a close frame and close the transport without waiting."""
        if self.state is State.CLOSED:
            return
        self.fail(code, reason)
        self._linger = _LINGER_REQUESTED
        self._flush()

    def drain(self) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self._paused or self.transport is None or self.transport.is_closing():
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = loop.create_future()
        return self._drain_waiter

    # -------------------------------------------------------------- close

    def _on_close(self, event: Close) -> None:
        # whoever closed, the peer may still be sending (a second close frame,
        # data in flight): half-close and read until it closes, so that the
        # connection ends with FIN, never with a reset (bounded by close_timeout)
        self._linger = _LINGER_REQUESTED
        if event.failed:
            self.server.stats["protocol_errors"] += 1
            logger.info("failing connection of %s: %s (%d)", self.client, event.reason, event.code)
