"""Routes: one relay answering several numbers, each with its own agent (``--routes FILE``).

The routes file (TOML) maps numbers to agents::

    [[route]]
    name = "support"                    # letters, digits, - and _; unique
    numbers = ["+15550100002"]          # E.164; the number called (inbound) or calling (outbound)
    template = "support.toml"           # a TwiML template: a preset, ./twiml/ name or .toml path
    agent = "llm"                       # llm, echo or module:Class
    tools = ["shop_tools"]              # modules of @tool functions (instead of --tools)
    system_prompt = "You are the support line of…"
    model = "gpt-4o-mini"
    welcome_greeting = "Support, hello!"  # optional: instead of the template's

Only ``name`` is required; a key left out is the relay's own setting (``--agent``, ``--tools``,
``--system-prompt``, ``--model``, ``--twiml-template``). A template path is relative to the
routes file. A number may belong to one route only. A bad file is one line naming the file,
the route, the key, the value and what is allowed (:class:`RoutesError`, a ``ConfigError``:
``crctl serve`` exits with code 2).

The contract of ``/twiml`` (what ``crctl dial`` and ``POST /calls`` rely on):

* **Which route.** ``/twiml?route=NAME`` (a query parameter of the URL Twilio fetches, so it
  is inside the signed URL) selects the route named NAME: that is how an outbound call picks
  its route. Without it, the route whose ``numbers`` hold the call's number: ``From`` when
  Twilio's ``Direction`` is ``outbound-api``/``outbound-dial`` (the number calling), ``To``
  otherwise (the number called). A call matching no route gets the default: the relay's own
  settings, exactly as without a routes file. An unknown ``route=NAME`` is logged as a warning
  and the call gets the default (the call is already answered by then: ``crctl dial`` and
  ``POST /calls`` refuse an unknown route before placing the call).
* **Extra parameters.** Every ``param_<name>=<value>`` of the ``/twiml`` query becomes
  ``<Parameter name="<name>" value="<value>"/>`` in the ``<ConversationRelay>``, after the
  template's own (a query parameter wins over the template's of the same name); the session
  reads them in ``setup.customParameters``. Names starting with ``crctl_`` are the relay's own
  and are ignored (logged). ``crctl dial --param k=v`` sends ``param_k=v``.
* **The route reaches the socket** as ``<Parameter name="crctl_route" value="NAME"/>``
  (:data:`ROUTE_PARAMETER`): the session of that call's socket is built from the route named in
  ``setup.customParameters["crctl_route"]`` (its agent, tools, system prompt, model and
  greeting). The default route adds no parameter: its TwiML is what it was without routes.
* **Who answered.** A ``/twiml`` request with ``AnsweredBy`` (a call placed with synchronous
  machine detection) adds ``<Parameter name="crctl_answered_by" value="…"/>``
  (:data:`ANSWERED_PARAMETER`): the session gets it at setup (``CallSession.on_answered_by``),
  as it gets an asynchronous result from ``/amd``.
* **Session ends keep both.** When the template's ``<Connect action>`` is a path on the relay
  (``/action``), the route and the extra parameters are appended to its query
  (``/action?route=NAME&param_k=v``), so the TwiML ``/action`` answers with (a reconnect)
  carries the same route and parameters.
"""

from __future__ import annotations

import difflib
import logging
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relay_server.errors import ConfigError
from twiml_templates import Template, TemplateError, load_template
from twiml_templates.templates import find

if TYPE_CHECKING:
    from relay_server.calls import SessionFactory
    from relay_server.config import RelayConfig
    from relay_server.protocol import Setup
    from relay_server.services import Services
    from relay_server.session import CallSession, SessionLink

log = logging.getLogger("relay_server.routing")

#: The ``<Parameter>`` that tells the socket's session which route its call is on.
ROUTE_PARAMETER = "crctl_route"
#: The ``<Parameter>`` that carries ``AnsweredBy`` when Twilio's ``/twiml`` request has it
#: (synchronous answering machine detection): the call's agent sees it at setup.
ANSWERED_PARAMETER = "crctl_answered_by"
#: The ``/twiml`` (and ``/action``) query parameter that selects a route by name.
ROUTE_QUERY = "route"
#: ``param_<name>=<value>`` in the ``/twiml`` query: a ``<Parameter>`` of the call.
PARAM_PREFIX = "param_"
#: Parameter names kept for the relay itself.
RESERVED_PREFIX = "crctl_"
#: Twilio's Direction values of a call the account placed (the number is ``From``).
OUTBOUND = ("outbound-api", "outbound-dial")

#: What a route's name may be (:data:`ALLOWED` ``name`` says it in words).
ROUTE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")

#: What each key of a route takes, as the error lines say it.
ALLOWED = {
    "name": "letters, digits, - and _ (at most 64), unique in the routes file",
    "numbers": 'a list of E.164 numbers, e.g. ["+15550100002"], each in one route only',
    "template": "a TwiML template: a preset, a ./twiml/ name or a .toml path (relative to the "
    "routes file)",
    "agent": "llm, echo or module:Class",
    "tools": 'a list of module names, e.g. ["shop_tools"]',
    "system_prompt": "text",
    "model": "a model name, as text",
    "welcome_greeting": "text",
}


class RoutesError(ConfigError):
    """The routes file is not valid: one line naming file, route, key, value, what is allowed."""


class RouteSpec(BaseModel):
    """One ``[[route]]`` table of the routes file, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(description=ALLOWED["name"])
    numbers: tuple[str, ...] = Field((), description=ALLOWED["numbers"])
    template: str | None = Field(None, description=ALLOWED["template"])
    agent: str | None = Field(None, description=ALLOWED["agent"])
    tools: tuple[str, ...] | None = Field(None, description=ALLOWED["tools"])
    system_prompt: str | None = Field(None, description=ALLOWED["system_prompt"])
    model: str | None = Field(None, description=ALLOWED["model"])
    welcome_greeting: str | None = Field(None, description=ALLOWED["welcome_greeting"])

    @field_validator("numbers", "tools", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ROUTE_NAME.match(value):
            raise ValueError("not a route name")
        return value

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number in value:
            if not _E164.match(number):
                raise ValueError(f"{number!r} is not an E.164 number")
        return value

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str | None) -> str | None:
        if value is None or value in ("llm", "echo"):
            return value
        module, colon, attr = value.partition(":")
        if not (colon and module and attr):
            raise ValueError("not llm, echo or module:Class")
        return value

    @field_validator("system_prompt", "model", "template", "welcome_greeting")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty")
        return value


_KEYS = tuple(RouteSpec.model_fields)


@dataclass(frozen=True)
class Route:
    """A route of the file, its template loaded."""

    spec: RouteSpec
    template: Template

    @property
    def name(self) -> str:
        """The route's name."""
        return self.spec.name


def load_routes(path: str | Path) -> tuple[Route, ...]:
    """The routes of the file at ``path``, validated, their templates loaded.

    Raises:
        RoutesError: one line: the file, the route (its number and name), the key, the value
            and what is allowed, with "did you mean" for a misspelt key.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RoutesError(
            f"{path}: routes file not found (--routes / CRCTL_ROUTES); give the path of a TOML "
            "file of [[route]] tables"
        ) from None
    except OSError as exc:
        raise RoutesError(f"{path}: cannot read the routes file: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RoutesError(f"{path}: not valid TOML: {exc}") from None
    for key in raw:
        if key != "route":
            hint = _did_you_mean(key, ["route"])
            raise RoutesError(
                f"{path}: key {key!r}: unknown top-level key{hint}; a routes file holds only "
                "[[route]] tables"
            )
    tables = raw.get("route")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise RoutesError(
            f'{path}: no routes: expected [[route]] tables, each with at least name = "…"'
        )
    routes: list[Route] = []
    owner: dict[str, str] = {}
    for index, table in enumerate(tables, 1):
        where = f"{path}: route {index}" + (
            f" ({table['name']})" if isinstance(table.get("name"), str) else ""
        )
        spec = _spec(table, where)
        if any(route.name == spec.name for route in routes):
            raise RoutesError(
                f"{where}: key name: value {spec.name!r} is already the name of another route; "
                f"allowed: {ALLOWED['name']}"
            )
        for number in spec.numbers:
            if number in owner:
                raise RoutesError(
                    f"{where}: key numbers: value {number!r} is already in route "
                    f"{owner[number]!r}; a number belongs to one route"
                )
            owner[number] = spec.name
        routes.append(Route(spec, _template(spec, path, where)))
    return tuple(routes)


def _spec(table: dict[str, Any], where: str) -> RouteSpec:
    try:
        return RouteSpec.model_validate(table)
    except ValidationError as exc:
        error = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[
            0
        ]
        key = str(error["loc"][0]) if error["loc"] else "route"
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            hint = _did_you_mean(key, _KEYS)
            raise RoutesError(
                f"{where}: key {key!r} (value {_short(value)}): unknown key{hint}; a route takes "
                f"{', '.join(_KEYS)}"
            ) from None
        if error["type"] == "missing":
            raise RoutesError(f"{where}: key {key} is required; allowed: {ALLOWED[key]}") from None
        cause = (error.get("ctx") or {}).get("error")
        problem = f" ({cause})" if isinstance(cause, ValueError) else ""
        if key in ("numbers", "tools") and len(error["loc"]) > 1:
            value = table.get(key)
        raise RoutesError(
            f"{where}: key {key}: value {_short(value)} is not allowed{problem}; allowed: "
            f"{ALLOWED.get(key, '')}"
        ) from None


def _template(spec: RouteSpec, path: Path, where: str) -> Template:
    """The route's template (without one: a placeholder, the relay's is used)."""
    if spec.template is None:
        return Template(name="", path=path)  # a placeholder: the relay's own template
    try:
        return load_template(find(spec.template, base=path.parent))
    except TemplateError as exc:
        raise RoutesError(f"{where}: key template: value {spec.template!r}: {exc}") from None


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------------- at run time


@dataclass(frozen=True)
class Target:
    """What a call on one route gets: its template, configuration, agent and services."""

    #: The route's name; ``""``: the default (the relay's own settings).
    name: str
    template: Template
    #: The relay's configuration with the route's agent, prompt, model and greeting.
    config: RelayConfig
    factory: SessionFactory
    services: Services


class Router:
    """The relay's routes, by name and by number, and the session factory that honours them."""

    def __init__(self, default: Target, targets: list[tuple[Route, Target]]) -> None:
        self.default = default
        self.by_name = {route.name: target for route, target in targets}
        self.by_number = {n: target for route, target in targets for n in route.spec.numbers}

    def numbers_of(self, name: str) -> tuple[str, ...]:
        """The numbers of the route named ``name``, in the file's order (its caller IDs)."""
        return tuple(n for n, target in self.by_number.items() if target.name == name)

    def select(self, fields: Mapping[str, str], query: Mapping[str, str]) -> Target:
        """The route of a webhook: ``?route=NAME``, else its number, else the default."""
        name = query.get(ROUTE_QUERY)
        if name:
            target = self.by_name.get(name)
            if target is not None:
                return target
            log.warning(
                "call %s: %s; it gets the default",
                fields.get("CallSid", "?"),
                no_such_route(name[:64], self.by_name),
            )
            return self.default
        outbound = fields.get("Direction", "") in OUTBOUND
        number = fields.get("From" if outbound else "To", "")
        return self.by_number.get(number, self.default)

    def session(self, link: SessionLink, setup: Setup) -> CallSession:
        """The session of a call's socket, from the route its TwiML named."""
        from relay_server.session import SessionLink

        target = self.by_name.get(setup.custom_parameters.get(ROUTE_PARAMETER, ""))
        if target is None:
            return self.default.factory(link, setup)
        services = target.services
        if services is not self.default.services:
            # the route's own tools; the chat model (opened when the relay serves) and the
            # clock are the relay's
            services.chat = self.default.services.chat
            services.clock = self.default.services.clock
        routed = SessionLink(link.send, link.events, target.config, services)
        return target.factory(routed, setup)


def no_such_route(name: str, names: Iterable[str]) -> str:
    """``no route 'NAME'; did you mean 'NAME2'? (routes: a, b)``: an unknown route, in words."""
    known = list(names)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"no route {name!r}{hint} (routes: {', '.join(known) or 'none'})"


def action_query(route: str, params: Mapping[str, str]) -> str:
    """The query a relative ``<Connect action>`` carries for ``route`` (``""``: the default)."""
    pairs = [(ROUTE_QUERY, route)] if route else []
    pairs += [(PARAM_PREFIX + k, v) for k, v in params.items()]
    return urlencode(pairs)


def extra_parameters(query: Mapping[str, str], call_sid: str = "") -> dict[str, str]:
    """The ``param_<name>=<value>`` pairs of a ``/twiml`` query, as ``<Parameter>``s."""
    params: dict[str, str] = {}
    for key, value in query.items():
        if not key.startswith(PARAM_PREFIX):
            continue
        name = key[len(PARAM_PREFIX) :]
        if not name or name.startswith(RESERVED_PREFIX):
            log.warning(
                "call %s: query parameter %r ignored: %s",
                call_sid or "?",
                key[:64],
                "no name" if not name else f"names starting with {RESERVED_PREFIX} are the relay's",
            )
            continue
        params[name] = value
    return params


def build_router(
    config: RelayConfig,
    default: Target,
    *,
    resolve: Any,
    build_services: Any,
) -> Router:
    """The router of ``config.routes_file``: each route's agent class and tools resolved now.

    ``resolve`` (``app.resolve_agent``) and ``build_services`` (``services.build_services``)
    are passed in, so this module imports neither.

    Raises:
        RoutesError: the file, or a route's agent or tools, cannot be used.
    """
    assert config.routes_file is not None
    targets = []
    for route in load_routes(config.routes_file):
        spec = route.spec
        where = f"{config.routes_file}: route {route.name}"
        template = route.template if spec.template is not None else default.template
        greeting = spec.welcome_greeting or (
            template.relay.get("welcomeGreeting")
            if spec.template is not None
            else default.config.welcome_greeting
        )
        agent_config = default.config.agent_config
        agent_config = replace(
            agent_config,
            system_prompt=spec.system_prompt or agent_config.system_prompt,
            model=spec.model or agent_config.model,
        )
        routed = replace(
            default.config,
            agent=spec.agent or default.config.agent,
            tool_modules=spec.tools if spec.tools is not None else default.config.tool_modules,
            welcome_greeting=greeting,
            agent_config=agent_config,
        )
        try:
            factory = resolve(routed) if spec.agent is not None else default.factory
            services = default.services
            if spec.tools is not None:
                services = build_services(routed)
        except RoutesError:
            raise
        except ConfigError as exc:
            raise RoutesError(f"{where}: {exc}") from None
        target = Target(route.name, template, routed, factory, services)
        targets.append((route, target))
    return Router(default, targets)


__all__ = [
    "ANSWERED_PARAMETER",
    "ROUTE_PARAMETER",
    "Route",
    "RouteSpec",
    "Router",
    "RoutesError",
    "Target",
    "action_query",
    "build_router",
    "extra_parameters",
    "load_routes",
    "no_such_route",
]
