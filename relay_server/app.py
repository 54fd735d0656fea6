"""The Quart app: ``/twiml``, ``/ws``, ``/action``, ``/status``, ``/healthz``, the messages API and
the call log (``/events`` as Server-Sent Events, ``/calls``, ``/calls/{sid}``).

Handlers only move frames and form fields between Twilio and the sessions; they never hold
conversation logic (DESIGN.md). Build the app with :func:`create_app` so tests inject fakes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

from quart import Quart, Response, request
from twilio.twiml.voice_response import Dial, Hangup, Say, VoiceResponse

from relay_server import events as ev
from relay_server.agents import EchoAgent, LLMAgent
from relay_server.calls import CallRegistry, SessionFactory
from relay_server.config import RelayConfig
from relay_server.errors import ConfigError
from relay_server.events import EventBus
from relay_server.protocol import ProtocolError, decode_outbound
from relay_server.security import SignatureChecker, bearer_ok
from relay_server.services import build_services
from relay_server.session import CallSession, SessionLink
from relay_server.socket import RelaySocket
from relay_server.socket_tokens import SocketTokens, secret_from_auth_token
from relay_server.store import EventStore, parse_since
from relay_server.tools import import_user_module, module_file
from twiml_templates import TemplateError, load_template, render

log = logging.getLogger("relay_server.app")

_TWIML = "text/xml; charset=utf-8"
#: The largest request body the relay reads (Twilio's webhooks are a few KiB; a pushed message
#: may be as large as a frame, ``max_frame_bytes``): larger gets 413 before it is read whole,
#: also without a Content-Length (chunked).
BODY_MAX_BYTES = 64 << 10
#: Seconds a client has to send a request's body once the handler reads it (then 408).
BODY_TIMEOUT_SECONDS = 10


def resolve_agent(config: RelayConfig) -> type[CallSession]:
    """The agent class for ``config.agent``: ``llm``, ``echo``, ``module:Class`` (imported from
    ``config.app_dir`` first), or by default ``llm`` when an API key or base URL is configured
    and ``echo`` otherwise. Raises :class:`ConfigError` with one line saying what is wrong."""
    name = config.agent or ("llm" if config.llm.api_key or config.llm.base_url else "echo")
    if name == "llm":
        return LLMAgent
    if name == "echo":
        return EchoAgent
    what = f"agent {name!r}"
    module_name, colon, attr = name.partition(":")
    if not colon:
        raise ConfigError(
            f"{what}: expected llm, echo or module:Class (a CallSession subclass); to use a "
            f"class from {name}.py, name it: {name}:ClassName"
        )
    if not module_name or not attr:
        raise ConfigError(f"{what}: expected module:Class, e.g. my_agent:MyAgent")
    module = import_user_module(module_name, config.app_dir, what)
    try:
        cls: Any = module
        for part in attr.split("."):
            cls = getattr(cls, part)
    except AttributeError:
        own = sorted(
            n
            for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, CallSession) and v.__module__ == module_name
        )
        defines = f"it defines {', '.join(own)}" if own else "it defines no CallSession subclass"
        raise ConfigError(
            f"{what}: {module_name} ({module_file(module)}) has no {attr!r}; {defines}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, CallSession)) or cls is CallSession:
        kind = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ConfigError(
            f"{what}: {module_name}.{attr} is {kind}, not a subclass of relay_server.CallSession"
        )
    return cls


def create_app(
    config: RelayConfig,
    *,
    events: EventBus | None = None,
    agent: SessionFactory | None = None,
) -> Quart:
    """Build the relay. ``agent`` overrides the class chosen by ``config.agent``."""
    app = Quart("relay_server")
    # Quart checks Content-Length before reading and counts a chunked body as it arrives.
    app.config["MAX_CONTENT_LENGTH"] = max(BODY_MAX_BYTES, config.max_frame_bytes)
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_SECONDS

    @app.errorhandler(413)
    async def _too_large(_: Exception) -> Any:
        limit = int(app.config["MAX_CONTENT_LENGTH"])
        log.warning(
            "refused %s %s: body larger than %d KiB (Content-Length %s)",
            request.method,
            request.path,
            limit >> 10,
            request.content_length if request.content_length is not None else "none: chunked",
        )
        return {"error": f"request body too large: at most {limit} bytes"}, 413

    bus = events or EventBus()
    registry = CallRegistry(ttl=config.resume_ttl, max_reconnects=config.max_reconnects)
    factory: SessionFactory = agent or resolve_agent(config)
    try:
        template = load_template(config.twiml_template)
    except TemplateError as exc:
        raise ConfigError(f"setting twiml_template: {exc}") from exc
    if config.welcome_greeting is None:
        # The greeting the caller hears is the template's: the agent keeps it in history.
        config = replace(config, welcome_greeting=template.relay.get("welcomeGreeting"))
    services = build_services(config)  # ConfigError: a tool module that cannot be imported
    checker = (
        SignatureChecker(config.auth_token)
        if config.auth_token and config.verify_signatures
        else None
    )
    tokens = socket_tokens(config)
    link = SessionLink(_no_socket, bus, config, services)
    try:
        store = EventStore(
            config.events_db, keep_days=config.events_keep_days, max_rows=config.events_max_rows
        )
    except ConfigError as exc:
        raise ConfigError(f"setting events_db (CRCTL_EVENTS_DB): {exc}") from exc
    bus.subscribe(store.append)
    app.extensions["crctl"] = {
        "registry": registry,
        "events": bus,
        "config": config,
        "store": store,
        "socket_tokens": tokens,
    }

    @app.before_serving
    async def _open_llm() -> None:
        services.open_chat(config.llm)

    @app.after_serving
    async def _close_llm() -> None:
        await services.aclose()

    @app.after_serving
    async def _close_store() -> None:
        store.end_streams()
        await asyncio.to_thread(store.close)  # writes what is still queued

    def base() -> str:
        return config.public_base(request.host_url)

    async def signed(path: str) -> bool:
        """Check a webhook's signature against the public URL (+ the raw query string)."""
        if checker is None:
            return True
        url = base() + path
        if request.query_string:
            url += "?" + request.query_string.decode()
        params = await request.form if request.method == "POST" else {}
        if checker.http_ok(url, params, request.headers.get("X-Twilio-Signature")):
            return True
        log.warning(
            "refused %s %s: bad or missing X-Twilio-Signature (checked %s)",
            request.method,
            path,
            url,
        )
        return False

    def twiml(greeting: str | None, call_sid: str) -> str:
        # The configured template pointed at this relay's /ws: the same document `crctl twiml
        # render/export --url` gives (a "/action" in the template lands on this relay), with
        # the call's one-time socket URL (socket_tokens.py); without a CallSid (not a call: a
        # person looking) the plain /ws, which opens nothing. Without a public URL (local
        # only) the socket URL is ws://.
        sets = {"welcomeGreeting": greeting} if greeting else None
        url = config.websocket_url(base())
        if call_sid:
            url = tokens.url(url, call_sid)
        return render(template, url=url, sets=sets, local=config.public_url is None)

    @app.route("/twiml", methods=["GET", "POST"])
    async def twiml_route() -> Response:
        if not await signed("/twiml"):
            return Response("forbidden\n", 403)
        fields = await request.form if request.method == "POST" else request.args
        call_sid = fields.get("CallSid", "")
        return Response(twiml(config.welcome_greeting, call_sid), content_type=_TWIML)

    # The call socket: a lean ASGI handler in front of the Quart routes (see socket.py).
    app.asgi_app = RelaySocket(  # type: ignore[method-assign,assignment]
        app.asgi_app,
        config=config,
        checker=checker,
        registry=registry,
        factory=factory,
        link=link,
        tokens=tokens,
    )

    @app.post("/action")
    async def action_route() -> Response:
        if not await signed("/action"):
            return Response("forbidden\n", 403)
        form = await request.form
        sid, status = form.get("CallSid", ""), form.get("SessionStatus", "")
        handoff = form.get("HandoffData")
        log.info(
            "call %s: session %s (%ss)%s%s",
            sid,
            status or "?",
            form.get("SessionDuration", "?"),
            f", error {form.get('ErrorCode')}: {form.get('ErrorMessage', '')}"
            if form.get("ErrorCode")
            else "",
            f", handoff {handoff}" if handoff else "",
        )
        bus.publish(
            ev.SESSION_END,
            sid,
            status=status,
            handoff_data=handoff,
            error_code=form.get("ErrorCode"),
            error_message=form.get("ErrorMessage"),
            duration=form.get("SessionDuration"),
        )
        # The session is over: its socket URLs open nothing more; a reconnect gets a new one.
        tokens.ledger.end_call(sid)
        # Reconnect only a dropped socket (64105); other failures (bad TwiML 64101, cannot
        # connect 64102…) would fail again in a loop.
        dropped = status == "failed" and form.get("ErrorCode") == "64105"
        if dropped and sid and registry.claim_reconnect(sid):
            log.info("call %s: socket failed (%s), reconnecting", sid, form.get("ErrorCode"))
            return Response(twiml(config.reconnect_greeting, sid), content_type=_TWIML)
        registry.forget(sid)
        response = VoiceResponse()
        if status == "ended" and _wants_handoff(handoff):
            if config.handoff_number:
                response.append(Dial(config.handoff_number))
            else:
                log.warning("call %s: hand-off asked but no handoff number is configured", sid)
                response.append(Say("Sorry, nobody is available to take your call. Goodbye."))
        elif status == "failed":
            response.append(Say("Sorry, something went wrong. Please call again."))
        response.append(Hangup())
        return Response(str(response), content_type=_TWIML)

    @app.post("/status")
    async def status_route() -> Response:
        if not await signed("/status"):
            return Response("forbidden\n", 403)
        form = await request.form
        sid, status = form.get("CallSid", ""), form.get("CallStatus", "")
        bus.publish(ev.CALL_STATUS, sid, status=status, duration=form.get("CallDuration"))
        if status in ev.CALL_OVER:
            registry.forget(sid)
            tokens.ledger.end_call(sid)
        return Response("", 204)

    @app.get("/healthz")
    async def health_route() -> Any:
        return {"status": "ok", "calls": len(registry), "parked": registry.parked}

    # --------------------------------------------------- the relay's own API (bearer token)
    def refused() -> tuple[dict[str, str], int, dict[str, str]] | None:
        """A 401 with a one-line reason, unless the request carries the API token."""
        header = request.headers.get("Authorization")
        if bearer_ok(config.api_token, header):
            return None
        if not config.api_token:
            why = "this relay has no API token: set CRCTL_API_TOKEN"
        elif not header:
            why = "send the relay's API token as 'Authorization: Bearer <token>'"
        else:
            why = "wrong API token"
        return {"error": f"unauthorized: {why}"}, 401, {"WWW-Authenticate": "Bearer"}

    @app.post("/calls/<call_sid>/messages")
    async def push_route(call_sid: str) -> Any:
        if (refusal := refused()) is not None:
            return refusal
        limit = config.max_frame_bytes
        if (request.content_length or 0) > limit:
            return {"error": f"message too large: at most {limit} bytes (a frame)"}, 413
        body = await request.get_data()  # bounded by MAX_CONTENT_LENGTH, chunked or not
        if len(body) > limit:
            return {"error": f"message too large: at most {limit} bytes (a frame)"}, 413
        session = registry.get(call_sid)
        if session is None:
            return {"error": f"no live call {call_sid}"}, 404
        try:
            message = decode_outbound(body)
        except ProtocolError as exc:
            return {"error": str(exc)}, 400
        await session.push(message)
        bus.publish(ev.AGENT_PUSHED, call_sid, **ev.pushed(message))
        return {"sent": type(message).__struct_config__.tag}, 202

    @app.get("/events")
    async def events_route() -> Any:
        if (answer := refused()) is not None:
            return answer
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

    @app.get("/calls")
    async def calls_route() -> Any:
        if (answer := refused()) is not None:
            return answer
        try:
            limit = min(max(int(request.args.get("limit", 50)), 1), 1000)
        except ValueError:
            return {"error": "limit: expected a number"}, 400
        return {"calls": await asyncio.to_thread(store.calls, limit)}

    @app.get("/calls/<call_sid>")
    async def call_route(call_sid: str) -> Any:
        if (answer := refused()) is not None:
            return answer
        call = await asyncio.to_thread(store.call, call_sid)
        if call is None:
            return {"error": f"no stored call {call_sid}"}, 404
        return call

    return app


def socket_tokens(config: RelayConfig) -> SocketTokens:
    """The minter and checker of the per-call socket URLs: keyed by ``socket_secret``, else by
    a key derived from the auth token, else by a random key of this process (the same rules
    with signature checks off: only the key differs)."""
    lifetime = config.socket_token_lifetime
    if config.socket_secret:
        return SocketTokens(config.socket_secret.encode(), lifetime=lifetime)
    if config.auth_token:
        return SocketTokens(secret_from_auth_token(config.auth_token), lifetime=lifetime)
    log.info("socket URLs: no CRCTL_SOCKET_SECRET or TWILIO_AUTH_TOKEN; keyed for this process")
    return SocketTokens.random(lifetime=lifetime)


def end_streams(app: Quart) -> None:
    """End the app's open ``/events`` streams, so a stopping server need not wait for them
    (call from the event loop as soon as the server is asked to stop)."""
    store = app.extensions.get("crctl", {}).get("store")
    if store is not None:
        store.end_streams()


def _wants_handoff(handoff: str | None) -> bool:
    if not handoff:
        return False
    try:
        data = json.loads(handoff)
    except ValueError:
        return True  # free text from a custom agent: treat as a hand-off request
    return isinstance(data, dict) and (
        data.get("reasonCode") == "live-agent-handoff" or bool(data.get("handoff"))
    )


async def _no_socket(frame: str) -> None:  # replaced per connection
    raise RuntimeError("no socket")
