"""The server's options: one frozen, validated object per group.

Server layer (layer 2 of docs/architecture.md). :class:`Limits`,
:class:`Timeouts` and :class:`HandshakeOptions` hold what
``WebSocketServer(...)`` takes as keyword arguments (with
:class:`~enjent.deflate.DeflateOptions` for compression); :class:`ServerOptions`
groups them and maps each keyword to its group, so that the constructor,
``WebSocketServer.configure()`` and the ``enjent`` command line fill the same
objects with the same checks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from ..deflate import DeflateOptions
from ..http11 import Request
from .addresses import AddressLimits
from .client import WebSocketClient

__all__ = [
    "HandshakeOptions",
    "Limits",
    "OptionAttributes",
    "OptionView",
    "ServerOptions",
    "Timeouts",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _set(instance: object, name: str, value: Any) -> None:
    object.__setattr__(instance, name, value)  # normalizing a frozen dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes and counts, each with a stated behaviour at the limit (README table)."""

    #: Largest message, once decompressed (close 1009 above it).
    max_message_size: int = 1 << 20
    #: Clients per worker (HTTP 503 with Retry-After above it).
    max_connections: int = 25_000
    #: Unsent bytes per client before it is a slow consumer (3008).
    write_limit: int = 512 * 1024
    #: Bytes of request head (HTTP 431 above it).
    max_request_size: int = 16 * 1024
    #: Bytes of request line (HTTP 414 above it).
    max_request_line: int = 8 * 1024
    #: UTF-8 bytes of a room name (RoomLimitError above it).
    max_room_name: int = 256
    #: Rooms one client may be in at once (RoomLimitError above it).
    max_rooms_per_client: int = 100
    #: Messages per second one client may send, with a burst as large (close 3013
    #: above it); ``None``: no limit (the default).
    max_message_rate: int | None = None

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name != "max_message_rate" or value is not None:
                _positive_int(item.name, value)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; enforced by one sweep per process (no timer per connection)."""

    handshake_timeout: float = 10.0
    #: Idle seconds before a keepalive ping; ``None``: no keepalive.
    ping_interval: float | None = 20.0
    #: Seconds to wait for the pong (close 1011 without it).
    ping_timeout: float = 20.0
    #: Seconds for a closing handshake or a graceful stop.
    close_timeout: float = 5.0
    #: Precision of the timeouts above.
    sweep_interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "ping_timeout", "close_timeout", "sweep_interval"):
            _set(self, name, _positive_seconds(name, getattr(self, name)))
        interval = self.ping_interval
        if interval is not None:
            if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
                raise ValueError(
                    "ping_interval must be positive, or None to disable keepalive, "
                    f"got {interval!r}"
                )
            _set(self, "ping_interval", float(interval))


def _http_path(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise ValueError(f"{name} must be a path starting with '/', or None, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class HandshakeOptions:
    """Who is let in and how: the opening handshake's policy."""

    #: The server's subprotocols, in its order of preference.
    subprotocols: tuple[str, ...] = ()
    #: ``None``: any origin; otherwise these (``None`` in it: no Origin header).
    allowed_origins: frozenset[str | None] | None = None
    health_path: str | None = "/healthz"
    #: The health path's answer: status and client count (``False``), or also
    #: per-worker pids, generations, bus and error counters (``True``).
    health_detail: bool = False
    metrics_path: str | None = "/metrics"
    #: Peers whose ``X-Forwarded-For`` / ``X-Real-Ip`` is believed.
    trusted_proxies: tuple[Network, ...] = ()
    client_class: type[WebSocketClient] = WebSocketClient
    client_factory: Callable[[Request], WebSocketClient] | None = None
    server_header: str | None = "enjent"
    #: One line per answered request on the ``enjent.access`` logger.
    access_log: bool = False
    #: Connections and handshakes per client address on the host (``None``: none).
    address_limits: AddressLimits | None = None

    def __post_init__(self) -> None:
        subprotocols: Any = self.subprotocols
        if isinstance(subprotocols, str) or not all(isinstance(p, str) for p in subprotocols):
            raise ValueError(f"subprotocols must be a sequence of str, got {subprotocols!r}")
        _set(self, "subprotocols", tuple(subprotocols))
        origins: Any = self.allowed_origins
        if origins is not None:
            valid = all(origin is None or isinstance(origin, str) for origin in origins)
            if isinstance(origins, str) or not valid:
                raise ValueError(
                    "allowed_origins must be None or a list of origins (None in it: no Origin), "
                    f"got {origins!r}"
                )
            _set(self, "allowed_origins", frozenset(origins))
        _http_path("health_path", self.health_path)
        _http_path("metrics_path", self.metrics_path)
        proxies: Any = self.trusted_proxies
        if isinstance(proxies, str):
            raise ValueError("trusted_proxies is a list of addresses or networks, not one str")
        try:
            networks = tuple(ipaddress.ip_network(item, strict=False) for item in proxies)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        _set(self, "trusted_proxies", networks)
        if not isinstance(self.client_class, type) or not issubclass(
            self.client_class, WebSocketClient
        ):
            raise TypeError("client_class must be a subclass of WebSocketClient")
        if self.client_factory is not None and not callable(self.client_factory):
            raise TypeError("client_factory must be a callable taking the Request, or None")
        if self.server_header is not None and not isinstance(self.server_header, str):
            raise ValueError(f"server_header must be a str or None, got {self.server_header!r}")
        if self.address_limits is not None and not isinstance(self.address_limits, AddressLimits):
            raise TypeError("address_limits must be an AddressLimits or None")
        for name in ("access_log", "health_detail"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _compression(value: Any) -> DeflateOptions | None:
    if value == "deflate":
        return DeflateOptions()
    if value is None or isinstance(value, DeflateOptions):
        return value
    raise ValueError(f"compression must be 'deflate', None or a DeflateOptions, got {value!r}")


_GROUPS: dict[str, str] = {
    **{item.name: "limits" for item in dataclasses.fields(Limits)},
    **{item.name: "timeouts" for item in dataclasses.fields(Timeouts)},
    **{item.name: "handshake" for item in dataclasses.fields(HandshakeOptions)},
    "compression": "compression",
}


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Every option of a server, by group."""

    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    handshake: HandshakeOptions = field(default_factory=HandshakeOptions)
    #: permessage-deflate (RFC 7692), or ``None`` when off.
    compression: DeflateOptions | None = field(default_factory=DeflateOptions)

    @staticmethod
    def names() -> Iterable[str]:
        """Every keyword ``WebSocketServer(...)`` and ``configure()`` accept."""
        return _GROUPS.keys()

    def replace(self, **changes: Any) -> ServerOptions:
        """A copy with these options changed, checked as the constructor checks them."""
        unknown = sorted(set(changes) - _GROUPS.keys())
        if unknown:
            raise TypeError(f"unknown WebSocketServer option(s): {', '.join(unknown)}")
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_group.setdefault(_GROUPS[name], {})[name] = value
        result = self
        for group, values in by_group.items():
            if group == "compression":
                result = dataclasses.replace(result, compression=_compression(values[group]))
            else:
                updated = dataclasses.replace(getattr(result, group), **values)
                result = dataclasses.replace(result, **{group: updated})
        return result

    def get(self, name: str) -> Any:
        """The value of one option by its keyword."""
        group = _GROUPS[name]
        return self.compression if group == "compression" else getattr(getattr(self, group), name)


T = TypeVar("T")


class HasOptions(Protocol):
    @property
    def options(self) -> ServerOptions: ...


class OptionView(Generic[T]):
    """A read-only attribute that shows one option (``server.close_timeout``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: HasOptions | None, owner: type) -> T:
        if instance is None:
            raise AttributeError(self.name)
        value: T = instance.options.get(self.name)
        return value


class OptionAttributes:
    """Every option as a read-only attribute (``server.close_timeout``), for a class
    whose ``options`` property holds the :class:`ServerOptions` in force."""

    @property
    def options(self) -> ServerOptions:
        raise NotImplementedError

    compression: OptionView[DeflateOptions | None] = OptionView()
    subprotocols: OptionView[tuple[str, ...]] = OptionView()
    allowed_origins: OptionView[frozenset[str | None] | None] = OptionView()
    health_path: OptionView[str | None] = OptionView()
    health_detail: OptionView[bool] = OptionView()
    metrics_path: OptionView[str | None] = OptionView()
    trusted_proxies: OptionView[tuple[Any, ...]] = OptionView()
    client_class: OptionView[type[WebSocketClient]] = OptionView()
    client_factory: OptionView[Callable[[Request], WebSocketClient] | None] = OptionView()
    server_header: OptionView[str | None] = OptionView()
    access_log: OptionView[bool] = OptionView()
    address_limits: OptionView[AddressLimits | None] = OptionView()
    max_message_size: OptionView[int] = OptionView()
    max_connections: OptionView[int] = OptionView()
    write_limit: OptionView[int] = OptionView()
    max_request_size: OptionView[int] = OptionView()
    max_request_line: OptionView[int] = OptionView()
    max_room_name: OptionView[int] = OptionView()
    max_rooms_per_client: OptionView[int] = OptionView()
    max_message_rate: OptionView[int | None] = OptionView()
    handshake_timeout: OptionView[float] = OptionView()
    ping_interval: OptionView[float | None] = OptionView()
    ping_timeout: OptionView[float] = OptionView()
    close_timeout: OptionView[float] = OptionView()
    sweep_interval: OptionView[float] = OptionView()
