"""Outbound calls: the request that makes Twilio call someone and connect them to this relay.

One builder, :func:`call_request`, for both doors: ``crctl dial`` sends it with the twilio SDK
(:mod:`crctl.dial`), the relay's ``POST /calls`` with :func:`create_call` (aiohttp; the relay
has no twilio REST client). So the two send the same form to Twilio's Calls resource
(``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``; Twilio docs: Call resource, "Create a
Call"):

- ``Url`` = ``{public}/twiml`` with ``route=NAME`` and each parameter ``k=v`` as ``param_k=v``
  in its query (``Method=POST``): the document ``/twiml`` serves for the route, with a
  ``<Parameter name="k" value="v"/>`` per parameter (:mod:`relay_server.routing`'s contract);
- ``StatusCallback`` = ``{public}/status`` for ``initiated``, ``ringing``, ``answered`` and
  ``completed`` (``StatusCallbackMethod=POST``): the call's progress in the call log;
- with machine detection, ``MachineDetection`` (``Enable`` or ``DetectMessageEnd``) *and*
  ``AsyncAmd=true`` with ``AsyncAmdStatusCallback={public}/amd``. Asynchronous on purpose:
  synchronous AMD holds the TwiML until it has decided (up to several seconds of silence for a
  person who just said "hello?"); asynchronously the conversation starts at once and the result
  reaches the call's agent when it comes (``/amd`` → :meth:`CallSession.on_answered_by`).

Twilio's refusals of a Call become one line with the fix (:data:`REFUSALS`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from relay_server.config import TwilioAccount
from relay_server.errors import RelayError
from relay_server.routing import ALLOWED, PARAM_PREFIX, RESERVED_PREFIX, ROUTE_NAME, ROUTE_QUERY

#: ``MachineDetection`` values Twilio takes (Twilio docs: Answering Machine Detection).
MACHINE_DETECTION = ("Enable", "DetectMessageEnd")
#: The status callback events asked for: every step of an outbound call.
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
#: What to do when Twilio refuses to create a call, by error code (Twilio docs: error
#: dictionary).
REFUSALS: dict[int, str] = {
    21211: "give the number called in E.164 form, with its country code: +15551234567",
    21215: "this account may not call that country: allow it in the Console, Voice → Settings "
    "→ Geo permissions (https://console.twilio.com/us1/develop/voice/settings/geo-permissions)",
    21219: "a trial account calls verified numbers only: verify it in the Console (Phone "
    "Numbers → Verified Caller IDs) or upgrade the account",
    21210: "call from (--from) a number of this account (`crctl numbers list`) or one of its "
    "verified caller IDs",
}


class DialError(RelayError):
    """A call could not be created.

    Attributes:
        code: Twilio's error code, when Twilio refused (``None``: Twilio was not reached).
        status: the HTTP status of Twilio's answer, when there was one.
        fix: what to do about it, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        status: int | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.fix = fix


@dataclass(frozen=True)
class CallRequest:
    """A Call to create, in the Calls resource's terms."""

    to: str
    from_: str
    url: str
    status_callback: str
    machine_detection: str | None = None
    amd_callback: str | None = None
    status_events: tuple[str, ...] = field(default=STATUS_EVENTS)

    def form(self) -> list[tuple[str, str]]:
        """The form Twilio receives, parameter by parameter (``StatusCallbackEvent`` repeated)."""
        pairs = [
            ("To", self.to),
            ("From", self.from_),
            ("Url", self.url),
            ("Method", "POST"),
            ("StatusCallback", self.status_callback),
            ("StatusCallbackMethod", "POST"),
            *(("StatusCallbackEvent", event) for event in self.status_events),
        ]
        if self.machine_detection is not None and self.amd_callback is not None:
            pairs += [
                ("MachineDetection", self.machine_detection),
                ("AsyncAmd", "true"),
                ("AsyncAmdStatusCallback", self.amd_callback),
                ("AsyncAmdStatusCallbackMethod", "POST"),
            ]
        return pairs

    def sdk_arguments(self) -> dict[str, Any]:
        """The same form as keyword arguments of the twilio SDK's ``calls.create``.

        Each form name in snake case (``From``: ``from_``), ``StatusCallbackEvent`` a list.
        """
        arguments: dict[str, Any] = {}
        for name, value in self.form():
            key = _SNAKE.sub("_", name).lower()
            key = "from_" if key == "from" else key
            if name == "StatusCallbackEvent":
                arguments.setdefault(key, []).append(value)
            else:
                arguments[key] = value
        return arguments


#: Where a form name's words meet (``StatusCallback``: ``status_callback``).
_SNAKE = re.compile(r"(?<=[a-z])(?=[A-Z])")


def twiml_url(
    public_url: str, route: str | None = None, params: Iterable[tuple[str, str]] = ()
) -> str:
    """``{public}/twiml``, with ``route=NAME`` and ``param_<name>=<value>`` as its query string."""
    query = [(ROUTE_QUERY, route)] if route else []
    query += [(PARAM_PREFIX + name, value) for name, value in params]
    base = public_url.rstrip("/") + "/twiml"
    return base + ("?" + urlencode(query) if query else "")


def check_params(params: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """The call's parameters as ``(name, value)`` strings; a bad one is a :class:`ValueError`.

    A name is non-empty, given once, and does not start with ``crctl_`` (the relay's own
    parameters: ``/twiml`` would ignore it).
    """
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    checked: list[tuple[str, str]] = []
    for name, value in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"parameter {name!r}: a parameter needs a name (k=v)")
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"parameter {name!r}: names starting with {RESERVED_PREFIX} are the relay's own"
            )
        if any(name == seen for seen, _ in checked):
            raise ValueError(f"parameter {name!r}: given twice, give it once")
        if not isinstance(value, str | int | float | bool) or value is None:
            raise ValueError(f"parameter {name!r}: the value must be a string, got {value!r}")
        checked.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
    return checked


def check_machine_detection(value: str | None) -> str | None:
    """``Enable``, ``DetectMessageEnd`` (any case) or ``None``; else a :class:`ValueError`."""
    if value is None or value == "":
        return None
    for known in MACHINE_DETECTION:
        if value.lower() == known.lower():
            return known
    raise ValueError(
        f"machine detection {value!r}: use {' or '.join(MACHINE_DETECTION)} (or leave it off)"
    )


def call_request(
    public_url: str,
    to: str,
    from_: str,
    *,
    route: str | None = None,
    params: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    machine_detection: str | None = None,
) -> CallRequest:
    """The Call that rings ``to`` from ``from_`` and connects it to the relay at ``public_url``.

    Raises:
        ValueError: a bad route name, parameter or machine detection value (one line).
    """
    base = public_url.rstrip("/")
    if route and not ROUTE_NAME.match(route):
        raise ValueError(f"route {route!r}: not a route's name: {ALLOWED['name']}")
    detection = check_machine_detection(machine_detection)
    return CallRequest(
        to=to.strip(),
        from_=from_.strip(),
        url=twiml_url(base, route or None, check_params(params)),
        status_callback=base + "/status",
        machine_detection=detection,
        amd_callback=base + "/amd" if detection else None,
    )


def refusal(action: str, code: int | None, message: str, status: int | None = None) -> DialError:
    """Twilio's refusal as one line: ``calling +1…: Twilio error 21211: …; <the fix>``."""
    fix = REFUSALS.get(code or 0)
    text = " ".join(message.split()) or (f"HTTP {status}" if status else "refused")
    label = f"Twilio error {code}" if code else "Twilio refused"
    return DialError(
        f"{action} failed: {label}: {text}" + (f"; {fix}" if fix else ""),
        code=code,
        status=status,
        fix=fix,
    )


async def create_call(account: TwilioAccount, request: CallRequest) -> dict[str, Any]:
    """Create the call on Twilio's REST API; returns the Call resource (``sid``, ``status``…).

    Raises:
        DialError: Twilio refused (``code``, ``fix``) or could not be reached.
    """
    import aiohttp  # the relay's HTTP client; imported when a call is made

    url = f"{account.api_url.rstrip('/')}/2010-04-01/Accounts/{account.account_sid}/Calls.json"
    action = f"calling {request.to}"
    credentials = f"{account.username}:{account.password}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http,
            http.post(url, data=request.form(), headers=headers) as response,
        ):
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DialError(
            f"{action} failed: cannot reach Twilio at {account.api_url} "
            f"({type(exc).__name__}); check the network connection and try again"
        ) from None
    if 200 <= status < 300 and isinstance(body, dict) and body.get("sid"):
        return body
    found = body if isinstance(body, dict) else {}
    code = found.get("code")
    failed = refusal(
        action, code if isinstance(code, int) else None, str(found.get("message") or ""), status
    )
    if status == 401:  # the relay's credentials, not the request: its operator's to fix
        raise DialError(
            f"{failed}; check the relay's {account.account_sid} credentials "
            "(TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN, or TWILIO_API_KEY + TWILIO_API_SECRET)",
            code=failed.code,
            status=status,
        )
    raise failed
