"""The relay's own API, behind its bearer token.

Push a message into a live call (``POST /calls/{sid}/messages``), the call log (``/calls``,
``/calls/{sid}``) and its live feed (``/events``, Server-Sent Events, resumable with ``after=``
or ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

from quart import Blueprint, Response, request

from relay_server import events as ev
from relay_server.protocol import ProtocolError, decode_outbound
from relay_server.security import bearer_ok
from relay_server.state import current_state
from relay_server.store import parse_since

api = Blueprint("api", __name__)

P = ParamSpec("P")


def bearer_required(handler: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[Any]]:
    """Decorate an API route: 401 unless the request carries the relay's API token.

    The token comes as ``Authorization: Bearer <token>``; the 401 says in one line what is
    missing or wrong.
    """

    @functools.wraps(handler)
    async def checked(*args: P.args, **kwargs: P.kwargs) -> Any:
        token = current_state().config.api_token
        header = request.headers.get("Authorization")
        if bearer_ok(token, header):
            return await handler(*args, **kwargs)
        if not token:
            why = "this relay has no API token: set CRCTL_API_TOKEN"
        elif not header:
            why = "send the relay's API token as 'Authorization: Bearer <token>'"
        else:
            why = "wrong API token"
        return {"error": f"unauthorized: {why}"}, 401, {"WWW-Authenticate": "Bearer"}

    return checked


@api.post("/calls/<call_sid>/messages")
@bearer_required
async def push(call_sid: str) -> Any:
    """Send a message (an outbound frame, as JSON) into a live call."""
    state = current_state()
    limit = state.config.max_frame_bytes
    too_large = {"error": f"message too large: at most {limit} bytes (a frame)"}, 413
    if (request.content_length or 0) > limit:
        return too_large
    body = await request.get_data()  # bounded by MAX_CONTENT_LENGTH, chunked or not
    if len(body) > limit:
        return too_large
    session = state.registry.get(call_sid)
    if session is None:
        return {"error": f"no live call {call_sid}"}, 404
    try:
        message = decode_outbound(body)
    except ProtocolError as exc:
        return {"error": str(exc)}, 400
    await session.push(message)
    state.bus.emit(ev.pushed(call_sid, message))
    return {"sent": type(message).__struct_config__.tag}, 202


@api.get("/events")
@bearer_required
async def events() -> Any:
    """The call events as Server-Sent Events, from ``since`` or after an event id, live."""
    store = current_state().store
    args = request.args
    try:
        since = parse_since(args.get("since"))
        after_text = args.get("after") or request.headers.get("Last-Event-ID") or None
        after = int(after_text) if after_text is not None else None
    except ValueError as exc:
        message = str(exc) if "since" in str(exc) else "after: expected an event id"
        return {"error": message}, 400
    if store.ending:
        return {"error": "the relay is stopping"}, 503
    body = store.stream(since=since, call_sid=args.get("call") or None, after=after)
    response = Response(
        body,
        content_type="text/event-stream; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # a stream, not a request that may hang
    return response


@api.get("/calls")
@bearer_required
async def calls() -> Any:
    """The latest calls (``limit``, 1 to 1000, default 50)."""
    try:
        limit = min(max(int(request.args.get("limit", 50)), 1), 1000)
    except ValueError:
        return {"error": "limit: expected a number"}, 400
    return {"calls": await asyncio.to_thread(current_state().store.calls, limit)}


@api.get("/calls/<call_sid>")
@bearer_required
async def call(call_sid: str) -> Any:
    """One stored call with its events."""
    found = await asyncio.to_thread(current_state().store.call, call_sid)
    if found is None:
        return {"error": f"no stored call {call_sid}"}, 404
    return found
