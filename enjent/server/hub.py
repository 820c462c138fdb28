"""The hub of one process's clients: registry, rooms, ids and local delivery.

Server layer (layer 2 of docs/architecture.md). Clients, rooms, the cluster
engine and the server reach one another only through the :class:`Hub`'s
public methods: ``add``/``remove`` a client, ``join``/``leave`` a room,
``broadcast`` (here and through the peers), ``deliver`` what the peers
received, ``send`` to a client id wherever it is.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import RoomLimitError
from ..protocol import OutgoingMessage, State
from .history import HistoryRules, Joined, Publication, identity
from .ids import ClientIds
from .options import Limits
from .peers import LocalPeers, Peers

if TYPE_CHECKING:
    from ..http11 import Headers
    from .client import WebSocketClient

__all__ = ["Hub", "TrustedProxies"]

_OPEN = State.OPEN

logger = logging.getLogger("enjent.server")


def _log_error(client: Any, exc: BaseException) -> None:
    logger.error("error in a handler for %s", client, exc_info=exc)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class TrustedProxies:
    """The address of a client behind trusted proxies (``X-Forwarded-For``, ``X-Real-Ip``)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client_address(self, host: str, headers: Headers) -> str:
        """The client's address: ``host``, unless ``host`` is a trusted proxy."""
        if not self.networks or not self.trusts(host):
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
            if not self.trusts(address):
                return address
        real_ip = (headers.get("X-Real-Ip") or "").strip()
        if real_ip and _is_ip(real_ip):
            return real_ip
        return forwarded[0] if forwarded else host


class Hub:
    """This process's clients and rooms, and the cluster engine behind them."""

    __slots__ = (
        "_clients",
        "_joining",
        "_rooms",
        "deliveries",
        "formatter",
        "history",
        "ids",
        "join_handlers",
        "limits",
        "peers",
        "proxies",
        "report_error",
        "stats",
    )

    def __init__(self, stats: dict[str, int]) -> None:
        self._clients: dict[str, WebSocketClient] = {}
        self._rooms: dict[str, set[WebSocketClient]] = {}
        #: clients waiting for their position in a room with history (not members yet)
        self._joining: dict[str, set[WebSocketClient]] = {}
        #: which rooms keep history, what their members receive, who hears of a join
        self.history = HistoryRules()
        self.formatter: Callable[[Publication], str | bytes] = identity
        self.join_handlers: list[Callable[[Any, Joined], Any]] = []
        self.report_error: Callable[[Any, BaseException], None] = _log_error
        self.ids = ClientIds()
        self.stats = stats
        self.proxies = TrustedProxies(())
        self.limits = Limits()
        #: client writes by broadcasts so far: what bounds the work of one callback
        self.deliveries = 0
        #: The cluster engine: :class:`LocalPeers` until a worker plugs one in.
        self.peers: Peers = LocalPeers(self)

    # ------------------------------------------------------------ clients

    @property
    def clients(self) -> Mapping[str, WebSocketClient]:
        """This process's clients by id (read-only)."""
        return self._clients

    @property
    def count(self) -> int:
        return len(self._clients)

    def get(self, client_id: str) -> WebSocketClient | None:
        return self._clients.get(client_id)

    def is_connected(self, client: WebSocketClient) -> bool:
        return self._clients.get(client.id) is client

    def add(self, client: WebSocketClient) -> None:
        """A client completed its handshake."""
        self._clients[client.id] = client
        self.peers.client_connected(client)

    def remove(self, client: WebSocketClient) -> bool:
        """A client is gone: out of its rooms; ``False`` if it was already gone."""
        if self._clients.pop(client.id, None) is None:
            return False
        for name in client.rooms:
            self.leave(client, name)
        self.peers.client_disconnected(client)
        return True

    def send(self, client_id: str, data: str | bytes) -> bool:
        """Send to ``client_id`` here, or through the peers if another worker owns it."""
        client = self._clients.get(client_id)
        if client is not None:
            return client.send(data)
        return self.peers.send_to(client_id, data)

    def find(self, client_id: str) -> Any:
        """The client with this id (a proxy if on another worker), or ``None``."""
        client = self._clients.get(client_id)
        return client if client is not None else self.peers.get_client(client_id)

    # -------------------------------------------------------------- rooms

    def check_room_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise RoomLimitError("a room name is a non-empty str")
        limit = self.limits.max_room_name
        if len(name) > limit or len(name.encode("utf-8")) > limit:
            raise RoomLimitError(
                f"room name of {len(name.encode('utf-8'))} bytes over max_room_name={limit}"
            )

    def join(self, client: WebSocketClient, name: str) -> None:
        """Add a member (``client.join`` checks the limits first)."""
        members = self._rooms.get(name)
        if members is None:
            members = self._rooms[name] = set()
            self.peers.room_created(name)
        members.add(client)

    def leave(self, client: WebSocketClient, name: str) -> None:
        members = self._rooms.get(name)
        if members is not None:
            members.discard(client)
            joining = self._joining.get(name)
            if joining is not None:
                joining.discard(client)
                if not joining:
                    del self._joining[name]
                    joining = None
            if not members and joining is None:
                del self._rooms[name]
                self.peers.room_deleted(name)

    def members(self, name: str) -> set[WebSocketClient]:
        """The members of ``name`` on this process (do not change the set)."""
        return self._rooms.get(name) or set()

    @property
    def room_names(self) -> list[str]:
        return [name for name, members in self._rooms.items() if members]

    # -------------------------------------------------- rooms with history

    def join_with_history(
        self, client: WebSocketClient, name: str, since: tuple[str, int] | None
    ) -> None:
        """Ask for the position (and what was missed since ``since``) before the
        client becomes a member: the peers call :meth:`joined` with the answer."""
        members = self._rooms.get(name)
        if members is None:
            members = self._rooms[name] = set()
            self.peers.room_created(name)  # live publications flow from now on
        self._joining.setdefault(name, set()).add(client)
        self.peers.recover(client, name, since)

    def joined(self, client: WebSocketClient, joined: Joined, missed: list[Publication]) -> None:
        """The answer to :meth:`join_with_history`: ``on_join``, the missed, then member."""
        name = joined.room
        joining = self._joining.get(name)
        if joining is None or client not in joining:
            return  # it left the room (or disconnected) meanwhile
        joining.discard(client)
        if not joining:
            del self._joining[name]
        stats = self.stats
        outcome = {None: "history_joins", True: "history_recovered", False: "history_lost"}
        stats[outcome[joined.recovered]] += 1
        for handler in self.join_handlers:
            try:
                handler(client, joined)
            except Exception as exc:
                self.report_error(client, exc)
        for publication in missed:
            data = self.format(publication)
            if data is not None:
                client.send(data)
        stats["history_replayed"] += len(missed)
        self._rooms[name].add(client)

    def format(self, publication: Publication) -> str | bytes | None:
        """What members receive for ``publication``; ``None`` if the formatter failed."""
        try:
            return self.formatter(publication)
        except Exception as exc:
            self.report_error(None, exc)
            return None

    def publish_with_history(
        self, names: list[str], data: str | bytes, exclude: WebSocketClient | None
    ) -> int:
        """``data`` to rooms with history: each gets its next offset (in the peers)."""
        if not isinstance(data, str | bytes):
            data = bytes(data)  # kept as published: a bytearray could change afterwards
        return self.peers.publish_logged(names, data, exclude.id if exclude is not None else None)

    def deliver_logged(self, publication: Publication, exclude_id: str | None) -> int:
        """Write one publication of a room with history to its members here (formatted once)."""
        members = self._rooms.get(publication.room)
        if not members:
            return 0
        data = self.format(publication)
        if data is None:
            return 0
        exclude = self._clients.get(exclude_id) if exclude_id else None
        return self.write_all(members, OutgoingMessage.of(data), exclude)

    # ----------------------------------------------------------- delivery

    def broadcast(self, data: str | bytes, exclude: WebSocketClient | None) -> int:
        """``data`` to every client of the cluster; returns this process's deliveries."""
        message = OutgoingMessage.of(data)
        self.peers.publish_broadcast(message.frame, exclude.id if exclude is not None else None)
        return self.write_all(self._clients.values(), message, exclude)

    def broadcast_rooms(
        self, names: list[str], data: str | bytes, exclude: WebSocketClient | None
    ) -> int:
        """``data`` once to each member of any of ``names``, on every worker."""
        count = 0
        if self.history:
            logged, names = self.history.split(names)
            if logged:
                count = self.publish_with_history(logged, data, exclude)
                if not names:
                    return count
        message = OutgoingMessage.of(data)
        self.peers.publish_room(names, message.frame, exclude.id if exclude is not None else None)
        return count + self.deliver_rooms(names, message, exclude)

    def deliver_rooms(
        self, names: Iterable[str], message: OutgoingMessage, exclude: WebSocketClient | None
    ) -> int:
        """Write to the local members of any of ``names``, each once."""
        names = list(names)
        if len(names) == 1:
            return self.write_all(self._rooms.get(names[0], ()), message, exclude)
        members: set[WebSocketClient] = set()
        for name in names:
            members |= self._rooms.get(name, set())
        return self.write_all(members, message, exclude)

    def write_all(
        self,
        clients: Iterable[WebSocketClient],
        message: OutgoingMessage,
        exclude: WebSocketClient | None,
    ) -> int:
        """Write one encoded message to many local clients; returns how many took it."""
        frame = message.frame
        count = 0
        sent_bytes = 0
        # no copy of ``clients``: nothing below runs a handler or removes a
        # client synchronously (transports report losses on a later tick)
        for client in clients:
            if client is exclude:
                continue
            connection = client.connection
            if connection is None:
                continue
            extension = connection.extension
            if extension is None:
                if connection.state is _OPEN and not connection.paused and not connection.batching:
                    connection.transport.write(frame)  # type: ignore[union-attr]  # fast path
                    count += 1
                    sent_bytes += len(frame)
                    continue
                out = frame
            else:
                out = message.frame_for(extension)
            if connection.send_frame(out):
                count += 1
                sent_bytes += len(out)
        self.deliveries += count
        if count:
            stats = self.stats
            stats["messages_sent"] += count
            stats["bytes_sent"] += sent_bytes
        return count
