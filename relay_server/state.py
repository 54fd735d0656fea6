"""The relay's state: one typed object per app.

Built by :func:`relay_server.app.create_app`, read by the routes (``routes_twilio``,
``routes_api``) and the call socket.

Quart keeps it in ``app.extensions`` (its documented place for an extension's state); the
routes reach it through :func:`current_state` within a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from quart import Quart, current_app

from relay_server.calls import CallRegistry, SessionFactory
from relay_server.cluster import Cluster
from relay_server.cluster.events import SharedEvents
from relay_server.cluster.push import Pushes
from relay_server.config import RelayConfig
from relay_server.drain import Drain
from relay_server.errors import ConfigError
from relay_server.events import EventBus
from relay_server.routing import Router
from relay_server.security import SignatureChecker
from relay_server.services import Services
from relay_server.socket_tokens import SocketTokens, secret_from_auth_token
from relay_server.store import EventStore
from twiml_templates import Template, TemplateError, load_template

log = logging.getLogger("relay_server.state")

#: The key of the state in ``app.extensions``.
EXTENSION = "crctl"


@dataclass(frozen=True)
class RelayState:
    """Everything the routes and the socket share, for one app."""

    #: The configuration, with the template's greeting filled in when none was set.
    config: RelayConfig
    bus: EventBus
    store: EventStore
    registry: CallRegistry
    tokens: SocketTokens
    #: ``None``: signature checks are off (no auth token, or turned off).
    checker: SignatureChecker | None
    #: The agent class (resolved once, at start), or a factory given by the caller.
    agent: SessionFactory
    #: What every call shares: the chat model, the tools, the timers' clock.
    services: Services
    #: The template ``/twiml`` (and a reconnect from ``/action``) serves.
    template: Template
    #: The link to the other replicas (``--redis-url``); ``None``: this process alone.
    cluster: Cluster | None = None
    #: Pushes to the calls other replicas hold (with ``cluster``).
    pushes: Pushes | None = None
    #: Every replica's call events and calls in Redis (with ``cluster``): ``/events``, ``/calls``.
    shared: SharedEvents | None = None
    #: The routes of ``--routes`` (``None``: every call gets the settings above).
    router: Router | None = None
    #: The live sockets, and whether the relay is draining (stopping on SIGTERM).
    drain: Drain = field(default_factory=Drain)


def relay_state(app: Quart) -> RelayState:
    """The state :func:`relay_server.app.create_app` put on ``app``."""
    state = app.extensions[EXTENSION]
    if not isinstance(state, RelayState):
        raise TypeError(f"app.extensions[{EXTENSION!r}] is not a RelayState: not a relay app")
    return state


def current_state() -> RelayState:
    """The state of the app handling the current request."""
    return relay_state(current_app)


def relay_template(config: RelayConfig) -> Template:
    """The template named by ``config.twiml_template``; a bad one is a :class:`ConfigError`."""
    try:
        return load_template(config.twiml_template)
    except TemplateError as exc:
        raise ConfigError(f"setting twiml_template: {exc}") from exc


def signature_checker(config: RelayConfig) -> SignatureChecker | None:
    """The checker of Twilio's signatures, or ``None`` when they are not checked."""
    if config.auth_token and config.verify_signatures:
        return SignatureChecker(config.auth_token)
    return None


def socket_tokens(config: RelayConfig) -> SocketTokens:
    """The minter and checker of the per-call socket URLs.

    Keyed by ``socket_secret``, else by a key derived from the auth token, else by a random key
    of this process (the same rules with signature checks off: only the key differs).
    """
    lifetime = config.socket_token_lifetime
    if config.socket_secret:
        return SocketTokens(config.socket_secret.encode(), lifetime=lifetime)
    if config.auth_token:
        return SocketTokens(secret_from_auth_token(config.auth_token), lifetime=lifetime)
    log.info("socket URLs: no CRCTL_SOCKET_SECRET or TWILIO_AUTH_TOKEN; keyed for this process")
    return SocketTokens.random(lifetime=lifetime)


def open_store(config: RelayConfig) -> EventStore:
    """The call log (``config.events_db``).

    Raises:
        ConfigError: the database cannot be used; the message names the setting.
    """
    try:
        return EventStore(
            config.events_db, keep_days=config.events_keep_days, max_rows=config.events_max_rows
        )
    except ConfigError as exc:
        raise ConfigError(f"setting events_db (CRCTL_EVENTS_DB): {exc}") from exc
