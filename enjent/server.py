"""The application's server: :class:`WebSocketServer`.

Server layer (layer 2 of docs/architecture.md): handlers, the handshake policy, rooms,
broadcast, one keepalive/timeout sweep per server, graceful stop. On a
cluster (``workers > 1``) the bus client of :mod:`enjent.cluster` is plugged
in as ``server.cluster`` and the same calls reach every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import ipaddress
import logging
import os
import secrets
import signal
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .client import WebSocketClient
from .connection import Connection
from .deflate import DeflateOptions, PerMessageDeflate, negotiate
from .exceptions import HandshakeRejected, WebSocketNegotiationError, WebSocketServerError
from .frames import CloseCode, Opcode, encode_frame
from .handshake import (
    accept_response,
    is_upgrade_request,
    offered_subprotocols,
    select_subprotocol,
    validate_upgrade,
)
from .http11 import Headers, Request, encode_response, json_response, text_response
from .metrics import METRICS_CONTENT_TYPE, WorkerSample, render_metrics
from .protocol import State
from .rooms import Room

if TYPE_CHECKING:
    from .cluster import ClusterClient

__all__ = ["Accept", "AppServesOnImport", "Response", "WebSocketServer"]

logger = logging.getLogger("enjent.server")

F = TypeVar("F", bound=Callable[..., Any])
Message = str | bytes

_PING_FRAME = encode_frame(Opcode.PING.value, b"")
_OPEN = State.OPEN
_TEXT = Opcode.TEXT.value
_BINARY = Opcode.BINARY.value


@dataclass
class Accept:
    """Returned by an ``on_handshake`` hook: accept, with these choices.

    ``subprotocol`` must be one the client offered; ``data`` is attached to
    the client as ``client.data``; ``headers`` are added to the 101 response.
    """

    subprotocol: str | None = None
    data: Any = None
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Response:
    """Returned by an ``on_handshake`` hook: answer with plain HTTP instead.

    A 4xx status refuses the client (e.g. 401, 403); a 200 serves a small
    page (the chat example serves its HTML this way). The connection closes
    after the response.
    """

    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, server_header: str | None) -> bytes:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        if server_header:
            headers.append(("Server", server_header))
        headers.extend(self.headers)
        return encode_response(self.status, headers, body)


HandshakeHook = Callable[[Request], "Accept | Response | None"]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _encode_message(data: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, str):
        return encode_frame(_TEXT, data.encode("utf-8"))
    if isinstance(data, bytes | bytearray | memoryview):
        return encode_frame(_BINARY, data)
    raise TypeError(f"a message is str or bytes, not {type(data).__name__}")


class OutgoingMessage:
    """One message to many clients: the frame is encoded once, and compressed
    at most once per distinct permessage-deflate setting (not per client)."""

    __slots__ = ("_compressed", "frame", "opcode", "payload")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.opcode = frame[0] & 0x0F
        length = frame[1] & 0x7F
        offset = 2 if length < 126 else (4 if length == 126 else 10)
        self.payload = memoryview(frame)[offset:]
        self._compressed: dict[int, bytes] | None = None

    def frame_for(self, extension: PerMessageDeflate) -> bytes:
        """The frame for a connection that negotiated permessage-deflate."""
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
            frame = encode_frame(self.opcode, extension.encode(bytes(self.payload)), rsv1=True)
            cache[key] = frame
        return frame


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _ping_interval(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be positive, or None to disable keepalive, got {value!r}")
    return float(value)


def _http_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{name} must be a path starting with '/', or None, got {value!r}")
    return value


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a str or None, got {value!r}")
    return value


def _client_class(name: str, value: Any) -> type[WebSocketClient]:
    if not isinstance(value, type) or not issubclass(value, WebSocketClient):
        raise TypeError("client_class must be a subclass of WebSocketClient")
    return value


def _client_factory(name: str, value: Any) -> Callable[[Request], WebSocketClient] | None:
    if value is not None and not callable(value):
        raise TypeError("client_factory must be a callable taking the Request, or None")
    return value  # type: ignore[no-any-return]


def _compression(name: str, value: Any) -> DeflateOptions | None:
    if value == "deflate":
        return DeflateOptions()
    if value is None or isinstance(value, DeflateOptions):
        return value
    raise ValueError(f"compression must be 'deflate', None or a DeflateOptions, got {value!r}")


def _subprotocols(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"subprotocols must be a sequence of str, got {value!r}")
    return list(value)


def _allowed_origins(name: str, value: Any) -> set[str | None] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(item is None or isinstance(item, str) for item in value):
        raise ValueError(
            f"allowed_origins must be None or a list of origins (None in it: no Origin), "
            f"got {value!r}"
        )
    return set(value)


def _trusted_proxies(name: str, value: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    if isinstance(value, str):
        raise ValueError("trusted_proxies is a list of addresses or networks, not one str")
    try:
        return [ipaddress.ip_network(item, strict=False) for item in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trusted_proxies: {exc}") from None


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


#: Every option of WebSocketServer and the check that normalizes its value.
_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "subprotocols": _subprotocols,
    "allowed_origins": _allowed_origins,
    "health_path": _http_path,
    "metrics_path": _http_path,
    "trusted_proxies": _trusted_proxies,
    "client_class": _client_class,
    "client_factory": _client_factory,
    "server_header": _optional_str,
    "access_log": _flag,
    "compression": _compression,
    "max_message_size": _positive_int,
    "max_connections": _positive_int,
    "write_limit": _positive_int,
    "max_request_size": _positive_int,
    "max_request_line": _positive_int,
    "handshake_timeout": _positive_seconds,
    "ping_interval": _ping_interval,
    "ping_timeout": _positive_seconds,
    "close_timeout": _positive_seconds,
    "sweep_interval": _positive_seconds,
}


class WebSocketServer:
    """A WebSocket server: register handlers, then ``run`` or ``start`` it.

    Every option is keyword-only, with a safe default:

    Compression
        ``compression``: ``"deflate"`` (the default: permessage-deflate
        without context takeover, so idle connections keep no zlib state
        and a broadcast is compressed once), ``None`` (off), or a
        :class:`~enjent.deflate.DeflateOptions` (window bits, memory level,
        level, ``min_size`` below which messages go uncompressed).
    Handshake
        ``subprotocols`` (server's preference order), ``allowed_origins``
        (``None``: any; otherwise a list, others get 403), ``health_path``
        (``None`` disables it), ``trusted_proxies`` (addresses or networks
        whose ``X-Forwarded-For``/``X-Real-Ip`` is believed),
        ``client_class`` / ``client_factory``, ``server_header``.
    Limits
        ``max_message_size`` (1 MiB; close 1009), ``max_connections`` (per
        worker, 25,000; 503 at the handshake), ``write_limit`` (512 KiB of
        unsent data per client: see *slow consumers* below),
        ``max_request_size`` (16 KiB of request head; 431),
        ``max_request_line`` (8 KiB; 414).
    Timeouts (seconds)
        ``handshake_timeout`` (10), ``ping_interval`` (20; ``None`` disables
        keepalive), ``ping_timeout`` (20; close 1011), ``close_timeout`` (5).

    Slow consumers: a client whose unsent data exceeds ``write_limit`` is
    not read from until it drains (backpressure on its own requests); a
    message sent to it meanwhile is refused (``send`` returns ``False``) and
    the client is closed with 1008 (policy violation), aborted if it cannot
    take the close frame within ``close_timeout``. Memory per client is thus
    bounded by about ``write_limit`` plus one message.
    """

    # declared here, set (validated) by configure()
    compression: DeflateOptions | None
    subprotocols: list[str]
    allowed_origins: set[str | None] | None
    health_path: str | None
    metrics_path: str | None
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    client_class: type[WebSocketClient]
    client_factory: Callable[[Request], WebSocketClient] | None
    server_header: str | None
    access_log: bool
    max_message_size: int
    max_connections: int
    write_limit: int
    max_request_size: int
    max_request_line: int
    handshake_timeout: float
    ping_interval: float | None
    ping_timeout: float
    close_timeout: float
    sweep_interval: float

    def __init__(
        self,
        *,
        subprotocols: Sequence[str] = (),
        allowed_origins: Iterable[str | None] | None = None,
        health_path: str | None = "/healthz",
        metrics_path: str | None = "/metrics",
        trusted_proxies: Iterable[str] = (),
        client_class: type[WebSocketClient] = WebSocketClient,
        client_factory: Callable[[Request], WebSocketClient] | None = None,
        server_header: str | None = "enjent",
        access_log: bool = False,
        compression: str | DeflateOptions | None = "deflate",
        max_message_size: int = 1 << 20,
        max_connections: int = 25_000,
        write_limit: int = 512 * 1024,
        max_request_size: int = 16 * 1024,
        max_request_line: int = 8 * 1024,
        handshake_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        close_timeout: float = 5.0,
        sweep_interval: float = 1.0,
    ) -> None:
        self.configure(
            subprotocols=subprotocols,
            allowed_origins=allowed_origins,
            health_path=health_path,
            metrics_path=metrics_path,
            trusted_proxies=trusted_proxies,
            client_class=client_class,
            client_factory=client_factory,
            server_header=server_header,
            access_log=access_log,
            compression=compression,
            max_message_size=max_message_size,
            max_connections=max_connections,
            write_limit=write_limit,
            max_request_size=max_request_size,
            max_request_line=max_request_line,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            sweep_interval=sweep_interval,
        )
        self._connect_handlers: list[Callable[..., Any]] = []
        self._message_handlers: list[Callable[..., Any]] = []
        self._single_message_handler: Callable[..., Any] | None = None
        self._disconnect_handlers: list[Callable[..., Any]] = []
        self._error_handlers: list[Callable[..., Any]] = []
        self._control_handlers: list[Callable[..., Any]] = []
        self._handshake_hooks: list[HandshakeHook] = []

        #: This worker's index in the cluster (0 on one process).
        self.shard = 0
        #: The bus client when running as a cluster worker, else ``None``.
        self.cluster: ClusterClient | None = None
        self._generation = secrets.token_hex(3)
        self._next_id = 0
        self._clients: dict[str, WebSocketClient] = {}
        self._rooms: dict[str, set[WebSocketClient]] = {}
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._now = 0.0
        self._stopping = False
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "connections_accepted",
                "connections_refused",
                "handshakes_refused",
                "handshake_timeouts",
                "keepalive_timeouts",
                "protocol_errors",
                "slow_consumers_closed",
                "handler_errors",
                "http_responses",
                "messages_received",
                "messages_sent",
                "bytes_received",
                "bytes_sent",
            ),
            0,
        )

    def configure(self, **options: Any) -> None:
        """Change options by name, with the checks of the constructor.

        What ``enjent run`` uses to apply the command line and ``ENJENT_*``
        over the app's own values. Connections opened afterwards see the new
        values; limits of connections already open stay as they were.
        Raises ``TypeError`` for an unknown option and ``ValueError`` for a
        bad value.
        """
        unknown = sorted(set(options) - _OPTION_CHECKS.keys())
        if unknown:
            raise TypeError(f"unknown WebSocketServer option(s): {', '.join(unknown)}")
        for name, value in options.items():
            setattr(self, name, _OPTION_CHECKS[name](name, value))

    # ------------------------------------------------------------ handlers

    def on_connect(self, handler: F) -> F:
        """Register ``handler(client)``, called once the handshake succeeded."""
        self._connect_handlers.append(handler)
        return handler

    def on_message(self, handler: F) -> F:
        """Register ``handler(client, message)``; ``message`` is str or bytes."""
        self._message_handlers.append(handler)
        handlers = self._message_handlers
        # one plain function: connections call it directly (the hot path)
        self._single_message_handler = (
            handlers[0]
            if len(handlers) == 1 and not inspect.iscoroutinefunction(handlers[0])
            else None
        )
        return handler

    def on_disconnect(self, handler: F) -> F:
        """Register ``handler(client, code, reason)``, called once per client."""
        self._disconnect_handlers.append(handler)
        return handler

    def on_error(self, handler: F) -> F:
        """Register ``handler(client_or_None, exc)`` for exceptions in handlers."""
        self._error_handlers.append(handler)
        return handler

    def on_control_frame(self, handler: F) -> F:
        """Register ``handler(client, event)`` for pings and pongs received."""
        self._control_handlers.append(handler)
        return handler

    def on_handshake(self, hook: F) -> F:
        """Register ``hook(request)`` run before a client is accepted.

        It may return ``None`` (accept), :class:`Accept` (choose the
        subprotocol, attach ``data``, add headers), :class:`Response` (answer
        with plain HTTP: refuse with 401/403, or serve a page), or raise
        :class:`~enjent.HandshakeRejected`. It runs for plain HTTP requests
        too, so it can serve a page at ``/``. It must be a plain function
        that does not block (the handshake is answered within one read);
        do slow authentication in ``on_connect`` and close the client there.
        """
        if inspect.iscoroutinefunction(hook):
            raise TypeError(
                "on_handshake hooks must be plain functions (the handshake is answered "
                "synchronously); check credentials asynchronously in on_connect instead"
            )
        self._handshake_hooks.append(hook)
        return hook

    def _call(self, handlers: list[Callable[..., Any]], client: Any, *args: Any) -> None:
        for handler in handlers:
            try:
                result = handler(*args)
            except Exception as exc:
                self._report_error(client, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                self._spawn(result, client)

    def _spawn(self, awaitable: Awaitable[Any], client: Any, *, report: bool = True) -> None:
        async def run() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if report:
                    self._report_error(client, exc)
                else:  # a failing async on_error must not call on_error again, forever
                    logger.error("error in an on_error handler", exc_info=exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report_error(self, client: Any, exc: BaseException) -> None:
        self.stats["handler_errors"] += 1
        logger.error("error in a handler for %s", client, exc_info=exc)
        for handler in self._error_handlers:
            try:
                result = handler(client, exc)
                if result is not None and inspect.isawaitable(result):
                    self._spawn(result, None, report=False)
            except Exception:
                logger.exception("error in an on_error handler")

    def _dispatch_message(self, client: WebSocketClient, message: Message) -> None:
        handlers = self._message_handlers
        if len(handlers) == 1:
            try:
                result = handlers[0](client, message)
            except Exception as exc:
                self._report_error(client, exc)
                return
            if result is not None and inspect.isawaitable(result):
                self._spawn(result, client)
        elif handlers:
            self._call(handlers, client, client, message)

    def _dispatch_control(self, client: WebSocketClient, event: Any) -> None:
        if self._control_handlers:
            self._call(self._control_handlers, client, client, event)

    # ----------------------------------------------------------- handshake

    def _handshake(
        self, request: Request
    ) -> tuple[bytes, WebSocketClient | None, PerMessageDeflate | None]:
        """Decide on a parsed request: a 101 and a new client, or an HTTP answer."""
        upgrade = is_upgrade_request(request)
        if not upgrade:
            path = request.path
            if path == self.health_path:
                return json_response(200, self.health()), None, None
            if path == self.metrics_path:
                return text_response(200, self.metrics(), METRICS_CONTENT_TYPE), None, None
        if upgrade and len(self._clients) >= self.max_connections:
            raise WebSocketNegotiationError(
                503, "server full (max_connections)", headers=[("Retry-After", "5")]
            )
        if upgrade and self.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin not in self.allowed_origins:
                if origin is None:
                    raise WebSocketNegotiationError(
                        403, "a request without Origin is not allowed here"
                    )
                raise WebSocketNegotiationError(403, f"origin {origin!r} not allowed")
        accept = Accept()
        for hook in self._handshake_hooks:
            answer = hook(request)
            if isinstance(answer, Response):
                return answer.encode(self.server_header), None, None
            if isinstance(answer, Accept):
                accept = answer
            elif answer is not None:
                raise TypeError(
                    f"on_handshake hook returned {type(answer).__name__}; "
                    "return None, Accept(...) or Response(...)"
                )
        key = validate_upgrade(request)
        offered = offered_subprotocols(request)
        if accept.subprotocol is not None:
            if accept.subprotocol not in offered:
                raise HandshakeRejected(
                    400, f"subprotocol {accept.subprotocol!r} was not offered by the client"
                )
            subprotocol: str | None = accept.subprotocol
        else:
            subprotocol = select_subprotocol(offered, self.subprotocols)
        if self.client_factory is not None:
            client = self.client_factory(request)
            if not isinstance(client, WebSocketClient):
                raise TypeError("client_factory must return a WebSocketClient")
        else:
            client = self.client_class(request)
        self._next_id += 1
        client.id = f"{self.shard}-{self._generation}-{self._next_id:x}"
        client.subprotocol = subprotocol
        if accept.data is not None:
            client.data = accept.data
        client._server = self
        extension = None
        extensions_header = None
        if self.compression is not None:
            offers = request.headers.get_all("Sec-WebSocket-Extensions")
            negotiated = negotiate(offers, self.compression) if offers else None
            if negotiated is not None:
                extension = PerMessageDeflate(
                    negotiated, self.compression, max_message_size=self.max_message_size
                )
                extensions_header = negotiated.response()
        extra = list(accept.headers)
        if self.server_header:
            extra.append(("Server", self.server_header))
        response = accept_response(
            key, subprotocol=subprotocol, extensions=extensions_header, extra_headers=extra
        )
        request.compact()
        return response, client, extension

    def _client_ready(self, client: WebSocketClient) -> None:
        self.stats["connections_accepted"] += 1
        self._clients[client.id] = client
        if self.cluster is not None:
            self.cluster.client_connected(client)
        if self._connect_handlers:
            self._call(self._connect_handlers, client, client)

    def _client_gone(self, client: WebSocketClient, code: int, reason: str) -> None:
        if self._clients.pop(client.id, None) is None:
            return
        for name in client._rooms or ():
            self._room_remove_member(client, name)
        if self.cluster is not None:
            self.cluster.client_disconnected(client)
        if self._disconnect_handlers:
            self._call(self._disconnect_handlers, client, client, code, reason)

    def _client_address(self, host: str, headers: Headers) -> str:
        if not self.trusted_proxies or not self._is_trusted(host):
            return host
        forwarded = [
            part.strip()
            for value in headers.get_all("X-Forwarded-For")
            for part in value.split(",")
            if part.strip()
        ]
        for address in reversed(forwarded):
            if not _is_ip(address):
                return host  # garbage from the proxy chain: trust nothing in it
            if not self._is_trusted(address):
                return address
        real_ip = (headers.get("X-Real-Ip") or "").strip()
        if real_ip and _is_ip(real_ip):
            return real_ip
        return forwarded[0] if forwarded else host

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    # ------------------------------------------------------ clients, rooms

    @property
    def clients(self) -> list[Any]:
        """Every client (on a cluster: proxies for the other workers' clients)."""
        if self.cluster is not None:
            return self.cluster.all_clients()
        return list(self._clients.values())

    @property
    def local_clients(self) -> list[WebSocketClient]:
        """The clients connected to this process."""
        return list(self._clients.values())

    @property
    def client_count(self) -> int:
        """The number of connected clients (cluster-wide on a cluster)."""
        if self.cluster is not None:
            return self.cluster.client_count()
        return len(self._clients)

    def get_client(self, client_id: str) -> Any:
        """The client with this id (a proxy if on another worker), or ``None``."""
        client = self._clients.get(client_id)
        if client is None and self.cluster is not None:
            return self.cluster.get_client(client_id)
        return client

    def send(self, client_id: str, data: str | bytes) -> bool:
        """Send to the client ``client_id`` wherever it is connected.

        Returns ``False`` if no such client is known (or it is closed here).
        """
        client = self._clients.get(client_id)
        if client is not None:
            return client.send(data)
        if self.cluster is not None:
            return self.cluster.send_to(client_id, data)
        return False

    def room(self, name: str) -> Room:
        """The room called ``name`` (a handle; members join with ``client.join``)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a room name is a non-empty str")
        return Room(self, name)

    @property
    def rooms(self) -> list[str]:
        """The names of the rooms with members on this process."""
        return list(self._rooms)

    def _room_join(self, client: WebSocketClient, name: str) -> None:
        members = self._rooms.get(name)
        if members is None:
            members = self._rooms[name] = set()
            if self.cluster is not None:
                self.cluster.room_created(name)
        members.add(client)

    def _room_leave(self, client: WebSocketClient, name: str) -> None:
        self._room_remove_member(client, name)

    def _room_remove_member(self, client: WebSocketClient, name: str) -> None:
        members = self._rooms.get(name)
        if members is not None:
            members.discard(client)
            if not members:
                del self._rooms[name]
                if self.cluster is not None:
                    self.cluster.room_deleted(name)

    # ----------------------------------------------------------- broadcast

    def broadcast(self, data: str | bytes, *, exclude: WebSocketClient | None = None) -> int:
        """Send ``data`` to every client (every worker on a cluster).

        The frame is encoded once and the same bytes go to every transport.
        Returns the number of clients of this process it was written to.
        """
        frame = _encode_message(data)
        if self.cluster is not None:
            self.cluster.publish_broadcast(frame, exclude.id if exclude is not None else None)
        return self._write_all(self._clients.values(), frame, exclude)

    def _broadcast_room(self, name: str, data: str | bytes, exclude: WebSocketClient | None) -> int:
        frame = _encode_message(data)
        if self.cluster is not None:
            self.cluster.publish_room([name], frame, exclude.id if exclude is not None else None)
        return self._write_all(self._rooms.get(name, ()), frame, exclude)

    def _broadcast_rooms(
        self, names: list[str], data: str | bytes, exclude: WebSocketClient | None
    ) -> int:
        frame = _encode_message(data)
        if self.cluster is not None:
            self.cluster.publish_room(names, frame, exclude.id if exclude is not None else None)
        return self._deliver_rooms(names, frame, exclude)

    def _deliver_rooms(
        self, names: Iterable[str], frame: bytes, exclude: WebSocketClient | None
    ) -> int:
        members: set[WebSocketClient] = set()
        for name in names:
            members |= self._rooms.get(name, set())
        return self._write_all(members, frame, exclude)

    def _write_all(
        self, clients: Iterable[WebSocketClient], frame: bytes, exclude: WebSocketClient | None
    ) -> int:
        """Write one encoded frame to many clients; returns how many took it."""
        count = 0
        message: OutgoingMessage | None = None
        # no copy of ``clients``: nothing below runs a handler or removes a
        # client synchronously (transports report losses on a later tick)
        sent_bytes = 0
        for client in clients:
            if client is exclude:
                continue
            connection = client._connection
            if connection is None:
                continue
            extension = connection.extension
            if extension is None:
                if connection.state is _OPEN and not connection._paused:  # inline fast path
                    if connection._batching:
                        connection.pending.append(frame)
                    else:
                        connection.transport.write(frame)  # type: ignore[union-attr]
                    count += 1
                    sent_bytes += len(frame)
                    continue
                sent = connection.send_frame(frame)
                written = len(frame)
            else:
                if message is None:
                    message = OutgoingMessage(frame)
                compressed = message.frame_for(extension)  # type: ignore[arg-type]
                sent = connection.send_frame(compressed)
                written = len(compressed)
            if sent:
                count += 1
                sent_bytes += written
        if count:
            stats = self.stats
            stats["messages_sent"] += count
            stats["bytes_sent"] += sent_bytes
        return count

    # ------------------------------------------------------------- health

    def health(self) -> dict[str, Any]:
        """What the health path answers: counts for load balancers."""
        if self.cluster is not None:
            return self.cluster.health()
        return {
            "status": "ok",
            "clients": len(self._clients),
            "workers": [{"shard": self.shard, "pid": os.getpid(), "clients": len(self._clients)}],
            "stats": dict(self.stats),
        }

    def metrics(self) -> str:
        """What the metrics path answers: Prometheus text, per worker and summed.

        On a cluster the other workers' figures come from their heartbeats
        (at most a heartbeat interval old).
        """
        if self.cluster is not None:
            samples = self.cluster.metrics_samples()
        else:
            samples = [WorkerSample(self.shard, len(self._clients), dict(self.stats))]
        return render_metrics(samples)

    # -------------------------------------------------------------- sweep

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._now = loop.time()
            try:
                self._sweep(self._now)
            except Exception:  # never let a bug stop keepalive
                logger.exception("error in the keepalive sweep")

    def _sweep(self, now: float) -> None:
        """One pass over every connection: handshake, keepalive, close timeouts."""
        ping_interval = self.ping_interval
        ping_timeout = self.ping_timeout
        close_timeout = self.close_timeout
        handshake_timeout = self.handshake_timeout
        for connection in list(self._connections):
            transport = connection.transport
            if transport is None:
                continue
            if connection.client is None:
                if now - connection.opened_at > handshake_timeout:
                    self.stats["handshake_timeouts"] += 1
                    transport.abort()
                continue
            if connection.active:
                connection.active = False
                connection.last_seen = now
                connection.ping_sent_at = 0.0
            state = connection.state
            if state is State.OPEN:
                if ping_interval is None:
                    continue
                if connection.ping_sent_at:
                    if now - connection.ping_sent_at > ping_timeout:
                        self.stats["keepalive_timeouts"] += 1
                        logger.info(
                            "closing %s: no pong within %ss", connection.client, ping_timeout
                        )
                        connection.fail_connection(CloseCode.INTERNAL_ERROR, "keepalive timeout")
                        connection.closing_since = now
                elif now - connection.last_seen >= ping_interval:
                    connection.ping_sent_at = now
                    transport.write(_PING_FRAME)
            elif not connection.closing_since:
                connection.closing_since = now
            elif now - connection.closing_since > close_timeout:
                transport.abort()

    # ---------------------------------------------------------- lifecycle

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 13003,
        *,
        ssl: ssl_module.SSLContext | None = None,
        reuse_port: bool = False,
        sock: Any = None,
        backlog: int = 1024,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`stop`."""
        if self._listener is not None:
            raise WebSocketServerError("this server is already started")
        _refuse_while_importing("start()")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._now = loop.time()
        self._stopping = False
        try:
            if sock is not None:
                self._listener = await loop.create_server(
                    lambda: Connection(self), sock=sock, ssl=ssl, backlog=backlog
                )
            else:
                self._listener = await loop.create_server(
                    lambda: Connection(self),
                    host,
                    port,
                    ssl=ssl,
                    reuse_port=reuse_port or None,
                    backlog=backlog,
                )
        except OSError as exc:
            raise WebSocketServerError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._sweeper = loop.create_task(self._sweep_forever())
        logger.debug("listening on %s", ", ".join(str(s.getsockname()) for s in self.sockets))

    @property
    def sockets(self) -> list[Any]:
        """The listening sockets (to find the port when started with port 0)."""
        return list(self._listener.sockets) if self._listener is not None else []

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        sockets = self.sockets
        if not sockets:
            raise WebSocketServerError("the server is not listening")
        return int(sockets[0].getsockname()[1])

    async def stop(self, *, close_timeout: float | None = None) -> None:
        """Stop gracefully: stop accepting, Close 1001 to every client, wait.

        Clients still connected after ``close_timeout`` are aborted.
        """
        if self._stopping:
            return
        self._stopping = True
        timeout = self.close_timeout if close_timeout is None else close_timeout
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._connections):
            if connection.client is None:
                if connection.transport is not None:
                    connection.transport.close()
            else:
                connection.close_websocket(CloseCode.GOING_AWAY, "server shutting down")
        deadline = loop.time() + timeout
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()
        await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        current = asyncio.current_task()  # a handler may await stop(): never wait on itself
        tasks = [task for task in self._tasks if task is not current]
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=timeout)
            for task in still_running:
                task.cancel()
        if self._listener is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._listener.wait_closed(), timeout)
            self._listener = None
        logger.info("stopped")

    @contextlib.asynccontextmanager
    async def serve(
        self, host: str = "127.0.0.1", port: int = 13003, **kwargs: Any
    ) -> AsyncIterator[WebSocketServer]:
        """``async with server.serve(host, port):`` — start, then stop on exit."""
        await self.start(host, port, **kwargs)
        try:
            yield self
        finally:
            await self.stop()

    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 13003,
        *,
        workers: int = 1,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        """Serve until SIGINT/SIGTERM, then stop gracefully.

        ``workers=1`` serves in this process (no fork, no external service);
        ``workers > 1`` runs the supervisor, one worker process per worker.
        """
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        _refuse_while_importing("run()")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise WebSocketServerError(
                "server.run() blocks, so it cannot be called inside a running event loop: "
                "use `await server.start(host, port)` or `async with server.serve(host, port):`"
            )
        configure_default_logging()
        if workers > 1:
            # the supervisor is layer 4: imported only when asked for
            arbiter = importlib.import_module("enjent_supervisor.arbiter")
            code = arbiter.run_cluster(self, host, port, workers=workers, ssl=ssl)
            if code:
                raise SystemExit(code)
            return
        run_event_loop(self._serve_until_signal(host, port, ssl=ssl))

    async def _serve_until_signal(
        self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None, **kwargs: Any
    ) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # one process cannot replace itself without dropping its clients:
        # SIGHUP (systemd's reload) is logged and ignored, never fatal
        loop.add_signal_handler(signal.SIGHUP, _ignore_hangup)
        try:
            await self.start(host, port, ssl=ssl, **kwargs)
            scheme = "ws" if ssl is None else "wss"
            logger.info(
                "serving on %s (1 worker, pid %d; Ctrl-C or SIGTERM stops)",
                ", ".join(_url(scheme, sock) for sock in self.sockets),
                os.getpid(),
            )
            await stop.wait()
            logger.info("signal received, stopping")
            await self.stop()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)


def _ignore_hangup() -> None:
    logger.warning(
        "SIGHUP ignored: a single process cannot reload without dropping its clients; "
        "run with workers > 1 (enjent run --workers N) to replace workers on SIGHUP"
    )


def _url(scheme: str, sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


#: Set by ``enjent run`` while it imports the app (see :func:`importing_app`).
_importing_app: str | None = None


@contextlib.contextmanager
def importing_app(spec: str) -> Iterator[None]:
    """While the app ``spec`` is imported, refuse to start serving.

    An app module that calls ``server.run()`` at import time would serve
    inside ``enjent run`` itself, before the supervisor starts; the call
    raises :class:`AppServesOnImport` instead.
    """
    global _importing_app
    previous, _importing_app = _importing_app, spec
    try:
        yield
    finally:
        _importing_app = previous


class AppServesOnImport(WebSocketServerError):
    """The app started serving while ``enjent run`` imported it."""


def _refuse_while_importing(call: str) -> None:
    if _importing_app is not None:
        module = _importing_app.partition(":")[0]
        raise AppServesOnImport(
            f"{module} calls server.{call} while `enjent run` imports it: "
            f'put that call under `if __name__ == "__main__":`'
        )


def configure_default_logging() -> None:
    """Log INFO to stderr, only if the application configured no logging itself."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def run_event_loop(main: Awaitable[Any]) -> Any:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]
