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
