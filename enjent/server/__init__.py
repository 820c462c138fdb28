"""The server layer: asyncio/uvloop connections, the application API, the hub.

Layer 2 of docs/architecture.md. ``enjent.server`` keeps the names it always
had (``WebSocketServer``, ``Accept``, ``Response``, ``run_event_loop``, ...);
the modules of this package each hold one part:

- :mod:`~enjent.server.app`: :class:`WebSocketServer`, the front object;
- :mod:`~enjent.server.options`: the options, one frozen object per group;
- :mod:`~enjent.server.handlers`: the handlers and the one place that calls them;
- :mod:`~enjent.server.policy`: the handshake policy and the access log;
- :mod:`~enjent.server.hub`: the clients, rooms and local delivery;
- :mod:`~enjent.server.ids`: client ids;
- :mod:`~enjent.server.peers`: the cluster seam (and its no-op engine);
- :mod:`~enjent.server.presence`: who is connected, on demand;
- :mod:`~enjent.server.connection`: one connection, and the state it sees;
- :mod:`~enjent.server.keepalive`: the sweep;
- :mod:`~enjent.server.running`: ``run()``'s loop, signals and logging;
- :mod:`~enjent.server.client`, :mod:`~enjent.server.rooms`,
  :mod:`~enjent.server.metrics`.
"""

from __future__ import annotations

from .addresses import AddressLimits
from .app import WebSocketServer
from .client import WebSocketClient
from .history import HistorySettings, Joined, Publication
from .hub import Hub
from .options import HandshakeOptions, Limits, ServerOptions, Timeouts
from .peers import LocalPeers, Peers
from .policy import Accept, HandshakeHook, Response
from .presence import ClientInfo, Presence
from .rooms import Room, RoomUnion
from .running import (
    AppServesOnImport,
    configure_default_logging,
    importing_app,
    run_event_loop,
)

__all__ = [
    "Accept",
    "AddressLimits",
    "AppServesOnImport",
    "ClientInfo",
    "HandshakeHook",
    "HandshakeOptions",
    "HistorySettings",
    "Hub",
    "Joined",
    "Limits",
    "LocalPeers",
    "Peers",
    "Presence",
    "Publication",
    "Response",
    "Room",
    "RoomUnion",
    "ServerOptions",
    "Timeouts",
    "WebSocketClient",
    "WebSocketServer",
    "configure_default_logging",
    "importing_app",
    "run_event_loop",
]
