"""The handshake policy: who gets a 101, who gets plain HTTP, and how it is logged.

Server layer (layer 2 of docs/architecture.md). :class:`HandshakePolicy`
turns a parsed :class:`~enjent.Request` into one answer: the health or
metrics path, a hook's :class:`Response`, a refusal
(:class:`~enjent.WebSocketNegotiationError`), or a 101 with a new client
(subprotocol, permessage-deflate, id). It also writes the access log.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..deflate import DeflateOptions, Negotiated, PerMessageDeflate, negotiate
from ..exceptions import HandshakeRejected, WebSocketNegotiationError
from ..handshake import (
    accept_response,
    is_upgrade_request,
    offered_subprotocols,
    select_subprotocol,
    validate_upgrade,
)
from ..http11 import Request, check_header, encode_response, json_response, text_response
from .client import WebSocketClient
from .metrics import METRICS_CONTENT_TYPE, render_metrics

if TYPE_CHECKING:
    from .hub import Hub
    from .options import ServerOptions

__all__ = ["Accept", "HandshakeHook", "HandshakePolicy", "Response", "log_access"]

#: One line per handshake answered, when the server's ``access_log`` is on.
access_logger = logging.getLogger("enjent.access")

_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


@dataclass
class Accept:
    """Returned by an ``on_handshake`` hook: accept, with these choices.

    ``subprotocol`` must be one the client offered; ``data`` is attached to
    the client as ``client.data``; ``headers`` are added to the 101 response;
    ``expires_at`` (UNIX time) closes the connection with 3005 then.
    """

    subprotocol: str | None = None
    data: Any = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: UNIX time at which the connection is closed with 3005 (token expired).
    expires_at: float | None = None


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

    def __post_init__(self) -> None:
        _check_app_headers(self.headers)

    def encode(self, server_header: str | None) -> bytes:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        if server_header:
            headers.append(("Server", server_header))
        _check_app_headers(self.headers)  # again: the list may have changed since
        headers.extend(self.headers)
        return encode_response(self.status, headers, body)


def _check_app_headers(headers: list[tuple[str, str]]) -> None:
    """No CR/LF injection, and no framing header: the Response sets its own."""
    for name, value in headers:
        check_header(name, value)
        if name.lower() in _FRAMING_HEADERS:
            raise ValueError(f"a Response sets {name} itself: leave it out of headers")


HandshakeHook = Callable[[Request], "Accept | Response | None"]

Answer = tuple[bytes, WebSocketClient | None, PerMessageDeflate | None]


def log_access(request: Request, status: int, detail: str, worker: int) -> None:
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


class HandshakePolicy:
    """Decides on each parsed request of one server."""

    __slots__ = ("_shared_deflate", "hooks", "hub", "options", "upgrade_limit")

    def __init__(self, options: ServerOptions, hub: Hub) -> None:
        self.options = options
        self.hub = hub
        self.hooks: list[HandshakeHook] = []
        #: Upgrades accepted at most: ``max_connections``, lowered at start
        #: to what the process's open-file limit allows (see Capacity)
        self.upgrade_limit = options.limits.max_connections
        #: one PerMessageDeflate per distinct agreement without context takeover
        self._shared_deflate: dict[tuple[Negotiated, DeflateOptions, int], PerMessageDeflate] = {}

    def add_hook(self, hook: HandshakeHook) -> None:
        if inspect.iscoroutinefunction(hook):
            raise TypeError(
                "on_handshake hooks must be plain functions (the handshake is answered "
                "synchronously); check credentials asynchronously in on_connect instead"
            )
        self.hooks.append(hook)

    def health(self) -> dict[str, Any]:
        """The health answer: status and clients; the detail only with ``health_detail``."""
        full = self.hub.peers.health()
        if self.options.handshake.health_detail:
            return full
        return {"status": full["status"], "clients": full["clients"]}

    def metrics(self) -> str:
        peers = self.hub.peers
        return render_metrics(peers.metrics_samples(), peers.history_figures())

    def _deflate_for(self, negotiated: Negotiated) -> PerMessageDeflate:
        """The connection's permessage-deflate: shared when no context is taken over."""
        compression = self.options.compression
        assert compression is not None
        max_size = self.options.limits.max_message_size
        if not negotiated.no_context_takeover:
            return PerMessageDeflate(negotiated, compression, max_message_size=max_size)
        key = (negotiated, compression, max_size)
        extension = self._shared_deflate.get(key)
        if extension is None:
            extension = self._shared_deflate[key] = PerMessageDeflate(
                negotiated, compression, max_message_size=max_size, shared=True
            )
        return extension

    def answer(self, request: Request, *, open_connections: int = 0) -> Answer:
        """A 101 and a new client, or an HTTP answer; refusals raise.

        ``open_connections`` counts this process's TCP connections, handshakes
        in progress included: an upgrade over ``max_connections`` (or over
        what the open-file limit allows, see :attr:`upgrade_limit`) gets 503.
        """
        options = self.options
        handshake = options.handshake
        upgrade = is_upgrade_request(request)
        if not upgrade:
            path = request.path
            if path == handshake.health_path:
                return json_response(200, self.health()), None, None
            if path == handshake.metrics_path:
                return text_response(200, self.metrics(), METRICS_CONTENT_TYPE), None, None
        limit = self.upgrade_limit
        if upgrade and max(self.hub.count, open_connections - 1) >= limit:
            lowered = limit < options.limits.max_connections
            why = f"{limit}, RLIMIT_NOFILE less a reserve" if lowered else "max_connections"
            raise WebSocketNegotiationError(
                503, f"server full ({why})", headers=[("Retry-After", "5")]
            )
        allowed = handshake.allowed_origins
        if upgrade and allowed is not None:
            origin = request.headers.get("Origin")
            if origin not in allowed:
                if origin is None:
                    raise WebSocketNegotiationError(
                        403, "a request without Origin is not allowed here"
                    )
                raise WebSocketNegotiationError(403, f"origin {origin!r} not allowed")
        accept = Accept()
        for hook in self.hooks:
            answer = hook(request)
            if isinstance(answer, Response):
                return answer.encode(handshake.server_header), None, None
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
            subprotocol = select_subprotocol(offered, handshake.subprotocols)
        if handshake.client_factory is not None:
            client = handshake.client_factory(request)
            if not isinstance(client, WebSocketClient):
                raise TypeError("client_factory must return a WebSocketClient")
        else:
            client = handshake.client_class(request)
        hub = self.hub
        client.id = hub.ids.make()
        client.subprotocol = subprotocol
        if accept.data is not None:
            client.data = accept.data
        if accept.expires_at is not None:
            client.expires_at = float(accept.expires_at)
        client.hub = hub
        extension = None
        extensions_header = None
        compression = options.compression
        if compression is not None:
            offers = request.headers.get_all("Sec-WebSocket-Extensions")
            negotiated = negotiate(offers, compression) if offers else None
            if negotiated is not None:
                extension = self._deflate_for(negotiated)
                extensions_header = negotiated.response()
        extra = list(accept.headers)
        if handshake.server_header:
            extra.append(("Server", handshake.server_header))
        response = accept_response(
            key, subprotocol=subprotocol, extensions=extensions_header, extra_headers=extra
        )
        request.compact()
        return response, client, extension
