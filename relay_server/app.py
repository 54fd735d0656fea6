"""The Quart app, wired: its state, its routes and the call socket.

Routes: ``/twiml``, ``/ws``, ``/action``, ``/status``, ``/healthz``, ``/readyz``, the messages
API, the call log (``/events`` as Server-Sent Events, ``/calls``, ``/calls/{sid}``) and
``/metrics`` (Prometheus).

:func:`create_app` only wires: it builds the app's :class:`~relay_server.state.RelayState` and
mounts the routes over it (``routes_twilio``, ``routes_api``) and the call socket (``socket``).
Handlers only move frames and form fields between Twilio and the sessions; they never hold
conversation logic, which lives in the sessions where it can be tested without HTTP. Build the
app with :func:`create_app` so tests inject fakes.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from quart import Quart

from relay_server.agents import EchoAgent, LLMAgent
from relay_server.calls import CallRegistry, SessionFactory
from relay_server.chat import ChatModel
from relay_server.cluster import open_cluster
from relay_server.cluster.conversations import Conversations
from relay_server.cluster.events import SharedEvents
from relay_server.cluster.ledger import RedisLedger
from relay_server.cluster.push import Pushes
from relay_server.config import RelayConfig
from relay_server.errors import ConfigError
from relay_server.events import EventBus
from relay_server.metrics import EXTENSION as METRICS
from relay_server.metrics import MetricsRecorder
from relay_server.routes_api import api
from relay_server.routes_health import health
from relay_server.routes_twilio import twilio
from relay_server.routing import Router, Target, build_router
from relay_server.services import Services, build_services
from relay_server.session import CallSession
from relay_server.socket import RelaySocket
from relay_server.state import (
    EXTENSION,
    RelayState,
    open_store,
    relay_template,
    signature_checker,
    socket_tokens,
)
from relay_server.tools import import_user_module, module_file
from relay_server.tracing import EXTENSION as TRACING
from relay_server.tracing import agent_name, open_tracing
from relay_server.webhooks import bound_bodies

__all__ = ["agent_services", "create_app", "end_streams", "resolve_agent"]


def resolve_agent(config: RelayConfig) -> type[CallSession]:
    """The agent class for ``config.agent``, resolved once, at start.

    ``llm``, ``echo``, ``module:Class`` (imported from ``config.app_dir`` first), or by default
    ``llm`` when an API key or base URL is configured and ``echo`` otherwise.

    Raises:
        ConfigError: one line saying what is wrong with the setting.
    """
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
    chat: ChatModel | None = None,
) -> Quart:
    """Build the relay.

    Args:
        config: the relay's settings.
        events: the bus the relay publishes call events on (a new one by default).
        agent: the session factory; by default the class ``config.agent`` names, resolved here,
            once.
        chat: the chat model LLM agents talk to; by default an OpenAI-compatible client of
            ``config.llm``, opened when the app serves. Pass one (a
            :class:`relay_server.testing.FakeChatModel`) to run the whole relay against a model
            the test scripts; the caller of ``create_app`` then owns it (the app does not close it).

    Raises:
        ConfigError: a setting cannot be used (template, tools, agent, events database).
    """
    app = Quart("relay_server")
    bound_bodies(app, config.max_frame_bytes)
    bus = events or EventBus()
    factory: SessionFactory = agent or resolve_agent(config)
    template = relay_template(config)
    if config.welcome_greeting is None:
        # The greeting the caller hears is the template's: the agent keeps it in history.
        config = replace(config, welcome_greeting=template.relay.get("welcomeGreeting"))
    services = agent_services(app, config, chat)
    router: Router | None = None
    if config.routes_file:
        # RoutesError (a ConfigError): the file, a route's template, agent or tools
        default = Target("", template, config, factory, services)
        router = build_router(config, default, resolve=resolve_agent, build_services=build_services)
        factory = router.session
    checker = signature_checker(config)
    tokens = socket_tokens(config)
    store = open_store(config)
    bus.subscribe(store.append)
    tool_names = dict.fromkeys(tool.name for tool in services.tools)
    for target in router.by_name.values() if router is not None else ():
        tool_names.update(dict.fromkeys(tool.name for tool in target.services.tools))
    metrics = MetricsRecorder(tool_names)
    bus.subscribe(metrics)  # per turn and per call, like the store
    app.extensions[METRICS] = metrics
    tracing = open_tracing(agent_name(config.agent, factory))  # None: OTEL_* not set
    if tracing is not None:
        bus.subscribe(tracing.recorder)  # records spans only; the SDK exports in its thread
        app.extensions[TRACING] = tracing

        @app.after_serving
        async def _close_tracing() -> None:
            tracing.recorder.end_calls()  # on the loop, where the bus calls it
            await asyncio.to_thread(tracing.shutdown)  # exports what is left

    cluster = open_cluster(config)  # ConfigError: no shared secret to sign with
    shared = None
    if cluster is not None:
        shared = SharedEvents(
            cluster, keep_days=config.events_keep_days, max_rows=config.events_max_rows
        )
        bus.subscribe(shared.append)
    registry = CallRegistry(
        ttl=config.resume_ttl,
        max_reconnects=config.max_reconnects,
        directory=cluster.directory if cluster is not None else None,
        conversations=Conversations(cluster, config.resume_ttl) if cluster is not None else None,
    )
    if cluster is not None:
        bus.subscribe(registry.on_event)  # turn boundaries keep the conversation in Redis
        tokens.shared = RedisLedger(cluster)
    state = RelayState(
        config=config,
        bus=bus,
        store=store,
        registry=registry,
        tokens=tokens,
        checker=checker,
        agent=factory,
        services=services,
        template=template,
        cluster=cluster,
        pushes=Pushes(cluster, registry, bus) if cluster is not None else None,
        shared=shared,
        router=router,
    )
    app.extensions[EXTENSION] = state

    if cluster is not None:

        @app.before_serving
        async def _start_cluster() -> None:
            cluster.start()
            for part in (registry.conversations, state.pushes, state.shared):
                if part is not None:
                    part.start()

        @app.after_serving
        async def _close_cluster() -> None:
            for part in (registry.conversations, state.pushes, state.shared):
                if part is not None:
                    await part.aclose()
            await cluster.aclose()

    @app.after_serving
    async def _close_store() -> None:
        store.end_streams()
        await asyncio.to_thread(store.close)  # writes what is still queued

    app.register_blueprint(twilio)
    app.register_blueprint(api)
    app.register_blueprint(health)
    # The call socket: a lean ASGI handler in front of the Quart routes (see socket.py).
    app.asgi_app = RelaySocket(app.asgi_app, state)  # type: ignore[method-assign,assignment]
    return app


def agent_services(app: Quart, config: RelayConfig, chat: ChatModel | None = None) -> Services:
    """The services every session shares: the tools now, the chat model while ``app`` serves.

    The model is opened in the server's event loop and closed when it stops; a ``chat`` given
    by the caller is used as it is and left open.
    """
    services = build_services(config)  # ConfigError: a tool module that cannot be imported
    if chat is not None:
        services.chat = chat
        return services

    @app.before_serving
    async def _open_llm() -> None:
        services.open_chat(config.llm)

    @app.after_serving
    async def _close_llm() -> None:
        await services.aclose()

    return services


def end_streams(app: Quart) -> None:
    """End the app's open ``/events`` streams, so a stopping server need not wait for them.

    Call from the event loop as soon as the server is asked to stop.
    """
    state = app.extensions.get(EXTENSION)
    if isinstance(state, RelayState):
        state.store.end_streams()
        if state.shared is not None:
            state.shared.ending = True
