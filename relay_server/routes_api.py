"""The relay's own API, behind its bearer token.

Push a message into a live call (``POST /calls/{sid}/messages``), the call log (``/calls``,
``/calls/{sid}``) and its live feed (``/events``, Server-Sent Events, resumable with ``after=``
or ``Last-Event-ID``).

With ``--redis-url`` a push reaches the call on whichever replica holds its socket
(:mod:`relay_server.cluster.push`), and the call log is every replica's, from Redis
(:mod:`relay_server.cluster.events`).

Outbound calls: ``POST /calls`` (the API token; JSON ``to``, ``from``, ``route``, ``params``,
``machine_detection``; ``from`` defaults to the route's first number) creates a call that
connects to this relay (:mod:`relay_server.dialing`) and answers its SID (a ``route`` the
relay does not serve is refused, with its routes, before Twilio is asked); ``POST /amd`` is
Twilio's asynchronous answering machine detection callback for such a call (signed, like every
Twilio webhook): published as ``call.answered`` and handed to the call's agent
(:meth:`CallSession.on_answered_by`).

``GET /metrics``: the Prometheus metrics (:mod:`relay_server.metrics`), behind the same token
(``crctl serve --metrics-port`` also serves them on a port of their own, without it).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

from quart import Blueprint, Response, current_app, request

from relay_server import dialing, routing
from relay_server import events as ev
from relay_server.cluster import ClusterUnavailable
from relay_server.cluster.push import deliver
from relay_server.metrics import CONTENT_TYPE
from relay_server.metrics import EXTENSION as METRICS
from relay_server.protocol import ProtocolError, decode_outbound
from relay_server.security import bearer_ok
from relay_server.state import current_state
from relay_server.store import parse_since
from relay_server.webhooks import Fields, twilio_webhook

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
    data = await request.get_data(as_text=False)  # bounded by MAX_CONTENT_LENGTH, chunked or not
    body = data if isinstance(data, bytes) else data.encode()
    if len(body) > limit:
        return too_large
    if state.pushes is None or state.registry.get(call_sid) is not None:
        return await deliver(state.registry, state.bus, call_sid, body)
    # Another replica may hold the call's socket (crctl serve --redis-url).
    try:
        holder = await state.pushes.cluster.directory.where(call_sid)
    except ClusterUnavailable as exc:
        return {"error": f"cannot reach the other replicas: {exc}"}, 503
    if holder is None or holder == state.pushes.cluster.replica:
        return {"error": f"no live call {call_sid}"}, 404
    try:
        decode_outbound(body)  # a bad frame is refused here, not by the holder
    except ProtocolError as exc:
        return {"error": str(exc)}, 400
    try:
        return await state.pushes.send(holder, call_sid, body)
    except ClusterUnavailable as exc:
        return {"error": f"cannot reach the other replicas: {exc}"}, 503


#: The JSON keys ``POST /calls`` takes.
CALL_KEYS = ("to", "from", "route", "params", "machine_detection")


@api.post("/calls")
@bearer_required
async def create_call() -> Any:
    """Create an outbound call connected to this relay; answers ``{"call_sid": "CA…"}``."""
    config = current_state().config
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        return {"error": f"send a JSON object with {', '.join(CALL_KEYS)}"}, 400
    unknown = sorted(set(body) - set(CALL_KEYS))
    if unknown:
        return {"error": f"unknown key {unknown[0]!r}: a call takes {', '.join(CALL_KEYS)}"}, 400
    route = body.get("route") or None
    if route is not None and not isinstance(route, str):
        return {"error": f"route: a route's name, got {route!r}"}, 400
    router = current_state().router
    if route is not None and router is None:
        why = "this relay has no routes (crctl serve --routes FILE): leave route out"
        return {"error": f"route {route!r}: {why}"}, 400
    if route is not None and router is not None and route not in router.by_name:
        return {"error": f"route: {routing.no_such_route(route, router.by_name)}"}, 400
    numbers = router.numbers_of(route) if route is not None and router is not None else ()
    to, caller_id = body.get("to"), body.get("from") or (numbers[0] if numbers else None)
    for key, value in (("to", to), ("from", caller_id)):
        if not isinstance(value, str) or not value.strip():
            return {"error": f"{key}: required, a phone number such as +15551234567"}, 400
    assert isinstance(to, str) and isinstance(caller_id, str)  # as checked just above
    params = body.get("params") or {}
    if not isinstance(params, dict):
        return {"error": 'params: an object of names and values, e.g. {"order": "42"}'}, 400
    if config.twilio_account is None:
        why = (
            "this relay has no Twilio credentials to call with: set TWILIO_ACCOUNT_SID with "
            "TWILIO_AUTH_TOKEN (or TWILIO_API_KEY + TWILIO_API_SECRET)"
        )
        return {"error": why}, 503
    if config.public_url is None:
        why = "this relay has no public URL Twilio could connect the call to: set --public-url"
        return {"error": why}, 503
    try:
        call = dialing.call_request(
            config.public_url,
            to,
            caller_id,
            route=route,
            params=params,
            machine_detection=body.get("machine_detection"),
        )
    except ValueError as exc:
        return {"error": str(exc)}, 400
    try:
        created = await dialing.create_call(config.twilio_account, call)
    except dialing.DialError as exc:
        answer: dict[str, Any] = {"error": str(exc), "code": exc.code, "fix": exc.fix}
        refused = exc.status is not None and exc.status < 500 and exc.status != 401
        return answer, (400 if refused else 502)  # 502: Twilio, or the relay's credentials
    return {"call_sid": created["sid"], "status": created.get("status"), "to": call.to}, 201


@api.post("/amd")
@twilio_webhook
async def amd(form: Fields) -> Any:
    """Twilio's asynchronous answering machine detection result for an outbound call."""
    state = current_state()
    sid, answered_by = form.get("CallSid", ""), form.get("AnsweredBy", "") or "unknown"
    state.bus.emit(
        ev.CallAnswered(
            call_sid=sid,
            answered_by=answered_by,
            detection_ms=form.get("MachineDetectionDuration"),
        )
    )
    session = state.registry.get(sid)
    if session is not None:
        await session.answered(answered_by)
    elif sid:
        state.registry.answered_early(sid, answered_by)  # the socket is not open yet
    return Response("", 204)


@api.get("/events")
@bearer_required
async def events() -> Any:
    """The call events as Server-Sent Events, from ``since`` or after an event id, live."""
    state = current_state()
    store = state.store
    args = request.args
    try:
        since = parse_since(args.get("since"))
        after_text = args.get("after") or request.headers.get("Last-Event-ID") or None
        after = int(after_text) if after_text is not None else None
    except ValueError as exc:
        message = str(exc) if "since" in str(exc) else "after: expected an event id"
        return {"error": message}, 400
    if store.ending or (state.shared is not None and state.shared.ending):
        return {"error": "the relay is stopping"}, 503
    call_sid = args.get("call") or None
    if state.shared is None:
        body = store.stream(since=since, call_sid=call_sid, after=after)
    else:  # every replica's events, from Redis
        try:
            start = await state.shared.cursor(since, after)
        except ClusterUnavailable as exc:
            return {"error": f"the shared call log is unavailable: {exc}"}, 503
        body = state.shared.stream(start, since=since, call_sid=call_sid)
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
    shared = current_state().shared
    if shared is None:
        return {"calls": await asyncio.to_thread(current_state().store.calls, limit)}
    try:
        return {"calls": await shared.calls(limit)}
    except ClusterUnavailable as exc:
        return {"error": f"the shared call log is unavailable: {exc}"}, 503


@api.get("/calls/<call_sid>")
@bearer_required
async def call(call_sid: str) -> Any:
    """One stored call with its events."""
    shared = current_state().shared
    if shared is None:
        found = await asyncio.to_thread(current_state().store.call, call_sid)
    else:
        try:
            found = await shared.call(call_sid)
        except ClusterUnavailable as exc:
            return {"error": f"the shared call log is unavailable: {exc}"}, 503
    if found is None:
        return {"error": f"no stored call {call_sid}"}, 404
    return found


@api.get("/metrics")
@bearer_required
async def metrics() -> Any:
    """The relay's metrics in Prometheus' text format (every worker's, with ``--workers``)."""
    recorder = current_app.extensions[METRICS]
    body = await asyncio.to_thread(recorder.render)  # reads files with --workers
    return Response(body, content_type=CONTENT_TYPE, headers={"Cache-Control": "no-cache"})
