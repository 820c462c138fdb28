"""One TCP connection: the asyncio glue around the protocol core.

Server layer (layer 2 of docs/architecture.md). :class:`Connection` is the
asyncio protocol of one client: it reads the opening handshake, then
feeds every read to :class:`~enjent.protocol.ServerProtocol` (which it
extends, to keep one object per connection) and writes everything the read
produced — pongs, echoes, broadcasts to this client — in one write. It sees
its server only through a :class:`ServerState`. There is no task and no
timer per connection: the server's sweep handles timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import mmap
import time
from typing import TYPE_CHECKING, Any

from ..exceptions import WebSocketNegotiationError
from ..frames import CloseCode
from ..handshake import is_upgrade_request
from ..http11 import Request, error_response, parse_request, without_body
from ..protocol import Close, ServerProtocol, State
from .addresses import AddressLimits, host_table
from .logs import RepeatedLog
from .policy import log_access

if TYPE_CHECKING:
    from .client import WebSocketClient
    from .handlers import Handlers
    from .hub import Hub
    from .options import ServerOptions
    from .policy import HandshakePolicy

__all__ = ["Connection", "ServerState"]

logger = logging.getLogger("enjent.connection")
#: What clients can repeat at will, logged at most once per 10 s with a count
#: (each is counted in /metrics: handshakes_refused, protocol_errors, ...)
_server_refusals = RepeatedLog(logger, logging.WARNING)
_protocol_errors = RepeatedLog(logger, logging.INFO)
_slow_consumers = RepeatedLog(logger, logging.INFO)
_rate_limited = RepeatedLog(logger, logging.INFO)

_OPEN = State.OPEN
#: Client writes (deliveries) that the messages of one read may cause in one
#: callback before the rest waits for a later turn of the loop.
DELIVERY_BUDGET = 5_000
#: Sockets closed per loop turn after their peers hung up (see ServerState.close_soon).
CLOSE_BATCH = 256
#: Sent without reading the request, to a connection over the open-file limit.
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)
_str = str
_bytes = bytes


#: Pending output from this size on is written as its buffers (one vectored
#: write), not joined into one: large payloads are never copied.
_JOIN_LIMIT = 64 * 1024


def write_chunks(transport: asyncio.Transport, chunks: list[bytes]) -> None:
    """Write ``chunks`` in order: joined when small, else as one vectored write."""
    if len(chunks) < 64 and sum(map(len, chunks)) < _JOIN_LIMIT:
        transport.write(b"".join(chunks))
    else:
        transport.writelines(chunks)


class ServerState:
    """What a connection needs of its server (never the server itself).

    The options in force, the handshake policy, the hub of clients, the
    handlers, the open connections, the counters, and ``now``: the
    loop time of the last sweep (or of a recent connection), a clock without
    a system call.
    """

    __slots__ = (
        "_last_capacity_warning",
        "batch_queued",
        "closing",
        "connections",
        "fd_limit",
        "handlers",
        "hub",
        "now",
        "options",
        "policy",
        "stats",
    )

    def __init__(
        self,
        options: ServerOptions,
        policy: HandshakePolicy,
        hub: Hub,
        handlers: Handlers,
        stats: dict[str, int],
    ) -> None:
        self.options = options
        self.policy = policy
        self.hub = hub
        self.handlers = handlers
        self.stats = stats
        #: The open connections that are not a client in the hub: handshakes in
        #: progress, refusals and answers going out, closings after the client
        #: left. A client's connection is found through the hub instead (one
        #: registry entry per client, not two).
        self.connections: set[Connection] = set()
        #: transports whose peer hung up, closed a batch per loop turn (close_soon)
        self.closing: collections.deque[asyncio.BaseTransport] = collections.deque()
        self.now = 0.0
        #: bytes queued by the read being handled (answers to that client's
        #: own messages), counted toward its ``write_limit`` as the transport's
        #: are: one per process, as one read at a time is handled
        self.batch_queued = 0
        #: Connections at most, handshakes included (set at start from RLIMIT_NOFILE)
        self.fd_limit = 1 << 30
        self._last_capacity_warning = -60.0

    def open_connections(self) -> int:
        """Open TCP connections, handshakes included."""
        return len(self.connections) + self.hub.count

    def all_connections(self) -> list[Connection]:
        """Every open connection: those of the hub's clients, then the others."""
        everyone = [
            connection
            for client in self.hub.clients.values()
            if (connection := client.connection) is not None
        ]
        everyone.extend(self.connections)
        return everyone

    def recent_time(self) -> float:
        """The loop's time, as one ``float`` shared by the calls of 10 ms.

        A connection keeps the time it opened: in a burst of connections,
        one object for all of them instead of 24 bytes each.
        """
        now = asyncio.get_running_loop().time()
        if now - self.now >= 0.01:
            self.now = now
        return self.now

    def close_soon(self, transport: asyncio.BaseTransport) -> None:
        """Close ``transport`` on a later turn of the loop, at most CLOSE_BATCH per turn.

        When thousands of clients hang up at once (a network drop, a client
        fleet restarting), closing every socket in the turn that read their
        end of file stalls the worker for the whole burst; in batches, health
        probes, heartbeats and the other clients are served in between.
        """
        closing = self.closing
        closing.append(transport)
        if len(closing) == 1:
            asyncio.get_running_loop().call_soon(self._close_batch)

    def _close_batch(self) -> None:
        closing = self.closing
        for _ in range(min(CLOSE_BATCH, len(closing))):
            closing.popleft().close()
        if closing:
            asyncio.get_running_loop().call_soon(self._close_batch)

    def over_capacity(self) -> None:
        """A connection refused near the open-file limit: counted, logged once a minute."""
        self.stats["connections_refused"] += 1
        if self.now - self._last_capacity_warning >= 60.0:
            self._last_capacity_warning = self.now
            logger.warning(
                "%d connections open, at the limit of %d (RLIMIT_NOFILE less a reserve): "
                "refusing new ones with 503 (counted as connections_refused)",
                self.open_connections() - 1,
                self.fd_limit,
            )


#: The buffer a connection reads into, while its transport is lent to a
#: :class:`_FrameReader`, when the rest of a frame cannot go to the frame's
#: own buffer: one per process, allocated on first use (an anonymous mapping:
#: its pages cost memory once a read reaches them); parsed in place, nothing
#: of it kept past the read.
_READ_SIZE = 256 * 1024
_shared_read: memoryview | None = None


def _allocate_shared_read() -> memoryview:
    global _shared_read
    _shared_read = memoryview(mmap.mmap(-1, _READ_SIZE))
    return _shared_read


#: A frame of at least this size that straddles reads makes the connection lend
#: its transport to a _FrameReader: the rest goes into the frame's buffer, and
#: each next read into a buffer of that frame's size, so that a next frame as
#: big is read there whole and never copied before it is unmasked.
_LARGE_FRAME = 128 * 1024
#: The buffer such reads go to, one per process (up to this size), so that a
#: stream of large frames does not zero a new buffer per frame. It stays the
#: spare after a read (the parser copies all it keeps out of it) unless the
#: parser keeps it whole as a partial frame's buffer; a read that found
#: nothing to read (the event loop asks for a buffer before every attempt)
#: leaves it as it was.
_spare: bytearray | None = None
_SPARE_MAX = 4 * 1024 * 1024
#: ``_FrameReader.lent`` while the rest of a partial frame is read into it
_DIRECT = object()


class Connection(ServerProtocol, asyncio.BaseProtocol):
    """The asyncio protocol of one client connection, plain or TLS.

    A streaming protocol (``data_received``), the cheapest for small
    messages and for an idle connection. When a read leaves a large frame
    partial, the transport is lent to a :class:`_FrameReader`, a buffered
    protocol that reads the rest of the frame straight into the frame's own
    buffer and, while the frames stay large, each next frame into a buffer of
    its size; it hands the transport back when they are small again. At
    256 KiB, each byte is then copied once on its way from the kernel to the
    message (the unmasking) instead of three or four times.
    """

    __slots__ = (
        "_drain_waiter",
        "_head",
        "active",
        "address_bucket",
        "backlog",
        "batching",
        "client",
        "closing_since",
        "last_seen",
        "paused",
        "ping_sent_at",
        "rate_at",
        "rate_tokens",
        "state_of_server",
        "transport",
    )

    def __init__(self, state: ServerState) -> None:
        super().__init__(max_message_size=state.options.limits.max_message_size)
        self.state_of_server = state
        self.transport: asyncio.Transport | None = None
        self.client: WebSocketClient | None = None
        self._head: bytes = b""
        #: True while a read is processed: what is sent meanwhile is queued
        #: and goes out in the read's one write
        self.batching = False
        #: True while the transport's buffer is over ``write_limit``
        self.paused = False
        #: messages read but not handled yet (see _dispatch), or None
        self.backlog: list[Any] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        #: set on every read, cleared by the sweep: liveness without a clock call
        self.active = False
        #: when the connection opened, until the handshake; then when the
        #: client was last heard from (set by the sweep)
        self.last_seen = 0.0
        self.ping_sent_at = 0.0
        self.closing_since = 0.0
        #: the client address's bucket in the host's table (``address_limits``), or -1
        self.address_bucket = -1
        #: the message-rate bucket (``max_message_rate``): tokens, and when refilled
        self.rate_tokens = 0.0
        self.rate_at = 0.0

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert hasattr(transport, "write")  # uvloop's TCPTransport is not a Transport subclass
        self.transport = transport  # type: ignore[assignment]
        state = self.state_of_server
        self.last_seen = state.recent_time()
        limit = state.options.limits.write_limit
        self.transport.set_write_buffer_limits(high=limit)  # type: ignore[union-attr]
        state.connections.add(self)
        if state.open_connections() > state.fd_limit:
            # so close to the open-file limit that even a health probe could
            # not be answered later: refuse at once, without reading
            state.over_capacity()
            self.transport.write(_FULL)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.client is None:
            if not self.closing_since:  # else refused, lingering: dropped
                self._receive_handshake(data)
            return
        events = self.receive_data(data)
        if self._buffer is not None and self._need >= _LARGE_FRAME:
            self._lend_transport()
        self.handle_read(events, len(data))

    def _lend_transport(self) -> None:
        """A large frame is partial: read on through a :class:`_FrameReader`.

        (Only from :data:`_LARGE_FRAME`: below it, what a direct read saves is
        a copy of part of a smaller frame, for two changes of protocol; at
        16 KiB, lending from 16 KiB on and from 128 KiB on measured the same.)
        """
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.set_protocol(_FrameReader(self, self._need))

    def handle_read(self, events: list[Any], nbytes: int) -> None:
        """Count a read of ``nbytes`` and hand the events it completed to the handlers."""
        state = self.state_of_server
        state.stats["bytes_received"] += nbytes
        if self.backlog is not None:  # still working through earlier messages
            self.backlog.extend(events)
            return
        if events:
            self._dispatch(events)
        self._flush()

    def _dispatch(self, events: list[Any]) -> None:
        """Hand the events to the handlers, as many as one callback's fair share allows.

        When the messages handled so far made the hub write to more than
        :data:`DELIVERY_BUDGET` clients (a client broadcasting in a loop), the
        rest waits for a later turn of the loop, and this client is not read
        from meanwhile: the other clients, the bus and the heartbeats keep
        being served, and the broadcaster is slowed down to what the worker
        can write.
        """
        state = self.state_of_server
        stats = state.stats
        hub = state.hub
        budget_end = hub.deliveries + DELIVERY_BUDGET
        state.batch_queued = 0
        self.batching = True
        handlers = state.handlers
        client = self.client
        handler = handlers.single_message
        rate = state.options.limits.max_message_rate
        # the bucket is refilled once per read; each message then costs a subtraction
        # of small ints (no float made per message)
        allowed = int(self._refill(rate)) if rate is not None else 0
        messages = 0
        done = 0
        try:
            for event in events:
                done += 1
                kind = type(event)
                if kind is _str or kind is _bytes:
                    messages += 1
                    if rate is not None and messages > allowed:
                        messages -= 1
                        self._over_rate(rate)
                        break
                    if hub.deliveries > budget_end and done < len(events):
                        self._defer(events[done - 1 :])
                        messages -= 1
                        break
                    if handler is None:
                        handlers.received(client, event)
                        continue
                    try:
                        result = handler(client, event)
                    except Exception as exc:
                        handlers.report_error(client, exc)
                        continue
                    if result is not None and inspect.isawaitable(result):
                        handlers.spawn(result, client)
                elif kind is Close:
                    self._on_close(event)
                else:
                    handlers.control_frame(client, event)
        finally:
            self.batching = False
            stats["messages_received"] += messages
            if rate is not None:
                self.rate_tokens -= messages

    def _defer(self, events: list[Any]) -> None:
        self.backlog = events
        transport = self.transport
        if transport is not None:
            transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._work_through_backlog)

    def _work_through_backlog(self) -> None:
        events = self.backlog
        self.backlog = None
        transport = self.transport
        if events is None or transport is None or self.client is None:
            return
        self._dispatch(events)
        self._flush()
        if self.backlog is None and not self.paused and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool | None:
        """The peer hung up: close in a batch with the others (TLS closes at once)."""
        transport = self.transport
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return None
        self.state_of_server.close_soon(transport)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state_of_server
        state.connections.discard(self)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        client = self.client
        if client is None:
            return
        # messages read but not yet handled when the client vanished are dropped:
        # its handlers would otherwise see them after on_disconnect
        self.backlog = None
        self.transport_lost()  # the core decides the code (1006, or ours if we closed)
        assert self.close_code is not None
        self._client_gone(client, self.close_code, self.close_reason, lingering=False)

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()  # backpressure on this client's requests

    def resume_writing(self) -> None:
        self.paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing() and self.backlog is None:
            transport.resume_reading()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---------------------------------------------------------- handshake

    def _refill(self, rate: int) -> float:
        """The message-rate bucket's tokens now (``rate`` a second, a burst as large)."""
        now = time.monotonic()
        tokens = min(float(rate), self.rate_tokens + (now - self.rate_at) * rate)
        self.rate_at = now
        self.rate_tokens = tokens  # the messages of the read are taken off afterwards
        return tokens

    def _over_rate(self, rate: int) -> None:
        """Over ``max_message_rate``: close 3013 and stop reading; the rest is dropped."""
        if self.state is State.OPEN:
            self.state_of_server.stats["rate_limited"] += 1
            _rate_limited("closing %s: over %d messages a second", self.client, rate)
            # failed, not closed: what it keeps sending is not even parsed
            self.fail_connection(CloseCode.RATE_LIMITED, "rate limited")

    def _admit_address(self, request: Request, limits: AddressLimits) -> int:
        """The address bucket of an upgrade, counted; 429 past the address's limits."""
        peer = request.remote_address
        host = peer[0] if peer else "-"
        address = self.state_of_server.hub.proxies.client_address(host, request.headers)
        try:
            return host_table().admit(address, limits)
        except WebSocketNegotiationError:
            self.state_of_server.stats["address_limited"] += 1
            raise

    def _receive_handshake(self, data: bytes) -> None:
        state = self.state_of_server
        limits = state.options.limits
        head = self._head + data if self._head else data
        request = None
        try:
            parsed = parse_request(
                head,
                max_request_line=limits.max_request_line,
                max_request_size=limits.max_request_size,
            )
            if parsed is None:
                self._head = head
                return
            request, consumed = parsed
            self._head = b""
            assert self.transport is not None
            # kept as (interned host, port): see Request.remote_address
            request.remote_address = self.transport.get_extra_info("peername")
            address_limits = state.options.handshake.address_limits
            if address_limits is not None and is_upgrade_request(request):
                self.address_bucket = self._admit_address(request, address_limits)
            response, client, extension = state.policy.answer(
                request, open_connections=state.open_connections()
            )
        except WebSocketNegotiationError as exc:
            self._refuse(exc, request)
            return
        except Exception as exc:  # a bug in a hook must not take the server down
            state.handlers.report_error(None, exc)
            self._refuse(WebSocketNegotiationError(500, "internal server error"), request)
            return
        transport = self.transport
        access_log = state.options.handshake.access_log
        if client is None:  # a plain HTTP answer (health path, static page)
            state.stats["http_responses"] += 1
            if access_log:
                log_access(request, int(response[9:12]), "", state.hub.ids.shard)
            transport.write(without_body(response) if request.method == "HEAD" else response)
            transport.close()
            return
        self.client = client
        self.extension = extension
        client.connection = self
        transport.write(response)
        if access_log:
            log_access(request, 101, client.subprotocol or "", state.hub.ids.shard)
        state.stats["connections_accepted"] += 1
        if self.address_bucket >= 0:
            host_table().connected(self.address_bucket)
        state.hub.add(client)
        state.connections.discard(self)  # found through the hub from now on
        state.handlers.connected(client)
        rest = head[consumed:]
        if rest and self.state is not State.CLOSED:
            self.data_received(rest)
        else:
            self._flush()

    def _refuse(self, error: WebSocketNegotiationError, request: Request | None) -> None:
        state = self.state_of_server
        # a refusal is the client's business (a scanner's GET / included): DEBUG,
        # counted, in the access log; the server's own (5xx) warn, rate-limited
        if int(error.status) >= 500:
            _server_refusals("handshake refused: %s", error)
        else:
            logger.debug("handshake refused: %s", error)
        state.stats["handshakes_refused"] += 1
        transport = self.transport
        if state.options.handshake.access_log:
            if request is None:  # the request itself was malformed
                peer = transport.get_extra_info("peername") if transport is not None else None
                request = Request("-", "-", version="-", remote_address=peer)
            log_access(request, int(error.status), str(error), state.hub.ids.shard)
        if transport is not None:
            server_header = state.options.handshake.server_header
            try:
                response = error_response(error, server=server_header)
            except ValueError as exc:  # a hook's header with CR/LF: never split the response
                logger.error("handshake refusal not sent as given: %s", exc)
                internal = WebSocketNegotiationError(500, "internal server error")
                response = error_response(internal, server=server_header)
            if request is not None and request.method == "HEAD":
                response = without_body(response)
            transport.write(response)
            if request is not None or not transport.can_write_eof():
                transport.close()  # a whole request was read: nothing left unread
                return
            # a lingering close: a head that is malformed or over the limit may
            # still be coming, and closing with its bytes unread would make the
            # kernel answer RST, which can destroy the response before it is
            # read. FIN after the response, drop what still comes, close on
            # the client's EOF or after close_timeout (the sweep)
            transport.write_eof()
            self.closing_since = asyncio.get_running_loop().time()

    # ------------------------------------------------------------- output

    def _client_gone(
        self, client: WebSocketClient, code: int, reason: str, *, lingering: bool = True
    ) -> None:
        """The WebSocket is closed: the client leaves the hub, its handlers run (once).

        ``lingering``: TCP is still open (our FIN sent, the peer's awaited):
        the connection goes back to the state's set, where the sweep can
        abort it after ``close_timeout``.
        """
        state = self.state_of_server
        if state.hub.remove(client):
            if self.address_bucket >= 0:
                host_table().disconnected(self.address_bucket)
            if lingering:
                state.connections.add(self)
            state.handlers.disconnected(client, code, reason)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pending = self.pending
        if self.backlog is not None:  # messages read before a close are still to come
            if pending:
                write_chunks(transport, pending)
                self.pending = None
            return
        if pending or self.state is State.CLOSED:
            chunks = self.chunks_to_send()
            if len(chunks) == 1:
                transport.write(chunks[0])
            elif chunks:
                write_chunks(transport, chunks)
        if self.should_half_close():  # the core's decision: closed, all sent
            client = self.client
            if client is not None and self.close_code is not None:
                # the WebSocket is closed: the client is gone now, even if TCP
                # lingers a little (idempotent: reported once)
                self._client_gone(client, self.close_code, self.close_reason)
            # FIN, then read until the peer closes (the sweep aborts it after
            # close_timeout)
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def is_open(self) -> bool:
        return self.state is State.OPEN and self.transport is not None

    def send_message(self, data: str | bytes | bytearray | memoryview) -> bool:
        """Encode one message (the core's one encoder) and write or queue it.

        A large payload goes out as header and payload in one vectored
        write, never copied into a frame (:meth:`ServerProtocol.message_chunks`).
        """
        chunks = self.message_chunks(data)
        frame = chunks[0]
        size = len(frame) if len(chunks) == 1 else len(frame) + len(chunks[1])
        if self.state is _OPEN and not self.paused:  # the common case
            if self.batching:  # an answer to this client's read: queued for its one write
                # (queue()'s rule, inline: calling it costs 10 % of the echo path's
                # instructions, python -m loadtest.echo_path under callgrind)
                state = self.state_of_server
                if state.batch_queued > state.options.limits.write_limit:
                    self._slow_consumer()
                    return False
                state.batch_queued += size
                pending = self.pending
                if pending is None:
                    self.pending = list(chunks)
                else:
                    pending += chunks
            elif len(chunks) == 1:
                self.transport.write(frame)  # type: ignore[union-attr]
            else:
                self.transport.writelines(chunks)  # type: ignore[union-attr]
        elif not self.send_frame(*chunks):
            return False
        stats = self.state_of_server.stats
        stats["messages_sent"] += 1
        stats["bytes_sent"] += size
        return True

    def send_frame(self, frame: bytes, payload: bytes | None = None) -> bool:
        """Write an encoded frame (or a header and its payload), or queue it if
        this client's read is running."""
        if self.state is not State.OPEN and not (self.batching and self.closing_read):
            return False
        if self.paused:
            self._slow_consumer()
            return False
        if self.batching:
            return self.queue(frame, payload)
        transport = self.transport
        assert transport is not None
        if payload is None:
            transport.write(frame)
        else:
            transport.writelines((frame, payload))
        return True

    def queue(self, frame: bytes, payload: bytes | None = None) -> bool:
        """Queue a frame for the read's one write, within ``write_limit`` (else 3008).

        As for a write, the limit is on what is already unsent: the frame that
        takes the queue over it is queued (one answer may be bigger than the
        limit); the next one is refused.
        """
        state = self.state_of_server
        if state.batch_queued > state.options.limits.write_limit and self.state is State.OPEN:
            self._slow_consumer()
            return False
        state.batch_queued += len(frame) + (len(payload) if payload is not None else 0)
        pending = self.pending
        if pending is None:
            self.pending = [frame] if payload is None else [frame, payload]
        else:
            pending.append(frame)
            if payload is not None:
                pending.append(payload)
        return True

    def _slow_consumer(self) -> None:
        """The stated policy: over ``write_limit`` and still sent to → close 3008."""
        self.state_of_server.stats["slow_consumers_closed"] += 1
        _slow_consumers("closing %s: slow consumer over its write limit", self.client)
        self.close_websocket(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close_websocket(self, code: int, reason: str) -> None:
        if self.state is not State.OPEN:
            return
        self.close(code, reason)
        self.closing_since = self.state_of_server.now
        if not self.batching:
            self._flush()

    def fail_connection(self, code: int, reason: str) -> None:
        """Send a close frame and stop reading, without waiting for the peer."""
        if self.state is State.CLOSED:
            return
        self.fail(code, reason)
        self._flush()

    def drain(self) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self.paused or self.transport is None or self.transport.is_closing():
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = loop.create_future()
        return self._drain_waiter

    # -------------------------------------------------------------- close

    def _on_close(self, event: Close) -> None:
        if event.failed:
            self.state_of_server.stats["protocol_errors"] += 1
            _protocol_errors(
                "failing connection of %s: %s (%d)", self.client, event.reason, event.code
            )


class _FrameReader(asyncio.BufferedProtocol):
    """The protocol of a connection's transport while large frames come in.

    The event loop reads into the buffer that :meth:`get_buffer` lends: the
    rest of the partial frame in the frame's own buffer
    (:meth:`ServerProtocol.read_into`); else, after a frame of at least
    :data:`_LARGE_FRAME` bytes, a buffer of that frame's size (``predict``),
    handed to the parser (``keep``) so that a next frame as big, read there
    whole or in part, is never copied; else the shared read buffer. Once
    neither applies (the frames are small again), the transport goes back
    to the connection. Everything else is the connection's.
    """

    __slots__ = ("connection", "lent", "predict")

    def __init__(self, connection: Connection, predict: int) -> None:
        self.connection = connection
        self.predict = predict
        #: what get_buffer() lent: _DIRECT, a bytearray, or None (the shared buffer)
        self.lent: object = None

    def get_buffer(self, sizehint: int) -> memoryview:
        connection = self.connection
        direct = connection.read_into()
        if direct is not None:
            self.lent = _DIRECT
            return direct
        predict = self.predict
        if predict and not connection.partial_frame:
            global _spare
            own = _spare
            if own is None or len(own) < predict:
                own = bytearray(predict)
                if predict <= _SPARE_MAX:
                    _spare = own
            self.lent = own
            return memoryview(own)[:predict]
        self.lent = None
        return _shared_read or _allocate_shared_read()

    def buffer_updated(self, nbytes: int) -> None:
        connection = self.connection
        lent = self.lent
        self.lent = None
        connection.active = True
        if lent is _DIRECT:
            events = connection.received_into(nbytes)
        elif lent is None:
            assert _shared_read is not None
            events = connection.receive_data(_shared_read[:nbytes])
        else:
            assert isinstance(lent, bytearray)
            events = connection.receive_data(memoryview(lent)[:nbytes], keep=True)
            if not connection.partial_frame and nbytes < self.predict:
                self.predict = 0  # smaller messages now
            if connection.keeps(lent):
                global _spare
                if lent is _spare:
                    _spare = None  # the partial frame's buffer now
        partial = connection.partial_frame
        if partial >= _LARGE_FRAME:
            self.predict = partial
        connection.handle_read(events, nbytes)
        transport = connection.transport
        if (
            not self.predict
            and connection.read_into() is None
            and transport is not None
            and transport.get_protocol() is self
            and not transport.is_closing()
        ):
            transport.set_protocol(connection)  # small frames again: a plain read

    def data_received(self, data: bytes) -> None:
        """(A transport that read before it saw the change of protocol.)"""
        self.connection.data_received(data)

    def eof_received(self) -> bool | None:
        return self.connection.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()
