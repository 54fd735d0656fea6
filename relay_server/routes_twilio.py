"""Twilio's webhooks, and ``/healthz``.

``/twiml`` (the call's TwiML), ``/action`` (a session ended), ``/status`` (the call's status
callback).

Routes over the app's :class:`~relay_server.state.RelayState`: they read form fields, publish
call events and pick a TwiML document, which ``twiml_templates.responses`` builds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response, request

from relay_server import events as ev
from relay_server.protocol.handoff import wants_person
from relay_server.routing import (
    ANSWERED_PARAMETER,
    ROUTE_PARAMETER,
    ROUTE_QUERY,
    Target,
    action_query,
    extra_parameters,
)
from relay_server.state import RelayState, current_state
from relay_server.webhooks import Fields, public_base, twilio_webhook
from twiml_templates import responses

log = logging.getLogger("relay_server.routes")

twilio = Blueprint("twilio", __name__)

_TWIML = "text/xml; charset=utf-8"


def _twiml(document: str) -> Response:
    return Response(document, content_type=_TWIML)


def connect_document(
    state: RelayState,
    greeting: str | None,
    call_sid: str,
    target: Target | None = None,
    params: Mapping[str, str] | None = None,
    answered_by: str = "",
) -> str:
    """The configured template pointed at this relay's ``/ws``.

    The same document ``crctl twiml render/export --url`` gives (a ``/action`` in the template
    lands on this relay), with the call's one-time socket URL (``socket_tokens``); without a
    CallSid (not a call: a person looking) the plain ``/ws``, which opens nothing. Without a
    public URL (local only) the socket URL is ``ws://``.

    ``target``: the call's route (``None`` or the default: the relay's template); ``params``:
    the ``<Parameter>``s of the query (``param_<name>``); ``answered_by``: the request's
    ``AnsweredBy`` (synchronous machine detection). All go in the TwiML as
    :mod:`relay_server.routing` says.
    """
    config = state.config
    url = config.websocket_url(public_base(state))
    if call_sid:
        url = state.tokens.url(url, call_sid)
    template = state.template if target is None else target.template
    extra = dict(params or {})
    action = None
    if target is not None and target.name:
        extra[ROUTE_PARAMETER] = target.name
    if answered_by:
        extra[ANSWERED_PARAMETER] = answered_by
    if target is not None or params:
        own = template.connect.get("action", "")
        query = action_query(target.name if target is not None else "", params or {})
        if own.startswith("/") and query:
            action = own + ("&" if "?" in own else "?") + query
    return responses.connect_relay(
        template,
        url=url,
        greeting=greeting,
        local=config.public_url is None,
        params=extra or None,
        action=action,
    )


def call_route(state: RelayState, fields: Fields) -> tuple[Target | None, dict[str, str]]:
    """The route of a webhook (``None``: no routes) and its extra parameters."""
    query = request.args
    call_sid = fields.get("CallSid", "")
    params = extra_parameters(query, call_sid)
    if state.router is None:
        if query.get(ROUTE_QUERY):
            log.warning(
                "call %s: route %r asked but the relay has no routes (--routes); it gets the "
                "default",
                call_sid or "?",
                query[ROUTE_QUERY][:64],
            )
        return None, params
    return state.router.select(fields, query), params


@twilio.route("/twiml", methods=["GET", "POST"])
@twilio_webhook
async def twiml(fields: Fields) -> Response:
    """The call's TwiML: connect it to this relay (on the call's route, if any)."""
    state = current_state()
    call_sid = fields.get("CallSid", "")
    target, params = call_route(state, fields)
    config = state.config if target is None else target.config
    answered_by = fields.get("AnsweredBy", "")
    if answered_by:  # synchronous machine detection: the result comes with the request
        detection_ms = fields.get("MachineDetectionDuration")
        state.bus.emit(
            ev.CallAnswered(call_sid=call_sid, answered_by=answered_by, detection_ms=detection_ms)
        )
    document = connect_document(
        state, config.welcome_greeting, call_sid, target, params, answered_by
    )
    return _twiml(document)


@twilio.post("/action")
@twilio_webhook
async def action(form: Fields) -> Response:
    """A ConversationRelay session ended: reconnect a dropped socket, hand off, or hang up."""
    state = current_state()
    sid, status = form.get("CallSid", ""), form.get("SessionStatus", "")
    handoff = form.get("HandoffData")
    error_code = form.get("ErrorCode")
    log.info(
        "call %s: session %s (%ss)%s%s",
        sid,
        status or "?",
        form.get("SessionDuration", "?"),
        f", error {error_code}: {form.get('ErrorMessage', '')}" if error_code else "",
        f", handoff {handoff}" if handoff else "",
    )
    state.bus.emit(
        ev.SessionEnd(
            call_sid=sid,
            status=status,
            handoff_data=handoff,
            error_code=error_code,
            error_message=form.get("ErrorMessage"),
            duration=form.get("SessionDuration"),
        )
    )
    # The session is over: its socket URLs open nothing more (on any replica); a reconnect
    # gets a new one.
    await state.tokens.end_call(sid)
    # Reconnect only a dropped socket (64105); other failures (bad TwiML 64101, cannot
    # connect 64102…) would fail again in a loop (Twilio docs: error dictionary).
    # With --redis-url the count and the conversation are the replicas' (the socket may have
    # been on another replica, even one that died).
    dropped = status == "failed" and error_code == "64105"
    if dropped and sid and await state.registry.claim(sid):
        log.info("call %s: socket failed (%s), reconnecting", sid, error_code)
        target, params = call_route(state, form)
        document = connect_document(state, state.config.reconnect_greeting, sid, target, params)
        return _twiml(document)
    state.registry.forget(sid)
    if status == "ended" and wants_person(handoff):
        if state.config.handoff_number:
            return _twiml(responses.dial(state.config.handoff_number))
        log.warning("call %s: hand-off asked but no handoff number is configured", sid)
        return _twiml(responses.hang_up(responses.NOBODY_AVAILABLE))
    if status == "failed":
        return _twiml(responses.hang_up(responses.CALL_AGAIN))
    return _twiml(responses.hang_up())


@twilio.post("/status")
@twilio_webhook
async def status(form: Fields) -> Response:
    """The call's status callback: publish it; a call that is over is forgotten."""
    state = current_state()
    sid, call_status = form.get("CallSid", ""), form.get("CallStatus", "")
    state.bus.emit(
        ev.CallStatus(call_sid=sid, status=call_status, duration=form.get("CallDuration"))
    )
    if call_status in ev.CALL_OVER:
        state.registry.forget(sid)
        await state.tokens.end_call(sid)
    return Response("", 204)


@twilio.get("/healthz")
async def healthz() -> Any:
    """Liveness, with the number of live and parked calls."""
    registry = current_state().registry
    return {"status": "ok", "calls": len(registry), "parked": registry.parked}
