"""The HTTP publish API: services in any language push to clients with a POST.

Supervisor layer (layer 4). Off by default; ``enjent run ... --api
HOST:PORT`` makes the supervisor fork a process of its own for it (never on
the public WebSocket port, and it keeps answering while workers restart),
with an :class:`~enjent.AsyncPublisher` on the servers' bus, at a lower CPU
priority than the workers (``nice`` +5: a flood of requests, good or bad,
yields to the clients). Every request
needs ``Authorization: Bearer <key>`` (``ENJENT_API_KEY`` or
``--api-key-file``), compared in constant time.

=====================  ========================================================
``POST /api/publish``  JSON: one target of ``"all": true``, ``"room": NAME``,
                       ``"rooms": [NAMES]``, ``"client": ID``; ``"data": STR``
                       (text) or ``"data_b64": BASE64`` (binary); optional
                       ``"exclude": ID``
``POST /api/close``    JSON: ``"client": ID``, optional ``"code"`` (1000 or
                       3000-4999), ``"reason"``
``GET /api/presence``  ``?room=NAME&limit=N`` (limit 0-10000, default 1000):
                       ``total``, ``clients`` (``id``, ``worker``, ``path``,
                       ``connected_at``), ``workers``, ``missing_workers``,
                       ``partial``
=====================  ========================================================

Answers are JSON: 200 ``{"ok": true}``; 401 without or with a wrong key;
400 for bad JSON or a bad field (named in ``error``); 404 for an unknown
path; 405 for a wrong method; 411 without ``Content-Length``; 413 past the
message size limit; 503 when the bus cannot be reached. HTTP/1.1 keep-alive.
A refused request (no or a wrong key, a head that is not HTTP) is answered
after :data:`REFUSAL_DELAY` (0.1 s), and at most :data:`MAX_CONNECTIONS`
(512) connections are held: a brute force or a flood gets a few thousand
answers a second at most, and the clients' workers keep their CPU.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from enjent.cluster.natsbus import IpcBus, NatsConfig
from enjent.cluster.publisher import AsyncPublisher, MessageTooBigError
from enjent.exceptions import BusError, RoomLimitError, WebSocketNegotiationError
from enjent.http11 import json_response, parse_request
from enjent.server.logs import RepeatedLog

__all__ = ["MIN_KEY_LENGTH", "ApiSettings", "api_main", "parse_api_address", "read_api_key"]

logger = logging.getLogger("enjent.api")

#: The shortest key accepted: a guessable key would open every client to anyone.
MIN_KEY_LENGTH = 16
#: The most rows ``GET /api/presence`` may ask for.
MAX_PRESENCE_ROWS = 10_000
_HEAD_LIMIT = 16 * 1024
#: How much nicer (lower CPU priority) the API's process is than the workers.
API_NICENESS = 5
#: Seconds a refused request (no or a wrong key, a malformed head) waits for its
#: answer: a brute force or a flood from N connections gets N / 0.1 answers a second.
REFUSAL_DELAY = 0.1
#: The most connections the API holds at once; more are closed at once, unanswered.
MAX_CONNECTIONS = 512
_IDLE_TIMEOUT = 30.0
_BODY_TIMEOUT = 10.0


@dataclass(frozen=True)
class ApiSettings:
    """Where the API listens, its key, and the size limit of one message."""

    host: str
    port: int
    key: bytes
    max_message_size: int = 1 << 20

    def __repr__(self) -> str:  # never the key in a log line
        return f"ApiSettings(host={self.host!r}, port={self.port})"


def parse_api_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; ``ValueError`` says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:8081), got {text!r}")
    return host.strip("[]"), int(port)


def read_api_key(key_file: str | None, environ: dict[str, str] | None = None) -> bytes:
    """The key from ``key_file`` or ``ENJENT_API_KEY``; ``ValueError`` if none or too short."""
    env = os.environ if environ is None else environ
    if key_file:
        try:
            with open(key_file, "rb") as file:
                key = file.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {key_file}: {exc.strerror}") from None
    else:
        key = env.get("ENJENT_API_KEY", "").strip().encode()
    if not key:
        raise ValueError(
            "--api needs a key: ENJENT_API_KEY or --api-key-file FILE (e.g. "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the API key must be at least {MIN_KEY_LENGTH} characters")
    return key


class _Refusal(Exception):
    """An answer other than 200: its status, message and headers."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.headers = headers


class PublishApi:
    """The API's requests, answered with one :class:`~enjent.AsyncPublisher`."""

    def __init__(self, settings: ApiSettings, publisher: AsyncPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self._expected = b"Bearer " + settings.key
        self._refusals = RepeatedLog(logger, logging.INFO)
        self.connections = 0
        #: the body limit: a message of max_message_size in base64, with the JSON around it
        self.body_limit = (settings.max_message_size * 4) // 3 + 64 * 1024

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests one after the other while it is kept alive."""
        if self.connections >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_TIMEOUT)
                keep_alive, response = await self._respond(head, reader)
                writer.write(response)
                await asyncio.wait_for(writer.drain(), _BODY_TIMEOUT)
                if not keep_alive:
                    break
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
            ValueError,  # readuntil past the limit
        ):
            pass
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, head: bytes, reader: asyncio.StreamReader) -> tuple[bool, bytes]:
        try:
            parsed = parse_request(head, max_request_size=_HEAD_LIMIT, any_method=True)
        except WebSocketNegotiationError as exc:
            await asyncio.sleep(REFUSAL_DELAY)
            return False, json_response(int(exc.status), {"error": str(exc)}, keep_alive=False)
        if parsed is None:  # pragma: no cover - readuntil returned a whole head
            return False, json_response(400, {"error": "incomplete request"}, keep_alive=False)
        request = parsed[0]
        headers = request.headers
        connection = headers.get("Connection", "").lower()
        keep_alive = request.version == "HTTP/1.1" and "close" not in connection
        try:
            body = await self._body(request, reader)
            status, payload = await self._dispatch(request.method, request.target, headers, body)
            extra: tuple[tuple[str, str], ...] = ()
        except _Refusal as refusal:
            status, payload, extra = refusal.status, {"error": str(refusal)}, refusal.headers
            if status == 401:
                await asyncio.sleep(REFUSAL_DELAY)  # a brute force or a flood, slowed down
            self._refusals("API %s %s: %d %s", request.method, request.path, status, refusal)
            if status in (411, 413):
                keep_alive = False  # the body was not read: the stream is not at a request
        return keep_alive, json_response(status, payload, keep_alive=keep_alive, headers=extra)

    async def _body(self, request: Any, reader: asyncio.StreamReader) -> bytes:
        headers = request.headers
        if "Transfer-Encoding" in headers:
            raise _Refusal(411, "send the body with Content-Length, not Transfer-Encoding")
        lengths = headers.get_all("Content-Length")
        if not lengths:
            if request.method == "POST":
                raise _Refusal(411, "a POST needs Content-Length")
            return b""
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise _Refusal(400, "Content-Length must be one number")
        length = int(lengths[0])
        if length > self.body_limit:
            raise _Refusal(413, f"the body is over {self.body_limit} bytes")
        try:
            return await asyncio.wait_for(reader.readexactly(length), _BODY_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError):
            raise _Refusal(400, "the body ended before Content-Length") from None

    async def _dispatch(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> tuple[int, Any]:
        given = headers.get("Authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self._expected):
            raise _Refusal(
                401, "missing or wrong API key", (("WWW-Authenticate", 'Bearer realm="enjent"'),)
            )
        parts = urlsplit(target)
        routes = {"/api/publish": "POST", "/api/close": "POST", "/api/presence": "GET"}
        allowed = routes.get(parts.path)
        if allowed is None:
            raise _Refusal(404, f"no such path: {parts.path} (see /api/publish, /api/close, "
                           "/api/presence)")  # fmt: skip
        if method != allowed:
            raise _Refusal(405, f"{parts.path} takes {allowed}", (("Allow", allowed),))
        try:
            if parts.path == "/api/presence":
                return 200, await self._presence(parts.query)
            fields = _json_object(body)
            if parts.path == "/api/publish":
                await self._publish(fields)
            else:
                await self._close(fields)
        except MessageTooBigError as exc:
            raise _Refusal(413, str(exc)) from None
        except (RoomLimitError, ValueError, TypeError) as exc:
            raise _Refusal(400, str(exc)) from None
        except BusError as exc:
            raise _Refusal(503, f"the bus cannot be reached: {exc}") from None
        return 200, {"ok": True}

    async def _publish(self, fields: dict[str, Any]) -> None:
        targets = [name for name in ("all", "room", "rooms", "client") if name in fields]
        if len(targets) != 1:
            raise ValueError('give exactly one target: "all", "room", "rooms" or "client"')
        unknown = set(fields) - {"all", "room", "rooms", "client", "data", "data_b64", "exclude"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        if ("data" in fields) == ("data_b64" in fields):
            raise ValueError('give exactly one of "data" (text) and "data_b64" (binary)')
        data: str | bytes
        if "data" in fields:
            data = _field(fields, "data", str)
        else:
            try:
                data = base64.b64decode(_field(fields, "data_b64", str), validate=True)
            except binascii.Error:
                raise ValueError('"data_b64" is not base64') from None
        exclude = fields.get("exclude")
        if exclude is not None and not isinstance(exclude, str):
            raise ValueError('"exclude" must be a client id (a string)')
        publisher = self.publisher
        target = targets[0]
        if target == "all":
            if fields["all"] is not True:
                raise ValueError('"all" must be true')
            await publisher.broadcast(data, exclude=exclude)
        elif target == "room":
            await publisher.room(_field(fields, "room", str)).broadcast(data, exclude=exclude)
        elif target == "rooms":
            names = fields["rooms"]
            if not isinstance(names, list) or not names or len(names) > 100:
                raise ValueError('"rooms" must be a list of 1 to 100 room names')
            if not all(isinstance(name, str) for name in names):
                raise ValueError('"rooms" must hold strings')
            await publisher.rooms(*names).broadcast(data, exclude=exclude)
        else:
            await publisher.send(_field(fields, "client", str), data)

    async def _close(self, fields: dict[str, Any]) -> None:
        unknown = set(fields) - {"client", "code", "reason"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        code = fields.get("code", 1000)
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError('"code" must be an integer')
        reason = fields.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError('"reason" must be a string')
        await self.publisher.close_client(_field(fields, "client", str), code, reason)

    async def _presence(self, query: str) -> dict[str, Any]:
        values = parse_qs(query, keep_blank_values=True)
        unknown = set(values) - {"room", "limit"}
        if unknown:
            raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}")
        room = values.get("room", [None])[-1] or None
        limit_text = values.get("limit", ["1000"])[-1]
        if not limit_text.isdigit() or int(limit_text) > MAX_PRESENCE_ROWS:
            raise ValueError(f'"limit" must be a number from 0 to {MAX_PRESENCE_ROWS}')
        presence = await self.publisher.fetch_clients(room=room, limit=int(limit_text))
        return {
            "total": presence.total,
            "partial": presence.partial,
            "workers": presence.workers,
            "missing_workers": presence.missing_workers,
            "clients": [
                {
                    "id": info.id,
                    "worker": info.shard,
                    "path": info.path,
                    "connected_at": info.connected_at,
                }
                for info in presence.clients
            ],
        }


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    return value


def _field(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise ValueError(f'"{name}" must be a non-empty {kind.__name__}')
    return value


async def serve_api(settings: ApiSettings, bus: IpcBus | NatsConfig) -> None:
    """Serve the API until SIGTERM or SIGINT (what :func:`api_main` runs)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    publisher = AsyncPublisher(bus, timeout=2.0, max_message_size=settings.max_message_size)
    api = PublishApi(settings, publisher)
    server = await asyncio.start_server(
        api.handle, settings.host, settings.port, limit=_HEAD_LIMIT, reuse_address=True
    )
    where = f"{settings.host}:{settings.port}"
    logger.info("publish API (pid %d) on http://%s/api/", os.getpid(), where)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        await publisher.close()


def api_main(settings: ApiSettings, bus: IpcBus | NatsConfig) -> int:
    """The API process: 0 when stopped, 3 when it cannot listen."""
    from enjent.server import run_event_loop

    # Ctrl-C reaches the whole group: the supervisor stops this process (SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the clients come first: a flood of API requests yields the CPU to the workers
    with contextlib.suppress(OSError):
        os.nice(API_NICENESS)
    try:
        run_event_loop(serve_api(settings, bus))
    except OSError as exc:
        logger.error(
            "the publish API cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror
        )
        return 3
    return 0
