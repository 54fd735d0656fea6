"""The relay's lean WebSocket protocol is in effect with the locked uvicorn.

``crctl.serve`` swaps uvicorn's per-socket ``asyncio.Queue`` and ``Event`` for smaller
equivalents (about 8 KiB less per idle call, bench/) and falls back to uvicorn's own where a
newer uvicorn is shaped differently. This test fails if a lock refresh makes the swap a no-op,
so the memory saving is never lost silently.
"""

from __future__ import annotations

import uvicorn
from uvicorn.server import ServerState

from crctl.serve import _Flag, _Inbox, _lean_websockets_sansio


async def _app(scope: object, receive: object, send: object) -> None:
    return None


async def test_the_lean_protocol_replaces_the_queue_and_the_event() -> None:
    protocol_class = _lean_websockets_sansio()
    config = uvicorn.Config(app=_app, ws=protocol_class)
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    assert isinstance(protocol.queue, _Inbox)
    assert isinstance(protocol.writable, _Flag)


async def test_the_inbox_hands_items_out_in_order_to_a_waiting_reader() -> None:
    import asyncio

    inbox = _Inbox()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)  # the reader waits on an empty inbox
    inbox.put_nowait("first")
    inbox.put_nowait("second")
    assert await reader == "first"
    assert await inbox.get() == "second"
    assert inbox.empty()


async def test_an_accepted_socket_keeps_no_upgrade_headers() -> None:
    """After the 101, neither uvicorn nor websockets' parser keeps the upgrade's headers.

    The parser generator of websockets holds the upgrade request in its frame for the socket's
    whole life; the lean protocol empties its headers (about 2 KiB per idle call, bench/).
    """
    import asyncio
    import socket

    import websockets

    accepted = asyncio.Event()
    done = asyncio.Event()

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "websocket":
            return
        await receive()  # type: ignore[operator]
        await send({"type": "websocket.accept"})  # type: ignore[operator]
        accepted.set()
        await done.wait()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.listen(8)  # a connection waits in the backlog until the server accepts it
    config = uvicorn.Config(
        app=app, ws=_lean_websockets_sansio(), log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws", additional_headers={"X-Twilio-Signature": "s" * 28}
        ):
            await accepted.wait()
            await asyncio.sleep(0.05)  # the 101 is out
            (protocol,) = list(server.server_state.connections)
            assert protocol.request is None and protocol.response is None  # type: ignore[attr-defined]
            kept = protocol.conn.parser.gi_frame.f_locals["request"]  # type: ignore[attr-defined]
            assert kept.path == "/ws"
            assert list(kept.headers.raw_items()) == []
            done.set()
    finally:
        done.set()
        server.should_exit = True
        await serving
