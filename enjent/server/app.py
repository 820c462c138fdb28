"""The application's server: :class:`WebSocketServer`, the front object.

Server layer (layer 2 of docs/architecture.md). It takes the options, registers the
handlers, starts and stops listening, and wires together the parts that do the work
(options, handlers, policy, hub, connections, sweep, history: see :mod:`enjent.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import ssl as ssl_module
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..deflate import DeflateOptions
from ..exceptions import WebSocketServerError
from ..frames import CloseCode
from ..http11 import Request
from .addresses import AddressLimits
from .client import WebSocketClient
from .closing import GOING_AWAY, close_connections, drain_clients
from .connection import Connection, ServerState
from .handlers import Handlers
from .history import RememberingRooms
from .hub import Hub, TrustedProxies
from .keepalive import sweep_forever
from .metrics import COUNTERS
from .options import OptionAttributes, ServerOptions
from .peers import LocalPeers, Peers
from .policy import HandshakePolicy
from .presence import Presence, check_query
from .rooms import Room
from .running import (
    capacity,
    prepare_process,
    refuse_inside_a_loop,
    refuse_while_importing,
    run_until_signal,
    url_of,
)

__all__ = ["WebSocketServer"]

logger = logging.getLogger("enjent.server")

F = TypeVar("F", bound=Callable[..., Any])


class WebSocketServer(OptionAttributes, RememberingRooms):
    """A WebSocket server: register handlers, then ``run`` or ``start`` it.

    Every option is keyword-only, with a safe default; they are documented by group
    in :mod:`enjent.server.options` (:class:`~.options.Limits`: ``max_message_size``
    1 MiB once decompressed, ``max_connections`` 25,000 per worker, ``write_limit``
    512 KiB, ``max_request_size``, ``max_request_line``, ``max_room_name`` 256 bytes,
    ``max_rooms_per_client`` 100, ``max_message_rate`` (off); :class:`~.options.Timeouts`:
    ``handshake_timeout``, ``ping_interval`` (``None``: no keepalive), ``ping_timeout``,
    ``close_timeout``, ``sweep_interval``; :class:`~.options.HandshakeOptions`:
    ``subprotocols``, ``allowed_origins``, ``health_path``, ``health_detail``,
    ``metrics_path``, ``trusted_proxies``, ``client_class`` / ``client_factory``,
    ``server_header``, ``access_log``, ``address_limits``) and ``compression``
    (``"deflate"``, ``None`` or a :class:`~enjent.deflate.DeflateOptions`); each is an
    attribute (``server.close_timeout``), and :meth:`configure` changes them.

    Slow consumers: a client whose unsent data exceeds ``write_limit`` is not read from
    until it drains; a message sent to it meanwhile is refused (``send`` returns
    ``False``) and it is closed with 3008: memory per client is about ``write_limit``
    plus one message.
    """

    def __init__(
        self,
        *,
        subprotocols: Sequence[str] = (),
        allowed_origins: Iterable[str | None] | None = None,
        health_path: str | None = "/healthz",
        health_detail: bool = False,
        metrics_path: str | None = "/metrics",
        trusted_proxies: Iterable[str] = (),
        client_class: type[WebSocketClient] = WebSocketClient,
        client_factory: Callable[[Request], WebSocketClient] | None = None,
        server_header: str | None = "enjent",
        access_log: bool = False,
        address_limits: AddressLimits | None = None,
        compression: str | DeflateOptions | None = "deflate",
        max_message_size: int = 1 << 20,
        max_connections: int = 25_000,
        write_limit: int = 512 * 1024,
        max_request_size: int = 16 * 1024,
        max_request_line: int = 8 * 1024,
        max_room_name: int = 256,
        max_rooms_per_client: int = 100,
        max_message_rate: int | None = None,
        handshake_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
        close_timeout: float = 5.0,
        sweep_interval: float = 1.0,
    ) -> None:
        #: Counters of this process (``/healthz``, ``/metrics``).
        self.stats: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.hub = Hub(self.stats)
        self._handlers = Handlers(self.stats)
        self.hub.report_error = self._handlers.report_error
        defaults = ServerOptions()
        self._policy = HandshakePolicy(defaults, self.hub)
        self._state = ServerState(defaults, self._policy, self.hub, self._handlers, self.stats)
        self._options = defaults
        given = locals()  # exactly the keyword arguments above
        self.configure(**{name: given[name] for name in ServerOptions.names()})
        self._listener: asyncio.base_events.Server | None = None
        self._connection_class: type[Connection] = Connection
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._warned_clients = False

    # ------------------------------------------------------------ options

    @property
    def options(self) -> ServerOptions:
        """Every option in force, by group (frozen; change them with :meth:`configure`)."""
        return self._options

    def configure(self, **options: Any) -> None:
        """Change options by name, with the checks of the constructor.

        What ``enjent run`` uses to apply the command line and ``ENJENT_*``
        over the app's own values. Connections opened afterwards see the new
        values; limits of connections already open stay as they were.
        Raises ``TypeError`` for an unknown option and ``ValueError`` for a
        bad value.
        """
        updated = self._options.replace(**options)
        self._options = updated
        self._policy.options = updated
        self._state.options = updated
        self.hub.proxies = TrustedProxies(updated.handshake.trusted_proxies)
        self.hub.limits = updated.limits

    # ------------------------------------------------------------ handlers

    def on_connect(self, handler: F) -> F:
        """Register ``handler(client)``, called once the handshake succeeded."""
        self._handlers.connect.append(handler)
        return handler

    def on_message(self, handler: F) -> F:
        """Register ``handler(client, message)``; ``message`` is str or bytes."""
        self._handlers.add_message_handler(handler)
        return handler

    def on_disconnect(self, handler: F) -> F:
        """Register ``handler(client, code, reason)``, called once per client."""
        self._handlers.disconnect.append(handler)
        return handler

    def on_error(self, handler: F) -> F:
        """Register ``handler(client_or_None, exc)`` for exceptions in handlers."""
        self._handlers.error.append(handler)
        return handler

    def on_control_frame(self, handler: F) -> F:
        """Register ``handler(client, event)`` for pings and pongs received."""
        self._handlers.control.append(handler)
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
        self._policy.add_hook(hook)
        return hook

    # ------------------------------------------------------ clients, rooms

    @property
    def shard(self) -> int:
        """This worker's index in the cluster (0 on one process)."""
        return self.hub.ids.shard

    @property
    def peers(self) -> Peers:
        """The cluster engine (:class:`~enjent.server.peers.LocalPeers` on one process)."""
        return self.hub.peers

    def attach_peers(self, peers: Peers) -> None:
        """Plug a cluster engine in (a worker does, before :meth:`start`)."""
        self.hub.peers = peers

    @property
    def clients(self) -> list[WebSocketClient]:
        """This process's clients; on a cluster it warns once: use :meth:`fetch_clients`."""
        if not self._warned_clients and not isinstance(self.hub.peers, LocalPeers):
            self._warned_clients = True
            message = "server.clients lists this worker's clients only on a cluster: use "
            message += "'await server.fetch_clients()', or server.local_clients"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
        return list(self.hub.clients.values())

    @property
    def local_clients(self) -> list[WebSocketClient]:
        """The clients connected to this process."""
        return list(self.hub.clients.values())

    @property
    def connection_count(self) -> int:
        """Open TCP connections of this process, handshakes in progress included."""
        return self._state.open_connections()

    @property
    def client_count(self) -> int:
        """The number of connected clients (cluster-wide on a cluster)."""
        return self.hub.peers.client_count()

    def get_client(self, client_id: str) -> Any:
        """The client with this id, or ``None``; for another worker's client a proxy
        (``send``, ``close``) built from the id: no proof that it is still connected.
        """
        return self.hub.find(client_id)

    async def fetch_clients(
        self, *, room: str | None = None, limit: int = 1000, timeout: float = 1.0
    ) -> Presence:
        """Ask every worker which clients it holds (of ``room``, or all): a
        :class:`~enjent.server.presence.Presence` of at most ``limit`` rows (0: the count
        alone), the ``total``, and the workers that did not answer within ``timeout``.
        """
        check_query(limit, timeout)
        if room is not None:
            self.hub.check_room_name(room)
        return await self.hub.peers.fetch_clients(room, limit, timeout)

    def send(self, client_id: str, data: str | bytes) -> bool:
        """Send to the client ``client_id`` wherever it is connected.

        Returns ``False`` if no such client is known (or it is closed here).
        """
        return self.hub.send(client_id, data)

    def room(self, name: str) -> Room:
        """The room called ``name`` (a handle; members join with ``client.join``).

        Raises :class:`~enjent.RoomLimitError` for a name over ``max_room_name``.
        """
        self.hub.check_room_name(name)
        return Room(self.hub, name)

    @property
    def rooms(self) -> list[str]:
        """The names of the rooms with members on this process."""
        return self.hub.room_names

    def broadcast(self, data: str | bytes, *, exclude: WebSocketClient | None = None) -> int:
        """Send ``data`` to every client (every worker on a cluster).

        The frame is encoded once and the same bytes go to every transport.
        Returns the number of clients of this process it was written to.
        """
        return self.hub.broadcast(data, exclude)

    def health(self) -> dict[str, Any]:
        """What the health path answers: counts for load balancers."""
        return self._policy.health()

    def metrics(self) -> str:
        """What the metrics path answers: Prometheus text, per worker and summed.

        On a cluster the other workers' figures come from their heartbeats
        (at most a heartbeat interval old).
        """
        return self._policy.metrics()

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
        refuse_while_importing("start()")
        loop = asyncio.get_running_loop()
        state = self._state
        state.now = loop.time()
        self._stopping = False
        state.fd_limit, self._policy.upgrade_limit = capacity(self.max_connections)
        try:
            if sock is not None:
                self._listener = await loop.create_server(
                    self.new_connection, sock=sock, ssl=ssl, backlog=backlog
                )
            else:
                self._listener = await loop.create_server(
                    self.new_connection,
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
        self._sweeper = loop.create_task(sweep_forever(state))
        logger.debug("listening on %s", ", ".join(str(s.getsockname()) for s in self.sockets))

    def new_connection(self) -> Connection:
        """The asyncio protocol of one more client (``loop.create_server`` calls it)."""
        return self._connection_class(self._state)

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

    async def drain(
        self, period: float, *, code: int = CloseCode.SERVICE_RESTART, reason: str = "restarting"
    ) -> None:
        """Stop accepting, then close the clients with ``code`` spread over ``period`` seconds.

        A worker replaced by a reload does this (:mod:`~enjent.server.closing`:
        none closed in the first fifth, then one at a time with jitter);
        call :meth:`stop` afterwards.
        """
        if self._listener is not None:
            self._listener.close()  # the successor's socket takes new connections
        await drain_clients(self._state, period, code, reason)

    async def stop(
        self, *, close_timeout: float | None = None, code: int = 1001, reason: str = GOING_AWAY
    ) -> None:
        """Stop gracefully: stop accepting, Close ``code`` (1001) to every client, wait.

        Clients still connected after ``close_timeout`` are aborted.
        """
        if self._stopping:
            return
        self._stopping = True
        timeout = self.close_timeout if close_timeout is None else close_timeout
        if self._listener is not None:
            self._listener.close()
        await close_connections(self._state, code, reason, timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._handlers.wait_tasks(timeout)
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
        bus: str | None = None,
    ) -> None:
        """Serve until SIGINT/SIGTERM, then stop gracefully.

        ``workers=1`` serves in this process (no fork, no external service);
        ``workers > 1`` runs the supervisor, one worker process per worker.
        ``bus="nats://h1:4222,nats://h2:4222"`` joins the workers of every
        host over NATS (the supervisor runs even for one worker).
        SIGHUP is logged and ignored by one process (it cannot reload
        without dropping its clients); with workers, it replaces them.

        When it cannot listen it logs one line and exits 3, as ``enjent run`` does.
        """
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        refuse_while_importing("run()")
        refuse_inside_a_loop()
        prepare_process()
        if workers > 1 or bus not in (None, "", "zeromq"):
            # the supervisor and the engines are layers 3-4: imported when asked for
            config = importlib.import_module("enjent.cluster.natsbus").parse_bus(bus)
            arbiter = importlib.import_module("enjent_supervisor.arbiter")
            code = arbiter.run_cluster(self, host, port, workers=workers, ssl=ssl, bus=config)
            if code:
                raise SystemExit(code)
            return
        scheme = "ws" if ssl is None else "wss"
        run_until_signal(
            lambda: self.start(host, port, ssl=ssl),
            self.stop,
            lambda: ", ".join(url_of(scheme, sock) for sock in self.sockets),
        )
