"""Rooms through real sockets: membership, unions, broadcasts, encoding once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from wsutil import HOST, async_test, eventually, recv, ws_connect

import enjent.protocol
from enjent import Room, RoomUnion, WebSocketClient, WebSocketServer


async def nothing_pending(ws: ClientConnection) -> bool:
    """Whether ``ws`` has no message waiting (after a short grace period)."""
    try:
        await asyncio.wait_for(ws.recv(), 0.1)
    except TimeoutError:
        return True
    return False


class Clients:
    """N connected pairs: the ``websockets`` side and the server's client."""

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.accepted: list[WebSocketClient] = []
        self.sockets: list[ClientConnection] = []
        server.on_connect(self.accepted.append)

    async def open(self, count: int) -> list[WebSocketClient]:
        start = len(self.accepted)
        for _ in range(count):
            self.sockets.append(await ws_connect(self.server, close_timeout=1))
        await eventually(lambda: len(self.accepted) == start + count)
        return self.accepted[start:]

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets))

    def ws(self, client: WebSocketClient) -> ClientConnection:
        return self.sockets[self.accepted.index(client)]


@async_test
async def test_membership() -> None:
    server = WebSocketServer()
    clients = Clients(server)
    async with server.serve(HOST, 0):
        a, b, c = await clients.open(3)
        lobby = server.room("lobby")
        assert isinstance(lobby, Room)
        assert lobby.name == "lobby"
        assert len(lobby) == 0
        assert list(lobby) == []
        a.join("lobby")
        b.join("lobby")
        b.join("lobby")  # twice: still one member
        assert len(lobby) == 2
        assert a in lobby and b in lobby and c not in lobby
        assert "not a client" not in lobby
        assert set(lobby) == {a, b}
        assert server.rooms == ["lobby"]
        assert server.room("lobby") == lobby  # a handle: equal by name
        assert server.room("other") != lobby
        assert "lobby" in repr(lobby) and "2" in repr(lobby)

        for member in lobby:  # iteration is over a snapshot: leaving is safe
            member.leave("lobby")
        assert len(lobby) == 0
        assert server.rooms == []  # an empty room costs nothing
        await clients.close()


def test_room_names_must_be_non_empty_strings() -> None:
    server = WebSocketServer()
    for name in ("", None, 3):
        with pytest.raises(ValueError):
            server.room(name)  # type: ignore[arg-type]


@async_test
async def test_disconnect_removes_a_client_from_its_rooms() -> None:
    server = WebSocketServer()
    clients = Clients(server)
    left: list[frozenset[str]] = []
    server.on_disconnect(lambda client, code, reason: left.append(client.rooms))
    async with server.serve(HOST, 0):
        a, b = await clients.open(2)
        a.join("x")
        a.join("y")
        b.join("y")
        await clients.ws(a).close()
        await eventually(lambda: left)
        assert left == [{"x", "y"}]  # on_disconnect still sees the rooms it was in
        assert a not in server.room("y")
        assert len(server.room("y")) == 1
        assert server.rooms == ["y"]
        assert server.room("y").broadcast("to y") == 1
        assert await recv(clients.ws(b)) == "to y"
        await clients.close()


@async_test
async def test_room_broadcast_counts_and_exclude() -> None:
    server = WebSocketServer()
    clients = Clients(server)
    async with server.serve(HOST, 0):
        a, b, c = await clients.open(3)
        room = server.room("r")
        a.join("r")
        b.join("r")
        assert room.broadcast("hello") == 2
        assert await recv(clients.ws(a)) == "hello"
        assert await recv(clients.ws(b)) == "hello"
        assert await nothing_pending(clients.ws(c))

        assert room.broadcast(b"\x01\x02", exclude=a) == 1
        assert await recv(clients.ws(b)) == b"\x01\x02"
        assert await nothing_pending(clients.ws(a))

        assert server.room("empty").broadcast("nobody") == 0
        await clients.close()


@async_test
async def test_union_without_duplicates() -> None:
    server = WebSocketServer()
    clients = Clients(server)
    async with server.serve(HOST, 0):
        a, b, c, d = await clients.open(4)
        a.join("red")
        b.join("red")
        b.join("blue")
        c.join("blue")
        red, blue, green = server.room("red"), server.room("blue"), server.room("green")
        union = Room.union(red, blue, green)
        assert isinstance(union, RoomUnion)
        assert len(union) == 3
        assert sorted(union, key=id) == sorted([a, b, c], key=id)
        assert b in union and d not in union
        assert "red" in repr(union)

        assert union.broadcast("once") == 3
        for client in (a, b, c):
            assert await recv(clients.ws(client)) == "once"
        assert await nothing_pending(clients.ws(b))  # b is in two rooms: one copy
        assert await nothing_pending(clients.ws(d))

        assert union.broadcast("not c", exclude=c) == 2
        assert await recv(clients.ws(a)) == "not c"
        assert await recv(clients.ws(b)) == "not c"
        assert await nothing_pending(clients.ws(c))

        # the instance form is the same union
        assert set(red.union(blue)) == {a, b, c}
        assert red.union().broadcast("red only") == 2
        assert Room.union(green).broadcast("nobody") == 0
        assert RoomUnion(()).broadcast("nobody") == 0
        await clients.close()


@async_test
async def test_server_broadcast_and_exclude() -> None:
    server = WebSocketServer()
    clients = Clients(server)
    async with server.serve(HOST, 0):
        a, b = await clients.open(2)
        assert server.broadcast("all") == 2
        assert await recv(clients.ws(a)) == "all"
        assert await recv(clients.ws(b)) == "all"
        assert server.broadcast("not a", exclude=a) == 1
        assert await recv(clients.ws(b)) == "not a"
        assert await nothing_pending(clients.ws(a))
        await clients.close()


@async_test
async def test_a_broadcast_encodes_its_frame_once(monkeypatch: pytest.MonkeyPatch) -> None:
    server = WebSocketServer()
    clients = Clients(server)
    encoded: list[int] = []
    real_encode_frame = enjent.protocol.encode_frame

    def counting_encode_frame(opcode: int, payload: Any, **kwargs: Any) -> bytes:
        encoded.append(opcode)
        return real_encode_frame(opcode, payload, **kwargs)

    async with server.serve(HOST, 0):
        members = await clients.open(4)
        for client in members:
            client.join("room")
        members[0].join("other")
        monkeypatch.setattr(enjent.protocol, "encode_frame", counting_encode_frame)
        assert server.broadcast("x" * 1000) == 4
        assert server.room("room").broadcast(b"y" * 1000) == 4
        assert Room.union(server.room("room"), server.room("other")).broadcast("z") == 4
        monkeypatch.undo()
        assert encoded == [1, 2, 1]
        for ws in clients.sockets:
            assert [await recv(ws) for _ in range(3)] == ["x" * 1000, b"y" * 1000, "z"]
        await clients.close()


@async_test
async def test_broadcast_from_a_message_handler_reaches_the_sender_too() -> None:
    server = WebSocketServer()
    clients = Clients(server)

    @server.on_message
    def relay(client: WebSocketClient, message: str | bytes) -> None:
        server.room("chat").broadcast(message)

    server.on_connect(lambda client: client.join("chat"))
    async with server.serve(HOST, 0):
        a, b = await clients.open(2)
        await clients.ws(a).send("hi all")
        assert await recv(clients.ws(a)) == "hi all"
        assert await recv(clients.ws(b)) == "hi all"
        await clients.close()
