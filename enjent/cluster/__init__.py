"""The cluster layer: several worker processes as one logical server.

Layer 3 of docs/architecture.md. :mod:`~enjent.cluster.bus` is the wire
format of the bus (one module: topics, envelope kinds, encoding);
:mod:`~enjent.cluster.engine` is what every engine does (a
:class:`~enjent.server.peers.Peers` that a worker attaches to its server),
whatever carries the bytes; :mod:`~enjent.cluster.zeromq` carries them over
ZeroMQ on one host.
"""

from __future__ import annotations

from .engine import BusEngine, RemoteClient
from .zeromq import ClusterClient

__all__ = ["BusEngine", "ClusterClient", "RemoteClient"]
