"""Raw WebSocket clients on asyncio Protocols, many per event loop, for load generation.

Layer 5 of docs/architecture.md. One `WsClient` per connection (a streaming asyncio
protocol with `__slots__`, no task of its own; `TlsWsClient` over TLS, `CountingTlsClient`
for fan-out receivers that count TLS records without decrypting them) feeds bytes to
`wire.FrameParser` and reports to a shared `ClientPool`, which each scenario subclasses to
react to messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import math
import os
import resource
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, cast

from loadtest import wire

#: Linux's socket option that defers a bound socket's port choice to connect().
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Clients one source address may hold before another address in 127.0.0.0/8 is used.
CLIENTS_PER_SOURCE_ADDRESS = 25_000

HANDSHAKING, OPEN, CLOSING, CLOSED = range(4)


#: glibc's mallopt() parameters (malloc.h) and the load generator's settings: buffers of
#: large messages come from the heap and stay there, instead of an mmap, page faults and
#: a munmap for each (which made the load generator, not the server, the limit).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LOADGEN_MALLOPT = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 256 << 20}


def tune_loadgen_allocator() -> bool:
    """Set `_LOADGEN_MALLOPT` in this process (glibc only; the servers it starts are
    other programs and keep their own settings). True when every setting took."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(key, value) == 1 for key, value in _LOADGEN_MALLOPT.items())


class LoopbackOnlyError(ValueError):
    """The load generator only ever talks to loopback addresses."""


def check_loopback(host: str) -> str:
    """Return `host` if it is an address in 127.0.0.0/8 or ::1, else raise."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise LoopbackOnlyError(
            f"--host {host!r} is not an IP address; use a loopback address such as 127.0.0.1"
        ) from None
    if address.version == 4 and address in ipaddress.ip_network("127.0.0.0/8"):
        return host
    if address.version == 6 and address == ipaddress.ip_address("::1"):
        return host
    raise LoopbackOnlyError(
        f"--host {host!r} is not a loopback address: loadtest only targets 127.0.0.0/8 or ::1"
    )


def source_addresses(host: str, clients: int, count: int = 0) -> list[str | None]:
    """Local addresses to bind client sockets to, spread round-robin over clients.

    One address holds about 28 000 ephemeral ports, so beyond CLIENTS_PER_SOURCE_ADDRESS
    clients the generator binds 127.0.0.1, 127.0.0.2, ... (all of 127.0.0.0/8 reaches the
    loopback interface on Linux). `[None]` means "let the kernel choose" (no bind).
    """
    if ipaddress.ip_address(host).version == 6:
        return [None]
    if count <= 0:
        if clients <= CLIENTS_PER_SOURCE_ADDRESS:
            return [None]
        count = math.ceil(clients / CLIENTS_PER_SOURCE_ADDRESS)
    count = min(count, 250)
    return [f"127.0.0.{index}" for index in range(1, count + 1)]


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to the hard limit (and the hard limit too, when privileged
    and `needed` exceeds it). Child processes, the server under test included, inherit it.
    Returns the new (soft, hard).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            soft, hard = needed, needed
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


class WsClient(asyncio.BaseProtocol):
    """One client connection: upgrade, then frames in and out (RFC 6455 §4 and §5)."""

    __slots__ = (
        "close_code",
        "data",
        "deflate_bits",
        "error",
        "head",
        "host",
        "index",
        "key",
        "outbox",
        "parser",
        "pool",
        "port",
        "state",
        "t_open",
        "t_start",
        "transport",
        "waiter",
    )

    #: The client speaks TLS itself over a plain connection (`CountingTlsClient`).
    own_tls: ClassVar[bool] = False

    def __init__(self, pool: ClientPool, index: int, host: str, port: int) -> None:
        self.pool = pool
        self.index = index
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.key = wire.new_key()
        self.head = bytearray()
        self.parser: wire.FrameParser | None = None
        self.state = HANDSHAKING
        self.t_start = time.perf_counter()
        self.t_open = 0.0
        self.close_code: int | None = None
        self.error: str | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.data: Any = None
        #: permessage-deflate agreed: the window our compressed frames may use; 0: not agreed
        self.deflate_bits = 0
        #: frames sent while a read is handled: written at its end, in one write
        self.outbox: list[bytes] | None = None

    # asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(
            wire.upgrade_request(self.host, self.port, self.key, extensions=self.pool.offer)
        )

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == HANDSHAKING:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > wire.MAX_RESPONSE_HEAD:
                        raise wire.ProtocolError("upgrade response head too large")
                    return
                agreed = wire.check_upgrade_response(bytes(self.head[:end]), self.key)
                if agreed is not None:
                    if self.pool.offer is None:
                        raise wire.ProtocolError(f"extension not offered: {agreed!r}")
                    self.deflate_bits = wire.deflate_window_bits(agreed)
                    self.pool.extensions_agreed += 1
                rest = bytes(self.head[end + 4 :])
                self.head = bytearray()
                self.parser = wire.FrameParser(compressed=agreed is not None)
                self.state = OPEN
                self.t_open = time.perf_counter()
                self.pool.on_open(self)
                if not rest:
                    return
                data = rest
            parser = self.parser
            if parser is None:
                return
            if self.state == OPEN:
                # the usual read: one whole message (a fan-out delivery, an echo answer)
                message = parser.whole_message(data)
                if message is not None:
                    self.pool.on_message(self, message[0], message[1])
                    return
            # the answers to every message of this read go out in one write,
            # so the load generator spends one syscall per read, not per message
            outbox: list[bytes] = []
            self.outbox = outbox
            try:
                for opcode, payload in parser.feed(data):
                    if opcode & 0x0F <= wire.Opcode.BINARY:  # text or binary, maybe compressed
                        if self.state == OPEN:
                            self.pool.on_message(self, opcode, payload)
                    elif opcode == wire.Opcode.PING:
                        self._write_control(wire.Opcode.PONG, payload)
                    elif opcode == wire.Opcode.CLOSE:
                        self._on_close_frame(payload)
            finally:
                self.outbox = None
                if outbox and self.transport is not None:
                    self.transport.write(b"".join(outbox))
        except wire.ProtocolError as exc:
            self.fail(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None and self.state != CLOSING:
            self.error = f"connection lost: {exc}"
        previous = self.state
        self.state = CLOSED
        self.transport = None
        self.pool.on_lost(self, previous)

    # sending ----------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Write a frame built (and masked) in advance with `wire.encode_frame`."""
        if self.transport is not None and self.state == OPEN:
            outbox = self.outbox
            if outbox is not None:
                outbox.append(frame)
            else:
                self.transport.write(frame)

    def close(self, code: int = wire.CloseCode.NORMAL_CLOSURE) -> None:
        """Start the closing handshake (RFC 6455 §7.1.2); the server closes TCP."""
        if self.state == OPEN:
            self._write_control(wire.Opcode.CLOSE, wire.close_payload(code))
            self.state = CLOSING
        elif self.transport is not None and self.state == HANDSHAKING:
            self.transport.close()

    def drop(self) -> None:
        """Send Close if open, then close TCP at once without waiting for the server."""
        if self.transport is None:
            return
        if self.state == OPEN:
            self._write_control(wire.Opcode.CLOSE, wire.close_payload(wire.CloseCode.GOING_AWAY))
            self.state = CLOSING
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def fail(self, reason: str) -> None:
        """A protocol violation: remember why and drop the connection (RFC 6455 §7.1.7)."""
        if self.error is None:
            self.error = reason
        self.pool.on_error(self, reason)
        if self.transport is not None:
            self.transport.abort()

    def _write_control(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None:
            frame = wire.encode_frame(opcode, payload, mask=os.urandom(4))
            if self.outbox is not None:
                self.outbox.append(frame)  # after the answers already queued
            else:
                self.transport.write(frame)

    def _on_close_frame(self, payload: bytes) -> None:
        code, _ = wire.parse_close_payload(payload)
        self.close_code = code
        if self.state == OPEN:
            echo = wire.close_payload(code) if code is not None else b""
            self._write_control(wire.Opcode.CLOSE, echo)
            self.state = CLOSING
            self.pool.on_server_close(self, code)


#: The buffer every TLS client of the process decrypts its reads into.
_tls_read_buffer = memoryview(bytearray(64 * 1024))


class TlsWsClient(WsClient, asyncio.BufferedProtocol):
    """A client over TLS, fed from one buffer shared by the process: uvloop gives a
    streaming protocol each TLS read as a new 256 KiB `bytes` shrunk to size (an mmap and
    munmap per read, which would make the load generator the bottleneck)."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _tls_read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_tls_read_buffer[:nbytes].tobytes())


#: TLS 1.3 record layer (RFC 8446 §5): a 5-byte header, then the body; an application
#: data record's body is the encrypted plaintext, its 1-byte inner content type and
#: the AEAD tag (16 bytes for every TLS 1.3 cipher suite OpenSSL enables by default).
_RECORD_HEADER = 5
_APPLICATION_DATA = 23
_TLS13_RECORD_OVERHEAD = 1 + 16
_TLS13_16_BYTE_TAG_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)


class RecordCounter:
    """Follows the TLS record framing of a byte stream: where each record ends, and how
    many plaintext bytes the application data records that ended carried (TLS 1.3)."""

    __slots__ = ("header", "plaintext", "remaining")

    def __init__(self) -> None:
        self.header = bytearray()  # a record header being read
        self.remaining = 0  # body bytes of the current record still to come
        self.plaintext = 0  # plaintext of the current record (0: not application data)

    @property
    def at_boundary(self) -> bool:
        return not self.header and self.remaining == 0

    def feed(self, data: bytes) -> int:
        """The plaintext bytes of the application data records that ``data`` completed."""
        done = 0
        position, end = 0, len(data)
        while position < end:
            if self.remaining:
                step = min(self.remaining, end - position)
                position += step
                self.remaining -= step
                if not self.remaining:
                    done += self.plaintext
                continue
            needed = _RECORD_HEADER - len(self.header)
            self.header += data[position : position + needed]
            position += needed
            if len(self.header) < _RECORD_HEADER:
                break
            length = int.from_bytes(self.header[3:5], "big")
            kind = self.header[0]
            self.header.clear()
            plaintext = length - _TLS13_RECORD_OVERHEAD if kind == _APPLICATION_DATA else 0
            self.plaintext = max(plaintext, 0)
            self.remaining = length  # an empty record carries no plaintext either
        return done


class _BioTransport:
    """What a `WsClient` writes through when the client does TLS itself: encrypt, then
    write the records to the TCP transport."""

    __slots__ = ("outgoing", "raw", "tls")

    def __init__(self, raw: asyncio.Transport, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO):
        self.raw, self.tls, self.outgoing = raw, tls, outgoing

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self.raw.write(self.outgoing.read())

    def close(self) -> None:
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


class CountingTlsClient(WsClient):
    """A client that does its own TLS (`ssl.MemoryBIO`) over a plain TCP connection, so
    that it can stop decrypting: after `count_from_now`, each application data record
    that arrives is counted by its length (TLS 1.3: the plaintext is the record less 17
    bytes) and handed to ``on_plaintext`` undecrypted, as compressed fan-out deliveries
    are counted without inflating them; one checking client of the run still decrypts
    and checks everything. Its sending direction, which has its own keys and sequence
    numbers, still works (a Close frame at the end); it can no longer read one.
    """

    __slots__ = ("counted", "handshaken", "incoming", "on_plaintext", "records", "tls")
    own_tls = True

    def __init__(self, pool: ClientPool, index: int, host: str, port: int) -> None:
        super().__init__(pool, index, host, port)
        self.incoming = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self.records = RecordCounter()
        self.handshaken = False
        #: counting: plaintext bytes counted toward the next whole message
        self.counted = 0
        #: counting: called with the plaintext bytes of each record that ended
        self.on_plaintext: Callable[[CountingTlsClient, int], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        context = self.pool.ssl
        assert context is not None
        outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, outgoing, server_hostname=self.pool.server_hostname
        )
        self.transport = cast(asyncio.Transport, _BioTransport(raw, self.tls, outgoing))
        self._handshake()

    def _handshake(self) -> bool:
        """Drive the TLS handshake; True once it is done (the upgrade request is sent)."""
        tls, transport = self.tls, self.transport
        assert tls is not None and isinstance(transport, _BioTransport)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as exc:
            self.fail(f"TLS handshake failed: {exc}")
            return False
        else:
            done = True
        pending = transport.outgoing.read()
        if pending:
            transport.raw.write(pending)
        if done:
            self.handshaken = True
            WsClient.connection_made(self, transport)  # the upgrade request
        return done

    def data_received(self, data: bytes) -> None:
        plaintext = self.records.feed(data)
        on_plaintext = self.on_plaintext
        if on_plaintext is not None:
            if plaintext:
                on_plaintext(self, plaintext)
            return
        tls = self.tls
        if tls is None:
            return
        self.incoming.write(data)
        if not self.handshaken and not self._handshake():
            return
        chunks = []
        while True:
            try:
                chunk = tls.read(64 * 1024)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                break
            except ssl.SSLError as exc:
                self.fail(f"TLS: {exc}")
                return
            if not chunk:
                break
            chunks.append(chunk)
        if chunks:
            WsClient.data_received(self, b"".join(chunks))

    def count_from_now(self, on_plaintext: Callable[[CountingTlsClient, int], None]) -> bool:
        """Stop decrypting; False if this connection cannot (not TLS 1.3 with a 16-byte
        tag, or bytes of a record, or plaintext, still to be read)."""
        tls = self.tls
        if (
            tls is None
            or self.state != OPEN
            or tls.version() != "TLSv1.3"
            or (tls.cipher() or ("",))[0] not in _TLS13_16_BYTE_TAG_SUITES
            or not self.records.at_boundary
            or self.incoming.pending
            or tls.pending()
            or self.parser is None
            or not self.parser.idle
        ):
            return False
        self.on_plaintext = on_plaintext
        return True


class ClientPool:
    """All the clients of one run and their counters; scenarios subclass the hooks."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        #: Sec-WebSocket-Extensions to offer (`--offer-deflate`); None: no extension.
        self.offer: str | None = None
        #: Upgrades whose response agreed to an extension.
        self.extensions_agreed = 0
        #: TLS (`--tls`): the client context, and the name its certificate is checked for.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        self.clients: list[WsClient] = []
        self.open_count = 0
        self.opened_total = 0
        self.failed = 0
        self.lost_while_open = 0
        self.server_closes = 0
        self.errors: Counter[str] = Counter()
        self.handshake_times: list[float] = []
        self.on_change: Callable[[], None] | None = None

    @property
    def client_class(self) -> type[WsClient]:
        return WsClient if self.ssl is None else TlsWsClient

    def new_client(self) -> WsClient:
        client = self.client_class(self, len(self.clients), self.host, self.port)
        self.clients.append(client)
        return client

    # hooks called by WsClient --------------------------------------------------------

    def on_open(self, client: WsClient) -> None:
        self.open_count += 1
        self.opened_total += 1
        self.handshake_times.append(client.t_open - client.t_start)
        if client.waiter is not None and not client.waiter.done():
            client.waiter.set_result(True)

    def on_message(self, client: WsClient, opcode: int, payload: bytes) -> None:
        """A complete data message arrived; scenarios override."""

    def on_server_close(self, client: WsClient, code: int | None) -> None:
        self.server_closes += 1

    def on_error(self, client: WsClient, reason: str) -> None:
        if client.state != HANDSHAKING:  # upgrade failures are counted by on_lost
            self.errors[_short(reason)] += 1

    def on_lost(self, client: WsClient, previous_state: int) -> None:
        if previous_state in (OPEN, CLOSING):
            self.open_count -= 1
        if previous_state == OPEN:
            self.lost_while_open += 1
        elif previous_state == HANDSHAKING:
            self.failed += 1
            self.errors[_short(client.error or "closed during the upgrade")] += 1
        if client.waiter is not None and not client.waiter.done():
            client.waiter.set_result(previous_state != HANDSHAKING)

    # connecting ----------------------------------------------------------------------

    async def connect_one(self, source: str | None, timeout: float) -> WsClient | None:
        """Open one client and wait (bounded) for the upgrade; None if it failed."""
        loop = asyncio.get_running_loop()
        client = self.new_client()
        client.waiter = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                tls: dict[str, Any] = {}
                if self.ssl is not None and not client.own_tls:
                    tls = {"ssl": self.ssl, "server_hostname": self.server_hostname}
                if source is None:
                    await loop.create_connection(lambda: client, self.host, self.port, **tls)
                else:
                    sock = await self._connect_from(source)
                    await loop.create_connection(lambda: client, sock=sock, **tls)
                opened = await client.waiter
        except (OSError, TimeoutError) as exc:
            if client.transport is not None:
                client.error = client.error or f"{type(exc).__name__} during the upgrade"
                client.abort()  # connection_lost counts the failure
            elif client.state == HANDSHAKING:
                client.state = CLOSED
                self.failed += 1
                self.errors[_short(f"{type(exc).__name__}: {exc}")] += 1
            return None
        finally:
            client.waiter = None
        return client if opened else None

    async def _connect_from(self, source: str) -> socket.socket:
        """A TCP socket from ``source`` to the server, its port picked at connect time.

        A plain ``bind((source, 0))`` makes the kernel find a port free for
        *every* destination, a search that slows down as the ports fill
        (tens of thousands of clients per address); with
        ``IP_BIND_ADDRESS_NO_PORT`` the port is chosen by ``connect`` for this
        destination only.
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setblocking(False)
            sock.bind((source, 0))
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def ramp(
        self,
        count: int,
        *,
        rate: float,
        concurrency: int,
        sources: list[str | None],
        deadline: float,
        connect_timeout: float = 10.0,
    ) -> None:
        """Open `count` clients at `rate` per second with at most `concurrency` upgrades
        in flight, using `concurrency` connector coroutines (no task per client).
        Stops early at `deadline` (a `time.monotonic()` value).
        """
        start = time.monotonic()
        next_index = 0

        async def connector() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                if rate > 0:
                    delay = start + index / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                await self.connect_one(
                    sources[index % len(sources)], min(connect_timeout, remaining)
                )
                if self.on_change is not None:
                    self.on_change()

        workers = max(1, min(concurrency, count))
        await asyncio.gather(*(connector() for _ in range(workers)))

    async def close_all(self, timeout: float = 5.0) -> None:
        """Close every client (Close frame, then TCP close), aborting stragglers."""
        for client in self.clients:
            client.drop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c.transport is not None for c in self.clients):
            await asyncio.sleep(0.05)
        for client in self.clients:
            client.abort()


def _short(reason: str) -> str:
    return reason if len(reason) <= 120 else reason[:117] + "..."
