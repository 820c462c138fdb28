"""The cluster layer: several worker processes as one logical server.

Layer 3 of docs/architecture.md. :mod:`~enjent.cluster.bus` is the wire
format of the bus (one module: topics, envelope kinds, encoding);
:mod:`~enjent.cluster.zeromq` is the ZeroMQ engine, a
:class:`~enjent.server.peers.Peers` that a worker attaches to its server.
"""

from __future__ import annotations

from .zeromq import ClusterClient, RemoteClient

__all__ = ["ClusterClient", "RemoteClient"]
