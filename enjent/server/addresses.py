"""Connections and handshakes per client address, counted for the whole host.

Server layer (layer 2 of docs/architecture.md). With ``SO_REUSEPORT`` one
address's connections spread over every worker, so a count per worker would
let N workers admit N times the limit. The supervisor therefore maps, before
it forks, one table in shared memory (an anonymous ``MAP_SHARED`` mapping,
inherited by every worker) with a column per worker: a worker writes only its
own column (no lock, no race on a write) and reads every column to sum an
address's connections and handshakes on the host. Two workers admitting the
same address at the same instant can each see the sum before the other's
increment: the limit holds on the host within one per worker.

An address is the client's (the forwarded one behind a trusted proxy), an
IPv6 address counted by its prefix (``/64`` by default: one subscriber's
whole network), hashed (CRC-32) into one of :data:`BUCKETS` buckets, so
memory never grows with the number of addresses; two addresses in one bucket
share its counts (at 2,000 busy addresses, about one in 30 shares).
Handshakes are counted per second of the clock (a fixed window, per worker
column): a burst across a second's boundary gets up to twice the rate
through, then no more than the rate in each second.

Past a limit the handshake is answered 429 with ``Retry-After``; nothing of
this runs when no limit is set.
"""

from __future__ import annotations

import ipaddress
import mmap
import time
import zlib
from dataclasses import dataclass

from ..exceptions import WebSocketNegotiationError

__all__ = ["BUCKETS", "SLOTS", "AddressLimits", "AddressTable", "attach", "host_table"]

#: Buckets per column (addresses hash into them).
BUCKETS = 65_536
#: Columns: one per worker (a worker's column is its shard's offset modulo this).
SLOTS = 64
#: Integers per (column, bucket): open connections, the second counted, its handshakes.
_FIELDS = 3


@dataclass(frozen=True)
class AddressLimits:
    """``WebSocketServer(address_limits=AddressLimits(...))``: limits per client address.

    ``max_connections``: open WebSocket connections of one address on the host
    (429 with ``Retry-After: 5`` above it); ``max_handshakes_per_second``: new
    handshakes of one address per second on the host (429 with
    ``Retry-After: 1``); ``ipv6_prefix``: how much of an IPv6 address is one
    client (64: its network). ``None`` turns a limit off.
    """

    max_connections: int | None = None
    max_handshakes_per_second: int | None = None
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_handshakes_per_second"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.ipv6_prefix, int) or not 1 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 1-128, got {self.ipv6_prefix!r}")


class AddressTable:
    """The counts of one host (shared) or one process (private), seen from one column."""

    def __init__(self, memory: mmap.mmap, slots: int, slot: int) -> None:
        self.memory = memory
        self.slots = slots
        self.slot = slot % slots
        self.view = memoryview(memory).cast("i")
        self._stride = BUCKETS * _FIELDS

    @classmethod
    def create(cls, slots: int = SLOTS, *, shared: bool = True) -> AddressTable:
        """A zeroed table; ``shared``: inherited by the children forked afterwards."""
        size = slots * BUCKETS * _FIELDS * 4
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        return cls(mmap.mmap(-1, size, flags=flags | mmap.MAP_ANONYMOUS), slots, 0)

    def for_slot(self, slot: int) -> AddressTable:
        """The same memory seen from ``slot``'s column, which starts empty (a new process)."""
        table = AddressTable(self.memory, self.slots, slot)
        start = table.slot * self._stride
        table.view[start : start + self._stride] = memoryview(bytes(self._stride * 4)).cast("i")
        return table

    @staticmethod
    def key(address: str, ipv6_prefix: int = 64) -> str:
        """What is counted for ``address``: itself, or its IPv6 prefix."""
        if ":" in address:
            try:
                network = ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False)
            except ValueError:
                return address
            return str(network.network_address)
        return address

    @staticmethod
    def bucket(key: str) -> int:
        return zlib.crc32(key.encode()) % BUCKETS

    def connections(self, bucket: int) -> int:
        """Open connections of the bucket's addresses on the host (every column)."""
        return sum(self.view[bucket * _FIELDS :: self._stride])

    def handshakes(self, bucket: int, second: int) -> int:
        """Handshakes of the bucket's addresses in ``second``, on the host."""
        view, stride, total = self.view, self._stride, 0
        for index in range(bucket * _FIELDS + 1, len(view), stride):
            if view[index] == second:
                total += view[index + 1]
        return total

    def admit(self, address: str, limits: AddressLimits) -> int:
        """Count one handshake of ``address``; its bucket, or 429 past a limit."""
        bucket = self.bucket(self.key(address, limits.ipv6_prefix))
        if limits.max_connections is not None and (
            self.connections(bucket) >= limits.max_connections
        ):
            raise WebSocketNegotiationError(
                429, "too many connections from your address", headers=[("Retry-After", "5")]
            )
        if limits.max_handshakes_per_second is not None:
            second = int(time.monotonic())
            if self.handshakes(bucket, second) >= limits.max_handshakes_per_second:
                raise WebSocketNegotiationError(
                    429, "too many handshakes from your address", headers=[("Retry-After", "1")]
                )
            own = self.slot * self._stride + bucket * _FIELDS + 1
            if self.view[own] != second:
                self.view[own], self.view[own + 1] = second, 0
            self.view[own + 1] += 1
        return bucket

    def connected(self, bucket: int) -> None:
        self.view[self.slot * self._stride + bucket * _FIELDS] += 1

    def disconnected(self, bucket: int) -> None:
        index = self.slot * self._stride + bucket * _FIELDS
        if self.view[index] > 0:
            self.view[index] -= 1


#: The host's table seen from this process's column (a worker: attached by the
#: supervisor's worker code; one process: a private one, made when first needed).
_host: AddressTable | None = None


def attach(table: AddressTable) -> None:
    """Use ``table`` (the supervisor's shared one, from this worker's column)."""
    global _host
    _host = table


def host_table() -> AddressTable:
    """This process's view of the host's counts (a private table in one process)."""
    global _host
    if _host is None:
        _host = AddressTable.create(1, shared=False)
    return _host
